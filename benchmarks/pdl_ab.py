"""Programmatic dependent launch on and off, same kernels, same process; prints JSON.

    python benchmarks/pdl_ab.py [--shapes 4096x4096,...] [--formats w4g128,w2g64,w8g128] [--ms 1,4,16] [--top 3]

For each shape, format and row count the tuner ranks its candidates (``Tuner``); the ``--top`` fastest of the
kinds that take PDL (``gemv`` at 1 row, ``mma``, ``mma_kw``, ``mma_kb``) are each timed twice in one CUDA graph over
weight copies beyond L2 (as ``benchmarks/kernels.py`` times its rows): launched plainly and with PDL (the programs read
their first weight tiles before waiting for the previous kernel), whatever the default
(:func:`~auto_quant.kernels.grid_dependency.pdl_launch`) would choose. Back-to-back matmuls are what PDL overlaps; in
decode the neighbours are also norms, activations and attention, so the end-to-end figure is
``benchmarks/kernels.py``'s decode rows. Every PDL output is checked against the plain one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch
import torch.nn.functional as F

# benchmarks/kernels.py by path: the checkout root must not go on sys.path (its kernels/ folder would shadow the
# `kernels` package transformers probes for)
_spec = importlib.util.spec_from_file_location("_bench_kernels", os.path.join(os.path.dirname(__file__), "kernels.py"))
_bk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bk)

PDL_KINDS = ("gemv", "mma", "mma_kw", "mma_kb")


def ab_rows(N, K, fmt, M, top, dev, dt):
    from auto_quant.kernels.dispatch import Workspace, launch
    from auto_quant.kernels.tuner import Tuner

    bits, group, sym = _bk.parse_format(fmt)
    w = _bk.random_kernel_weight(N, K, bits, group, sym, dev)
    copies = _bk.copies_beyond_l2(w, w.nbytes(), _bk.clone_weight)
    x = torch.randn(M, K, device=dev, dtype=dt)
    ws = Workspace()
    tuner = Tuner()
    pick = tuner.config(x, w, None, ws)
    ranked = sorted(tuner.timings[tuner.key(x, w)].items(), key=lambda kv: kv[1])
    chosen = [c for c, _ in ranked if c.kind in PDL_KINDS and (c.kind != "gemv" or c.block_m == 1)][:top]
    wf = torch.randn(N, K, device=dev, dtype=dt)
    bf16_copies = _bk.copies_beyond_l2(wf, N * K * 2, torch.Tensor.clone)
    bf16_us = _bk.graph_time_us([lambda c=c: F.linear(x, c) for c in bf16_copies])
    rows = []
    for cfg in chosen:
        variants = {"plain": lambda c: launch(x, c, None, cfg, ws, pdl=False),
                    "pdl": lambda c: launch(x, c, None, cfg, ws, pdl=True)}
        plain = variants["plain"](w).double()
        err = max(((variants[v](w).double() - plain).norm() / plain.norm()).item() for v in variants)
        us = {v: _bk.graph_time_us([lambda c=c, f=f: f(c) for c in copies]) for v, f in variants.items()}
        rows.append({"N": N, "K": K, "M": M, "format": fmt, "config": f"{cfg.kind}:{cfg.block_n}x{cfg.block_k}"
                     f"s{cfg.split_k}w{cfg.num_warps}st{cfg.num_stages}", "tuner_pick": cfg == pick,
                     **{f"{v}_us": round(t, 2) for v, t in us.items()},
                     "pdl_speedup": round(us["plain"] / us["pdl"], 3), "bf16_us": round(bf16_us, 2),
                     "pdl_vs_bf16": round(bf16_us / us["pdl"], 3), "max_rel_err_vs_plain": err})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="4096x4096,6144x4096,4096x14336,14336x4096,28672x4096")
    p.add_argument("--formats", default="w4g128")
    p.add_argument("--ms", default="1,4,16")
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    dev = torch.device("cuda")
    dt = getattr(torch, args.dtype)
    out = {"machine": torch.cuda.get_device_name(dev), "command": " ".join(sys.argv), "rows": []}
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        for fmt in args.formats.split(","):
            for M in (int(m) for m in args.ms.split(",")):
                out["rows"] += ab_rows(N, K, fmt, M, args.top, dev, dt)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

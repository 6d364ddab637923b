"""Time the tuner's candidates of the installed tree; prints JSON (one row per configuration).

    python benchmarks/config_times.py [--shapes 4096x4096,14336x4096] [--ms 1,4,16,256] [--formats w4g128]
                                      [--kinds mma,wgmma] [--split-only] [--per-case 10]

For each shape, format and row count the first ``--per-case`` candidates of ``kernels.dispatch.candidates`` (of
the ``--kinds`` given; with ``--split-only`` those with ``split_k > 1``), bf16 activations, are each timed in one
CUDA graph over weight copies beyond L2 (as ``benchmarks/kernels.py`` times its rows). The candidate list does
not depend on the kernels' code, so running this once per tree (before and after a kernel change) gives
same-configuration A/B pairs. ``rel_to_first`` is each output's relative distance to the case's first
configuration (split-K rounding only).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys

import torch

# benchmarks/kernels.py by path: the checkout root must not go on sys.path (its kernels/ folder would shadow the
# `kernels` package transformers probes for)
_spec = importlib.util.spec_from_file_location("_bench_kernels", os.path.join(os.path.dirname(__file__), "kernels.py"))
_bk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bk)


def main():
    from auto_quant.kernels.dispatch import Workspace, candidates, launch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x4096,14336x4096")
    p.add_argument("--ms", default="1,4,16,256")
    p.add_argument("--formats", default="w4g128", help="wBITSgGROUP[a], e.g. w4g128,w4g128a,w2g64,w8g128")
    p.add_argument("--kinds", default="", help="only these kernel kinds, comma-separated")
    p.add_argument("--split-only", action="store_true")
    p.add_argument("--per-case", type=int, default=10)
    args = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    rows = []
    kinds = set(args.kinds.split(",")) if args.kinds else None
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        for fmt in args.formats.split(","):
            bits, gs, sym = _bk.parse_format(fmt)
            w = _bk.random_kernel_weight(N, K, bits, gs, sym, dev)
            copies = _bk.copies_beyond_l2(w, w.nbytes(), _bk.clone_weight)
            ws = Workspace()
            for M in (int(m) for m in args.ms.split(",")):
                x = torch.randn(M, K, device=dev, dtype=dt)
                cfgs = [c for c in candidates(M, N, K, dev, bits, gs, dt)
                        if (c.split_k > 1 or not args.split_only) and (kinds is None or c.kind in kinds)]
                first = None
                for c in cfgs[: args.per_case]:
                    row = {"N": N, "K": K, "M": M, "format": fmt, "config": dataclasses.asdict(c)}
                    try:
                        y = launch(x, w, None, c, ws).double()
                        first = y if first is None else first
                        row["rel_to_first"] = ((y - first).norm() / first.norm()).item()
                        row["us"] = round(_bk.graph_time_us([lambda cc=cc: launch(x, cc, None, c, ws) for cc in copies],
                                                            replays=10, warm_s=0.05), 2)
                    except Exception as e:  # a candidate that does not compile or fit: recorded, not fatal
                        row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)  # kept if a time limit stops the run
                print(f"{N}x{K} {fmt} M={M}: {min(len(cfgs), args.per_case)} configurations", file=sys.stderr,
                      flush=True)
            del copies, w
            torch.cuda.empty_cache()
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Launch every tuning candidate of the Triton kernels many times and check each result; prints JSON.

    python benchmarks/kernel_stress.py [--reps 30] [--shapes 4096x4096,4096x14336] [--ms 1,3,16,40,64,256]
                                       [--kinds wgmma]

A race shows up as a launch whose result differs from the reference while the others match, so
every candidate (``kernels.dispatch.candidates``; dequantize + cuBLAS left out) runs ``--reps`` times
per (shape, format, row count) and the worst relative error is kept. Formats: W4 g128 sym and asym,
W4 per-channel, W2 g64, W8 g128. Configurations above 8e-3 (the GPU tests' bound), or that fail to launch, are
listed as bad.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

# run as a script, this folder is sys.path[0]: its gguf.py would shadow the gguf package auto_quant imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

FORMATS = ((4, -1, True), (4, 128, True), (4, 128, False), (2, 64, True), (8, 128, True))
TOL = 8e-3


def quantized(N: int, K: int, bits: int, group_size: int, sym: bool, seed: int):
    from auto_quant.kernels import pack_codes
    from auto_quant.quant import QuantSpec, quantize_weight

    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(N, K, device="cuda", generator=g)
    q = quantize_weight(w, QuantSpec(bits=bits, group_size=group_size, sym=sym))
    return pack_codes(q.codes, q.zero, q.scale, bits, group_size, torch.float16)


def main():
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, candidates, launch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--shapes", default="4096x4096,4096x14336")
    p.add_argument("--ms", default="1,3,16,40,64,256")
    p.add_argument("--kinds", default="", help="only these kernel kinds, comma-separated (e.g. wgmma)")
    args = p.parse_args()
    kinds = set(args.kinds.split(",")) if args.kinds else None
    ws = Workspace()
    t0 = time.time()
    bad, checked = [], 0
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        for bits, gs, sym in FORMATS:
            kw = quantized(N, K, bits, gs, sym, N + K + bits + gs)
            W = dequantize(kw).double()
            for M in (int(m) for m in args.ms.split(",")):
                x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
                ref = x.double() @ W.t()
                for cfg in candidates(M, N, K, x.device, bits, gs):
                    if cfg.kind == "dequant" or (kinds and cfg.kind not in kinds):
                        continue
                    try:
                        outs = [launch(x, kw, None, cfg, ws) for _ in range(args.reps)]
                    except Exception as e:  # a candidate that does not compile or fit: a finding, not a crash
                        bad.append({"N": N, "K": K, "bits": bits, "group_size": gs, "sym": sym, "M": M,
                                    "config": dataclasses.asdict(cfg), "error": f"{type(e).__name__}: {str(e)[:160]}"})
                        print("bad:", bad[-1], file=sys.stderr, flush=True)
                        continue
                    worst = max(((y.double() - ref).norm() / ref.norm()).item() for y in outs)
                    checked += 1
                    if not worst < TOL:
                        bad.append({"N": N, "K": K, "bits": bits, "group_size": gs, "sym": sym, "M": M,
                                    "config": dataclasses.asdict(cfg), "worst_rel_err": worst})
                        print("bad:", bad[-1], file=sys.stderr, flush=True)
            print(f"{N}x{K} W{bits} g{gs} {'sym' if sym else 'asym'}: {checked} checked, {len(bad)} bad, "
                  f"{time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "reps": args.reps, "configs_checked": checked,
                      "bad": bad, "seconds": round(time.time() - t0, 1)}, indent=1))


if __name__ == "__main__":
    main()

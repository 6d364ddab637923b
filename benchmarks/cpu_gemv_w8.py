"""One 8-bit GEMV (M = 1) on CPU: the ``cpu_gemv`` backend vs the torch reference path vs PyTorch's
``aten._weight_int8pack_mm``; prints JSON.

    python benchmarks/cpu_gemv_w8.py [--threads 1] [--rounds 5]

* Layers: RTN W8 of random weights, SmolLM2-135M's gate/up (1536 x 576) and lm_head (49152 x 576),
  per-channel sym (the only case ``_weight_int8pack_mm`` serves: int8 weights, one scale per row),
  g128 asym and g32 sym.
* ``cpu_gemv`` and ``int8pack_mm`` cycle through enough weight copies (about 96 MB) that every call
  reads its weights from memory rather than L3; µs per call, best of ``--rounds``; Python call
  included; float32 in and out for ``cpu_gemv``, bf16 for ``int8pack_mm`` (float32 is shown too).
* The reference is ``QuantLinear.forward`` with no backend attached (what ``backend="torch"`` runs):
  it dequantizes the whole weight on every call; float32 input.
* GB/s = the engine's own weight bytes / time (``cpu_gemv``: codes + fp16 scales (+ zeros) per block
  of 32; ``int8pack_mm``: int8 codes + one bf16 scale per row).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

# benchmarks/gguf.py would shadow the `gguf` package for scripts run from this folder
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

SHAPES = [(1536, 576), (49152, 576)]  # (out N, in K)
FORMATS = [(-1, True), (128, False), (32, True)]  # (group size, sym)
COPIES_BYTES = 96 * 2**20


def best_us(calls, rounds: int) -> float:
    """Best over ``rounds`` of the mean time of one call, cycling through ``calls``."""
    for c in calls[:3]:
        c()
    best = math.inf
    for _ in range(rounds):
        t = time.perf_counter()
        for c in calls:
            c()
        best = min(best, (time.perf_counter() - t) / len(calls))
    return best * 1e6


def copies_for(nbytes: int) -> int:
    return max(1, math.ceil(COPIES_BYTES / nbytes))


def make_layer(n: int, k: int, group_size: int, sym: bool):
    from auto_quant.inference.qlinear import QuantLinear
    from auto_quant.quant import QuantSpec, quantize_weight

    g = torch.Generator().manual_seed(0)
    qw = quantize_weight(torch.randn(n, k, generator=g), QuantSpec(bits=8, group_size=group_size, sym=sym))
    return QuantLinear.from_quantized(qw, None, layout="gptq_v2")


def time_cpu_gemv(layer, x, rounds: int) -> tuple[float, int]:
    import dataclasses

    from auto_quant.inference import cpu_gemv

    run = cpu_gemv.prepare(layer)
    nbytes = run.weight.data.numel()
    copies = [cpu_gemv.CpuGemvLinear(dataclasses.replace(run.weight, data=run.weight.data.clone()), None)
              for _ in range(copies_for(nbytes))]
    return best_us([lambda c=c: c(x) for c in copies], rounds), nbytes


def int8pack_weights(layer):
    """Per-channel sym W8 as ``_weight_int8pack_mm`` wants it: int8 ``code - 128``, one scale per row."""
    codes, zero, scale = layer.unpack()
    assert bool((zero == 128).all()) and scale.shape[1] == 1
    return (codes - 128).to(torch.int8).contiguous(), scale[:, 0].to(torch.bfloat16)


def time_int8pack_mm(layer, x, rounds: int, dtype: torch.dtype) -> tuple[float, int]:
    w, s = int8pack_weights(layer)
    nbytes = w.numel() + 2 * s.numel()
    copies = [(w.clone(), s.to(dtype)) for _ in range(copies_for(nbytes))]
    xd = x.to(dtype)
    return best_us([lambda c=c: torch.ops.aten._weight_int8pack_mm(xd, c[0], c[1]) for c in copies], rounds), nbytes


def time_reference(layer, x, n: int) -> float:
    reps = 3 if n > 10000 else 20
    with torch.no_grad():
        return best_us([lambda: layer(x)] * reps, 3)


def bench(args) -> dict:
    from auto_quant.inference import cpu_gemv

    torch.set_num_threads(args.threads)
    rows = []
    for n, k in SHAPES:
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(1))
        for group_size, sym in FORMATS:
            layer = make_layer(n, k, group_size, sym)
            row = {"N": n, "K": k, "group_size": group_size, "sym": sym}
            us, nbytes = time_cpu_gemv(layer, x, args.rounds)
            row.update(cpu_gemv_us=round(us, 2), cpu_gemv_GBps=round(nbytes / us / 1e3, 2))
            row["reference_us"] = round(time_reference(layer, x, n), 1)
            if group_size == -1 and sym:
                for name, dtype in (("int8pack_mm_bf16", torch.bfloat16), ("int8pack_mm_fp32", torch.float32)):
                    us8, nbytes8 = time_int8pack_mm(layer, x, args.rounds, dtype)
                    row.update({f"{name}_us": round(us8, 2), f"{name}_GBps": round(nbytes8 / us8 / 1e3, 2)})
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return {"machine": platform.processor() or platform.machine(), "threads": args.threads,
            "torch": torch.__version__, "cpu_gemv_path": cpu_gemv.vector_path(), "rows": rows}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    print(json.dumps(bench(p.parse_args()), indent=1))


if __name__ == "__main__":
    main()

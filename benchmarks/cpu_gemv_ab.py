"""The ``cpu_gemv`` C kernel of a git revision against the working tree's, timed in one process; prints JSON.

    python benchmarks/cpu_gemv_ab.py [--base HEAD] [--rounds 15] [--ms 1,4,16] [--bits 4,8]

* Both sources are built with the flags the backend uses (``-O3 -march=native -fopenmp ...``) into a temporary
  folder and loaded side by side with ctypes. Every round times each build once per case, in turn, so that
  both see the same machine state; this matters on a shared 2-core box whose speed drifts between processes.
* Cases: SmolLM2-135M's layer shapes (out x in) and its lm_head, M activation rows, one thread. Each timing
  cycles through weight copies totalling about 96 MB, beyond the L3 cache, so the weights come from memory as
  in decode (the lm_head: 16 MB, one copy). Codes are random; scales are 1.0.
* µs per call (ctypes call included), best and median over the rounds; GB/s = packed bytes / best time;
  ``ratio`` = base / working tree (above 1: the working tree is faster). ``same_output`` checks the two
  builds give equal results.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/gguf.py would shadow the `gguf` package for scripts run from this folder
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

SHAPES = [(960, 576), (576, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out N, in K)
COPIES_BYTES = 96 * 2**20


def build(source: Path, out: Path) -> ctypes.CDLL:
    from auto_quant.inference import cpu_gemv

    cc = cpu_gemv.find_c_compiler()
    flags = cpu_gemv.BASE_FLAGS + (cpu_gemv.NATIVE, "-fopenmp")
    failure = cpu_gemv._compile([cc, *flags, str(source), "-lm"], out)
    if failure is not None:
        raise SystemExit(f"building {source} failed: {failure}")
    return cpu_gemv.open_library(out)


def packed_copies(n: int, k: int, bits: int, copies: int) -> list:
    from auto_quant.inference import cpu_gemv

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g)
    w = cpu_gemv.pack_weight(codes, torch.full((n, k // 32), 2 ** (bits - 1)), torch.ones(n, k // 32), bits, 32)
    return [w] + [cpu_gemv.PackedWeight(w.data.clone(), w.bits, w.zero, n, k) for _ in range(copies - 1)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="HEAD", help="the git revision to compare with (default HEAD)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--ms", default="1,4,16")
    p.add_argument("--bits", default="4,8")
    args = p.parse_args()
    torch.set_num_threads(1)
    root = Path(__file__).resolve().parent.parent
    tmp = Path(tempfile.mkdtemp(prefix="aq_gemv_ab_"))
    base_src = tmp / "base.c"
    base_src.write_bytes(subprocess.run(["git", "-C", str(root), "show", f"{args.base}:kernels/cpu_gemv.c"],
                                        check=True, capture_output=True).stdout)
    libs = {"base": build(base_src, tmp / "base.so"), "tree": build(root / "kernels" / "cpu_gemv.c", tmp / "tree.so")}
    res = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "load_avg_at_start": os.getloadavg()},
           "command": " ".join(["python"] + sys.argv), "base": args.base, "cases": []}
    for bits in map(int, args.bits.split(",")):
        for n, k in SHAPES:
            nbytes = packed_copies(n, k, bits, 1)[0].data.numel()
            weights = packed_copies(n, k, bits, max(1, COPIES_BYTES // nbytes))
            for m in map(int, args.ms.split(",")):
                x = torch.randn(m, k)
                ys = {name: torch.empty(m, n) for name in libs}
                times = {name: [] for name in libs}
                for _ in range(args.rounds):
                    for name, lib in libs.items():
                        t = time.perf_counter()
                        for w in weights:
                            lib.aq_gemm(x.data_ptr(), ys[name].data_ptr(), m, n, k, w.data.data_ptr(), w.bits, w.zero,
                                        None, 1)
                        times[name].append((time.perf_counter() - t) / len(weights))
                case = {"bits": bits, "N": n, "K": k, "M": m, "copies": len(weights),
                        "same_output": torch.equal(ys["base"], ys["tree"])}
                for name, ts in times.items():
                    case[f"{name}_us"] = round(min(ts) * 1e6, 2)
                    case[f"{name}_median_us"] = round(statistics.median(ts) * 1e6, 2)
                    case[f"{name}_GBps"] = round(nbytes / min(ts) / 1e9, 2)
                case["ratio"] = round(min(times["base"]) / min(times["tree"]), 3)
                res["cases"].append(case)
    res["load_avg_at_end"] = os.getloadavg()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

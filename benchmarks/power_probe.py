"""Does a partial wave run faster per tile than a full one, and is the clock why? Prints JSON (prepared in session 17;
run in session 18: yes, every case at the 700 W limit, docs/bench/kernels.md).

At 1024 rows the `wgmma` kernel's last, partial wave did not cost a whole tile time: splitting it (tail split,
stream-K; docs/bench/kernels.md, session 17) gained nothing beyond the run-to-run spread. One explanation: the H100
runs at its power limit with every multiprocessor busy, and at a higher clock with few. This probe measures it.
For a shape and row count it times, each replayed for ``--seconds`` while ``nvidia-smi`` samples the SM clock and
the board power every 20 ms:

* ``bf16``: cuBLAS ``F.linear`` on a bf16 weight;
* ``full``: the tuned W4 g128 kernel on the whole layer;
* ``partial``: the same configuration on a weight of as many tiles as the full layer's last wave holds
  (``tiles % multiprocessors``), so that it runs as one partial wave.

Each row gives µs per call, the tile count (``full`` and ``partial``), and the mean, min and max SM clock (MHz)
and power (W) sampled during the replays; two rounds. One CUDA graph over weight copies beyond L2, as
``benchmarks/kernels.py`` times its table.

    python benchmarks/power_probe.py [--shapes 14336x4096,4096x4096] [--rows 1024] [--seconds 1.5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

# run as a script, this folder is sys.path[0]: its gguf.py would shadow the gguf package auto_quant imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

QUERY = ["--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits"]


def parse_sample(line: str) -> tuple[float, float] | None:
    """``"1755, 612.34"`` -> ``(1755.0, 612.34)``; None for a line that is not two numbers (``[N/A]``, blank)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 2:
        return None
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        return None


def summarize(samples: list[tuple[float, float]]) -> dict:
    """Mean, min and max of the clock and power samples (empty: ``{"samples": 0}``)."""
    if not samples:
        return {"samples": 0}
    clk = [s[0] for s in samples]
    pw = [s[1] for s in samples]
    return {"samples": len(samples), "sm_mhz_mean": round(statistics.fmean(clk), 1), "sm_mhz_min": min(clk),
            "sm_mhz_max": max(clk), "power_w_mean": round(statistics.fmean(pw), 1), "power_w_min": min(pw),
            "power_w_max": max(pw)}


class Sampler:
    """``nvidia-smi`` in the background, one sample every ``period_ms``; ``between(t0, t1)`` summarizes a window."""

    def __init__(self, index: int, period_ms: int = 20):
        self.samples: list[tuple[float, tuple[float, float]]] = []
        self.proc = None
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        self.proc = subprocess.Popen([exe, f"--id={index}", *QUERY, f"--loop-ms={period_ms}"], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            s = parse_sample(line)
            if s is not None:
                self.samples.append((time.perf_counter(), s))

    def between(self, t0: float, t1: float) -> dict:
        return summarize([s for t, s in list(self.samples) if t0 <= t <= t1])

    def close(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=5)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="14336x4096,4096x4096,28672x4096")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=1.5)
    args = p.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_bench_kernels", os.path.join(here, "kernels.py"))
    bk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bk)
    from auto_quant.kernels.dispatch import Workspace, launch, quant_matmul
    from auto_quant.kernels.tuner import Tuner

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    sampler = Sampler(dev.index or 0)
    tuner, ws = Tuner(), Workspace()
    M = args.rows
    try:
        for shape in args.shapes.split(","):
            N, K = (int(v) for v in shape.split("x"))
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            w = bk.random_kernel_weight(N, K, 4, 128, True, dev)
            quant_matmul(x, w, tuner=tuner, workspace=ws)
            cfg = tuner.best[tuner.key(x, w)]
            tiles_m = -(-M // cfg.block_m)
            tiles = -(-N // cfg.block_n) * tiles_m
            tail = tiles % sms or sms
            n_part = max(1, tail // tiles_m) * cfg.block_n
            wb = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
            cases = {"bf16": ([lambda b=b: F.linear(x, b) for b in bk.copies_beyond_l2(wb, N * K * 2,
                                                                                          torch.Tensor.clone)], None),
                     "full": ([lambda c=c: launch(x, c, None, cfg, ws)
                               for c in bk.copies_beyond_l2(w, w.nbytes(), bk.clone_weight)], tiles)}
            wp = bk.random_kernel_weight(n_part, K, 4, 128, True, dev)
            cases["partial"] = ([lambda c=c: launch(x, c, None, cfg, ws)
                                 for c in bk.copies_beyond_l2(wp, wp.nbytes(), bk.clone_weight)],
                                -(-n_part // cfg.block_n) * tiles_m)
            for rnd in (1, 2):
                for name, (calls, n_tiles) in cases.items():
                    t0 = time.perf_counter()  # replayed for `seconds`, then timed over 20 replays
                    us = bk.graph_time_us(calls, replays=20, warm_s=args.seconds)
                    t1 = time.perf_counter()
                    row = {"N": N if name != "partial" else n_part, "K": K, "M": M, "case": name, "round": rnd,
                           "config": bk.config_name(cfg) if name != "bf16" else None, "us": round(us, 2),
                           **sampler.between(t0, t1)}
                    if n_tiles:
                        row["tiles"] = n_tiles
                    print(json.dumps(row), flush=True)
            del cases, w, wp, wb
            torch.cuda.empty_cache()
    finally:
        sampler.close()
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "sms": sms, "command": " ".join(sys.argv)}),
          file=sys.stderr)


if __name__ == "__main__":
    main()

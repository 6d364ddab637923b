"""The ``wgmma`` kernel's schedules at 256 and 1024 rows, timed back to back with cuBLAS bf16 (session 17).

Past one wave, a tile count that is not a multiple of the wave leaves most multiprocessors idle in the last one:
at 1024 rows 14336x4096 has 448 tiles of 256x128, 3.39 waves on 132 multiprocessors. The kernel's serial schedule
(:func:`~auto_quant.kernels.wgmma_plan.wgmma_schedule`) splits only the last wave's tiles over K (52 tiles x 2
parts) and sums the parts through scratch with plain stores and loads.

    python benchmarks/wgmma_schedule.py > schedule.jsonl

prints one JSON line per check (every variant against the float64 product on layers whose tiles pass one wave,
with a partial last row block and a bias) and per timing (W4 g128 on the five Llama shapes at 256 and 1024 rows,
every 256-row tile at split 1 and at its tail split; bf16 cuBLAS on the same shape in the same round; two rounds;
one CUDA graph over copies beyond L2 as ``benchmarks/kernels.py`` times its table).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

# run as a script, this folder is sys.path[0]: its gguf.py would shadow the gguf package auto_quant imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = ("4096x4096", "6144x4096", "14336x4096", "4096x14336", "28672x4096")


def variants(M: int, N: int, K: int, sms: int, smem: int, bits: int = 4):
    """``(label, config, schedule)`` for every 256-row tile: split 1; where the last wave leaves slots idle, the tail
    split (the dispatcher's schedule for ``split_k`` > 1) and stream-K over the tail alone and over the tail and
    one whole wave (one wave of programs)."""
    from auto_quant.kernels.dispatch import KernelConfig
    from auto_quant.kernels.wgmma_plan import (WGMMA_TILES, stream_k_schedule, wgmma_slots, wgmma_smem_bytes,
                                               wgmma_tail_parts)

    out = []
    for bm, bn, bk, warps, stages in WGMMA_TILES[256]:
        if wgmma_smem_bytes(bm, bn, bk, stages, bits) > smem:
            continue
        tiles = -(-N // bn) * -(-M // bm)
        slots = wgmma_slots(bm, bn, bk, warps, stages, bits, sms, smem)
        out.append(("split1", KernelConfig("wgmma", bm, bn, bk, 1, warps, stages), None))
        tail = wgmma_tail_parts(tiles, slots, K, bk)
        if tail > 1:
            out.append(("tail", KernelConfig("wgmma", bm, bn, bk, tail, warps, stages), None))
        if tiles > slots and tiles % slots:
            one = KernelConfig("wgmma", bm, bn, bk, 1, warps, stages)
            out.append(("sk0", one, stream_k_schedule(tiles, slots, 0)))
            out.append(("sk1", one, stream_k_schedule(tiles, slots, 1)))
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_bench_kernels", os.path.join(here, "kernels.py"))
    bk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bk)
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, _sms, smem_limit
    from auto_quant.kernels.gluon_wgmma import launch_wgmma

    dev = torch.device("cuda")
    sms, smem = _sms(dev), smem_limit(dev)
    ws = Workspace()
    # correctness: layers past one wave, a partial last row block, a bias; every variant against float64
    for (N, K, M), (bits, gs, sym) in (((4608, 2048, 1000), (4, 128, True)), ((4608, 2048, 1000), (4, 128, False)),
                                       ((4608, 2048, 1000), (2, 64, True)), ((4608, 2048, 1000), (8, 128, True)),
                                       ((14336, 4096, 1024), (4, 128, True)), ((6000, 4096, 700), (4, -1, False))):
        w = bk.random_kernel_weight(N, K, bits, gs, sym, dev)
        W = dequantize(w).double()
        bias = torch.randn(N, device=dev).to(torch.bfloat16)
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        ref = x.double() @ W.t() + bias.double()
        for label, cfg, sched in variants(M, N, K, sms, smem, bits):
            if gs > 0 and gs % cfg.block_k:
                continue
            row = {"check": True, "N": N, "K": K, "M": M, "bits": bits, "gs": gs, "sym": sym,
                   "cfg": bk.config_name(cfg), "schedule": label}
            try:
                y = launch_wgmma(x, w, bias, cfg, ws, sched)
                row["rel_err"] = ((y.double() - ref).norm() / ref.norm()).item()
                row["max_row_err"] = max(((y[m].double() - ref[m]).norm() / ref[m].norm()).item() for m in range(M))
            except Exception as e:  # noqa: BLE001 (a probe: report and go on)
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(json.dumps(row), flush=True)
        torch.cuda.synchronize()
        row = {"check": True, "workspace_clean": all(not c.any() for _, c in ws._bufs.values())}
        print(json.dumps(row), flush=True)
    # timings
    for shape in SHAPES:
        N, K = (int(v) for v in shape.split("x"))
        w = bk.random_kernel_weight(N, K, 4, 128, True, dev)
        copies = bk.copies_beyond_l2(w, w.nbytes(), bk.clone_weight)
        wb = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        wbs = bk.copies_beyond_l2(wb, N * K * 2, torch.Tensor.clone)
        for M in (256, 1024):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            for rnd in (1, 2):
                us = bk.graph_time_us([lambda b=b: F.linear(x, b) for b in wbs], warm_s=0.1)
                print(json.dumps({"N": N, "K": K, "M": M, "round": rnd, "kind": "bf16", "us": round(us, 2)}), flush=True)
                for label, cfg, sched in variants(M, N, K, sms, smem):
                    row = {"N": N, "K": K, "M": M, "round": rnd, "kind": "wgmma", "cfg": bk.config_name(cfg),
                           "schedule": label}
                    try:
                        us = bk.graph_time_us([lambda c=c: launch_wgmma(x, c, None, cfg, ws, sched)
                                               for c in copies], warm_s=0.1)
                        row["us"] = round(us, 2)
                    except Exception as e:  # noqa: BLE001
                        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    print(json.dumps(row), flush=True)
        del copies, w, wbs, wb
        torch.cuda.empty_cache()
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "command": " ".join(sys.argv)}), file=sys.stderr)


if __name__ == "__main__":
    main()

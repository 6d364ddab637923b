"""Sweep a kernel's tile shapes, warps, pipeline depth and split-K on the GPU; prints JSON.

    python benchmarks/gemv_sweep.py [--shapes 4096x4096,4096x14336] [--formats w4g128,w2g64] [--top 8]
    python benchmarks/gemv_sweep.py --kernel tdot --ms 8,16,64,256 [--shapes ...] [--formats ...]
    python benchmarks/gemv_sweep.py --kernel mma_kw --ms 1,2,4 [--shapes ...] [--formats ...]
    python benchmarks/gemv_sweep.py --kernel mma_kb --ms 1,4,8,16 [--shapes ...] [--formats ...]

``gemv``: the M = 1 kernel. ``tdot``: the weight-side tensor-core kernel at the given row counts,
with dequantize + cuBLAS and the older ``dot`` tiles (the tuner's other candidates) timed alongside.
``wgmma``: the Gluon Hopper kernel over a tile grid. ``mma`` / ``mma_kw`` / ``mma_kb``: the Gluon ``mma.sync``
kernel's tuning candidates (``kernels/mma_plan.py``; warps along the weight rows, splitting K, or splitting K a
batch each) at the given row counts, the tuner's other candidates alongside.

Each configuration is timed like ``benchmarks/kernels.py`` times its rows (one CUDA graph over enough
weight copies to exceed L2, median of replays), next to bf16 cuBLAS in the same process, and checked
against the reference product. The tuner's own pick (``Tuner``: graph timing after L2 flushes) is
timed the same way, so the sweep shows how far the tuner's candidates and its timing are from the best.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import importlib.util

import torch
import torch.nn.functional as F

# the timing helpers of benchmarks/kernels.py, loaded by path: the checkout root must not go on sys.path
# (its kernels/ folder would shadow the `kernels` package transformers probes for)
_spec = importlib.util.spec_from_file_location("_bench_kernels", os.path.join(os.path.dirname(__file__), "kernels.py"))
_bk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bk)
clone_weight, graph_time_us, random_kernel_weight = _bk.clone_weight, _bk.graph_time_us, _bk.random_kernel_weight

# (block_n, word rows per tile, warps, stages)
TILES = [(32, 64, 4, 3), (32, 64, 4, 4), (64, 32, 4, 3), (64, 64, 8, 3), (128, 16, 4, 3), (128, 32, 4, 3),
         (128, 64, 8, 3), (128, 8, 2, 3), (256, 8, 2, 3), (256, 16, 4, 3), (256, 32, 8, 3), (256, 4, 2, 1),
         (256, 4, 2, 4), (512, 2, 4, 1), (512, 2, 4, 3), (512, 4, 4, 1), (512, 4, 4, 3), (512, 8, 8, 3),
         (1024, 2, 8, 3), (1024, 4, 8, 3), (64, 16, 2, 3), (64, 64, 4, 4)]
DEEP = [(512, 2, 4, 4), (512, 2, 4, 6), (512, 4, 4, 4), (512, 4, 4, 5), (512, 4, 4, 6), (512, 8, 4, 3), (512, 8, 4, 4),
        (512, 8, 8, 4), (1024, 4, 8, 4), (1024, 4, 8, 5), (512, 16, 8, 3), (512, 2, 2, 4), (512, 4, 2, 4)]
SPLITS = [1, 2, 4, 8, 16, 33, 66, 132, 264]
# tdot: (block_n, block_k, warps, stages); block_m from the row count
TDOT_TILES = [(64, 64, 4, 3), (64, 128, 4, 3), (64, 128, 4, 4), (128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3),
              (128, 128, 4, 4), (128, 128, 8, 3), (128, 64, 8, 4), (256, 64, 8, 3), (256, 128, 8, 3), (128, 32, 4, 5),
              (128, 64, 8, 2), (128, 32, 8, 3)]
TDOT_SPLITS = [1, 2, 3, 4, 6, 8, 16]
# wgmma (Gluon, sm_90, 4 bits): (block_n, block_k, warps, stages)
WGMMA_TILES = [(64, 128, 4, 4), (64, 128, 4, 6), (64, 128, 4, 3), (64, 64, 4, 6), (128, 128, 4, 4), (128, 64, 4, 6),
               (128, 128, 8, 4), (128, 64, 8, 4), (256, 64, 8, 4)]


def time_config(cfg, x, w, copies, ref, ws) -> dict:
    """One variant: its relative error and its graph time over the weight copies, or why it did not run."""
    from auto_quant.kernels.dispatch import launch

    try:
        y = launch(x, w, None, cfg, ws)
        err = ((y.double() - ref).norm() / ref.norm()).item()
        us = graph_time_us([lambda c=c: launch(x, c, None, cfg, ws) for c in copies], replays=10, warm_s=0.05)
    except Exception as e:  # out of resources: skip
        return {"config": dataclasses.asdict(cfg), "error": f"{type(e).__name__}: {str(e)[:160]}"}
    return {"config": dataclasses.asdict(cfg), "us": round(us, 2), "rel_err": err}


def sweep_tdot(args, out):
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import KernelConfig, Workspace, candidates, quant_matmul
    from auto_quant.kernels.mma_plan import mma_candidates, mma_kb_candidates, mma_kw_candidates
    from auto_quant.kernels.tuner import Tuner

    dev = torch.device("cuda")
    dt = getattr(torch, args.dtype)
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        wb = torch.randn(N, K, device=dev, dtype=dt) * 0.02
        copies_b = _bk.copies_beyond_l2(wb, N * K * 2, torch.Tensor.clone)
        for fmt in args.formats.split(","):
            bits, gs, _ = _bk.parse_format(fmt)
            w = random_kernel_weight(N, K, bits, gs, True, dev)
            W = dequantize(w).double()
            copies = _bk.copies_beyond_l2(w, w.nbytes(), clone_weight)
            ws = Workspace()
            for M in (int(m) for m in args.ms.split(",")):
                x = torch.randn(M, K, device=dev, dtype=dt)
                ref = x.double() @ W.t()
                bf16_us = graph_time_us([lambda wb=wb: F.linear(x, wb) for wb in copies_b])
                bms = sorted({min(max(16, 1 << (M - 1).bit_length()), args.max_bm), min(max(16, M // 2), 128)})
                splits = [int(v) for v in args.splits.split(",")] if args.splits else TDOT_SPLITS
                kind = args.kernel
                default_tiles = WGMMA_TILES if kind == "wgmma" else TDOT_TILES
                tiles = [tuple(int(v) for v in t.split("x")) for t in args.tdot_tiles.split(",")] if args.tdot_tiles \
                    else default_tiles
                if kind in ("mma", "mma_kw", "mma_kb"):  # the plan's own candidates (tiles, splits) for this shape
                    plan = {"mma": mma_candidates, "mma_kw": mma_kw_candidates, "mma_kb": mma_kb_candidates}[kind]
                    cfgs = plan(M, N, K, gs, torch.cuda.get_device_properties(dev).multi_processor_count, bits)
                else:
                    cfgs = [KernelConfig(kind, bm, bn, bk, sp, wa, st) for bm in bms for bn, bk, wa, st in tiles
                            for sp in splits if 16 <= math.ceil(N / bn) * math.ceil(M / bm) * sp <= 2048
                            and (kind == "wgmma" or bm < 128 or wa >= 8)  # no 128-row tdot on 4 warps
                            and K >= bk * 2 * sp]
                others = [c for c in candidates(M, N, K, dev, bits, gs, dt) if c.kind != kind]
                timings = [time_config(cfg, x, w, copies, ref, ws) for cfg in cfgs + others]
                good = sorted((t for t in timings if "us" in t), key=lambda t: t["us"])
                best_other = next((t for t in good if t["config"]["kind"] != kind), None)
                tuner = Tuner(rep_ms=15.0)
                quant_matmul(x, w, tuner=tuner, workspace=ws)
                pick = tuner.best[tuner.key(x, w)]
                pick_us = graph_time_us([lambda c=c: quant_matmul(x, c, tuner=tuner, workspace=ws) for c in copies])
                res = {"N": N, "K": K, "M": M, "format": fmt, "bf16_us": round(bf16_us, 2), "tested": len(timings),
                       "failed": sum("error" in t for t in timings),
                       "max_rel_err": max(t["rel_err"] for t in good),
                       "errors": sorted({t["error"] for t in timings if "error" in t})[:5],
                       "best": good[: args.top], "best_other": best_other,
                       "tuner_pick": dataclasses.asdict(pick), "tuner_pick_us": round(pick_us, 2)}
                out["results"].append(res)
                b = good[0]
                c = b["config"]
                print(f"{fmt} {N}x{K} M={M}: best {b['us']}us (x{bf16_us / b['us']:.2f} bf16) {c['kind']} bm{c['block_m']} "
                      f"bn{c['block_n']} bk{c['block_k']} s{c['split_k']} w{c['num_warps']} st{c['num_stages']}; "
                      f"best other {best_other and best_other['us']}us {best_other and best_other['config']['kind']}; "
                      f"tuner pick {pick_us:.2f}us {pick.kind}; bf16 {bf16_us:.2f}us; {len(timings)} configs",
                      file=sys.stderr, flush=True)
            del copies, w
            torch.cuda.empty_cache()
        del copies_b, wb



def main():
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, _gemv, codes_per_row, quant_matmul
    from auto_quant.kernels.tuner import Tuner

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096,28672x4096")
    p.add_argument("--formats", default="w4g128")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--tiles", default="all", help="all | deep (deeper pipelines and taller tiles at block_n 512/1024)")
    p.add_argument("--kernel", default="gemv", choices=["gemv", "tdot", "wgmma", "mma", "mma_kw", "mma_kb"])
    p.add_argument("--ms", default="8,16,32,64,256", help="tdot, wgmma, mma, mma_kw, mma_kb: row counts")
    p.add_argument("--max-bm", type=int, default=128, help="tdot: the largest row block tried (tensor-core N, <= 256)")
    p.add_argument("--tdot-tiles", default="", help="tdot: block_n x block_k x warps x stages, comma-separated "
                                                      "(default: the built-in list)")
    p.add_argument("--splits", default="", help="tdot: split-K factors, comma-separated (default: the built-in list)")
    args = p.parse_args()
    dev = torch.device("cuda")
    dt = getattr(torch, args.dtype)
    out = {"gpu": torch.cuda.get_device_name(), "command": " ".join(["python"] + sys.argv), "results": []}
    t0 = time.time()
    if args.kernel in ("tdot", "wgmma", "mma", "mma_kw", "mma_kb"):
        sweep_tdot(args, out)
        out["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(out, indent=1))
        return
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        wb = torch.randn(N, K, device=dev, dtype=dt) * 0.02
        x = torch.randn(1, K, device=dev, dtype=dt)
        copies_b = _bk.copies_beyond_l2(wb, N * K * 2, torch.Tensor.clone)
        bf16_us = graph_time_us([lambda w=w: F.linear(x, w) for w in copies_b])
        del copies_b, wb
        for fmt in args.formats.split(","):
            bits, gs, _ = _bk.parse_format(fmt)
            w = random_kernel_weight(N, K, bits, gs, True, dev)
            ref = (x.double() @ dequantize(w).double().t())
            copies = _bk.copies_beyond_l2(w, w.nbytes(), clone_weight)
            ws = Workspace()
            rows = math.ceil(K / codes_per_row(bits))
            timings = []
            for bn, br, warps, stages in {"all": TILES, "deep": DEEP, "both": TILES + DEEP}[args.tiles]:
                for split in SPLITS:
                    progs = math.ceil(N / bn) * split
                    if not 32 <= progs <= 4096 or rows / split < br:
                        continue
                    timings.append(time_config(_gemv(bn, br, bits, split, warps, stages), x, w, copies, ref, ws))
            good = sorted((t for t in timings if "us" in t), key=lambda t: t["us"])
            tuner = Tuner(rep_ms=15.0)
            quant_matmul(x, w, tuner=tuner, workspace=ws)
            pick = tuner.best[tuner.key(x, w)]
            pick_us = graph_time_us([lambda c=c: quant_matmul(x, c, tuner=tuner, workspace=ws) for c in copies])
            res = {"N": N, "K": K, "format": fmt, "bf16_us": round(bf16_us, 2), "tested": len(timings),
                   "failed": sum("error" in t for t in timings), "max_rel_err": max(t["rel_err"] for t in good),
                   "errors": sorted({t["error"] for t in timings if "error" in t})[:5],
                   "best": good[: args.top], "tuner_pick": dataclasses.asdict(pick), "tuner_pick_us": round(pick_us, 2)}
            out["results"].append(res)
            b = good[0]
            c = b["config"]
            print(f"{fmt} {N}x{K}: best {b['us']}us (x{bf16_us / b['us']:.2f} bf16) bn{c['block_n']} bk{c['block_k']} "
                  f"s{c['split_k']} w{c['num_warps']} st{c['num_stages']}; tuner pick {pick_us:.2f}us "
                  f"(x{bf16_us / pick_us:.2f}); bf16 {bf16_us:.2f}us; {len(timings)} configs", file=sys.stderr, flush=True)
            del copies, w
            torch.cuda.empty_cache()
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""How fast can a kernel read a packed weight at all? Read-only probes of a ``[K/8, N]`` int32 array (the W4
layout of the decode kernels), timed back to back over copies beyond L2 (as ``benchmarks/kernels.py`` times its
table); prints one JSON line per probe.

    python benchmarks/stream_probe.py [--shapes 4096x4096,28672x4096] [--quick]

Probes, each reading every word once and folding them with xor into a small output:

* ``ldg``: Triton loads of ``[BR, BN]`` column tiles, ``U`` tiles issued before any is used (bytes in flight per
  thread), the loop over a program's rows;
* ``ldg_blocked``: the same loads with the words of each ``BN``-column block stored together (``[N/BN, K/8, BN]``,
  a layout a load-time repack could give), so a program's rows are one contiguous run instead of ``BN * 4``-byte
  pieces ``N * 4`` bytes apart;
* ``tma``: Gluon, a ``STAGES``-deep ring of ``[BR, BN]`` tiles in shared memory filled by the TMA unit
  (``cp.async.bulk.tensor``, one mbarrier per slot), read from shared memory;
* ``sum``: ``torch.sum`` over the same bytes (PyTorch's own reduction);
* ``bf16``: cuBLAS ``F.linear`` at one row on a bf16 weight of the same bytes (``N x K/4``).

The decode kernels read the weight at 2.5 TB/s with a fixed cost of 2.6 µs (session 15's fit over the five
Llama shapes) where cuBLAS bf16 streams at 3.0 TB/s; a probe that streams faster tells which load structure a
faster kernel needs (docs/bench/kernels.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

_spec = importlib.util.spec_from_file_location("_bench_kernels", os.path.join(os.path.dirname(__file__), "kernels.py"))
_bk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bk)


@triton.jit
def _ldg_read(w_ptr, out_ptr, row_stride, block_stride, rows_per_prog, BR: tl.constexpr, BN: tl.constexpr,
              U: tl.constexpr):
    # row-major [K/8, N]: row_stride N, block_stride BN; blocked [N/BN, K/8, BN]: row_stride BN, block_stride K/8 * BN
    pn = tl.program_id(0)
    pk = tl.program_id(1)
    r = tl.arange(0, BR)[:, None]
    c = tl.arange(0, BN)[None, :]
    acc = tl.zeros([BR, BN], tl.int32)
    base = w_ptr + pn * block_stride + (pk * rows_per_prog + r) * row_stride + c
    for i in range(0, rows_per_prog, BR * U):
        for u in tl.static_range(U):  # U independent loads before the first use
            acc ^= tl.load(base + (i + u * BR) * row_stride)
    tl.store(out_ptr + (pk * tl.num_programs(0) + pn) * BR * BN + r * BN + tl.arange(0, BN)[None, :], acc)


def ldg_strides(N: int, R: int, BN: int) -> dict[str, tuple[int, int]]:
    """``_ldg_read``'s (row stride, block stride) in words for the ``[R, N]`` array read row-major (``ldg``) and
    stored as ``[N / BN, R, BN]`` (``ldg_blocked``)."""
    return {"ldg": (N, BN), "ldg_blocked": (BN, R * BN)}


@gluon.constexpr_function
def _read_layout(BN, num_warps):
    tpw_n = min(32, BN // 4)
    return gl.BlockedLayout([1, 4], [32 // tpw_n, tpw_n], [num_warps, 1], [1, 0])


@gluon.jit
def _tma_read(w_desc, out_ptr, rows_per_prog, STAGES: gl.constexpr, num_warps: gl.constexpr):
    BR: gl.constexpr = w_desc.block_type.shape[0]
    BN: gl.constexpr = w_desc.block_type.shape[1]
    L: gl.constexpr = _read_layout(BN, num_warps)
    pn = gl.program_id(0)
    pk = gl.program_id(1)
    n0 = pn * BN
    r0 = pk * rows_per_prog
    n_tiles = rows_per_prog // BR
    smem = gl.allocate_shared_memory(gl.int32, [STAGES, BR, BN], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()
    for i in gl.static_range(STAGES):  # every slot in flight (the launcher gives each program STAGES tiles or more)
        mbarrier.expect(bars.index(i), w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [r0 + i * BR, n0], bars.index(i), smem.index(i))
    acc = gl.zeros([BR, BN], gl.int32, layout=L)
    for t in range(n_tiles):
        s = t % STAGES
        mbarrier.wait(bars.index(s), (t // STAGES) & 1)
        acc ^= smem.index(s).load(L)
        gl.thread_barrier()  # every warp has read slot s before the TMA unit refills it
        nxt = t + STAGES
        if nxt < n_tiles:
            mbarrier.expect(bars.index(s), w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(w_desc, [r0 + nxt * BR, n0], bars.index(s), smem.index(s))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    r = gl.arange(0, BR, layout=gl.SliceLayout(1, L))
    c = gl.arange(0, BN, layout=gl.SliceLayout(0, L))
    out = out_ptr + (pk * gl.num_programs(0) + pn) * BR * BN + gl.expand_dims(r, 1) * BN + gl.expand_dims(c, 0)
    gl.store(out, acc)


def shared_layout():
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)


def tma_call(w, out, BR, BN, split, stages, warps):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    R, N = w.shape
    desc = TensorDescriptor(w, [R, N], [N, 1], [BR, BN], shared_layout())
    return lambda: _tma_read[(N // BN, split)](desc, out, R // split, STAGES=stages, num_warps=warps)


LDG = [(16, 32, 1, 1, 1), (16, 32, 1, 1, 4), (16, 64, 2, 2, 4), (16, 128, 4, 4, 4), (32, 128, 4, 4, 2),
       (16, 256, 8, 4, 4), (16, 512, 16, 4, 2), (8, 512, 16, 4, 8)]  # BR, BN, split, warps, U
# BR, BN, split, stages, warps: 32-64 KB of ring per program, 128-256 programs on 4096 x 4096
TMA = [(32, 64, 4, 4, 4), (32, 128, 4, 4, 4), (16, 256, 8, 4, 4), (64, 64, 2, 4, 4), (32, 64, 2, 8, 4),
       (64, 128, 4, 2, 4), (16, 128, 4, 8, 4), (32, 256, 4, 2, 8)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x4096,6144x4096,14336x4096,28672x4096", help="NxK of the W4 weight")
    p.add_argument("--quick", action="store_true", help="the first three configurations of each probe")
    p.add_argument("--probes", default="ldg,tma,sum,bf16", help="which probes (ldg includes ldg_blocked)")
    args = p.parse_args()
    dev = torch.device("cuda")
    n_cfg = 3 if args.quick else None
    probes = set(args.probes.split(","))
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        R = K // 8
        w = torch.randint(-2**31, 2**31 - 1, (R, N), device=dev, dtype=torch.int32)
        nbytes = w.numel() * 4
        copies = _bk.copies_beyond_l2(w, nbytes, torch.Tensor.clone)

        def report(probe, cfg, calls):
            try:
                us = _bk.graph_time_us(calls, replays=20, warm_s=0.1)
                row = {"N": N, "K": K, "MB": round(nbytes / 1e6, 2), "probe": probe, "cfg": cfg, "us": round(us, 2),
                       "TBps": round(nbytes / us / 1e6, 3)}
            except Exception as e:  # a configuration that does not compile or fit
                row = {"N": N, "K": K, "probe": probe, "cfg": cfg, "error": f"{type(e).__name__}: {str(e)[:160]}"}
                torch.cuda.synchronize()
            print(json.dumps(row), flush=True)

        for BR, BN, split, warps, U in (LDG[:n_cfg] if "ldg" in probes else []):
            rpp = R // split
            if N % BN or rpp % (BR * U):
                continue
            out = torch.empty((N // BN) * split * BR * BN, device=dev, dtype=torch.int32)
            for probe, strides in ldg_strides(N, R, BN).items():
                report(probe, dict(BR=BR, BN=BN, split=split, warps=warps, U=U),
                       [lambda c=c, st=strides: _ldg_read[(N // BN, split)](c, out, *st, rpp, BR=BR, BN=BN, U=U,
                                                                            num_warps=warps)
                        for c in copies])
        for BR, BN, split, stages, warps in (TMA[:n_cfg] if "tma" in probes else []):
            if N % BN or (R // split) % BR or R // split < stages * BR:
                continue
            out = torch.empty((N // BN) * split * BR * BN, device=dev, dtype=torch.int32)
            report("tma", dict(BR=BR, BN=BN, split=split, stages=stages, warps=warps),
                   [tma_call(c, out, BR, BN, split, stages, warps) for c in copies])
        acc = torch.empty((), device=dev, dtype=torch.int64)
        if "sum" in probes:
            report("sum", {}, [lambda c=c: torch.sum(c.view(-1), dim=0, out=acc) for c in copies])
        del copies, w
        if "bf16" in probes:
            wb = torch.randn(N, K // 4, device=dev, dtype=torch.bfloat16)
            x = torch.randn(1, K // 4, device=dev, dtype=torch.bfloat16)
            bcopies = _bk.copies_beyond_l2(wb, nbytes, torch.Tensor.clone)
            report("bf16", {"N": N, "K": K // 4}, [lambda c=c: F.linear(x, c) for c in bcopies])
            del bcopies, wb
        torch.cuda.empty_cache()
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "command": " ".join(sys.argv)}), file=sys.stderr)


if __name__ == "__main__":
    main()

"""A prototype decode kernel timed against ``mma_kb`` (prepared in session 16, not yet run on a GPU): ``mma_ws``,
``mma_kb`` with every K slice its own one-warp worker partition (``gl.warp_specialize``) that feeds itself through
its own TMA ring.

Why: ``mma_tma`` (commit 9837413) fed one ring per program and Gluon put three CTA-wide barriers around every slot,
lining all warps up at every tile (0.75-0.98x the register-fed kinds). In a one-warp partition the same ring needs
no CTA barrier (PTX of a toy: none in the worker loop), so each warp waits only on its own slots, as ``mma_kb``'s
warps do on their own registers, while the TMA unit keeps STAGES tiles per warp in flight (the probe: 5.2 us for
8.4 MB where register loads took 6.2).

Layout: worker ``s`` (0..S-1) takes inputs ``[s k_len, (s+1) k_len)`` of the program's ``PR`` weight rows (the 3-D
TMA view ``[S, K/(PER S), N]``, box ``[1, BKW, PR]``) and its ``MR`` activation rows; its ``[1, PR, MR]`` partial goes
to shared memory; after the join the default partition (``num_warps`` warps) sums the S partials and writes the
output with ``mma_kb``'s epilogue. PDL: each worker issues its ring before ``griddepcontrol.wait``.

    python benchmarks/mma_ws_probe.py > ws.jsonl

prints one JSON line per check (every configuration against the float64 product: W4 g128 sym/asym, W2 g64, W8 g128,
W4 per-channel asym at 1, 5 and 16 rows) and per timing (W4 g128 on the five Llama shapes at 1, 4 and 16 rows, one
CUDA graph over weight copies beyond L2 as ``benchmarks/kernels.py`` times its table, two rounds, ``mma_kb``'s tiles
in the same rounds). ``tests/test_mma_ws_probe.py`` compiles it for sm_90 without a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

# run as a script, this folder is sys.path[0]: its gguf.py would shadow the gguf package auto_quant imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma  # noqa: E402

from auto_quant.kernels.gluon_mma import _batched_inputs, _tile, _tile_acts, _tile_scales, _write_slices, kernel_layouts
from auto_quant.kernels.grid_dependency import grid_launch_dependents, grid_wait


def words_layout(block_n: int, word_rows: int):
    """The ring's layout: swizzled by the tile row's bytes where TMA allows (32-128 B rows, at least bytes/16 rows)."""
    row_bytes = 4 * block_n
    ok = row_bytes in (32, 64, 128) and word_rows >= row_bytes // 16
    return gl.NVMMASharedLayout(swizzle_byte_width=row_bytes if ok else 0, element_bitwidth=32, rank=3)


@gluon.jit
def _ws_default(PDL: gl.constexpr):
    if PDL:  # (the next kernel may start launching; its own wait still waits for this one to finish)
        grid_launch_dependents()


@gluon.jit
def _ws_worker(SL: gl.constexpr, a, BITS: gl.constexpr, GROUP: gl.constexpr, HAS_ZERO: gl.constexpr,
               ACT_FP16: gl.constexpr, PR: gl.constexpr, MR: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
               PDL: gl.constexpr):
    x_ptr, w_desc, s_ptr, z_ptr, ring, bars, part, M, N, k_len, stride_xm, n0, m0 = a
    PER: gl.constexpr = 32 // BITS
    BKW: gl.constexpr = BLOCK_K // PER
    acc_l: gl.constexpr = kernel_layouts(PR, MR, BLOCK_K, 1, BITS, True)[0]
    a_l: gl.constexpr = kernel_layouts(PR, MR, BLOCK_K, 1, BITS, True)[1]
    b_l: gl.constexpr = kernel_layouts(PR, MR, BLOCK_K, 1, BITS, True)[2]
    load_l: gl.constexpr = kernel_layouts(PR, MR, BLOCK_K, 1, BITS, True)[3]
    word_l: gl.constexpr = kernel_layouts(PR, MR, BLOCK_K, 1, BITS, True)[4]
    x_l: gl.constexpr = kernel_layouts(PR, MR, BLOCK_K, 1, BITS, True)[5]
    SCALES_AHEAD: gl.constexpr = MR == 16
    base: gl.constexpr = SL * STAGES
    n_tiles = k_len // BLOCK_K
    for i in gl.static_range(STAGES):  # the weight first: no kernel writes it (PDL)
        mbarrier.expect(bars.index(base + i), w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [SL, i * BKW, n0], bars.index(base + i), ring.index(base + i))
    k0 = SL * k_len
    if GROUP == 0:
        sp = s_ptr
        zp_ = z_ptr
    else:
        sp = s_ptr + (k0 // GROUP) * N
        zp_ = z_ptr + (k0 // GROUP) * N
    src, sz = _batched_inputs(x_ptr + k0, sp, sp, zp_, M, N, n0, m0, k_len, k_len, stride_xm, acc_l, load_l, word_l,
                              x_l, 1, PR, MR, BLOCK_K, PER)
    sc, zp = _tile_scales(sz, 0, k_len, GROUP, HAS_ZERO, SCALES_AHEAD)
    if PDL:
        grid_wait()
        grid_launch_dependents()
    xs = _tile_acts(src, 0, BLOCK_K, True)
    acc = gl.zeros([1, PR, MR], gl.float32, layout=acc_l)
    for t in range(n_tiles):
        s = t % STAGES
        mbarrier.wait(bars.index(base + s), (t // STAGES) & 1)
        wp = ring.index(base + s).load(load_l)
        k = t * BLOCK_K
        xn = _tile_acts(src, k + BLOCK_K, BLOCK_K, True)
        sn, zn = _tile_scales(sz, k + BLOCK_K, k_len, GROUP, HAS_ZERO, SCALES_AHEAD)
        acc = _tile(acc, wp, xs, sc, zp, k, sz, word_l, a_l, b_l, BITS, GROUP, HAS_ZERO, ACT_FP16, SCALES_AHEAD, 1)
        if t + STAGES < n_tiles:  # refilled once its words were used (the warp's shared loads are done)
            mbarrier.expect(bars.index(base + s), w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(w_desc, [SL, (t + STAGES) * BKW, n0], bars.index(base + s),
                                            ring.index(base + s))
        xs = xn
        sc = sn
        zp = zn
    if GROUP == 0:
        s_ptr_, z_ptr_, N_, s_off, s_cols, s_ok, z_off, z_cols, z_ok, zz = sz
        acc = acc * gl.expand_dims(gl.load(s_ptr_ + s_cols, mask=s_ok, other=0.0).to(gl.float32), 2)
    part.index(SL).store(acc)


@gluon.jit
def _qmm_mma_ws_kernel(
    x_ptr, w_desc, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_om, k_len,
    BITS: gl.constexpr, GROUP: gl.constexpr, HAS_ZERO: gl.constexpr, HAS_BIAS: gl.constexpr, ACT_FP16: gl.constexpr,
    PR: gl.constexpr, MR: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, SLICES: gl.constexpr,
    WREGS: gl.constexpr, PDL: gl.constexpr, num_warps: gl.constexpr,
):
    PER: gl.constexpr = 32 // BITS
    BKW: gl.constexpr = BLOCK_K // PER
    n0 = gl.program_id(0) * PR
    m0 = gl.program_id(1) * MR
    ring = gl.allocate_shared_memory(gl.int32, [SLICES * STAGES, 1, BKW, PR], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [SLICES * STAGES, 1], mbarrier.MBarrierLayout())
    part = gl.allocate_shared_memory(gl.float32, [SLICES, 1, PR, MR], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    for i in gl.static_range(SLICES * STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()
    a = (x_ptr, w_desc, s_ptr, z_ptr, ring, bars, part, M, N, k_len, stride_xm, n0, m0)
    if SLICES == 4:
        gl.warp_specialize([(_ws_default, (PDL,)),
                            (_ws_worker, (0, a, BITS, GROUP, HAS_ZERO, ACT_FP16, PR, MR, BLOCK_K, STAGES, PDL)),
                            (_ws_worker, (1, a, BITS, GROUP, HAS_ZERO, ACT_FP16, PR, MR, BLOCK_K, STAGES, PDL)),
                            (_ws_worker, (2, a, BITS, GROUP, HAS_ZERO, ACT_FP16, PR, MR, BLOCK_K, STAGES, PDL)),
                            (_ws_worker, (3, a, BITS, GROUP, HAS_ZERO, ACT_FP16, PR, MR, BLOCK_K, STAGES, PDL))],
                           [1, 1, 1, 1], [WREGS, WREGS, WREGS, WREGS])
    else:
        gl.warp_specialize([(_ws_default, (PDL,)),
                            (_ws_worker, (0, a, BITS, GROUP, HAS_ZERO, ACT_FP16, PR, MR, BLOCK_K, STAGES, PDL)),
                            (_ws_worker, (1, a, BITS, GROUP, HAS_ZERO, ACT_FP16, PR, MR, BLOCK_K, STAGES, PDL)),
                            (_ws_worker, (2, a, BITS, GROUP, HAS_ZERO, ACT_FP16, PR, MR, BLOCK_K, STAGES, PDL)),
                            (_ws_worker, (3, a, BITS, GROUP, HAS_ZERO, ACT_FP16, PR, MR, BLOCK_K, STAGES, PDL)),
                            (_ws_worker, (4, a, BITS, GROUP, HAS_ZERO, ACT_FP16, PR, MR, BLOCK_K, STAGES, PDL)),
                            (_ws_worker, (5, a, BITS, GROUP, HAS_ZERO, ACT_FP16, PR, MR, BLOCK_K, STAGES, PDL)),
                            (_ws_worker, (6, a, BITS, GROUP, HAS_ZERO, ACT_FP16, PR, MR, BLOCK_K, STAGES, PDL)),
                            (_ws_worker, (7, a, BITS, GROUP, HAS_ZERO, ACT_FP16, PR, MR, BLOCK_K, STAGES, PDL))],
                           [1, 1, 1, 1, 1, 1, 1, 1], [WREGS, WREGS, WREGS, WREGS, WREGS, WREGS, WREGS, WREGS])
    for i in gl.static_range(SLICES * STAGES):
        mbarrier.invalidate(bars.index(i))
    if PDL:
        grid_wait()
    L: gl.constexpr = gl.BlockedLayout([1, 1, 1], [1, 32 // MR, MR], [1, num_warps, 1], [2, 1, 0])
    acc = part.index(0).load(L)
    for i in gl.static_range(1, SLICES):
        acc += part.index(i).load(L)
    _write_slices(acc, out_ptr, b_ptr, n0, m0, M, N, stride_om, PR // 16, HAS_BIAS, num_warps)


def launch_mma_ws(x2, w, bias, block_m, block_n, block_k, slices, stages, wregs=128, maxnreg=128, default_warps=4,
                  pdl=True):
    """``y = x2 @ W^T (+ bias)`` for a ``KernelWeight`` (M <= 16): ``block_n`` weight rows a program, ``slices``
    one-warp workers (4 or 8), each over ``K / slices`` inputs through a ring of ``stages`` slots; ``maxnreg`` caps the
    kernel's registers per thread (the launch's allocation: threads x maxnreg per program), ``wregs`` the workers'."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    M, K = x2.shape
    N = w.out_features
    per = 32 // w.bits
    assert slices in (4, 8) and N % block_n == 0 and K % (slices * block_k) == 0
    assert K // (slices * block_k) >= stages and (w.group_size == -1 or w.group_size % block_k == 0)
    rows = w.qweight.shape[0]
    desc = TensorDescriptor(w.qweight, [slices, rows // slices, N], [rows // slices * N, N, 1],
                            [1, block_k // per, block_n], words_layout(block_n, block_k // per))
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    grid = (N // block_n, triton.cdiv(M, block_m))
    _qmm_mma_ws_kernel[grid](
        x2, desc, w.scales, w.zeros if w.zeros is not None else w.scales, bias if bias is not None else out, out,
        M, N, K, x2.stride(0), out.stride(0), K // slices,
        BITS=w.bits, GROUP=0 if w.group_size == -1 else w.group_size, HAS_ZERO=w.zeros is not None,
        HAS_BIAS=bias is not None, ACT_FP16=x2.dtype == torch.float16, PR=block_n, MR=block_m, BLOCK_K=block_k,
        STAGES=stages, SLICES=slices, WREGS=wregs, PDL=pdl, num_warps=default_warps, maxnreg=maxnreg, launch_pdl=pdl)
    return out


# (block_n, slices, stages, maxnreg, worker registers)
CFGS = [(32, 4, 4, 128, 128), (16, 4, 4, 128, 128), (32, 8, 2, 96, 80), (16, 8, 2, 96, 80), (16, 8, 4, 96, 80),
        (32, 8, 4, 128, 96), (64, 4, 4, 128, 128), (32, 4, 8, 128, 128), (16, 8, 2, 80, 72), (32, 8, 2, 80, 72)]
KB = [(16, 8, 2), (32, 4, 2), (32, 8, 2), (32, 4, 3), (16, 8, 3), (16, 4, 2)]  # mma_kb: block_n, warps, stages


def main():
    here = os.path.dirname(__file__)
    spec = importlib.util.spec_from_file_location("_bench_kernels", os.path.join(here, "kernels.py"))
    _bk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(_bk)
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import KernelConfig, Workspace, launch

    dev = torch.device("cuda")
    ws = Workspace()
    # correctness first: formats x rows, every config, against the float64 product
    for bits, gs, sym in ((4, 128, True), (4, 128, False), (2, 64, True), (8, 128, True), (4, -1, False)):
        N, K = 1024, 4096
        w = _bk.random_kernel_weight(N, K, bits, gs, sym, dev)
        W = dequantize(w).double()
        bias = torch.randn(N, device=dev).to(torch.bfloat16)
        for M in (1, 5, 16):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            ref = x.double() @ W.t() + bias.double()
            for bn, sl, st, mx, wr in CFGS:
                bk = min(128, gs) if gs > 0 else 128
                row = {"check": True, "bits": bits, "gs": gs, "sym": sym, "M": M, "cfg": [bn, sl, st, mx, wr]}
                try:
                    if K // (sl * bk) < st:
                        continue
                    y = launch_mma_ws(x, w, bias, 8 if M <= 8 else 16, bn, bk, sl, st, wr, mx)
                    row["rel_err"] = max(((y[m].double() - ref[m]).norm() / ref[m].norm()).item() for m in range(M))
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(json.dumps(row), flush=True)
    # timings
    for shape in ("4096x4096", "6144x4096", "14336x4096", "4096x14336", "28672x4096"):
        N, K = (int(v) for v in shape.split("x"))
        w = _bk.random_kernel_weight(N, K, 4, 128, True, dev)
        copies = _bk.copies_beyond_l2(w, w.nbytes(), _bk.clone_weight)
        for M in (1, 4, 16):
            bm = 8 if M <= 8 else 16
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            for rnd in (1, 2):
                for bn, warps, st in KB:
                    c = KernelConfig("mma_kb", bm, bn, 128, 1, warps, st)
                    us = _bk.graph_time_us([lambda cc=cc: launch(x, cc, None, c, ws) for cc in copies], replays=20,
                                           warm_s=0.1)
                    print(json.dumps({"N": N, "K": K, "M": M, "round": rnd, "kind": "mma_kb", "cfg": [bn, warps, st],
                                      "us": round(us, 2)}), flush=True)
                for bn, sl, st, mx, wr in CFGS:
                    if K // (sl * 128) < st or N % bn:
                        continue
                    try:
                        us = _bk.graph_time_us([lambda cc=cc: launch_mma_ws(x, cc, None, bm, bn, 128, sl, st, wr, mx)
                                                for cc in copies], replays=20, warm_s=0.1)
                        row = {"us": round(us, 2)}
                    except Exception as e:
                        row = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                    print(json.dumps({"N": N, "K": K, "M": M, "round": rnd, "kind": "mma_ws",
                                      "cfg": [bn, sl, st, mx, wr], **row}), flush=True)
        del copies, w
        torch.cuda.empty_cache()
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "command": " ".join(sys.argv)}), file=sys.stderr)


if __name__ == "__main__":
    main()

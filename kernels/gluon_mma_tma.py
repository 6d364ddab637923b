"""``mma_tma``: the ``mma_kb`` kernel (:mod:`~auto_quant.kernels.gluon_mma`, every warp its own K slice as its own
batch of a batched ``mma.sync``) with the packed weight fed through shared memory by the TMA unit.

Why: at 1-16 rows a matmul is a stream of the packed weight, and on the narrow Llama layers (8-13 MB of W4) its
fixed cost, not the bandwidth, keeps the register-fed kernels under 3x bf16. A read-only probe of the same bytes
(``benchmarks/stream_probe.py``, H100, session 16) read 8 MB in 5.2 us through a ring of TMA bulk copies against
6.2 us with register loads (the best of each), and 12.6 MB in 6.7 against 7.4 us: one thread's bulk copy keeps a
whole tile in flight without the registers (and the instructions) of a load per word, so more tiles fly per SM.

What changes against ``mma_kb``: the program's ``[warps, word rows, block_n]`` tile of words (one slice per warp, the
3-D view ``[warps, K / (PER warps), N]`` of the ``[K / PER, N]`` array) arrives by one ``cp.async.bulk.tensor`` per
tile into a ``STAGES``-deep ring, one mbarrier per slot; the warps read a slot, meet at a barrier, and the slot is
refilled with the tile ``STAGES`` on while they compute. The first ``STAGES`` tiles are issued before the kernel
waits for its predecessor (PDL). Activations and scales load into registers one tile ahead; the tile arithmetic
(:func:`~auto_quant.kernels.gluon_mma._tile`) and the output (:func:`~auto_quant.kernels.gluon_mma._write_slices`)
are ``mma_kb``'s. Every tile is whole (the launcher's condition: ``K`` a multiple of ``warps x block_k``, at least
``STAGES`` tiles per slice, ``N`` a multiple of ``block_n``).
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from auto_quant.kernels.gluon_mma import _batched_inputs, _tile, _tile_acts, _tile_scales, _write_slices, kernel_layouts
from auto_quant.kernels.grid_dependency import grid_launch_dependents, grid_wait, pdl_launch, pdl_max_weight_bytes
from auto_quant.kernels.mma_plan import MMA_BITS, mma_tma_ok


def words_layout(block_n: int) -> gl.NVMMASharedLayout:
    """The ring's shared layout: 32-bit words, swizzled by the tile row's bytes where TMA allows it (32-128 B)."""
    row_bytes = 4 * block_n
    return gl.NVMMASharedLayout(swizzle_byte_width=row_bytes if row_bytes in (32, 64, 128) else 0,
                                element_bitwidth=32, rank=3)


@gluon.jit
def _qmm_mma_tma_kernel(
    x_ptr, w_desc, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_om, k_len,
    BITS: gl.constexpr, GROUP: gl.constexpr, HAS_ZERO: gl.constexpr, HAS_BIAS: gl.constexpr, ACT_FP16: gl.constexpr,
    BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, PDL: gl.constexpr,
    num_warps: gl.constexpr, AHEAD: gl.constexpr = False, PAIR: gl.constexpr = False,
):
    # BLOCK_N / BLOCK_M: the program's weight rows / activation rows times the warps (as mma_kb's); k_len: one slice
    W: gl.constexpr = num_warps
    PER: gl.constexpr = 32 // BITS
    BKW: gl.constexpr = BLOCK_K // PER
    PR: gl.constexpr = BLOCK_N // W
    MR: gl.constexpr = BLOCK_M // W
    acc_l: gl.constexpr = kernel_layouts(BLOCK_N, BLOCK_M, BLOCK_K, W, BITS, True)[0]
    a_l: gl.constexpr = kernel_layouts(BLOCK_N, BLOCK_M, BLOCK_K, W, BITS, True)[1]
    b_l: gl.constexpr = kernel_layouts(BLOCK_N, BLOCK_M, BLOCK_K, W, BITS, True)[2]
    load_l: gl.constexpr = kernel_layouts(BLOCK_N, BLOCK_M, BLOCK_K, W, BITS, True)[3]
    word_l: gl.constexpr = kernel_layouts(BLOCK_N, BLOCK_M, BLOCK_K, W, BITS, True)[4]
    x_l: gl.constexpr = kernel_layouts(BLOCK_N, BLOCK_M, BLOCK_K, W, BITS, True)[5]
    SCALES_AHEAD: gl.constexpr = MR == 16 or AHEAD  # as mma_kb (gluon_mma._tile_scales)

    n0 = gl.program_id(0) * PR
    m0 = gl.program_id(1) * MR
    n_tiles = k_len // BLOCK_K
    src, sz = _batched_inputs(x_ptr, s_ptr, s_ptr, z_ptr, M, N, n0, m0, k_len, k_len, stride_xm, acc_l, load_l,
                              word_l, x_l, W, PR, MR, BLOCK_K, PER)  # (its word pointers go unused)

    ring = gl.allocate_shared_memory(gl.int32, [STAGES, W, BKW, PR], w_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()
    # the weight, which no kernel writes, is requested before waiting for the kernel before this one (PDL)
    for i in gl.static_range(STAGES):
        mbarrier.expect(bars.index(i), w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [0, i * BKW, n0], bars.index(i), ring.index(i))
    sc, zp = _tile_scales(sz, 0, k_len, GROUP, HAS_ZERO, SCALES_AHEAD)
    if PDL:
        grid_wait()
        grid_launch_dependents()
    xs = _tile_acts(src, 0, BLOCK_K, True)
    acc = gl.zeros([W, PR, MR], gl.float32, layout=acc_l)
    if PAIR:  # two slots per round: one wait each, one barrier before both refills
        for j in range(n_tiles // 2):
            t = 2 * j
            s = t % STAGES
            mbarrier.wait(bars.index(s), (t // STAGES) & 1)
            mbarrier.wait(bars.index(s + 1), (t // STAGES) & 1)
            wp = ring.index(s).load(load_l)
            wq = ring.index(s + 1).load(load_l)
            if t + STAGES < n_tiles:  # (the compiler puts a barrier before the copies: every warp has read both)
                mbarrier.expect(bars.index(s), w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(w_desc, [0, (t + STAGES) * BKW, n0], bars.index(s), ring.index(s))
                mbarrier.expect(bars.index(s + 1), w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(w_desc, [0, (t + 1 + STAGES) * BKW, n0], bars.index(s + 1),
                                                ring.index(s + 1))
            k = t * BLOCK_K
            xn = _tile_acts(src, k + BLOCK_K, BLOCK_K, True)
            sn, zn = _tile_scales(sz, k + BLOCK_K, k_len, GROUP, HAS_ZERO, SCALES_AHEAD)
            acc = _tile(acc, wp, xs, sc, zp, k, sz, word_l, a_l, b_l, BITS, GROUP, HAS_ZERO, ACT_FP16, SCALES_AHEAD,
                        W)
            xs = _tile_acts(src, k + 2 * BLOCK_K, BLOCK_K, True)
            sc, zp = _tile_scales(sz, k + 2 * BLOCK_K, k_len, GROUP, HAS_ZERO, SCALES_AHEAD)
            acc = _tile(acc, wq, xn, sn, zn, k + BLOCK_K, sz, word_l, a_l, b_l, BITS, GROUP, HAS_ZERO, ACT_FP16,
                        SCALES_AHEAD, W)
    else:
        for t in range(n_tiles):
            s = t % STAGES
            mbarrier.wait(bars.index(s), (t // STAGES) & 1)
            wp = ring.index(s).load(load_l)
            if t + STAGES < n_tiles:  # (the compiler puts a barrier before the copy: every warp has read slot s)
                mbarrier.expect(bars.index(s), w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(w_desc, [0, (t + STAGES) * BKW, n0], bars.index(s), ring.index(s))
            k = t * BLOCK_K
            xn = _tile_acts(src, k + BLOCK_K, BLOCK_K, True)  # the next tile's (the last tile's again at the end)
            sn, zn = _tile_scales(sz, k + BLOCK_K, k_len, GROUP, HAS_ZERO, SCALES_AHEAD)
            acc = _tile(acc, wp, xs, sc, zp, k, sz, word_l, a_l, b_l, BITS, GROUP, HAS_ZERO, ACT_FP16, SCALES_AHEAD,
                        W)
            xs = xn
            sc = sn
            zp = zn
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    if GROUP == 0:
        s_ptr, z_ptr, N, s_off, s_cols, s_ok, z_off, z_cols, z_ok, zz = sz
        acc = acc * gl.expand_dims(gl.load(s_ptr + s_cols, mask=s_ok, other=0.0).to(gl.float32), 2)
    _write_slices(acc, out_ptr, b_ptr, n0, m0, M, N, stride_om, PR // 16, HAS_BIAS, W)


def words_descriptor(qweight, slices: int, block_k: int, block_n: int, bits: int):
    """The TMA descriptor of the packed words as ``[slices, K / (PER slices), N]``, one ``[slices, block_k / PER,
    block_n]`` box per tile (every warp's rows of one step)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    rows, N = qweight.shape
    per_slice = rows // slices
    return TensorDescriptor(qweight, [slices, per_slice, N], [per_slice * N, N, 1],
                            [slices, block_k // (32 // bits), block_n], words_layout(block_n))


def launch_mma_tma(x2, w, bias, cfg, pdl=None):
    """Run ``mma_tma`` on ``x2 [M, K]`` (fp16/bf16, CUDA) for a ``KernelWeight``; ``cfg`` as an ``mma_kb`` tile whose
    ``num_stages`` is the ring's depth. ``pdl`` as :func:`~auto_quant.kernels.gluon_mma.launch_mma`'s."""
    import torch

    M, K = x2.shape
    N = w.out_features
    if w.bits not in MMA_BITS:
        raise ValueError(f"the mma_tma kernel serves {MMA_BITS}-bit weights, not {w.bits} bits")
    if not mma_tma_ok(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, w.bits, cfg.num_stages, N, K):
        raise ValueError(f"the mma_tma kernel cannot take the tile {cfg} for {N}x{K}: it needs N % block_n == 0 and "
                         f"K a multiple of warps x block_k with at least num_stages tiles per warp")
    if w.group_size != -1 and w.group_size % cfg.block_k:
        raise ValueError(f"the mma_tma kernel needs one group per tile: group size {w.group_size}, block_k "
                         f"{cfg.block_k}")
    if x2.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the mma_tma kernel takes fp16/bf16 activations, not {x2.dtype}")
    if cfg.split_k != 1:
        raise ValueError(f"the mma_tma kernel runs without split-K (its warps split K), not split_k={cfg.split_k}")
    if w.qweight.data_ptr() % 16:
        raise ValueError("the mma_tma kernel needs a 16-byte aligned packed weight")
    if x2.stride(1) != 1 or x2.stride(0) % 2 or x2.data_ptr() % 4:
        x2 = x2.clone(memory_format=torch.contiguous_format)  # read as b32 pairs: 4-byte aligned rows
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    pdl = pdl_launch(x2.device, N * K * w.bits // 8, pdl_max_weight_bytes("mma_tma")) if pdl is None else pdl
    slices = cfg.num_warps
    desc = words_descriptor(w.qweight, slices, cfg.block_k, cfg.block_n, w.bits)
    grid = (N // cfg.block_n, triton.cdiv(M, cfg.block_m))
    _qmm_mma_tma_kernel[grid](
        x2, desc, w.scales, w.zeros if w.zeros is not None else w.scales, bias if bias is not None else out, out,
        M, N, K, x2.stride(0), out.stride(0), K // slices,
        BITS=w.bits, GROUP=0 if w.group_size == -1 else w.group_size, HAS_ZERO=w.zeros is not None,
        HAS_BIAS=bias is not None, ACT_FP16=x2.dtype == torch.float16, BLOCK_N=cfg.block_n * slices,
        BLOCK_M=cfg.block_m * slices, BLOCK_K=cfg.block_k, STAGES=cfg.num_stages, PDL=pdl, num_warps=slices,
        launch_pdl=pdl,
    )
    return out

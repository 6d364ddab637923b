"""Warp-specialized form of :mod:`~auto_quant.kernels.gluon_wgmma` (tried in session 19; see the commit after it):
each warpgroup its own partition (two on the 8-warp tiles, one on the 256-row 4-warp tiles) and a one-warp producer
partition feeding them through the TMA ring with a full and an empty mbarrier per slot, so that no CTA-wide barrier
lines the warpgroups up at every tile (Membar put four there in the single-partition kernel). The epilogue writes
column pairs straight from the accumulator registers: the ring leaves no shared memory for staging.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from auto_quant.kernels.gluon_wgmma import (
    _operand,
    _pair,
    _phys_row,
    _tile_scales,
    lane_selector,
    operand_layouts,
    write_tile,
)


@gluon.jit
def _write_pairs(acc, out_ptr, b_ptr, n0, m0, M, N, stride_om, REPS: gl.constexpr, HAS_BIAS: gl.constexpr,
                 W: gl.constexpr):
    """Write the ``[HN, BLOCK_M]`` accumulator (logical rows) straight from its registers, two adjacent output
    columns a 4-byte store: a thread's logical rows ``l`` and ``l + 8`` are physical columns ``p`` and ``p + 1``
    (:func:`_phys_row`). No shared memory, which the ring fills (``write_tile`` stages through it). Needs an even
    ``N`` and ``stride_om`` (the launch checks ``N % 4``, contiguous output)."""
    HN: gl.constexpr = acc.shape[0]
    BLOCK_M: gl.constexpr = acc.shape[1]
    acc_l: gl.constexpr = acc.type.layout
    if HAS_BIAS:
        b_cols = n0 + _phys_row(gl.arange(0, HN, layout=gl.SliceLayout(1, acc_l)), REPS, W)
        acc += gl.expand_dims(gl.load(b_ptr + b_cols, mask=b_cols < N, other=0.0).to(gl.float32), 1)
    res = gl.reshape(acc.to(out_ptr.dtype.element_ty), [REPS, W, 2, 8, BLOCK_M])
    res = gl.reshape(gl.permute(res, (1, 3, 0, 2, 4)), [HN // 2, 2, BLOCK_M])  # physical column pairs, bit 0
    lo, hi = gl.split(gl.permute(res, (0, 2, 1)))
    pair = gl.inline_asm_elementwise("mov.b32 $0, {$1, $2};", "=r,h,h", [lo, hi], dtype=gl.int32, is_pure=True,
                                     pack=1)
    p_l: gl.constexpr = pair.type.layout
    p_cols = n0 + 2 * gl.arange(0, HN // 2, layout=gl.SliceLayout(1, p_l))
    p_rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, p_l))
    p_mask = gl.expand_dims(p_cols < N, 1) & gl.expand_dims(p_rows < M, 0)
    out32 = out_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
    gl.store(out32 + (gl.expand_dims(p_rows, 0) * (stride_om // 2) + gl.expand_dims(p_cols // 2, 1)), pair,
             mask=p_mask)


@gluon.jit
def _release(empty, t, STAGES: gl.constexpr):
    """Tile ``t``'s wgmma retired: its slot may be refilled (one arrival of the two warpgroups)."""
    if t >= 0:
        mbarrier.arrive(empty.index(t % STAGES), count=1)


@gluon.jit
def _consumer(HALF: gl.constexpr, a, CONSUMERS: gl.constexpr, BITS: gl.constexpr, GROUP: gl.constexpr, HAS_ZERO: gl.constexpr,
              HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr, ACT_FP16: gl.constexpr, STAGES: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr):
    x_smem, w0_smem, w1_smem, full, empty, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, stride_om, \
        k_lo, n_tiles, n0, m0, pid_n, pid_m = a
    if HALF == 0:
        w_smem = w0_smem
    else:
        w_smem = w1_smem
    W: gl.constexpr = 4
    HN: gl.constexpr = w0_smem.shape[2]
    REPS: gl.constexpr = HN // (16 * W)
    MAGIC: gl.constexpr = 1024.0 if ACT_FP16 else (0.0 if BITS == 8 else 128.0)
    acc_l: gl.constexpr = operand_layouts(HN, BLOCK_M, BLOCK_K, W, BITS)[0]
    a_l: gl.constexpr = operand_layouts(HN, BLOCK_M, BLOCK_K, W, BITS)[1]
    deq_l: gl.constexpr = operand_layouts(HN, BLOCK_M, BLOCK_K, W, BITS)[2]
    load_l: gl.constexpr = operand_layouts(HN, BLOCK_M, BLOCK_K, W, BITS)[3]
    word_l: gl.constexpr = gl.SliceLayout(2, deq_l)
    row_l: gl.constexpr = gl.SliceLayout(1, word_l)
    hn0 = n0 + HALF * HN
    PARTS: gl.constexpr = 2 if BITS == 8 else 4
    SEL_MUL: gl.constexpr = lane_selector(BITS)[0]
    SEL_ADD: gl.constexpr = lane_selector(BITS)[1]
    part = gl.arange(0, PARTS, layout=gl.SliceLayout(0, gl.SliceLayout(0, deq_l))) * SEL_MUL + SEL_ADD
    sel = gl.expand_dims(gl.expand_dims(part, 0), 0)
    cols = hn0 + _phys_row(gl.arange(0, HN, layout=row_l), REPS, W)
    col_ok = cols < N
    if HAS_ZERO:
        zz = 0
    else:
        zz = _pair(gl.full([HN], -(MAGIC + (1 << (BITS - 1))), gl.float32, row_l), ACT_FP16)
        zz = gl.expand_dims(gl.expand_dims(zz, 1), 2)

    acc = gl.zeros([HN, BLOCK_M], gl.float32, layout=acc_l)
    a1 = gl.zeros([HN, BLOCK_K], gl.float16 if ACT_FP16 else gl.bfloat16, layout=a_l)
    sz_a = _tile_scales(s_ptr, z_ptr, cols, col_ok, N, k_lo, 0, n_tiles, GROUP, HAS_ZERO, BLOCK_K)
    sz_b = _tile_scales(s_ptr, z_ptr, cols, col_ok, N, k_lo, 1, n_tiles, GROUP, HAS_ZERO, BLOCK_K)
    for t2 in range(n_tiles // 2):
        t = 2 * t2
        sz_c = _tile_scales(s_ptr, z_ptr, cols, col_ok, N, k_lo, t + 2, n_tiles, GROUP, HAS_ZERO, BLOCK_K)
        sz_d = _tile_scales(s_ptr, z_ptr, cols, col_ok, N, k_lo, t + 3, n_tiles, GROUP, HAS_ZERO, BLOCK_K)
        a0 = _operand(w_smem, full, sz_a, sel, zz, t, a_l, load_l, word_l, HAS_ZERO, ACT_FP16, MAGIC, STAGES, BLOCK_K,
                      BITS, W)
        acc = warpgroup_mma(a0, x_smem.index(t % STAGES).permute((1, 0)), acc, is_async=True)
        acc, a1 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a1))
        _release(empty, t - 1, STAGES)
        a1 = _operand(w_smem, full, sz_b, sel, zz, t + 1, a_l, load_l, word_l, HAS_ZERO, ACT_FP16, MAGIC, STAGES,
                      BLOCK_K, BITS, W)
        acc = warpgroup_mma(a1, x_smem.index((t + 1) % STAGES).permute((1, 0)), acc, is_async=True)
        acc, a0 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a0))
        _release(empty, t, STAGES)
        sz_a = sz_c
        sz_b = sz_d
    if n_tiles % 2:
        t = n_tiles - 1
        a0 = _operand(w_smem, full, sz_a, sel, zz, t, a_l, load_l, word_l, HAS_ZERO, ACT_FP16, MAGIC, STAGES, BLOCK_K,
                      BITS, W)
        acc = warpgroup_mma(a0, x_smem.index(t % STAGES).permute((1, 0)), acc, is_async=True)
        acc, a1 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a1))
        acc, a0 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a0))
    acc, a1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a1))
    if SPLIT == 0:
        _write_pairs(acc, out_ptr, b_ptr, hn0, m0, M, N, stride_om, REPS, HAS_BIAS, W)
    else:  # each warpgroup's rows count as a tile of their own for split-K's counters
        write_tile(acc, out_ptr, ws_ptr, cnt_ptr, b_ptr, hn0, m0, M, N, stride_om, pid_n, CONSUMERS * pid_m + HALF,
                   REPS, HAS_BIAS, SPLIT, W)


@gluon.jit
def _producer(a, CONSUMERS: gl.constexpr, STAGES: gl.constexpr, BLOCK_K: gl.constexpr, BITS: gl.constexpr):
    x_desc, w_desc, x_smem, w0_smem, w1_smem, full, empty, k_lo, n_tiles, n0, m0 = a
    HN: gl.constexpr = w_desc.block_type.shape[1]
    nbytes: gl.constexpr = CONSUMERS * w_desc.block_type.nbytes + x_desc.block_type.nbytes
    for t in range(n_tiles):
        s = t % STAGES
        if t >= STAGES:  # every warpgroup retired the tile that used the slot last
            mbarrier.wait(empty.index(s), (t // STAGES - 1) & 1)
        mbarrier.expect(full.index(s), nbytes)
        kw = (k_lo + t * BLOCK_K) // (32 // BITS)
        tma.async_copy_global_to_shared(w_desc, [kw, n0], full.index(s), w0_smem.index(s))
        if CONSUMERS == 2:
            tma.async_copy_global_to_shared(w_desc, [kw, n0 + HN], full.index(s), w1_smem.index(s))
        tma.async_copy_global_to_shared(x_desc, [m0, k_lo + t * BLOCK_K], full.index(s), x_smem.index(s))


@gluon.jit
def qmm_wgmma_ws_kernel(
    x_desc, w_desc, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_om, k_per_split,
    BITS: gl.constexpr, GROUP: gl.constexpr, HAS_ZERO: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr,
    ACT_FP16: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr, num_warps: gl.constexpr,
):
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    HN: gl.constexpr = w_desc.block_type.shape[1]
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    pid_k = gl.program_id(2)
    n0 = pid_n * CONSUMERS * HN
    m0 = pid_m * BLOCK_M
    k_lo = pid_k * k_per_split
    k_hi = gl.minimum(k_lo + k_per_split, K)
    n_tiles = gl.cdiv(k_hi - k_lo, BLOCK_K)

    w0_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    if CONSUMERS == 2:
        w1_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    else:
        w1_smem = w0_smem
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=CONSUMERS)
    fence_async_shared()
    c = (x_smem, w0_smem, w1_smem, full, empty, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, stride_om,
         k_lo, n_tiles, n0, m0, pid_n, pid_m)
    p = (x_desc, w_desc, x_smem, w0_smem, w1_smem, full, empty, k_lo, n_tiles, n0, m0)
    if CONSUMERS == 2:
        gl.warp_specialize([(_consumer, (0, c, CONSUMERS, BITS, GROUP, HAS_ZERO, HAS_BIAS, SPLIT, ACT_FP16, STAGES,
                                         BLOCK_M, BLOCK_K)),
                            (_consumer, (1, c, CONSUMERS, BITS, GROUP, HAS_ZERO, HAS_BIAS, SPLIT, ACT_FP16, STAGES,
                                         BLOCK_M, BLOCK_K)),
                            (_producer, (p, CONSUMERS, STAGES, BLOCK_K, BITS))],
                           [4, 1], [240, 24])
    else:
        gl.warp_specialize([(_consumer, (0, c, CONSUMERS, BITS, GROUP, HAS_ZERO, HAS_BIAS, SPLIT, ACT_FP16, STAGES,
                                         BLOCK_M, BLOCK_K)),
                            (_producer, (p, CONSUMERS, STAGES, BLOCK_K, BITS))],
                           [1], [24])
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(full.index(i))
        mbarrier.invalidate(empty.index(i))

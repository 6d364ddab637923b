"""Triton GEMV for a few activation rows (2 to 16) against 2/4-bit weights, fp16/bf16, CUDA only.

The paired half-precision arithmetic of :mod:`auto_quant.kernels.triton_gemv`, split in two so the
weights are dequantized once for all the rows a program serves: per word, :func:`dequant_asm` turns
its codes into packed exact ``code - zero`` pairs, and per row :func:`dot_asm` multiplies them with
that row's activation pairs and sums the word's products (half precision) into fp32. The tile is
``[BLOCK_M, BLOCK_R, BLOCK_N]``: with 512 columns over 4 warps every thread holds all rows of its
columns, so the dequantized pairs are shared in registers. Tiles are copied ahead by Triton's
cp.async pipeline (``STAGES``); split-K as in the one-row kernel.

Per weight this costs about one instruction for the dequantization plus half an instruction per
row, against a tensor-core tile that must first move the dequantized weights through shared memory:
at 2 to 8 rows the work per weight stays small enough for the bytes to dominate.
"""

from __future__ import annotations

import triton
import triton.language as tl

from auto_quant.kernels.triton_gemv import _masked_load, _scale_zero, _tile_scale_zero, _x_half, _zero_pair


@triton.jit
def _x_pairs_2d(p_lo, p_hi, I: tl.constexpr, NP: tl.constexpr, ACT_FP16: tl.constexpr):
    """``[BM, R, 1]``: ``(x[I], x[I + NP])`` of every row and word row; fp16 scaled by 2**-6 (exact)."""
    v = _x_half(p_lo, I % 2, False) | _x_half(p_hi, (I + NP) % 2, True)
    if ACT_FP16:
        v = tl.inline_asm_elementwise("{ .reg .b32 c; mov.b32 c, 0x24002400; mul.rn.f16x2 $0, $1, c; }", "=r,r",
                                      [v], dtype=tl.int32, is_pure=True, pack=1)
    return v[:, :, None]


@triton.jit
def _rows_term(w, zz, base, xm, DEQ: tl.constexpr, DEQ_CONS: tl.constexpr, DOT: tl.constexpr,
               DOT_CONS: tl.constexpr, BITS: tl.constexpr, ACT_FP16: tl.constexpr, ZERO_IN: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """``[BM, R, BN]`` f32: each row's sum over each word of ``x * (code - zero)`` (times 2**-6 for fp16)."""
    p0 = tl.load(base + 0, mask=xm, other=0)
    p1 = tl.load(base + 1, mask=xm, other=0)
    p2 = tl.load(base + 2, mask=xm, other=0)
    p3 = tl.load(base + 3, mask=xm, other=0)
    if BITS == 4:  # pair i = (x[i], x[i + 4])
        if ZERO_IN:
            d0, d1, d2, d3 = tl.inline_asm_elementwise(DEQ, DEQ_CONS, [w, tl.broadcast_to(zz, w.shape)],
                                                       dtype=(tl.int32,) * 4, is_pure=True, pack=1)
        else:
            d0, d1, d2, d3 = tl.inline_asm_elementwise(DEQ, DEQ_CONS, [w], dtype=(tl.int32,) * 4, is_pure=True,
                                                       pack=1)
        r = tl.inline_asm_elementwise(DOT, DOT_CONS, [
            d0[None, :, :], d1[None, :, :],
            d2[None, :, :], d3[None, :, :],
            _x_pairs_2d(p0, p2, 0, 4, ACT_FP16),
            _x_pairs_2d(p0, p2, 1, 4, ACT_FP16),
            _x_pairs_2d(p1, p3, 2, 4, ACT_FP16),
            _x_pairs_2d(p1, p3, 3, 4, ACT_FP16)], dtype=tl.int32, is_pure=True, pack=1)
    else:  # 2 bits: pair i = (x[i], x[i + 8])
        p4 = tl.load(base + 4, mask=xm, other=0)
        p5 = tl.load(base + 5, mask=xm, other=0)
        p6 = tl.load(base + 6, mask=xm, other=0)
        p7 = tl.load(base + 7, mask=xm, other=0)
        if ZERO_IN:
            d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
                DEQ, DEQ_CONS, [w, tl.broadcast_to(zz, w.shape)], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
        else:
            d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
                DEQ, DEQ_CONS, [w], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
        r = tl.inline_asm_elementwise(DOT, DOT_CONS, [
            d0[None, :, :], d1[None, :, :],
            d2[None, :, :], d3[None, :, :],
            d4[None, :, :], d5[None, :, :],
            d6[None, :, :], d7[None, :, :],
            _x_pairs_2d(p0, p4, 0, 8, ACT_FP16),
            _x_pairs_2d(p0, p4, 1, 8, ACT_FP16),
            _x_pairs_2d(p1, p5, 2, 8, ACT_FP16),
            _x_pairs_2d(p1, p5, 3, 8, ACT_FP16),
            _x_pairs_2d(p2, p6, 4, 8, ACT_FP16),
            _x_pairs_2d(p2, p6, 5, 8, ACT_FP16),
            _x_pairs_2d(p3, p7, 6, 8, ACT_FP16),
            _x_pairs_2d(p3, p7, 7, 8, ACT_FP16)], dtype=tl.int32, is_pure=True, pack=1)
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _gemv_rows_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_om, rows_per_split, n_splits,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr,
    EVEN_R: tl.constexpr, EVEN_N: tl.constexpr, DEQ: tl.constexpr, DEQ_CONS: tl.constexpr, DOT: tl.constexpr,
    DOT_CONS: tl.constexpr, ACT_FP16: tl.constexpr, STAGES: tl.constexpr,
):
    # grid: (column tiles, row blocks of x, splits of K); rows_per_split % BLOCK_R == 0; x rows 4-byte aligned.
    PER: tl.constexpr = 32 // BITS
    NP: tl.constexpr = 16 // BITS
    ZC: tl.constexpr = 1 << (BITS - 1)
    ROW_S: tl.constexpr = GROUP != 0 and GROUP % (BLOCK_R * PER) != 0
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if EVEN_N:
        n_mask = tl.full((BLOCK_N,), 1, tl.int1)
    else:
        n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    r_lo = pid_k * rows_per_split
    r_hi = tl.minimum(r_lo + rows_per_split, tl.cdiv(K, PER))
    x32_ptr = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + (offs_m * (stride_xm // 2))[:, None]
    s_ch, z_ch = _scale_zero(s_ptr, z_ptr, 0, offs_n, n_mask, N, HAS_ZERO, ZC)
    acc = tl.zeros((BLOCK_M, BLOCK_R, BLOCK_N), tl.float32)
    for r0 in tl.range(r_lo, r_hi, BLOCK_R, num_stages=STAGES):
        rows = r0 + offs_r
        live = rows < r_hi
        w = _masked_load(qw_ptr + rows[:, None] * N + offs_n[None, :], live[:, None] & n_mask[None, :], EVEN_R)
        if GROUP == 0:
            s = s_ch
            z = z_ch
        else:
            s, z = _tile_scale_zero(s_ptr, z_ptr, r0, rows, live, r0 < r_hi, offs_n, n_mask, N, GROUP, PER, ROW_S,
                                    HAS_ZERO, ZC)
        if HAS_ZERO:
            zz = _zero_pair(z, ACT_FP16)
        else:
            zz = z
        part = _rows_term(w, zz, x32_ptr + (rows * NP)[None, :], m_mask[:, None] & live[None, :], DEQ, DEQ_CONS,
                          DOT, DOT_CONS, BITS, ACT_FP16, HAS_ZERO, BLOCK_M)
        if GROUP == 0:
            acc += part
        else:
            acc += part * s[None, :, :]

    res = tl.sum(acc, axis=1)  # [BLOCK_M, BLOCK_N]
    if GROUP == 0:
        res = res * s_ch
    if ACT_FP16:
        res = res * 64.0  # the pairs' 2**-6
    o_mask = m_mask[:, None] & n_mask[None, :]
    o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if not SPLIT:
        if HAS_BIAS:
            res += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        w_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(w_ptrs, res, mask=o_mask)
        tl.debug_barrier()
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1)
        if arrived == n_splits - 1:
            zero = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            tot = tl.atomic_add(w_ptrs, zero, mask=o_mask)
            tl.store(w_ptrs, zero, mask=o_mask)
            if HAS_BIAS:
                tot += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(o_ptrs, tot.to(out_ptr.dtype.element_ty), mask=o_mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)

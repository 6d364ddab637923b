"""Triton GEMV for a few activation rows (2 to 16) against 2/4-bit weights, fp16/bf16, CUDA only.

The paired half-precision arithmetic of :mod:`auto_quant.kernels.triton_gemv`, split in two so the
weights are dequantized once for all the rows a program serves: per word, :func:`dequant_asm` turns
its codes into packed exact ``code - zero`` pairs, and per row :func:`dot_asm` multiplies them with
that row's activation pairs and sums the word's products (half precision) into fp32. The tile is
``[BLOCK_M, BLOCK_R, BLOCK_N]``: with 512 columns over 4 warps every thread holds all rows of its
columns, so the dequantized pairs are shared in registers. Tiles are copied ahead by Triton's
cp.async pipeline (``STAGES``); split-K through ``_write_output`` like every kernel here.

Per weight this costs about one instruction for the dequantization plus half an instruction per
row, against a tensor-core tile that must first move the dequantized weights through shared memory:
at 2 to 8 rows the work per weight stays small enough for the bytes to dominate.
"""

from __future__ import annotations

import triton
import triton.language as tl

from auto_quant.kernels.triton_gemv import (_columns, _dequant2, _dequant4, _load_tile, _scale_zero, _x_pair,
                                           _zero_pair)
from auto_quant.kernels.triton_qmm import _write_output


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
        d0, d1, d2, d3 = _dequant4(w, zz, DEQ, DEQ_CONS, ZERO_IN)
        r = tl.inline_asm_elementwise(DOT, DOT_CONS, [
            d0[None, :, :], d1[None, :, :],
            d2[None, :, :], d3[None, :, :],
            _x_pair(p0, p2, 0, 4, ACT_FP16)[:, :, None],
            _x_pair(p0, p2, 1, 4, ACT_FP16)[:, :, None],
            _x_pair(p1, p3, 2, 4, ACT_FP16)[:, :, None],
            _x_pair(p1, p3, 3, 4, ACT_FP16)[:, :, None]], dtype=tl.int32, is_pure=True, pack=1)
    else:  # 2 bits: pair i = (x[i], x[i + 8])
        p4 = tl.load(base + 4, mask=xm, other=0)
        p5 = tl.load(base + 5, mask=xm, other=0)
        p6 = tl.load(base + 6, mask=xm, other=0)
        p7 = tl.load(base + 7, mask=xm, other=0)
        d0, d1, d2, d3, d4, d5, d6, d7 = _dequant2(w, zz, DEQ, DEQ_CONS, ZERO_IN)
        r = tl.inline_asm_elementwise(DOT, DOT_CONS, [
            d0[None, :, :], d1[None, :, :],
            d2[None, :, :], d3[None, :, :],
            d4[None, :, :], d5[None, :, :],
            d6[None, :, :], d7[None, :, :],
            _x_pair(p0, p4, 0, 8, ACT_FP16)[:, :, None],
            _x_pair(p0, p4, 1, 8, ACT_FP16)[:, :, None],
            _x_pair(p1, p5, 2, 8, ACT_FP16)[:, :, None],
            _x_pair(p1, p5, 3, 8, ACT_FP16)[:, :, None],
            _x_pair(p2, p6, 4, 8, ACT_FP16)[:, :, None],
            _x_pair(p2, p6, 5, 8, ACT_FP16)[:, :, None],
            _x_pair(p3, p7, 6, 8, ACT_FP16)[:, :, None],
            _x_pair(p3, p7, 7, 8, ACT_FP16)[:, :, None]], dtype=tl.int32, is_pure=True, pack=1)
    return r.to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["M"])  # one compile serves every row count of a bucket
def _gemv_rows_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_om, rows_per_split,
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
    pid_k = tl.program_id(2)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_n, n_mask = _columns(BLOCK_N, N, EVEN_N)
    offs_r = tl.arange(0, BLOCK_R)
    r_lo = pid_k * rows_per_split
    r_hi = tl.minimum(r_lo + rows_per_split, tl.cdiv(K, PER))
    x32_ptr = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + (offs_m * (stride_xm // 2))[:, None]
    s_ch, z_ch = _scale_zero(s_ptr, z_ptr, 0, offs_n, n_mask, N, HAS_ZERO, ZC)
    acc = tl.zeros((BLOCK_M, BLOCK_R, BLOCK_N), tl.float32)
    for r0 in tl.range(r_lo, r_hi, BLOCK_R, num_stages=STAGES):
        rows, live, w, s, z = _load_tile(qw_ptr, s_ptr, z_ptr, r0, offs_r, r_hi, offs_n, n_mask, N, s_ch, z_ch, GROUP,
                                         PER, ROW_S, HAS_ZERO, ZC, EVEN_R)
        if HAS_ZERO:
            zz = _zero_pair(z, ACT_FP16, BITS)
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
    _write_output(res, out_ptr, offs_m[:, None] * stride_om + offs_n[None, :], m_mask[:, None] & n_mask[None, :],
                  ws_ptr, offs_m[:, None] * N + offs_n[None, :], b_ptr, offs_n, n_mask, cnt_ptr, HAS_BIAS, SPLIT)

"""Triton kernel: the transposed tensor-core product ``y^T[N, M] = W[N, K] @ x^T[K, M]`` for 2 <= M <= a few hundred.

Why transposed: on Hopper a tensor-core tile is 64 rows tall (``wgmma``), and its left operand may
come from registers while the right one is read from shared memory. The dequantized weight is made
in registers, so it is the left operand, its output features the tall side; the few activation rows
(8-256 tokens) are the short side, which Triton's pipeline copies ahead into shared memory
(``STAGES``). On Ampere Triton lowers the same ``tl.dot`` to ``mma.sync`` (only the H100 was measured).

Each program loads a ``[BLOCK_N, BLOCK_K / PER]`` tile of packed words (the
:mod:`~auto_quant.kernels.pack` layout, every word read once) and expands it to ``[BLOCK_N, BLOCK_K]``:

* ``PAIRS`` (CUDA, fp16/bf16, one group per tile or per-channel scales): the PTX of
  :func:`~auto_quant.kernels.dequant_ptx.dequant_asm` makes the exact ``code - zero`` as packed half
  pairs, about one instruction per weight at 2/4 bits, one (fp16) to three (bf16, nibble by nibble)
  per pair at 8 bits; at 3 bits :func:`~auto_quant.kernels.dequant_ptx.dequant3_asm` adds each pair's third
  bits from the column's high word (:func:`~auto_quant.kernels.pack.pack_high_bits`) with one more ``lop3``;
  :func:`_paired_tile` puts them in input order.
* otherwise (tiles wider than a group, Triton's CPU interpreter): the exponent trick in
  float32, ``bitcast(code | 0x4B000000) - (2**23 + zero)``, exact.

The scale multiplies the tile in the activation dtype (the rounding of a dequantized weight, as in
dequantize + cuBLAS), so one accumulator chains every tile's ``tl.dot``. Per-channel scales take the same
path (their one row is read per tile). On sm_90 each tile first waits for the previous tile's ``wgmma``
(``WAIT_MMA``, :func:`_after_tensor_cores`): without it Triton 3.6 let the register operand be overwritten
while still being read, which gave intermittently wrong tiles (inf, 1e34, or 13 % error in 1 of 30
launches) in repeated-launch stress runs. Split-K over grid axis 2 shares the epilogue of the other
kernels (:func:`~auto_quant.kernels.triton_qmm._write_output`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from auto_quant.kernels.triton_gemv import _dequant2, _dequant4, _dequant8, _zero_pair
from auto_quant.kernels.triton_qmm import _write_output


@triton.jit
def _halves(d, ACT_FP16: tl.constexpr):
    """The two 16-bit lanes of the b32 pairs ``d`` as activation-dtype tensors ``(low, high)``."""
    if ACT_FP16:
        lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [d], dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=1)
    else:
        lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [d],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
    return lo, hi


@triton.jit
def _after_tensor_cores(v):
    """``v`` (float32), passed on only after every earlier ``wgmma`` of this warpgroup has finished.

    Triton 3.6 pipelines the tensor-core loop with ``wgmma.wait_group N`` (N = the tile's ``wgmma`` count - 1),
    which leaves the previous tile's later ``wgmma`` reading their register operand while this tile's
    dequantized weight is loaded into the same registers (triton-lang/triton#9433: intermittently wrong tiles,
    inf or 1e34 where the product is 1e-2, seen on an H100 at 128-256 row blocks). Every tile's scales go
    through here, and the weight is multiplied by them before it becomes the dot's operand, so the register
    operand is written only after a ``wait_group 0``. (ptxas places the wait before the tile's dequantization,
    so that no longer overlaps the last tile's tensor-core work: 0-10 % slower per tile on the H100.)
    """
    return tl.inline_asm_elementwise("wgmma.wait_group.sync.aligned 0;\n mov.b32 $0, $1;", "=r,r", [v],
                                     dtype=tl.float32, is_pure=False, pack=1)


@triton.jit
def _dequant3(w, h, zz, DEQ: tl.constexpr, DEQ_CONS: tl.constexpr, ZERO_IN: tl.constexpr):
    """3 bits: the eight packed ``code - zero`` pairs of every word ``w`` of the 2-bit plane, ``h`` its column's high
    word (:func:`~auto_quant.kernels.dequant_ptx.dequant3_asm`)."""
    if ZERO_IN:
        d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
            DEQ, DEQ_CONS, [w, h, tl.broadcast_to(zz, w.shape)], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    else:
        d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
            DEQ, DEQ_CONS, [w, h], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    return d0, d1, d2, d3, d4, d5, d6, d7


@triton.jit
def _paired_tile(wq, hq, zz, DEQ: tl.constexpr, DEQ_CONS: tl.constexpr, BITS: tl.constexpr, ZERO_IN: tl.constexpr,
                 ACT_FP16: tl.constexpr):
    """``[BN, BKW * PER]`` exact ``code - zero`` in the activation dtype, inputs in order.

    :func:`dequant_asm` leaves pair ``i`` (codes ``i`` and ``i + PER/2``) in one b32. The pairs are joined on
    new trailing axes (the bits of ``i``, low bit first) and their two lanes on the last; permuting those axes
    puts code ``c = lane * PER/2 + i`` at position ``c`` of its word, so the activations are read in order
    (and pipelined) while the registers keep each pair together until the tile is stored for the tensor cores.
    """
    if BITS == 8:  # pairs (0, 2) and (1, 3): code c = lane * 2 + i
        d0, d1 = _dequant8(wq, zz, DEQ, DEQ_CONS, ZERO_IN)
        lo, hi = _halves(tl.join(d0, d1), ACT_FP16)
        t = tl.permute(tl.join(lo, hi), (0, 1, 3, 2))
    elif BITS == 4:
        d0, d1, d2, d3 = _dequant4(wq, zz, DEQ, DEQ_CONS, ZERO_IN)
        lo, hi = _halves(tl.join(tl.join(d0, d1), tl.join(d2, d3)), ACT_FP16)
        t = tl.permute(tl.join(lo, hi), (0, 1, 4, 3, 2))
    else:
        if BITS == 3:  # the 2-bit plane's pairs, each completed by its high bits
            d0, d1, d2, d3, d4, d5, d6, d7 = _dequant3(wq, hq, zz, DEQ, DEQ_CONS, ZERO_IN)
        else:
            d0, d1, d2, d3, d4, d5, d6, d7 = _dequant2(wq, zz, DEQ, DEQ_CONS, ZERO_IN)
        lo, hi = _halves(tl.join(tl.join(tl.join(d0, d1), tl.join(d2, d3)), tl.join(tl.join(d4, d5), tl.join(d6, d7))),
                         ACT_FP16)
        t = tl.permute(tl.join(lo, hi), (0, 1, 5, 4, 3, 2))
    return tl.reshape(t, (wq.shape[0], wq.shape[1] * (16 if BITS == 3 else 32 // BITS)))


@triton.jit(do_not_specialize=["M"])  # one compile serves every row count of a bucket
def _qmm_wt_kernel(
    x_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_om, k_per_split,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    EVEN_K: tl.constexpr, PAIRS: tl.constexpr, DEQ: tl.constexpr, DEQ_CONS: tl.constexpr,
    ACT_FP16: tl.constexpr, STAGES: tl.constexpr, DOT_F32: tl.constexpr, WAIT_MMA: tl.constexpr,
):
    # GROUP == 0: per output feature (scale row 0, read per tile like a group's). k_per_split is a multiple of
    # BLOCK_K, BLOCK_K of PER. PAIRS (CUDA, fp16/bf16): dequant_asm (dequant3_asm) makes the tile; it needs one group
    # per tile (GROUP % BLOCK_K == 0) or per-channel. 3 bits: the words are the 2-bit plane's (PER 16), each with its
    # column's high word (qh_ptr, a word per column pair, the odd column's shifted down one bit).
    # DOT_F32: float32 dot operands (only for Triton's CPU interpreter, whose bf16 dot is wrong).
    # WAIT_MMA (CUDA sm_90, where tl.dot lowers to wgmma): see _after_tensor_cores.
    PER: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    BKW: tl.constexpr = BLOCK_K // PER
    MASK: tl.constexpr = 3 if BITS == 3 else (1 << BITS) - 1
    MAGIC: tl.constexpr = 8388608.0
    ZC: tl.constexpr = 1 << (BITS - 1)
    ONE_GROUP: tl.constexpr = GROUP == 0 or GROUP % BLOCK_K == 0  # one scale row per tile (per-channel: row 0)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BKW)
    n_mask = offs_n < N
    m_mask = offs_m < M
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    act = x_ptr.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    if not PAIRS:
        shifts = (tl.arange(0, PER) * (32 // PER))[None, None, :]
        hshifts = ((tl.arange(0, PER) * 2 + 2) % 32)[None, None, :]  # 3 bits: the high bits' places

    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        rows = k0 // PER + offs_r
        k = k0 + offs_k
        if EVEN_K:
            w_mask = n_mask[:, None]
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + k[:, None], mask=m_mask[None, :], other=0.0)
        else:
            w_mask = n_mask[:, None] & (rows < tl.cdiv(K, PER))[None, :]
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + k[:, None], mask=m_mask[None, :] & (k < K)[:, None],
                         other=0.0)
        wq = tl.load(qw_ptr + rows[None, :] * N + offs_n[:, None], mask=w_mask, other=0)
        hq = wq
        if BITS == 3:
            hq = tl.load(qh_ptr + rows[None, :] * ((N + 1) // 2) + (offs_n // 2)[:, None], mask=w_mask, other=0)
            hq = hq >> (offs_n % 2)[:, None]
        # zero point and scale of the tile: per output feature, per tile, or per input (tiles wider than a group)
        if ONE_GROUP:
            g = 0 if GROUP == 0 else k0 // GROUP
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32) if HAS_ZERO else ZC
        else:
            gk = (k // GROUP)[None, :]
            gm = n_mask[:, None] & (k < K)[None, :]
            s = tl.load(s_ptr + gk * N + offs_n[:, None], mask=gm, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + gk * N + offs_n[:, None], mask=gm, other=0).to(tl.float32) if HAS_ZERO else ZC
        if WAIT_MMA:
            s = _after_tensor_cores(s)
        if PAIRS:
            zz = _zero_pair(z, ACT_FP16, BITS)[:, None] if HAS_ZERO else 0
            w = _paired_tile(wq, hq, zz, DEQ, DEQ_CONS, BITS, HAS_ZERO, ACT_FP16) * s.to(act)[:, None]
        else:
            # code j of word row r is input r * PER + j: [BN, BKW, PER] flattens to [BN, BLOCK_K] in input order
            q3 = ((wq[:, :, None] >> shifts) & MASK) | 0x4B000000
            if BITS == 3:
                q3 = q3 | (((hq[:, :, None] >> hshifts) & 1) << 2)
            code = tl.reshape(q3, (BLOCK_N, BLOCK_K)).to(tl.float32, bitcast=True)  # 2**23 + code
            if ONE_GROUP:
                w = (code - (z + MAGIC)[:, None] if HAS_ZERO else code - (MAGIC + ZC)) * s[:, None]
            else:
                w = (code - (z + MAGIC) if HAS_ZERO else code - (MAGIC + ZC)) * s
            w = w.to(act)
        if DOT_F32:
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc)
        else:
            acc = tl.dot(w, xt, acc)

    res = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    _write_output(res, out_ptr, offs_m[:, None] * stride_om + offs_n[None, :], m_mask[:, None] & n_mask[None, :],
                  ws_ptr, offs_m[:, None] * N + offs_n[None, :], b_ptr, offs_n, n_mask, cnt_ptr, HAS_BIAS, SPLIT)

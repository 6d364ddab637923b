"""Triton kernels: W{2,3,4,8}A16 matmul with the weight dequantized in registers.

``y[M, N] = x[M, K] @ W[K, N]`` with ``W`` in the :class:`~auto_quant.kernels.pack.KernelWeight`
layout (codes packed along K; ``PER`` codes per int32 word row: 16 for 2 bits, 8 for 4 bits, 4 for
8 bits, 16 for 3 bits whose high bits live in a separate plane, :func:`~auto_quant.kernels.pack.pack_high_bits`).

Each program loads a tile of packed words ``[BLOCK_K / PER, BLOCK_N]`` once (coalesced along N);
code ``j`` of word row ``r`` is input ``k = r * PER + j``, so the matching activations are the
strided slice ``x[..., r * PER + j]``. No word is loaded twice.

* ``fma`` (M == 1): ``part[r, n] += x[r*PER + j] * (code - zero)`` in fp32 registers, then
  ``acc += part * scale`` once per word row (every word lies inside one quantization group), so
  each weight costs a shift, a mask, a subtract and one FMA. The next word tile is loaded before
  the current one is used (software prefetch). One reduction at the end.
* ``dot`` (M >= 2): the tile's codes are expanded to ``[PER, BLOCK_K / PER, BLOCK_N]`` and
  flattened to ``[BLOCK_K, BLOCK_N]`` in (code, word row) order, the activations are gathered in
  the same order, and one tensor-core dot consumes the tile. When the tile lies in one group,
  the exact integers ``code - zero`` go into the dot and the scale multiplies the tile's partial
  product; otherwise each element is scaled first.
* split-K for both (``_write_output``, shared with the gemv kernels): the programs of grid axis 2
  share an output tile; each adds its fp32 partial into a zero-at-rest workspace with atomics and
  bumps a per-tile counter; the last to arrive reads the sum back atomically, zeroes the workspace
  tile, adds the bias, writes the output and resets the counter. One launch, no memset, CUDA-graph safe.
* ``_dequant_kernel`` writes ``W^T`` in the activation dtype (dequantize + cuBLAS at large M).

Integer codes become floats with the exponent trick ``bitcast(code | 0x4B000000) = 2**23 + code``;
subtracting ``2**23 + zero`` (exact in fp32) gives ``code - zero`` without a conversion instruction.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _words(qw_ptr, qh_ptr, rows, offs_n, N, mask, BITS: tl.constexpr):
    """Word tiles ``[R, BLOCK_N]`` for word rows ``rows``; for 3 bits also the matching high bits."""
    lo = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0)
    if BITS == 3:  # the column pair's high word, shifted so code j's high bit is at (2j + 2) % 32
        hi = tl.load(qh_ptr + rows[:, None] * ((N + 1) // 2) + (offs_n // 2)[None, :], mask=mask, other=0)
        hi = hi >> (offs_n % 2)[None, :]
    else:
        hi = lo
    return lo, hi


@triton.jit
def _code(lo, hi, j: tl.constexpr, BITS: tl.constexpr):
    """``2**23 + code`` (float32) of code ``j`` of every word."""
    if BITS == 3:
        q = ((lo >> (2 * j)) & 3) | (((hi >> ((2 * j + 2) % 32)) & 1) << 2)
    else:
        q = (lo >> (j * BITS)) & ((1 << BITS) - 1)
    return (q | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _write_output(res, out_ptr, o_offs, o_mask, ws_ptr, ws_offs, b_ptr, offs_n, n_mask, cnt_ptr,
                  HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """Store the fp32 tile ``res`` (plus bias) at ``out_ptr + o_offs``, or reduce it over split-K.

    Split-K (the programs of grid axis 2): each adds its partial into the zero-at-rest workspace
    (``ws_ptr + ws_offs``) and bumps the tile's arrival counter; the last to arrive reads the sum back
    at L2, re-zeroes the workspace, adds the bias, writes the output and resets the counter. The tile
    is (grid axis 1, grid axis 0).
    """
    if not SPLIT:
        if HAS_BIAS:
            res += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + o_offs, res.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        w_ptrs = ws_ptr + ws_offs
        tl.atomic_add(w_ptrs, res, mask=o_mask, sem="relaxed")
        # the barrier orders every thread's adds before the counter's acq_rel atomic, whose release is cumulative
        # (the split-K semaphore pattern of CUTLASS): one fence per program instead of one per element
        tl.debug_barrier()
        tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        arrived = tl.atomic_add(cnt_ptr + tile, 1)
        if arrived == tl.num_programs(2) - 1:  # the counter's acquire orders the reads below after it
            zero = tl.zeros_like(res)
            tot = tl.atomic_add(w_ptrs, zero, mask=o_mask, sem="relaxed")  # read at L2, where the splits added
            tl.store(w_ptrs, zero, mask=o_mask)  # back to zero for the next call
            if HAS_BIAS:
                tot += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + o_offs, tot.to(out_ptr.dtype.element_ty), mask=o_mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit(do_not_specialize=["M"])  # one compile serves every row count of a bucket
def _qmm_kernel(
    x_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, n_groups, stride_xm, stride_om, rows_per_split,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
):
    # SPLIT: the programs of grid axis 2 share each output tile (split-K, see _write_output). GROUP == 0: per-channel. One group per tile when GROUP % BLOCK_K == 0; else per word row.
    # DOT_F32: float32 dot operands (only for Triton's CPU interpreter, whose bf16 dot is wrong).
    PER: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    BKW: tl.constexpr = BLOCK_K // PER
    ONE_GROUP: tl.constexpr = GROUP != 0 and GROUP % BLOCK_K == 0
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BKW)
    n_mask = offs_n < N
    m_mask = offs_m < M
    n_rows = tl.cdiv(K, PER)
    r_lo = pid_k * rows_per_split
    r_hi = tl.minimum(r_lo + rows_per_split, n_rows)
    MAGIC: tl.constexpr = 8388608.0

    if GROUP == 0:
        s_ch = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zz_ch = tl.load(z_ptr + offs_n, mask=n_mask, other=0).to(tl.float32) + MAGIC
        else:
            zz_ch = tl.zeros((BLOCK_N,), tl.float32) + (MAGIC + (1 << (BITS - 1)))

    if BLOCK_M == 1:
        acc = tl.zeros((BKW, BLOCK_N), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)

    if BLOCK_M == 1:  # the GEMV prefetches the next word tile while it computes on this one
        rows = r_lo + offs_r
        lo_next, hi_next = _words(qw_ptr, qh_ptr, rows, offs_n, N, (rows < r_hi)[:, None] & n_mask[None, :], BITS)

    for r0 in range(r_lo, r_hi, BKW):
        rows = r0 + offs_r
        if BLOCK_M == 1:
            lo = lo_next
            hi = hi_next
            nxt = rows + BKW
            lo_next, hi_next = _words(qw_ptr, qh_ptr, nxt, offs_n, N, (nxt < r_hi)[:, None] & n_mask[None, :], BITS)
        else:
            if EVEN_K:
                w_mask = n_mask[None, :]
            else:
                w_mask = (rows < n_rows)[:, None] & n_mask[None, :]
            lo, hi = _words(qw_ptr, qh_ptr, rows, offs_n, N, w_mask, BITS)
        # zero (as 2**23 + zero) and scale: per channel, per tile, or per word row
        if GROUP == 0:
            zz = zz_ch[None, :]
        elif ONE_GROUP:
            g = (r0 * PER) // GROUP
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_ZERO:
                zz = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :] + MAGIC
            else:
                zz = tl.zeros((1, BLOCK_N), tl.float32) + (MAGIC + (1 << (BITS - 1)))
        else:
            gr = (rows * PER) // GROUP
            gm = (gr < n_groups)[:, None] & n_mask[None, :]
            s = tl.load(s_ptr + gr[:, None] * N + offs_n[None, :], mask=gm, other=0.0).to(tl.float32)
            if HAS_ZERO:
                zz = tl.load(z_ptr + gr[:, None] * N + offs_n[None, :], mask=gm, other=0).to(tl.float32) + MAGIC
            else:
                zz = tl.zeros((BKW, BLOCK_N), tl.float32) + (MAGIC + (1 << (BITS - 1)))

        if BLOCK_M == 1:
            part = tl.zeros((BKW, BLOCK_N), tl.float32)
            for j in tl.static_range(PER):
                ks = rows * PER + j
                if EVEN_K:
                    xj = tl.load(x_ptr + pid_m * stride_xm + ks).to(tl.float32)
                else:
                    xj = tl.load(x_ptr + pid_m * stride_xm + ks, mask=ks < K, other=0.0).to(tl.float32)
                part += xj[:, None] * (_code(lo, hi, j, BITS) - zz)
            if GROUP == 0:
                acc += part
            else:
                acc += part * s
        else:
            # one dot per tile: codes as [PER, BKW, BN] (code j of word row r is input r*PER + j), flattened
            # to [BLOCK_K, BN] in (j, r) order; the activations are gathered in the same order
            jj = tl.arange(0, PER)
            ks = rows[None, :] * PER + jj[:, None]  # [PER, BKW]
            xk = tl.reshape(ks, (BLOCK_K,))
            if EVEN_K:
                xm = m_mask[:, None]
            else:
                xm = m_mask[:, None] & (xk < K)[None, :]
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + xk[None, :], mask=xm, other=0.0)
            if BITS == 3:
                q3 = (((lo[None, :, :] >> (2 * jj)[:, None, None]) & 3)
                      | (((hi[None, :, :] >> ((2 * jj + 2) % 32)[:, None, None]) & 1) << 2))
            else:
                q3 = (lo[None, :, :] >> (jj * BITS)[:, None, None]) & ((1 << BITS) - 1)
            wq3 = (q3 | 0x4B000000).to(tl.float32, bitcast=True) - zz[None, :, :]
            if not (GROUP == 0 or ONE_GROUP):
                wq3 = wq3 * s[None, :, :]
            wq = tl.reshape(wq3, (BLOCK_K, BLOCK_N))
            if DOT_F32:
                part = tl.dot(xt.to(tl.float32), wq.to(xt.dtype).to(tl.float32))
            else:
                part = tl.dot(xt, wq.to(xt.dtype))
            if ONE_GROUP:
                acc += part * s
            else:
                acc += part

    if BLOCK_M == 1:
        res = tl.sum(acc, axis=0)[None, :]
    else:
        res = acc
    if GROUP == 0:
        res = res * s_ch[None, :]

    _write_output(res, out_ptr, offs_m[:, None] * stride_om + offs_n[None, :], m_mask[:, None] & n_mask[None, :],
                  ws_ptr, offs_m[:, None] * N + offs_n[None, :], b_ptr, offs_n, n_mask, cnt_ptr, HAS_BIAS, SPLIT)


@triton.jit
def _dequant_kernel(
    qw_ptr, qh_ptr, s_ptr, z_ptr, out_ptr, N, K,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``out[K, N] = W^T`` in ``out``'s dtype."""
    PER: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    BKW: tl.constexpr = BLOCK_K // PER
    MAGIC: tl.constexpr = 8388608.0
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_k * BKW + tl.arange(0, BKW)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    mask = (rows < tl.cdiv(K, PER))[:, None] & n_mask[None, :]
    lo, hi = _words(qw_ptr, qh_ptr, rows, offs_n, N, mask, BITS)
    if GROUP == 0:
        g = rows * 0
    else:
        g = (rows * PER) // GROUP
    s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        zz = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0).to(tl.float32) + MAGIC
    else:
        zz = tl.zeros((BKW, BLOCK_N), tl.float32) + (MAGIC + (1 << (BITS - 1)))
    for j in tl.static_range(PER):
        ks = rows * PER + j
        w = (_code(lo, hi, j, BITS) - zz) * s
        tl.store(out_ptr + ks[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=(ks < K)[:, None] & n_mask[None, :])

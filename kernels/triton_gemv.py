"""Triton GEMV for one activation row against 2/4/8-bit weights in the KernelWeight layout.

``y[n] = sum_k x[k] * (code[k, n] - zero[g, n]) * scale[g, n]``; ``qweight`` is ``[K / PER, N]``
int32 with ``PER = 32 / bits`` codes per word, so a program's tile of ``[BLOCK_R, BLOCK_N]`` words is
read with 16-byte loads along N, and every word is read once.

At batch 1 the work per weight, not the bytes, is what limits a fused kernel: the older ``fma``
variant spends five or six instructions per weight and reads its weights at a third of the memory
bandwidth whatever the bit width. Two ways to spend fewer:

* ``PAIRS`` (fp16/bf16 activations, 2 and 4 bits, CUDA only): a few lines of PTX per word
  (:func:`~auto_quant.kernels.dequant_ptx.pair_asm`) take codes ``i`` and ``i + PER/2`` (16 bits apart) into the
  two lanes of a half2 with one ``lop3`` and the exponent ``0x6400`` (fp16: ``1024 + code``) or ``0x4300`` (bf16:
  ``128 + code``); one packed ``fma`` turns them into the exact integers ``code - zero``, one more
  multiplies them with the matching activation pair and adds. The word's products are summed in half
  precision, the word's total goes to an fp32 accumulator and the scale multiplies it once per tile:
  about two and a half instructions per weight. fp16 activation pairs are scaled by 2**-6 first
  (exact; the total is scaled back), so a word's half-precision sum cannot overflow; bf16 has the
  float32 range.
* the portable path (any float activations, 8 bits; the one Triton's CPU interpreter runs): the
  exponent trick ``bitcast((word & (mask << b*j)) | 0x4B000000) = 2**23 + code * 2**(b*j)`` takes a
  code from its place in the word without a shift, one subtraction makes ``(code - zero) * 2**(b*j)``
  exactly, and the activation, pre-scaled by ``2**-(b*j)`` (exact), multiplies it: products exact in
  fp32. Codes above bit 23 come from one shifted copy of the word.

Each iteration loads the next tile's words, scales and activation pairs before computing on the
current one. Split-K: the programs of grid axis 2 share a column tile and reduce through
:func:`auto_quant.kernels.triton_qmm._write_output`, as every kernel here does.
"""

from __future__ import annotations


import triton
import triton.language as tl

from auto_quant.kernels.triton_qmm import _write_output

@triton.jit
def _x_half(p, H: tl.constexpr, UP: tl.constexpr):
    """Half ``H`` of the b32 activation pair ``p``, moved to the low (``UP=False``) or high 16 bits."""
    if H == 0:
        v = p & 0xFFFF
    else:
        v = (p >> 16) & 0xFFFF
    if UP:
        v = v << 16
    return v


@triton.jit
def _x_pair(p_lo, p_hi, I: tl.constexpr, NP: tl.constexpr, ACT_FP16: tl.constexpr):
    """``(x[I], x[I + NP])`` as one b32 from the word rows' adjacent pairs (any shape); fp16 scaled by 2**-6
    (exact)."""
    v = _x_half(p_lo, I % 2, False) | _x_half(p_hi, (I + NP) % 2, True)
    if ACT_FP16:
        v = tl.inline_asm_elementwise("{ .reg .b32 c; mov.b32 c, 0x24002400; mul.rn.f16x2 $0, $1, c; }", "=r,r",
                                      [v], dtype=tl.int32, is_pure=True, pack=1)
    return v


@triton.jit
def _columns(BLOCK_N: tl.constexpr, N, EVEN_N: tl.constexpr):
    """This program's output columns (grid axis 0) and their mask; EVEN_N (N % BLOCK_N == 0) gives a mask
    constant along N, which keeps the loads 16 bytes wide."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if EVEN_N:
        return offs_n, tl.full((BLOCK_N,), 1, tl.int1)
    return offs_n, offs_n < N


@triton.jit
def _masked_load(ptr, mask, EVEN_R: tl.constexpr):
    """A load whose masked-off lanes are never used when EVEN_R (every tile full), else read as 0."""
    if EVEN_R:
        return tl.load(ptr, mask=mask)
    return tl.load(ptr, mask=mask, other=0)


@triton.jit
def _load_pairs(x32_ptr, rows, live, BITS: tl.constexpr, EVEN_R: tl.constexpr, PAIRS: tl.constexpr,
                ACT_FP16: tl.constexpr):
    """The activation pairs ``(x[2m], x[2m+1])`` (b32) of word rows ``rows``: 4 for 4 bits, 8 for 2 bits; for 8
    bits the four activations as float32 (row indices, never loaded or used, where the paired path is off)."""
    if not PAIRS:
        return rows, rows, rows, rows, rows, rows, rows, rows
    if BITS == 8:  # the word's four activations as float32 bits (:func:`~auto_quant.kernels.dequant_ptx.byte_asm`)
        if ACT_FP16:
            xh = x32_ptr.to(tl.pointer_type(tl.float16), bitcast=True) + rows * 4
            a0 = _masked_load(xh + 0, live, EVEN_R).to(tl.float32).to(tl.int32, bitcast=True)
            a1 = _masked_load(xh + 1, live, EVEN_R).to(tl.float32).to(tl.int32, bitcast=True)
            a2 = _masked_load(xh + 2, live, EVEN_R).to(tl.float32).to(tl.int32, bitcast=True)
            a3 = _masked_load(xh + 3, live, EVEN_R).to(tl.float32).to(tl.int32, bitcast=True)
        else:  # bf16 is the top half of a float32: two 4-byte loads and a shift or a mask per value
            lo = _masked_load(x32_ptr + rows * 2, live, EVEN_R)
            hi = _masked_load(x32_ptr + rows * 2 + 1, live, EVEN_R)
            a0 = lo << 16
            a1 = lo & -65536
            a2 = hi << 16
            a3 = hi & -65536
        return a0, a1, a2, a3, a0, a0, a0, a0
    NP: tl.constexpr = 16 // BITS
    base = x32_ptr + rows * NP
    p0 = _masked_load(base + 0, live, EVEN_R)
    p1 = _masked_load(base + 1, live, EVEN_R)
    p2 = _masked_load(base + 2, live, EVEN_R)
    p3 = _masked_load(base + 3, live, EVEN_R)
    if BITS == 2:
        p4 = _masked_load(base + 4, live, EVEN_R)
        p5 = _masked_load(base + 5, live, EVEN_R)
        p6 = _masked_load(base + 6, live, EVEN_R)
        p7 = _masked_load(base + 7, live, EVEN_R)
    else:
        p4 = p0
        p5 = p0
        p6 = p0
        p7 = p0
    return p0, p1, p2, p3, p4, p5, p6, p7


@triton.jit
def _pair_term(w, p0, p1, p2, p3, p4, p5, p6, p7, zz, ASM: tl.constexpr, CONS: tl.constexpr,
               BITS: tl.constexpr, ACT_FP16: tl.constexpr, ZERO_IN: tl.constexpr):
    """f32 ``[R, BN]``: each word's sum of ``x * (code - zero)`` (times 2**-6 for fp16).

    ``p0..``: the word rows' adjacent activation pairs (:func:`_load_pairs`); ``zz``: the b32 pair
    ``-(base + zero)`` per column when the zeros are inputs (``ZERO_IN``).
    """
    if BITS == 8:  # p0..p3: the float32 activations of the word's four codes
        x0 = tl.broadcast_to(p0[:, None], w.shape)
        x1 = tl.broadcast_to(p1[:, None], w.shape)
        x2 = tl.broadcast_to(p2[:, None], w.shape)
        x3 = tl.broadcast_to(p3[:, None], w.shape)
        if ZERO_IN:
            r = tl.inline_asm_elementwise(ASM, CONS, [w, x0, x1, x2, x3, tl.broadcast_to(zz, w.shape)],
                                          dtype=tl.int32, is_pure=True, pack=1)
        else:
            r = tl.inline_asm_elementwise(ASM, CONS, [w, x0, x1, x2, x3], dtype=tl.int32, is_pure=True, pack=1)
    elif BITS == 4:  # pair i = (x[i], x[i + 4]): x[i] in p[i // 2], x[i + 4] in p[2 + i // 2]
        x0 = tl.broadcast_to(_x_pair(p0, p2, 0, 4, ACT_FP16)[:, None], w.shape)
        x1 = tl.broadcast_to(_x_pair(p0, p2, 1, 4, ACT_FP16)[:, None], w.shape)
        x2 = tl.broadcast_to(_x_pair(p1, p3, 2, 4, ACT_FP16)[:, None], w.shape)
        x3 = tl.broadcast_to(_x_pair(p1, p3, 3, 4, ACT_FP16)[:, None], w.shape)
        if ZERO_IN:
            r = tl.inline_asm_elementwise(ASM, CONS, [w, x0, x1, x2, x3, tl.broadcast_to(zz, w.shape)],
                                          dtype=tl.int32, is_pure=True, pack=1)
        else:
            r = tl.inline_asm_elementwise(ASM, CONS, [w, x0, x1, x2, x3], dtype=tl.int32, is_pure=True, pack=1)
    else:  # 2 bits: pair i = (x[i], x[i + 8]) from p[i // 2] and p[4 + i // 2]
        x0 = tl.broadcast_to(_x_pair(p0, p4, 0, 8, ACT_FP16)[:, None], w.shape)
        x1 = tl.broadcast_to(_x_pair(p0, p4, 1, 8, ACT_FP16)[:, None], w.shape)
        x2 = tl.broadcast_to(_x_pair(p1, p5, 2, 8, ACT_FP16)[:, None], w.shape)
        x3 = tl.broadcast_to(_x_pair(p1, p5, 3, 8, ACT_FP16)[:, None], w.shape)
        x4 = tl.broadcast_to(_x_pair(p2, p6, 4, 8, ACT_FP16)[:, None], w.shape)
        x5 = tl.broadcast_to(_x_pair(p2, p6, 5, 8, ACT_FP16)[:, None], w.shape)
        x6 = tl.broadcast_to(_x_pair(p3, p7, 6, 8, ACT_FP16)[:, None], w.shape)
        x7 = tl.broadcast_to(_x_pair(p3, p7, 7, 8, ACT_FP16)[:, None], w.shape)
        if ZERO_IN:
            r = tl.inline_asm_elementwise(ASM, CONS, [w, x0, x1, x2, x3, x4, x5, x6, x7, tl.broadcast_to(zz, w.shape)],
                                          dtype=tl.int32, is_pure=True, pack=1)
        else:
            r = tl.inline_asm_elementwise(ASM, CONS, [w, x0, x1, x2, x3, x4, x5, x6, x7], dtype=tl.int32,
                                          is_pure=True, pack=1)
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _code_term(src, xj, z, BITS: tl.constexpr, POS: tl.constexpr):
    """``x * (code - zero)`` for the code at bits ``[BITS*POS, BITS*POS + BITS)`` of ``src`` (below bit 23)."""
    MAGIC: tl.constexpr = 8388608.0
    STEP: tl.constexpr = 1 << (BITS * POS)
    v = ((src & (((1 << BITS) - 1) << (BITS * POS))) | 0x4B000000).to(tl.float32, bitcast=True)
    return (xj * (1.0 / STEP))[:, None] * (v - (MAGIC + z * STEP))


@triton.jit
def _portable_term(w, x_ptr, xrow, rows, live, z, K, BITS: tl.constexpr, EVEN_K: tl.constexpr):
    """f32 ``[R, BN]``: each word's sum of ``x * (code - zero)``, exact products (see the module doc)."""
    PER: tl.constexpr = 32 // BITS
    IN_PLACE: tl.constexpr = 23 // BITS  # codes whose bits all lie below bit 23
    hi = w >> (BITS * IN_PLACE)
    part = tl.zeros(w.shape, tl.float32)
    for j in tl.static_range(PER):
        ks = rows * PER + j
        if EVEN_K:
            xj = tl.load(x_ptr + xrow + ks, mask=live, other=0.0).to(tl.float32)
        else:
            xj = tl.load(x_ptr + xrow + ks, mask=live & (ks < K), other=0.0).to(tl.float32)
        if j < IN_PLACE:
            part += _code_term(w, xj, z, BITS, j)
        else:
            part += _code_term(hi, xj, z, BITS, j - IN_PLACE)
    return part


@triton.jit
def _dequant4(w, zz, DEQ: tl.constexpr, DEQ_CONS: tl.constexpr, ZERO_IN: tl.constexpr):
    """4 bits: the four packed ``code - zero`` pairs of every word of ``w``
    (:func:`~auto_quant.kernels.dequant_ptx.dequant_asm`); ``zz`` the per-column ``-(base + zero)`` pairs when
    ``ZERO_IN``."""
    if ZERO_IN:
        d0, d1, d2, d3 = tl.inline_asm_elementwise(DEQ, DEQ_CONS, [w, tl.broadcast_to(zz, w.shape)],
                                                   dtype=(tl.int32,) * 4, is_pure=True, pack=1)
    else:
        d0, d1, d2, d3 = tl.inline_asm_elementwise(DEQ, DEQ_CONS, [w], dtype=(tl.int32,) * 4, is_pure=True, pack=1)
    return d0, d1, d2, d3


@triton.jit
def _dequant8(w, zz, DEQ: tl.constexpr, DEQ_CONS: tl.constexpr, ZERO_IN: tl.constexpr):
    """8 bits: the two packed ``code - zero`` pairs (bytes 0, 2 and 1, 3) of every word of ``w``."""
    if ZERO_IN:
        d0, d1 = tl.inline_asm_elementwise(DEQ, DEQ_CONS, [w, tl.broadcast_to(zz, w.shape)], dtype=(tl.int32,) * 2,
                                           is_pure=True, pack=1)
    else:
        d0, d1 = tl.inline_asm_elementwise(DEQ, DEQ_CONS, [w], dtype=(tl.int32,) * 2, is_pure=True, pack=1)
    return d0, d1


@triton.jit
def _dequant2(w, zz, DEQ: tl.constexpr, DEQ_CONS: tl.constexpr, ZERO_IN: tl.constexpr):
    """2 bits: the eight packed ``code - zero`` pairs of every word of ``w`` (see :func:`_dequant4`)."""
    if ZERO_IN:
        d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
            DEQ, DEQ_CONS, [w, tl.broadcast_to(zz, w.shape)], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    else:
        d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
            DEQ, DEQ_CONS, [w], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    return d0, d1, d2, d3, d4, d5, d6, d7


@triton.jit
def _zero_pair(z, ACT_FP16: tl.constexpr, BITS: tl.constexpr):
    """The b32 pair the paired PTX adds per column: ``-(base + zero)``; ``-zero`` for the 8-bit bf16 tile."""
    if ACT_FP16:
        zh = (-(z + 1024.0)).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    elif BITS == 8:
        zh = (-z).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    else:
        zh = (-(z + 128.0)).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return zh | (zh << 16)


@triton.jit
def _scale_zero(s_ptr, z_ptr, g, offs_n, mask, N, HAS_ZERO: tl.constexpr, ZC: tl.constexpr):
    """``[1, BN]`` float32 scales and zero points of group ``g`` (group 0 for per-channel)."""
    s = tl.load(s_ptr + g * N + offs_n, mask=mask, other=0.0).to(tl.float32)[None, :]
    if HAS_ZERO:
        z = tl.load(z_ptr + g * N + offs_n, mask=mask, other=0).to(tl.float32)[None, :]
    else:
        z = tl.zeros_like(s) + ZC
    return s, z


@triton.jit
def _tile_scale_zero(s_ptr, z_ptr, r0, rows, live, valid, offs_n, n_mask, N, GROUP: tl.constexpr, PER: tl.constexpr,
                     ROW_S: tl.constexpr, HAS_ZERO: tl.constexpr, ZC: tl.constexpr):
    """Scales and zeros of the tile starting at word row ``r0``: ``[1, BN]`` when the tile lies in one
    group, else ``[R, BN]`` per word row (ROW_S). ``valid``: whether the tile exists at all."""
    if ROW_S:
        g = (rows * PER) // GROUP
        m = (live & valid)[:, None] & n_mask[None, :]
        s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=m, other=0).to(tl.float32)
        else:
            z = tl.zeros_like(s) + ZC
    else:
        s, z = _scale_zero(s_ptr, z_ptr, (r0 * PER) // GROUP, offs_n, n_mask & valid, N, HAS_ZERO, ZC)
    return s, z


@triton.jit
def _load_tile(qw_ptr, s_ptr, z_ptr, r0, offs_r, r_hi, offs_n, n_mask, N, s_ch, z_ch, GROUP: tl.constexpr,
               PER: tl.constexpr, ROW_S: tl.constexpr, HAS_ZERO: tl.constexpr, ZC: tl.constexpr,
               EVEN_R: tl.constexpr):
    """The word rows of the tile starting at ``r0``, their live mask, words, scales and zeros
    (per-channel ``s_ch``/``z_ch`` when GROUP == 0). Nothing is read for a tile at or past ``r_hi``."""
    rows = r0 + offs_r
    live = rows < r_hi
    w = _masked_load(qw_ptr + rows[:, None] * N + offs_n[None, :], live[:, None] & n_mask[None, :], EVEN_R)
    if GROUP == 0:
        s = s_ch
        z = z_ch
    else:
        s, z = _tile_scale_zero(s_ptr, z_ptr, r0, rows, live, r0 < r_hi, offs_n, n_mask, N, GROUP, PER, ROW_S,
                                HAS_ZERO, ZC)
    return rows, live, w, s, z


@triton.jit
def _tile_sum(w, s, z, q0, q1, q2, q3, q4, q5, q6, q7, x_ptr, xrow, rows, live, K,
              BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, EVEN_K: tl.constexpr,
              PAIRS: tl.constexpr, ASM: tl.constexpr, CONS: tl.constexpr, ACT_FP16: tl.constexpr):
    """``[R, BN]`` float32 contribution of one tile (scaled, except per-channel scales: at the end)."""
    if PAIRS:
        if not HAS_ZERO:
            zz = z
        elif BITS == 8:  # byte_asm takes the float32 2**23 + zero
            zz = (z + 8388608.0).to(tl.int32, bitcast=True)
        else:
            zz = _zero_pair(z, ACT_FP16, BITS)
        part = _pair_term(w, q0, q1, q2, q3, q4, q5, q6, q7, zz, ASM, CONS, BITS, ACT_FP16, HAS_ZERO)
    else:
        part = _portable_term(w, x_ptr, xrow, rows, live, z, K, BITS, EVEN_K)
    if GROUP == 0:
        return part
    return part * s


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
    N, K, stride_xm, stride_om, rows_per_split,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_R: tl.constexpr, EVEN_N: tl.constexpr, PAIRS: tl.constexpr, ASM: tl.constexpr, CONS: tl.constexpr,
    ACT_FP16: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr,
):
    # grid: (column tiles, rows of x, splits of K); rows_per_split % BLOCK_R == 0. GROUP == 0: per-channel
    # scales; a tile of BLOCK_R word rows inside one group (GROUP % (BLOCK_R * PER) == 0) reads one scale
    # row, a taller tile reads one per word row (ROW_S).
    # EVEN_R: the word rows are whole tiles (ceil(K / PER) % BLOCK_R == 0), so no tile is partial.
    # STAGES == 1: each iteration loads the next tile (words, scales, activation pairs) into registers
    # before it computes on this one; STAGES > 1: Triton's pipeliner copies tiles STAGES - 1 ahead into
    # shared memory (cp.async), which keeps more bytes in flight at no register cost.
    # PDL (programmatic dependent launch, kernels/grid_dependency.py): the activations are read, and anything
    # written, only after griddepcontrol.wait; with STAGES == 1 the first tile's words are read before it.
    PER: tl.constexpr = 32 // BITS
    ZC: tl.constexpr = 1 << (BITS - 1)  # the symmetric zero
    ROW_S: tl.constexpr = GROUP != 0 and GROUP % (BLOCK_R * PER) != 0
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n, n_mask = _columns(BLOCK_N, N, EVEN_N)
    offs_r = tl.arange(0, BLOCK_R)
    r_lo = pid_k * rows_per_split
    r_hi = tl.minimum(r_lo + rows_per_split, tl.cdiv(K, PER))
    xrow = pid_m * stride_xm
    x32_ptr = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + xrow // 2
    s_ch, z_ch = _scale_zero(s_ptr, z_ptr, 0, offs_n, n_mask, N, HAS_ZERO, ZC)  # per channel (GROUP == 0)
    acc = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)

    if STAGES > 1:
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        for r0 in tl.range(r_lo, r_hi, BLOCK_R, num_stages=STAGES):
            rows, live, w, s, z = _load_tile(qw_ptr, s_ptr, z_ptr, r0, offs_r, r_hi, offs_n, n_mask, N, s_ch, z_ch,
                                             GROUP, PER, ROW_S, HAS_ZERO, ZC, EVEN_R)
            q0, q1, q2, q3, q4, q5, q6, q7 = _load_pairs(x32_ptr, rows, live, BITS, EVEN_R, PAIRS, ACT_FP16)
            acc += _tile_sum(w, s, z, q0, q1, q2, q3, q4, q5, q6, q7, x_ptr, xrow, rows, live, K,
                             BITS, GROUP, HAS_ZERO, EVEN_K, PAIRS, ASM, CONS, ACT_FP16)
    else:
        rows, live, w_nx, s_nx, z_nx = _load_tile(qw_ptr, s_ptr, z_ptr, r_lo, offs_r, r_hi, offs_n, n_mask, N, s_ch,
                                                  z_ch, GROUP, PER, ROW_S, HAS_ZERO, ZC, EVEN_R)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        p0, p1, p2, p3, p4, p5, p6, p7 = _load_pairs(x32_ptr, rows, live, BITS, EVEN_R, PAIRS, ACT_FP16)
        for r0 in range(r_lo, r_hi, BLOCK_R):
            rows = r0 + offs_r
            live = rows < r_hi
            w = w_nx
            s = s_nx
            z = z_nx
            q0, q1, q2, q3, q4, q5, q6, q7 = p0, p1, p2, p3, p4, p5, p6, p7
            # prefetch the next tile
            nrows, nlive, w_nx, s_nx, z_nx = _load_tile(qw_ptr, s_ptr, z_ptr, r0 + BLOCK_R, offs_r, r_hi, offs_n,
                                                        n_mask, N, s_ch, z_ch, GROUP, PER, ROW_S, HAS_ZERO, ZC, EVEN_R)
            p0, p1, p2, p3, p4, p5, p6, p7 = _load_pairs(x32_ptr, nrows, nlive, BITS, EVEN_R, PAIRS, ACT_FP16)
            acc += _tile_sum(w, s, z, q0, q1, q2, q3, q4, q5, q6, q7, x_ptr, xrow, rows, live, K,
                             BITS, GROUP, HAS_ZERO, EVEN_K, PAIRS, ASM, CONS, ACT_FP16)

    res = tl.sum(acc, axis=0)
    if GROUP == 0:
        res = res * tl.sum(s_ch, axis=0)
    if PAIRS and ACT_FP16 and BITS != 8:
        res = res * 64.0  # the pairs' 2**-6
    _write_output(res, out_ptr, pid_m * stride_om + offs_n, n_mask, ws_ptr, pid_m * N + offs_n, b_ptr, offs_n, n_mask,
                  cnt_ptr, HAS_BIAS, SPLIT)

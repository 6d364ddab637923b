"""Gluon kernel for 1-16 activation rows at 2, 3, 4 and 8 bits: ``mma.sync`` with the weight as the tall operand,
each lane dequantizing whole packed words straight into its operand registers.

Why: at decode sizes the single-row CUDA-core kernel (:mod:`~auto_quant.kernels.triton_gemv`) is bound by its
instructions, not by memory (on an H100 it runs no faster when its weight sits in L2, and a kernel that only
reads the same words takes two thirds of its time): it spends about 3.7 instructions per 4-bit weight on
unpacking, multiplying and summing. A tensor core does the multiply and the sum, so what is left per weight is
the unpacking, and this kernel arranges for that to be the cheapest one:

* **Inputs permuted inside a tile.** In ``mma.sync``'s left operand lane ``4g + t`` holds rows ``g`` and
  ``g + 8`` and, per 16 inputs, the pairs at ``2t`` and ``2t + 8``. Any order of the inputs inside a tile gives
  the same dot product as long as the activations follow it, so lane ``t`` is given whole words: word ``t`` of
  every group of four word rows, whose code pairs ``(i, i + PER/2)`` (one ``lop3`` under a float exponent and
  one packed ``fma`` each, :func:`~auto_quant.kernels.dequant_ptx.pair_layout`) are exactly the operand's
  pairs: about 1.4 unpacking instructions per 4-bit weight, against 2.5 when four lanes share each word (the
  ``wgmma`` kernel's order); 2.3 per weight for the whole loop (sm_90 SASS), against 3.7 in the CUDA-core kernel.
* **Activations** are read in the same order: lane ``(g, t)`` loads the ``PER`` inputs of its word row for
  activation row ``g`` (one 16-byte load at 4 bits) and one ``prmt`` per pair puts them in the words' pairs.
* **3 bits** read the 2-bit plane's words as 2-bit weights do and, with each, the high word of its column pair
  (:func:`~auto_quant.kernels.pack.pack_high_bits`: one word per 16 inputs of two columns, loaded with the
  words). Rotated by the shift that places a pair's low bits, the high word puts both codes' third bits just above
  them, and one more ``lop3`` per pair completes the 3-bit codes
  (:func:`~auto_quant.kernels.gluon_mma_operands.mma_pair_asm`).
* **Exact codes, float32 sums.** The operand holds the exact integers ``code - zero``; the products are summed
  in float32 by the tensor core and the group's scale multiplies the tile's sums (one group per tile, or
  per-channel scales at the end). Zero points (and, for 16-row tiles, scales) load with the words, ahead of use
  (:func:`_tile_scales`).
* **No shared memory in the loop.** The words come straight from global memory (16-byte loads along the
  weight rows: a thread's rows are adjacent physical rows, :func:`~auto_quant.kernels.gluon_wgmma._phys_row`),
  ``STAGES`` tiles ahead in registers, so warps never wait on each other.
* **Three ways to use the warps** (``KernelConfig.kind``): ``mma`` stacks them along the weight rows (8 or 16
  activation rows a program, split-K across programs for narrow layers); ``mma_kw`` gives each its own slice of K
  and puts the slices in the ``mma``'s 8 columns (free at 1-4 rows: those columns were idle); ``mma_kb`` gives each
  its own slice too, as its own batch of a batched ``mma`` (:func:`mma_kb_layouts`), so all 8 or 16 activation rows
  stay the columns and each warp reads only its slice's activations. Both slice modes sum the slices once, through
  shared memory, at the end: no split-K atomics. The operands are built by
  :mod:`~auto_quant.kernels.gluon_mma_operands`.

Split-K over grid axis 2 and the output are :func:`~auto_quant.kernels.gluon_wgmma.write_tile`'s. The packed
layout is :mod:`~auto_quant.kernels.pack`'s (``[K/PER, N]`` int32, codes in input order).
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from auto_quant.kernels.compile_ahead import kernel_call
from auto_quant.kernels.gluon_mma_layouts import kernel_layouts, logical_words, logical_words_batched
from auto_quant.kernels.gluon_mma_operands import _zero_pair, a_halves, act_halves, plane_bits
from auto_quant.kernels.gluon_wgmma import _phys_row, split_vector, write_tile
from auto_quant.kernels.grid_dependency import grid_launch_dependents, grid_wait, pdl_launch, pdl_max_weight_bytes
from auto_quant.kernels.mma_plan import MMA_BITS, mma_block_ok, mma_k_per_split, mma_kb_block_ok, mma_kw_block_ok
from auto_quant.kernels.pack import codes_per_row


@gluon.jit
def _load(ptrs, off, rows, n_rows, other_mask, MASKED: gl.constexpr):
    """The tile at ``ptrs + off``: rows at or past ``n_rows`` (and ``other_mask`` when ``MASKED``) read as 0."""
    if MASKED:
        return gl.load(ptrs + off, mask=gl.expand_dims(rows < n_rows, 1) & other_mask, other=0)
    return gl.load(ptrs + off, mask=gl.expand_dims(rows < n_rows, 1), other=0)


@gluon.jit
def _tile(acc, wp, xs, sc, zp, k, sz, word_l: gl.constexpr, a_l: gl.constexpr, b_l: gl.constexpr, BITS: gl.constexpr,
          GROUP: gl.constexpr, HAS_ZERO: gl.constexpr, ACT_FP16: gl.constexpr, SCALES_AHEAD: gl.constexpr,
          num_warps: gl.constexpr):
    """``acc`` plus the tile at input ``k`` (of the program's first range): packed words ``wp`` ``[word rows,
    BLOCK_N]`` (physical rows; at 3 bits ``[word rows, BLOCK_N, 2]``, each word joined with its high word),
    activation pairs ``xs``, the tile's zero points ``zp`` and (``SCALES_AHEAD``) scales ``sc`` as loaded ahead
    (:func:`_tile_scales`; else the scales load here). ``sz``: the scales' and zeros' pointers, offsets, columns and
    masks, ``(s_ptr, z_ptr, N, s_base, s_cols, s_ok, z_base, z_cols, z_ok, zz)``."""
    s_ptr, z_ptr, N, s_base, s_cols, s_ok, z_base, z_cols, z_ok, zz = sz
    if GROUP != 0 and not SCALES_AHEAD:
        sc = _group_scales(sz, k, GROUP)
    if BITS == 3:
        wlo, whi = gl.split(wp)
    else:
        wlo = wp
        whi = wp
    if len(wlo.shape) == 3:  # the batched mode (an else: the 2-D code would not pass for 3-D tiles)
        acc = _tile_batched(acc, wlo, whi, xs, sc, zp, zz, word_l, a_l, b_l, BITS, GROUP, HAS_ZERO, ACT_FP16)
    else:
        BLOCK_N: gl.constexpr = wlo.shape[1]
        REPS: gl.constexpr = BLOCK_N // (16 * num_warps)
        if HAS_ZERO:
            zz = gl.expand_dims(gl.expand_dims(_zero_pair(zp.to(gl.float32), ACT_FP16, BITS), 1), 2)
        words = logical_words(wlo, word_l, REPS, num_warps)
        hwords = words
        if BITS == 3:
            hwords = logical_words(whi, word_l, REPS, num_warps)
        a = gl.convert_layout(a_halves(words, zz, BITS, ACT_FP16, HAS_ZERO, hwords), a_l)
        b = gl.convert_layout(gl.permute(act_halves(xs, plane_bits(BITS), ACT_FP16), (1, 0)), b_l)
        acc = _mma_scaled(a, b, acc, sc, GROUP)
    return acc


@gluon.jit
def _mma_scaled(a, b, acc, sc, GROUP: gl.constexpr):
    """``acc`` plus the tile's products, times the tile's group scales ``sc`` (per weight row: the accumulator
    without its last axis); per-channel scales (``GROUP == 0``) are applied after the loop."""
    if GROUP == 0:
        acc = mma_v2(a, b, acc)
    else:
        acc = acc + mma_v2(a, b, gl.zeros_like(acc)) * gl.expand_dims(sc.to(gl.float32), len(acc.shape) - 1)
    return acc


@gluon.jit
def _tile_batched(acc, wp, whi, xs, sc, zp, zz, word_l: gl.constexpr, a_l: gl.constexpr, b_l: gl.constexpr,
                  BITS: gl.constexpr, GROUP: gl.constexpr, HAS_ZERO: gl.constexpr, ACT_FP16: gl.constexpr):
    """:func:`_tile` in the batched mode: words ``[W, word rows, PR]`` (and at 3 bits their high words ``whi``),
    activation pairs ``[W, MR, BLOCK_K / 2]``, scales and zero points ``[W, PR]``, accumulator ``[W, PR, MR]``: one
    ``mma`` batch per warp, each over its own slice. The operands are built as for ``W x PR`` rows and ``W x MR``
    activation rows, then split by warp."""
    W: gl.constexpr = wp.shape[0]
    BKW: gl.constexpr = wp.shape[1]
    PR: gl.constexpr = wp.shape[2]
    MR: gl.constexpr = xs.shape[1]
    BK: gl.constexpr = xs.shape[2] * 2
    if HAS_ZERO:
        zz = gl.expand_dims(gl.expand_dims(_zero_pair(zp.to(gl.float32), ACT_FP16, BITS), 2), 3)
    words = logical_words_batched(wp, word_l)
    hwords = words
    if BITS == 3:
        hwords = logical_words_batched(whi, word_l)
    zzb, _ = gl.broadcast(zz, words)
    halves = a_halves(gl.reshape(words, [W * PR, BKW // 4, 4]), gl.reshape(zzb, [W * PR, BKW // 4, 4]), BITS,
                      ACT_FP16, HAS_ZERO, gl.reshape(hwords, [W * PR, BKW // 4, 4]))
    a = gl.convert_layout(gl.reshape(halves, [W, PR, BK]), a_l)
    xh = gl.reshape(act_halves(gl.reshape(xs, [W * MR, BK // 2]), plane_bits(BITS), ACT_FP16), [W, MR, BK])
    b = gl.convert_layout(gl.permute(xh, (0, 2, 1)), b_l)
    return _mma_scaled(a, b, acc, sc, GROUP)


@gluon.jit
def _group_scales(sz, k, GROUP: gl.constexpr):
    """The scales of the group holding input ``k`` of the first range (as loaded)."""
    s_ptr, z_ptr, N, s_base, s_cols, s_ok, z_base, z_cols, z_ok, zz = sz
    return gl.load(s_ptr + ((s_base + k) // GROUP) * N + s_cols, mask=s_ok, other=0.0)


@gluon.jit
def _tile_scales(sz, k, k_end, GROUP: gl.constexpr, HAS_ZERO: gl.constexpr, SCALES_AHEAD: gl.constexpr):
    """The zero points and (``SCALES_AHEAD``) scales of the tile at input ``k`` of the first range, loaded with its
    words, ``STAGES`` tiles ahead of their use; a tile past the range's end re-reads the last group's. Per-channel
    scales (``GROUP == 0``) are applied after the loop: none here.

    Why ahead: the zero points feed the dequantization, and loaded just before it their latency stalled every tile
    (H100, asymmetric W4: 1.10-1.17x median with them ahead). The scales only multiply the tile's sums; ahead they
    paid at 16 activation rows (1.02-1.07x) and cost at 8 (0.96-0.99x, the registers of ``STAGES`` more tiles'
    scales), so the kernel takes them ahead for 16-row tiles only (docs/bench/kernels.md, session 12)."""
    s_ptr, z_ptr, N, s_base, s_cols, s_ok, z_base, z_cols, z_ok, zz = sz
    kc = gl.minimum(k, k_end - 1)
    sc = zz
    if GROUP != 0 and SCALES_AHEAD:
        sc = _group_scales(sz, kc, GROUP)
    zp = sc
    if HAS_ZERO:
        gz = 0 if GROUP == 0 else (z_base + kc) // GROUP
        zp = gl.load(z_ptr + gz * N + z_cols, mask=z_ok, other=0)
    return sc, zp


@gluon.jit
def _words_at(ptrs, k, k_end, kw_end, n_cols, rows, col_ok, BLOCK_K: gl.constexpr, PER: gl.constexpr,
              EVEN_N: gl.constexpr, EVEN_K: gl.constexpr):
    """The word rows of the tile at input ``k`` from a plane of ``n_cols`` columns (see :func:`_tile_words`)."""
    if EVEN_K:  # (an else: the batched mode's tiles, 3-D, are always whole and would not pass the 2-D masks)
        kk = gl.minimum(k, k_end - BLOCK_K)
        if EVEN_N:
            w = gl.load(ptrs + (kk // PER) * n_cols)
        else:
            w = gl.load(ptrs + (kk // PER) * n_cols, mask=col_ok, other=0)
    else:
        w = _load(ptrs, (k // PER) * n_cols, rows, kw_end - k // PER, col_ok, not EVEN_N)
    return w


@gluon.jit
def _high_words(h):
    """3 bits: high words ``[..., BLOCK_N / 2]`` (a column pair's each) -> ``[..., BLOCK_N]``, the odd column's
    shifted right by one (:func:`~auto_quant.kernels.pack.high_bit_position`): the words' layout, no data moved."""
    hx = gl.join(h, h >> 1)
    if len(h.shape) == 3:
        hx = gl.reshape(hx, [h.shape[0], h.shape[1], h.shape[2] * 2])
    else:
        hx = gl.reshape(hx, [h.shape[0], h.shape[1] * 2])
    return hx


@gluon.jit
def _tile_words(src, k, BLOCK_K: gl.constexpr, PER: gl.constexpr, EVEN_N: gl.constexpr, EVEN_K: gl.constexpr,
                BITS: gl.constexpr):
    """The packed words of the tile at input ``k`` of the first range (the pointers add the other slices' offsets):
    nothing read past the range's end ``k_end`` (``kw_end`` in word rows); at 3 bits each joined with its high word
    (``[..., BLOCK_N, 2]``). ``src``: what every tile's loads share, ``(w_ptrs, x_ptrs, k_end, kw_end, N, rows,
    col_ok, m_sub, m_n, kq, (h_ptrs, NH, hrows, hcol_ok))``, the last the 3-bit high words' plane.

    EVEN_K (every tile whole): a tile past the end, loaded ahead and never used, re-reads the range's last tile
    instead (from L1), and rows past M read row M - 1 (the pointers are clamped): no masks, so no registers zeroed
    before the loads; only whole tiles of real rows reach an output that is written."""
    w_ptrs, x_ptrs, k_end, kw_end, N, rows, col_ok, m_sub, m_n, kq, hsrc = src
    w = _words_at(w_ptrs, k, k_end, kw_end, N, rows, col_ok, BLOCK_K, PER, EVEN_N, EVEN_K)
    if BITS == 3:
        h_ptrs, NH, hrows, hcol_ok = hsrc
        h = _words_at(h_ptrs, k, k_end, kw_end, NH, hrows, hcol_ok, BLOCK_K, PER, EVEN_N, EVEN_K)
        w = gl.join(w, gl.convert_layout(_high_words(h), w.type.layout, assert_trivial=True))
    return w


@gluon.jit
def _tile_acts(src, k, BLOCK_K: gl.constexpr, EVEN_K: gl.constexpr):
    """The activation pairs of the tile at input ``k`` (as :func:`_tile_words`)."""
    w_ptrs, x_ptrs, k_end, kw_end, N, rows, col_ok, m_sub, m_n, kq, hsrc = src
    if EVEN_K:
        x = gl.load(x_ptrs + gl.minimum(k, k_end - BLOCK_K) // 2)
    else:
        x = _load(x_ptrs, k // 2, m_sub, m_n, gl.expand_dims(2 * kq < k_end - k, 0), True)  # inputs past the end: 0
    return x


@gluon.jit
def _tile_inputs(src, sz, k, BLOCK_K: gl.constexpr, PER: gl.constexpr, EVEN_N: gl.constexpr, EVEN_K: gl.constexpr,
                 GROUP: gl.constexpr, HAS_ZERO: gl.constexpr, SCALES_AHEAD: gl.constexpr, BITS: gl.constexpr):
    """The packed words, activation pairs, scales and zero points of the tile at input ``k``."""
    k_end = src[2]
    sc, zp = _tile_scales(sz, k, k_end, GROUP, HAS_ZERO, SCALES_AHEAD)
    return _tile_words(src, k, BLOCK_K, PER, EVEN_N, EVEN_K, BITS), _tile_acts(src, k, BLOCK_K, EVEN_K), sc, zp


@gluon.jit
def _tile_then_load(acc, w, x, s, z, k, D: gl.constexpr, src, sz, word_l: gl.constexpr, a_l: gl.constexpr,
                    b_l: gl.constexpr, BITS: gl.constexpr, GROUP: gl.constexpr, HAS_ZERO: gl.constexpr,
                    ACT_FP16: gl.constexpr, SCALES_AHEAD: gl.constexpr, BLOCK_K: gl.constexpr, PER: gl.constexpr,
                    EVEN_N: gl.constexpr, EVEN_K: gl.constexpr, num_warps: gl.constexpr):
    """The tile at input ``k`` added into ``acc``, then its registers loaded with the tile ``D`` inputs on."""
    acc = _tile(acc, w, x, s, z, k, sz, word_l, a_l, b_l, BITS, GROUP, HAS_ZERO, ACT_FP16, SCALES_AHEAD, num_warps)
    w, x, s, z = _tile_inputs(src, sz, k + D, BLOCK_K, PER, EVEN_N, EVEN_K, GROUP, HAS_ZERO, SCALES_AHEAD, BITS)
    return acc, w, x, s, z


@gluon.jit
def _guarded_tile_then_load(guard, BRANCH: gl.constexpr, acc, w, x, s, z, k, D: gl.constexpr, src, sz,
                            word_l: gl.constexpr, a_l: gl.constexpr, b_l: gl.constexpr, BITS: gl.constexpr,
                            GROUP: gl.constexpr, HAS_ZERO: gl.constexpr, ACT_FP16: gl.constexpr,
                            SCALES_AHEAD: gl.constexpr, BLOCK_K: gl.constexpr, PER: gl.constexpr,
                            EVEN_N: gl.constexpr, EVEN_K: gl.constexpr, num_warps: gl.constexpr):
    """:func:`_tile_then_load`, with ``BRANCH`` inside ``if guard`` (an always-true runtime condition: a basic block
    of its own, see the kernel's loop)."""
    if BRANCH:
        if guard:
            acc, w, x, s, z = _tile_then_load(acc, w, x, s, z, k, D, src, sz, word_l, a_l, b_l, BITS, GROUP, HAS_ZERO,
                                              ACT_FP16, SCALES_AHEAD, BLOCK_K, PER, EVEN_N, EVEN_K, num_warps)
    else:
        acc, w, x, s, z = _tile_then_load(acc, w, x, s, z, k, D, src, sz, word_l, a_l, b_l, BITS, GROUP, HAS_ZERO,
                                          ACT_FP16, SCALES_AHEAD, BLOCK_K, PER, EVEN_N, EVEN_K, num_warps)
    return acc, w, x, s, z


@gluon.jit
def _range_cols(c, n0, k_len, PR: gl.constexpr, SLICES: gl.constexpr):
    """Operand row ``c`` in physical order -> (its output column, its K range's offset from the program's first).
    With ``SLICES`` > 1 the warps split K: warp ``c // PR`` takes slice ``c // PR`` of the same ``PR`` columns."""
    if SLICES == 1:
        col = n0 + c
        off = 0
    else:
        col = n0 + c % PR
        off = (c // PR) * k_len
    return col, off


@gluon.jit
def _slice_sum(acc, REPS: gl.constexpr, num_warps: gl.constexpr):
    """Warps split K: ``acc[l, j]`` (``j = slice * MR + m``) holds a product only where ``l``'s warp is ``j``'s slice;
    the ``[PR, MR]`` sum over the slices, rows in physical order (``g * 2 REPS + 2 rep + h``)."""
    BLOCK_N: gl.constexpr = acc.shape[0]
    BLOCK_M: gl.constexpr = acc.shape[1]
    MR: gl.constexpr = BLOCK_M // num_warps
    acc_l: gl.constexpr = acc.type.layout
    w = (gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_l)) // 16) % num_warps
    j = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_l)) // MR
    a = gl.where(gl.expand_dims(w, 1) == gl.expand_dims(j, 0), acc, 0.0)
    a = gl.sum(gl.sum(gl.reshape(a, [REPS, num_warps, 2, 8, num_warps, MR]), axis=4), axis=1)  # [REPS, 2, 8, MR]
    return gl.reshape(gl.permute(a, (2, 0, 1, 3)), [16 * REPS, MR])


@gluon.jit
def _write_slices(acc, out_ptr, b_ptr, n0, m0, M, N, stride_om, REPS: gl.constexpr, HAS_BIAS: gl.constexpr,
                  num_warps: gl.constexpr):
    """The output of a program whose warps split K, plus the bias: the slices summed (:func:`_slice_sum`, or over the
    batch axis of the batched mode's 3-D accumulator, rows in logical order there)."""
    if len(acc.shape) == 3:
        res = gl.sum(acc, axis=0)
        res_l: gl.constexpr = res.type.layout
        o_cols = n0 + _phys_row(gl.arange(0, res.shape[0], layout=gl.SliceLayout(1, res_l)), res.shape[0] // 16, 1)
    else:
        res = _slice_sum(acc, REPS, num_warps)
        res_l: gl.constexpr = res.type.layout
        o_cols = n0 + gl.arange(0, res.shape[0], layout=gl.SliceLayout(1, res_l))
    o_rows = m0 + gl.arange(0, res.shape[1], layout=gl.SliceLayout(0, res_l))
    c_ok = o_cols < N
    if HAS_BIAS:
        res += gl.expand_dims(gl.load(b_ptr + o_cols, mask=c_ok, other=0.0).to(gl.float32), 1)
    gl.store(out_ptr + gl.expand_dims(o_rows, 0) * stride_om + gl.expand_dims(o_cols, 1),
             res.to(out_ptr.dtype.element_ty), mask=gl.expand_dims(c_ok, 1) & gl.expand_dims(o_rows < M, 0))


@gluon.jit
def _batched_inputs(x_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, M, N, n0, m0, k_len, k_end, stride_xm, acc_l: gl.constexpr,
                    load_l: gl.constexpr, word_l: gl.constexpr, x_l: gl.constexpr, hload_l: gl.constexpr,
                    W: gl.constexpr, PR: gl.constexpr, MR: gl.constexpr, BLOCK_K: gl.constexpr, PER: gl.constexpr,
                    BITS: gl.constexpr):
    """The batched mode's ``src`` and ``sz`` (as :func:`_tile_inputs` takes them): warp ``w`` reads slice ``w``
    (inputs ``w * k_len`` on) of the program's ``PR`` weight rows and ``MR`` activation rows; scales and zero points
    ``[W, PR]`` in logical row order. Every tile is whole (the launcher's condition): rows past M read row M - 1."""
    BKW: gl.constexpr = BLOCK_K // PER
    l3: gl.constexpr = gl.SliceLayout(2, load_l)
    sl = gl.arange(0, W, layout=gl.SliceLayout(1, l3))
    rows = gl.arange(0, BKW, layout=gl.SliceLayout(0, l3))
    cols = n0 + gl.arange(0, PR, layout=gl.SliceLayout(0, gl.SliceLayout(1, load_l)))
    w_ptrs = (qw_ptr + gl.expand_dims(gl.expand_dims(sl * ((k_len // PER) * N), 1) + gl.expand_dims(rows, 0) * N, 2)
              + gl.expand_dims(gl.expand_dims(cols, 0), 1))
    col_ok = gl.expand_dims(gl.expand_dims(cols < N, 0), 1)
    x3: gl.constexpr = gl.SliceLayout(2, x_l)
    xs = gl.arange(0, W, layout=gl.SliceLayout(1, x3))
    m_sub = gl.arange(0, MR, layout=gl.SliceLayout(0, x3))
    kq = gl.arange(0, BLOCK_K // 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, x_l)))
    x_rows = gl.expand_dims(xs * (k_len // 2), 1) + gl.expand_dims(gl.minimum(m0 + m_sub, M - 1) * (stride_xm // 2), 0)
    x_ptrs = (x_ptr.to(gl.pointer_type(gl.int32), bitcast=True) + gl.expand_dims(x_rows, 2)
              + gl.expand_dims(gl.expand_dims(kq, 0), 1))
    s2: gl.constexpr = gl.SliceLayout(2, acc_l)
    s_off, s_cols = gl.broadcast(gl.expand_dims(gl.arange(0, W, layout=gl.SliceLayout(1, s2)) * k_len, 1),
                                 gl.expand_dims(n0 + _phys_row(gl.arange(0, PR, layout=gl.SliceLayout(0, s2)),
                                                               PR // 16, 1), 0))
    z2: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, word_l))
    z_off, z_cols = gl.broadcast(gl.expand_dims(gl.arange(0, W, layout=gl.SliceLayout(1, z2)) * k_len, 1),
                                 gl.expand_dims(n0 + _phys_row(gl.arange(0, PR, layout=gl.SliceLayout(0, z2)),
                                                               PR // 16, 1), 0))
    zz = gl.zeros([W, PR, 1, 1], gl.int32, layout=word_l)
    hsrc = (w_ptrs, N, rows, col_ok)
    if BITS == 3:  # the high words of column pairs, as the words
        NH = (N + 1) // 2
        h3: gl.constexpr = gl.SliceLayout(2, hload_l)
        hrows = gl.arange(0, BKW, layout=gl.SliceLayout(0, h3))
        hcols = n0 // 2 + gl.arange(0, PR // 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, hload_l)))
        h_ptrs = (qh_ptr + gl.expand_dims(gl.expand_dims(gl.arange(0, W, layout=gl.SliceLayout(1, h3))
                                                         * ((k_len // PER) * NH), 1) + gl.expand_dims(hrows, 0) * NH, 2)
                  + gl.expand_dims(gl.expand_dims(hcols, 0), 1))
        hsrc = (h_ptrs, NH, hrows, gl.expand_dims(gl.expand_dims(hcols < NH, 0), 1))
    src = (w_ptrs, x_ptrs, k_end, k_end // PER, N, rows, col_ok, m_sub, M - m0, kq, hsrc)
    sz = (s_ptr, z_ptr, N, s_off, s_cols, s_cols < N, z_off, z_cols, z_cols < N, zz)
    return src, sz


@gluon.jit(do_not_specialize=["M_rows"])  # one compile serves every row count of a bucket
def _qmm_mma_kernel(
    x_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
    M_rows, N, K, stride_xm, stride_om, k_range,
    BITS: gl.constexpr, GROUP: gl.constexpr, HAS_ZERO: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr,
    ACT_FP16: gl.constexpr, EVEN_N: gl.constexpr, EVEN_K: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
    BLOCK_K: gl.constexpr, STAGES: gl.constexpr, SLICES: gl.constexpr, BATCHED: gl.constexpr, PDL: gl.constexpr,
    ONE_ROW: gl.constexpr, num_warps: gl.constexpr,
):
    # SLICES == 1: the warps stack along the weight rows (BLOCK_N of them), and the program's BLOCK_M activation rows
    # are the mma's columns. SLICES == num_warps: every warp takes the same BLOCK_N / SLICES weight rows over its own
    # slice of the program's K range, and the mma's 8 columns are BLOCK_M / SLICES activation rows times the slices
    # (column j holds slice j // MR's activations, so a warp's products land in its own slice's columns; at 1 row
    # the columns were idle anyway). The slices are summed once at the end, in the program: the grid fills the GPU
    # without split-K's atomics (SLICES > 1 runs without them: one program per column tile). Every slice is whole
    # (the launcher's condition). BATCHED (with SLICES == num_warps): every warp its own batch of the mma, over its own
    # slice of K, with all BLOCK_M / SLICES activation rows as the mma's columns (no column holds another slice's
    # products, so 8 or 16 rows fit); the slices are summed over the batch axis at the end.
    # 3 bits (BITS == 3): the words are the 2-bit plane's (PB = 2), each with the high word of its column pair
    PB: gl.constexpr = plane_bits(BITS)
    PER: gl.constexpr = 32 // PB
    BKW: gl.constexpr = BLOCK_K // PER
    REPS: gl.constexpr = BLOCK_N // (16 * num_warps)
    PR: gl.constexpr = BLOCK_N // SLICES  # weight rows (output columns) of the program
    MR: gl.constexpr = BLOCK_M // SLICES  # activation rows of the program
    acc_l: gl.constexpr = kernel_layouts(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, PB, BATCHED)[0]
    a_l: gl.constexpr = kernel_layouts(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, PB, BATCHED)[1]
    b_l: gl.constexpr = kernel_layouts(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, PB, BATCHED)[2]
    load_l: gl.constexpr = kernel_layouts(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, PB, BATCHED)[3]
    word_l: gl.constexpr = kernel_layouts(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, PB, BATCHED)[4]
    x_l: gl.constexpr = kernel_layouts(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, PB, BATCHED)[5]
    hload_l: gl.constexpr = kernel_layouts(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, PB, BATCHED)[6]
    zrow_l: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, word_l))
    srow_l: gl.constexpr = gl.SliceLayout(1, acc_l)

    # the row count is not specialized (one compile per row bucket), but one row (decode) is a constant: the 1-row
    # tiles ran 1-5 % slower with a runtime 1 (docs/bench/kernels.md, session 23)
    if ONE_ROW:
        M: gl.constexpr = 1
    else:
        M = M_rows

    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    pid_k = gl.program_id(2)
    n0 = pid_n * PR
    m0 = pid_m * MR
    # k_range: the inputs of a program (SLICES == 1) or of one warp's slice; a program of grid axis 2 takes
    # k_range * SLICES of them
    k_lo = pid_k * (k_range * SLICES)
    if SLICES == 1:
        k_len = gl.minimum(k_range, K - k_lo)
    else:
        k_len = k_range
    k_end = k_lo + k_len  # of the first range
    kw_end = k_end // PER
    n_tiles = gl.cdiv(k_len, BLOCK_K)

    if BATCHED:
        src, sz = _batched_inputs(x_ptr, qw_ptr, qh_ptr, s_ptr, z_ptr, M, N, n0, m0, k_len, k_end, stride_xm, acc_l,
                                  load_l, word_l, x_l, hload_l, SLICES, PR, MR, BLOCK_K, PER, BITS)
        acc = gl.zeros([SLICES, PR, MR], gl.float32, layout=acc_l)
    else:
        rows = gl.arange(0, BKW, layout=gl.SliceLayout(1, load_l))
        cols, w_off = _range_cols(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, load_l)), n0, k_len, PR, SLICES)
        w_ptrs = qw_ptr + gl.expand_dims(rows, 1) * N + gl.expand_dims(cols + (w_off // PER) * N, 0)
        col_ok = gl.expand_dims(cols < N, 0)
        # activations as b32 pairs, [BLOCK_M, BLOCK_K / 2] (row j: activation row j % MR of slice j // MR): rows past M
        # read as 0, and inputs past the range's end unless every tile is whole (EVEN_K)
        x32 = x_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
        xr = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_l))
        kq = gl.arange(0, BLOCK_K // 2, layout=gl.SliceLayout(0, x_l))
        if SLICES == 1:
            m_sub = xr
        else:
            m_sub = xr % MR
        m_row = m0 + m_sub
        if EVEN_K:  # unmasked loads: rows past M read row M - 1 (their outputs are never written)
            m_row = gl.minimum(m_row, M - 1)
        if SLICES == 1:
            x_rows = m_row * (stride_xm // 2)
        else:
            x_rows = m_row * (stride_xm // 2) + ((xr // MR) * k_len) // 2
        x_ptrs = x32 + gl.expand_dims(x_rows, 1) + gl.expand_dims(kq, 0)
        s_cols, s_off = _range_cols(_phys_row(gl.arange(0, BLOCK_N, layout=srow_l), REPS, num_warps), n0, k_len, PR,
                                    SLICES)
        s_ok = s_cols < N
        z_cols, z_off = _range_cols(_phys_row(gl.arange(0, BLOCK_N, layout=zrow_l), REPS, num_warps), n0, k_len, PR,
                                    SLICES)
        z_ok = z_cols < N
        zz = gl.zeros([BLOCK_N, 1, 1], gl.int32, layout=word_l)
        m_n = M - m0
        hsrc = (w_ptrs, N, rows, col_ok)
        if BITS == 3:  # the high words of column pairs, as the words
            NH = (N + 1) // 2
            hrows = gl.arange(0, BKW, layout=gl.SliceLayout(1, hload_l))
            hcols, h_off = _range_cols(gl.arange(0, BLOCK_N // 2, layout=gl.SliceLayout(0, hload_l)), n0 // 2, k_len,
                                       PR // 2, SLICES)
            h_ptrs = qh_ptr + gl.expand_dims(hrows, 1) * NH + gl.expand_dims(hcols + (h_off // PER) * NH, 0)
            hsrc = (h_ptrs, NH, hrows, gl.expand_dims(hcols < NH, 0))

        src = (w_ptrs, x_ptrs, k_end, kw_end, N, rows, col_ok, m_sub, m_n, kq, hsrc)
        sz = (s_ptr, z_ptr, N, s_off, s_cols, s_ok, z_off, z_cols, z_ok, zz)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=acc_l)
    # STAGES tiles in flight (2 or 3): the loop body uses each tile's registers and then reloads them with the tile
    # STAGES further on, so no value moves between registers from one iteration to the next
    D: gl.constexpr = STAGES * BLOCK_K
    SCALES_AHEAD: gl.constexpr = BLOCK_M // SLICES == 16 if BATCHED else BLOCK_M == 16  # see _tile_scales
    # the first tiles' words (the weight, which no kernel writes) are read before waiting for the kernel before this
    # one (PDL: launched early, this program may start while that one still runs); the activations, and every
    # write, after it
    wa = _tile_words(src, k_lo, BLOCK_K, PER, EVEN_N, EVEN_K, BITS)
    sa, za = _tile_scales(sz, k_lo, k_end, GROUP, HAS_ZERO, SCALES_AHEAD)
    wb = _tile_words(src, k_lo + BLOCK_K, BLOCK_K, PER, EVEN_N, EVEN_K, BITS)
    sb, zb = _tile_scales(sz, k_lo + BLOCK_K, k_end, GROUP, HAS_ZERO, SCALES_AHEAD)
    if STAGES == 3:
        wc = _tile_words(src, k_lo + 2 * BLOCK_K, BLOCK_K, PER, EVEN_N, EVEN_K, BITS)
        sc, zc = _tile_scales(sz, k_lo + 2 * BLOCK_K, k_end, GROUP, HAS_ZERO, SCALES_AHEAD)
    if PDL:
        grid_wait()
        grid_launch_dependents()
    xa = _tile_acts(src, k_lo, BLOCK_K, EVEN_K)
    xb = _tile_acts(src, k_lo + BLOCK_K, BLOCK_K, EVEN_K)
    if STAGES == 3:
        xc = _tile_acts(src, k_lo + 2 * BLOCK_K, BLOCK_K, EVEN_K)
    # With 4 warps, a branch between the tiles (always taken; neither compiler can tell): ptxas schedules within a
    # basic block and otherwise sinks every next-tile load below the last tile's mma (sm_90 SASS), so that each
    # iteration starts by waiting on all of them. Split, the loads issue inside their own tile: 1.04-1.21x on the
    # 4-warp tiles of an H100 A/B; with 2 warps the split's registers (167 against 128) cost more resident programs
    # (0.81x), with 8 it was even (0.98-1.02x) (docs/bench/kernels.md, session 18). The third tile's condition differs
    # from the second's so that LLVM does not merge the two blocks back into one.
    SPLIT_LOOP: gl.constexpr = num_warps == 4
    for it in range(n_tiles // STAGES):
        k0 = k_lo + it * D
        acc, wa, xa, sa, za = _tile_then_load(acc, wa, xa, sa, za, k0, D, src, sz, word_l, a_l, b_l, BITS, GROUP,
                                              HAS_ZERO, ACT_FP16, SCALES_AHEAD, BLOCK_K, PER, EVEN_N, EVEN_K, num_warps)
        acc, wb, xb, sb, zb = _guarded_tile_then_load(k0 < K, SPLIT_LOOP, acc, wb, xb, sb, zb, k0 + BLOCK_K, D, src, sz,
                                                      word_l, a_l, b_l, BITS, GROUP, HAS_ZERO, ACT_FP16, SCALES_AHEAD,
                                                      BLOCK_K, PER, EVEN_N, EVEN_K, num_warps)
        if STAGES == 3:
            acc, wc, xc, sc, zc = _guarded_tile_then_load(k0 < K + 1, SPLIT_LOOP, acc, wc, xc, sc, zc, k0 + 2 * BLOCK_K,
                                                          D, src, sz, word_l, a_l, b_l, BITS, GROUP, HAS_ZERO, ACT_FP16,
                                                          SCALES_AHEAD, BLOCK_K, PER, EVEN_N, EVEN_K, num_warps)
    rem = n_tiles % STAGES
    k_rem = k_lo + (n_tiles - rem) * BLOCK_K
    if rem >= 1:
        acc = _tile(acc, wa, xa, sa, za, k_rem, sz, word_l, a_l, b_l, BITS, GROUP, HAS_ZERO, ACT_FP16, SCALES_AHEAD,
                    num_warps)
    if rem >= 2:
        acc = _tile(acc, wb, xb, sb, zb, k_rem + BLOCK_K, sz, word_l, a_l, b_l, BITS, GROUP, HAS_ZERO, ACT_FP16,
                    SCALES_AHEAD, num_warps)
    if GROUP == 0:
        s_ptr, z_ptr, N, s_off, s_cols, s_ok, z_off, z_cols, z_ok, zz = sz
        acc = acc * gl.expand_dims(gl.load(s_ptr + s_cols, mask=s_ok, other=0.0).to(gl.float32), len(acc.shape) - 1)
    if SLICES == 1:
        write_tile(acc, out_ptr, ws_ptr, cnt_ptr, b_ptr, n0, m0, M, N, stride_om, pid_n, pid_m, REPS, HAS_BIAS, SPLIT,
                   num_warps)
    else:
        _write_slices(acc, out_ptr, b_ptr, n0, m0, M, N, stride_om, REPS, HAS_BIAS, num_warps)


def launch_mma(x2, w, bias, cfg, ws, pdl=None, compile_only=False, record=None):
    """Run the kernel on ``x2 [M, K]`` (fp16/bf16, CUDA) for a ``KernelWeight``: ``cfg.kind`` ``mma`` (warps along the
    weight rows, 8 or 16 activation rows per program), ``mma_kw`` (warps split K, ``8 / warps`` rows per program) or
    ``mma_kb`` (warps split K, each its own batch of the mma, 8 or 16 rows per program).
    ``pdl``: launch with programmatic dependent launch (:mod:`~auto_quant.kernels.grid_dependency`); by default
    where :func:`~auto_quant.kernels.grid_dependency.pdl_launch` says so. ``compile_only``: compile, do not run.
    ``record``: a :class:`~auto_quant.kernels.bound_launch.LaunchRecord` the launch appends to."""
    import torch

    M, K = x2.shape
    N = w.out_features
    per = codes_per_row(w.bits)
    slices = cfg.num_warps if cfg.kind in ("mma_kw", "mma_kb") else 1
    block_ok = {"mma": mma_block_ok, "mma_kw": mma_kw_block_ok, "mma_kb": mma_kb_block_ok}[cfg.kind]
    if w.bits not in MMA_BITS:
        raise ValueError(f"the mma kernel serves {MMA_BITS}-bit weights, not {w.bits} bits")
    if not block_ok(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, w.bits, cfg.num_stages):
        raise ValueError(f"the mma kernel cannot take the tile {cfg}")
    if w.group_size != -1 and w.group_size % cfg.block_k:
        raise ValueError(f"the mma kernel needs one group per tile: group size {w.group_size}, block_k {cfg.block_k}")
    if x2.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the mma kernel takes fp16/bf16 activations, not {x2.dtype}")
    if K % per:
        raise ValueError(f"the mma kernel needs in_features % {per} == 0 at {w.bits} bits, not {K}")
    if slices > 1 and cfg.split_k != 1:
        raise ValueError(f"the {cfg.kind} kernel runs without split-K (its warps split K), not split_k={cfg.split_k}")
    k_per_split = mma_k_per_split(K, cfg.block_k, cfg.split_k, slices)
    if k_per_split is None:
        raise ValueError(f"the {cfg.kind} kernel needs whole K slices: in_features {K} is not a multiple of "
                         f"warps x block_k ({cfg.num_warps} x {cfg.block_k}); use an mma tile")
    if x2.stride(1) != 1 or x2.stride(0) % 2 or x2.data_ptr() % 4:
        x2 = x2.clone(memory_format=torch.contiguous_format)  # read as b32 pairs: 4-byte aligned rows
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    pdl = pdl_launch(x2.device, N * K * w.bits // 8, pdl_max_weight_bytes(cfg.kind)) if pdl is None else pdl
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m), triton.cdiv(K, k_per_split))
    acc, cnt = ws.get(x2.device, M * N, grid[0] * grid[1]) if grid[2] > 1 else (out, out)
    kernel_call(_qmm_mma_kernel, grid, compile_only, record)(
        x2, w.qweight, w.high_words, w.scales, w.zeros if w.zeros is not None else w.scales,
        bias if bias is not None else out,
        out, acc, cnt, M, N, K, x2.stride(0), out.stride(0), k_per_split // slices,
        BITS=w.bits, GROUP=0 if w.group_size == -1 else w.group_size, HAS_ZERO=w.zeros is not None,
        HAS_BIAS=bias is not None, SPLIT=split_vector(N, grid[2] > 1), ACT_FP16=x2.dtype == torch.float16,
        EVEN_N=N % cfg.block_n == 0, EVEN_K=K % k_per_split == 0, BLOCK_N=cfg.block_n * slices,
        BLOCK_M=cfg.block_m * slices, BLOCK_K=cfg.block_k, STAGES=cfg.num_stages, SLICES=slices,
        BATCHED=cfg.kind == "mma_kb", PDL=pdl, ONE_ROW=M == 1, num_warps=cfg.num_warps, launch_pdl=pdl,
    )
    return out

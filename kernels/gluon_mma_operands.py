"""The ``mma.sync`` kernels' operands built in registers from packed words and activation pairs (Gluon; used by
:mod:`~auto_quant.kernels.gluon_mma`).

A lane is given whole packed words: word ``t`` of every group of four word rows, whose code pairs
``(i, i + PER/2)`` (one ``lop3`` under a float exponent and one packed ``fma`` each,
:func:`~auto_quant.kernels.dequant_ptx.pair_layout`) are exactly the left operand's pairs once the tile's inputs
are permuted (:func:`a_halves`); the activations are permuted to match (:func:`act_halves`). The functions work
on any number of leading rows, so the kernel's batched mode (a batch per warp) flattens its batch into them.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.constexpr_function
def mma_pair_asm(BITS, ACT_FP16, ZERO, I):
    """PTX for pair ``I`` of a packed word (codes ``I`` and ``I + PER/2``): ``$0`` = the exact ``code - zero`` of
    both as one b32 of halves (:func:`~auto_quant.kernels.dequant_ptx.pair_layout`'s shifts and offsets). The
    asm runs with ``pack=2`` (two halves out), so every input comes twice: the word ``$1``/``$2``, at 3 bits the
    high word ``$3``/``$4``, and with ``ZERO`` None the per-row pair :func:`_zero_pair` after them. The pairs'
    shifted copies of a word repeat across calls; ptxas keeps one."""
    from auto_quant.kernels.dequant_ptx import _REGS, _byte_pair_groups, pair_3bit_lines, pair_layout, pair_lines

    act = "fp16" if ACT_FP16 else "bf16"
    zero = None if ZERO is None else int(ZERO)
    zz_in = "$5" if BITS == 3 else "$3"
    lines = ["{", *_REGS]
    if BITS == 8 and not ACT_FP16:  # each byte under the float32 exponent of 2**23, less 2**23 + zero, both rounded
        zz = "$3" if zero is None else f"0f{0x4B000000 + zero:08X}"  # once into the pair (exact: |code - zero| <= 255)
        lines += [f"prmt.b32 v, $1, 0x4B000000, {0x7440 + I:#06x};", f"prmt.b32 d, $1, 0x4B000000, {0x7442 + I:#06x};",
                  f"sub.f32 v, v, {zz};", f"sub.f32 d, d, {zz};", "cvt.rn.bf16x2.f32 d, d, v;"]
    elif BITS == 8:
        lines += _byte_pair_groups(act, zero, "$1", "$3")[I]
    elif BITS == 3:
        lines += [".reg .b32 hs;", *pair_3bit_lines(act, zero, I, "$1", "$3", zz_in)]
    else:
        sh, s = pair_layout(BITS, act, zero)[I]
        lines.append("mov.b32 src, $1;" if sh == 0 else f"shr.u32 src, $1, {sh};")
        lines += pair_lines(BITS, act, zero, s, zz_in)
    return "\n".join(lines + ["mov.b32 $0, d;", "}"])


@gluon.constexpr_function
def plane_bits(BITS):
    """Bits per code of the packed words the kernels load and permute: 2 for 3-bit weights (their 2-bit plane)."""
    return 2 if BITS == 3 else BITS


@gluon.jit
def _zero_pair(z, ACT_FP16: gl.constexpr, BITS: gl.constexpr):
    """The b32 the dequantization takes for per-row zero points ``z`` (float32): the pair ``-(base + zero)``
    (fp16 base 1024, bf16 128); for bf16 8-bit codes the float32 ``2**23 + zero``."""
    if BITS == 8 and not ACT_FP16:
        return (z + 8388608.0).to(gl.int32, bitcast=True)
    if ACT_FP16:
        h = (-(z + 1024.0)).to(gl.float16)
    else:
        h = (-(z + 128.0)).to(gl.bfloat16)
    return gl.inline_asm_elementwise("mov.b32 $0, {$1, $1};", "=r,h", [h], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _pair(w2, h2, zz2, BITS: gl.constexpr, ACT_FP16: gl.constexpr, HAS_ZERO: gl.constexpr, I: gl.constexpr):
    """Pair ``I`` of every word, ``[BLOCK_N, groups, 4, 2]`` halves from the words (and at 3 bits the high words
    ``h2``) broadcast over the last axis."""
    ASM: gl.constexpr = mma_pair_asm(BITS, ACT_FP16, None if HAS_ZERO else 1 << (BITS - 1), I)
    # int16 halves (one return type for both activation dtypes); the tile is bitcast once built
    if BITS == 3:
        if HAS_ZERO:
            p = gl.inline_asm_elementwise(ASM, "=r,r,r,r,r,r,r", [w2, h2, zz2], dtype=gl.int16, is_pure=True, pack=2)
        else:
            p = gl.inline_asm_elementwise(ASM, "=r,r,r,r,r", [w2, h2], dtype=gl.int16, is_pure=True, pack=2)
    elif HAS_ZERO:
        p = gl.inline_asm_elementwise(ASM, "=r,r,r,r,r", [w2, zz2], dtype=gl.int16, is_pure=True, pack=2)
    else:
        p = gl.inline_asm_elementwise(ASM, "=r,r,r", [w2], dtype=gl.int16, is_pure=True, pack=2)
    return p


@gluon.jit
def a_halves(words, zz, BITS: gl.constexpr, ACT_FP16: gl.constexpr, HAS_ZERO: gl.constexpr, hwords):
    """``[BLOCK_N, groups, 4]`` words -> the ``[BLOCK_N, BLOCK_K]`` left operand's halves, inputs in the tile's order:
    ``k = group * 4 PER + s * 16 + h * 8 + t * 2 + e`` for code ``e * PER/2 + 2 s + h`` of word ``t``. Each pair is
    one b32 out of its asm and stays one operand register (no repacking of halves). At 3 bits ``words`` is the 2-bit
    plane and ``hwords`` (the same shape) each word's high word; other widths ignore ``hwords``."""
    BN: gl.constexpr = words.shape[0]
    G: gl.constexpr = words.shape[1]
    BK: gl.constexpr = G * 4 * (32 // plane_bits(BITS))
    w2 = gl.join(words, words)  # a last axis of two for pack=2 (the same registers)
    h2 = gl.join(hwords, hwords)
    zzb, _ = gl.broadcast(zz, words)
    zz2 = gl.join(zzb, zzb)
    if BITS == 8:
        t = gl.join(_pair(w2, h2, zz2, BITS, ACT_FP16, HAS_ZERO, 0), _pair(w2, h2, zz2, BITS, ACT_FP16, HAS_ZERO, 1))
        tile = gl.reshape(gl.permute(t, (0, 1, 4, 2, 3)), [BN, BK])  # [BN, G, T, E, H] -> [BN, G, H, T, E]
    elif BITS == 4:
        q0 = gl.join(_pair(w2, h2, zz2, BITS, ACT_FP16, HAS_ZERO, 0), _pair(w2, h2, zz2, BITS, ACT_FP16, HAS_ZERO, 1))
        q1 = gl.join(_pair(w2, h2, zz2, BITS, ACT_FP16, HAS_ZERO, 2), _pair(w2, h2, zz2, BITS, ACT_FP16, HAS_ZERO, 3))
        t = gl.join(q0, q1)  # [BN, G, T, E, H, S]
        tile = gl.reshape(gl.permute(t, (0, 1, 5, 4, 2, 3)), [BN, BK])  # -> [BN, G, S, H, T, E]
    else:
        q0 = gl.join(_pair(w2, h2, zz2, BITS, ACT_FP16, HAS_ZERO, 0), _pair(w2, h2, zz2, BITS, ACT_FP16, HAS_ZERO, 1))
        q1 = gl.join(_pair(w2, h2, zz2, BITS, ACT_FP16, HAS_ZERO, 2), _pair(w2, h2, zz2, BITS, ACT_FP16, HAS_ZERO, 3))
        q2 = gl.join(_pair(w2, h2, zz2, BITS, ACT_FP16, HAS_ZERO, 4), _pair(w2, h2, zz2, BITS, ACT_FP16, HAS_ZERO, 5))
        q3 = gl.join(_pair(w2, h2, zz2, BITS, ACT_FP16, HAS_ZERO, 6), _pair(w2, h2, zz2, BITS, ACT_FP16, HAS_ZERO, 7))
        t = gl.join(gl.join(q0, q1), gl.join(q2, q3))  # [BN, G, T, E, H, S_lo, S_hi]
        tile = gl.reshape(gl.permute(t, (0, 1, 6, 5, 4, 2, 3)), [BN, BK])
    if ACT_FP16:
        tile = tile.to(gl.float16, bitcast=True)
    else:
        tile = tile.to(gl.bfloat16, bitcast=True)
    return tile


@gluon.constexpr_function
def x_pair_asm(BITS, SEL):
    """PTX for one word row's activations, ``PER/2`` b32 pairs in (``pack = PER/2``): out ``k`` is the pair
    ``(x[2k + SEL], x[2k + SEL + PER/2])`` (one ``prmt`` of pairs ``k`` and ``k + PER/4``)."""
    q = 32 // BITS // 4  # outputs; inputs follow them
    sel = "0x5410" if SEL == 0 else "0x7632"
    return "\n".join(f"prmt.b32 ${k}, ${q + k}, ${q + k + q}, {sel};" for k in range(q))


@gluon.jit
def _x_pairs(xq, SEL: gl.constexpr, BITS: gl.constexpr):
    """``[BLOCK_M, BLOCK_K / 2]`` b32 pairs -> the same shape of halves, word row by word row: position ``2s + e``
    of a row holds ``x[2s + SEL + e * PER/2]``. The ``pack`` groups one thread's ``PER/2`` consecutive registers,
    which the load layout makes one word row."""
    ASM: gl.constexpr = x_pair_asm(BITS, SEL)
    if BITS == 8:
        return gl.inline_asm_elementwise(ASM, "=r,r,r", [xq], dtype=gl.int16, is_pure=True, pack=2)
    if BITS == 4:
        return gl.inline_asm_elementwise(ASM, "=r,=r,r,r,r,r", [xq], dtype=gl.int16, is_pure=True, pack=4)
    return gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r", [xq], dtype=gl.int16, is_pure=True, pack=8)


@gluon.jit
def act_halves(xq, BITS: gl.constexpr, ACT_FP16: gl.constexpr):
    """``[BLOCK_M, BLOCK_K / 2]`` activation pairs (b32, input order) -> ``[BLOCK_M, BLOCK_K]`` halves in the tile's
    order (:func:`a_halves`): the right operand, transposed."""
    BM: gl.constexpr = xq.shape[0]
    BK: gl.constexpr = xq.shape[1] * 2
    PER: gl.constexpr = 32 // BITS
    G: gl.constexpr = BK // (4 * PER)
    S: gl.constexpr = PER // 4
    h0 = gl.reshape(_x_pairs(xq, 0, BITS), [BM, G, 4, S, 2])  # [M, G, T, S, E]
    h1 = gl.reshape(_x_pairs(xq, 1, BITS), [BM, G, 4, S, 2])
    # [M, G, T, S, E, H] -> [M, G, S, H, T, E]
    t = gl.reshape(gl.permute(gl.join(h0, h1), (0, 1, 3, 5, 2, 4)), [BM, BK])
    if ACT_FP16:
        t = t.to(gl.float16, bitcast=True)
    else:
        t = t.to(gl.bfloat16, bitcast=True)
    return t

"""The PTX the paired kernels run to dequantize packed words (pure Python: strings for ``inline_asm_elementwise``).

Codes ``i`` and ``i + PER/2`` of a word sit 16 bits apart, so one ``lop3`` on a shifted copy of the word puts both
into the mantissas of a half pair under the exponent of ``base`` (fp16 1024, bf16 128) and one packed ``fma`` leaves
the exact ``code - zero`` of both (:func:`pair_layout`, :func:`pair_lines`); 8-bit codes take ``prmt`` s
(:func:`_byte_pair_groups`); 3-bit codes add the third bit from their high word (:func:`pair_3bit_lines`). The
one-row kernels (:mod:`~auto_quant.kernels.triton_gemv`), the ``tdot`` kernel
(:mod:`~auto_quant.kernels.triton_qmm_wt`) and the Gluon ``mma`` kernels
(:mod:`~auto_quant.kernels.gluon_mma_operands`) build their asm from these.
"""

from __future__ import annotations

import functools
import struct

# half-precision formats: mantissa bits, the exponent pattern of ``base`` (fp16 1024, bf16 128), 1.0
_HALF = {"fp16": dict(mant=10, magic=0x6400, base=1024.0, typ="f16x2"),
         "bf16": dict(mant=7, magic=0x4300, base=128.0, typ="bf16x2")}


def _half_bits(v: float, act: str) -> int:
    if act == "bf16":
        return struct.unpack("<I", struct.pack("<f", v))[0] >> 16  # exact for the values used here
    return struct.unpack("<H", struct.pack("<e", v))[0]


def pair_layout(bits: int, act: str, zero: int | None) -> list[tuple[int, int]]:
    """Per pair ``i`` (codes ``i`` and ``i + PER/2``): (right shift of the word, code offset left in place).

    Code ``i`` sits at bit ``bits*i`` and its partner 16 bits higher, so one ``lop3`` on a shifted copy
    of the word takes both into the two lanes' mantissas. A code may stay ``s`` bits up in the mantissa
    (read as ``base + code * 2**s``, rescaled by the ``fma``) while ``(2**bits - 1) * 2**s`` fits it, which
    saves shifts: fp16 4-bit needs one shifted copy per two bytes, bf16 4-bit one per nibble. With
    per-column zeros (``zero=None``) every code is shifted down (one zero term serves every pair).
    """
    mant = _HALF[act]["mant"]
    s_max = bits * ((mant - bits) // bits) if zero is not None else 0
    granule = s_max + bits
    return [((bits * i // granule) * granule, bits * i % granule) for i in range(16 // bits)]


def _byte_pair_groups(act: str, zero: int | None, word: str, zz: str) -> list[list[str]]:
    """8 bits: PTX per pair ``i`` (bytes ``i``, ``i + 2``) leaving the exact packed ``code - zero`` in ``d``.

    fp16: one ``prmt`` puts each byte under the exponent byte 0x64 (``1024 + code``, exact), one packed add
    of ``-(1024 + zero)``. bf16 holds integers only up to 256, so a byte is split into its nibbles: ``lop3``
    makes ``128 + low`` and ``128 + high``, and packed ``fma`` s (sm_80 has no bf16x2 add) combine them:
    ``16 * (128 + high) - 2304 + (128 + low) = code - 128`` for the symmetric zero, every intermediate an
    exact bf16 integer; with per-column zeros ``((16 * high) + low) - zero``, ``zz`` holding ``-zero``.
    Uses registers ``src``, ``v``, ``mul``, ``add`` (and ``fl``, ``fh`` as scratch).
    """
    if act == "fp16":
        add = zz if zero is None else f"{_half_bits(-(1024.0 + zero), 'fp16') * 0x10001:#010x}"
        groups = []
        for i in range(2):
            lines = [f"prmt.b32 v, {word}, 0x64646464, {0x4240 + 0x101 * i:#06x};"]
            if zero is None:
                lines.append(f"add.rn.f16x2 d, v, {add};")
            else:
                lines += [f"mov.b32 add, {add};", "add.rn.f16x2 d, v, add;"]
            groups.append(lines)
        return groups
    bf = lambda v: f"{_half_bits(v, 'bf16') * 0x10001:#010x}"  # noqa: E731
    groups = []
    for i in range(2):
        lo = "mov.b32 src, " + word + ";" if i == 0 else f"shr.u32 src, {word}, 8;"
        lines = [lo, "lop3.b32 v, src, 0x000F000F, 0x43004300, 0xEA;",  # 128 + low nibbles
                 f"shr.u32 src, {word}, {8 * i + 4};", "lop3.b32 fh, src, 0x000F000F, 0x43004300, 0xEA;",  # 128 + high
                 f"mov.b32 mul, {bf(16.0)};"]
        if zero is not None:
            if zero != 128:
                raise ValueError(f"the 8-bit bf16 tile folds the symmetric zero 128, not {zero}")
            lines += [f"mov.b32 add, {bf(-2304.0)};", "fma.rn.bf16x2 fl, fh, mul, add;",  # 16 * high - 256
                      f"mov.b32 mul, {bf(1.0)};", "fma.rn.bf16x2 d, v, mul, fl;"]  # + 128 + low
        else:
            lines += [f"mov.b32 add, {bf(-2048.0)};", "fma.rn.bf16x2 fl, fh, mul, add;",  # 16 * high
                      f"mov.b32 mul, {bf(1.0)};", f"mov.b32 add, {bf(-128.0)};", "fma.rn.bf16x2 v, v, mul, add;",  # low
                      "fma.rn.bf16x2 v, v, mul, fl;",  # the code
                      f"fma.rn.bf16x2 d, v, mul, {zz};"]  # - zero
        groups.append(lines)
    return groups


def _dequant_groups(bits: int, act: str, zero: int | None, word: str, zz: str) -> list[list[str]]:
    """PTX per pair ``i`` leaving the exact packed ``code - zero`` of codes ``i``, ``i + PER/2`` in register ``d``.

    ``word``: the operand holding the packed word; ``zz``: the one holding ``-(base + zero)`` (unused
    when ``zero`` is given: it is folded in). Uses registers ``src``, ``v``, ``mul``, ``add``.
    """
    if bits == 8:
        return _byte_pair_groups(act, zero, word, zz)
    if bits not in (2, 4):
        raise ValueError(f"the paired GEMV takes 2, 4 or 8 bits, not {bits}")
    groups = []
    shift = None
    for sh, s in pair_layout(bits, act, zero):
        lines = []
        if sh != shift:
            lines.append(f"mov.b32 src, {word};" if sh == 0 else f"shr.u32 src, {word}, {sh};")
            shift = sh
        groups.append(lines + pair_lines(bits, act, zero, s, zz))
    return groups


def pair_lines(bits: int, act: str, zero: int | None, s: int, zz: str) -> list[str]:
    """PTX leaving in ``d`` the exact packed ``code - zero`` of the two codes ``s`` bits up in each half of ``src``
    (a shifted copy of the word, :func:`pair_layout`): one ``lop3`` under the exponent and one packed ``fma``.
    ``zz``: the operand holding ``-(base + zero)`` when ``zero`` is None (else folded in)."""
    h = _HALF[act]
    lines = []
    if zero is None:
        add = zz
    else:
        lines.append(f"mov.b32 add, {_half_bits(-(h['base'] * 2.0 ** -s + zero), act) * 0x10001:#010x};")
        add = "add"
    return lines + [f"lop3.b32 v, src, {(((1 << bits) - 1) << s) * 0x10001:#010x}, {h['magic'] * 0x10001:#010x}, 0xEA;",
                    f"mov.b32 mul, {_half_bits(2.0 ** -s, act) * 0x10001:#010x};",
                    f"fma.rn.{h['typ']} d, v, mul, {add};"]


def _sum_lanes(act: str, out: str) -> list[str]:
    """PTX: ``out`` (f32) = lane 0 + lane 1 of the packed accumulator ``acc``."""
    if act == "fp16":
        lines = ["mov.b32 {hl, hh}, acc;", "cvt.f32.f16 fl, hl;", "cvt.f32.f16 fh, hh;"]
    else:
        lines = ["shl.b32 fl, acc, 16;", "and.b32 fh, acc, 0xFFFF0000;"]
    return lines + [f"add.f32 {out}, fl, fh;"]


_REGS = [".reg .b32 src, v, d, acc, mul, add, fl, fh;", ".reg .b16 hl, hh;"]


W8_MAGIC = 8388608.0  # 2**23: the float32 whose low mantissa byte a prmt fills with a code


@functools.cache  # pure; called on every launch
def byte_asm(zero: int | None) -> str:
    """8 bits, PTX for one word: ``$0`` (f32 bits) = sum over its four byte codes of ``x * (code - zero)``.

    One ``prmt`` per code builds the float32 ``2**23 + code`` (byte ``j`` under the exponent byte 0x4B),
    one subtraction leaves ``code - zero`` exactly and one ``fma`` adds its product with the float32
    activation (exact: 8-bit times a half-precision value fits float32): three instructions per weight,
    against about seven for the portable path. Inputs: ``$1`` the word, ``$2..$5`` the float32 activations
    ``x[4r .. 4r+3]`` (b32); for ``zero=None`` then ``$6`` the float32 ``2**23 + zero``.
    """
    zz = "$6" if zero is None else f"0f{struct.unpack('<I', struct.pack('<f', W8_MAGIC + zero))[0]:08X}"
    lines = ["{", ".reg .b32 v0, v1, v2, v3;", ".reg .f32 f0, f1, f2, f3, acc;"]
    lines += [f"prmt.b32 v{j}, $1, 0x4B000000, {0x7440 + j:#06x};" for j in range(4)]
    lines += [f"sub.f32 f{j}, v{j}, {zz};" for j in range(4)]
    lines += ["mul.f32 acc, f0, $2;", "fma.rn.f32 acc, f1, $3, acc;", "fma.rn.f32 acc, f2, $4, acc;",
              "fma.rn.f32 acc, f3, $5, acc;", "mov.b32 $0, acc;", "}"]
    return "\n".join(lines)


@functools.cache  # pure; called on every launch
def pair_asm(bits: int, act: str, zero: int | None) -> str:
    """PTX for one word: ``$0`` (f32 bits) = sum over its codes of ``x * (code - zero)``.

    Inputs: ``$1`` the word, ``$2..`` the activation pairs ``(x[i], x[i + PER/2])`` (b32 each); for
    ``zero=None`` (per-column zeros) then the b32 pair ``-(base + zero)``; a given ``zero`` is folded
    into the code. 8 bits: :func:`byte_asm`.
    """
    if bits == 8:
        return byte_asm(zero)
    n_pairs = 16 // bits
    lines = ["{", *_REGS, "mov.b32 acc, 0x80008000;"]
    for i, group in enumerate(_dequant_groups(bits, act, zero, "$1", f"${2 + n_pairs}")):
        lines += group + [f"fma.rn.{_HALF[act]['typ']} acc, d, ${2 + i}, acc;"]
    return "\n".join(lines + _sum_lanes(act, "$0") + ["}"])


@functools.cache  # pure; called on every launch
def dequant_asm(bits: int, act: str, zero: int | None) -> str:
    """PTX for one word: ``$0..$(PER/2 - 1)`` the packed ``code - zero`` pairs; inputs ``$PER/2`` the word
    and, for ``zero=None``, ``$(PER/2 + 1)`` the pair ``-(base + zero)``."""
    n_pairs = 16 // bits
    lines = ["{", *_REGS]
    for i, group in enumerate(_dequant_groups(bits, act, zero, f"${n_pairs}", f"${n_pairs + 1}")):
        lines += group + [f"mov.b32 ${i}, d;"]
    return "\n".join(lines + ["}"])


@functools.cache  # pure; called on every launch
def dot_asm(bits: int, act: str) -> str:
    """PTX: ``$0`` (f32 bits) = sum of the products of the pairs ``$1..$n`` (``code - zero``) and
    ``$(n+1)..$2n`` (activations), ``n = PER/2``."""
    n = 16 // bits
    lines = ["{", *_REGS, "mov.b32 acc, 0x80008000;"]
    lines += [f"fma.rn.{_HALF[act]['typ']} acc, ${1 + i}, ${1 + n + i}, acc;" for i in range(n)]
    return "\n".join(lines + _sum_lanes(act, "$0") + ["}"])


@functools.cache  # pure; called on every launch
def dequant_constraints(bits: int, zero: int | None) -> str:
    n = 16 // bits
    return ",".join(["=r"] * n + ["r"] * (1 if zero is not None else 2))


@functools.cache  # pure; called on every launch
def dot_constraints(bits: int) -> str:
    return "=r," + ",".join(["r"] * (2 * (16 // bits)))


@functools.cache  # pure; called on every launch
def pair_constraints(bits: int, act: str, zero: int | None) -> str:
    n_in = 1 + (4 if bits == 8 else 16 // bits) + (0 if zero is not None else 1)
    return "=r," + ",".join(["r"] * n_in)


def pair_layout_3bit(act: str, zero: int | None) -> list[tuple[int, int]]:
    """3 bits, per pair ``i`` (codes ``i`` and ``i + 8`` of the 2-bit plane's word): (right shift of the low and high
    words, code offset left in place). As :func:`pair_layout` for the 2-bit plane, with room for the third bit: a
    code may stay ``s`` bits up while ``7 * 2**s`` fits the mantissa."""
    s_max = 2 * ((_HALF[act]["mant"] - 3) // 2) if zero is not None else 0
    granule = s_max + 2
    return [((2 * i // granule) * granule, 2 * i % granule) for i in range(8)]


def pair_3bit_lines(act: str, zero: int | None, i: int, word: str, high: str, zz: str) -> list[str]:
    """PTX for pair ``i`` of a 3-bit word, leaving its exact packed ``code - zero`` in ``d``: the 2-bit plane's pair
    (``word``) as for 2 bits, then its high bits from the column's high word (``high``,
    :func:`~auto_quant.kernels.pack.high_bit_position`) rotated by the same shift, one ``lop3``. Uses register ``hs``
    besides :data:`_REGS`."""
    sh, s = pair_layout_3bit(act, zero)[i]
    lines = pair_lines(2, act, zero, s, zz)
    at = next(k for k, line in enumerate(lines) if line.startswith("lop3")) + 1
    third = ["mov.b32 hs, " + high + ";" if sh == 0 else f"shf.r.wrap.b32 hs, {high}, {high}, {sh};",
             f"lop3.b32 v, v, hs, {(4 << s) * 0x10001:#010x}, 0xF8;"]  # v | (hs & mask)
    return ["mov.b32 src, " + word + ";" if sh == 0 else f"shr.u32 src, {word}, {sh};", *lines[:at], *third,
            *lines[at:]]


@functools.cache  # pure; called on every launch
def dequant3_asm(act: str, zero: int | None) -> str:
    """3 bits, PTX for one word: ``$0..$7`` the packed ``code - zero`` pairs (as :func:`dequant_asm`); inputs ``$8``
    the 2-bit plane's word, ``$9`` its column's high word and, for ``zero=None``, ``$10`` the pair
    ``-(base + zero)``."""
    lines = ["{", *_REGS, ".reg .b32 hs;"]
    for i in range(8):
        lines += pair_3bit_lines(act, zero, i, "$8", "$9", "$10") + [f"mov.b32 ${i}, d;"]
    return "\n".join(lines + ["}"])


@functools.cache  # pure; called on every launch
def dequant3_constraints(zero: int | None) -> str:
    return ",".join(["=r"] * 8 + ["r"] * (2 if zero is not None else 3))

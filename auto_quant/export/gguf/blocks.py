"""GGML block packing from auto_quant's integer weights (pure numpy, no requantization).

Every packer takes the integer form the tuner produced and lays out llama.cpp's bytes for it:
the codes are written as they are, the scales as fp16. ``gguf.quants.dequantize`` of the result
equals the weight auto_quant fake-quantized (tested); for the legacy types it is also
bit-identical to ``gguf.quants.quantize`` of the dequantized weight.

Output of every packer: ``uint8 [rows, row_bytes]``.
"""

from __future__ import annotations

import numpy as np
import torch

from auto_quant.errors import ExportError
from auto_quant.export.gguf.types import TENSOR_TYPES
from auto_quant.quant import QuantizedWeight
from auto_quant.quant.kquant import AffineWeight, KQuantWeight

QK_K = 256


def _np(t: torch.Tensor, dtype=None) -> np.ndarray:
    a = t.detach().cpu().numpy()
    return a if dtype is None else a.astype(dtype)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    """``[..., n]`` float → ``[..., 2n]`` bytes of little-endian fp16."""
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """``[..., 32]`` 4-bit values → ``[..., 16]`` bytes: value j in the low nibble, j + 16 in the high one."""
    return (q[..., :16] & 0xF) | ((q[..., 16:] & 0xF) << 4)


def _rows_blocks(codes: torch.Tensor, block: int) -> np.ndarray:
    c = _np(codes, np.uint8)
    rows, n = c.shape
    return c.reshape(rows, n // block, block)


def _affine(qw: AffineWeight, name: str) -> np.ndarray:
    q = _rows_blocks(qw.codes, 32)
    rows, nb, _ = q.shape
    dv = _np(qw.d.to(torch.float32)).reshape(rows, nb, 1)
    mv = _np(qw.m.to(torch.float32)).reshape(rows, nb, 1)
    dv = np.where((q == 0).all(-1, keepdims=True) & (mv == 0), np.float32(0), dv)  # all-zero block: d = 0
    d = _fp16_bytes(dv)
    m = _fp16_bytes(mv)
    parts = [d, m, _nibbles(q)] if name == "q4_1" else [d, m, _qh32(q), _nibbles(q)]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def _legacy(qw: QuantizedWeight, name: str) -> np.ndarray:
    t = TENSOR_TYPES[name]
    spec = qw.spec
    if spec.group_size != 32:
        raise ExportError(f"{name} needs blocks of 32 weights; got group_size={spec.group_size}")
    q = _rows_blocks(qw.codes, 32)
    rows, nb, _ = q.shape
    scale = _np(qw.scale.to(torch.float32)).reshape(rows, nb, 1)
    zero = _np(qw.zero, np.int32).reshape(rows, nb, 1)
    # a block whose values are all 0 gets the d llama.cpp's quantizer writes (same decoded values):
    # max / -2^(b-1) = -0.0 for Q4_0/Q5_0, +0.0 otherwise
    blank = np.float32(-0.0) if name in ("q4_0", "q5_0") else np.float32(0.0)
    scale = np.where((q == zero).all(-1, keepdims=True), blank, scale)
    d = _fp16_bytes(scale)
    if name in ("q4_0", "q5_0", "q8_0"):
        expect = {"q4_0": 8, "q5_0": 16, "q8_0": 128}[name]
        if not np.all(zero == expect):
            raise ExportError(f"{name} holds symmetric weights with zero {expect}; this weight is not on that grid")
        if name == "q4_0":
            parts = [d, _nibbles(q)]
        elif name == "q5_0":
            parts = [d, _qh32(q), _nibbles(q)]
        else:
            if np.any(q == 0):
                raise ExportError("q8_0 holds levels -127..127; this weight uses -128 (tune with fmt='q8_0')")
            parts = [d, (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    else:  # q4_1 / q5_1: w = d*q + m with m = -zero*scale (fp16)
        m = _fp16_bytes(-zero.astype(np.float32) * scale)
        parts = [d, m, _nibbles(q)] if name == "q4_1" else [d, m, _qh32(q), _nibbles(q)]
    out = np.concatenate(parts, axis=-1)
    assert out.shape[-1] == t.type_size
    return out.reshape(rows, nb * t.type_size)


def _qh32(q: np.ndarray) -> np.ndarray:
    """Fifth bits of 32 values → 4 bytes (little-endian uint32, bit j = value j)."""
    bits = ((q >> 4) & 1).astype(np.uint8)
    return np.packbits(bits, axis=-1, bitorder="little")


# ------------------------------------------------------------------------------------------
# K-quants


def _k_blocks(qw: KQuantWeight):
    q = _rows_blocks(qw.codes, QK_K)
    rows, ns, _ = q.shape
    sub = QK_K // qw.spec.group_size
    sc = _np(qw.sc, np.int32).reshape(rows, ns, sub)
    mins = None if qw.mins is None else _np(qw.mins, np.int32).reshape(rows, ns, sub)
    d = _fp16_bytes(_np(qw.d.to(torch.float32)).reshape(rows, ns, 1))
    dmin = None if qw.dmin is None else _fp16_bytes(_np(qw.dmin.to(torch.float32)).reshape(rows, ns, 1))
    return q, sc, mins, d, dmin, rows, ns


def _scales_6bit_pairs(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 8 six-bit scales and 8 six-bit mins → 12 bytes."""
    s = np.zeros(sc.shape[:-1] + (12,), dtype=np.uint8)
    sc = sc.astype(np.uint8)
    mn = mn.astype(np.uint8)
    s[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    s[..., 4:8] = (mn[..., 0:4] & 63) | ((mn[..., 4:8] >> 4) << 6)
    s[..., 8:12] = (sc[..., 4:8] & 0xF) | ((mn[..., 4:8] & 0xF) << 4)
    return s


def _pack_2bit_128(q: np.ndarray) -> np.ndarray:
    """``[..., 256]`` 2-bit values → 64 bytes: byte ``32h + l`` holds values ``128h + 32k + l`` at bits ``2k``."""
    v = q.reshape(q.shape[:-1] + (2, 4, 32)).astype(np.uint8) & 3
    b = v[..., 0, :] | (v[..., 1, :] << 2) | (v[..., 2, :] << 4) | (v[..., 3, :] << 6)
    return b.reshape(q.shape[:-1] + (64,))


def _pack_4bit_pairs(q: np.ndarray) -> np.ndarray:
    """``[..., 256]`` 4-bit values → 128 bytes: byte ``32c + l`` = value ``64c + l`` | value ``64c + 32 + l`` << 4."""
    v = q.reshape(q.shape[:-1] + (4, 2, 32)).astype(np.uint8) & 0xF
    return (v[..., 0, :] | (v[..., 1, :] << 4)).reshape(q.shape[:-1] + (128,))


def _q2_k(qw: KQuantWeight) -> np.ndarray:
    q, sc, mn, d, dmin, rows, ns = _k_blocks(qw)
    scales = ((sc & 0xF) | ((mn & 0xF) << 4)).astype(np.uint8)
    return np.concatenate([scales, _pack_2bit_128(q), d, dmin], axis=-1).reshape(rows, -1)


def _q3_k(qw: KQuantWeight) -> np.ndarray:
    q, sc, _, d, _, rows, ns = _k_blocks(qw)
    u = (sc + 32).astype(np.uint8)  # stored offset by 32
    scales = np.zeros((rows, ns, 12), dtype=np.uint8)
    for i in range(16):
        scales[..., i % 8] |= (u[..., i] & 0xF) << (4 * (i // 8))
        scales[..., 8 + i % 4] |= (u[..., i] >> 4) << (2 * (i // 4))
    hbit = (q >> 2).astype(np.uint8) & 1  # value 32k + l → bit k of hmask[l]
    hv = hbit.reshape(rows, ns, 8, 32)
    hmask = np.zeros((rows, ns, 32), dtype=np.uint8)
    for k in range(8):
        hmask |= hv[..., k, :] << k
    return np.concatenate([hmask, _pack_2bit_128(q & 3), scales, d], axis=-1).reshape(rows, -1)


def _q4_k(qw: KQuantWeight) -> np.ndarray:
    q, sc, mn, d, dmin, rows, ns = _k_blocks(qw)
    return np.concatenate([d, dmin, _scales_6bit_pairs(sc, mn), _pack_4bit_pairs(q)], axis=-1).reshape(rows, -1)


def _q5_k(qw: KQuantWeight) -> np.ndarray:
    q, sc, mn, d, dmin, rows, ns = _k_blocks(qw)
    hv = ((q >> 4) & 1).astype(np.uint8).reshape(rows, ns, 8, 32)
    qh = np.zeros((rows, ns, 32), dtype=np.uint8)
    for i in range(8):
        qh |= hv[..., i, :] << i
    return np.concatenate([d, dmin, _scales_6bit_pairs(sc, mn), qh, _pack_4bit_pairs(q & 0xF)], axis=-1).reshape(rows, -1)


def _q6_k(qw: KQuantWeight) -> np.ndarray:
    q, sc, _, d, _, rows, ns = _k_blocks(qw)
    v = q.reshape(rows, ns, 2, 4, 32).astype(np.uint8)  # value 128h + 32k + l
    low = v & 0xF
    ql = np.empty((rows, ns, 2, 64), dtype=np.uint8)
    ql[..., 0:32] = low[..., 0, :] | (low[..., 2, :] << 4)
    ql[..., 32:64] = low[..., 1, :] | (low[..., 3, :] << 4)
    hi = (v >> 4) & 3
    qh = hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)
    scales = sc.astype(np.int8).view(np.uint8)
    return np.concatenate([ql.reshape(rows, ns, 128), qh.reshape(rows, ns, 64), scales, d], axis=-1).reshape(rows, -1)


_K_PACKERS = {"q2_k": _q2_k, "q3_k": _q3_k, "q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k}


def pack(qw, type_name: str) -> np.ndarray:
    """Bytes ``[rows, row_bytes]`` of ``qw`` (a QuantizedWeight or KQuantWeight) in ``type_name``."""
    if type_name in _K_PACKERS:
        if not isinstance(qw, KQuantWeight) or qw.spec.fmt != type_name:
            raise ExportError(f"{type_name} blocks need a weight tuned in the {type_name} grid (spec fmt={type_name!r})")
        out = _K_PACKERS[type_name](qw)
    elif isinstance(qw, AffineWeight):
        if type_name not in ("q4_1", "q5_1") or qw.spec.fmt != type_name:
            raise ExportError(f"a weight in the {qw.spec.fmt} grid cannot be written as {type_name}")
        out = _affine(qw, type_name)
    else:
        out = _legacy(qw, type_name)
    return np.ascontiguousarray(out)


def pack_float(w: torch.Tensor, type_name: str) -> np.ndarray:
    """A float tensor in ``f32`` / ``f16`` / ``bf16`` (bf16 rounded to nearest even, as gguf-py does)."""
    a = _np(w.to(torch.float32))
    if type_name == "f32":
        return np.ascontiguousarray(a.astype(np.float32))
    if type_name == "f16":
        return np.ascontiguousarray(a.astype(np.float16))
    if type_name == "bf16":
        import gguf

        return np.ascontiguousarray(gguf.quants.quantize(a.astype(np.float32), gguf.GGMLQuantizationType.BF16))
    raise ExportError(f"{type_name} is not a float type")


def permute_rows(qw, idx: torch.Tensor):
    """The same weight with its output rows reordered (q/k permutation); blocks stay within rows."""
    def p(t):
        return None if t is None else t[idx].contiguous()

    if isinstance(qw, KQuantWeight):
        return KQuantWeight(p(qw.codes), p(qw.sc), p(qw.mins), p(qw.d), p(qw.dmin), qw.spec)
    if isinstance(qw, AffineWeight):
        return AffineWeight(p(qw.codes), p(qw.d), p(qw.m), qw.spec)
    return QuantizedWeight(qw.codes[idx].contiguous(), qw.scale[idx].contiguous(), qw.zero[idx].contiguous(), qw.spec)

"""The weight layout the Triton kernels read, built once at load time (pure torch, no Triton).

``KernelWeight`` holds, for a layer with ``K = in_features`` and ``N = out_features``:

* ``qweight`` int32 ``[ceil(K * bits / 32), N]``: codes packed along K as the little-endian
  bit stream of :mod:`auto_quant.export.packing` (value ``k`` of column ``n`` sits in word
  ``k // (32 // bits)`` at bit ``(k % (32 // bits)) * bits``). For 2/4/8 bits this is exactly
  the GPTQ ``qweight`` of a checkpoint, which is then used as is (no copy). For 3 bits it holds
  the low 2 bits of every code, and ``qweight_hi`` int32 ``[ceil(K / 16), ceil(N / 2)]`` the high
  bits (:func:`pack_high_bits`), so no code straddles two words.
* ``scales`` ``[n_groups, N]`` in the checkpoint's dtype (the checkpoint tensor itself).
* ``zeros`` uint8 ``[n_groups, N]`` true zero points, or None when every zero is
  ``2 ** (bits - 1)`` (symmetric weights), which the kernels then fold into a constant.

Dequantization is ``w[k, n] = (code[k, n] - zero[g, n]) * scale[g, n]`` with ``g = k // group``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from auto_quant.export import packing

KERNEL_BITS = (2, 3, 4, 8)


def codes_per_row(bits: int) -> int:
    """Codes per packed word row in the kernel layout (3 bits: the 2-bit plane's 16)."""
    return 16 if bits == 3 else 32 // bits


@dataclass(frozen=True)
class KernelWeight:
    qweight: torch.Tensor
    qweight_hi: torch.Tensor | None
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int  # -1: per output channel
    in_features: int
    out_features: int

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def high_words(self) -> torch.Tensor:
        """The kernels' high-word pointer argument: the 3-bit high-bit plane, else ``qweight`` (never read)."""
        return self.qweight_hi if self.qweight_hi is not None else self.qweight

    def nbytes(self) -> int:
        """Bytes a matmul must read for the weight (codes, scales, zeros)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.qweight_hi, self.scales, self.zeros)
                   if t is not None)


def high_bit_position(j, column):
    """Where the high bit of code ``j`` (of 16) of a 2-bit word sits in its 3-bit ``qweight_hi`` word: bit
    ``(2 j + 2 + column % 2) % 32``, so the two columns of a word interleave (even bits: even column).

    Why this order: the paired kernels (``mma``, ``tdot``) decode codes ``j`` and ``j + 8`` of a word
    as one pair, with the low bits shifted ``sh`` bits right to sit at bits ``s, s + 1`` and ``s + 16, s + 17``.
    The same right rotation by ``sh`` puts their high bits at ``s + 2`` and ``s + 18``, so one shifted copy of the
    high word serves the pairs that share a shifted copy of the low word, and one more ``lop3`` completes each
    3-bit pair. A right shift by one gives the odd column the even column's order."""
    return (2 * j + 2 + column % 2) % 32


def pack_high_bits(hi: torch.Tensor) -> torch.Tensor:
    """The 3-bit high-bit plane: bits ``hi [K, N]`` (0/1, input-major) -> int32 ``[ceil(K / 16), ceil(N / 2)]``,
    word ``[r, c]`` holding the high bits of inputs ``16 r .. 16 r + 15`` of columns ``2 c`` and ``2 c + 1`` at
    :func:`high_bit_position`."""
    K, N = hi.shape
    h = torch.nn.functional.pad(hi.to(torch.int64) & 1, (0, N % 2, 0, -K % 16))
    h = h.reshape(h.shape[0] // 16, 16, h.shape[1] // 2, 2)  # [r, j, c, column % 2]
    j = torch.arange(16, device=h.device).view(1, 16, 1, 1)
    col = torch.arange(2, device=h.device).view(1, 1, 1, 2)
    words = (h << high_bit_position(j, col)).sum(dim=(1, 3))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_high_bits(qhi: torch.Tensor, K: int, N: int) -> torch.Tensor:
    """:func:`pack_high_bits` undone: int64 bits ``[K, N]``."""
    j = torch.arange(16, device=qhi.device).view(1, 16, 1, 1)
    col = torch.arange(2, device=qhi.device).view(1, 1, 1, 2)
    bits = (qhi.to(torch.int64).view(qhi.shape[0], 1, qhi.shape[1], 1) >> high_bit_position(j, col)) & 1
    return bits.reshape(qhi.shape[0] * 16, qhi.shape[1] * 2)[:K, :N]


def _check(bits: int, group_size: int, in_features: int) -> None:
    if bits not in KERNEL_BITS:
        raise ValueError(f"the Triton kernels serve {KERNEL_BITS} bits, not {bits}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be positive or -1, not {group_size}")


def _zeros_or_none(zero: torch.Tensor, bits: int) -> torch.Tensor | None:
    """``[n_groups, N]`` uint8 zeros, or None when all equal the symmetric zero."""
    if bool((zero == 2 ** (bits - 1)).all()):
        return None
    return zero.t().contiguous().to(torch.uint8)


def pack_codes(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int,
               scale_dtype: torch.dtype | None = None) -> KernelWeight:
    """Kernel layout from the quantization contract's ``codes [N, K]``, ``zero``/``scale [N, n_groups]``."""
    out_f, in_f = codes.shape
    _check(bits, group_size, in_f)
    ct = codes.t().to(torch.int64)
    if bits == 3:
        qweight = packing.pack_bitstream(ct & 3, 2, dim=0)
        qhi = pack_high_bits(ct >> 2)
    else:
        qweight = packing.pack_bitstream(ct, bits, dim=0)
        qhi = None
    scales = scale.t().contiguous()
    if scale_dtype is not None:
        scales = scales.to(scale_dtype)
    return KernelWeight(qweight, qhi, scales, _zeros_or_none(zero, bits), bits, group_size, in_f, out_f)


def from_quant_linear(module) -> KernelWeight:
    """Kernel layout for a :class:`~auto_quant.inference.qlinear.QuantLinear` (reuses its tensors when it can)."""
    from auto_quant.inference.qlinear import LAYOUTS

    family, offset = LAYOUTS[module.layout]
    bits, K = module.bits, module.in_features
    _check(bits, module.group_size, K)
    if family == "gptq" and bits in (2, 4, 8):
        zero = packing.unpack_bitstream(module.qzeros, bits, module.out_features, dim=1)  # [n_groups, N]
        if offset:  # the packing contract's rule for "zero - 1" fields (a wrapped 0 decodes to 0)
            zero = torch.remainder(zero - offset, 2**bits)
        zeros = None if bool((zero == 2 ** (bits - 1)).all()) else zero.to(torch.uint8).contiguous()
        return KernelWeight(module.qweight, None, module.scales, zeros, bits, module.group_size, K,
                            module.out_features)
    codes, zero, scale = module.unpack()
    return pack_codes(codes, zero, scale, bits, module.group_size, scale_dtype=module.scales.dtype)


def dequantize(w: KernelWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference dequantization of the kernel layout: ``W [N, K]`` (pure torch)."""
    K = w.in_features
    if w.bits == 3:
        lo = packing.unpack_bitstream(w.qweight, 2, K, dim=0)
        codes = lo | (unpack_high_bits(w.qweight_hi, K, w.out_features) << 2)
    else:
        codes = packing.unpack_bitstream(w.qweight, w.bits, K, dim=0)  # [K, N]
    gs = K if w.group_size == -1 else w.group_size
    g = torch.arange(K, device=codes.device) // gs
    z = (torch.full_like(w.scales, 2 ** (w.bits - 1), dtype=torch.float32) if w.zeros is None
         else w.zeros.to(torch.float32))
    wt = (codes.to(torch.float32) - z[g]) * w.scales.to(torch.float32)[g]
    return wt.t().contiguous().to(dtype)


def n_groups_for(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(in_features / group_size)

"""The one packing module every exporter and loader uses.

Contract ``auto_quant.pack/2`` (versioned; bump on any change):

* Values are unsigned integers in ``[0, 2**bits - 1]`` (codes, or zero points after any
  format-specific offset has been applied by the caller).
* ``pack_bitstream`` lays values along one dimension as a little-endian bit stream in
  32-bit words: value ``k`` occupies stream bits ``[k*bits, (k+1)*bits)``; stream bit ``b``
  is bit ``b % 32`` of word ``b // 32``. For 2/4/8 bits this is the classic GPTQ layout
  (value ``j`` of a word at bits ``j*bits``); for 3 bits it is GPTQ's 3-bit layout (32 values
  in 3 words); 5 and 6 bits follow the same stream (auto-round's generic layout).
* The packed dimension is zero-padded to a whole number of words; unpacking takes the
  original length.
* Words are stored as ``torch.int32`` (two's complement of the unsigned word).

Zero-point conventions per format (applied by exporters, never here): auto-round's and
GPTQ-v1 "legacy" store ``zero - 1``; GPTQ v2, AWQ, compressed-tensors and auto-round's
plain packing store the true zero.

Layouts (all built on the bit stream above):

* ``gptq``: ``qweight [packed(in), out]`` (codes along the input dimension), ``qzeros
  [n_groups, packed(out)]``, ``scales [n_groups, out]``. Decoding a ``zero - 1`` field adds 1
  modulo ``2**bits``: a legacy writer that wrapped a zero of 0 to ``2**bits - 1`` decodes to 0
  (what its quantizer meant) instead of the out-of-range ``2**bits``.
* ``awq`` (GEMM, 4 bits): ``qweight [in, out/8]`` along the output dimension in AWQ's
  interleaved order, ``qzeros [n_groups, out/8]`` likewise, ``scales [n_groups, out]``.
* ``pack_quantized`` (compressed-tensors): ``weight_packed [out, ceil(in*bits/32)]`` along the
  input dimension, ``weight_zero_point [ceil(out*bits/32), n_groups]`` along the output
  dimension (asymmetric only), ``weight_scale [out, n_groups]``, ``weight_shape = [out, in]``.
  compressed-tensors stores signed values ``q - 2**(bits-1)`` offset back by ``2**(bits-1)``
  before packing, so the packed fields are exactly our unsigned codes and true zeros; the
  stream is truncated to ``ceil(n*bits/32)`` words instead of whole 32-value units.

Sign normalisation (``positive_scales``): full-range symmetric weights have signed scales;
a group with a negative scale is rewritten exactly as ``code' = maxq - code``,
``zero' = maxq - zero``, ``scale' = -scale`` for formats whose consumers expect positive
scales (AWQ). It needs a format that stores zero points.

History: ``/1`` bit stream, gptq and awq layouts. ``/2`` adds ``pack_quantized``,
``positive_scales`` and the modulo rule for ``zero - 1`` decoding.
"""

from __future__ import annotations

import math

import torch

CONTRACT_VERSION = "auto_quant.pack/2"


def values_per_word_unit(bits: int) -> int:
    """Smallest number of values that fills whole 32-bit words."""
    return 32 // math.gcd(bits, 32)


def packed_length(n_values: int, bits: int) -> int:
    """Number of int32 words that hold ``n_values`` values of ``bits`` bits."""
    unit = values_per_word_unit(bits)
    n = -(-n_values // unit) * unit
    return n * bits // 32


def pack_bitstream(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack unsigned ``values`` along ``dim`` into int32 words (see module contract)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits={bits} cannot be packed")
    v = values.movedim(dim, -1).to(torch.int64)
    n = v.shape[-1]
    unit = values_per_word_unit(bits)
    padded = -(-n // unit) * unit
    if padded != n:
        v = torch.nn.functional.pad(v, (0, padded - n))
    v = v & ((1 << bits) - 1)
    lead = v.shape[:-1]
    v = v.reshape(*lead, padded // unit, unit)
    n_words = unit * bits // 32
    pos = torch.arange(unit, device=v.device) * bits  # stream bit of each value in its unit
    word = pos // 32
    off = pos % 32
    out = torch.zeros(*lead, padded // unit, n_words, dtype=torch.int64, device=v.device)
    out.index_add_(-1, word, (v << off) & 0xFFFFFFFF)
    spill = (off + bits) > 32
    if bool(spill.any()):
        idx = torch.nonzero(spill).flatten()
        hi = v[..., idx] >> (32 - off[idx])
        out.index_add_(-1, word[idx] + 1, hi)
    out = out.reshape(*lead, -1)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.movedim(-1, dim).contiguous()


def unpack_bitstream(packed: torch.Tensor, bits: int, length: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_bitstream`; returns int32 values, ``length`` along ``dim``."""
    p = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    lead = p.shape[:-1]
    unit = values_per_word_unit(bits)
    n_words = unit * bits // 32
    p = p.reshape(*lead, -1, n_words)
    pos = torch.arange(unit, device=p.device) * bits
    word = pos // 32
    off = pos % 32
    lo = p[..., word] >> off
    spill = (off + bits) > 32
    if bool(spill.any()):
        nxt = torch.clamp(word + 1, max=n_words - 1)
        hi = (p[..., nxt] << (32 - off)) * spill.to(torch.int64)
        lo = lo | hi
    vals = (lo & ((1 << bits) - 1)).reshape(*lead, -1)[..., :length]
    return vals.to(torch.int32).movedim(-1, dim).contiguous()


# --------------------------------------------------------------------------------------
# Checkpoint layouts built on the bit stream. Every exporter and loader goes through these.
# --------------------------------------------------------------------------------------

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # slot i of a packed word holds column 8*j + AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def pack_gptq(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, bits: int, zero_offset: int = 0,
              scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """GPTQ layout: ``qweight [packed(in), out]`` packed along the input dimension,
    ``qzeros [n_groups, packed(out)]`` and ``scales [n_groups, out]``.

    ``codes`` is ``[out, in]``, ``zero``/``scale`` are ``[out, n_groups]``; the stored zero is
    ``zero + zero_offset`` (``-1`` for GPTQ-v1 / auto-round's ``auto_round:auto_gptq``).
    """
    stored = zero.to(torch.int64) + zero_offset
    if bool((stored < 0).any()) or bool((stored > 2**bits - 1).any()):
        raise ValueError(
            f"zero points do not fit the {bits}-bit field with offset {zero_offset} (a zero of 0 cannot be stored as "
            "zero-1); use a true-zero layout for asymmetric weights"
        )
    return {
        "qweight": pack_bitstream(codes.t(), bits, dim=0),
        "qzeros": pack_bitstream(stored.t(), bits, dim=1),
        "scales": scale.t().contiguous().to(scale_dtype),
    }


def unpack_gptq_zeros(qzeros, bits: int, out_features: int, zero_offset: int = 0) -> torch.Tensor:
    """The true zero points ``[n_groups, out]`` of a GPTQ-layout ``qzeros`` (stored as ``zero - zero_offset``)."""
    zero = unpack_bitstream(qzeros, bits, out_features, dim=1)
    if zero_offset:
        zero = torch.remainder(zero - zero_offset, 2**bits)  # a wrapped legacy zero of 0 decodes to 0
    return zero


def unpack_gptq(qweight, qzeros, scales, bits: int, in_features: int, out_features: int, zero_offset: int = 0):
    """Inverse of :func:`pack_gptq`: ``(codes [out, in], zero [out, n_groups], scale [out, n_groups])``."""
    codes = unpack_bitstream(qweight, bits, in_features, dim=0).t()
    zero = unpack_gptq_zeros(qzeros, bits, out_features, zero_offset).t()
    return codes.contiguous(), zero.contiguous(), scales.t().contiguous()



def dequantize_gptq(qweight, qzeros, scales, bits: int, in_features: int, out_features: int, group_size: int,
                    zero_offset: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight ``[out, in]`` of a GPTQ-layout tensor: ``(code - zero) * scale`` in float32, then ``dtype``.

    Equal, element for element, to dequantizing the output of :func:`unpack_gptq`; for widths that divide
    32 (2, 4, 8 bits) the codes are read with one shift per slot of a word, in the ``[in, out]`` order the
    layout stores them, and zero/scale broadcast per group (no per-column gathers), which is an order of
    magnitude faster on CPU.
    """
    gs = in_features if group_size == -1 else group_size
    if 32 % bits or in_features % gs:
        from auto_quant.quant.integer import dequantize
        from auto_quant.quant.spec import QuantSpec

        codes, zero, scale = unpack_gptq(qweight, qzeros, scales, bits, in_features, out_features, zero_offset)
        return dequantize(codes, scale, zero, QuantSpec(bits, group_size), dtype)
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device).view(1, per_word, 1)
    codes = ((qweight.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1, qweight.shape[-1])[:in_features]
    zero = unpack_gptq_zeros(qzeros, bits, out_features, zero_offset)  # [groups, out]
    groups = in_features // gs
    w = codes.reshape(groups, gs, out_features).to(torch.float32)
    w.sub_(zero.to(torch.float32)[:, None, :]).mul_(scales.to(torch.float32)[:, None, :])
    return w.reshape(in_features, out_features).t().contiguous().to(dtype)

def _awq_permute(x: torch.Tensor, order) -> torch.Tensor:
    n = x.shape[-1]
    pad = (-n) % 8
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    x = x.reshape(*x.shape[:-1], -1, 8)[..., list(order)]
    return x.reshape(*x.shape[:-2], -1)


def pack_awq(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, bits: int = 4,
             scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """AWQ GEMM layout (4 bits): ``qweight [in, out/8]`` packed along the output dimension in
    AWQ's interleaved order, ``qzeros [n_groups, out/8]`` (true zeros), ``scales [n_groups, out]``."""
    if bits != 4:
        raise ValueError("the AWQ GEMM layout holds 4-bit weights only")
    return {
        "qweight": pack_bitstream(_awq_permute(codes.t().to(torch.int64), AWQ_ORDER), 4, dim=1),
        "qzeros": pack_bitstream(_awq_permute(zero.t().to(torch.int64), AWQ_ORDER), 4, dim=1),
        "scales": scale.t().contiguous().to(scale_dtype),
    }


def unpack_awq(qweight, qzeros, scales, in_features: int, out_features: int):
    n_out = qweight.shape[1] * 8
    codes = _awq_permute(unpack_bitstream(qweight, 4, n_out, dim=1), AWQ_REVERSE_ORDER)[:, :out_features].t()
    zero = _awq_permute(unpack_bitstream(qzeros, 4, n_out, dim=1), AWQ_REVERSE_ORDER)[:, :out_features].t()
    return codes.contiguous(), zero.contiguous(), scales.t().contiguous()


# --------------------------------------------------------------------------------------
# compressed-tensors ``pack-quantized`` (llm-compressor's int weight format)
# --------------------------------------------------------------------------------------


def dense_packed_length(n_values: int, bits: int) -> int:
    """compressed-tensors' word count: ``ceil(n * bits / 32)`` (no whole-unit padding)."""
    return -(-n_values * bits // 32)


def pack_pack_quantized(codes: torch.Tensor, zero: torch.Tensor | None, scale: torch.Tensor, bits: int,
                        scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """compressed-tensors ``pack-quantized`` tensors of one layer (see the module contract).

    ``zero`` is None for symmetric weights (their zero must be ``2**(bits-1)``, implied by the
    format); otherwise the true zeros are packed along the output dimension.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"pack-quantized holds 1-8 bit weights, not {bits}")
    out_f, in_f = codes.shape
    out = {
        "weight_packed": pack_bitstream(codes, bits, dim=1)[:, : dense_packed_length(in_f, bits)].contiguous(),
        "weight_scale": scale.contiguous().to(scale_dtype),
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if zero is not None:
        out["weight_zero_point"] = pack_bitstream(zero, bits, dim=0)[: dense_packed_length(out_f, bits)].contiguous()
    return out


def unpack_pack_quantized(t: dict[str, torch.Tensor], bits: int):
    """Inverse of :func:`pack_pack_quantized`: ``(codes [out, in], zero [out, n_groups], scale)``;
    a symmetric layer (no ``weight_zero_point``) gets ``zero = 2**(bits-1)``."""
    out_f, in_f = (int(x) for x in t["weight_shape"].tolist())
    scale = t["weight_scale"]
    wp = t["weight_packed"]
    wp = torch.nn.functional.pad(wp, (0, packed_length(in_f, bits) - wp.shape[1]))
    codes = unpack_bitstream(wp, bits, in_f, dim=1)
    zp = t.get("weight_zero_point")
    if zp is None:
        zero = torch.full(scale.shape, 2 ** (bits - 1), dtype=torch.int32)
    else:
        zp = torch.nn.functional.pad(zp, (0, 0, 0, packed_length(out_f, bits) - zp.shape[0]))
        zero = unpack_bitstream(zp, bits, out_f, dim=0)
    return codes.contiguous(), zero.contiguous(), scale.contiguous()


def positive_scales(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int):
    """The same weights with every scale >= 0 (``w = (code - zero) * scale`` is unchanged).

    A group with a negative scale becomes ``code' = maxq - code``, ``zero' = maxq - zero``,
    ``scale' = -scale``: ``(maxq - c - (maxq - z)) * (-s) = (c - z) * s`` exactly.
    """
    maxq = 2**bits - 1
    neg = scale < 0  # [out, n_groups]
    if not bool(neg.any()):
        return codes, zero, scale
    in_f = codes.shape[1]
    gs = in_f if group_size == -1 else group_size
    col_neg = neg[:, torch.arange(in_f, device=codes.device) // gs]
    codes = torch.where(col_neg, maxq - codes.to(torch.int32), codes.to(torch.int32))
    zero = torch.where(neg, maxq - zero.to(torch.int32), zero.to(torch.int32))
    return codes, zero, torch.where(neg, -scale, scale)

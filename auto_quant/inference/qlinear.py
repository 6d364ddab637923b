"""QuantLinear: a packed integer linear layer; the torch reference backend (dequantize, then matmul)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from auto_quant.export import packing
from auto_quant.quant.integer import dequantize
from auto_quant.quant.spec import QuantSpec

# weights forward_reference dequantizes at a time (64 MiB of float32; the float32 intermediates of the
# dequantization take about 12 bytes a weight)
REFERENCE_CHUNK_WEIGHTS = 1 << 24

# checkpoint layouts a QuantLinear can hold: name -> (packing family, stored zero offset)
LAYOUTS = {
    "gptq": ("gptq", -1),  # GPTQ v1 / auto_round:auto_gptq: zero - 1
    "gptq_v2": ("gptq", 0),  # GPTQ v2 / auto_round plain: true zero
    "awq": ("awq", 0),
}


class QuantLinear(nn.Module):
    """Holds ``qweight``/``qzeros``/``scales``/``bias`` exactly as a checkpoint stores them."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, sym: bool, bias: bool,
                 layout: str = "gptq_v2", scale_dtype: torch.dtype = torch.float16, bias_dtype: torch.dtype = torch.float16,
                 device=None):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.layout = layout
        gs = in_features if group_size == -1 else group_size
        n_groups = math.ceil(in_features / gs)
        family, _ = LAYOUTS[layout]
        if family == "gptq":
            qw_shape = (packing.packed_length(in_features, bits), out_features)
            qz_shape = (n_groups, packing.packed_length(out_features, bits))
        else:
            qw_shape = (in_features, math.ceil(out_features / 8))
            qz_shape = (n_groups, math.ceil(out_features / 8))
        self.register_buffer("qweight", torch.zeros(qw_shape, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(qz_shape, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros((n_groups, out_features), dtype=scale_dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None
        self.backend = "torch"
        self.kernel = None  # set by inference.backends.attach_backends: the chosen backend's prepared layer

    @property
    def weight(self) -> torch.Tensor:
        """An empty stand-in so code that reads ``.weight.dtype``/``.device`` or re-initialises
        sub-module weights (transformers' ``_init_weights``) works; the real weight is packed."""
        t = torch.empty(0, device=self.qweight.device, dtype=self.scales.dtype)
        t._is_hf_initialized = True
        return t

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, layout={self.layout}")

    def unpack(self):
        """``(codes [out, in], zero [out, n_groups], scale [out, n_groups])``."""
        family, offset = LAYOUTS[self.layout]
        if family == "gptq":
            return packing.unpack_gptq(self.qweight, self.qzeros, self.scales, self.bits,
                                       self.in_features, self.out_features, offset)
        return packing.unpack_awq(self.qweight, self.qzeros, self.scales, self.in_features, self.out_features)

    def zero_points(self) -> torch.Tensor:
        """The true integer zero points ``[out, n_groups]``, without unpacking the codes."""
        family, offset = LAYOUTS[self.layout]
        if family == "gptq":
            return packing.unpack_gptq_zeros(self.qzeros, self.bits, self.out_features, offset).t()
        return self.unpack()[1]

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_rows(0, self.out_features, dtype)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``[start, stop)`` of the float weight (``[stop - start, in]``); ``start`` a multiple of 32, where
        every layout's packed zero points (and AWQ's packed codes) begin a whole word."""
        if start % 32 or not 0 <= start < stop <= self.out_features:
            raise ValueError(f"rows [{start}, {stop}) of {self.out_features}: need 0 <= start < stop <= "
                             f"{self.out_features} with start a multiple of 32")
        family, offset = LAYOUTS[self.layout]
        n = stop - start
        if family == "gptq":
            words = slice(start * self.bits // 32, packing.packed_length(stop, self.bits))
            return packing.dequantize_gptq(self.qweight[:, start:stop], self.qzeros[:, words],
                                           self.scales[:, start:stop], self.bits, self.in_features, n,
                                           self.group_size, offset, dtype)
        words = slice(start // 8, -(-stop // 8))
        codes, zero, scale = packing.unpack_awq(self.qweight[:, words], self.qzeros[:, words],
                                                self.scales[:, start:stop], self.in_features, n)
        return dequantize(codes, scale, zero, QuantSpec(self.bits, self.group_size, self.sym), dtype)

    @classmethod
    def from_quantized(cls, qw, bias: torch.Tensor | None, layout: str, bias_dtype=None) -> "QuantLinear":
        out_f, in_f = qw.codes.shape
        spec = qw.spec
        mod = cls(in_f, out_f, spec.bits, spec.group_size, spec.sym, bias is not None, layout=layout,
                  scale_dtype=spec.scale_dtype, bias_dtype=bias_dtype or (bias.dtype if bias is not None else torch.float16))
        family, offset = LAYOUTS[layout]
        if family == "gptq":
            t = packing.pack_gptq(qw.codes, qw.zero, qw.scale, spec.bits, offset, spec.scale_dtype)
        else:
            t = packing.pack_awq(qw.codes, qw.zero, qw.scale, spec.bits, spec.scale_dtype)
        mod.qweight.copy_(t["qweight"])
        mod.qzeros.copy_(t["qzeros"])
        mod.scales.copy_(t["scales"])
        if bias is not None:
            mod.bias.copy_(bias.detach().to(mod.bias.dtype))
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(self, x)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor, chunk_weights: int | None = None) -> torch.Tensor:
        """Dequantize, then ``F.linear``: the exact reference, in slices of output rows for a large weight
        (:func:`linear_in_row_slices`)."""
        return linear_in_row_slices(x, lambda start, stop: self.dequantize_rows(start, stop, x.dtype),
                                    self.out_features, self.in_features, self.bias, chunk_weights)


def linear_in_row_slices(x: torch.Tensor, weight_rows, out_features: int, in_features: int,
                         bias: torch.Tensor | None, chunk_weights: int | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` where ``weight_rows(start, stop)`` makes rows ``[start, stop)`` of ``W`` in ``x``'s
    dtype. A weight of more than ``chunk_weights`` values is made and multiplied in slices of output rows (each
    starting at a multiple of 32), so the float copy in flight stays near ``chunk_weights`` values whatever the
    layer's size: dequantizing a 128256x4096 head at once took about 12 bytes a weight, 6 GB. None:
    ``REFERENCE_CHUNK_WEIGHTS``."""
    b = None if bias is None else bias.to(x.dtype)
    chunk_weights = REFERENCE_CHUNK_WEIGHTS if chunk_weights is None else chunk_weights
    rows = max(32, chunk_weights // max(in_features, 1) // 32 * 32)
    if rows >= out_features:
        return F.linear(x, weight_rows(0, out_features), b)
    out = x.new_empty(*x.shape[:-1], out_features)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        out[..., start:stop] = F.linear(x, weight_rows(start, stop), None if b is None else b[start:stop])
    return out

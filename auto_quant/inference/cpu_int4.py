"""The ``torch_cpu_int4`` backend: PyTorch's native int4 CPU matmul for 2/3/4-bit layers.

``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, scale_and_zero)`` computes
``x @ w.T`` with ``w[n, k] = (q[n, k] - 8) * scale[k // g, n] + zero[k // g, n]`` for 4-bit
codes ``q``, group sizes ``g`` in {32, 64, 128, 256} dividing ``in_features``, and
``out_features`` divisible by 16. Any code of 4 bits or fewer fits, so 2- and 3-bit layers
run through it as well. Our contract ``w = (q - z) * s`` maps onto it with
``zero = (8 - z) * s``; when every ``q - z + 8`` fits in [0, 15] (2/3-bit layers and symmetric
4-bit ones) the zero is folded into the codes instead, so that only the scale is rounded to
bf16 (the kernel keeps scale and zero in bf16). A group size the kernel lacks (512, per-channel, or 128 when
``in_features`` is not a multiple of 128) is split into the largest kernel group that
divides both, repeating its scale and zero.

Only bf16 activations take the fast path in PyTorch (float32 and float16 inputs run a slow
generic loop), so inputs are cast to bf16 and the output back: results differ from the
float32 reference by bf16 rounding (about 3e-3 relative). The packed weight is built once
at load time; the checkpoint buffers stay untouched.
"""

from __future__ import annotations

import torch

KERNEL_GROUPS = (256, 128, 64, 32)


def kernel_group(in_features: int, group_size: int) -> int | None:
    """The kernel group size used for a layer, or None if none fits."""
    g = in_features if group_size == -1 else group_size
    for k in KERNEL_GROUPS:
        if g % k == 0 and in_features % k == 0:
            return k
    return None


def pack_int4_cpu(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, group_size: int):
    """``(packed, scale_and_zero, kernel_group)`` for ``_weight_int4pack_mm_for_cpu``.

    ``codes`` ``[out, in]`` in [0, 15]; ``zero``/``scale`` ``[out, n_groups]`` per the
    quantization contract ``w = (codes - zero) * scale``.
    """
    out_f, in_f = codes.shape
    g = kernel_group(in_f, group_size)
    if g is None or out_f % 16:
        raise ValueError(f"a {out_f}x{in_f} layer with group size {group_size} does not fit the int4 CPU kernel")
    if int(codes.max()) > 15 or int(codes.min()) < 0:
        raise ValueError("codes outside [0, 15] cannot use the int4 CPU kernel")
    gs = in_f if group_size == -1 else group_size
    which = (torch.arange(in_f // g) * g) // gs  # the checkpoint group of each kernel group
    s = scale.to(torch.float32)[:, which]  # [out, in/g]
    z = zero.to(torch.float32)[:, which]
    codes = codes.to(torch.int32)
    if _fits_shifted(codes, zero, gs):
        # fold the zero into the codes (code - zero + 8 stays in [0, 15] for <= 3 bits and symmetric 4 bits):
        # the kernel's zero term is then exactly 0 and only the scale is rounded to bf16
        codes = codes - zero.to(torch.int32).repeat_interleave(gs, dim=1)[:, :in_f] + 8
        z = torch.full_like(z, 8.0)
    sz = torch.stack([s.t(), ((8.0 - z) * s).t()], dim=-1).to(torch.bfloat16).contiguous()  # [in/g, out, 2]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    return packed, sz, g


def _fits_shifted(codes: torch.Tensor, zero: torch.Tensor, gs: int) -> bool:
    shifted = codes - zero.to(torch.int32).repeat_interleave(gs, dim=1)[:, : codes.shape[1]] + 8
    return bool((shifted >= 0).all()) and bool((shifted <= 15).all())


class CpuInt4Linear:
    """A QuantLinear's forward through the int4 CPU kernel."""

    def __init__(self, module):
        codes, zero, scale = module.unpack()
        self.packed, self.scale_and_zero, self.group = pack_int4_cpu(codes, zero, scale, module.group_size)
        self.in_features = module.in_features
        self.out_features = module.out_features
        self.module_bias = module.bias is not None
        self._module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scale_and_zero)
        y = y.to(x.dtype).reshape(*lead, self.out_features)
        bias = self._module.bias
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y


def prepare(module, ctx=None) -> CpuInt4Linear:
    return CpuInt4Linear(module)

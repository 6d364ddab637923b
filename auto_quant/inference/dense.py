"""Dense fallback used by the ``ipex`` and ``hpu`` backends: dequantize once, then matmul.

Both entries are selected only when their packages import (``intel_extension_for_pytorch``,
``habana_frameworks.torch``). IPEX is end-of-life and does not import next to recent torch, and
Gaudi's int4 kernels need its own software stack, so auto_quant does not rely on their
packed-int4 APIs: the layer's weight is dequantized once at load time into the activation
dtype and each forward is the device's own dense matmul. This trades the memory saving for
speed on those devices; every other device keeps the packed weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class DenseLinear:
    def __init__(self, module, dtype: torch.dtype):
        self.weight = module.dequantize_weight(dtype)
        self._module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = self._module.bias
        return F.linear(x, w, None if b is None else b.to(x.dtype))


def prepare(module, ctx=None) -> DenseLinear:
    dtype = getattr(ctx, "act_dtype", None) or torch.float32
    return DenseLinear(module, dtype)

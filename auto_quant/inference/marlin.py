"""The ``marlin`` backend: Marlin kernels from GPTQModel (preferred) or vLLM, when installed.

Neither package is a dependency of auto_quant and neither is installed in its CI, so this
adapter is exercised only where one of them is present. It serves symmetric 4/8-bit
GPTQ-layout layers with group sizes -1/32/64/128, ``in_features % 128 == 0`` and
``out_features % 64 == 0`` (the registry entry declares exactly that). The checkpoint's
``qweight`` (codes packed along the input dimension, 32/bits per int32) is what both
packages' ``gptq_marlin_repack`` reads; scales are permuted by their own helpers.
"""

from __future__ import annotations

import importlib.util

import torch


class _GptqModelMarlin:
    def __init__(self, module, dtype: torch.dtype):
        from gptqmodel.nn_modules.qlinear.marlin import MarlinQuantLinear

        dev = module.qweight.device
        m = MarlinQuantLinear(bits=module.bits, group_size=module.group_size, desc_act=False, sym=True,
                              in_features=module.in_features, out_features=module.out_features,
                              bias=module.bias is not None)
        m = m.to(dev)
        with torch.no_grad():
            m.qweight.data = module.qweight.detach().clone()
            m.scales.data = module.scales.detach().to(dtype).clone()
            m.g_idx.data = (torch.arange(module.in_features, device=dev, dtype=torch.int32)
                            // (module.in_features if module.group_size == -1 else module.group_size))
            if module.bias is not None:
                m.bias = module.bias.detach().to(dtype).clone()
        m.post_init()
        self.layer = m

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.layer(x.reshape(-1, x.shape[-1]))
        return y.reshape(*lead, y.shape[-1])


class _VllmMarlin:
    def __init__(self, module, dtype: torch.dtype):
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.quantization.utils import marlin_utils as mu
        from vllm.scalar_type import scalar_types

        dev = module.qweight.device
        self.mu = mu
        self.in_features, self.out_features = module.in_features, module.out_features
        gs = module.in_features if module.group_size == -1 else module.group_size
        empty = mu.marlin_make_empty_g_idx(dev)
        self.empty = empty
        self.workspace = mu.marlin_make_workspace_new(dev)
        self.qweight = ops.gptq_marlin_repack(module.qweight.contiguous(), perm=empty, size_k=module.in_features,
                                              size_n=module.out_features, num_bits=module.bits)
        self.scales = mu.marlin_permute_scales(module.scales.to(dtype).contiguous(), size_k=module.in_features,
                                               size_n=module.out_features,
                                               group_size=-1 if module.group_size == -1 else gs)
        self.bias = None if module.bias is None else module.bias.to(dtype)
        self.wtype = scalar_types.uint4b8 if module.bits == 4 else scalar_types.uint8b128

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.mu.apply_gptq_marlin_linear(
            input=x.reshape(-1, self.in_features), weight=self.qweight, weight_scale=self.scales, weight_zp=self.empty,
            g_idx=self.empty, g_idx_sort_indices=self.empty, workspace=self.workspace, wtype=self.wtype,
            output_size_per_partition=self.out_features, input_size_per_partition=self.in_features, is_k_full=True,
            bias=self.bias)
        return y.reshape(*lead, self.out_features)


def prepare(module, ctx=None):
    dtype = getattr(ctx, "act_dtype", None) or torch.float16
    if importlib.util.find_spec("gptqmodel") is not None:
        return _GptqModelMarlin(module, dtype)
    return _VllmMarlin(module, dtype)

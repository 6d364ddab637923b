"""The ``auto_awq`` format: AWQ GEMM checkpoints for transformers (through GPTQModel), vLLM,
SGLang and AutoAWQ.

Layout (``export.packing`` ``awq``): ``qweight [in, out/8]`` packed along the output
dimension in AWQ's interleaved order, ``qzeros`` (true zero points, same order), float16
``scales [n_groups, out]``. 4 bits only: the AWQ GEMM kernels of transformers / vLLM read
nothing else.

AWQ stores a zero point per group and its consumers expect positive scales, so
auto_quant's full-range symmetric groups with a negative scale are rewritten exactly with
``packing.positive_scales`` (``code' = 15 - code``, ``zero' = 15 - zero``). Layers kept in 16
bits and the output head go to ``modules_to_not_convert``; a quantized head is written
dequantized (AWQ loaders do not quantize heads).
"""

from __future__ import annotations

from pathlib import Path

import torch

from auto_quant.export import packing
from auto_quant.export.base import ExportContext
from auto_quant.export.packed_common import (
    IntCapabilities,
    float_layers_in_blocks,
    provenance,
    refuse_conv1d,
    scales_fp16,
    split_layers,
    uniform_spec,
    write_checkpoint,
)

AWQ_GROUP_SIZES = frozenset({-1, 16, 32, 64, 128})


def awq_quantization_config(ctx: ExportContext, spec, not_converted: list[str]) -> dict:
    return {
        "quant_method": "awq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": sorted(not_converted) or None,
        "quantizer": provenance(ctx)["quantizer"],
        "packing_contract": packing.CONTRACT_VERSION,
    }


class AwqExporter:
    name = "auto_awq"
    capabilities = IntCapabilities(
        bits=frozenset({4}),
        group_sizes=AWQ_GROUP_SIZES,
        mixed=False,
        note="AWQ GEMM kernels (transformers, vLLM, AutoAWQ) read 4-bit weights only; use auto_gptq or auto_round "
             "for other bit widths",
    )

    def write(self, ctx: ExportContext, out_dir: Path) -> None:
        packed, dense = split_layers(ctx, self.name)
        refuse_conv1d(packed, self.name)
        spec = uniform_spec(packed, self.name)
        tensors: dict[str, torch.Tensor] = {}
        for name, q in packed.items():
            qw = q.weight
            codes, zero, scale = packing.positive_scales(qw.codes, qw.zero, scales_fp16(qw.scale, name, self.name),
                                                         spec.bits, spec.group_size)
            for k, v in packing.pack_awq(codes, zero, scale, spec.bits, torch.float16).items():
                tensors[f"{name}.{k}"] = v
        not_converted = float_layers_in_blocks(ctx) + dense
        qc = awq_quantization_config(ctx, spec, not_converted)
        write_checkpoint(ctx, out_dir, tensors, packed, dense, qc)

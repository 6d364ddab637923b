"""The ``llm_compressor`` format: compressed-tensors ``pack-quantized`` (W4A16 / W8A16 and other
integer weight-only schemes), loaded by transformers' compressed-tensors integration and vLLM.

Layout (``export.packing`` ``pack_quantized``): ``weight_packed [out, ceil(in*bits/32)]``,
``weight_scale [out, n_groups]``, ``weight_shape``, and for asymmetric weights
``weight_zero_point`` packed along the output dimension. compressed-tensors' symmetric
scheme is ``w = (code - 2**(bits-1)) * scale`` with an implied zero, exactly auto_quant's
full-range symmetric contract, signed scales included (its dequantization multiplies).

Per-layer settings are held: each distinct (bits, group size, sym) becomes one
``config_groups`` entry that targets its layers by name (one setting targets ``Linear``);
every other Linear (16-bit layers, the output head) is listed in ``ignore``. A quantized
output head is written dequantized, as for GPTQ/AWQ. vLLM serves 4- and 8-bit weights of
this format; transformers decodes 2-8 bits.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from auto_quant.export import packing
from auto_quant.export.base import ExportContext
from auto_quant.export.packed_common import (
    IntCapabilities,
    provenance,
    refuse_conv1d,
    split_layers,
    write_checkpoint,
)

log = logging.getLogger(__name__)

VLLM_BITS = (4, 8)


def weights_args(spec) -> dict:
    out = {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.sym,
        "strategy": "channel" if spec.group_size == -1 else "group",
        "group_size": None if spec.group_size == -1 else spec.group_size,
        "dynamic": False,
    }
    return out


def ct_quantization_config(ctx: ExportContext, packed: dict, ignore: list[str]) -> dict:
    by_spec: dict[tuple, list[str]] = {}
    specs = {}
    for name, q in packed.items():
        s = q.weight.spec
        key = (s.bits, s.group_size, s.sym)
        by_spec.setdefault(key, []).append(name)
        specs[key] = s
    single = len(by_spec) == 1
    groups = {}
    for i, (key, names) in enumerate(sorted(by_spec.items(), key=lambda kv: -len(kv[1]))):
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if single else sorted(names),
            "weights": weights_args(specs[key]),
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "provenance": provenance(ctx),
    }


class LlmCompressorExporter:
    name = "llm_compressor"
    capabilities = IntCapabilities(
        bits=frozenset({2, 3, 4, 5, 6, 8}),
        note="compressed-tensors pack-quantized holds 1-8 bit integer weights",
    )

    def write(self, ctx: ExportContext, out_dir: Path) -> None:
        packed, dense = split_layers(ctx, self.name)
        refuse_conv1d(packed, self.name)
        odd = sorted({q.weight.spec.bits for q in packed.values()} - set(VLLM_BITS))
        if odd:
            log.warning("llm_compressor: %s-bit layers load in transformers but vLLM serves only 4- and 8-bit "
                        "weights of this format", odd)
        tensors: dict[str, torch.Tensor] = {}
        for name, q in packed.items():
            qw = q.weight
            s = qw.spec
            t = packing.pack_pack_quantized(qw.codes, None if s.sym else qw.zero, qw.scale, s.bits, s.scale_dtype)
            for k, v in t.items():
                tensors[f"{name}.{k}"] = v
        ignore = [n for n, m in ctx.model.named_modules() if isinstance(m, nn.Linear) and n not in packed]
        write_checkpoint(ctx, out_dir, tensors, packed, dense, ct_quantization_config(ctx, packed, ignore))

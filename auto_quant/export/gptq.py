"""The ``auto_gptq`` format: GPTQ checkpoints for transformers (optimum + GPTQModel), GPTQModel,
vLLM and SGLang.

Layout (``export.packing`` ``gptq``): ``qweight`` int32 packed along the input dimension,
``qzeros``, float16 ``scales``, ``g_idx = i // group_size`` (no act-order), ``bias``.

* Symmetric weights are written as legacy GPTQ (``checkpoint_format: gptq``, stored zero =
  zero - 1 = ``2**(bits-1) - 1``) which every GPTQ loader reads. auto_quant's full-range
  symmetric scales are signed; GPTQ kernels compute ``(code - zero) * scale`` and take the
  sign as it is (checked against GPTQModel's kernels in tests/test_formats_gptq_awq.py).
* Asymmetric weights are written as ``checkpoint_format: gptq_v2`` (true zeros), never the
  legacy "zero - 1" storage that wraps an asymmetric zero of 0 to ``2**bits - 1``. Loaders
  that only read legacy GPTQ (old AutoGPTQ, some vLLM kernels) refuse v2; use symmetric
  quantization for them.
* One bits / group size / sym for all packed layers: transformers' GPTQ path applies one
  setting to the whole model. Layers kept in 16 bits inside the blocks are listed in
  ``modules_in_block_to_quantize`` (transformers/optimum) and as negative ``dynamic`` rules
  (GPTQModel). A quantized output head is written dequantized (transformers' GPTQ path does
  not quantize heads).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from auto_quant.export import packing
from auto_quant.export.base import ExportContext
from auto_quant.export.packed_common import (
    IntCapabilities,
    float_layers_in_blocks,
    provenance,
    scales_fp16,
    split_layers,
    uniform_spec,
    write_checkpoint,
)

GPTQ_BITS = frozenset({2, 3, 4, 8})
GPTQ_GROUP_SIZES = frozenset({-1, 16, 32, 64, 128, 256, 512, 1024})


def g_idx(in_features: int, group_size: int) -> torch.Tensor:
    gs = in_features if group_size == -1 else group_size
    return (torch.arange(in_features) // gs).to(torch.int32)


def gptq_quantization_config(ctx: ExportContext, spec, checkpoint_format: str, packed_names: list[str]) -> dict:
    qc = {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "desc_act": False,
        "sym": spec.sym,
        "lm_head": False,
        "format": checkpoint_format,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "true_sequential": True,
        "damp_percent": 0.01,
        "static_groups": False,
        "block_name_to_quantize": ctx.block_names[0] if len(ctx.block_names) == 1 else ",".join(ctx.block_names),
        "meta": provenance(ctx),
    }
    skipped = float_layers_in_blocks(ctx)
    if skipped:
        qc["modules_in_block_to_quantize"] = [sorted(packed_names)]
        qc["dynamic"] = {f"-:^{re.escape(n)}$": {} for n in skipped}
    return qc


class GptqExporter:
    name = "auto_gptq"
    capabilities = IntCapabilities(
        bits=GPTQ_BITS,
        group_sizes=GPTQ_GROUP_SIZES,
        mixed=False,
        note="GPTQ loaders (transformers, GPTQModel, vLLM) read 2/3/4/8 bits; use auto_round for 5/6 bits",
    )

    def write(self, ctx: ExportContext, out_dir: Path) -> None:
        packed, dense = split_layers(ctx, self.name)
        spec = uniform_spec(packed, self.name)
        checkpoint_format = "gptq" if spec.sym else "gptq_v2"
        offset = -1 if spec.sym else 0
        tensors: dict[str, torch.Tensor] = {}
        for name, q in packed.items():
            qw = q.weight
            t = packing.pack_gptq(qw.codes, qw.zero, scales_fp16(qw.scale, name, self.name), spec.bits, offset,
                                  torch.float16)
            for k, v in t.items():
                tensors[f"{name}.{k}"] = v
            tensors[f"{name}.g_idx"] = g_idx(qw.codes.shape[1], spec.group_size)
        qc = gptq_quantization_config(ctx, spec, checkpoint_format, list(packed))
        write_checkpoint(ctx, out_dir, tensors, packed, dense, qc)
        with open(out_dir / "quantize_config.json", "w") as f:  # GPTQModel's / AutoGPTQ's own config file
            json.dump(qc, f, indent=2)

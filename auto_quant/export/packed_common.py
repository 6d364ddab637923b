"""What the GPTQ, AWQ and compressed-tensors exporters share: integer-only capabilities,
splitting layers into packed / dense, and writing the finished checkpoint."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from auto_quant import __version__
from auto_quant.errors import ExportError
from auto_quant.export import packing
from auto_quant.export.base import (
    Capabilities,
    ExportContext,
    QuantizedLayer,
    float_state_dict,
    save_config_and_tokenizer,
    save_safetensors_shards,
)
from auto_quant.models.discovery import tied_lm_head
from auto_quant.models.naming import checkpoint_names
from auto_quant.quant import QuantSpec

log = logging.getLogger(__name__)

_IN_BLOCK = re.compile(r"\.\d+\.")  # "model.layers.3.mlp.up_proj": inside a repeated block


def looks_in_block(name: str) -> bool:
    return _IN_BLOCK.search(name) is not None


@dataclass(frozen=True)
class IntCapabilities(Capabilities):
    """Integer-grid formats whose loaders quantize only the layers of the repeated blocks.

    Quantized layers outside the blocks (the output head) are written as their dequantized
    16-bit weights, which decode identically; so they are not held against bits / group
    size / mixing here.
    """

    def check(self, fmt: str, specs: dict[str, QuantSpec | None]) -> None:
        for name, s in specs.items():
            if s is not None and getattr(s, "fmt", "int") != "int":
                raise ExportError(
                    f"format {fmt!r} holds integer weights; layer {name} uses llama.cpp's {s.fmt} grid. Quantize "
                    "with the integer scheme (no gguf recipe) for this format, or export that model as gguf"
                )
        super().check(fmt, {n: s for n, s in specs.items() if looks_in_block(n)})


def in_blocks(ctx: ExportContext, name: str) -> bool:
    return any(name.startswith(b + ".") for b in ctx.block_names)


def split_layers(ctx: ExportContext, fmt: str) -> tuple[dict[str, QuantizedLayer], list[str]]:
    """``(packed layers inside the blocks, quantized layers outside them written dense)``."""
    packed = {n: q for n, q in ctx.layers.items() if in_blocks(ctx, n)}
    dense = [n for n in ctx.layers if n not in packed]
    for n in dense:
        log.warning("%s: %s is written as its dequantized 16-bit weight (the format's loaders quantize only the "
                    "repeated blocks); it decodes identically but is not smaller", fmt, n)
    if not packed:
        raise ExportError(f"format {fmt!r}: no quantized layer inside the model's blocks; nothing to pack")
    return packed, dense


def float_layers_in_blocks(ctx: ExportContext) -> list[str]:
    """Candidate layers inside the blocks kept in 16 bits (a loader must not convert them)."""
    return [n for n, s in ctx.specs.items() if s is None and in_blocks(ctx, n)]


def uniform_spec(packed: dict[str, QuantizedLayer], fmt: str) -> QuantSpec:
    specs = {(q.weight.spec.bits, q.weight.spec.group_size, q.weight.spec.sym): q.weight.spec for q in packed.values()}
    if len(specs) > 1:
        raise ExportError(
            f"format {fmt!r} holds one bits/group_size/sym setting for all layers, this model has "
            f"{sorted(specs)}; export it as auto_round or llm_compressor (which hold per-layer settings)"
        )
    return next(iter(specs.values()))


def refuse_conv1d(packed: dict[str, QuantizedLayer], fmt: str) -> None:
    conv = [n for n, q in packed.items() if q.kind != "linear"]
    if conv:
        raise ExportError(f"format {fmt!r}: its loaders replace nn.Linear layers only, and {conv[0]} is a "
                          "GPT-2 style Conv1D; export this model as auto_round or auto_gptq")


def scales_fp16(scale: torch.Tensor, name: str, fmt: str) -> torch.Tensor:
    """Scales as float16 (what these formats store); warns when that is not exact."""
    s16 = scale.to(torch.float16)
    if scale.dtype != torch.float16 and not torch.equal(s16.to(scale.dtype), scale):
        log.warning("%s: %s's %s scales are not exactly representable in float16; the checkpoint decodes "
                    "marginally differently from the tuned model", fmt, name, scale.dtype)
    return s16


def provenance(ctx: ExportContext) -> dict:
    return {"quantizer": [f"auto_quant:{__version__}"], "packing_contract": packing.CONTRACT_VERSION,
            **{k: v for k, v in ctx.tuning.items() if v is not None}}


def write_checkpoint(ctx: ExportContext, out_dir: Path, packed_tensors: dict[str, torch.Tensor],
                     packed: dict[str, QuantizedLayer], dense: list[str], quantization_config: dict) -> None:
    """Float tensors (dense layers included) + packed tensors, then config and tokenizer."""
    tensors = float_state_dict(ctx.model, set(packed))
    overlap = set(tensors) & set(packed_tensors)
    if overlap:
        raise ExportError(f"internal: packed tensor names collide with float ones: {sorted(overlap)[:3]}")
    tensors.update(packed_tensors)
    for name, q in packed.items():
        if q.bias is not None:
            tensors[f"{name}.bias"] = q.bias.detach().cpu().contiguous()
    untie = bool(dense) and tied_lm_head(ctx.model)
    save_safetensors_shards(tensors, out_dir, metadata={"quantizer": "auto_quant", "packing": packing.CONTRACT_VERSION},
                            rename=checkpoint_names(ctx.model))
    save_config_and_tokenizer(ctx, out_dir, quantization_config, untie_lm_head=untie)

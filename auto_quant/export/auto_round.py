"""The ``auto_round`` format: interchangeable with Intel auto-round (``quant_method: auto-round``).

Packing follows auto-round's conventions: when every quantized layer is symmetric the
checkpoint uses ``packing_format: auto_round:auto_gptq`` (GPTQ layout, stored zero = zero-1,
which every GPTQ loader reads); otherwise ``auto_round`` (GPTQ layout with true zeros), so
an asymmetric zero of 0 is never wrapped.
"""

from __future__ import annotations

from pathlib import Path

from auto_quant import __version__
from auto_quant.export import packing
from auto_quant.export.base import (
    Capabilities,
    ExportContext,
    float_state_dict,
    save_config_and_tokenizer,
    save_safetensors_shards,
)
from auto_quant.models.discovery import tied_lm_head
from auto_quant.models.naming import checkpoint_names
from auto_quant.quant.spec import scale_dtype_name

PACKING_SYM = "auto_round:auto_gptq"
PACKING_TRUE_ZERO = "auto_round"
_TORCH_DTYPE_NAMES = {"fp16": "torch.float16", "bf16": "torch.bfloat16", "fp32": "torch.float32"}


def layer_entry(spec) -> dict:
    if spec is None:
        return {"bits": 16, "data_type": "float"}
    return {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym, "data_type": "int"}


def auto_round_quantization_config(ctx: ExportContext, packing_format: str) -> dict:
    s = ctx.scheme
    base = layer_entry(s)
    extra = {}
    for name, spec in ctx.specs.items():
        entry = layer_entry(spec)
        in_block = any(name.startswith(b + ".") for b in ctx.block_names)
        if not in_block:
            if spec is not None:
                extra[name] = entry
            continue
        diff = {k: v for k, v in entry.items() if base.get(k) != v}
        if diff:
            extra[name] = diff
    qc = {
        "quant_method": "auto-round",
        "bits": s.bits,
        "group_size": s.group_size,
        "sym": s.sym,
        "data_type": "int",
        "act_bits": 16,
        "packing_format": packing_format,
        "block_name_to_quantize": ",".join(ctx.block_names),
        "scale_dtype": _TORCH_DTYPE_NAMES[scale_dtype_name(s.scale_dtype)],
        "autoround_version": "0.16.1",
        "quantizer": f"auto_quant {__version__}",
        "packing_contract": packing.CONTRACT_VERSION,
    }
    for k in ("iters", "nsamples", "seqlen", "batch_size", "lr", "minmax_lr", "gradient_accumulate_steps", "seed"):
        if ctx.tuning.get(k) is not None:
            qc[k] = ctx.tuning[k]
    if extra:
        qc["extra_config"] = extra
    return qc


class AutoRoundExporter:
    name = "auto_round"
    capabilities = Capabilities(bits=frozenset({2, 3, 4, 5, 6, 8}), note="auto-round's own loader reads 2-8 bits")

    def write(self, ctx: ExportContext, out_dir: Path) -> None:
        all_sym = all(q.weight.spec.sym for q in ctx.layers.values())
        packing_format = PACKING_SYM if all_sym else PACKING_TRUE_ZERO
        offset = -1 if all_sym else 0
        tensors = float_state_dict(ctx.model, set(ctx.layers))
        for name, q in ctx.layers.items():
            qw = q.weight
            packed = packing.pack_gptq(qw.codes, qw.zero, qw.scale, qw.spec.bits, offset, qw.spec.scale_dtype)
            for k, t in packed.items():
                tensors[f"{name}.{k}"] = t
            if q.bias is not None:
                tensors[f"{name}.bias"] = q.bias.detach().cpu().contiguous()
        head_quantized = any(not any(n.startswith(b + ".") for b in ctx.block_names) for n in ctx.layers)
        untie = head_quantized and tied_lm_head(ctx.model)
        save_safetensors_shards(tensors, out_dir, metadata={"quantizer": "auto_quant", "packing": packing.CONTRACT_VERSION},
                            rename=checkpoint_names(ctx.model))
        save_config_and_tokenizer(ctx, out_dir, auto_round_quantization_config(ctx, packing_format), untie_lm_head=untie)

"""Reading a quantized checkpoint's ``quantization_config`` and swapping in QuantLinear modules.

Serves auto_quant's and Intel auto-round's ``auto_round`` checkpoints (all packing formats
auto-round writes for integer weights) and plain GPTQ / AWQ checkpoints.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from auto_quant.errors import CheckpointError
from auto_quant.inference.qlinear import QuantLinear
from auto_quant.models.discovery import Conv1D, find_block_list, find_lm_head, is_quantizable, set_submodule
from auto_quant.models.moe import split_fused_experts
from auto_quant.models.naming import module_names, rename_quantization_config

log = logging.getLogger(__name__)


def layout_for(quant_method: str, packing_format: str | None, checkpoint_format: str | None = None) -> str:
    pf = (packing_format or "").lower()
    qm = (quant_method or "").lower()
    if "awq" in pf or qm == "awq":
        return "awq"
    if qm == "gptq":
        cf = (checkpoint_format or "gptq").lower()
        if cf not in ("gptq", "gptq_v2"):
            raise CheckpointError(f"GPTQ checkpoint_format {checkpoint_format!r} is not supported by auto_quant's loader "
                                  "(it reads 'gptq' and 'gptq_v2'); load it with GPTQModel")
        return cf
    if pf in ("auto_round", "auto_round:gptq_v2", "gptq_v2"):
        return "gptq_v2"
    if pf == "" or "gptq" in pf or "exllama" in pf or "marlin" in pf or pf.startswith("auto_round:"):
        return "gptq"
    raise CheckpointError(f"packing_format {packing_format!r} is not supported by auto_quant's loader")


@dataclass(frozen=True)
class LayerQuant:
    bits: int
    group_size: int
    sym: bool


def _blocks(qc: dict) -> list[str]:
    b = qc.get("block_name_to_quantize") or qc.get("to_quant_block_names")
    if b is None:
        return []
    if isinstance(b, str):
        return [x.strip() for x in b.split(",") if x.strip()]
    out = []
    for item in b:
        out.extend(item if isinstance(item, list) else [item])
    return out


def _foreign_checks(qc: dict) -> None:
    """Refuse GPTQ / AWQ variants whose tensors a QuantLinear cannot hold, before any swap."""
    qm = str(qc.get("quant_method", "")).lower()
    if qm == "gptq" and qc.get("desc_act"):
        raise CheckpointError(
            "this GPTQ checkpoint uses act-order (desc_act=true: g_idx scatters columns over groups), which "
            "auto_quant's QuantLinear does not hold; load it with GPTQModel, or re-quantize with desc_act=false"
        )
    if qm == "awq":
        version = str(qc.get("version") or qc.get("format") or "gemm").lower()
        if version != "gemm":
            raise CheckpointError(f"AWQ version {version!r} is not supported by auto_quant's loader (it reads the "
                                  "GEMM layout); load it with GPTQModel / AutoAWQ")


def _foreign_entry(name: str, qc: dict, head_name: str | None) -> dict | None:
    """GPTQ / AWQ per-layer rules: None = stays float, else overrides (maybe empty).

    GPTQ: ``modules_in_block_to_quantize`` (suffixes; others stay float), GPTQModel's
    ``dynamic`` (``-:regex`` keeps a layer float, ``+:regex`` / ``regex`` overrides its
    settings), ``lm_head: true`` (quantized head). AWQ: ``modules_to_not_convert``; the head
    stays float.
    """
    qm = str(qc.get("quant_method", "")).lower()
    if qm == "awq":
        skip = qc.get("modules_to_not_convert") or []
        if name == head_name or any(re.match(rf"(?:{k})(?:(?<=\.)|(?=\.|$))", name) or name.endswith(k) for k in skip):
            return None
        return {}
    if name == head_name and not qc.get("lm_head"):
        return None
    wanted = qc.get("modules_in_block_to_quantize")
    if wanted and name != head_name:
        flat = [x for item in wanted for x in (item if isinstance(item, list) else [item])]
        if not any(name.endswith(x) for x in flat):
            return None
    entry: dict = {}
    for pat, over in (qc.get("dynamic") or {}).items():
        neg = pat.startswith("-:")
        rx = pat[2:] if pat[:2] in ("-:", "+:") else pat
        try:
            hit = re.match(rx, name) is not None
        except re.error:
            continue
        if hit and neg:
            return None
        if hit:
            entry.update(over or {})
    return entry


def layer_quant_for(name: str, qc: dict, blocks: list[str]) -> LayerQuant | None:
    """The quantization of one layer per the config (None: stays float)."""
    extra = qc.get("extra_config") or {}
    in_block = (not blocks and name != "lm_head") or any(name.startswith(b + ".") for b in blocks)
    entry = None
    if name in extra:
        entry = extra[name]
    else:
        for pat, e in extra.items():
            try:
                if re.search(pat, name) and not pat == name:
                    entry = e if entry is None else {**entry, **e}
            except re.error:
                continue
    if entry is None and not in_block:
        return None
    merged = {"bits": qc.get("bits", 4), "group_size": qc.get("group_size", 128), "sym": qc.get("sym", True)}
    if entry:
        merged.update({k: v for k, v in entry.items() if k in merged and v is not None})
        if entry.get("data_type") not in (None, "int") and not str(entry.get("data_type")).startswith("int"):
            return None
    if int(merged["bits"]) >= 16:
        return None
    return LayerQuant(int(merged["bits"]), int(merged["group_size"]), bool(merged["sym"]))


def convert_for_loading(model: nn.Module, qc: dict, modules_to_not_convert: list[str] | None = None) -> dict[str, LayerQuant]:
    """Replace the quantized layers of ``model`` with empty QuantLinear modules shaped like the checkpoint.

    Fused MoE experts are split into per-expert linears first, matching how auto_quant (and the original
    per-expert checkpoints) name them: ``<...>.experts.<e>.gate_proj``.
    """
    split_fused_experts(model)
    qc = rename_quantization_config(qc, module_names(model))  # checkpoint names (Mixtral's block_sparse_moe) -> modules
    qm = qc.get("quant_method", "auto-round")
    data_type = str(qc.get("data_type", "int"))
    if not data_type.startswith("int"):
        raise CheckpointError(f"data_type {data_type!r} checkpoints are not supported by auto_quant's loader (integer only)")
    if int(qc.get("act_bits", 16) or 16) < 16:
        raise CheckpointError("checkpoints with quantized activations (act_bits < 16) are not supported by auto_quant's loader")
    layout = layout_for(qm, qc.get("packing_format"), qc.get("checkpoint_format") or qc.get("format"))
    blocks = _blocks(qc)
    foreign = str(qm).lower() in ("gptq", "awq")
    head_name = None
    if foreign:
        _foreign_checks(qc)
        head = find_lm_head(model)
        head_name = head[0] if head else None
        if not blocks:
            blocks = [find_block_list(model).name]
    skip = set(modules_to_not_convert or [])
    converted: dict[str, LayerQuant] = {}
    dtype = _float_dtype(model)
    for name, mod in list(model.named_modules()):
        if not is_quantizable(mod) or name in skip:
            continue
        if foreign:
            entry = _foreign_entry(name, qc, head_name)
            in_scope = name == head_name or any(name.startswith(b + ".") for b in blocks) or qm == "awq"
            if entry is None or not in_scope:
                continue
            merged = {"bits": qc.get("bits", 4), "group_size": qc.get("group_size", 128),
                      "sym": bool(qc.get("sym", True)) and qm != "awq"}
            merged.update({k: entry[k] for k in ("bits", "group_size", "sym") if k in entry})
            lq = LayerQuant(int(merged["bits"]), int(merged["group_size"]), bool(merged["sym"]))
        else:
            lq = layer_quant_for(name, qc, blocks)
        if lq is None:
            continue
        if bool(Conv1D) and isinstance(mod, Conv1D):
            in_f, out_f = mod.weight.shape
        else:
            in_f, out_f = mod.in_features, mod.out_features
        q = QuantLinear(in_f, out_f, lq.bits, lq.group_size, lq.sym, mod.bias is not None, layout=layout,
                        scale_dtype=torch.float16, bias_dtype=dtype, device=mod.weight.device)
        set_submodule(model, name, q)
        converted[name] = lq
    if not converted:
        raise CheckpointError("the quantization_config matches no layer of this model; is block_name_to_quantize right?")
    log.info("auto_quant: %d layers loaded as %s-layout QuantLinear", len(converted), layout)
    return converted


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32

"""Load integer checkpoints made by other tools and re-save them in any auto_quant format.

``load_quantized(path)`` reads GPTQ (v1 "gptq" and "gptq_v2"), AWQ (GEMM) and auto-round
checkpoints, whoever made them (GPTQModel, AutoGPTQ, AutoAWQ, Intel auto-round, auto_quant),
into a transformers model whose quantized layers are auto_quant ``QuantLinear`` modules,
without the producer's packages and without routing through transformers' quantizer hooks.

``convert(src, dst, format="auto_round")`` is "convert GPTQ/AWQ to AutoRound": it unpacks
every QuantLinear to its integer codes, scales and zeros (the packing contract), builds an
``ExportContext`` from them and writes ``dst`` with the ordinary exporters, so the result
decodes to exactly the same weights as the source.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from auto_quant.errors import CheckpointError
from auto_quant.export import ExportContext, QuantizedLayer, check_output_dir, export, parse_formats
from auto_quant.inference.checkpoint import convert_for_loading
from auto_quant.inference.qlinear import QuantLinear
from auto_quant.models.discovery import find_block_list, find_lm_head, quantizable_layers, set_submodule
from auto_quant.models.naming import module_names
from auto_quant.quant import QuantizedWeight, QuantSpec

log = logging.getLogger(__name__)


def _read_tensors(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = src / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{str(src)!r} has no model.safetensors (or index); auto_quant reads safetensors checkpoints")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(src / f)))
    return out


def _check_g_idx(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """A GPTQ ``g_idx`` must be the plain ``i // group_size`` (no act-order) to be dropped."""
    mods = dict(model.named_modules())
    for key, t in tensors.items():
        if not key.endswith(".g_idx"):
            continue
        mod = mods.get(key[: -len(".g_idx")])
        if not isinstance(mod, QuantLinear):
            continue
        gs = mod.in_features if mod.group_size == -1 else mod.group_size
        if not torch.equal(t.to(torch.int64), torch.arange(mod.in_features) // gs):
            raise CheckpointError(f"{key} is not i // group_size (an act-order checkpoint); auto_quant's QuantLinear "
                                  "cannot hold it: load it with GPTQModel")


def load_quantized(path: str | os.PathLike, dtype: torch.dtype | None = None, backend: str = "auto"):
    """``(model, tokenizer or None)`` with auto_quant QuantLinear layers, from an integer checkpoint directory.

    ``backend`` picks the kernel per layer as in ``from_pretrained`` ("torch" is the exact
    dequantize-then-matmul reference).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    src = Path(path)
    if not (src / "config.json").exists():
        raise CheckpointError(f"{str(src)!r} is not a checkpoint directory (no config.json)")
    cfg = AutoConfig.from_pretrained(str(src))
    qc = getattr(cfg, "quantization_config", None)
    if qc is None:
        raise CheckpointError(f"{str(src)!r} has no quantization_config in config.json; it is not a quantized checkpoint")
    qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    if str(qc.get("quant_method", "")).lower() not in ("gptq", "awq", "auto-round", "intel/auto-round"):
        raise CheckpointError(f"quant_method {qc.get('quant_method')!r} is not an integer format auto_quant loads "
                              "(gptq, awq, auto-round); load it with its own stack")
    float_cfg = copy.deepcopy(cfg)
    del float_cfg.quantization_config
    if dtype is None:
        dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float16
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."))
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(float_cfg, dtype=dtype)
    model.eval()
    convert_for_loading(model, qc)
    to_module = module_names(model)  # checkpoint keys -> module names, as transformers renames them on load
    tensors = {to_module(k): v for k, v in _read_tensors(src).items()}
    _check_g_idx(model, tensors)
    tensors = {k: v for k, v in tensors.items() if not k.endswith(".g_idx")}
    result = model.load_state_dict(tensors, strict=False)
    tied = {k for k in result.missing_keys if getattr(cfg, "tie_word_embeddings", False) and k.endswith("weight")
            and find_lm_head(model) is not None and k == f"{find_lm_head(model)[0]}.weight"}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{str(src)!r} does not match its config: missing {missing[:4]}, unexpected {result.unexpected_keys[:4]}; "
            "is quantization_config (bits, group_size, modules_to_not_convert / dynamic) right?"
        )
    if tied:
        model.tie_weights()
    from auto_quant.inference.backends import attach_backends

    attach_backends(model, backend=backend)
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(src))
    except Exception:  # a checkpoint without tokenizer files still converts
        tokenizer = None
    return model, tokenizer


def _linear_like(mod: QuantLinear, weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=weight.device, dtype=weight.dtype)
    lin.weight.data.copy_(weight)
    if mod.bias is not None:
        lin.bias.data.copy_(mod.bias.to(weight.dtype))
    return lin


@torch.no_grad()
def dequantize_to_context(model: nn.Module, tokenizer=None, tuning: dict | None = None) -> ExportContext:
    """An ExportContext from a model with QuantLinear layers (as :func:`load_quantized` returns).

    The model is changed in place: each QuantLinear becomes an ``nn.Linear`` holding its
    dequantized weight (the "fake-quantized model" exporters expect); the integer codes,
    scales and zeros go to ``ctx.layers`` unchanged.
    """
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float16)
    layers: dict[str, QuantizedLayer] = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, QuantLinear):
            continue
        codes, zero, scale = mod.unpack()
        sym = mod.sym and bool((zero == 2 ** (mod.bits - 1)).all())
        if mod.sym and not sym:
            log.warning("%s: marked symmetric but its zero points are not %d; converted as asymmetric", name,
                        2 ** (mod.bits - 1))
        spec = QuantSpec(bits=mod.bits, group_size=mod.group_size, sym=sym, scale_dtype=mod.scales.dtype)
        qw = QuantizedWeight(codes.to(torch.uint8), scale.contiguous(), zero.to(torch.uint8), spec)
        bias = None if mod.bias is None else mod.bias.detach().clone()
        layers[name] = QuantizedLayer(name, qw, bias, "linear")
        set_submodule(model, name, _linear_like(mod, qw.dequantize(torch.float32).to(dtype)))
    if not layers:
        raise CheckpointError("the model has no QuantLinear layer; load it with auto_quant.convert.load_quantized")
    blist = find_block_list(model)  # after the swap: discovery looks for nn.Linear layers
    head = find_lm_head(model)
    specs: dict[str, QuantSpec | None] = {}
    for i, blk in enumerate(blist.blocks):
        for name in quantizable_layers(blk, f"{blist.name}.{i}"):
            specs[name] = layers[name].weight.spec if name in layers else None
    if head is not None:
        specs[head[0]] = layers[head[0]].weight.spec if head[0] in layers else None
        if head[0] in layers and getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False  # the head now has its own (quantized) weight
    for name in layers:
        specs.setdefault(name, layers[name].weight.spec)
    common = Counter((s.bits, s.group_size, s.sym) for s in specs.values() if s is not None).most_common(1)[0][0]
    scheme = next(s for s in specs.values() if s is not None and (s.bits, s.group_size, s.sym) == common)
    return ExportContext(model=model, tokenizer=tokenizer, layers=layers, block_names=[blist.name], scheme=scheme,
                         specs=specs, tuning=dict(tuning or {}))


def convert(src: str | os.PathLike, dst: str | os.PathLike, format: str = "auto_round") -> dict[str, Path]:
    """Re-save the integer checkpoint ``src`` (GPTQ / AWQ / auto-round) as ``format`` in ``dst``; exact."""
    check_output_dir(dst)
    parse_formats(format)
    model, tokenizer = load_quantized(src, backend="torch")
    ctx = dequantize_to_context(model, tokenizer)
    return export(ctx, dst, format)

"""Model-agnostic discovery: the decoder-block list, the linears inside, the output head.

No per-architecture code: the block list is the ``nn.ModuleList`` of same-class modules that
holds the most parameters; quantizable layers are ``nn.Linear`` and GPT-2 style ``Conv1D``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

try:  # GPT-2 style layers store the weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()

from auto_quant.errors import ModelLoadError


@dataclass(frozen=True)
class BlockList:
    name: str  # dotted path of the ModuleList, e.g. "model.layers"
    blocks: nn.ModuleList

    def block_names(self) -> list[str]:
        return [f"{self.name}.{i}" for i in range(len(self.blocks))]


def is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def weight_as_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (a transposed view for Conv1D)."""
    if bool(Conv1D) and isinstance(module, Conv1D):
        return module.weight.t()
    return module.weight


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_block_list(model: nn.Module) -> BlockList:
    """The repeated decoder blocks: the largest ModuleList of same-class modules containing linears."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(m) for m in module}
        if len(classes) != 1:
            continue
        if not any(is_quantizable(m) for m in module[0].modules()):
            continue
        size = _param_count(module)
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ModelLoadError(
            f"could not find a list of decoder blocks in {type(model).__name__}: auto_quant expects a "
            "transformers causal LM whose layers live in an nn.ModuleList"
        )
    return BlockList(name=best[1], blocks=best[2])


def quantizable_layers(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """Every Linear / Conv1D under ``module`` keyed by its full dotted name."""
    out = {}
    for name, sub in module.named_modules():
        if is_quantizable(sub):
            out[f"{prefix}.{name}" if prefix else name] = sub
    return out


def find_lm_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The output projection (``get_output_embeddings``), if it is a plain Linear."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or not is_quantizable(head):
        return None
    for name, sub in model.named_modules():
        if sub is head:
            return name, head
    return None


def tied_lm_head(model: nn.Module) -> bool:
    """True when the output head shares its weight with the input embedding."""
    head = find_lm_head(model)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or emb is None:
        return False
    return head[1].weight is emb.weight or head[1].weight.data_ptr() == emb.weight.data_ptr()


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def body_of(model: nn.Module) -> nn.Module:
    """The module to run for capturing block inputs: the base model without the LM head when there is one."""
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        return base
    return model


def untie_lm_head(model: nn.Module, head: nn.Module) -> bool:
    """Give the output head its own weight when it shares the embedding's (before quantizing it)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or head.weight.data_ptr() != emb.weight.data_ptr():
        return False
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        mark_untied(cfg)
    return True


def mark_untied(cfg) -> None:
    """Set ``tie_word_embeddings = False`` on a transformers config and on its text config (multimodal models keep
    the flag there), so that loading does not re-tie the head to the embedding."""
    cfg.tie_word_embeddings = False
    if hasattr(cfg, "get_text_config"):
        try:
            cfg.get_text_config().tie_word_embeddings = False
        except Exception:  # a config without a text config answers with an error on some versions
            pass

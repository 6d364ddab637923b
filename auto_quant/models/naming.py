"""Checkpoint names vs module names.

transformers 5 renames the checkpoint keys of some families when it loads them (Mixtral's and
MiniMax's ``block_sparse_moe`` → ``mlp``, EXAONE's ``transformer.h`` → ``model.layers``, Nemotron-H's
``backbone`` → ``model``, ...), and ``save_pretrained`` writes the original names back. Serving engines
read the original names, so auto_quant's exports do the same: :func:`checkpoint_names` maps a module
name to the name the family's checkpoints use, :func:`module_names` maps it back when loading. Both
are identity for the families transformers does not rename (Llama, Qwen, Mistral, Gemma, ...).
Only renamings are applied: a fused-tensor conversion (stacking experts) never matches the per-layer
names auto_quant writes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from torch import nn

log = logging.getLogger(__name__)


def conversion_mapping(model: nn.Module) -> list:
    """transformers' checkpoint → model conversions for ``model`` (renamings and tensor converters); empty for
    transformers 4 and for models without any."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # transformers 4: no conversion on load
        return []
    try:
        return list(get_model_conversion_mapping(model, add_legacy=False) or [])
    except Exception as e:  # a model transformers has no mapping machinery for
        log.debug("no checkpoint conversion mapping for %s: %s", type(model).__name__, e)
        return []


def _renamings(model: nn.Module) -> list:
    conversions = conversion_mapping(model)
    if not conversions:
        return []
    from transformers.core_model_loading import PrefixChange, WeightRenaming

    # a PrefixChange depends on how the model was loaded (transformers drops it for models not made by
    # from_pretrained too); base-model prefixes are not auto_quant's to change
    return [c for c in conversions if isinstance(c, WeightRenaming) and not isinstance(c, PrefixChange)]


def _renamer(transforms: list) -> Callable[[str], str]:
    if not transforms:
        return lambda name: name
    from transformers.core_model_loading import apply_renamings

    def rename(name: str) -> str:
        return apply_renamings(name, transforms)

    return rename


def checkpoint_names(model: nn.Module) -> Callable[[str], str]:
    """Module name (or state-dict key) → the name this family's checkpoints use."""
    forward = _renamings(model)
    return _renamer([t.reverse_transform() for t in reversed(forward)])


def module_names(model: nn.Module) -> Callable[[str], str]:
    """Checkpoint name → this model's module name (what transformers does to keys when it loads)."""
    return _renamer(_renamings(model))


def _rename_pattern(key: str, rename: Callable[[str], str]) -> str:
    """A GPTQ ``dynamic`` key ``"-:^<escaped name>$"``: the name inside renamed and escaped again."""
    m = re.fullmatch(r"([+-]:)?\^(.*)\$", key)
    if m is None:
        return key
    name = re.sub(r"\\(.)", r"\1", m.group(2))
    if re.escape(name) != m.group(2):  # a real regex, not an escaped name: left alone
        return key
    return f"{m.group(1) or ''}^{re.escape(rename(name))}$"


def rename_quantization_config(qc: dict, rename: Callable[[str], str]) -> dict:
    """``qc`` with the layer and block names it holds renamed: ``block_name_to_quantize`` (comma-separated),
    ``extra_config`` keys, ``modules_to_not_convert``, ``modules_in_block_to_quantize``, GPTQ ``dynamic`` keys,
    compressed-tensors ``ignore`` and group ``targets``. Other fields are left as they are."""
    out = dict(qc)
    if isinstance(out.get("block_name_to_quantize"), str):
        out["block_name_to_quantize"] = ",".join(rename(b) for b in out["block_name_to_quantize"].split(","))
    elif isinstance(out.get("block_name_to_quantize"), list):
        out["block_name_to_quantize"] = [rename(b) for b in out["block_name_to_quantize"]]
    if isinstance(out.get("extra_config"), dict):
        out["extra_config"] = {rename(k): v for k, v in out["extra_config"].items()}
    if isinstance(out.get("modules_to_not_convert"), list):
        out["modules_to_not_convert"] = [rename(n) for n in out["modules_to_not_convert"]]
    if isinstance(out.get("modules_in_block_to_quantize"), list):  # a list of lists of names
        out["modules_in_block_to_quantize"] = [[rename(n) for n in group] if isinstance(group, list) else rename(group)
                                               for group in out["modules_in_block_to_quantize"]]
    if isinstance(out.get("dynamic"), dict):
        out["dynamic"] = {_rename_pattern(k, rename): v for k, v in out["dynamic"].items()}
    if isinstance(out.get("ignore"), list):
        out["ignore"] = [rename(n) for n in out["ignore"]]
    if isinstance(out.get("config_groups"), dict):
        groups = {}
        for g, cfg in out["config_groups"].items():
            cfg = dict(cfg)
            if isinstance(cfg.get("targets"), list):
                cfg["targets"] = [t if t == "Linear" else rename(t) for t in cfg["targets"]]
            groups[g] = cfg
        out["config_groups"] = groups
    return out

"""``scheme="gguf:<type>"``: per-layer specs in the grids llama.cpp's mix will store.

The plan (:func:`~auto_quant.export.gguf.plan.plan_gguf`) assigns every linear its tensor type;
this turns it into exact-name layer rules of a :class:`~auto_quant.config.QuantConfig`, so the
tuner optimises each layer in the parametrisation the file will hold. The user's own
``layer_config`` rules keep precedence over the plan.
"""

from __future__ import annotations

from dataclasses import replace

from auto_quant.config import LayerRule, QuantConfig
from auto_quant.export.gguf.arch import check_model
from auto_quant.export.gguf.plan import GgufPlan, plan_gguf
from auto_quant.export.gguf.types import TENSOR_TYPES, file_type


def is_gguf_scheme(scheme) -> bool:
    return isinstance(scheme, str) and scheme.lower().startswith("gguf:")


def gguf_quant_config(model, scheme: str, cfg: QuantConfig) -> tuple[QuantConfig, GgufPlan]:
    """``cfg`` with the scheme and layer rules of GGUF file type ``scheme`` for ``model``.

    Raises ExportError (unsupported architecture or setting) or FormatNotAvailableError (unknown
    type) before any tuning.
    """
    ft = file_type(scheme)
    check_model(model)
    plan = plan_gguf(model, ft.name, untie_head=cfg.quant_lm_head)
    user = cfg.layer_rules
    rules = []
    for name, spec in plan.layer_specs(quant_lm_head=cfg.quant_lm_head).items():
        if any(r.matches(name) for r in user):
            continue
        rules.append(LayerRule(pattern=name, spec=spec))
    base = TENSOR_TYPES[ft.base].spec or cfg.scheme
    new = replace(cfg, scheme=base, layer_rules=tuple(rules) + tuple(user))
    if hasattr(new, "fused_layers"):  # llama.cpp keeps q/k/v and gate/up as separate tensors, typed per its mix
        new = replace(new, fused_layers="off")
    return new, plan

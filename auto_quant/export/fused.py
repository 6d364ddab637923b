"""Fused-layer consistency: layers that serving engines fuse must share one quantization.

vLLM, SGLang, TGI and GPTQModel's fused paths concatenate some linears into one packed
matrix (q/k/v → ``qkv_proj``, gate/up → ``gate_up_proj``, every expert of an MoE layer →
one fused-MoE weight). A fused matrix has one bits / group size / sym setting, so a
checkpoint whose q_proj is 8-bit while k_proj is 4-bit cannot be served by them (vLLM
refuses "some but not all shards" of a fused layer, or mis-decodes it).

``FUSED_RULES`` is the declarative table of what is fused. ``fused_sets`` groups concrete
layer names by it; ``harmonise`` makes every set consistent before any tuning time is spent:
policy ``"harmonise"`` gives the whole set the setting a ``layer_config`` rule asked for in
it (several rules: the most precise of them; 16 bits beats any integer, then more bits, then
the smaller group, then asymmetric) and logs a warning; ``"error"`` raises :class:`~auto_quant.errors.LayerConfigError` naming the set and
the fix; ``"off"`` leaves the specs alone (for checkpoints only transformers will run).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from auto_quant.errors import ConfigError, LayerConfigError
from auto_quant.quant import QuantSpec

log = logging.getLogger(__name__)

FUSED_POLICIES = ("harmonise", "error", "off")


@dataclass(frozen=True)
class FusedRule:
    """Layers whose names match ``pattern`` and give the same ``key`` (the pattern's
    ``prefix`` group) are fused into one matrix by serving engines."""

    name: str
    pattern: str
    engines: str = "vLLM, SGLang"

    def key(self, layer: str) -> str | None:
        m = re.fullmatch(self.pattern, layer)
        return None if m is None else f"{self.name}:{m.group('prefix')}"


FUSED_RULES: tuple[FusedRule, ...] = (
    # attention input projections (Llama, Mistral, Qwen, Gemma, OPT, Phi, Falcon-H, ...)
    FusedRule("qkv", r"(?P<prefix>.*)\.(q_proj|k_proj|v_proj)"),
    FusedRule("qkv", r"(?P<prefix>.*)\.(query|key|value)"),  # BERT-style / some MPT ports
    FusedRule("qkv", r"(?P<prefix>.*)\.(wq|wk|wv)"),  # Meta reference naming
    # gated MLP input projections
    FusedRule("gate_up", r"(?P<prefix>.*)\.(gate_proj|up_proj)"),
    FusedRule("gate_up", r"(?P<prefix>.*)\.(w1|w3)"),  # Mixtral / DBRX expert naming
    # every expert of one MoE layer (vLLM's FusedMoE stacks all experts' w13 and w2)
    FusedRule("experts", r"(?P<prefix>.*\.experts)\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3|fc1|fc2)"),
)


def fused_sets(names, rules: tuple[FusedRule, ...] = FUSED_RULES) -> list[list[str]]:
    """Groups of ``names`` that serving engines fuse (sets of one are left out); overlapping
    rules (an expert's gate/up and the experts rule) merge into one set."""
    names = list(names)
    parent = {n: n for n in names}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first: dict[str, str] = {}
    for n in names:
        for r in rules:
            k = r.key(n)
            if k is None:
                continue
            if k in first:
                parent[find(n)] = find(first[k])
            else:
                first[k] = n
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(find(n), []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def _precision(spec: QuantSpec | None) -> tuple:
    if spec is None:
        return (1, 0, 0, 0)
    gs = spec.group_size if spec.group_size > 0 else 1 << 30
    return (0, spec.bits, -gs, 0 if spec.sym else 1)


def _describe(spec: QuantSpec | None) -> str:
    if spec is None:
        return "16-bit"
    return f"{spec.bits}-bit g{spec.group_size} {'sym' if spec.sym else 'asym'}"


def _same(a: QuantSpec | None, b: QuantSpec | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.bits, a.group_size, a.sym, getattr(a, "fmt", "int")) == (b.bits, b.group_size, b.sym, getattr(b, "fmt", "int"))


def _llama_cpp_grid(spec: QuantSpec | None) -> bool:
    return spec is not None and getattr(spec, "fmt", "int") != "int"


def inconsistent_sets(specs: dict[str, QuantSpec | None]) -> list[list[str]]:
    """Fused sets whose members differ. Sets holding llama.cpp grids (gguf schemes) are left
    alone: llama.cpp runs every tensor on its own, and its mixes give v_proj more bits on purpose."""
    return [g for g in fused_sets(specs)
            if not any(_llama_cpp_grid(specs[n]) for n in g) and any(not _same(specs[g[0]], specs[n]) for n in g[1:])]


def harmonise(specs: dict[str, QuantSpec | None], policy: str = "harmonise",
              explicit: set[str] | frozenset[str] = frozenset()) -> dict[str, QuantSpec | None]:
    """``specs`` with every fused set consistent (see the module doc for the policies).

    ``explicit``: layers whose spec a ``layer_config`` rule set; their setting wins in their set.
    """
    if policy not in FUSED_POLICIES:
        raise ConfigError(f"fused_layers={policy!r} is not a policy; use one of {', '.join(FUSED_POLICIES)}")
    if policy == "off":
        return specs
    bad = inconsistent_sets(specs)
    if not bad:
        return specs
    out = dict(specs)
    for group in bad:
        detail = ", ".join(f"{n}={_describe(specs[n])}" for n in group[:6]) + (", ..." if len(group) > 6 else "")
        if policy == "error":
            raise LayerConfigError(
                f"layer_config quantizes layers that serving engines fuse differently: {detail}. Give them one "
                "setting (e.g. a regex covering all of them), or pass fused_layers='harmonise' to use the most "
                "precise setting for all, or fused_layers='off' if only transformers will run the checkpoint"
            )
        chosen = [n for n in group if n in explicit] or group
        best = max((specs[n] for n in chosen), key=_precision)
        for n in group:
            out[n] = best
        log.warning("fused layers %s had different settings; all now use %s (serving engines fuse them)", detail,
                    _describe(best))
    return out

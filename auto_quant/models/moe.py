"""Mixture-of-experts layers as per-expert linears, so every expert is quantized like any other layer.

transformers 5 stores the experts of an MoE layer (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek, OLMoE,
gpt-oss, ...) as one module with 3-D parameters — ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``
(``[E, in, out]`` when transposed) — not as ``nn.Linear``. :func:`split_fused_experts` replaces each
such module with :class:`SplitExperts`, an ``nn.ModuleList`` of :class:`ExpertMLP` holding plain
``gate_proj`` / ``up_proj`` / ``down_proj`` linears, which computes the same function. Layers are
then named ``<...>.experts.<e>.gate_proj`` — the per-expert naming of the original checkpoints that
vLLM-class servers read for quantized MoE models.

The layout of a fused module comes from the flags transformers' ``use_experts_implementation``
sets on it (``has_gate``, ``is_concatenated``, ``is_transposed``, ``has_bias``); the gating function is the
module's own ``_apply_gate`` (gpt-oss clamps, others ``act(gate) * up``), so the split module needs
no per-architecture code. Llama 4's experts, which take router-scaled inputs for every token, become a
:class:`DenseSplitExperts`. A fused module in a layout it cannot reproduce (an expert norm, extra
tensors, an unknown calling convention) is left fused, with one warning: its weights stay in 16 bits.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")
_BIASES = ("gate_up_proj_bias", "up_proj_bias", "down_proj_bias")


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers-5 experts module: 3-D ``down_proj`` plus ``gate_up_proj`` or ``up_proj``."""
    down = module._parameters.get("down_proj")
    up = module._parameters.get("gate_up_proj", module._parameters.get("up_proj"))
    return down is not None and up is not None and down.dim() == 3 and up.dim() == 3


def _layout(module: nn.Module) -> tuple[str, bool, bool] | None:
    """``(kind, transposed, concatenated)`` of a fused experts module, None when it is not recognised.

    ``"routed"``: called as ``(hidden_states, top_k_index, top_k_weights)``, the layout from the flags
    transformers' ``use_experts_implementation`` puts on the module (without them, from the shapes when
    only one layout fits; gate/up then concatenated). ``"dense"``: Llama 4's experts, called
    with ``[E * T, H]`` inputs already scaled by the router (every expert sees every token), weights
    ``[E, H, 2I]`` / ``[E, I, H]``.
    """
    if hasattr(module, "has_gate") and hasattr(module, "is_transposed"):
        return "routed", bool(module.is_transposed), bool(getattr(module, "is_concatenated", True))
    params = [p for p in inspect.signature(type(module).forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    up, down = module._parameters.get("gate_up_proj"), module._parameters["down_proj"]
    if up is None:
        return None
    as_out_in = up.shape[1] == 2 * down.shape[2] and up.shape[2] == down.shape[1]  # [E, 2I, H], [E, H, I]
    as_in_out = up.shape[2] == 2 * down.shape[1] and up.shape[1] == down.shape[2]  # [E, H, 2I], [E, I, H]
    if len(params) == 2 and as_in_out:
        return "dense", True, True
    if len(params) == 4 and as_out_in != as_in_out:  # no flags (older transformers 5): the shapes decide
        return "routed", as_in_out, True
    return None


def _why_not_splittable(module: nn.Module) -> str | None:
    if _layout(module) is None:
        return "its calling convention or weight layout is not one auto_quant knows"
    if getattr(module, "has_post_expert_norm", False):
        return "it normalises each expert's output"
    extra = [n for n, _ in module.named_parameters() if n not in _WEIGHTS + _BIASES]
    extra += [n for n, _ in module.named_buffers()]
    if extra:
        return f"it holds other tensors ({', '.join(extra)})"
    if "gate_up_proj" not in module._parameters and getattr(module, "has_gate", False):
        return "it is gated but has no gate_up_proj"
    if "gate_up_proj" in module._parameters and not hasattr(module, "_apply_gate") and not hasattr(module, "act_fn"):
        return "it has no gating function"
    return None


def _gate_fn(module: nn.Module):
    """The fused module's gating as a function of the ``[.., 2I]`` gate/up output in its own layout."""
    apply = getattr(type(module), "_apply_gate", None)
    if apply is not None:
        return lambda gu: apply(module, gu)
    act = module.act_fn

    def gate(gu):
        g, u = gu.chunk(2, dim=-1)
        return act(g) * u

    return gate


DEFAULT_LEAVES = ("gate_proj", "up_proj", "down_proj")


class ExpertMLP(nn.Module):
    """One expert: ``down(gate_fn([gate(x); up(x)]))`` (or ``down(act(up(x)))`` without a gate).

    The three linears are registered under the names the family's checkpoints give them (``leaves``:
    ``gate_proj``/``up_proj``/``down_proj``, or Mixtral's ``w1``/``w3``/``w2``); :attr:`gate`, :attr:`up` and
    :attr:`down` reach them whatever their names.
    """

    def __init__(self, gate_proj: nn.Linear | None, up_proj: nn.Linear, down_proj: nn.Linear, gating, concatenated: bool,
                 leaves: tuple[str, str, str] = DEFAULT_LEAVES):
        super().__init__()
        if gate_proj is not None:
            self.add_module(leaves[0], gate_proj)
        self.add_module(leaves[1], up_proj)
        self.add_module(leaves[2], down_proj)
        self.__dict__["_leaves"] = leaves
        self.__dict__["_gating"] = gating  # the stripped fused module (no tensors): act_fn / _apply_gate
        self.__dict__["_gate_fn"] = _gate_fn(gating) if gate_proj is not None else None
        self.__dict__["_concatenated"] = concatenated

    @property
    def gate(self) -> nn.Module | None:
        return self._modules.get(self.__dict__["_leaves"][0])

    @property
    def up(self) -> nn.Module:
        return self._modules[self.__dict__["_leaves"][1]]

    @property
    def down(self) -> nn.Module:
        return self._modules[self.__dict__["_leaves"][2]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate
        if gate is not None:
            g, u = gate(x), self.up(x)
            gu = torch.cat([g, u], dim=-1) if self.__dict__["_concatenated"] else torch.stack([g, u], dim=-1).flatten(-2)
            h = self.__dict__["_gate_fn"](gu)
        else:
            h = self.__dict__["_gating"].act_fn(self.up(x))
        return self.down(h)


class SplitExperts(nn.ModuleList):
    """The experts of one MoE layer as a list of :class:`ExpertMLP`; called like the fused module,
    ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        n = len(self)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index.long(), num_classes=n + 1).permute(2, 1, 0)  # [E + 1, k, T]
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit.flatten().tolist():
            if e >= n:
                continue
            pos, tok = torch.where(mask[e])
            y = self[e](hidden_states[tok]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


class DenseSplitExperts(nn.ModuleList):
    """Llama 4's experts as a list of :class:`ExpertMLP`: ``[E * T, H]`` inputs, already scaled by the
    router, expert ``e`` taking rows ``e * T .. (e + 1) * T``; returns ``[E * T, H]``."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = hidden_states.view(len(self), -1, hidden_states.shape[-1])
        return torch.cat([expert(h[e]) for e, expert in enumerate(self)], dim=0)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A Linear owning a contiguous copy of ``weight [out, in]`` (meta stays meta)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone().contiguous(), requires_grad=False)
    return lin


def split_module(module: nn.Module, leaves: tuple[str, str, str] = DEFAULT_LEAVES) -> SplitExperts | DenseSplitExperts:
    """The :class:`SplitExperts` (or :class:`DenseSplitExperts`) computing what the fused ``module`` computes;
    ``module`` is emptied of its tensors (it stays on as the experts' gating function)."""
    p = module._parameters
    kind, transposed, concatenated = _layout(module)
    gated = "gate_up_proj" in p
    up_all = p["gate_up_proj"] if gated else p["up_proj"]
    up_bias = p.get("gate_up_proj_bias" if gated else "up_proj_bias")
    down_all, down_bias = p["down_proj"], p.get("down_proj_bias")
    experts = []
    for e in range(up_all.shape[0]):
        w_up = up_all[e].t() if transposed else up_all[e]  # [2I or I, H]
        w_down = down_all[e].t() if transposed else down_all[e]  # [H, I]
        b_up = None if up_bias is None else up_bias[e]
        if gated:
            inter = w_up.shape[0] // 2
            if concatenated:
                rows_g, rows_u = slice(0, inter), slice(inter, 2 * inter)
            else:
                rows_g, rows_u = slice(0, None, 2), slice(1, None, 2)
            gate = _linear(w_up[rows_g], None if b_up is None else b_up[rows_g])
            up = _linear(w_up[rows_u], None if b_up is None else b_up[rows_u])
        else:
            gate, up = None, _linear(w_up, b_up)
        down = _linear(w_down, None if down_bias is None else down_bias[e])
        experts.append(ExpertMLP(gate, up, down, module, concatenated, leaves))
    for name in _WEIGHTS + _BIASES:
        p.pop(name, None)
    return SplitExperts(experts) if kind == "routed" else DenseSplitExperts(experts)


def split_fused_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module of ``model`` with a :class:`SplitExperts`; returns their names.

    Idempotent. Modules it cannot reproduce stay fused, with a warning that their weights stay in 16 bits.
    """
    done = []
    leaves = None
    for name, module in list(model.named_modules()):
        if not is_fused_experts(module):
            continue
        if leaves is None:
            leaves = checkpoint_leaves(model)
        why = _why_not_splittable(module)
        if why is not None:
            log.warning("auto_quant: the experts of %s (%s) stay in 16 bits: %s", name, type(module).__name__, why)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, split_module(module, leaves))
        done.append(name)
    if done:
        log.info("auto_quant: split %d fused MoE expert modules into per-expert linears", len(done))
    return done


def checkpoint_leaves(model: nn.Module) -> tuple[str, str, str]:
    """The names this family's per-expert checkpoints give an expert's gate, up and down projections.

    Read from transformers' conversion mapping (the patterns it stacks the per-expert tensors from on load:
    Mixtral's ``experts.*.w1`` / ``w3`` / ``w2``); ``gate_proj`` / ``up_proj`` / ``down_proj`` otherwise.
    """
    from auto_quant.models.naming import conversion_mapping

    conversions = conversion_mapping(model)
    if not conversions:  # transformers 4, or no mapping for this model
        return DEFAULT_LEAVES
    from transformers.core_model_loading import WeightConverter

    gate = up = down = None
    for c in conversions:
        if not isinstance(c, WeightConverter):
            continue
        targets = [t for t in c.target_patterns if isinstance(t, str)]
        sources = [s.split(".")[-2] for s in c.source_patterns if isinstance(s, str) and s.count(".") >= 2]
        if any(t.endswith("experts.gate_up_proj") for t in targets) and len(sources) == 2:
            gate, up = sources
        elif any(t.endswith("experts.down_proj") for t in targets) and len(sources) == 1:
            down = sources[0]
    if gate and up and down and all(n.isidentifier() for n in (gate, up, down)):
        return gate, up, down
    return DEFAULT_LEAVES


_ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def router_layers(model: nn.Module) -> set[str]:
    """The linears of MoE routers and expert gates: in an MoE layer (the parent of split experts), a child
    named ``gate``, ``router`` or ``shared_expert_gate`` that is a Linear, or the Linears inside it
    (Hunyuan's ``gate.wg``). They score experts and stay in 16 bits, as serving engines load them."""
    out = set()
    for name, module in model.named_modules():
        if not any(isinstance(c, (SplitExperts, DenseSplitExperts)) for c in module.children()):
            continue
        for child_name, child in module.named_children():
            if child_name not in _ROUTER_NAMES:
                continue
            prefix = f"{name}.{child_name}" if name else child_name
            for sub_name, sub in child.named_modules():
                if isinstance(sub, nn.Linear):
                    out.add(f"{prefix}.{sub_name}" if sub_name else prefix)
    return out

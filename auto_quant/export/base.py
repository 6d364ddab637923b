"""The one exporter interface, the records exporters receive, and atomic directory writing."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from auto_quant.errors import ExportError
from auto_quant.models.discovery import mark_untied
from auto_quant.models.naming import checkpoint_names, rename_quantization_config
from auto_quant.quant import QuantSpec, QuantizedWeight


@dataclass(frozen=True)
class QuantizedLayer:
    """One quantized layer as tuning produced it (the packing contract's input)."""

    name: str
    weight: QuantizedWeight  # codes [out, in], scale/zero [out, n_groups]
    bias: torch.Tensor | None
    kind: str = "linear"  # "linear" or "conv1d" (GPT-2 style, weight stored [in, out])


@dataclass(frozen=True)
class Capabilities:
    """What a format can hold; checked before any tuning time is spent."""

    bits: frozenset[int]
    sym: bool = True
    asym: bool = True
    group_sizes: frozenset[int] | None = None  # None: any
    mixed: bool = True  # per-layer bits / group size / sym
    note: str = ""
    fmts: frozenset[str] = frozenset({"int"})  # QuantSpec.fmt grids it holds (llama.cpp grids: gguf formats)

    def check(self, fmt: str, specs: dict[str, QuantSpec | None]) -> None:
        used = {n: s for n, s in specs.items() if s is not None}
        for name, s in used.items():
            if s.fmt not in self.fmts:
                raise ExportError(
                    f"format {fmt!r} cannot hold layer {name}, quantized in llama.cpp's {s.fmt} grid; "
                    "export it as GGUF (format='gguf:<type>') or quantize with an integer scheme"
                )
            if s.bits not in self.bits:
                raise ExportError(
                    f"format {fmt!r} cannot hold {s.bits}-bit weights (layer {name}); it holds "
                    f"{sorted(self.bits)} bits{'. ' + self.note if self.note else ''}"
                )
            if s.sym and not self.sym:
                raise ExportError(f"format {fmt!r} cannot hold symmetric weights (layer {name}); use --asym")
            if not s.sym and not self.asym:
                raise ExportError(f"format {fmt!r} cannot hold asymmetric weights (layer {name}); use symmetric quantization")
            if self.group_sizes is not None and s.group_size not in self.group_sizes:
                raise ExportError(
                    f"format {fmt!r} cannot hold group_size={s.group_size} (layer {name}); allowed: {sorted(self.group_sizes)}"
                )
        if not self.mixed and len({(s.bits, s.group_size, s.sym) for s in used.values()}) > 1:
            raise ExportError(f"format {fmt!r} cannot hold layers with different bits/group_size/sym")


@dataclass
class ExportContext:
    model: nn.Module  # the fake-quantized model (float weights in place)
    tokenizer: object | None
    layers: dict[str, QuantizedLayer]
    block_names: list[str]
    scheme: QuantSpec
    specs: dict[str, QuantSpec | None]  # every candidate layer → its spec (None = 16 bits)
    tuning: dict = field(default_factory=dict)  # recorded in the config for provenance


class Exporter(Protocol):
    name: str
    capabilities: Capabilities

    def write(self, ctx: ExportContext, out_dir: Path) -> None: ...


def check_output_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise ExportError(f"output directory {str(p)!r} exists and is not empty; choose a new path or empty it first")
    return p


def write_atomically(out_dir: str | os.PathLike, write) -> Path:
    """Run ``write(tmp_dir)`` in a temporary sibling directory and rename it into place when complete."""
    final = check_output_dir(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            final.rmdir()
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def float_state_dict(model: nn.Module, skip_modules: set[str]) -> dict[str, torch.Tensor]:
    """The model's tensors except the weights/biases of ``skip_modules``; tied copies dropped."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for key, t in sd.items():
        mod, _, leaf = key.rpartition(".")
        if mod in skip_modules and leaf in ("weight", "bias"):
            continue
        ident = (t.data_ptr(), t.shape, t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            continue  # tied weight: saved once, under its first name
        if ident is not None:
            seen[ident] = key
        out[key] = t.detach().cpu().contiguous()
    return out


def save_safetensors_shards(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = 5 * 2**30,
                            metadata: dict | None = None, rename=None) -> None:
    """``tensors`` in shards of at most ``max_shard_bytes``; ``rename`` maps module names to the checkpoint
    names of the family (:func:`auto_quant.models.naming.checkpoint_names`)."""
    from safetensors.torch import save_file

    if rename is not None:
        renamed = {rename(k): v for k, v in tensors.items()}
        if len(renamed) != len(tensors):
            raise ExportError("internal: two tensors map to the same checkpoint name")
        tensors = renamed

    meta = {"format": "pt", **(metadata or {})}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata=meta)
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    with open(out_dir / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_config_and_tokenizer(ctx: ExportContext, out_dir: Path, quantization_config: dict | None,
                              untie_lm_head: bool = False) -> None:
    cfg = copy.deepcopy(ctx.model.config)
    # record the float dtype explicitly: with dtype="auto" a loader would otherwise guess it from
    # the first floating tensor of the checkpoint, which may be a (float16) scale
    emb = ctx.model.get_input_embeddings() if hasattr(ctx.model, "get_input_embeddings") else None
    if emb is not None and emb.weight.is_floating_point():
        cfg.dtype = emb.weight.dtype
    if quantization_config is not None:
        cfg.quantization_config = rename_quantization_config(quantization_config, checkpoint_names(ctx.model))
    if untie_lm_head:
        mark_untied(cfg)
    cfg.save_pretrained(str(out_dir))
    gen = getattr(ctx.model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(str(out_dir))
        except Exception:  # an invalid generation config must not block the checkpoint
            pass
    if ctx.tokenizer is not None and hasattr(ctx.tokenizer, "save_pretrained"):
        ctx.tokenizer.save_pretrained(str(out_dir))
    copy_processor_files(getattr(ctx.model, "name_or_path", None), out_dir)


# what a vision-language (or audio) checkpoint needs besides the tokenizer to be served
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")


def copy_processor_files(source, out_dir: Path) -> list[str]:
    """Copy the processor files of a local source checkpoint directory (one with a ``config.json``) that the
    export did not write itself."""
    if not source or not (Path(str(source)) / "config.json").is_file():
        return []
    copied = []
    for name in PROCESSOR_FILES:
        src, dst = Path(str(source)) / name, Path(out_dir) / name
        if src.is_file() and not dst.exists():
            shutil.copyfile(src, dst)
            copied.append(name)
    return copied

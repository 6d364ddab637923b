"""The ``gguf:<type>`` exporters: one GGUF file that llama.cpp runs, written from the tuned codes.

Tuned layers are packed from their integer form (no requantization); tensors the tuner does not
touch (token embedding, an untuned output head) are quantized here with the importance-free
clipping search in the type llama.cpp's mix assigns them; norms stay F32; 16-bit layers F16.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from auto_quant.errors import ExportError
from auto_quant.export.base import Capabilities, ExportContext
from auto_quant.export.gguf import arch as arch_mod
from auto_quant.export.gguf.blocks import pack, pack_float, permute_rows
from auto_quant.export.gguf.plan import GgufPlan, mix_type, plan_gguf
from auto_quant.export.gguf.tokenizer import tokenizer_metadata
from auto_quant.export.gguf.types import FILE_TYPES, TENSOR_TYPES, FileType, file_type, tensor_type_of_spec
from auto_quant.models.discovery import find_block_list
from auto_quant.quant.search import rtn_weight

log = logging.getLogger(__name__)

QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION


def possible_types(ft: FileType) -> frozenset[str]:
    """Every tensor type a file of type ``ft`` may contain (mix upgrades, output head, fallbacks)."""
    if ft.is_float:
        return frozenset()
    found = {ft.base, "q6_k", "q8_0"}
    for cat in ("attn_v", "attn_k", "attn_q", "attn_output", "ffn_down", "ffn_gate", "ffn_up"):
        for n in (1, 8, 16, 32, 64):
            for i in range(n):
                for gqa in (1, 8):
                    found.add(mix_type(ft, cat, i, n, gqa))
    changed = True
    while changed:
        changed = False
        for t in list(found):
            fb = TENSOR_TYPES[t].fallback
            if fb and fb not in found:
                found.add(fb)
                changed = True
    return frozenset(found)


@dataclass(frozen=True)
class GgufCapabilities(Capabilities):
    """A GGUF file stores each layer in a tensor type whose grid equals its spec's (checked before tuning)."""

    allowed: frozenset[str] = frozenset()  # empty: a float file type (any tuned weights, written as floats)

    def check(self, fmt, specs) -> None:
        if not self.allowed:
            return
        for name, s in specs.items():
            if s is None:
                continue
            t = tensor_type_of_spec(s)
            if t is None:
                raise ExportError(
                    f"format {fmt!r} cannot store layer {name} ({s.bits}-bit, group_size={s.group_size}, "
                    f"{'sym' if s.sym else 'asym'}, scale {s.scale_dtype}) exactly: GGUF holds 4/5-bit integers in "
                    f"groups of 32 with fp16 scales (Q4_0, Q4_1, Q5_0, Q5_1) and llama.cpp's own grids; "
                    f"quantize with scheme={fmt!r}"
                )
            if t not in self.allowed:
                raise ExportError(
                    f"format {fmt!r} does not use {t.upper()}, but layer {name} is quantized for it; "
                    f"quantize with scheme={fmt!r} (it assigns llama.cpp's per-tensor types before tuning)"
                )


class GgufExporter:
    """``gguf:<type>``: write one ``.gguf`` file llama.cpp loads."""

    def __init__(self, type_name: str):
        self.file_type = FILE_TYPES[type_name]
        self.name = f"gguf:{type_name}"
        allowed = possible_types(self.file_type)
        self.capabilities = GgufCapabilities(
            bits=frozenset({2, 3, 4, 5, 6, 8}),
            note="GGUF holds llama.cpp's grids: scheme='gguf:<type>' tunes in them",
            allowed=allowed,
        )

    def check_model(self, model) -> None:
        """Architecture / shape checks that need the model (run before tuning)."""
        arch_mod.check_model(model)
        plan_gguf(model, self.file_type.name)

    def write(self, ctx: ExportContext, out_dir: Path) -> None:
        path = Path(out_dir) / gguf_file_name(ctx.model, self.file_type)
        report = write_gguf(ctx, path, self.file_type)
        with open(Path(out_dir) / "gguf_report.json", "w") as f:
            json.dump(report, f, indent=2)


def gguf_file_name(model, ft: FileType) -> str:
    stem = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "model").rstrip("/").split("/")[-1]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"
    if stem.endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    return f"{stem}-{ft.name.upper()}.gguf"


def _rtn(w: torch.Tensor, type_name: str):
    """An untuned tensor (embedding, untuned head): RTN after the clipping search (plain RTN for Q8_0, as llama.cpp)."""
    spec = TENSOR_TYPES[type_name].spec
    return rtn_weight(w.detach().to(torch.float32), spec, search=type_name != "q8_0")


class ExpertStacks:
    """Per-expert tensors of an MoE layer gathered into llama.cpp's 3-D ``ffn_*_exps`` tensors ``[E, rows, ...]``;
    each stack is written (through ``add``) as soon as its last expert arrives."""

    def __init__(self, n_experts: int, add):
        self.n, self.add = n_experts, add
        self.parts: dict[str, dict[int, tuple[np.ndarray, str]]] = {}

    def put(self, gname: str, e: int, data: np.ndarray, tname: str) -> None:
        parts = self.parts.setdefault(gname, {})
        parts[e] = (data, tname)
        if len(parts) < self.n:
            return
        types = {t for _, t in parts.values()}
        if len(types) != 1:
            raise ExportError(f"GGUF export: the experts of {gname} have different tensor types {sorted(types)}; "
                              "llama.cpp stores them as one tensor (harmonise them: fused_layers='harmonise')")
        self.add(gname, np.stack([parts[i][0] for i in range(self.n)]), types.pop())
        del self.parts[gname]

    def check_complete(self) -> None:
        if self.parts:
            name, parts = next(iter(self.parts.items()))
            raise ExportError(f"GGUF export: {name} has {len(parts)} of {self.n} experts; the model's experts are incomplete")


@torch.no_grad()
def write_gguf(ctx: ExportContext, path: Path, ft: FileType | str) -> dict:
    """Write ``ctx`` as one GGUF file of type ``ft``; return a report (tensor types, fallbacks, size)."""
    ft = file_type(ft) if isinstance(ft, str) else ft
    model = ctx.model
    a = arch_mod.check_model(model)
    plan = plan_gguf(model, ft.name)  # also splits fused MoE experts into the per-expert layers written below
    cfg = arch_mod.text_config(model)
    blist = find_block_list(model)
    names = arch_mod.TensorNames(a, len(blist.blocks))
    emb = model.get_input_embeddings()
    n_vocab = emb.weight.shape[0]
    tok = tokenizer_metadata(ctx.tokenizer, n_vocab)
    if len(tok.tokens) > n_vocab:
        raise ExportError(f"the tokenizer has {len(tok.tokens)} tokens but the embedding only {n_vocab} rows")

    w = gguf.GGUFWriter(str(path), a.name)
    stem = str(getattr(cfg, "_name_or_path", "") or "model").rstrip("/").split("/")[-1]
    w.add_name(stem or "model")
    w.add_file_type(int(ft.ftype))
    w.add_quantization_version(QUANTIZATION_VERSION)
    from auto_quant import __version__

    w.add_string("general.quantized_by", f"auto_quant {__version__}")
    arch_mod.write_hparams(w, a, model, n_vocab)
    tok.write(w)

    written: dict[str, str] = {}
    notes = list(plan.notes)
    tied = plan.output is None
    head_module = plan.head_name

    def add(name: str, data: np.ndarray, tname: str):
        t = TENSOR_TYPES[tname]
        if t.spec is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=t.qtype)
        written[name] = tname

    experts = ExpertStacks(arch_mod.n_experts(cfg) if a.moe else 0, add)
    for key, tensor in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if (module == head_module and tied) or "rotary_emb" in key:
            continue
        gname = "output.weight" if module == head_module and leaf == "weight" else names(key)
        if gname is None:
            raise ExportError(f"GGUF export: no llama.cpp tensor name for {key!r} ({a.name})")
        expert = arch_mod.expert_of(key) if a.moe else None
        if expert is not None:
            if module in ctx.layers and not ft.is_float:
                tname = tensor_type_of_spec(ctx.layers[module].weight.spec)
                if not TENSOR_TYPES[tname].fits(tensor.shape[1]):
                    raise ExportError(f"GGUF export: expert {module} has rows of {tensor.shape[1]}, not whole {tname} "
                                      "blocks; quantize with the GGUF scheme (scheme='gguf:<type>') so they fit")
                experts.put(gname, expert[1], pack(ctx.layers[module].weight, tname), tname)
            else:  # a float export, or 16-bit experts
                tname = ft.base if ft.is_float else "f16"
                experts.put(gname, expert[1], pack_float(tensor, tname), tname)
            continue
        if gname.endswith("ffn_gate_inp.weight"):  # MoE routers stay float32, as llama.cpp's quantizer keeps them
            add(gname, pack_float(tensor, "f32"), "f32")
            continue
        heads = arch_mod.permute_heads(a, model, gname)
        idx = None if heads is None else arch_mod.qk_row_permutation(tensor.shape[0], heads)
        if tensor.dim() == 1:
            t = arch_mod.float_transform(a, gname, tensor)
            if idx is not None:
                t = t[idx]
            add(gname, pack_float(t, "f32"), "f32")
            continue
        if module in ctx.layers and leaf == "weight" and not ft.is_float:
            q = ctx.layers[module]
            tname = tensor_type_of_spec(q.weight.spec)
            if TENSOR_TYPES[tname].fits(tensor.shape[1]):
                qw = q.weight if idx is None else permute_rows(q.weight, idx)
                add(gname, pack(qw, tname), tname)
                continue
            # a row that holds no whole blocks (tuned without the GGUF scheme): its fake-quantized values as F16
            notes.append(f"{module}: row length {tensor.shape[1]} is not a multiple of {TENSOR_TYPES[tname].block_size} "
                         f"({tname}) -> f16 (the tuned values, unpacked)")
            data = tensor if idx is None else tensor[idx]
            add(gname, pack_float(data, "f16"), "f16")
            continue
        if gname == "token_embd.weight":
            tname = plan.embedding
        elif gname == "output.weight":
            tname = plan.output or ft.base
        elif ft.is_float:
            tname = ft.base
        else:
            tname = "f16"
            log.info("GGUF export: %s is not quantized (16-bit layer); writing F16", key)
        data = tensor if idx is None else tensor[idx]
        if TENSOR_TYPES[tname].spec is None:
            add(gname, pack_float(arch_mod.float_transform(a, gname, data), tname), tname)
        else:
            add(gname, pack(_rtn(data, tname), tname), tname)
    experts.check_complete()
    freqs = arch_mod.llama3_rope_freqs(cfg)
    if freqs is not None:
        add("rope_freqs.weight", freqs, "f32")

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    counts: dict[str, int] = {}
    for t in written.values():
        counts[t] = counts.get(t, 0) + 1
    report = {
        "file": path.name,
        "type": ft.name,
        "architecture": a.name,
        "bytes": path.stat().st_size,
        "tensor_types": counts,
        "fallbacks": notes,
        "tensors": written,
    }
    log.info("GGUF %s: wrote %s (%.1f MB; %s)", ft.name, path.name, report["bytes"] / 1e6,
             ", ".join(f"{v}×{k}" for k, v in sorted(counts.items())))
    if notes:
        log.warning("GGUF %s: %d tensor(s) written in a fallback type (their rows do not hold whole blocks), "
                    "e.g. %s; all listed in gguf_report.json", ft.name, len(notes), notes[0])
    return report


def exporters() -> list[GgufExporter]:
    return [GgufExporter(n) for n in FILE_TYPES]


__all__ = ["GgufExporter", "GgufCapabilities", "GgufPlan", "exporters", "write_gguf", "gguf_file_name", "possible_types"]

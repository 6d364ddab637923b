"""The quantization report: where the error went, as JSON and as a picture.

Per block: the tuner's loss with plain RTN, at the start of tuning (after the clipping search)
and after tuning, with the loss curve (``AutoRound.outcome.units``). Per layer: bits, group
size and the relative output error of plain RTN and of the tuned weights,

    rel_error = sum ||X (W_q - W)^T||^2 / sum ||X W^T||^2,

measured here with forward hooks on the quantized model, on a few calibration samples, with
``X`` each layer's input in that (quantized) model and ``W`` the float weight saved before
tuning (:func:`snapshot_weights`). Model size before and after, tuning time, peak memory.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from auto_quant.models.discovery import weight_as_out_in
from auto_quant.quant import QuantSpec, quantize_weight

log = logging.getLogger(__name__)

REPORT_JSON = "quantization_report.json"
REPORT_PNG = "quantization_report.png"


@dataclass(frozen=True)
class LayerError:
    rtn: float  # relative output error of plain RTN
    tuned: float  # relative output error of the kept (tuned) weights


SNAPSHOT_BYTES = 2 * 2**30  # the float copies the per-layer errors may keep on the CPU


def _block_key(name: str) -> str:
    """``model.layers.3`` for ``model.layers.3.mlp.down_proj``: the prefix up to the first index."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return name


def snapshot_weights(model: nn.Module, specs: dict[str, QuantSpec | None],
                     max_bytes: int = SNAPSHOT_BYTES) -> dict[str, torch.Tensor]:
    """CPU copies (``[out, in]``) of the float weights of the layers whose error the report measures.

    Every quantized layer while their copies fit ``max_bytes``; otherwise (large models) the layers of as
    many blocks, spread evenly from first to last, as fit, so the report never doubles the model in memory.
    """
    modules = dict(model.named_modules())
    names = [n for n, s in specs.items() if s is not None and n in modules]
    weights = {n: weight_as_out_in(modules[n]) for n in names}
    size = {n: w.numel() * w.element_size() for n, w in weights.items()}
    if sum(size.values()) > max_bytes:
        blocks: dict[str, list[str]] = {}
        for n in names:
            blocks.setdefault(_block_key(n), []).append(n)
        keys = list(blocks)
        per_block = max(1, max(sum(size[n] for n in b) for b in blocks.values()))
        k = max(1, min(len(keys), max_bytes // per_block))
        picked = [keys[round(i * (len(keys) - 1) / max(1, k - 1))] for i in range(k)] if k > 1 else keys[:1]
        names = [n for key in dict.fromkeys(picked) for n in blocks[key]]
        log.info("report: per-layer errors measured on %d of %d blocks (float copies kept under %.1f GB)",
                 len(dict.fromkeys(picked)), len(keys), max_bytes / 2**30)
    return {n: weights[n].detach().to("cpu", copy=True) for n in names}


@torch.no_grad()
def measure_layer_errors(model: nn.Module, reference: dict[str, torch.Tensor], specs: dict[str, QuantSpec | None],
                         samples: list[dict], max_samples: int = 4, progress: bool = True) -> dict[str, LayerError]:
    """Relative output error per layer of plain RTN and of the model's current (quantized) weights."""
    modules = dict(model.named_modules())
    names = [n for n in reference if n in modules and specs.get(n) is not None]
    sums = {n: [0.0, 0.0, 0.0] for n in names}  # ||XW^T||^2, ||X dW_rtn^T||^2, ||X dW_q^T||^2
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(name):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            w = reference[name].to(x.device, torch.float32)
            if name not in deltas:
                w_q = weight_as_out_in(mod).detach().to(x.device, torch.float32)
                w_rtn = quantize_weight(w, specs[name], None, 1.0, 1.0).dequantize(torch.float32)
                deltas[name] = (w_rtn - w, w_q - w)
            d_rtn, d_q = deltas[name]
            s = sums[name]
            s[0] += float((x @ w.t()).pow(2).sum())
            s[1] += float((x @ d_rtn.t()).pow(2).sum())
            s[2] += float((x @ d_q.t()).pow(2).sum())

        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        try:
            device = model.get_input_embeddings().weight.device
        except Exception:
            device = next(model.parameters()).device
        for sample in tqdm(samples[:max_samples], desc="layer errors", leave=False, disable=not progress):
            kwargs = {"input_ids": sample["input_ids"].reshape(1, -1).to(device), "use_cache": False}
            if sample.get("attention_mask") is not None:
                kwargs["attention_mask"] = sample["attention_mask"].reshape(1, -1).to(device)
            model(**kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for n in names:
        ref, e_rtn, e_q = sums[n]
        if ref > 0:
            out[n] = LayerError(rtn=e_rtn / ref, tuned=e_q / ref)
    return out


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def quantized_bytes_estimate(model: nn.Module, specs: dict[str, QuantSpec | None], float_bytes: int) -> int:
    """Model bytes once quantized: packed codes, scales (scale dtype) and zero points per group, the rest unchanged."""
    modules = dict(model.named_modules())
    total = float_bytes
    for name, spec in specs.items():
        if spec is None or name not in modules:
            continue
        w = weight_as_out_in(modules[name])
        out_f, in_f = w.shape
        groups = spec.groups(in_f)
        scale_bytes = torch.empty(0, dtype=spec.scale_dtype).element_size()
        total -= w.numel() * w.element_size()
        total += math.ceil(out_f * in_f * spec.bits / 8) + out_f * groups * scale_bytes + math.ceil(out_f * groups * spec.bits / 8)
    return int(total)


def dir_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _block_of(layer: str, units: list[str]) -> str | None:
    best = None
    for u in units:
        if layer == u or layer.startswith(u + "."):
            if best is None or len(u) > len(best):
                best = u
    return best


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def build_report(outcome, *, model_name: str, scheme: QuantSpec, tuning: dict, float_bytes: int, quantized_bytes: int,
                 layer_errors: dict[str, LayerError] | None = None, disk_bytes: dict[str, int] | None = None,
                 calibration: str | None = None, peak_rss_bytes: int | None = None, extra: dict | None = None) -> dict:
    """The report as a JSON-ready dict, from ``AutoRound.outcome`` and the measurements above."""
    from auto_quant import __version__

    layer_errors = layer_errors or {}
    unit_names = list(outcome.units)
    blocks = []
    for name, r in outcome.units.items():
        red = None
        if r.loss_before and not math.isnan(r.loss_before) and r.loss_before > 0:
            red = 1.0 - r.loss_after / r.loss_before
        blocks.append({
            "name": name, "loss_rtn": _num(r.loss_before), "loss_start": _num(r.loss_init), "loss_tuned": _num(r.loss_after),
            "reduction_vs_rtn": red, "best_iter": r.best_iter, "seconds": r.seconds,
            "curve": [[int(i), _num(v)] for i, v in r.curve],
        })
    layers, kept = [], []
    for name, spec in outcome.specs.items():
        if spec is None:
            kept.append(name)
            continue
        ql = outcome.layers.get(name)
        shape = list(ql.weight.codes.shape) if ql is not None else None
        err = layer_errors.get(name)
        layers.append({
            "name": name, "block": _block_of(name, unit_names), "bits": spec.bits, "group_size": spec.group_size,
            "sym": spec.sym, "shape": shape,
            "rel_error_rtn": None if err is None else err.rtn, "rel_error_tuned": None if err is None else err.tuned,
        })
    reds = [b["reduction_vs_rtn"] for b in blocks if b["reduction_vs_rtn"] is not None]
    measured = [(l["rel_error_rtn"], l["rel_error_tuned"]) for l in layers if l["rel_error_rtn"] is not None]
    summary = {
        "blocks_tuned": len(blocks),
        "mean_block_loss_reduction_vs_rtn": sum(reds) / len(reds) if reds else None,
        "layers_quantized": len(layers),
        "layers_kept_16bit": len(kept),
        "layers_with_lower_error_than_rtn": sum(1 for a, b in measured if b < a) if measured else None,
        "mean_rel_error_rtn": sum(a for a, _ in measured) / len(measured) if measured else None,
        "mean_rel_error_tuned": sum(b for _, b in measured) / len(measured) if measured else None,
    }
    return {
        "auto_quant_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_name,
        "scheme": scheme.to_dict(),
        "tuning": tuning,
        "calibration": calibration,
        "time": {"tuning_seconds": outcome.seconds},
        "memory": {"peak_gpu_bytes": outcome.peak_memory_bytes or None, "peak_rss_bytes": peak_rss_bytes},
        "size": {"float_bytes": float_bytes, "quantized_bytes_estimate": quantized_bytes,
                 "compression": float_bytes / quantized_bytes if quantized_bytes else None,
                 "on_disk_bytes": disk_bytes or {}},
        "summary": summary,
        "blocks": blocks,
        "layers": layers,
        "kept_16bit": kept,
        "layer_error_protocol": "relative output error sum||X(Wq-W)^T||^2 / sum||XW^T||^2 on calibration samples, "
                                "X = the layer's input in the quantized model",
        **(extra or {}),
    }


def _mb(n) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MB"


def plot_report(report: dict, path: str | os.PathLike) -> Path:
    """A 2x2 figure: loss per block, loss reduction per block, error per layer, loss curves."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 8.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    blocks = report["blocks"]
    idx = list(range(len(blocks)))
    short = [b["name"].rsplit(".", 1)[-1] for b in blocks]

    ax = axes[0][0]
    if blocks:
        ax.plot(idx, [b["loss_rtn"] for b in blocks], "o-", color="tab:gray", label="plain RTN")
        ax.plot(idx, [b["loss_start"] for b in blocks], "--", color="tab:orange", label="start (clip search)")
        ax.plot(idx, [b["loss_tuned"] for b in blocks], "o-", color="tab:blue", label="tuned")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_title("block output MSE (eval subset)")
    ax.set_xlabel("block")
    _ticks(ax, idx, short)

    ax = axes[0][1]
    reds = [100 * (b["reduction_vs_rtn"] or 0.0) for b in blocks]
    ax.bar(idx, reds, color=["tab:green" if r >= 0 else "tab:red" for r in reds])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_title("loss reduction vs plain RTN per block (%)")
    ax.set_xlabel("block")
    _ticks(ax, idx, short)

    ax = axes[1][0]
    layers = [l for l in report["layers"] if l["rel_error_rtn"] is not None]
    if layers:
        li = list(range(len(layers)))
        ax.scatter(li, [l["rel_error_rtn"] for l in layers], s=10, color="tab:gray", label="plain RTN")
        ax.scatter(li, [l["rel_error_tuned"] for l in layers], s=10, color="tab:blue", label="tuned")
        ax.set_yscale("log")
        prev = None
        for i, l in enumerate(layers):  # block boundaries
            if prev is not None and l["block"] != prev:
                ax.axvline(i - 0.5, color="0.85", lw=0.6, zorder=0)
            prev = l["block"]
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "per-layer error not measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("relative output error per layer")
    ax.set_xlabel("layer (in model order)")

    ax = axes[1][1]
    cmap = colormaps["viridis"]
    for i, b in enumerate(blocks):
        pts = [(it, v) for it, v in b["curve"] if v is not None]
        if pts and pts[0][1]:
            ax.plot([p[0] for p in pts], [p[1] / pts[0][1] for p in pts], color=cmap(i / max(1, len(blocks) - 1)), lw=1)
    ax.set_title("tuning curves (loss / start loss), colour = depth")
    ax.set_xlabel("iteration")

    s = report["scheme"]
    size = report["size"]
    fig.suptitle(
        f"{report['model']}  W{s['bits']} g{s['group_size']} {'sym' if s['sym'] else 'asym'}  "
        f"iters {report['tuning'].get('iters')}  |  {_mb(size['float_bytes'])} -> {_mb(size['quantized_bytes_estimate'])}  |  "
        f"tuning {report['time']['tuning_seconds']:.0f}s",
        fontsize=11,
    )
    path = Path(path)
    fig.savefig(path)
    return path


def _ticks(ax, idx, labels):
    if not idx:
        return
    step = max(1, len(idx) // 16)
    ax.set_xticks(idx[::step])
    ax.set_xticklabels(labels[::step], fontsize=8)


def write_report(report: dict, out_dir: str | os.PathLike, plot: bool = True) -> dict[str, Path]:
    """Write ``quantization_report.json`` (and the PNG when matplotlib is installed) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    jpath = out_dir / REPORT_JSON
    tmp = out_dir / f".{REPORT_JSON}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    tmp.replace(jpath)
    paths["json"] = jpath
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log.warning("matplotlib is not installed, so no %s was drawn; pip install 'auto_quant[plot]'", REPORT_PNG)
            return paths
        paths["png"] = plot_report(report, out_dir / REPORT_PNG)
    return paths


__all__ = [
    "LayerError",
    "REPORT_JSON",
    "REPORT_PNG",
    "build_report",
    "dir_bytes",
    "measure_layer_errors",
    "plot_report",
    "quantized_bytes_estimate",
    "snapshot_weights",
    "tensor_bytes",
    "write_report",
]

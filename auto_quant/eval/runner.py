"""Run a list of tasks on a model; render the results as a table and as JSON."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from auto_quant.errors import ConfigError
from auto_quant.eval.lm_eval_adapter import run_lm_eval
from auto_quant.eval.perplexity import perplexity, windows_for_spec
from auto_quant.eval.tasks import TaskSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = 1  # --eval_bs
    limit: float | None = None  # lm-eval examples per task (--limit)
    ppl_seqlen: int = 512  # window length of ppl:<data> tasks
    ppl_nsamples: int = 32  # windows of ppl:<data> tasks
    seed: int = 1234  # data order of ppl:<data>; lm-eval seeds
    device: str | None = None
    progress: bool = True

    def __post_init__(self):
        for name, lo in (("batch_size", 1), ("ppl_seqlen", 2), ("ppl_nsamples", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"evaluation {name}={v!r} is invalid; use an integer >= {lo}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, (int, float)) or self.limit <= 0):
            raise ConfigError(f"--limit {self.limit!r} is invalid; use a positive count or a fraction in (0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)


# Which way is better, per metric name (lower is better for these; higher for everything else).
_LOWER_IS_BETTER = ("ppl", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "nll")


@dataclass(frozen=True)
class PreparedData:
    """The windows of every ppl:<data> task, built once so that every model sees the same tokens."""

    windows: dict  # label -> (list of model inputs, data description)


def prepare(tokenizer, tasks: list[TaskSpec], settings: EvalSettings) -> PreparedData:
    out = {}
    for t in tasks:
        if t.kind == "ppl":
            out[t.label] = windows_for_spec(tokenizer, t.value, settings.ppl_seqlen, settings.ppl_nsamples, settings.seed)
    return PreparedData(windows=out)


def evaluate(model, tokenizer, tasks: list[TaskSpec], settings: EvalSettings, label: str = "model",
             prepared: PreparedData | None = None) -> dict[str, dict]:
    """``{task: {"metrics": {name: value}, "stderr": {...}, "info": {...}}}`` for every task."""
    prepared = prepared if prepared is not None else prepare(tokenizer, tasks, settings)
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    for t in tasks:
        if t.kind != "ppl":
            continue
        samples, desc = prepared.windows[t.label]
        res = perplexity(model, samples, batch_size=settings.batch_size, progress=settings.progress,
                         desc=f"{label} ppl {desc}")
        results[t.label] = {"metrics": {"ppl": res.ppl}, "stderr": {},
                            "info": {"data": desc, "nll": res.nll, "tokens": res.tokens, "windows": res.windows,
                                     "seqlen": res.seqlen}}
        log.info("%s %s: ppl %.4f (%d windows x %d tokens)", label, t.label, res.ppl, res.windows, res.seqlen)
    lm = run_lm_eval(model, tokenizer, tasks, batch_size=settings.batch_size, limit=settings.limit,
                     device=settings.device, seed=settings.seed)
    for name, entry in lm.items():
        results[name] = {**entry, "info": {"harness": "lm-eval"}}
    log.info("%s: evaluation took %.1fs", label, time.perf_counter() - t0)
    return results


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    return f"{v:.4f}"


def deltas(quantized: dict[str, dict], baseline: dict[str, dict] | None) -> dict[str, dict]:
    if not baseline:
        return {}
    out: dict[str, dict] = {}
    for task, entry in quantized.items():
        base = baseline.get(task, {}).get("metrics", {})
        d = {m: v - base[m] for m, v in entry.get("metrics", {}).items() if m in base}
        if d:
            out[task] = d
    return out


def format_table(quantized: dict[str, dict] | None, baseline: dict[str, dict] | None = None) -> str:
    """A plain-text table: task | metric | baseline | quantized | delta (columns present as known)."""
    quantized = quantized or {}
    rows = []
    tasks = list(dict.fromkeys(list(baseline or {}) + list(quantized)))
    both = bool(baseline) and bool(quantized)
    for task in tasks:
        q = quantized.get(task, {}).get("metrics", {})
        b = (baseline or {}).get(task, {}).get("metrics", {})
        for metric in dict.fromkeys(list(b) + list(q)):
            qv, bv = q.get(metric), b.get(metric)
            if both:
                d = None if qv is None or bv is None else qv - bv
                arrow = ""
                if d is not None and d != 0:
                    worse = d > 0 if metric in _LOWER_IS_BETTER else d < 0
                    arrow = " (worse)" if worse else " (better)"
                rows.append([task, metric, _fmt(bv), _fmt(qv), ("-" if d is None else f"{d:+.4f}") + arrow])
            else:
                rows.append([task, metric, _fmt(qv if quantized else bv)])
    header = ["task", "metric", "float", "quantized", "delta"] if both else ["task", "metric", "value"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out)


def results_document(model: str, tasks: list[TaskSpec], settings: EvalSettings, results: dict[str, dict],
                     extra: dict | None = None) -> dict:
    """``results`` maps a role (``quantized``, ``baseline``, or ``model`` for a plain evaluation) to results."""
    from auto_quant import __version__

    return {
        "auto_quant_version": __version__,
        "model": model,
        "tasks": [t.label for t in tasks],
        "settings": settings.to_dict(),
        "results": results,
        "delta": deltas(results.get("quantized") or {}, results.get("baseline")),
        **(extra or {}),
    }


def write_results(doc: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, sort_keys=False)
        f.write("\n")
    tmp.replace(path)
    return path


__all__ = ["EvalSettings", "PreparedData", "deltas", "evaluate", "prepare", "format_table", "results_document", "write_results"]

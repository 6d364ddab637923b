"""lm-evaluation-harness on an in-memory model (an optional dependency: ``pip install 'auto_quant[eval]'``).

Task names are checked against lm-eval's task index before any tuning time is spent. Local
task YAML files are loaded by path, so no task index of the built-in tasks is built for them:
a YAML whose ``dataset_path`` is ``json`` with local ``dataset_kwargs.data_files`` runs offline.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import math
import os
import re
from pathlib import Path

import yaml

from auto_quant.errors import ConfigError
from auto_quant.eval.tasks import TaskSpec

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'auto_quant[eval]' (or pip install lm-eval)"


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def _require():
    if not lm_eval_available():
        raise ConfigError(f"lm-eval tasks were requested but lm-eval is not installed; {INSTALL_HINT}, "
                          "or use the built-in ppl:<data> task")


def _task_manager(include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=include_defaults)


def _check_yaml(path: str) -> None:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.load(f, Loader=_LenientLoader)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"lm-eval task file {path!r} cannot be read as YAML ({type(e).__name__}); fix the file") from None
    if not isinstance(cfg, dict) or not (cfg.get("task") or cfg.get("group")):
        raise ConfigError(f"lm-eval task file {path!r} has no 'task:' (or 'group:') name; add one")


class _LenientLoader(yaml.SafeLoader):
    """Safe loading that tolerates lm-eval's ``!function`` tags."""


_LenientLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _task_texts() -> list[bytes]:
    """The raw text of every task YAML lm-eval ships (reading them is ~20x faster than indexing them)."""
    import lm_eval

    root = Path(lm_eval.__file__).resolve().parent / "tasks"
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith((".yaml", ".yml")):
                try:
                    out.append((Path(dirpath) / f).read_bytes())
                except OSError:
                    continue
    return out


_NAME_LINE = re.compile(rb"^\s*-?\s*(?:task|group|tag)\s*:\s*['\"]?([A-Za-z0-9_.\-]+)", re.M)


def _unknown_error(name: str, candidates) -> ConfigError:
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(
        f"lm-eval does not know the task {name!r}{hint} (list them with `lm-eval ls tasks`; "
        "local task YAML files and ppl:<data> work too)"
    )


def check_tasks(tasks: list[TaskSpec]) -> None:
    """Fail fast: lm-eval installed, YAML files readable, task names known to lm-eval.

    A name that occurs in none of lm-eval's task files is unknown for certain (a fast text scan);
    any other name is checked against lm-eval's own task index.
    """
    lm_tasks = [t for t in tasks if t.kind != "ppl"]
    if not lm_tasks:
        return
    _require()
    for t in lm_tasks:
        if t.kind == "yaml":
            _check_yaml(t.value)
    names = [t.value for t in lm_tasks if t.kind == "lm_eval"]
    if not names:
        return
    texts = _task_texts()
    for name in names:
        if not any(ch in name for ch in "*?[") and not any(name.encode() in b for b in texts):
            raise _unknown_error(name, (m.decode() for b in texts for m in _NAME_LINE.findall(b)))
    log.info("checking lm-eval task names %s (indexing lm-eval's tasks)", ", ".join(names))
    tm = _task_manager(include_defaults=True)
    known = set(tm.all_tasks)
    for name in names:
        if name not in known and not tm.match_tasks([name]):
            raise _unknown_error(name, tm.all_tasks)


def _metrics(entry: dict) -> tuple[dict, dict]:
    values, stderr = {}, {}
    for key, v in entry.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or key in ("sample_len", "sample_count"):
            continue
        metric, _, filt = key.partition(",")
        name = metric if filt in ("", "none") else f"{metric},{filt}"
        if metric.endswith("_stderr"):
            stderr[name.replace("_stderr", "", 1)] = float(v)
        else:
            values[name] = float(v)
    return values, stderr


def run_lm_eval(model, tokenizer, tasks: list[TaskSpec], batch_size: int = 1, limit: float | None = None,
                device: str | None = None, seed: int = 1234) -> dict[str, dict]:
    """Run lm-eval on ``model`` (in memory). Returns ``{task: {"metrics": {...}, "stderr": {...}}}``."""
    lm_tasks = [t for t in tasks if t.kind != "ppl"]
    if not lm_tasks:
        return {}
    _require()
    if tokenizer is None:
        raise ConfigError("lm-eval tasks need a tokenizer; the model has none (save one with the model)")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tm = _task_manager(include_defaults=any(t.kind == "lm_eval" for t in lm_tasks))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              device=str(device) if device is not None else None)
    try:
        res = lm_eval.simple_evaluate(
            model=lm, tasks=[t.value for t in lm_tasks], task_manager=tm, limit=limit, log_samples=False,
            bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except KeyError as e:  # a name the index lost between the check and the run
        raise ConfigError(f"lm-eval could not load task {e}; check the name or the task file") from None
    out: dict[str, dict] = {}
    for name, entry in (res or {}).get("results", {}).items():
        values, stderr = _metrics(entry)
        values = {k: v for k, v in values.items() if not math.isnan(v)}
        out[name] = {"metrics": values, "stderr": stderr}
    return out


__all__ = ["INSTALL_HINT", "check_tasks", "lm_eval_available", "run_lm_eval"]

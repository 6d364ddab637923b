"""``--tasks`` parsing: built-in perplexity tasks, local lm-eval task YAML files, lm-eval task names.

Grammar: a comma list of items. An item is

* ``ppl:<calibration spec>`` — the built-in perplexity task (no lm-eval needed); the spec is
  anything ``--dataset`` accepts (``ppl:stdlib``, ``ppl:/data/sotu``, ``ppl:./texts.jsonl``).
  A spec that itself holds commas is quoted (``ppl:"a.txt,b.txt"``); pieces that follow a
  ``ppl:`` item and contain ``=`` (spec keys such as ``num=64``) stay part of it;
* a path to a local lm-eval task YAML file (``*.yaml`` / ``*.yml``), which runs offline when its
  ``dataset_path`` is ``json`` with local ``data_files``;
* any other word: an lm-eval task, group or tag name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from auto_quant.errors import ConfigError

PPL_PREFIX = "ppl:"


@dataclass(frozen=True)
class TaskSpec:
    kind: str  # "ppl", "yaml", "lm_eval"
    value: str  # the calibration spec, the YAML path, or the task name

    @property
    def label(self) -> str:
        if self.kind == "ppl":
            return f"{PPL_PREFIX}{self.value}"
        if self.kind == "yaml":
            return os.path.splitext(os.path.basename(self.value))[0]
        return self.value


def _split_top(text: str) -> list[str]:
    """Split on commas outside single or double quotes."""
    parts, cur, quote = [], [], None
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
            cur.append(ch)
        elif ch == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quote:
        raise ConfigError(f"--tasks {text!r} has an unclosed {quote} quote; close it or drop it")
    parts.append("".join(cur))
    return parts


def _unquote(s: str) -> str:
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        return s[1:-1]
    return s


def parse_tasks(text: str | list[str] | None) -> list[TaskSpec]:
    if text is None:
        return []
    raw = _split_top(text) if isinstance(text, str) else list(text)
    items: list[str] = []
    for piece in raw:
        piece = piece.strip()
        if not piece:
            continue
        if items and items[-1].startswith(PPL_PREFIX) and "=" in piece and not piece.startswith(PPL_PREFIX):
            items[-1] = f"{items[-1]},{piece}"
        else:
            items.append(piece)
    if not items:
        raise ConfigError("--tasks is empty; give e.g. --tasks ppl:stdlib or an lm-eval task name")
    out: list[TaskSpec] = []
    for item in items:
        if item.startswith(PPL_PREFIX):
            spec = _unquote(item[len(PPL_PREFIX):].strip())
            if not spec:
                raise ConfigError(f"task {item!r} names no data; write ppl:<calibration spec>, e.g. ppl:stdlib")
            out.append(TaskSpec("ppl", spec))
        elif item.lower().endswith((".yaml", ".yml")):
            path = os.path.abspath(os.path.expanduser(_unquote(item)))
            if not os.path.isfile(path):
                raise ConfigError(f"lm-eval task file {item!r} does not exist; give the path of a task YAML file")
            out.append(TaskSpec("yaml", path))
        else:
            out.append(TaskSpec("lm_eval", _unquote(item)))
    labels = [t.label for t in out]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ConfigError(f"--tasks names {', '.join(dupes)} more than once; give each task once")
    return out


def needs_lm_eval(tasks: list[TaskSpec]) -> bool:
    return any(t.kind != "ppl" for t in tasks)


__all__ = ["PPL_PREFIX", "TaskSpec", "needs_lm_eval", "parse_tasks"]

"""Recipes: named, versioned settings files (YAML) shipped with auto_quant, loaded by name or path.

A recipe file holds::

    name: best                 # how it is called (--recipe best)
    kind: tuning               # tuning | scheme | full
    description: "..."
    settings: {iters: 1000, nsamples: 512, lr: 1/iters, ...}
    overrides:                 # optional, applied when the final settings match
      - when: {bits: "<=3"}
        set: {lr: 2/iters}
    run: {...}                 # optional provenance (a saved run's command, model, ...); ignored

``kind`` says what a recipe decides: ``tuning`` recipes (default, best, light, rtn) the tuning
budget, ``scheme`` recipes (w2g64, w3g128, w4g128) the number format, ``full`` recipes
everything (the ``run_config.yaml`` a CLI run saves is one, so a run can be repeated with
``--recipe out/run_config.yaml``). A learning rate may be written ``k/iters`` and is resolved
against the final ``iters``.

Precedence, lowest first: AutoRound's defaults, the tuning (or full) recipe, the scheme
recipe, each recipe's matching ``overrides``, explicit command-line flags.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import yaml

from auto_quant.errors import ConfigError

RECIPE_DIR = Path(__file__).resolve().parent
KINDS = ("tuning", "scheme", "full")
_TOP_KEYS = {"name", "kind", "description", "settings", "overrides", "run"}  # "run": provenance, ignored

# Every key a recipe may set, with the Python types it accepts (None = may be null).
_INT = (int,)
_BOOL = (bool,)
SETTING_TYPES: dict[str, tuple] = {
    "bits": _INT,
    "group_size": _INT,
    "sym": _BOOL,
    "data_type": (str,),
    "scale_dtype": (str,),
    "iters": _INT,
    "nsamples": _INT,
    "seqlen": _INT,
    "batch_size": _INT,
    "gradient_accumulate_steps": _INT,
    "lr": (int, float, str, type(None)),
    "minmax_lr": (int, float, str, type(None)),
    "enable_minmax_tuning": _BOOL,
    "init_search": _BOOL,
    "quant_lm_head": _BOOL,
    "low_gpu_mem_usage": _BOOL,
    "enable_torch_compile": (bool, type(None)),  # null: off
    "cuda_graphs": (bool, type(None)),  # null: off
    "seed": _INT,
    "dataset": (str, type(None)),
    "format": (str,),
    "layer_config": (dict, type(None)),
    "scheme": (str, type(None)),  # gguf:<type> (llama.cpp types); W<n>A16 is written as bits
}
_LR_KEYS = ("lr", "minmax_lr")
_LR_EXPR = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*/\s*iters\s*$")
_WHEN_KEYS = {"bits"}
_COND = re.compile(r"^\s*(<=|>=|==|<|>)?\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class Override:
    """``set`` applies when every condition of ``when`` holds for the final settings."""

    when: Mapping[str, tuple[str, int]]  # key -> (operator, value)
    set: Mapping[str, Any]

    def applies(self, settings: Mapping[str, Any]) -> bool:
        for key, (op, value) in self.when.items():
            have = settings.get(key)
            if have is None:
                return False
            ok = {"<=": have <= value, ">=": have >= value, "==": have == value, "<": have < value, ">": have > value}[op]
            if not ok:
                return False
        return True


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str
    description: str
    settings: Mapping[str, Any]
    overrides: tuple[Override, ...] = ()
    source: str = ""

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "description": self.description,
                               "settings": dict(self.settings)}
        if self.overrides:
            out["overrides"] = [
                {"when": {k: f"{op}{v}" for k, (op, v) in o.when.items()}, "set": dict(o.set)} for o in self.overrides
            ]
        return out


def available_recipes() -> list[str]:
    """Names of the recipes shipped inside the package."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _check_settings(where: str, settings) -> dict:
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: 'settings' must be a mapping of key: value")
    out = {}
    for key, value in settings.items():
        if key not in SETTING_TYPES:
            raise ConfigError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(sorted(SETTING_TYPES))}")
        types = SETTING_TYPES[key]
        if isinstance(value, bool) and bool not in types:
            ok = False
        else:
            ok = isinstance(value, types)
        if not ok:
            names = "/".join("null" if t is type(None) else t.__name__ for t in types)
            raise ConfigError(f"{where}: {key}={value!r} has the wrong type; expected {names}")
        if key in _LR_KEYS and isinstance(value, str) and not _LR_EXPR.match(value):
            raise ConfigError(f"{where}: {key}={value!r} is not a number or 'k/iters' (e.g. 1/iters, 2/iters, 5e-3)")
        out[key] = value
    return out


def _parse_override(where: str, i: int, entry) -> Override:
    here = f"{where}: overrides[{i}]"
    if not isinstance(entry, dict) or set(entry) != {"when", "set"}:
        raise ConfigError(f"{here} must be a mapping with exactly the keys 'when' and 'set'")
    when = entry["when"]
    if not isinstance(when, dict) or not when:
        raise ConfigError(f"{here}.when must be a non-empty mapping like {{bits: '<=3'}}")
    conds = {}
    for key, cond in when.items():
        if key not in _WHEN_KEYS:
            raise ConfigError(f"{here}.when: unknown key {key!r}; allowed: {', '.join(sorted(_WHEN_KEYS))}")
        m = _COND.match(str(cond))
        if m is None or isinstance(cond, bool):
            raise ConfigError(f"{here}.when.{key}={cond!r} is not a comparison like '<=3', '>=4' or 4")
        conds[key] = (m.group(1) or "==", int(m.group(2)))
    return Override(when=MappingProxyType(conds), set=MappingProxyType(_check_settings(f"{here}.set", entry["set"])))


def parse_recipe(data, source: str) -> Recipe:
    """Validate a recipe mapping (from YAML) into a :class:`Recipe`."""
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {source}: the file must hold a mapping with keys {sorted(_TOP_KEYS)}")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(
            f"recipe {source}: unknown key(s) {', '.join(map(repr, sorted(unknown)))}; allowed: {', '.join(sorted(_TOP_KEYS))}"
        )
    name = data.get("name") or Path(source).stem
    kind = data.get("kind", "full")
    if kind not in KINDS:
        raise ConfigError(f"recipe {source}: kind={kind!r} is invalid; use one of {', '.join(KINDS)}")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list):
        raise ConfigError(f"recipe {source}: 'overrides' must be a list of {{when: ..., set: ...}}")
    return Recipe(
        name=str(name),
        kind=kind,
        description=str(data.get("description", "")),
        settings=MappingProxyType(_check_settings(f"recipe {source}", data.get("settings"))),
        overrides=tuple(_parse_override(f"recipe {source}", i, o) for i, o in enumerate(overrides)),
        source=source,
    )


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A shipped recipe by name (``best``) or any recipe file by path."""
    s = str(name_or_path)
    path = Path(s).expanduser()
    if s in available_recipes():
        path = RECIPE_DIR / f"{s}.yaml"
    elif not path.is_file():
        raise ConfigError(
            f"unknown recipe {s!r}; use one of {', '.join(available_recipes())} or the path of a recipe YAML file"
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML{at}; fix the file") from None
    except OSError as e:
        raise ConfigError(f"recipe {str(path)!r} cannot be read: {e.strerror}") from None
    return parse_recipe(data, str(path))


def builtin_defaults() -> dict[str, Any]:
    """AutoRound's own defaults for every recipe key (the lowest precedence)."""
    from auto_quant.autoround import AutoRound

    params = inspect.signature(AutoRound.__init__).parameters
    out = {k: params[k].default for k in SETTING_TYPES if k in params}
    out.setdefault("format", "auto_round")
    out.setdefault("scheme", None)
    if not isinstance(out.get("scale_dtype"), str):
        out["scale_dtype"] = "fp16"
    return out


def order_recipes(recipes: list[Recipe]) -> list[Recipe]:
    """Check for conflicts (two tuning/full or two scheme recipes) and order them: tuning/full, then scheme."""
    base = [r for r in recipes if r.kind in ("tuning", "full")]
    scheme = [r for r in recipes if r.kind == "scheme"]
    if len({r.name for r in base}) > 1:
        raise ConfigError(
            "conflicting recipes " + " and ".join(repr(r.name) for r in base)
            + ": give at most one tuning recipe (default, best, light, rtn, or a saved run)"
        )
    if len({r.name for r in scheme}) > 1:
        raise ConfigError("conflicting recipes " + " and ".join(repr(r.name) for r in scheme) + ": give at most one scheme recipe")
    return base[:1] + scheme[:1]


def _resolve_lr(value, iters: int):
    if isinstance(value, str):
        k = float(_LR_EXPR.match(value).group(1))
        return None if iters == 0 else k / iters
    return None if value is None else float(value)


@dataclass(frozen=True)
class Resolved:
    settings: Mapping[str, Any]  # final values (lr numbers resolved)
    origin: Mapping[str, str] = field(default_factory=dict)  # key -> where the value came from


def resolve(recipes: list[Recipe], explicit: Mapping[str, Any]) -> Resolved:
    """Merge defaults < recipes (with their overrides) < explicit values; resolve ``k/iters`` rates."""
    unknown = set(explicit) - set(SETTING_TYPES)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(SETTING_TYPES))}")
    ordered = order_recipes(list(recipes))
    values: dict[str, Any] = dict(builtin_defaults())
    origin = {k: "default" for k in values}
    for r in ordered:
        for k, v in r.settings.items():
            values[k], origin[k] = v, f"recipe {r.name}"
    for k, v in explicit.items():  # the final bits decide which overrides apply
        values[k] = v
    for r in ordered:
        for o in r.overrides:
            if o.applies(values):
                for k, v in o.set.items():
                    if k not in explicit:
                        values[k], origin[k] = v, f"recipe {r.name} ({', '.join(f'{a}{op}{b}' for a, (op, b) in o.when.items())})"
    for k, v in explicit.items():
        values[k], origin[k] = v, "flag"
    iters = values["iters"]
    for k in _LR_KEYS:
        raw = values.get(k)
        if isinstance(raw, str):
            origin[k] = f"{origin[k]}: {raw.strip()}"
        values[k] = _resolve_lr(raw, iters if isinstance(iters, int) else 0)
    return Resolved(settings=MappingProxyType(values), origin=MappingProxyType(origin))


__all__ = [
    "KINDS",
    "Override",
    "Recipe",
    "Resolved",
    "SETTING_TYPES",
    "available_recipes",
    "builtin_defaults",
    "load_recipe",
    "order_recipes",
    "parse_recipe",
    "resolve",
]

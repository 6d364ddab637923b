"""Turn parsed flags and recipes into one validated plan — every check that needs no model runs here,
before the model is loaded or any tuning time is spent."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from auto_quant.config import TuningConfig, parse_layer_config, resolve_device
from auto_quant.errors import ConfigError
from auto_quant.eval.lm_eval_adapter import check_tasks
from auto_quant.eval.runner import EvalSettings
from auto_quant.eval.tasks import TaskSpec, parse_tasks
from auto_quant.quant.spec import QuantSpec
from auto_quant.recipes import Recipe, load_recipe, resolve

log = logging.getLogger(__name__)

DEFAULT_PPL_NSAMPLES = 32
MAX_DEFAULT_PPL_SEQLEN = 512
EVAL_SEED = 1234  # data order of ppl:<data> tasks, independent of the tuning seed


@dataclass(frozen=True)
class Plan:
    prog: str
    mode: str  # "quantize" or "eval"
    model: str | None
    recipes: tuple[Recipe, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    origin: Mapping[str, str] = field(default_factory=dict)
    output_dir: Path | None = None
    formats: tuple[str, ...] = ()
    device: str = "cpu"
    device_map: str | None = None  # "0,1": tune over these devices (auto_quant.tuning.placement)
    tasks: tuple[TaskSpec, ...] = ()
    eval_baseline: bool = False
    eval_settings: EvalSettings = field(default_factory=EvalSettings)
    report: bool = True
    model_dtype: str | None = None
    trust_remote_code: bool = False
    notes: tuple[str, ...] = ()


def _layer_config_ok(data) -> bool:
    if not isinstance(data, dict):
        return False
    for key, value in data.items():
        if isinstance(value, dict):
            if any(v is None or ":" in str(k) for k, v in value.items()):
                return False
        elif not isinstance(value, int) or isinstance(value, bool):
            return False
    return True


def parse_layer_config_arg(text: str) -> dict:
    """``--layer_config``: a JSON/YAML file, inline JSON/YAML, or auto-round's ``{name:{bits:8}}`` shorthand."""
    if os.path.isfile(text):
        try:
            with open(text, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--layer_config file {text!r} cannot be read as JSON/YAML ({type(e).__name__}); fix it") from None
    else:
        data = None
        for candidate in (text, re.sub(r":(?=\S)", ": ", text)):
            try:
                data = yaml.safe_load(candidate)
            except yaml.YAMLError:
                continue
            if _layer_config_ok(data):
                break
    if not _layer_config_ok(data):
        raise ConfigError(
            f"--layer_config {text!r} is neither a file nor a mapping like "
            "'{\"model.layers.0.mlp.down_proj\": {\"bits\": 8}}'"
        )
    return data


def _apply_scheme_flag(scheme: str | None, explicit: dict) -> None:
    """auto-round's ``--scheme``: W<n>A16 means ``bits=n``; gguf:<type> selects llama.cpp's types."""
    if scheme is None:
        return
    m = re.fullmatch(r"[wW](\d+)[aA]16", scheme.strip())
    if m:
        bits = int(m.group(1))
        if explicit.get("bits", bits) != bits:
            raise ConfigError(f"conflicting --scheme {scheme} and --bits {explicit['bits']}; give one")
        explicit["bits"] = bits
    elif scheme.strip().lower().startswith("gguf:"):
        explicit["scheme"] = scheme.strip().lower()
    else:
        raise ConfigError(f"--scheme {scheme!r} is not supported; use W2A16, W3A16, W4A16, W8A16 or gguf:<type>")


def select_recipes(prog: str, implicit: str, given: str | None) -> list[Recipe]:
    user = [load_recipe(x.strip()) for x in (given or "").split(",") if x.strip()]
    base = [r for r in user if r.kind in ("tuning", "full")]
    if base:
        if implicit != "default" and any(r.name != implicit for r in base):
            raise ConfigError(
                f"{prog} implies --recipe {implicit}, which conflicts with --recipe {base[0].name}; "
                f"run `auto-round --recipe {base[0].name}` instead"
            )
        return user
    return [load_recipe(implicit)] + user


def _accepts_scheme() -> bool:
    import inspect

    from auto_quant.autoround import AutoRound

    return "scheme" in inspect.signature(AutoRound.__init__).parameters


def _model_label(model: str | None) -> str:
    if model is None:
        return "SmolLM2-135M-Instruct"
    name = Path(str(model).rstrip("/")).name
    return name[:-5] if name.endswith(".gguf") else name


EVAL_PREFERENCE = ("sotu", "shakespeare", "pydoc", "stdlib")  # prose first for the default perplexity


def _installed_corpora() -> tuple[list[str], list[str]]:
    """(installed corpora in calibration's default order, installed corpora in evaluation preference)."""
    try:
        from auto_quant.calib import sources

        corpora = getattr(sources, "CORPORA", None) or getattr(sources, "REGISTRY", {})
        calib_order = [n for n in getattr(sources, "OFFLINE_DEFAULT_ORDER", ()) if n in corpora]
        installed = {n for n in corpora if corpora[n].available()}
    except Exception:  # the calibration package changed shape: fall back to the always-present source
        return ["stdlib"], ["stdlib"]
    return [n for n in calib_order if n in installed], [n for n in EVAL_PREFERENCE if n in installed]


def _corpora_in(calibration) -> dict[str, tuple | None] | None:
    """Offline corpora a calibration spec draws from, with their split (None = every file);
    None when the spec is unknown (no dataset given)."""
    if calibration is None:
        return None
    try:
        from auto_quant.calib.spec import parse_dataset_spec

        if os.path.exists(os.path.expanduser(str(calibration))):
            return {}
        return {src.source: src.split for src in parse_dataset_spec(str(calibration)).sources}
    except Exception:
        return {}


def default_eval_spec(calibration: str | None) -> tuple[str, str | None]:
    """The data of the default ``ppl`` task: the ``validation`` split of an installed offline corpus
    (prose preferred) that calibration does not draw from, or draws from only through ``split=train``.
    Returns the spec and a warning when no such corpus exists."""
    _, eval_order = _installed_corpora()
    used = _corpora_in(calibration)
    if used is not None:
        for name in eval_order:
            if name not in used or used[name] == ("train",):
                return f"{name}:split=validation", None
    spec = f"{eval_order[0] if eval_order else 'stdlib'}:split=validation"
    note = (f"the default perplexity data {spec} may overlap the calibration data; calibrate with "
            f"split=train (e.g. --dataset {spec.split(':')[0]}:split=train) or pass --tasks ppl:<other text>")
    return spec, note


def held_out_default_dataset(nsamples: int) -> tuple[str | None, str]:
    """The calibration default (``calib.default_source``) with ``split=train`` on every offline corpus, so
    that the default perplexity on a ``validation`` split is held out. (None, reason) when unavailable."""
    try:
        from auto_quant.calib import default_source
        from auto_quant.calib.spec import DatasetSpec, parse_dataset_spec
        from auto_quant.calib.sources import CORPORA
    except ImportError as e:
        return None, f"calibration package without corpora ({e})"
    spec = default_source(nsamples=nsamples)
    parsed = parse_dataset_spec(spec)
    items = tuple(replace(src, split=("train",)) if src.source in CORPORA and src.split is None else src
                  for src in parsed.sources)
    return str(DatasetSpec(items)), spec


def _tasks(args, calibration: str | None, quantizing: bool = True) -> tuple[list[TaskSpec], list[str]]:
    notes = []
    if getattr(args, "disable_eval", False):
        return [], notes
    if args.tasks in (None, ""):
        spec, note = default_eval_spec(calibration if quantizing else "")
        if note:
            notes.append(note)
        tasks = parse_tasks(f"ppl:{spec}")
    else:
        tasks = parse_tasks(args.tasks)
        for t in tasks:
            if t.kind == "ppl" and calibration is not None and t.value == calibration:
                notes.append(f"task ppl:{t.value} uses the calibration data (another sample order, seed {EVAL_SEED}); "
                             "the figure may be optimistic")
    check_tasks(tasks)
    return tasks, notes


def _eval_settings(args, seqlen: int | None, device: str) -> EvalSettings:
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    ppl_seqlen = args.ppl_seqlen if args.ppl_seqlen is not None else min(seqlen or MAX_DEFAULT_PPL_SEQLEN, MAX_DEFAULT_PPL_SEQLEN)
    return EvalSettings(
        batch_size=args.eval_bs if args.eval_bs is not None else 1,
        limit=limit,
        ppl_seqlen=ppl_seqlen,
        ppl_nsamples=args.ppl_nsamples if args.ppl_nsamples is not None else DEFAULT_PPL_NSAMPLES,
        seed=EVAL_SEED,
        device=device,
        progress=not args.quiet,
    )


def _device(args) -> str:
    dev = resolve_device(args.device)
    return str(dev)


def _device_map(args) -> str | None:
    """A device list (``--device 0,1``) is validated here and spread by the placement planner."""
    if not (args.device and "," in str(args.device)):
        return None
    from auto_quant.tuning.placement import parse_device_map

    parse_device_map(str(args.device))
    return str(args.device)


def plan_quantize(args, prog: str, implicit_recipe: str) -> Plan:
    from auto_quant.cli.args import explicit_settings
    from auto_quant.export import check_output_dir, parse_formats

    explicit = explicit_settings(args)
    layer_config = parse_layer_config_arg(args.layer_config) if args.layer_config is not None else None
    if args.fp_layers:
        layer_config = dict(layer_config or {})
        for name in (x.strip() for x in args.fp_layers.split(",")):
            if name:
                layer_config[re.escape(name)] = {"bits": 16}
    if layer_config is not None:
        explicit["layer_config"] = layer_config
    _apply_scheme_flag(args.scheme, explicit)
    recipes = select_recipes(prog, implicit_recipe, args.recipe)
    resolved = resolve(recipes, explicit)
    s = dict(resolved.settings)
    origin = dict(resolved.origin)
    # typed validation of every value before anything is loaded
    scheme = QuantSpec(bits=s["bits"], group_size=s["group_size"], sym=s["sym"], scale_dtype=s["scale_dtype"])
    TuningConfig(iters=s["iters"], nsamples=s["nsamples"], seqlen=s["seqlen"], batch_size=s["batch_size"],
                 gradient_accumulate_steps=s["gradient_accumulate_steps"], lr=s["lr"], minmax_lr=s["minmax_lr"],
                 seed=s["seed"])
    parse_layer_config(s.get("layer_config"), scheme)
    if s.get("data_type") not in ("int", "int_sym", "int_asym"):
        raise ConfigError(f"--data_type {s.get('data_type')!r} is not supported; auto_quant tunes integer weights (int)")
    if args.act_bits is not None and args.act_bits < 16:
        raise ConfigError(f"--act_bits {args.act_bits} is not supported; auto_quant quantizes weights only (act_bits 16)")
    formats = tuple(parse_formats(s["format"]))
    gguf = [f for f in formats if f.lower().startswith("gguf:")]
    if s.get("scheme") is None and len(gguf) == 1 and _accepts_scheme():
        s["scheme"] = gguf[0].lower()  # as auto-round: --format gguf:<type> implies that type's scheme
        origin["scheme"] = "implied by --format"
    if s.get("scheme") is not None and not _accepts_scheme():
        raise ConfigError(f"scheme {s['scheme']!r} needs GGUF support, which this build of auto_quant lacks")
    device = _device(args)
    tag = (s["scheme"].split(":", 1)[1] if s.get("scheme")
           else f"w{scheme.bits}g{scheme.group_size}{'' if scheme.sym else '-asym'}")
    out = Path(args.output_dir) if args.output_dir else Path("tmp_autoround") / f"{_model_label(args.model)}-{tag}"
    check_output_dir(out)
    if s.get("dataset") is None and not args.disable_eval and args.tasks in (None, ""):
        dataset, base = held_out_default_dataset(s["nsamples"])
        if dataset is not None:
            s["dataset"] = dataset
            origin["dataset"] = "default, train split (validation held out for perplexity)"
    tasks, notes = _tasks(args, s.get("dataset"))
    baseline = args.eval_baseline if args.eval_baseline is not None else (bool(tasks) and all(t.kind == "ppl" for t in tasks))
    return Plan(
        prog=prog, mode="quantize", model=args.model, recipes=tuple(recipes), settings=s, origin=origin,
        output_dir=out, formats=formats, device=device, device_map=_device_map(args), tasks=tuple(tasks),
        eval_baseline=baseline,
        eval_settings=_eval_settings(args, s["seqlen"], device), report=not args.disable_report,
        model_dtype=args.model_dtype, trust_remote_code=bool(args.trust_remote_code), notes=tuple(notes),
    )


def plan_eval(args, prog: str) -> Plan:
    device = _device(args)
    tasks, notes = _tasks(args, None, quantizing=False)
    out = Path(args.output_dir) if args.output_dir else Path("eval_results")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {str(out)!r} exists and is not a directory; choose another path")
    return Plan(prog=prog, mode="eval", model=args.model, output_dir=out, device=device, tasks=tuple(tasks),
                eval_settings=_eval_settings(args, None, device), model_dtype=args.model_dtype,
                trust_remote_code=bool(args.trust_remote_code), notes=tuple(notes))


def describe(plan: Plan) -> str:
    """The effective configuration as aligned lines (printed before the run starts)."""
    rows: list[tuple[str, str, str]] = []
    if plan.mode == "quantize":
        for k in sorted(plan.settings):
            v = plan.settings[k]
            if k == "scheme" and v is None:
                continue
            if k in ("lr", "minmax_lr") and isinstance(v, float):
                v = f"{v:.6g}"
            if k == "dataset" and v is None:
                v = "(offline default; logged at calibration)"
            if k == "minmax_lr" and plan.settings[k] is None:
                v = "(= lr)"
            rows.append((k, str(v), plan.origin.get(k, "")))
    rows.append(("model", str(plan.model or "(embedded SmolLM2-135M-Instruct)"), ""))
    rows.append(("output_dir", str(plan.output_dir), ""))
    rows.append(("device", plan.device_map or plan.device, ""))
    if plan.tasks:
        es = plan.eval_settings
        tasks = ", ".join(t.label for t in plan.tasks)
        if plan.eval_baseline:
            tasks += " (+ float baseline)"
        rows.append(("tasks", tasks, ""))
        if any(t.kind == "ppl" for t in plan.tasks):
            rows.append(("ppl windows", f"{es.ppl_nsamples} x {es.ppl_seqlen} tokens (seed {es.seed})", ""))
    else:
        rows.append(("tasks", "(none)", ""))
    w = max(len(r[0]) for r in rows)
    vw = max(len(r[1]) for r in rows)
    head = f"{plan.prog}: effective configuration"
    if plan.recipes:
        head += f" (recipes: {', '.join(r.name for r in plan.recipes)})"
    lines = [head]
    for k, v, o in rows:
        lines.append(f"  {k.ljust(w)}  {v.ljust(vw)}  {('[' + o + ']') if o else ''}".rstrip())
    return "\n".join(lines)


__all__ = ["Plan", "default_eval_spec", "describe", "parse_layer_config_arg", "plan_eval", "plan_quantize", "select_recipes"]

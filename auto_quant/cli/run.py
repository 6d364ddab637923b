"""The two flows a command runs: quantize (+ evaluate + report) and evaluate an existing model."""

from __future__ import annotations

import datetime as _dt
import logging
import resource
import sys
import time
from pathlib import Path

import torch
import yaml

from auto_quant.cli.plan import Plan
from auto_quant.errors import AutoQuantError
from auto_quant.eval.runner import PreparedData, evaluate, format_table, prepare, results_document, write_results

log = logging.getLogger("auto_quant.cli")

RUN_CONFIG = "run_config.yaml"
EVAL_RESULTS = "eval_results.json"


def _dtype(name: str | None):
    if name in (None, "auto"):
        return None
    return getattr(torch, name)


def _load(plan: Plan):
    from auto_quant.models.loading import load_model

    t0 = time.perf_counter()
    model, tok = load_model(plan.model, dtype=_dtype(plan.model_dtype), trust_remote_code=plan.trust_remote_code)
    log.info("loaded %s in %.1fs", plan.model or "the embedded default model", time.perf_counter() - t0)
    return model, tok


def _evaluate_on_device(model, tok, plan: Plan, prepared: PreparedData, label: str) -> dict:
    """Evaluate with the model on the plan's device; the model goes back where it was afterwards."""
    home = next(model.parameters()).device
    target = torch.device(plan.device)
    moved = target != home
    if moved:
        model.to(target)
    try:
        return evaluate(model, tok, list(plan.tasks), plan.eval_settings, label=label, prepared=prepared)
    finally:
        if moved:
            model.to(home)


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def _autoround_kwargs(s: dict) -> dict:
    keys = ("bits", "group_size", "sym", "iters", "nsamples", "seqlen", "batch_size", "gradient_accumulate_steps", "lr",
            "minmax_lr", "dataset", "layer_config", "seed", "quant_lm_head", "scale_dtype", "data_type",
            "enable_minmax_tuning", "init_search", "low_gpu_mem_usage", "enable_torch_compile", "cuda_graphs")
    out = {k: s[k] for k in keys if k in s}
    if s.get("scheme") is not None:  # only passed when set, so AutoRound without GGUF support still works
        out["scheme"] = s["scheme"]
    return out


def saved_run(plan: Plan, argv: list[str], calibration: str | None) -> dict:
    """The effective configuration as a recipe of kind ``full`` (``--recipe <this file>`` repeats the run)."""
    from auto_quant import __version__

    return {
        "name": "saved-run",
        "kind": "full",
        "description": f"{plan.prog} run of {plan.model or 'the embedded default model'}",
        "settings": dict(plan.settings),
        "run": {
            "auto_quant_version": __version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": [plan.prog, *argv],
            "recipes": [r.name for r in plan.recipes],
            "origin": dict(plan.origin),
            "model": plan.model,
            "output_dir": str(plan.output_dir),
            "device": plan.device,
            "calibration": calibration,
            "tasks": [t.label for t in plan.tasks],
            "eval": plan.eval_settings.to_dict(),
        },
    }


def quantize(plan: Plan, argv: list[str], out=sys.stdout) -> int:
    from auto_quant import AutoRound
    from auto_quant import report as rep

    t_start = time.perf_counter()
    for note in plan.notes:
        log.warning(note)
    model, tok = _load(plan)
    s = dict(plan.settings)
    progress = plan.eval_settings.progress
    ar = AutoRound(model, tok, device=plan.device, device_map=plan.device_map, progress=progress,
                   **_autoround_kwargs(s))
    fmt = ",".join(plan.formats)
    ar.check_save_target(plan.output_dir, fmt)
    prepared = prepare(tok, list(plan.tasks), plan.eval_settings) if plan.tasks else None

    baseline = None
    if plan.tasks and plan.eval_baseline:
        log.info("evaluating the float model")
        baseline = _evaluate_on_device(model, tok, plan, prepared, "float")
    float_bytes = rep.tensor_bytes(model)
    reference = rep.snapshot_weights(model, ar.specs) if plan.report else None

    log.info("quantizing: W%d g%d %s, %d iters, %d samples x %d tokens", s["bits"], s["group_size"],
             "sym" if s["sym"] else "asym", s["iters"], s["nsamples"], s["seqlen"])
    ar.quantize()
    if ar.calibration_description:
        log.info("calibration data: %s", ar.calibration_description)
    paths = ar.save_quantized(plan.output_dir, format=fmt)
    disk = {name: rep.dir_bytes(p) for name, p in paths.items()}
    for name, p in paths.items():
        log.info("saved %s checkpoint to %s (%.1f MB)", name, p, disk[name] / 2**20)
    root = Path(plan.output_dir)
    with open(root / RUN_CONFIG, "w", encoding="utf-8") as f:
        yaml.safe_dump(saved_run(plan, argv, ar.calibration_description), f, sort_keys=False)

    quantized = None
    if plan.tasks:
        log.info("evaluating the quantized model")
        quantized = _evaluate_on_device(model, tok, plan, prepared, "quantized")
        print(format_table(quantized, baseline), file=out)
        results = {"quantized": quantized, **({"baseline": baseline} if baseline is not None else {})}
        doc = results_document(plan.model or "embedded:SmolLM2-135M-Instruct", list(plan.tasks), plan.eval_settings,
                               results, extra={"output_dir": str(root)})
        log.info("evaluation results written to %s", write_results(doc, root / EVAL_RESULTS))

    if plan.report:
        errors = None
        try:
            samples = ar.calibration_samples()
            errors = rep.measure_layer_errors(model, reference, ar.outcome.specs, samples, max_samples=4,
                                              progress=progress)
        except AutoQuantError as e:
            log.warning("per-layer errors not measured: %s", e)
        report = rep.build_report(
            ar.outcome, model_name=plan.model or "SmolLM2-135M-Instruct (embedded)", scheme=ar.config.scheme,
            tuning=ar.export_context().tuning, float_bytes=float_bytes,
            quantized_bytes=rep.quantized_bytes_estimate(model, ar.outcome.specs, rep.tensor_bytes(model)),
            layer_errors=errors, disk_bytes=disk, calibration=ar.calibration_description,
            peak_rss_bytes=_peak_rss_bytes(),
            extra={"evaluation": {"quantized": quantized, "baseline": baseline} if quantized is not None else None,
                   "total_seconds": time.perf_counter() - t_start},
        )
        written = rep.write_report(report, root)
        sm = report["summary"]
        red = sm["mean_block_loss_reduction_vs_rtn"]
        log.info("report: %s%s", ", ".join(str(p) for p in written.values()),
                 "" if red is None else f" (block loss {100 * red:.1f}% below plain RTN on average)")
    print(f"{plan.prog}: quantized model saved to {root} in {time.perf_counter() - t_start:.0f}s", file=out)
    return 0


def evaluate_existing(plan: Plan, out=sys.stdout) -> int:
    import auto_quant  # noqa: F401  (routes auto-round checkpoints to auto_quant's loader)

    for note in plan.notes:
        log.warning(note)
    if not plan.tasks:
        log.warning("no tasks to run")
        return 0
    model, tok = _load(plan)
    prepared = prepare(tok, list(plan.tasks), plan.eval_settings)
    results = _evaluate_on_device(model, tok, plan, prepared, "model")
    print(format_table(results), file=out)
    doc = results_document(str(plan.model or "embedded:SmolLM2-135M-Instruct"), list(plan.tasks), plan.eval_settings,
                           {"model": results})
    path = write_results(doc, Path(plan.output_dir) / EVAL_RESULTS)
    log.info("evaluation results written to %s", path)
    return 0


__all__ = ["EVAL_RESULTS", "RUN_CONFIG", "evaluate_existing", "quantize", "saved_run"]

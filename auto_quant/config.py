"""Typed, frozen, validated configuration shared by the Python API, the CLI and recipes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from auto_quant.errors import ConfigError, LayerConfigError
from auto_quant.quant.spec import QuantSpec, parse_scale_dtype


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} is invalid; it must be an integer >= {minimum}")


@dataclass(frozen=True)
class TuningConfig:
    """How the sign-SGD tuner runs. ``iters == 0`` is plain RTN (no calibration forward)."""

    iters: int = 200
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 8
    gradient_accumulate_steps: int = 1
    lr: float | None = None  # default 1 / iters
    minmax_lr: float | None = None  # default lr
    enable_minmax_tuning: bool = True
    init_search: bool = True  # importance-weighted clipping search before tuning
    eval_samples: int = 32  # fixed subset that judges the best iterate
    eval_points: int = 10  # how many times the subset is evaluated during tuning
    seed: int = 42
    compile: bool = False  # torch.compile the fake-quantizer (fused kernels; a one-off compile per shape)
    # True: record each block's training step as a CUDA graph and replay it (on other devices the
    # same static step runs directly). Off by default: on an H200 it did not beat the eager loop
    # for SmolLM2-sized blocks (docs/benchmarks.md).
    cuda_graphs: bool = False

    def __post_init__(self):
        for name in ("compile", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid; use True or False")
        _check_int("iters", self.iters, 0)
        _check_int("nsamples", self.nsamples, 1)
        _check_int("seqlen", self.seqlen, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("gradient_accumulate_steps", self.gradient_accumulate_steps, 1)
        _check_int("eval_samples", self.eval_samples, 1)
        _check_int("eval_points", self.eval_points, 1)
        _check_int("seed", self.seed, 0)
        for name in ("lr", "minmax_lr"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                raise ConfigError(f"{name}={v!r} is invalid; use a positive number or leave it unset (1/iters)")


@dataclass(frozen=True)
class LayerRule:
    """One ``layer_config`` entry: an exact name or a regular expression, and what to do."""

    pattern: str
    spec: QuantSpec | None  # None keeps the layer in 16 bits

    def matches(self, name: str) -> bool:
        if self.pattern == name:
            return True
        try:
            return re.search(self.pattern, name) is not None
        except re.error:
            return False


@dataclass(frozen=True)
class QuantConfig:
    scheme: QuantSpec = field(default_factory=QuantSpec)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    layer_rules: tuple[LayerRule, ...] = ()
    quant_lm_head: bool = False
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    low_gpu_mem_usage: bool = False
    fused_layers: str = "harmonise"  # layers serving engines fuse: "harmonise" | "error" | "off" (export/fused.py)

    def spec_for(self, name: str, is_lm_head: bool = False) -> QuantSpec | None:
        """The spec a layer gets: an exact-name rule, else the last matching pattern, else the scheme.

        The output head is left in 16 bits unless ``quant_lm_head`` is set or a rule names it.
        """
        exact = [r for r in self.layer_rules if r.pattern == name]
        if exact:
            return exact[-1].spec
        matched = [r for r in self.layer_rules if r.matches(name)]
        if matched:
            return matched[-1].spec
        if is_lm_head and not self.quant_lm_head:
            return None
        return self.scheme

    def check_rules_match(self, names: list[str]) -> None:
        for rule in self.layer_rules:
            if not any(rule.matches(n) for n in names):
                sample = ", ".join(names[:4])
                raise LayerConfigError(
                    f"layer_config entry {rule.pattern!r} matches no quantizable layer; "
                    f"use an exact layer name or a regular expression (layers look like: {sample}, ...)"
                )


_RULE_KEYS = {"bits", "group_size", "sym", "scale_dtype", "data_type", "act_bits"}


def parse_layer_config(layer_config: dict | None, scheme: QuantSpec) -> tuple[LayerRule, ...]:
    """``{"name or regex": {"bits": 16 | 2..8, "group_size": .., "sym": ..}}`` → rules."""
    if not layer_config:
        return ()
    if not isinstance(layer_config, dict):
        raise LayerConfigError("layer_config must be a dict of {layer name or regex: {bits, group_size, sym}}")
    rules = []
    for pattern, entry in layer_config.items():
        if not isinstance(pattern, str) or not pattern:
            raise LayerConfigError(f"layer_config key {pattern!r} must be a non-empty layer name or regex")
        if isinstance(entry, int) and not isinstance(entry, bool):
            entry = {"bits": entry}
        if not isinstance(entry, dict):
            raise LayerConfigError(f"layer_config[{pattern!r}] must be a dict like {{'bits': 8, 'group_size': 128}}")
        unknown = set(entry) - _RULE_KEYS
        if unknown:
            raise LayerConfigError(
                f"layer_config[{pattern!r}] has unknown keys {sorted(unknown)}; allowed: {sorted(_RULE_KEYS)}"
            )
        if entry.get("data_type", "int") not in ("int", "int_sym", "int_asym"):
            raise LayerConfigError(f"layer_config[{pattern!r}]: data_type {entry['data_type']!r} is not supported (use 'int')")
        if entry.get("act_bits", 16) < 16:
            raise LayerConfigError(f"layer_config[{pattern!r}]: activation quantization (act_bits < 16) is not supported")
        bits = entry.get("bits", scheme.bits)
        try:
            re.compile(pattern)
        except re.error as e:
            raise LayerConfigError(f"layer_config key {pattern!r} is not a valid regular expression: {e}") from None
        if bits is not None and not isinstance(bits, bool) and isinstance(bits, int) and bits >= 16:
            rules.append(LayerRule(pattern=pattern, spec=None))
            continue
        try:
            spec = QuantSpec(
                bits=bits,
                group_size=entry.get("group_size", scheme.group_size),
                sym=entry.get("sym", scheme.sym),
                scale_dtype=parse_scale_dtype(entry.get("scale_dtype", scheme.scale_dtype)),
            )
        except ConfigError as e:
            raise LayerConfigError(f"layer_config[{pattern!r}]: {e}") from None
        rules.append(LayerRule(pattern=pattern, spec=spec))
    return tuple(rules)


def resolve_device(device: str | None) -> torch.device:
    from auto_quant.errors import DeviceError

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = str(device).strip()
    if d.isdigit() or (d.replace(",", "").isdigit() and "," in d):
        d = f"cuda:{d.split(',')[0]}"
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} was requested but CUDA is not available on this machine; use --device cpu")
        return torch.device(d)
    if d == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or a GPU index such as '0'")


def config_to_dict(cfg: Any) -> dict:
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if hasattr(v, "__dataclass_fields__"):
            v = v.to_dict() if hasattr(v, "to_dict") else config_to_dict(v)
        elif isinstance(v, tuple) and v and isinstance(v[0], LayerRule):
            v = {r.pattern: (r.spec.to_dict() if r.spec else {"bits": 16}) for r in v}
        elif isinstance(v, torch.dtype):
            v = str(v)
        out[f.name] = v
    return out


__all__ = [
    "TuningConfig",
    "LayerRule",
    "QuantConfig",
    "parse_layer_config",
    "resolve_device",
    "config_to_dict",
    "replace",
]

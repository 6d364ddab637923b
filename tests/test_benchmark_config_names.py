"""The benchmarks' kernel-configuration names: ``benchmarks/kernels.py`` writes them (``tuner_us``) and
``benchmarks/config_pick.py`` reads them back; every field survives the round trip."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_names_round_trip():
    from auto_quant.kernels.dispatch import KernelConfig

    kernels, pick = _load("kernels"), _load("config_pick")
    names = [case.split(":", 2)[2] for case in pick.SESSION_13.split(",")]
    assert len(names) == 18
    for name in names:
        assert kernels.config_name(pick.parse_config(name)) == name
    # two tiles that differ in rows only get different names (they overwrote each other's time before)
    a, b = KernelConfig("wgmma", 128, 64, 128, 1, 4, 3), KernelConfig("wgmma", 256, 64, 128, 1, 4, 3)
    assert kernels.config_name(a) != kernels.config_name(b)
    with pytest.raises(ValueError, match="kind:MxNxK"):
        pick.parse_config("wgmma:128x64")

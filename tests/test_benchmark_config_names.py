"""The benchmarks' kernel-configuration names: ``benchmarks/kernels.py`` writes them (``tuner_us``) and
``benchmarks/config_pick.py`` reads them back; every field survives the round trip."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_benchmark as _load


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


def test_timing_context_reads_back_its_picks(tmp_path):
    """``benchmarks/timing_context.py e2e --picks`` reads the picks that its ``clocks --out`` and ``e2e --out``
    wrote: (M bucket, N, K) keys from both file shapes, configurations intact; its rank correlation is +1 / -1 on
    equal / reversed orders."""
    import json

    from auto_quant.kernels.dispatch import KernelConfig, m_bucket

    tc = _load("timing_context")
    cfg = KernelConfig("mma_kb", 8, 16, 128, 1, 8, 2)
    e2e = tmp_path / "e2e.json"
    e2e.write_text(json.dumps({"picks": {"tuner_1": {str((1, 1024, 4096)): cfg.__dict__}}}))
    clocks = tmp_path / "clocks.json"
    clocks.write_text(json.dumps({"cases": [{"case": "4096x4096:16:w4g128", "picks": {"read": "a", "chain": "b"},
                                             "rows": {"a": {"config": cfg.__dict__}, "b": {"config": cfg.__dict__}}}]}))
    assert tc.load_picks(str(e2e)) == {"tuner_1": {(1, 1024, 4096): cfg.__dict__}}
    got = tc.load_picks(str(clocks))
    assert set(got) == {"read", "chain"} and got["read"] == {(m_bucket(16), 4096, 4096): cfg.__dict__}
    assert KernelConfig(**got["read"][(m_bucket(16), 4096, 4096)]) == cfg
    assert tc.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert tc.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0


def test_format_names_parse_the_same_in_every_script():
    """``w4g128`` / ``w4g128a`` / ``w8g-1``: ``parse_format`` gives the ``(bits, group, sym)`` tuple that
    config_times, timing_context, pdl_ab and gemv_sweep unpack, ``format_dict`` the same as the dict ``kernels.py
    gpu`` takes (a second ``parse_format`` returning the dict once shadowed the first)."""
    kernels = _load("kernels")
    assert kernels.parse_format("w4g128") == (4, 128, True)
    assert kernels.parse_format("w4g128a") == (4, 128, False)
    assert kernels.parse_format("w8g-1") == (8, -1, True)
    assert kernels.format_dict(" w3g64 ") == {"bits": 3, "group_size": 64, "sym": True}
    with pytest.raises(ValueError, match="expected w<bits>g<group size>"):
        kernels.parse_format("q4_0")
    with pytest.raises(SystemExit, match="kernels.py: format"):
        kernels.format_dict("w4")

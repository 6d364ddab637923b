"""``benchmarks/power_probe.py`` without a GPU: its ``nvidia-smi`` sample parsing and summary."""

from __future__ import annotations

from benchmark_scripts import load_benchmark


def test_samples_parse_and_summarize():
    m = load_benchmark("power_probe")
    assert m.parse_sample("1755, 612.34\n") == (1755.0, 612.34)
    assert m.parse_sample("[N/A], 80.1") is None
    assert m.parse_sample("") is None
    assert m.summarize([]) == {"samples": 0}
    s = m.summarize([(1980.0, 700.0), (1755.0, 650.0)])
    assert s == {"samples": 2, "sm_mhz_mean": 1867.5, "sm_mhz_min": 1755.0, "sm_mhz_max": 1980.0,
                 "power_w_mean": 675.0, "power_w_min": 650.0, "power_w_max": 700.0}


def test_sampler_without_nvidia_smi_is_empty(monkeypatch):
    m = load_benchmark("power_probe")
    monkeypatch.setattr(m.shutil, "which", lambda name: None)
    s = m.Sampler(0)
    assert s.between(0.0, 1e9) == {"samples": 0}
    s.close()

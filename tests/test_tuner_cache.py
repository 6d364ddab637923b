"""The tuner's on-disk picks (``kernels/tuner_cache.py``) without a GPU: round trips keyed by GPU and kernel
sources, merging writers, atomic files, unreadable files and entries, unwritable folders, and that a CPU tuner never
touches the cache. The GPU side (a second tuner skips the timing) is in ``test_kernels_gpu.py``."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from auto_quant.errors import ConfigError
from auto_quant.kernels.dispatch import KernelConfig
from auto_quant.kernels.tuner_cache import (TunerCache, default_tuner_cache_dir, entry_key, sources_fingerprint,
                                            tuner_cache)

GPU = "NVIDIA H100 80GB HBM3|sm90|132sm|torch 2.11|triton 3.6"
KEY = (4, 128, False, torch.bfloat16, 16, 4096, 4096, torch.device("cuda", 0))
CFG = KernelConfig("mma_kb", 16, 32, 128, 1, 4, 3)


def test_round_trip_keyed_by_gpu_and_sources(tmp_path):
    TunerCache(tmp_path, sources="a").put(GPU, KEY, CFG)
    assert TunerCache(tmp_path, sources="a").get(GPU, KEY) == CFG
    assert TunerCache(tmp_path, sources="a").get(GPU.replace("sm90", "sm89"), KEY) is None  # another GPU
    assert TunerCache(tmp_path, sources="a").get(GPU, KEY[:4] + (1,) + KEY[5:]) is None  # another row bucket
    assert TunerCache(tmp_path, sources="b").get(GPU, KEY) is None  # other kernel sources: another file
    # the device object is not part of the key (the GPU's fingerprint is), the dtype is written out
    assert json.loads(entry_key(GPU, KEY)) == [GPU, 4, 128, False, "torch.bfloat16", 16, 4096, 4096]


def test_writers_merge_and_files_are_whole(tmp_path):
    one, two = TunerCache(tmp_path, sources="s"), TunerCache(tmp_path, sources="s")
    assert one.get(GPU, KEY) is None and two.get(GPU, KEY) is None  # both read the (empty) folder first
    other = KEY[:4] + (1,) + KEY[5:]
    one.put(GPU, KEY, CFG)
    two.put(GPU, other, KernelConfig("gemv", 1, 512, 32, 33, 4, 3))
    fresh = TunerCache(tmp_path, sources="s")
    assert fresh.get(GPU, KEY) == CFG and fresh.get(GPU, other).kind == "gemv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]  # no temporary file left behind
    assert json.loads((tmp_path / "s.json").read_text())["version"] == 1


def test_unreadable_file_and_entries_are_ignored(tmp_path, caplog):
    (tmp_path / "s.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="auto_quant.kernels.tuner_cache"):
        assert TunerCache(tmp_path, sources="s").get(GPU, KEY) is None
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    TunerCache(tmp_path, sources="s").put(GPU, KEY, CFG)  # replaced by a good file
    assert TunerCache(tmp_path, sources="s").get(GPU, KEY) == CFG
    data = json.loads((tmp_path / "s.json").read_text())
    data["entries"][entry_key(GPU, KEY)]["kind"] = "no_such_kernel"  # an entry these kernels do not take
    (tmp_path / "s.json").write_text(json.dumps(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="auto_quant.kernels.tuner_cache"):
        assert TunerCache(tmp_path, sources="s").get(GPU, KEY) is None
    assert any("ignoring cached kernel pick" in r.getMessage() for r in caplog.records)


def test_unwritable_folder_keeps_the_pick_in_memory(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cache = TunerCache(blocker / "tuner", sources="s")  # its folder cannot be made: a file is in the way
    assert cache.get(GPU, KEY) is None
    with caplog.at_level(logging.WARNING, logger="auto_quant.kernels.tuner_cache"):
        cache.put(GPU, KEY, CFG)  # no exception: a matmul never fails on the cache
    assert any("could not write" in r.getMessage() for r in caplog.records)
    assert cache.get(GPU, KEY) == CFG


def test_sources_fingerprint_follows_every_kernel_file(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    (tmp_path / "notes.txt").write_text("not a source")
    first = sources_fingerprint(str(tmp_path))
    sources_fingerprint.cache_clear()
    (tmp_path / "notes.txt").write_text("changed")
    assert sources_fingerprint(str(tmp_path)) == first
    sources_fingerprint.cache_clear()
    (tmp_path / "b.py").write_text("y = 3\n")
    assert sources_fingerprint(str(tmp_path)) != first
    sources_fingerprint.cache_clear()
    assert len(sources_fingerprint()) == 20  # the installed kernel package's own


def test_cache_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_tuner_cache_dir() == tmp_path / "auto_quant" / "tuner"
    assert tuner_cache("auto").cache_dir == tmp_path / "auto_quant" / "tuner"
    assert tuner_cache(None) is None
    assert tuner_cache(tmp_path / "mine").cache_dir == tmp_path / "mine"
    with pytest.raises(ConfigError, match="tuning_cache is 'auto', None or a folder"):
        tuner_cache(3)


def test_cpu_tuner_never_touches_the_cache(tmp_path):
    """Off CUDA the tuner answers with the shape heuristic: no timing, no fingerprint, no file."""
    from auto_quant.inference.qlinear import QuantLinear
    from auto_quant.kernels.dispatch import Workspace, default_config
    from auto_quant.kernels.pack import from_quant_linear
    from auto_quant.kernels.tuner import Tuner
    from auto_quant.quant import QuantSpec, quantize_weight

    qw = quantize_weight(torch.randn(64, 128), QuantSpec(bits=4, group_size=32, sym=True))
    kw = from_quant_linear(QuantLinear.from_quantized(qw, None, layout="gptq_v2"))
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    tuner = Tuner(cache=TunerCache(tmp_path, sources="s"))
    assert tuner.config(x, kw, None, Workspace()) == default_config(2, 64, 128, x.device, 4, 32, x.dtype)
    assert not any(tmp_path.iterdir())


def test_tuner_takes_a_cached_pick_without_timing(tmp_path, monkeypatch):
    """The tuner's CUDA path up to the timing, on the CPU: the GPU's fingerprint (its properties, torch and Triton)
    keys the lookup, a hit becomes the tuner's pick with nothing timed, and the fingerprint is taken once per
    device. (``test_kernels_gpu.py`` runs the whole path on a GPU.)"""
    import types

    from auto_quant.kernels import tuner_cache as tc
    from auto_quant.kernels.dispatch import Workspace
    from auto_quant.kernels.tuner import Tuner

    triton = pytest.importorskip("triton")
    calls = []

    def props(device):
        calls.append(device)
        return types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132)

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    dev = torch.device("cuda", 0)
    gpu = tc.device_fingerprint(dev)
    assert gpu == f"NVIDIA H100 80GB HBM3|sm90|132sm|torch {torch.__version__}|triton {triton.__version__}"
    kw = types.SimpleNamespace(bits=4, group_size=128, zeros=None, out_features=4096, in_features=4096)
    x = types.SimpleNamespace(shape=(16, 4096), dtype=torch.bfloat16, device=dev)  # what the tuner reads of x
    cache = TunerCache(tmp_path, sources="s")
    tuner = Tuner(cache=cache)
    cache.put(gpu, tuner.key(x, kw), CFG)
    calls.clear()
    for _ in range(2):
        assert tuner.config(x, kw, None, Workspace()) == CFG
    assert tuner.best[tuner.key(x, kw)] == CFG and not tuner.timings and calls == [dev]


def test_picks_list_one_gpus_entries_with_their_dtypes(tmp_path):
    """What the attach compiles ahead: every readable pick of one GPU, its key back in the tuner's form (a torch
    dtype, no device); another GPU's picks and unreadable entries are left out."""
    cache = TunerCache(tmp_path, sources="s")
    fp16 = (4, 128, False, torch.float16, 1, 4096, 4096, torch.device("cuda", 0))
    cache.put(GPU, KEY, CFG)
    cache.put(GPU, fp16, KernelConfig("gemv", 1, 512, 32, 33, 4, 3))
    cache.put(GPU.replace("sm90", "sm89"), KEY, CFG)
    data = json.loads(cache.path.read_text())
    data["entries"][json.dumps([GPU, 4, 128, False, "torch.notadtype", 1, 64, 64])] = {"kind": "gemv"}
    data["entries"][json.dumps([GPU, 4, 128])] = {"kind": "gemv"}  # another key layout
    data["entries"][json.dumps([GPU, 4, 128, False, "torch.float16", 2, 64, 64])] = {"kind": "nope"}
    cache.path.write_text(json.dumps(data))
    picks = dict(TunerCache(tmp_path, sources="s").picks(GPU))
    assert picks == {KEY[:-1]: CFG, fp16[:-1]: KernelConfig("gemv", 1, 512, 32, 33, 4, 3)}
    assert TunerCache(tmp_path, sources="s").picks("another GPU") == []
    assert TunerCache(tmp_path / "empty", sources="s").picks(GPU) == []


def test_kernels_taking_a_row_count_do_not_specialize_on_it():
    """Triton specializes an integer argument on being 1 and on being a multiple of 16; every kernel that takes the
    row count ``M`` opts out, so one compile (ahead, at a bucket's row count) serves every call of a row bucket."""
    from auto_quant.kernels import gluon_mma, gluon_wgmma, triton_gemv, triton_gemv_rows, triton_qmm, triton_qmm_wt

    taking_m = []
    for mod in (gluon_mma, gluon_wgmma, triton_gemv, triton_gemv_rows, triton_qmm, triton_qmm_wt):
        for name, obj in vars(mod).items():
            params = {p.name: p for p in getattr(obj, "params", [])}
            rows = "M" if "M" in params else "M_rows"  # the mma kernel: a constexpr ONE_ROW beside it
            if name.endswith("_kernel") and rows in params:
                taking_m.append(name)
                assert params[rows].do_not_specialize, f"{mod.__name__}.{name} specializes on {rows}"
    assert len(taking_m) == 5, taking_m


def test_compile_cached_skips_cpu_layers_and_a_tuner_without_cache(tmp_path):
    from auto_quant.kernels import pack_codes
    from auto_quant.kernels.dispatch import Workspace
    from auto_quant.kernels.tuner import Tuner
    from auto_quant.quant import QuantSpec, quantize_weight

    qw = quantize_weight(torch.randn(64, 128), QuantSpec(bits=4, group_size=64, sym=True))
    kw = pack_codes(qw.codes, qw.zero, qw.scale, 4, 64, torch.float16)
    cache = TunerCache(tmp_path, sources="s")
    cache.put(GPU, (4, 64, False, torch.float16, 1, 64, 128, torch.device("cuda", 0)), CFG)
    tuner = Tuner(cache=cache)
    assert tuner.compile_cached([(kw, None)], Workspace()) == 0 and not tuner.best
    assert Tuner(cache=None).compile_cached([(kw, None)], Workspace()) == 0

"""Backend registry: selection as data, forcing, the install hint, and the CPU backends' numerics."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from auto_quant.errors import BackendError
from auto_quant.inference import backends as B
from auto_quant.inference.cpu_int4 import kernel_group, pack_int4_cpu
from auto_quant.inference.qlinear import QuantLinear
from auto_quant.quant import QuantSpec, quantize_weight


def make_layer(out_f=64, in_f=256, bits=4, group_size=32, sym=True, layout="gptq_v2", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    qw = quantize_weight(w, QuantSpec(bits=bits, group_size=group_size, sym=sym))
    b = torch.randn(out_f, generator=g) if bias else None
    return QuantLinear.from_quantized(qw, b, layout=layout, bias_dtype=torch.float32)


def key(**kw):
    base = dict(in_features=256, out_features=64, bits=4, group_size=128, sym=True, layout="gptq")
    base.update(kw)
    return B.LayerKey(**base)


def only(*names):
    return lambda b: b.name in names


# ----------------------------------------------------------------------------------- selection


def test_selection_prefers_priority_among_installed():
    k = key()
    assert B.select_backend(k, "cpu", available=only("torch", "torch_cpu_int4")).name == "torch_cpu_int4"
    assert B.select_backend(k, "cpu", available=only("torch")).name == "torch"
    # triton measured faster than marlin everywhere: marlin serves where triton is missing
    assert B.select_backend(k, "cuda", available=only("torch", "triton", "marlin")).name == "triton"
    assert B.select_backend(k, "cuda", available=only("torch", "marlin")).name == "marlin"
    assert B.select_backend(k, "cuda", "marlin", available=only("torch", "triton", "marlin")).name == "marlin"
    # marlin: symmetric only, in % 128, out % 64
    assert B.select_backend(key(sym=False), "cuda", available=only("torch", "marlin")).name == "torch"
    assert B.select_backend(key(in_features=192), "cuda", available=only("torch", "marlin")).name == "torch"
    # triton takes half-precision activations only
    assert B.select_backend(k, "cuda", act_dtype=torch.float32, available=only("torch", "triton")).name == "torch"
    # the CPU kernels are chosen for float32 models too (the exact reference is 20-300x slower); forcing "torch"
    # keeps the exact reference
    cpu = only("torch", "torch_cpu_int4", "cpu_gemv")
    for dt in (torch.bfloat16, torch.float32):
        assert B.select_backend(k, "cpu", act_dtype=dt, available=cpu).name == "cpu_gemv"
        no_compiler = only("torch", "torch_cpu_int4")
        assert B.select_backend(k, "cpu", act_dtype=dt, available=no_compiler).name == "torch_cpu_int4"
    assert B.select_backend(k, "cpu", "torch", act_dtype=torch.float32, available=cpu).name == "torch"
    # an end-of-life package is never recommended
    torch_b = next(b for b in B.BACKENDS if b.name == "torch")
    up = B.better_if_installed(k, "cpu", torch_b, act_dtype=torch.float32, available=only("torch"))
    assert up is not None and up.name == "cpu_gemv"  # a missing compiler is named
    no_gemv = tuple(b for b in B.BACKENDS if b.name != "cpu_gemv")
    assert B.better_if_installed(k, "cpu", torch_b, no_gemv, torch.float32, available=only("torch")) is None


def test_selection_asks_about_lower_backends_only_when_better_ones_are_missing():
    asked = []

    def available(b):  # answering for marlin would import GPTQModel, which sets environment variables
        asked.append(b.name)
        return b.name in ("triton", "marlin", "torch")

    assert B.select_backend(key(), "cuda", available=available).name == "triton"
    assert asked == ["triton"]


def test_shape_and_format_constraints_are_declared():
    int4 = next(b for b in B.BACKENDS if b.name == "torch_cpu_int4")
    assert int4.serves(key(), "cpu")
    assert not int4.serves(key(out_features=40), "cpu")  # out % 16
    assert not int4.serves(key(in_features=200), "cpu")  # in % 32
    assert not int4.serves(key(bits=8), "cpu")
    assert not int4.serves(key(group_size=48), "cpu")  # group must be a multiple of 32
    assert int4.serves(key(in_features=576, group_size=128), "cpu")  # runs as kernel group 64
    why = int4.mismatches(key(bits=8, out_features=40), "cuda")
    assert any("cpu" in w for w in why) and any("8" in w for w in why) and any("16" in w for w in why)
    triton = next(b for b in B.BACKENDS if b.name == "triton")
    assert not triton.serves(key(bits=5), "cuda") and not triton.serves(key(group_size=256), "cuda")
    assert triton.serves(key(bits=3, group_size=-1, sym=False, layout="awq"), "cuda")


def test_forcing_errors_are_clear():
    k = key()
    with pytest.raises(BackendError, match=r"unknown backend 'fast'.*torch_cpu_int4"):
        B.select_backend(k, "cpu", forced="fast")
    with pytest.raises(BackendError, match=r"'triton' cannot serve .* on cpu: it runs on cuda.*Backends that can: "
                                           r"torch_cpu_int4, torch"):
        B.select_backend(k, "cpu", forced="triton", available=only("torch", "torch_cpu_int4", "triton"))
    with pytest.raises(BackendError, match=r"'marlin' is not available here; pip install gptqmodel"):
        B.select_backend(k, "cuda", forced="marlin", available=only("torch", "triton"))
    assert B.select_backend(k, "cpu", forced="auto_round:torch", available=only("torch")).name == "torch"


def test_layer_no_installed_backend_serves_names_what_would():
    table = tuple(b for b in B.BACKENDS if b.name != "torch")
    with pytest.raises(BackendError) as e:
        B.select_backend(key(), "cuda", table=table, available=only("torch_cpu_int4"))
    msg = str(e.value)
    assert "no installed backend serves a 4-bit g128 sym" in msg
    assert "marlin (pip install gptqmodel" in msg and "triton (pip install triton)" in msg
    with pytest.raises(BackendError, match=r"no backend serves a 7-bit .* re-quantize with bits in \[2, 3, 4, 5, 6, 8\]"):
        B.select_backend(key(bits=7), "cpu")
    with pytest.raises(BackendError, match=r"no backend serves a 5-bit .* it could run on cpu, hpu, xpu: move the model there"):
        B.select_backend(key(bits=5), "cuda", table=table, available=only("torch_cpu_int4"))


def test_better_backend_hint_and_choice_logged_once(caplog):
    fast = dataclasses.replace(next(b for b in B.BACKENDS if b.name == "torch_cpu_int4"), name="fast_cpu",
                               priority=99, requires=("no_such_package_for_auto_quant",), pip="pip install fast-cpu")
    table = tuple(b for b in B.BACKENDS if b.name != "cpu_gemv") + (fast,)  # cpu_gemv needs a compiler
    model = torch.nn.Sequential(make_layer(seed=1), torch.nn.ReLU(), make_layer(in_f=64, seed=2),
                                make_layer(bits=8, in_f=64, seed=3))
    with caplog.at_level(logging.INFO, logger="auto_quant.inference.backends"):
        chosen = B.attach_backends(model, table=table)
    assert chosen == {"0": "torch_cpu_int4", "2": "torch_cpu_int4", "3": "torch"}
    lines = [r.getMessage() for r in caplog.records]
    assert sum("backend torch_cpu_int4 for 2 4-bit g32 sym layers on cpu" in m for m in lines) == 1
    assert sum("backend torch for 1 8-bit" in m for m in lines) == 1
    hint = [m for m in lines if "faster backends" in m]
    assert len(hint) == 1 and "2 layers would use fast_cpu instead of torch_cpu_int4 (pip install fast-cpu)" in hint[0]


def test_a_missing_compiler_is_named_as_what_would_enable_the_cpu_kernel():
    eight_bit = key(bits=8, group_size=32)  # torch_cpu_int4 serves 2-4 bits: without gcc only the reference is left
    torch_b = next(b for b in B.BACKENDS if b.name == "torch")
    assert B.select_backend(eight_bit, "cpu", available=only("torch", "torch_cpu_int4")) == torch_b
    up = B.better_if_installed(eight_bit, "cpu", torch_b, available=only("torch", "torch_cpu_int4"))
    assert up is not None and up.name == "cpu_gemv" and "apt-get install gcc" in up.install_hint()
    assert B.better_if_installed(eight_bit, "cpu", torch_b, available=only("torch", "cpu_gemv")) is None


def test_unimportable_package_is_not_installed():
    broken = dataclasses.replace(B.BACKENDS[0], name="x", requires=("auto_quant._no_such_module",))
    assert not broken.available()
    assert dataclasses.replace(B.BACKENDS[0], name="y", requires=("torch",)).available()
    assert not dataclasses.replace(B.BACKENDS[0], name="z", torch_ops=("_no_such_op",)).available()


# ----------------------------------------------------------------------------------- CPU numerics


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_cpu_int4_matches_reference(bits, group_size, sym):
    layouts = ["gptq_v2"] + (["gptq"] if sym else []) + (["awq"] if bits == 4 else [])
    for layout in layouts:
        layer = make_layer(out_f=48, in_f=192, bits=bits, group_size=group_size, sym=sym, layout=layout)
        x = torch.randn(3, 5, 192)
        ref = layer(x)  # reference path: nothing attached
        B.attach_backends(layer, backend="torch_cpu_int4")
        assert layer.backend == "torch_cpu_int4"
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            y = layer(x.to(dt))
            assert y.dtype == dt and y.shape == (3, 5, 48)
            assert rel_err(y, ref) < 1e-2, (layout, dt, rel_err(y, ref))
        B.detach_backends(layer)


def test_cpu_int4_kernel_group_splits_checkpoint_groups():
    assert kernel_group(576, 128) == 64  # SmolLM2: 576 = 4.5 x 128
    assert kernel_group(4096, -1) == 256 and kernel_group(4096, 512) == 256 and kernel_group(96, -1) == 32
    assert kernel_group(200, -1) is None
    layer = make_layer(out_f=32, in_f=576, group_size=128, sym=False)
    x = torch.randn(2, 576)
    ref = layer(x)
    B.attach_backends(layer, backend="torch_cpu_int4")
    assert layer.backend == "torch_cpu_int4" and layer.kernel.run.group == 64
    assert rel_err(layer(x), ref) < 1e-2
    codes = torch.randint(0, 16, (40, 64))
    with pytest.raises(ValueError, match="does not fit"):
        pack_int4_cpu(codes, torch.full((40, 2), 8), torch.ones(40, 2), 32)


def test_dense_fallback_matches_reference():
    from auto_quant.inference import dense

    layer = make_layer(bits=8, group_size=64, sym=False)
    x = torch.randn(4, 256)
    run = dense.prepare(layer, B.AttachContext(act_dtype=torch.float32))
    assert rel_err(run(x), layer(x)) < 1e-5


def test_forward_dispatch_keeps_reference_path():
    layer = make_layer(bits=8, group_size=64)
    x = torch.randn(2, 256)
    ref = layer.forward_reference(x)
    assert torch.equal(layer(x), ref)  # nothing attached
    B.attach_backends(layer, "torch", act_dtype=torch.float32)  # a bare layer has no float parameter to tell its dtype
    assert layer.backend == "torch" and torch.equal(layer(x), ref)


@pytest.mark.parametrize("bits,sym,layout", [(2, True, "gptq_v2"), (3, False, "gptq_v2"), (4, True, "gptq"),
                                             (4, False, "awq"), (8, False, "gptq_v2")])
def test_reference_in_row_slices_equals_the_whole_weight(bits, sym, layout):
    """A weight larger than the reference's chunk goes through it in slices of output rows (bounded memory); the
    slices, a ragged last one included, give what the whole dequantized weight gives."""
    layer = make_layer(out_f=100, in_f=96, bits=bits, group_size=32, sym=sym, layout=layout)
    whole = layer.dequantize_weight()
    for start, stop in ((0, 32), (32, 64), (64, 100), (32, 100)):
        assert torch.equal(layer.dequantize_rows(start, stop), whole[start:stop])
    x = torch.randn(3, 96, dtype=torch.float64)
    want = torch.nn.functional.linear(x, whole.double(), layer.bias.double())
    for chunk in (32 * 96, 64 * 96, 100 * 96):  # 32-row slices with a 4-row tail, 64 + 36, and one piece
        got = layer.forward_reference(x, chunk_weights=chunk)
        assert got.shape == (3, 100) and torch.allclose(got, want, rtol=1e-12, atol=1e-12), chunk
    for start, stop in ((16, 48), (0, 101), (64, 64)):
        with pytest.raises(ValueError, match="multiple of 32"):
            layer.dequantize_rows(start, stop)


# ----------------------------------------------------------------------------------- through transformers


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    from tiny_models import tiny_model, token_data

    from auto_quant import AutoRound

    model = tiny_model("llama", intermediate_size=192)
    out = tmp_path_factory.mktemp("q") / "tiny_w4"
    AutoRound(model, None, bits=4, group_size=32, sym=False, iters=0, dataset=token_data(2, 32), nsamples=2,
              seqlen=32, progress=False).quantize_and_save(str(out))
    return out


def test_from_pretrained_attaches_and_forcing_errors(saved_tiny, caplog):
    from transformers import AutoModelForCausalLM

    from auto_quant import AutoRoundConfig

    with caplog.at_level(logging.INFO, logger="auto_quant.inference.backends"):
        m = AutoModelForCausalLM.from_pretrained(saved_tiny, dtype=torch.bfloat16)
    qls = [mod for mod in m.modules() if isinstance(mod, QuantLinear)]
    auto_cpu = "cpu_gemv" if B.c_compiler_found() else "torch_cpu_int4"
    assert qls and {q.backend for q in qls} == {auto_cpu}
    assert any(f"backend {auto_cpu} for" in r.getMessage() for r in caplog.records)
    assert not any("faster backends" in r.getMessage() for r in caplog.records)
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        fast = m(ids).logits
        B.detach_backends(m)
        ref = m(ids).logits
    assert rel_err(fast, ref) < 2e-2
    # float32 takes the CPU kernel too; backend="torch" forces the exact reference
    m32 = AutoModelForCausalLM.from_pretrained(saved_tiny, dtype=torch.float32)
    assert {q.backend for q in m32.modules() if isinstance(q, QuantLinear)} == {auto_cpu}
    exact = AutoModelForCausalLM.from_pretrained(saved_tiny, dtype=torch.float32,
                                                 quantization_config=AutoRoundConfig(backend="torch"))
    assert {q.backend for q in exact.modules() if isinstance(q, QuantLinear)} == {"torch"}
    with torch.no_grad():
        assert rel_err(m32(ids).logits, exact(ids).logits) < 2e-2
    with pytest.raises(BackendError, match=r"backend 'triton' cannot serve .* runs on cuda, not cpu"):
        AutoModelForCausalLM.from_pretrained(saved_tiny, dtype=torch.float32,
                                             quantization_config=AutoRoundConfig(backend="triton"))


def test_tuning_cache_option_reaches_the_triton_tuner(saved_tiny, tmp_path, monkeypatch):
    """``AutoRoundConfig(tuning_cache=...)`` (default ``"auto"``: under ``$XDG_CACHE_HOME``) is what the attach
    context hands the Triton backend's tuner; a wrong value fails the load with a ConfigError; a CPU model writes
    nothing."""
    from transformers import AutoModelForCausalLM

    from auto_quant import AutoRoundConfig
    from auto_quant.errors import ConfigError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    def cache_of(**kw):
        m = AutoModelForCausalLM.from_pretrained(saved_tiny, dtype=torch.bfloat16, **kw)
        caches = {id(q.kernel.ctx.tuning_cache): q.kernel.ctx.tuning_cache
                  for q in m.modules() if isinstance(q, QuantLinear)}
        assert len(caches) == 1  # one per model
        with torch.no_grad():
            m(torch.randint(0, 200, (1, 5)))
        return next(iter(caches.values()))

    assert cache_of().cache_dir == tmp_path / "xdg" / "auto_quant" / "tuner"
    assert cache_of(quantization_config=AutoRoundConfig(tuning_cache=None)) is None
    mine = cache_of(quantization_config=AutoRoundConfig(tuning_cache=str(tmp_path / "mine")))
    assert mine.cache_dir == tmp_path / "mine"
    # nothing tuned on the CPU (the xdg folder may hold cpu_gemv's build, when this process had not loaded it yet)
    assert not (tmp_path / "xdg" / "auto_quant" / "tuner").exists() and not (tmp_path / "mine").exists()
    with pytest.raises(ConfigError, match="tuning_cache"):
        cache_of(quantization_config=AutoRoundConfig(tuning_cache=3))


def test_triton_op_config_round_trips_every_kernel_kind():
    from auto_quant.inference.triton_backend import config_from_ints, config_ints
    from auto_quant.kernels.dispatch import KERNEL_KINDS, KernelConfig

    configs = [KernelConfig("gemv", 1, 512, 16, 66, 4, 1), KernelConfig("fma", 1, 512, 32, 8, 4, 1),
               KernelConfig("tdot", 64, 64, 128, 2, 4, 3), KernelConfig("dot", 16, 64, 32, 4, 4, 3),
               KernelConfig("dequant", 1, 64, 4), KernelConfig("wgmma", 16, 64, 128, 1, 4, 4),
               KernelConfig("mma", 8, 128, 64, 16, 4, 3), KernelConfig("mma_kw", 1, 16, 128, 1, 8, 2),
               KernelConfig("mma_kb", 8, 16, 128, 1, 8, 2)]
    seen = set()
    for cfg in configs:
        ints = config_ints(cfg)
        assert all(type(v) is int for v in ints)
        assert config_from_ints(ints) == cfg
        seen.add(ints[0])
    assert len(seen) == len(KERNEL_KINDS)


def test_triton_op_output_shape_without_running_a_kernel():
    """The op's fake: what torch.compile traces with (here on meta tensors, so no GPU is needed)."""
    import auto_quant.inference.triton_backend  # noqa: F401  (registers the op)

    meta = dict(device="meta")
    x = torch.empty(2, 5, 256, dtype=torch.bfloat16, **meta)
    out = torch.ops.auto_quant.triton_matmul(x, torch.empty(32, 96, dtype=torch.int32, **meta), None,
                                             torch.empty(2, 96, dtype=torch.bfloat16, **meta), None, None, None, None,
                                             4, 128, 96, [])
    assert out.shape == (2, 5, 96) and out.dtype == torch.bfloat16


def test_triton_layer_is_freed_without_the_cycle_collector():
    """The function dynamo calls while tracing reaches its layer weakly: dropping a model frees its layers' weights
    at once, not at the next cycle collection (a strong closure would make a cycle layer -> function -> layer)."""
    import gc
    import weakref

    from auto_quant.inference.triton_backend import TritonLinear
    from auto_quant.kernels.dispatch import Workspace

    layer = TritonLinear(make_layer(group_size=128), None, Workspace())
    ref = weakref.ref(layer)
    gc.disable()
    try:
        del layer
        assert ref() is None
    finally:
        gc.enable()


def test_triton_layer_marks_its_kernel_tensors_static_for_cuda_graphs():
    """A compiled graph reaches the kernel layout through a plain object, not as module parameters: unmarked,
    ``reduce-overhead`` CUDA graphs copied the whole weight into static buffers at every replay (H100, transformers'
    generate() of a 16-block Llama-3-8B shape: 105.8 tokens/s unmarked, 243.6 marked)."""
    from auto_quant.inference.triton_backend import TritonLinear
    from auto_quant.kernels.dispatch import Workspace

    module = make_layer(group_size=128)
    layer = TritonLinear(module, None, Workspace())
    for t in (layer.weight.qweight, layer.op_qweight, layer.weight.scales, module.bias):
        assert getattr(t, "_dynamo_static_input_type", None) is not None


def test_a_deep_copy_of_a_triton_layer_picks_for_itself():
    """A deep copy gets its own weight, bindings and trace-time pick: the pick dynamo calls must reach the copy,
    not the layer it was copied from (which may be gone)."""
    import copy

    from auto_quant.inference.triton_backend import TritonLinear, config_ints
    from auto_quant.kernels.dispatch import KernelConfig, Workspace

    module = make_layer(group_size=128)
    layer = TritonLinear(module, None, Workspace())
    copied = copy.deepcopy(layer)
    assert copied._module is not module and copied.weight.qweight.data_ptr() != layer.weight.qweight.data_ptr()
    assert copied.op_qweight.data_ptr() == copied.weight.qweight.data_ptr()
    assert copied.op_qweight.auto_quant_bound is copied.bound and copied.bound is not layer.bound
    picked = []
    copied.pick = lambda dtype, rows: picked.append((dtype, rows)) or KernelConfig("gemv", block_n=32)
    del layer
    assert copied.pick_for_trace(torch.float16, 4) == config_ints(KernelConfig("gemv", block_n=32))
    assert picked == [(torch.float16, 4)]


def test_the_compiled_op_finds_the_layers_bound_launches_on_a_view_of_its_weight():
    """The op's arguments are tensors and ints: a traced call passes a view of the packed weight (same storage)
    that carries the layer's bound launches, so the module's own buffers (its state dict) stay plain tensors."""
    import pickle

    from auto_quant.inference.triton_backend import TritonLinear
    from auto_quant.kernels.dispatch import Workspace

    module = make_layer(group_size=128)
    layer = TritonLinear(module, None, Workspace())
    assert layer.op_qweight.auto_quant_bound is layer.bound
    assert layer.op_qweight.data_ptr() == layer.weight.qweight.data_ptr()
    assert all(not hasattr(t, "auto_quant_bound") for t in module.state_dict().values())
    pickle.dumps(module.state_dict())

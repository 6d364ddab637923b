"""The memory planner's arithmetic (hand-computed), device_map parsing, and the spread pipeline on CPU."""

from __future__ import annotations

import pytest
import torch
import transformers

from auto_quant import AutoRound
from auto_quant.errors import DeviceError, PlacementError
from auto_quant.tuning.placement import (
    GiB,
    DeviceBudget,
    LinearShape,
    ModelShape,
    PlanSettings,
    block_base_bytes,
    cache_bytes,
    linear_cost,
    parse_device_map,
    plan_placement,
    transfer_bytes,
)
from tiny_models import token_data, tiny_model


def llama3_8b() -> ModelShape:
    return ModelShape.from_config(transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False))


def qwen25_05b() -> ModelShape:
    return ModelShape.from_config(transformers.Qwen2Config(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True))


S8B = PlanSettings(nsamples=128, seqlen=2048, batch_size=8, dtype=torch.bfloat16, group_size=128)


# ------------------------------------------------------------------ arithmetic by hand
def test_linear_cost_by_hand():
    # O=8, I=10, g=4 -> I'=12, G=3; bf16 (2 bytes)
    c = linear_cost(LinearShape("x", 8, 10), PlanSettings(dtype=torch.bfloat16, group_size=4))
    assert c.weight == 8 * 10 * 2 == 160
    assert c.grouped == c.tunables == 4 * 8 * 12 + 4 * 2 * 8 * 3 == 576
    assert c.grads == 576 and c.snapshots == 1152
    assert c.autograd == 2 * 384 + 160 == 928 and c.transient == 768
    assert c.resident == 160 + 3 * 576 + 1152 + 928 == 3968
    no_mm = linear_cost(LinearShape("x", 8, 10, bias=True), PlanSettings(dtype=torch.float32, group_size=-1, tune_minmax=False))
    # one group per row (I'=10, G=1), float32, bias, min/max not tuned (no gradients for them)
    assert no_mm.weight == 8 * 10 * 4 + 8 * 4
    assert no_mm.grads == 4 * 8 * 10


def test_block_base_and_cache_by_hand():
    m = ModelShape(hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1, vocab_size=10,
                   head_dim=4, linears=(LinearShape("a", 8, 8),), block_other_params=16, outside_params=0)
    s = PlanSettings(nsamples=5, seqlen=3, batch_size=2, dtype=torch.float16)
    # params 16*2; batch 2*3*8*(2*2+12); acts 2*3*((6*8 + 2*(8 + 2*4))*2 + 4*8*4 + 4*16*2)
    assert block_base_bytes(m, s) == 32 + 768 + 6 * (160 + 128 + 128) == 3296
    eager = PlanSettings(nsamples=5, seqlen=3, batch_size=2, dtype=torch.float16, eager_attention=True)
    assert block_base_bytes(m, eager) == 3296 + 2 * 2 * 2 * 3 * 3 * 2
    assert cache_bytes(m, s) == 4 * 5 * 3 * 8 * 2
    assert transfer_bytes(LinearShape("a", 16, 8), s) == 2 * 3 * 24 * 2


def test_real_shapes_from_configs():
    m = llama3_8b()
    assert m.total_params == 8_030_261_248  # Llama-3-8B
    assert [(l.name, l.out_features, l.in_features) for l in m.linears][:3] == [
        ("self_attn.q_proj", 4096, 4096), ("self_attn.k_proj", 1024, 4096), ("self_attn.v_proj", 1024, 4096)]
    assert linear_cost(m.linears[0], S8B).resident == 542_113_792  # 33554432 + 3*68157440 + 136314880 + 167772160
    q = qwen25_05b()
    assert q.total_params == 494_032_768  # Qwen2.5-0.5B (tied head, q/k/v biases)
    assert [l.bias for l in q.linears] == [True, True, True, False, False, False, False]


def test_shape_from_model_matches_config():
    model = tiny_model("llama")
    from_model, from_cfg = ModelShape.from_model(model), ModelShape.from_config(model.config)
    assert from_model.linears == from_cfg.linears
    assert from_model.total_params == from_cfg.total_params == sum(p.numel() for p in model.parameters())
    assert from_model.block_prefix == "model.layers"


def test_8b_on_one_80g_gpu_everything_on_it():
    m = llama3_8b()
    plan = plan_placement(m, S8B, [DeviceBudget("cuda:0", 80 * GiB)])
    assert plan.cache == "device" and not plan.spread and len(plan.assignment) == 32 * 7
    costs = [linear_cost(l, S8B) for l in m.linears]
    expected = (block_base_bytes(m, S8B) + cache_bytes(m, S8B) + sum(c.resident for c in costs)
                + max(c.transient for c in costs))
    assert dict(plan.peak)["cuda:0"] == expected
    assert cache_bytes(m, S8B) == 8 * GiB  # 4 x 128 x 2048 x 4096 x 2 bytes
    assert dict(plan.peak)["cpu"] == m.total_params * 2
    text = plan.describe()
    assert "mlp.down_proj" in text and "peak cuda:0" in text


def test_8b_spreads_over_two_small_gpus_and_offloads_the_cache():
    m = llama3_8b()
    gpus = [DeviceBudget("cuda:0", 12 * GiB), DeviceBudget("cuda:1", 12 * GiB)]
    plan = plan_placement(m, S8B, gpus, cpu_free_bytes=200 * GiB)
    assert plan.cache == "cpu" and plan.spread and plan.notes
    used = {d for _, d in plan.assignment}
    assert used == {"cuda:0", "cuda:1"}
    peak = dict(plan.peak)
    for d in gpus:
        assert peak[d.name] + GiB <= d.free_bytes
    largest = max(linear_cost(l, S8B).resident + transfer_bytes(l, S8B) for l in m.linears)
    assert abs(peak["cuda:0"] - peak["cuda:1"]) < largest  # balanced to within one linear
    assert peak["cpu"] == m.total_params * 2 + cache_bytes(m, S8B)
    # every block gets the same split
    per_block = {}
    for name, dev in plan.assignment:
        per_block.setdefault(name.split(".", 3)[3], set()).add(dev)
    assert all(len(v) == 1 for v in per_block.values())


def test_refusals_name_what_would_fit():
    m = llama3_8b()
    with pytest.raises(PlacementError) as e:
        plan_placement(m, S8B, [DeviceBudget("cuda:0", 10 * GiB)])
    msg = str(e.value)
    assert "batch_size=" in msg and "1 more GPU(s)" in msg
    with pytest.raises(PlacementError) as e:  # cache pinned to the device (low_gpu_mem_usage off, not auto)
        plan_placement(m, PlanSettings(nsamples=512, seqlen=2048, batch_size=8, cache="device"),
                       [DeviceBudget("cuda:0", 40 * GiB)])
    assert "low_gpu_mem_usage=True" in str(e.value)
    with pytest.raises(PlacementError) as e:  # neither GPU nor CPU holds the cache: would need disk
        plan_placement(m, S8B, [DeviceBudget("cuda:0", 16 * GiB)], cpu_free_bytes=20 * GiB)
    assert "disk" in str(e.value) and "nsamples=" in str(e.value)


def test_qwen_small_plan_and_pins():
    q = qwen25_05b()
    s = PlanSettings(nsamples=128, seqlen=2048, batch_size=8, dtype=torch.bfloat16)
    plan = plan_placement(q, s, [DeviceBudget("cuda:0", 24 * GiB), DeviceBudget("cuda:1", 24 * GiB)])
    assert plan.cache == "device" and not plan.spread  # fits on the first GPU: no needless transfers
    pinned = plan_placement(q, s, [DeviceBudget("cuda:0", 24 * GiB), DeviceBudget("cuda:1", 24 * GiB)],
                            rules=[("mlp", "cuda:1"), (r"layers\.0\.mlp\.down_proj", "cuda:0")])
    assert pinned.device_for("model.layers.5.mlp.up_proj") == "cuda:1"
    assert pinned.device_for("model.layers.5.self_attn.q_proj") == "cuda:0"
    assert pinned.device_for("model.layers.0.mlp.down_proj") == "cuda:0"  # the later, more specific rule
    with pytest.raises(PlacementError, match="not among the tuning devices"):
        plan_placement(q, s, [DeviceBudget("cuda:0", 24 * GiB)], rules=[("mlp", "cuda:3")])


def test_parse_device_map():
    assert parse_device_map(None) is None and parse_device_map("auto") is None
    assert parse_device_map("0,1", cuda_count=2).devices == ("cuda:0", "cuda:1")
    assert parse_device_map([0, "cuda:1"], cuda_count=2).devices == ("cuda:0", "cuda:1")
    assert parse_device_map(["cpu"], cuda_count=0).devices == ("cpu",)
    req = parse_device_map({"up_proj": 0, "down_proj": 1}, cuda_count=2)
    assert req.devices == ("cuda:0", "cuda:1") and req.rules == (("up_proj", "cuda:0"), ("down_proj", "cuda:1"))
    with pytest.raises(DeviceError, match=r"CUDA devices 0\.\.1"):
        parse_device_map("0,2", cuda_count=2)
    with pytest.raises(DeviceError, match="no CUDA device"):
        parse_device_map("0", cuda_count=0)
    for bad in ("0,0", {"mlp": True}, {"(": 0}, {}, "tpu"):
        with pytest.raises(DeviceError):
            parse_device_map(bad, cuda_count=2)


# ------------------------------------------------------------------ the same code paths on CPU
def _codes(ar):
    return {k: v.weight.codes for k, v in ar.outcome.layers.items()}


def _ar(model, **kw):
    return AutoRound(model, None, bits=4, group_size=32, iters=2, nsamples=2, seqlen=16, batch_size=2,
                     dataset=token_data(), progress=False, **kw)


def test_spread_pipeline_on_cpu_matches_single_device():
    """Linears pinned to a second (CPU) device go through accelerate's hooks; results are bit-identical."""
    from auto_quant.tuning.pipeline import quantize_tuned

    ref = _ar(tiny_model("llama", seed=3), device="cpu")
    ref.quantize()
    ar = _ar(tiny_model("llama", seed=3), device="cpu")
    shape = ModelShape.from_model(ar.model)
    settings = PlanSettings(nsamples=2, seqlen=16, batch_size=2, dtype=torch.float32, group_size=32)
    # "cpu:1" is the CPU under another name: the off-device path (moves, hooks) runs for real
    plan = plan_placement(shape, settings, [DeviceBudget("cpu", None), DeviceBudget("cpu:1", None)],
                          rules=[("mlp", "cpu:1"), ("o_proj", "cpu:1")])
    assert plan.spread and plan.device_for("model.layers.1.mlp.down_proj") == "cpu:1"
    ar.outcome = quantize_tuned(ar.model, ar.config, ar.calibration_samples(), torch.device("cpu"), progress=False,
                                placement=plan)
    a, b = _codes(ref), _codes(ar)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(hasattr(m, "_hf_hook") for m in ar.model.modules())  # hooks removed afterwards
    ids = torch.tensor([token_data(1, 16, seed=9)[0]])
    assert torch.equal(ref.model(ids).logits, ar.model(ids).logits)


def test_autoround_device_map_cpu_with_cache_offload():
    low_gpu_mem_usage = True
    ref = _ar(tiny_model("qwen2", seed=4), device="cpu", low_gpu_mem_usage=low_gpu_mem_usage)
    ref.quantize()
    ar = _ar(tiny_model("qwen2", seed=4), device_map=["cpu"], low_gpu_mem_usage=low_gpu_mem_usage)
    ar.quantize()
    assert ar.placement is not None and ar.placement.cache == "cpu" and not ar.placement.spread
    a, b = _codes(ref), _codes(ar)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_autoround_rejects_missing_gpus():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(DeviceError, match="no CUDA device"):
        _ar(tiny_model("llama"), device_map="0,1")
    with pytest.raises(DeviceError, match="no CUDA device"):
        _ar(tiny_model("llama"), device="0,1")


def test_spread_tuning_leaves_no_wrapper_alive():
    """The tunable wrappers of linears on another device are freed when their block is done, not kept alive by
    accelerate's hook (a reference cycle that only Python's cycle collector breaks: on two GPUs their float32
    tunables piled up on the second GPU, block after block). With the collector off, none is left."""
    import gc

    from auto_quant.tuning.pipeline import quantize_tuned
    from auto_quant.tuning.wrapper import TunableLinear

    ar = _ar(tiny_model("llama", seed=5), device="cpu")
    shape = ModelShape.from_model(ar.model)
    settings = PlanSettings(nsamples=2, seqlen=16, batch_size=2, dtype=torch.float32, group_size=32)
    plan = plan_placement(shape, settings, [DeviceBudget("cpu", None), DeviceBudget("cpu:1", None)],
                          rules=[("mlp", "cpu:1")])
    gc.collect()
    gc.disable()
    try:
        ar.outcome = quantize_tuned(ar.model, ar.config, ar.calibration_samples(), torch.device("cpu"), progress=False,
                                    placement=plan)
        alive = [o for o in gc.get_objects() if isinstance(o, TunableLinear)]
    finally:
        gc.enable()
    assert plan.spread and ar.outcome.layers and not alive

"""Mixture-of-experts models: transformers 5 keeps the experts fused (3-D tensors); auto_quant splits them
into per-expert linears so every expert is tuned, exported and loaded back like any other layer."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from torch import nn

import auto_quant  # noqa: F401  (routes auto-round checkpoints to auto_quant's loader)
from auto_quant import AutoRound, AutoRoundConfig
from auto_quant.convert import load_quantized
from auto_quant.inference.qlinear import QuantLinear
from auto_quant.models.moe import DenseSplitExperts, ExpertMLP, SplitExperts, is_fused_experts, split_fused_experts
from tiny_models import MOE_ARCHS, tiny_model, token_data


def _ids(seed: int = 5) -> torch.Tensor:
    return torch.tensor(token_data(2, 24, seed=seed))


def _experts(model) -> SplitExperts:
    return model.model.layers[0].mlp.experts


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_split_experts_compute_what_the_fused_module_computes(arch):
    model = tiny_model(arch)
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the init, so a wrong layout shows
            if p.dim() > 1:
                p.normal_(0, 0.1)
        ref = model(_ids()).logits
    fused = [n for n, m in model.named_modules() if is_fused_experts(m)]
    assert len(fused) == 2
    names = split_fused_experts(model)
    assert names == fused
    assert split_fused_experts(model) == []  # idempotent
    experts = model.get_submodule(names[0])
    assert isinstance(experts, (SplitExperts, DenseSplitExperts)) and len(experts) == 4
    assert isinstance(experts[3], ExpertMLP)
    assert isinstance(experts[3].down, nn.Linear) and isinstance(experts[3].gate, nn.Linear)
    assert not any(p.dim() == 3 for p in model.parameters())
    with torch.no_grad():
        got = model(_ids()).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["hunyuan_v1_moe", "llama4_text"])
def test_routers_stay_float(arch):
    model = tiny_model(arch)
    ar = AutoRound(model, None, bits=4, group_size=32, iters=0, progress=False)
    routers = {"hunyuan_v1_moe": "model.layers.0.mlp.gate.wg", "llama4_text": "model.layers.0.feed_forward.router"}[arch]
    assert routers in ar.specs and ar.specs[routers] is None
    assert sum(s is not None for n, s in ar.specs.items() if ".experts." in n) == 2 * 4 * 3


def _expert_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if ".experts." in n and isinstance(m, (nn.Linear, QuantLinear))]


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_tuned_moe_exports_and_loads_back_in_transformers(arch, tmp_path):
    model = tiny_model(arch)
    x = _ids()
    with torch.no_grad():
        ref = model(x).logits
    ar = AutoRound(model, None, bits=4, group_size=32, iters=3, nsamples=8, seqlen=32, dataset=token_data(8, 32),
                   progress=False)
    ar.quantize()
    experts = _expert_names(model)
    assert len(experts) == 2 * 4 * 3
    assert set(experts) <= set(ar.outcome.layers), "every expert linear is quantized"
    w = model.get_submodule("model.layers.1.mlp.experts.2.up_proj").weight
    assert torch.equal(w, ar.outcome.layers["model.layers.1.mlp.experts.2.up_proj"].weight.dequantize(torch.float32).to(w.dtype))
    with torch.no_grad():
        fq = model(x).logits
    assert not torch.equal(fq, ref)
    out = tmp_path / "q"
    ar.save_quantized(out, format="auto_round")
    q = transformers.AutoModelForCausalLM.from_pretrained(out, quantization_config=AutoRoundConfig(backend="torch"))
    assert isinstance(_experts(q), SplitExperts)
    assert all(isinstance(q.get_submodule(n), QuantLinear) for n in experts)
    with torch.no_grad():
        got = q(x).logits
    torch.testing.assert_close(got, fq, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("fmt", ["auto_gptq", "auto_awq", "auto_round"])
def test_moe_router_stays_float_and_integer_formats_round_trip(fmt, tmp_path):
    model = tiny_model("qwen2_moe")
    ar = AutoRound(model, None, bits=4, group_size=32, sym=False, iters=0, progress=False)
    ar.quantize()
    gates = [n for n in ar.outcome.specs if n.endswith("shared_expert_gate")]
    assert len(gates) == 2 and all(ar.outcome.specs[n] is None for n in gates)
    assert len([n for n in ar.outcome.layers if ".experts." in n]) == 2 * 4 * 3
    x = _ids()
    with torch.no_grad():
        fq = model(x).logits
    ar.save_quantized(tmp_path / "q", format=fmt)
    q, _ = load_quantized(tmp_path / "q", dtype=torch.float32, backend="torch")
    assert isinstance(q.get_submodule("model.layers.1.mlp.experts.3.down_proj"), QuantLinear)
    assert isinstance(q.get_submodule("model.layers.1.mlp.shared_expert_gate"), nn.Linear)
    with torch.no_grad():
        got = q(x).logits
    torch.testing.assert_close(got, fq, rtol=1e-4, atol=1e-4)


def test_one_expert_in_layer_config_harmonises_every_expert_of_its_layer(caplog):
    model = tiny_model("mixtral")
    with caplog.at_level(logging.WARNING):
        ar = AutoRound(model, None, bits=4, group_size=32, iters=0, progress=False,
                       layer_config={"model.layers.0.mlp.experts.2.w2": {"bits": 8}})  # Mixtral's down
    ar.quantize()
    bits = {n: s.bits for n, s in ar.outcome.specs.items() if s is not None and ".experts." in n}
    assert {b for n, b in bits.items() if n.startswith("model.layers.0.")} == {8}
    assert {b for n, b in bits.items() if n.startswith("model.layers.1.")} == {4}


@pytest.mark.parametrize("fmt", ["auto_round", "auto_gptq"])
def test_mixtral_exports_use_the_original_checkpoint_names(fmt, tmp_path):
    """transformers 5 loads Mixtral's block_sparse_moe.experts.N.w1/w3/w2 into mlp.experts (fused); exports write
    the original names back, as save_pretrained does and as vLLM's Mixtral loader reads them, and load back."""
    import json

    from safetensors import safe_open

    model = tiny_model("mixtral")
    mixed = {"model.layers.1.mlp.experts.0.w2": {"bits": 8}} if fmt == "auto_round" else None  # GPTQ: one setting
    ar = AutoRound(model, None, bits=4, group_size=32, iters=0, progress=False, layer_config=mixed)
    ar.quantize()
    x = _ids()
    with torch.no_grad():
        fq = model(x).logits
    ar.save_quantized(tmp_path / "q", format=fmt)
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.qweight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys and not any(".mlp." in k for k in keys)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    if fmt == "auto_round":  # the 8-bit experts of layer 1, named as in the checkpoint
        assert "model.layers.1.block_sparse_moe.experts.3.w1" in qc["extra_config"]
        q = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q",
                                                              quantization_config=AutoRoundConfig(backend="torch"))
        assert q.get_submodule("model.layers.1.mlp.experts.3.w1").bits == 8
        with torch.no_grad():
            torch.testing.assert_close(q(x).logits, fq, rtol=2e-3, atol=2e-3)
    q, _ = load_quantized(tmp_path / "q", dtype=torch.float32, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(q(x).logits, fq, rtol=1e-4, atol=1e-4)


def test_low_bit_api_quantizes_experts_and_round_trips(tmp_path):
    from auto_quant.transformers import AutoModelForCausalLM as LowBit

    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "float")
    x = _ids()
    with torch.no_grad():
        ref = model(x).logits
    q = LowBit.from_pretrained(tmp_path / "float", load_in_low_bit="sym_int8")
    assert isinstance(_experts(q), SplitExperts)
    assert not any(isinstance(q.get_submodule(n), nn.Linear) for n in _expert_names(q))
    with torch.no_grad():
        got = q(x).logits
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    q.save_low_bit(tmp_path / "lb")
    again = LowBit.load_low_bit(tmp_path / "lb")
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, got)


class _NormedExperts(nn.Module):
    """A fused experts module with an expert norm: a layout SplitExperts does not reproduce."""

    has_post_expert_norm = True
    has_gate = True  # the flags transformers' use_experts_implementation sets
    is_transposed = False

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(2, 8, 4))
        self.down_proj = nn.Parameter(torch.randn(2, 4, 4))
        self.post_expert_norm = nn.LayerNorm(4)


def test_unsupported_fused_layout_stays_fused_with_a_warning(caplog):
    holder = nn.Module()
    holder.experts = _NormedExperts()
    with caplog.at_level(logging.WARNING):
        assert split_fused_experts(holder) == []
    assert isinstance(holder.experts, _NormedExperts)
    assert "stay in 16 bits" in caplog.text and "normalises" in caplog.text

    class Unknown(nn.Module):  # no layout flags, and shapes that fit no known layout: not guessed
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(2, 6, 4))
            self.down_proj = nn.Parameter(torch.randn(2, 4, 4))

        def forward(self, hidden_states, top_k_index, top_k_weights):
            return hidden_states

    holder.experts = Unknown()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert split_fused_experts(holder) == []
    assert "calling convention or weight layout" in caplog.text


def test_experts_without_layout_flags_split_by_their_shapes():
    # transformers 5 releases before use_experts_implementation's flags: the shapes decide the layout
    model = tiny_model("qwen3_moe")
    ref_in = torch.randn(5, 64)
    experts = model.model.layers[0].mlp.experts
    idx, wts = torch.tensor([[0, 2], [1, 3], [3, 0], [2, 1], [0, 1]]), torch.rand(5, 2)
    with torch.no_grad():
        ref = experts(ref_in, idx, wts)
    for flag in ("has_gate", "is_transposed", "is_concatenated"):
        experts.__dict__.pop(flag, None)
    assert not hasattr(experts, "is_transposed")
    split_fused_experts(model)
    with torch.no_grad():
        torch.testing.assert_close(model.model.layers[0].mlp.experts(ref_in, idx, wts), ref)



def test_moe_tunes_eagerly_when_graphs_are_asked_for():
    model = tiny_model("mixtral")
    ar = AutoRound(model, None, bits=4, group_size=32, iters=2, nsamples=4, seqlen=16, dataset=token_data(4, 16),
                   cuda_graphs=True, progress=False)
    ar.quantize()
    assert len([n for n in ar.outcome.layers if ".experts." in n]) == 2 * 4 * 3


@pytest.mark.gpu
def test_moe_tunes_on_cuda_and_serves_through_triton(tmp_path):
    model = tiny_model("qwen3_moe")
    ar = AutoRound(model, None, bits=4, group_size=32, iters=4, nsamples=8, seqlen=32, dataset=token_data(8, 32),
                   device="cuda", progress=False)
    ar.quantize()
    x = _ids()
    with torch.no_grad():
        fq = model(x).logits
    ar.save_quantized(tmp_path / "q", format="auto_round")
    from auto_quant import AutoRoundConfig

    q = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float16, device_map="cuda",
                                                          quantization_config=AutoRoundConfig(backend="triton"))
    layer = q.get_submodule("model.layers.1.mlp.experts.3.down_proj")
    assert isinstance(layer, QuantLinear) and layer.backend == "triton"
    with torch.no_grad():
        got = q(x.cuda()).logits.float().cpu()
    assert (got - fq).abs().max() < 2e-2 * fq.abs().max() + 2e-3


def test_alibi_bias_folding_the_batch_is_replayed_sample_by_sample(caplog):
    # Bloom passes every block an ALiBi bias of [batch * heads, 1, seq]: one sample's copy does not broadcast
    # over a batch of several, the batched forward fails, and the block's samples are replayed one by one
    # (shared tensors that do broadcast, like Qwen2-VL's [3, 1, seq] positions, keep the batch)
    from auto_quant.tuning.capture import BlockCall, collate_calls

    rope = torch.zeros(3, 1, 16, 8)
    assert collate_calls([BlockCall(args=(), kwargs={"cos": rope})] * 3).kwargs["cos"] is rope
    model = tiny_model("bloom")
    with caplog.at_level(logging.INFO, logger="auto_quant.tuning.pipeline"):
        ar = AutoRound(model, None, bits=4, group_size=32, iters=2, nsamples=4, seqlen=16, batch_size=4,
                       dataset=token_data(4, 16), progress=False)
        ar.quantize()
    assert len(ar.outcome.layers) == 8
    assert "replaying this block's samples one by one" in caplog.text
"""Tiny models of real architectures: tune (iters >= 2), save auto_round, reload with transformers, match logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import auto_quant  # noqa: F401  (installs the transformers hook)
from auto_quant import AutoRound, AutoRoundConfig
from auto_quant.inference.qlinear import QuantLinear
from tiny_models import ARCHS, VOCAB, tiny_model, token_data


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def load_exact(path):
    """The reload through the exact torch reference: by default a float32 model on CPU takes cpu_gemv, whose int8
    activations move the logits by about 1e-2 relative."""
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=AutoRoundConfig(backend="torch"))


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ARCHS)
def test_tune_save_reload_matches(arch, tmp_path):
    model = tiny_model(arch)
    ar = AutoRound(model, None, bits=4, group_size=32, sym=(arch != "opt"), iters=3, nsamples=4, seqlen=32,
                   batch_size=2, dataset=token_data(), progress=False)
    ar.quantize()
    n_quantized = len(ar.outcome.layers)
    assert n_quantized >= 8
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    out = tmp_path / "q"
    ar.save_quantized(out)
    loaded = load_exact(out)
    qlayers = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(qlayers) == n_quantized
    got = _logits(loaded, ids)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()
    fast = AutoModelForCausalLM.from_pretrained(out)  # the default: the CPU kernel wherever a layer's shape allows
    backends = {m.backend for m in fast.modules() if isinstance(m, QuantLinear)}
    assert "cpu_gemv" in backends and backends <= {"cpu_gemv", "torch"}, backends
    assert rel(_logits(fast, ids), ref) < 3e-2


def test_non_divisible_intermediate_is_quantized():
    model = tiny_model("llama")  # intermediate 176: divisible by neither 32... nor 128
    ar = AutoRound(model, None, bits=4, group_size=128, iters=0, progress=False)
    ar.quantize()
    down = ar.outcome.layers["model.layers.0.mlp.down_proj"]
    assert down.weight.codes.shape == (64, 176)
    assert down.weight.scale.shape == (64, 2)  # 128 + a padded group of 48


def test_tuning_beats_rtn_on_block_loss():
    model = tiny_model("llama", seed=3)
    ar = AutoRound(model, None, bits=2, group_size=32, iters=30, nsamples=8, seqlen=32, batch_size=4,
                   dataset=token_data(16, 64), progress=False, init_search=False)
    ar.quantize()
    for name, res in ar.outcome.units.items():
        assert res.loss_after < res.loss_before, name


def test_deterministic_on_cpu():
    outs = []
    for _ in range(2):
        model = tiny_model("qwen2", seed=5)
        ar = AutoRound(model, None, bits=3, group_size=32, iters=4, nsamples=4, seqlen=32, batch_size=2,
                       dataset=token_data(), progress=False)
        ar.quantize()
        outs.append({k: v.weight.codes.clone() for k, v in ar.outcome.layers.items()})
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_layer_config_mixed_bits_and_kept_layers(tmp_path):
    model = tiny_model("llama")
    layer_config = {
        "model.layers.0.mlp.down_proj": {"bits": 16},
        r"self_attn\.v_proj": {"bits": 8, "group_size": 64},
        "model.layers.1.mlp.up_proj": {"bits": 3, "sym": False},
    }
    ar = AutoRound(model, None, bits=4, group_size=32, iters=2, nsamples=4, seqlen=32, batch_size=2,
                   dataset=token_data(), layer_config=layer_config, progress=False)
    ar.quantize()
    layers = ar.outcome.layers
    assert "model.layers.0.mlp.down_proj" not in layers
    assert layers["model.layers.1.self_attn.v_proj"].weight.spec.bits == 8
    assert layers["model.layers.1.mlp.up_proj"].weight.spec.sym is False
    ids = torch.randint(0, VOCAB, (1, 20))
    ref = _logits(model, ids)
    ar.save_quantized(tmp_path / "q")
    loaded = load_exact(tmp_path / "q")
    assert isinstance(loaded.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert loaded.model.layers[1].self_attn.v_proj.bits == 8
    assert torch.allclose(_logits(loaded, ids), ref, atol=1e-4)


def test_quant_lm_head_tied(tmp_path):
    model = tiny_model("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    emb = model.model.embed_tokens.weight.detach().clone()
    ar = AutoRound(model, None, bits=4, group_size=32, iters=2, nsamples=4, seqlen=32, batch_size=2,
                   dataset=token_data(), quant_lm_head=True, progress=False)
    ar.quantize()
    assert "lm_head" in ar.outcome.layers
    assert torch.equal(model.model.embed_tokens.weight, emb)  # the embedding is untouched
    ids = torch.randint(0, VOCAB, (1, 20))
    ref = _logits(model, ids)
    ar.save_quantized(tmp_path / "q")
    loaded = load_exact(tmp_path / "q")
    assert isinstance(loaded.lm_head, QuantLinear)
    assert torch.allclose(_logits(loaded, ids), ref, atol=1e-4)


def test_rtn_iters_zero_needs_no_data(tmp_path):
    model = tiny_model("mistral")
    ar = AutoRound(model, None, bits=4, group_size=32, iters=0, progress=False)
    ar.quantize()
    ids = torch.randint(0, VOCAB, (1, 20))
    ref = _logits(model, ids)
    ar.save_quantized(tmp_path / "q")
    assert torch.allclose(_logits(load_exact(tmp_path / "q"), ids), ref, atol=1e-4)


def test_padded_samples_with_attention_mask():
    from auto_quant.config import QuantConfig, TuningConfig
    from auto_quant.quant import QuantSpec
    from auto_quant.tuning.pipeline import quantize_tuned

    model = tiny_model("llama", seed=2)
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(4):
        ids = torch.randint(0, VOCAB, (32,), generator=g)
        mask = torch.ones(32, dtype=torch.long)
        if i % 2:
            mask[:10] = 0  # left padding
        samples.append({"input_ids": ids, "attention_mask": mask})
    cfg = QuantConfig(scheme=QuantSpec(4, 32, True), tuning=TuningConfig(iters=3, nsamples=4, seqlen=32, batch_size=2))
    out = quantize_tuned(model, cfg, samples, torch.device("cpu"), progress=False)
    assert len(out.layers) == 14
    assert all(r.loss_after <= r.loss_init for r in out.units.values())

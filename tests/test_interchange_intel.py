"""auto_quant's auto_round checkpoints load in Intel auto-round, and Intel's load in auto_quant."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("auto_round")

HERE = os.path.dirname(__file__)


def _run(code: str, cwd) -> str:
    # cwd outside the repository: a checkout's top-level kernels/ folder must not shadow the
    # `kernels` package transformers probes for
    env = {**os.environ, "PYTHONPATH": HERE}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                       timeout=600, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (3, True), (2, False), (8, True)])
def test_auto_quant_checkpoint_loads_in_intel_auto_round(tmp_path, bits, sym):
    import auto_quant  # noqa: F401
    from auto_quant import AutoRound
    from tiny_models import VOCAB, tiny_model, token_data

    model = tiny_model("qwen2", seed=1)
    ar = AutoRound(model, None, bits=bits, group_size=32, sym=sym, iters=2, nsamples=4, seqlen=32, batch_size=2,
                   dataset=token_data(), progress=False)
    ar.quantize()
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save(model(ids).logits, tmp_path / "ref.pt")
    ar.save_quantized(tmp_path / "q")
    # a fresh process that never imports auto_quant: transformers routes to Intel's loader
    out = _run(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        from tiny_models import VOCAB
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'q')!r}, dtype=torch.float32)
        assert 'auto_quant' not in sys.modules
        layer = m.model.layers[0].self_attn.q_proj
        assert type(layer).__module__.startswith('auto_round'), type(layer)
        ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = m(ids).logits
        ref = torch.load({str(tmp_path / 'ref.pt')!r})
        print(float((out - ref).abs().max()), float(ref.abs().max()))
    """, tmp_path)
    diff, scale = map(float, out.split()[-2:])
    assert diff < 2e-3 * max(1.0, scale), diff


# Intel 0.16.1's own asym-4-bit export (AWQ packing) fails with a TypeError in its WQLinear_GEMM,
# so its two working packings are covered: auto_round:auto_gptq (sym) and plain auto_round (asym).
@pytest.mark.parametrize("bits,sym", [(4, True), (2, False)])
def test_intel_checkpoint_loads_in_auto_quant(tmp_path, bits, sym):
    # Intel's tuner writes the checkpoint in a subprocess (keeps its process-wide state out of ours)
    _run(f"""
        import torch
        from auto_round import AutoRound
        from tiny_models import VOCAB, tiny_model, tiny_tokenizer, tiny_texts
        m = tiny_model("llama", seed=1, intermediate_size=128)
        ar = AutoRound(m, tiny_tokenizer(), bits={bits}, group_size=32, sym={sym}, iters=2, nsamples=4, seqlen=32,
                       batch_size=2, dataset=tiny_texts(16, 80))
        ar.quantize()
        ar.save_quantized({str(tmp_path / 'intel')!r}, format='auto_round')
    """, tmp_path)
    # the reference: Intel's own loader on Intel's checkpoint, in float32
    _run(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        from tiny_models import VOCAB
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'intel')!r}, dtype=torch.float32)
        assert 'auto_quant' not in sys.modules
        ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.save(m(ids).logits.float(), {str(tmp_path / 'ref.pt')!r})
    """, tmp_path)
    import auto_quant  # noqa: F401
    from transformers import AutoModelForCausalLM

    from auto_quant.inference.qlinear import QuantLinear
    from tiny_models import VOCAB

    from auto_quant import AutoRoundConfig

    # the exact reference: the default CPU kernel's int8 activations would move the logits past this bound
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "intel", dtype=torch.float32,
                                             quantization_config=AutoRoundConfig(backend="torch"))
    assert isinstance(m.model.layers[0].mlp.up_proj, QuantLinear)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = m(ids).logits
    ref = torch.load(tmp_path / "ref.pt")
    assert (out - ref).abs().max() < 2e-3 * max(1.0, float(ref.abs().max()))

"""Foreign integer checkpoints load into auto_quant's QuantLinear and convert to auto_round exactly.

Producers, all run in the test: GPTQModel (GPTQ v1 sym, v1 asym, v2 asym) and Intel
auto-round (its auto_gptq and auto_awq exports, AutoAWQ's GEMM layout), plus hand-made
corner cases (a legacy v1 zero wrapped to 15, act-order, 16-bit layers in the blocks).
The references are the producers' own loaders (transformers + GPTQModel) or fake-quantized
models; comparisons are in units of each weight's quantization step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import auto_quant  # noqa: F401
from auto_quant import AutoRound, CheckpointError
from auto_quant.convert import convert, dequantize_to_context, load_quantized
from auto_quant.export import packing
from auto_quant.inference.qlinear import QuantLinear
from formats_helpers import force_edge_zeros, ids, tiny_llama

HERE = os.path.dirname(__file__)
HAS_GPTQMODEL = all(importlib.util.find_spec(p) is not None for p in ("gptqmodel", "optimum"))


def _run(code: str, cwd) -> str:
    env = {**os.environ, "PYTHONPATH": HERE, "GPTQMODEL_CPU_WORKERS": "2", "TORCH_COMPILE_DISABLE": "1"}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                       timeout=900, cwd=str(cwd))
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


def step_error(got: torch.Tensor, qlinear: QuantLinear, want: torch.Tensor | None = None) -> float:
    """Largest |got - want| in units of each weight's |scale| (want: the QuantLinear's own decode)."""
    _, _, scale = qlinear.unpack()
    gs = qlinear.in_features if qlinear.group_size == -1 else qlinear.group_size
    step = scale.float().abs()[:, torch.arange(qlinear.in_features) // gs].clamp(min=1e-8)
    want = qlinear.dequantize_weight(torch.float32) if want is None else want
    return float(((got.float() - want) / step).abs().max())


def quant_layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def logits(model, x=None):
    with torch.no_grad():
        return model(ids() if x is None else x).logits.float()


# ------------------------------------------------------------------------------------------
# GPTQModel-made checkpoints
# ------------------------------------------------------------------------------------------

GM_CASES = {"gm_v1_sym": (True, "gptq"), "gm_v1_asym": (False, "gptq"), "gm_v2_asym": (False, "gptq_v2")}


@pytest.fixture(scope="module")
def gptqmodel_made(tmp_path_factory):
    if not HAS_GPTQMODEL:
        pytest.skip("GPTQModel / optimum not installed")
    root = tmp_path_factory.mktemp("gptqmodel")
    torch.save(ids(), root / "ids.pt")
    _run(f"""
        import torch
        from formats_helpers import tiny_llama
        from tiny_models import tiny_tokenizer
        root = {str(root)!r}
        tiny_llama(seed=5, tie=False).save_pretrained(root + "/fp")
        tiny_tokenizer().save_pretrained(root + "/fp")
        from gptqmodel import GPTQModel, QuantizeConfig
        g = torch.Generator().manual_seed(0)
        data = [{{"input_ids": torch.randint(0, 252, (64,), generator=g).tolist(), "attention_mask": [1] * 64}}
                for _ in range(8)]
        for name, (sym, fmt) in {GM_CASES!r}.items():
            qc = QuantizeConfig(bits=4, group_size=32, sym=sym, desc_act=False, format=fmt, pack_impl="original",
                                offload_to_disk=False)
            m = GPTQModel.load(root + "/fp", qc)
            m.quantize(data, batch_size=1)
            m.save(root + "/" + name)
            del m
        # the producer's own loader is the reference: transformers + optimum + GPTQModel
        import sys
        from transformers import AutoModelForCausalLM
        x = torch.load(root + "/ids.pt")
        out = {{}}
        for name in {list(GM_CASES)!r}:
            m = AutoModelForCausalLM.from_pretrained(root + "/" + name, dtype=torch.float16)
            with torch.no_grad():
                w = {{n: mod(torch.eye(mod.in_features, dtype=torch.float16)).float().t()
                     for n, mod in m.named_modules() if type(mod).__module__.startswith("gptqmodel")}}
                out[name] = {{"logits": m(x).logits.float(), "weights": w}}
        assert "auto_quant" not in sys.modules
        torch.save(out, root + "/ref.pt")
    """, root)
    return root, torch.load(root / "ref.pt")


@pytest.mark.parametrize("case", list(GM_CASES))
def test_gptqmodel_checkpoint_loads_in_auto_quant(gptqmodel_made, case):
    root, ref = gptqmodel_made
    model, tok = load_quantized(root / case, dtype=torch.float32, backend="torch")
    assert tok is not None
    layers = quant_layers(model)
    assert len(layers) == 14 and set(layers) == set(ref[case]["weights"])
    for name, q in layers.items():
        assert q.layout == ("gptq_v2" if case == "gm_v2_asym" else "gptq")
        assert step_error(ref[case]["weights"][name], q) < 0.25, name
    r = ref[case]["logits"]
    assert (logits(model) - r).abs().max() < 1e-2 * float(r.abs().max()) + 1e-3


@pytest.mark.parametrize("case", list(GM_CASES))
def test_gptqmodel_checkpoint_converts_to_auto_round_exactly(gptqmodel_made, tmp_path, case):
    from transformers import AutoModelForCausalLM

    root, _ = gptqmodel_made
    src, _ = load_quantized(root / case, dtype=torch.float32, backend="torch")
    want = logits(src)
    written = convert(root / case, tmp_path / "ar")
    d = written["auto_round"]
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "auto-round" and qc["bits"] == 4 and qc["group_size"] == 32
    assert qc["packing_format"] == ("auto_round:auto_gptq" if case == "gm_v1_sym" else "auto_round")
    # the converted checkpoint decodes to the very same weights as the source
    back, _ = load_quantized(d, dtype=torch.float32, backend="torch")
    for name, q in quant_layers(src).items():
        assert torch.equal(quant_layers(back)[name].dequantize_weight(), q.dequantize_weight()), name
    assert torch.allclose(logits(back), want, atol=1e-5, rtol=0)
    if case == "gm_v1_sym":  # and through transformers (auto_quant's hook), as users load it
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        assert isinstance(hf.model.layers[0].self_attn.q_proj, QuantLinear)
        for name, q in quant_layers(src).items():
            assert torch.equal(quant_layers(hf)[name].dequantize_weight(), q.dequantize_weight()), name


# ------------------------------------------------------------------------------------------
# Intel auto-round's GPTQ and AWQ exports
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("auto_round") is None, reason="Intel auto-round not installed")
def test_intel_auto_round_gptq_and_awq_exports_load_and_convert(tmp_path):
    _run(f"""
        import torch
        from auto_round import AutoRound
        from formats_helpers import tiny_llama, ids
        from tiny_models import tiny_tokenizer, tiny_texts
        # one run per format: Intel 0.16.1 packs the model in place on the first save
        for fmt in ("auto_gptq", "auto_awq"):
            m = tiny_llama(seed=3)
            ar = AutoRound(m, tiny_tokenizer(), bits=4, group_size=32, sym=True, iters=0, nsamples=2, seqlen=16,
                           batch_size=1, dataset=tiny_texts(4, 40), disable_opt_rtn=True)
            ar.quantize()
            with torch.no_grad():
                torch.save(ar.model.float()(ids()).logits.float(), {str(tmp_path)!r} + f"/ref-{{fmt}}.pt")
            ar.save_quantized({str(tmp_path)!r} + "/intel/" + fmt.replace("_", "-"), format=fmt)
    """, tmp_path)
    outs = {}
    for sub, layout in (("auto-gptq", "gptq"), ("auto-awq", "awq")):
        ref = torch.load(tmp_path / f"ref-{sub.replace('-', '_')}.pt")
        src = tmp_path / "intel" / sub
        qc = json.loads((src / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == ("gptq" if layout == "gptq" else "awq")
        model, _ = load_quantized(src, dtype=torch.float32, backend="torch")
        assert {q.layout for q in quant_layers(model).values()} == {layout}
        outs[sub] = logits(model)
        assert (outs[sub] - ref).abs().max() < 2e-2 * float(ref.abs().max())
        written = convert(src, tmp_path / f"ar-{sub}")
        back, _ = load_quantized(written["auto_round"], dtype=torch.float32, backend="torch")
        assert torch.allclose(logits(back), outs[sub], atol=1e-5, rtol=0)
    # the two exports of one tuning run decode identically
    assert torch.allclose(outs["auto-gptq"], outs["auto-awq"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------
# corner cases, hand-made
# ------------------------------------------------------------------------------------------


def _asym_model_with_edges():
    model = tiny_llama(seed=7)
    force_edge_zeros(model, group=32)
    ar = AutoRound(model, None, bits=4, group_size=32, sym=False, iters=0, progress=False)
    ar.quantize()
    return model, ar


def test_legacy_v1_zero_wrapped_to_15_decodes_as_zero(tmp_path):
    """Old GPTQ writers stored an asymmetric zero of 0 as (0 - 1) & 15 = 15: decode it as 0."""
    from safetensors.torch import load_file, save_file

    model, ar = _asym_model_with_edges()
    ar.save_quantized(tmp_path / "v2", format="auto_gptq")
    q = ar.outcome.layers["model.layers.0.self_attn.q_proj"].weight
    assert q.zero[0, 0] == 0
    sd = load_file(str(tmp_path / "v2" / "model.safetensors"))
    for name, layer in ar.outcome.layers.items():  # rewrite every qzeros the legacy way, wrapping
        w = layer.weight
        sd[f"{name}.qzeros"] = packing.pack_bitstream(((w.zero.to(torch.int64) - 1) & 15).t(), 4, dim=1)
    os.makedirs(tmp_path / "v1")
    save_file(sd, str(tmp_path / "v1" / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "v2" / "config.json").read_text())
    cfg["quantization_config"].update(checkpoint_format="gptq", format="gptq")
    (tmp_path / "v1" / "config.json").write_text(json.dumps(cfg))
    loaded, _ = load_quantized(tmp_path / "v1", dtype=torch.float32, backend="torch")
    for name, layer in ar.outcome.layers.items():
        assert torch.equal(quant_layers(loaded)[name].dequantize_weight(), layer.weight.dequantize()), name
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", ["auto_gptq", "auto_awq"])
def test_own_exports_with_16bit_layer_load_and_convert(tmp_path, fmt):
    down0 = "model.layers.0.mlp.down_proj"
    model = tiny_llama(seed=2)
    ar = AutoRound(model, None, bits=4, group_size=32, sym=fmt == "auto_gptq", iters=0, progress=False,
                   quant_lm_head=True, layer_config={down0: 16})
    ar.quantize()
    ar.save_quantized(tmp_path / "q", format=fmt)
    loaded, _ = load_quantized(tmp_path / "q", dtype=torch.float32, backend="torch")
    assert type(loaded.get_submodule(down0)) is nn.Linear
    assert type(loaded.lm_head) is nn.Linear  # the quantized head was written dequantized
    assert len(quant_layers(loaded)) == 13
    want = logits(model)
    assert torch.allclose(logits(loaded), want, atol=1e-5, rtol=0)
    ctx = dequantize_to_context(loaded)
    assert ctx.specs[down0] is None and set(ctx.layers) == set(ar.outcome.layers) - {"lm_head"}
    written = convert(tmp_path / "q", tmp_path / "ar")
    back, _ = load_quantized(written["auto_round"], dtype=torch.float32, backend="torch")
    assert type(back.get_submodule(down0)) is nn.Linear
    assert torch.allclose(logits(back), want, atol=1e-5, rtol=0)


def test_act_order_and_bad_inputs_are_refused(tmp_path):
    model = tiny_llama(seed=1)
    ar = AutoRound(model, None, bits=4, group_size=32, sym=True, iters=0, progress=False)
    ar.quantize()
    ar.save_quantized(tmp_path / "q", format="auto_gptq")
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["desc_act"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="act-order"):
        load_quantized(tmp_path / "q")
    cfg["quantization_config"]["desc_act"] = False
    cfg["quantization_config"]["checkpoint_format"] = cfg["quantization_config"]["format"] = "marlin"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="GPTQModel"):
        load_quantized(tmp_path / "q")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_quantized(tmp_path / "nothing")
    model.save_pretrained(tmp_path / "float")
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        load_quantized(tmp_path / "float")

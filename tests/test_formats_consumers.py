"""auto_gptq / auto_awq / llm_compressor exports load in the real consumers and decode exactly.

Every export is loaded by plain transformers in one fresh process that never imports
auto_quant: GPTQ through optimum + GPTQModel, AWQ through GPTQModel, compressed-tensors
through transformers' integration. Each quantized layer's weight, as the consumer's kernel
computes it (``layer(I)``), must equal auto_quant's dequantized weight to float16 rounding,
and the logits must match the fake-quantized model.
"""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

# find_spec, not importorskip: importing GPTQModel here would set its process-wide env vars in pytest
_MISSING = [p for p in ("gptqmodel", "optimum", "compressed_tensors") if importlib.util.find_spec(p) is None]
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"real consumers not installed: {_MISSING}")

import auto_quant  # noqa: E402,F401
from auto_quant import AutoRound  # noqa: E402
from formats_helpers import force_edge_zeros, ids, run_consumers, tiny_llama  # noqa: E402

HEAD = "lm_head"
DOWN0 = "model.layers.0.mlp.down_proj"

# name: (format, AutoRound kwargs, edge zeros group or None, consumer dtype, ct dequantize path)
CASES = {
    "gptq_sym4_g32": ("auto_gptq", dict(bits=4, group_size=32, sym=True), None, "float16", False),
    "gptq_asym4_g32_edges": ("auto_gptq", dict(bits=4, group_size=32, sym=False), 32, "float16", False),
    "gptq_sym3_g64": ("auto_gptq", dict(bits=3, group_size=64, sym=True), None, "float16", False),
    "gptq_asym2_g32_edges": ("auto_gptq", dict(bits=2, group_size=32, sym=False), 32, "float16", False),
    "gptq_sym8_gall_fp16layer_head": ("auto_gptq", dict(bits=8, group_size=-1, sym=True, quant_lm_head=True,
                                                        layer_config={DOWN0: 16}), None, "float16", False),
    "awq_sym4_g32": ("auto_awq", dict(bits=4, group_size=32, sym=True), None, "float16", False),
    "awq_asym4_gall_edges_fp16layer_head": ("auto_awq", dict(bits=4, group_size=-1, sym=False, quant_lm_head=True,
                                                             layer_config={DOWN0: 16}), -1, "float16", False),
    "ct_sym4_g32": ("llm_compressor", dict(bits=4, group_size=32, sym=True), None, "float32", False),
    "ct_asym8_gall_edges": ("llm_compressor", dict(bits=8, group_size=-1, sym=False), -1, "float32", True),
    "ct_mixed": ("llm_compressor", dict(bits=4, group_size=32, sym=True, quant_lm_head=True, layer_config={
        r"mlp\.(gate|up)_proj": {"bits": 2}, DOWN0: {"bits": 8, "group_size": 128}, "self_attn.o_proj": 16}),
        None, "float32", False),
}


def unit_steps(qw) -> torch.Tensor:
    """Each weight's quantization step ``|scale|`` of its group, ``[out, in]``."""
    in_f = qw.codes.shape[1]
    gs = in_f if qw.spec.group_size == -1 else qw.spec.group_size
    return qw.scale.float().abs()[:, torch.arange(in_f) // gs].clamp(min=1e-8)


@pytest.fixture(scope="module")
def consumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("consumers")
    x = ids()
    torch.save(x, root / "ids.pt")
    made, cases = {}, []
    for name, (fmt, kw, edge, dtype, ct_deq) in CASES.items():
        model = tiny_llama(seed=len(made))
        if edge is not None:
            force_edge_zeros(model, group=edge)
        ar = AutoRound(model, None, iters=0, progress=False, **kw)  # RTN: the formats, not the tuner, are tested
        ar.quantize()
        with torch.no_grad():
            ref = model(x).logits
        out = root / name
        ar.save_quantized(out, format=fmt)
        layers = dict(ar.outcome.layers)
        made[name] = dict(ref=ref, layers=layers, dir=out, model=model, fmt=fmt)
        cases.append(dict(name=name, dir=str(out), dtype=dtype, ct_dequantize=ct_deq, ids=str(root / "ids.pt"),
                          layers=sorted(layers), in_features={n: q.weight.codes.shape[1] for n, q in layers.items()}))
    results = run_consumers(cases, root)
    return made, results


def test_consumer_process_never_imported_auto_quant(consumed):
    _, results = consumed
    assert results["_imported_auto_quant"] is False


@pytest.mark.parametrize("case", list(CASES))
def test_real_consumer_decodes_exactly(consumed, case):
    made, results = consumed
    res, mine = results[case], made[case]
    assert "error" not in res, res.get("error")
    for name, q in mine["layers"].items():
        qw = q.weight
        want = qw.dequantize(torch.float32)
        got = res["weights"][name]
        # one integer step of a code or zero moves a weight by its group's |scale|; the consumers'
        # kernels round in float16 / bfloat16, far below half a step
        step = unit_steps(qw)
        err = float(((got - want).abs() / step).max())
        assert err < 0.25, (case, name, err)
        cls = res["classes"][name]
        if name == HEAD:  # written dequantized: a plain Linear in every consumer
            assert cls.endswith(".Linear"), cls
        elif mine["fmt"] in ("auto_gptq", "auto_awq"):
            assert cls.startswith("gptqmodel."), cls
    ref = mine["ref"]
    diff = float((res["logits"] - ref).abs().max())
    assert diff < 1e-2 * float(ref.abs().max()) + 1e-3, (case, diff)


def test_gptq_sym_is_legacy_with_signed_scales_and_asym_is_v2(consumed):
    from safetensors.torch import load_file

    made, _ = consumed
    sym = made["gptq_sym4_g32"]["dir"]
    qc = json.loads((sym / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq" and qc["sym"] is True and qc["quant_method"] == "gptq"
    assert json.loads((sym / "quantize_config.json").read_text())["checkpoint_format"] == "gptq"
    sd = load_file(str(sym / "model.safetensors"))
    assert any(bool((v < 0).any()) for k, v in sd.items() if k.endswith(".scales")), "full-range sym has signed scales"
    asym = made["gptq_asym4_g32_edges"]
    qc = json.loads((asym["dir"] / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq_v2" and qc["sym"] is False
    z = asym["layers"]["model.layers.0.self_attn.q_proj"].weight.zero
    assert z[0, 0] == 0 and z[1, 0] == 15, "the edge zeros the test relies on"


def test_ct_sym_keeps_signed_scales_and_no_zero_point(consumed):
    from safetensors.torch import load_file

    made, _ = consumed
    sd = load_file(str(made["ct_sym4_g32"]["dir"] / "model.safetensors"))
    assert any(bool((v < 0).any()) for k, v in sd.items() if k.endswith(".weight_scale"))
    assert not any(k.endswith(".weight_zero_point") for k in sd)


def test_awq_scales_are_positive_even_for_signed_sym(consumed):
    from safetensors.torch import load_file

    made, _ = consumed
    case = made["awq_sym4_g32"]
    assert any(bool((q.weight.scale < 0).any()) for q in case["layers"].values())
    sd = load_file(str(case["dir"] / "model.safetensors"))
    assert all(bool((v >= 0).all()) for k, v in sd.items() if k.endswith(".scales"))
    qc = json.loads((case["dir"] / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["version"] == "gemm" and qc["zero_point"] is True


def test_16bit_layer_and_quantized_head(consumed):
    from safetensors.torch import load_file

    made, results = consumed
    for case in ("gptq_sym8_gall_fp16layer_head", "awq_asym4_gall_edges_fp16layer_head"):
        d = made[case]["dir"]
        sd = load_file(str(d / "model.safetensors"))
        assert f"{DOWN0}.weight" in sd and f"{DOWN0}.qweight" not in sd
        assert "lm_head.weight" in sd  # the quantized head, dequantized
        assert torch.equal(sd["lm_head.weight"], made[case]["model"].lm_head.weight.detach())
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["tie_word_embeddings"] is False
        qc = cfg["quantization_config"]
        if qc["quant_method"] == "gptq":  # transformers/optimum: the list; GPTQModel: a negative dynamic rule
            assert DOWN0 not in qc["modules_in_block_to_quantize"][0]
            assert "model.layers.1.mlp.down_proj" in qc["modules_in_block_to_quantize"][0]
            assert any(re.fullmatch(k[2:], DOWN0) for k in qc["dynamic"] if k.startswith("-:"))
        else:
            assert DOWN0 in qc["modules_to_not_convert"]
    ct = json.loads((made["ct_mixed"]["dir"] / "config.json").read_text())["quantization_config"]
    assert len(ct["config_groups"]) == 3 and "lm_head" in ct["ignore"]
    assert "model.layers.0.self_attn.o_proj" in ct["ignore"]

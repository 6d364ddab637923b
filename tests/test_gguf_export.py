"""GGUF export: llama.cpp's per-tensor mixes, fallbacks, and the checks that run before any tuning."""

import json

import gguf
import numpy as np
import pytest
import torch

from auto_quant import AutoRound
from auto_quant.errors import ExportError, FormatNotAvailableError
from auto_quant.export import EXPORTERS
from auto_quant.export.gguf import FILE_TYPES, plan_gguf
from auto_quant.export.gguf.plan import mix_type
from auto_quant.export.gguf.types import file_type
from auto_quant.quant import QuantSpec
from test_gguf_helpers import calib_text, gguf_model, only_gguf, tiny_tokenizer, token_windows
from tiny_models import tiny_model


def test_every_file_type_is_registered():
    for name in FILE_TYPES:
        assert f"gguf:{name}" in EXPORTERS
    for name in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q2_k_s", "q3_k_s",
                 "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "f16", "bf16", "f32"):
        assert f"gguf:{name}" in EXPORTERS
    with pytest.raises(FormatNotAvailableError, match="gguf:q4_k_m"):
        file_type("gguf:q7_k")


def test_q4_k_m_mix_matches_llama_cpp_rules():
    ft = file_type("q4_k_m")
    n = 32
    more = [i for i in range(n) if mix_type(ft, "attn_v", i, n, 4) == "q6_k"]
    assert more == [i for i in range(n) if i < 4 or i >= 28 or (i - 4) % 3 == 2]
    assert all(mix_type(ft, "ffn_down", i, n, 4) == ("q6_k" if i in more else "q4_k") for i in range(n))
    assert {mix_type(ft, c, 5, n, 4) for c in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")} == {"q4_k"}
    q2 = file_type("q2_k")
    assert mix_type(q2, "attn_v", 0, n, 4) == "q4_k" and mix_type(q2, "attn_v", 0, n, 2) == "q3_k"
    assert mix_type(q2, "ffn_down", 7, n, 4) == "q3_k" and mix_type(q2, "attn_output", 7, n, 4) == "q3_k"
    q3m = file_type("q3_k_m")
    assert [mix_type(q3m, "attn_v", i, n, 4) for i in range(3)] == ["q5_k", "q5_k", "q4_k"]
    assert mix_type(q3m, "ffn_down", 1, n, 4) == "q5_k" and mix_type(q3m, "ffn_down", 9, n, 4) == "q4_k"


def test_plan_falls_back_per_tensor_and_reports_it():
    # hidden 96: no row of q/k/v/o/gate/up holds 256-blocks; ffn_down's row (512) does
    m = gguf_model("llama", hidden_size=96, head_dim=24)
    plan = plan_gguf(m, "q4_k_m")
    assert plan.linears["model.layers.0.self_attn.q_proj"] == "q5_0"  # Q4_K -> Q5_0
    assert plan.linears["model.layers.0.mlp.down_proj"] in ("q4_k", "q6_k")
    assert plan.embedding == "q8_0" and plan.output is None  # tied head: token_embd takes the output type
    assert any("q_proj" in n and "-> q5_0" in n for n in plan.notes)
    q2 = plan_gguf(m, "q2_k")
    assert q2.linears["model.layers.1.self_attn.k_proj"] == "q4_0"  # Q2_K -> Q4_0
    plan_untied = plan_gguf(gguf_model("qwen2"), "q4_k_m")
    assert plan_untied.output == "q6_k" and plan_untied.embedding == "q4_k"


def test_unsupported_architecture_fails_before_tuning_with_the_list():
    m = tiny_model("opt")
    with pytest.raises(ExportError, match="supported: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3"):
        AutoRound(m, None, scheme="gguf:q4_0", iters=0)
    ar = AutoRound(m, None, bits=4, group_size=32, sym=True, iters=0)
    with pytest.raises(ExportError, match="opt"):
        ar.check_save_target("/tmp/never-written-gguf-dir", format="gguf:q4_0")


def test_capabilities_refuse_specs_gguf_cannot_hold_exactly():
    ex = EXPORTERS["gguf:q4_0"]
    ex.capabilities.check("gguf:q4_0", {"a": QuantSpec(4, 32, True), "b": None})
    with pytest.raises(ExportError, match="groups of 32"):
        ex.capabilities.check("gguf:q4_0", {"a": QuantSpec(4, 128, True)})
    with pytest.raises(ExportError, match="scheme='gguf:q4_k_m'"):
        EXPORTERS["gguf:q4_k_m"].capabilities.check("gguf:q4_k_m", {"a": QuantSpec(4, 32, True)})  # Q4_0 is not in Q4_K_M
    k = QuantSpec(4, 32, False, fmt="q4_k")
    EXPORTERS["gguf:q4_k_m"].capabilities.check("gguf:q4_k_m", {"a": k})
    with pytest.raises(ExportError, match="q4_k grid"):
        EXPORTERS["auto_round"].capabilities.check("auto_round", {"a": k})  # integer formats refuse llama.cpp grids
    EXPORTERS["gguf:f16"].capabilities.check("gguf:f16", {"a": QuantSpec(3, 128, True)})  # floats hold anything


def test_gguf_rejects_query_scaling_llama_cpp_cannot_express():
    m = tiny_model("gemma2")  # query_pre_attn_scalar 256 with head_dim 16
    with pytest.raises(ExportError, match="query_pre_attn_scalar"):
        AutoRound(m, None, scheme="gguf:q8_0", iters=0)


def test_gguf_refuses_moe_settings_llama_cpp_computes_differently():
    with pytest.raises(ExportError, match="norm_topk_prob=False"):
        AutoRound(gguf_model("qwen3_moe", norm_topk_prob=False), None, scheme="gguf:q8_0", iters=0)
    with pytest.raises(ExportError, match="dense layers"):
        AutoRound(gguf_model("qwen3_moe", mlp_only_layers=[1]), None, scheme="gguf:q8_0", iters=0)
    plan = plan_gguf(gguf_model("qwen3_moe"), "q4_k_m")  # every expert planned, down_proj upgraded alike per layer
    downs = {t for n, t in plan.linears.items() if n.startswith("model.layers.1.mlp.experts.") and n.endswith("down_proj")}
    assert len([n for n in plan.linears if ".experts." in n]) == 2 * 4 * 3 and downs == {"q6_k"}


def test_scheme_tunes_each_layer_in_its_planned_grid(tmp_path):
    tok = tiny_tokenizer()
    m = gguf_model("llama")  # 2 layers: layer 1 gets Q6_K attn_v / ffn_down, the rest Q4_K
    data = token_windows(calib_text(), 2, 32)
    ar = AutoRound(m, tok, scheme="gguf:q4_k_m", iters=1, nsamples=2, seqlen=32, batch_size=2, dataset=data,
                   progress=False)
    plan = plan_gguf(m, "q4_k_m")
    assert {n: s.fmt for n, s in ar.specs.items() if s is not None} == plan.linears  # head stays untuned
    assert set(plan.linears.values()) == {"q4_k", "q6_k"}
    ar.quantize()
    out = tmp_path / "q4km"
    ar.save_quantized(out, format="gguf:q4_k_m")
    report = json.loads((out / "gguf_report.json").read_text())
    path = only_gguf(out)
    assert report["bytes"] == path.stat().st_size
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    for hf, t in plan.linears.items():
        layer = int(hf.split(".")[2])
        kind = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[hf.split(".")[-1]]
        assert types[f"blk.{layer}.{kind}.weight"] == t
    assert types["token_embd.weight"] == "q6_k" and "output.weight" not in types
    assert types["blk.0.attn_norm.weight"] == "f32"
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert reader.fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert reader.fields["llama.rope.dimension_count"].contents() == 64
    # every tuned layer's blocks decode to the in-memory fake-quantized weight (after llama.cpp's q/k row order)
    from auto_quant.export.gguf.arch import qk_row_permutation

    modules = dict(m.named_modules())
    for hf in plan.linears:
        layer = int(hf.split(".")[2])
        kind = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[hf.split(".")[-1]]
        t = next(x for x in reader.tensors if x.name == f"blk.{layer}.{kind}.weight")
        dec = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        w = modules[hf].weight.data
        if kind in ("attn_q", "attn_k"):
            heads = 4 if kind == "attn_q" else 2
            w = w[qk_row_permutation(w.shape[0], heads)]
        assert torch.equal(dec, w), hf


def test_iters_0_with_a_gguf_scheme_uses_calibration_importance(tmp_path):
    tok = tiny_tokenizer()
    data = token_windows(calib_text(), 4, 32)
    plain = gguf_model("qwen2")
    weighted = gguf_model("qwen2")
    ar = AutoRound(weighted, tok, scheme="gguf:q4_0", iters=0, nsamples=4, seqlen=32, dataset=data, progress=False)
    ar.quantize()
    assert ar.outcome.units, "imatrix-style RTN runs the calibration forward per block"
    AutoRound(plain, tok, bits=4, group_size=32, sym=True, iters=0, init_search=False, progress=False).quantize()
    name = "model.layers.0.mlp.down_proj"
    assert not torch.equal(dict(weighted.named_modules())[name].weight, dict(plain.named_modules())[name].weight)


def test_a_tuned_row_without_whole_blocks_is_written_f16_and_reported(tmp_path):
    """Plain int4 g32 on rows of 80 (last group padded): Q4_0 cannot hold them; F16 of the tuned values, reported."""
    tok = tiny_tokenizer()
    m = gguf_model("llama", intermediate_size=80)  # ffn_down rows of 80
    ar = AutoRound(m, tok, bits=4, group_size=32, sym=True, iters=0, init_search=False, progress=False)
    ar.quantize()
    out = ar.save_quantized(tmp_path / "q40", format="gguf:q4_0")["gguf:q4_0"]
    report = json.loads((out / "gguf_report.json").read_text())
    assert report["tensors"]["blk.0.ffn_down.weight"] == "f16" and report["tensors"]["blk.0.ffn_up.weight"] == "q4_0"
    assert any("down_proj" in n and "f16" in n for n in report["fallbacks"])
    reader = gguf.GGUFReader(only_gguf(out))
    t = next(x for x in reader.tensors if x.name == "blk.0.ffn_down.weight")
    down = dict(m.named_modules())["model.layers.0.mlp.down_proj"].weight
    np.testing.assert_array_equal(np.array(t.data), down.detach().numpy().astype(np.float16))

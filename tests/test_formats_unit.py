"""Formats without consumers: packing layouts against compressed-tensors' own packer, sign
normalisation, fused-layer harmonising, and refusals before any tuning time is spent."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import auto_quant  # noqa: F401
from auto_quant import AutoRound, ExportError, FormatNotAvailableError, LayerConfigError
from auto_quant.errors import ConfigError
from auto_quant.export import packing
from auto_quant.export.fused import fused_sets, harmonise
from auto_quant.quant import QuantSpec, quantize_weight
from formats_helpers import force_edge_zeros, tiny_llama

Q, K, V = (f"model.layers.0.self_attn.{p}_proj" for p in "qkv")


# ------------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 32, False), (8, -1, False), (2, 64, False),
                                            (3, 32, True), (8, 128, True)])
def test_pack_quantized_is_byte_identical_to_compressed_tensors(bits, group, sym):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    w = torch.randn(96, 256)
    qw = quantize_weight(w, QuantSpec(bits=bits, group_size=group, sym=sym, scale_dtype="fp32"))
    scheme = QuantizationScheme(targets=["Linear"], weights={
        "num_bits": bits, "type": "int", "symmetric": sym, "strategy": "channel" if group == -1 else "group",
        "group_size": None if group == -1 else group})
    state = {"weight": qw.dequantize(torch.float32), "weight_scale": qw.scale.float()}
    if not sym:
        state["weight_zero_point"] = (qw.zero.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    theirs = BaseCompressor.get_value_from_registry("pack-quantized").compress(state, scheme)
    mine = packing.pack_pack_quantized(qw.codes, None if sym else qw.zero, qw.scale, bits, torch.float32)
    assert torch.equal(mine["weight_packed"], theirs["weight_packed"])
    assert torch.equal(mine["weight_shape"], theirs["weight_shape"].to(torch.int64))
    assert ("weight_zero_point" in theirs) == (not sym)
    if not sym:
        assert torch.equal(mine["weight_zero_point"], theirs["weight_zero_point"])
    codes, zero, scale = packing.unpack_pack_quantized(mine, bits)
    assert torch.equal(codes, qw.codes.int()) and torch.equal(zero, qw.zero.int()) and torch.equal(scale, qw.scale)
    assert ct is not None


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_positive_scales_is_exact(bits):
    spec = QuantSpec(bits=bits, group_size=32, sym=True, scale_dtype="fp32")
    qw = quantize_weight(torch.randn(16, 128), spec)
    assert bool((qw.scale < 0).any()) and bool((qw.scale > 0).any())
    codes, zero, scale = packing.positive_scales(qw.codes, qw.zero, qw.scale, bits, 32)
    assert bool((scale >= 0).all()) and int(codes.max()) <= 2**bits - 1 and int(codes.min()) >= 0
    from auto_quant.quant import dequantize

    assert torch.equal(dequantize(codes, scale, zero, spec), qw.dequantize())


def test_legacy_zero_decoding_is_modulo():
    z = torch.tensor([[0, 15, 8]]).t()  # [out=3, groups=1]
    stored = (z - 1) & 15
    t = packing.pack_gptq(torch.zeros(3, 32, dtype=torch.long), stored, torch.ones(3, 1), 4, 0)
    _, got, _ = packing.unpack_gptq(t["qweight"], t["qzeros"], t["scales"], 4, 32, 3, zero_offset=-1)
    assert got.flatten().tolist() == [0, 15, 8]


# ------------------------------------------------------------------------------------------ fused layers


def test_fused_sets_from_the_table():
    names = [Q, K, V, "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
             "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "lm_head",
             "model.layers.0.block_sparse_moe.experts.0.w1", "model.layers.0.block_sparse_moe.experts.0.w2",
             "model.layers.0.block_sparse_moe.experts.1.w3", "model.layers.0.block_sparse_moe.gate"]
    sets = sorted(sorted(s) for s in fused_sets(names))
    assert sorted([Q, K, V]) in sets
    assert ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"] in sets
    assert sorted(n for n in names if ".experts." in n) in sets
    assert len(sets) == 3  # o_proj, down_proj, the router and the head are fused with nothing


def test_harmonise_policies():
    s4, s8 = QuantSpec(4, 128, True), QuantSpec(8, 128, True)
    specs = {Q: s8, K: s4, V: s4, "model.layers.0.self_attn.o_proj": s4}
    out = harmonise(specs, "harmonise")
    assert out[K] == out[V] == s8 and out["model.layers.0.self_attn.o_proj"] == s4
    assert harmonise({Q: None, K: s4, V: s4})[K] is None  # 16 bits is the most precise
    assert harmonise({Q: QuantSpec(4, 32, True), K: QuantSpec(4, 128, False), V: s4})[V] == QuantSpec(4, 32, True)
    # a layer_config rule's setting wins over the scheme default, even when less precise
    s3a = QuantSpec(3, 32, False)
    out = harmonise({"m.0.mlp.gate_proj": s4, "m.0.mlp.up_proj": s3a}, explicit={"m.0.mlp.up_proj"})
    assert out["m.0.mlp.gate_proj"] == s3a
    assert harmonise(specs, "off") == specs
    with pytest.raises(LayerConfigError, match="fuse"):
        harmonise(specs, "error")
    with pytest.raises(ConfigError, match="fused_layers"):
        harmonise(specs, "sometimes")


def test_layer_config_breaking_a_fused_set_is_handled_before_tuning(caplog):
    model = tiny_llama()
    with caplog.at_level(logging.WARNING):
        ar = AutoRound(model, None, bits=4, group_size=32, iters=0, progress=False, layer_config={Q: {"bits": 8}})
    assert ar.specs[K].bits == ar.specs[V].bits == 8 and ar.specs["model.layers.1.self_attn.k_proj"].bits == 4
    assert "fuse" in caplog.text
    with pytest.raises(LayerConfigError, match=r"q_proj=8-bit"):
        AutoRound(model, None, bits=4, iters=0, layer_config={Q: {"bits": 8}}, fused_layers="error")
    off = AutoRound(model, None, bits=4, iters=0, layer_config={Q: {"bits": 8}}, fused_layers="off")
    assert off.specs[K].bits == 4


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("fmt,kw,match", [
    ("auto_gptqq", dict(bits=4), "not available.*auto_gptq"),
    ("auto_awq", dict(bits=2), "4-bit"),
    ("auto_awq", dict(bits=4, group_size=256), "group_size=256"),
    ("auto_gptq", dict(bits=5), "2/3/4/8"),
    ("auto_gptq", dict(bits=4, layer_config={"mlp.down_proj": {"bits": 8}}), "different bits"),
    ("auto_round,auto_awq", dict(bits=3), "auto_awq"),
])
def test_formats_that_cannot_hold_the_config_are_refused_before_tuning(tmp_path, fmt, kw, match):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ar = AutoRound(model, None, iters=2, nsamples=2, seqlen=16, progress=False, **kw)
    with pytest.raises((ExportError, FormatNotAvailableError), match=match):
        ar.quantize_and_save(tmp_path / "out", format=fmt)
    assert ar.outcome is None and not (tmp_path / "out").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was tuned


def test_gguf_grids_are_refused_by_integer_formats():
    model = tiny_llama()
    ar = AutoRound(model, None, scheme="gguf:q4_k_m", iters=0, progress=False)
    for fmt in ("auto_gptq", "auto_awq", "llm_compressor"):
        with pytest.raises(ExportError, match="grid"):
            ar.check_save_target("/nonexistent/out", format=fmt)


def test_conv1d_models_are_refused_by_awq(tmp_path):
    from tiny_models import tiny_model

    ar = AutoRound(tiny_model("gpt2"), None, bits=4, group_size=32, iters=0, progress=False)
    ar.quantize()
    with pytest.raises(ExportError, match="Conv1D"):
        ar.save_quantized(tmp_path / "awq", format="auto_awq")
    assert not (tmp_path / "awq").exists()
    ar.save_quantized(tmp_path / "gptq", format="auto_gptq")  # GPTQ loaders handle Conv1D
    assert (tmp_path / "gptq" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------ layouts written


def test_one_tuning_run_many_formats_and_zero_conventions(tmp_path):
    from safetensors.torch import load_file

    model = tiny_llama()
    force_edge_zeros(model)
    ar = AutoRound(model, None, bits=4, group_size=32, sym=False, iters=0, progress=False)
    ar.quantize()
    paths = ar.save_quantized(tmp_path / "all", format="auto_round,auto_gptq,auto_awq,llm_compressor")
    assert set(paths) == {"auto_round", "auto_gptq", "auto_awq", "llm_compressor"}
    q = ar.outcome.layers[Q].weight
    assert q.zero[0, 0] == 0 and q.zero[1, 0] == 15
    gptq = load_file(str(paths["auto_gptq"] / "model.safetensors"))
    stored = packing.unpack_bitstream(gptq[f"{Q}.qzeros"], 4, 128, dim=1).t()
    assert torch.equal(stored, q.zero.int())  # gptq_v2: the true zero, 0 stays 0
    assert torch.equal(gptq[f"{Q}.g_idx"], torch.arange(128, dtype=torch.int32) // 32)
    ct = load_file(str(paths["llm_compressor"] / "model.safetensors"))
    assert ct[f"{Q}.weight_zero_point"].shape == (128 * 4 // 32, 4)
    cfg = json.loads((paths["llm_compressor"] / "config.json").read_text())["quantization_config"]
    assert cfg["config_groups"]["group_0"]["weights"]["symmetric"] is False
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    for p in paths.values():
        meta = json.dumps(json.loads((p / "config.json").read_text())["quantization_config"])
        assert packing.CONTRACT_VERSION in meta


def test_sym_gptq_stores_legacy_zero_minus_one(tmp_path):
    from safetensors.torch import load_file

    ar = AutoRound(tiny_llama(), None, bits=3, group_size=64, sym=True, iters=0, progress=False)
    ar.quantize()
    ar.save_quantized(tmp_path / "q", format="auto_gptq")
    sd = load_file(str(tmp_path / "q" / "model.safetensors"))
    stored = packing.unpack_bitstream(sd[f"{Q}.qzeros"], 3, 128, dim=1)
    assert bool((stored == 3).all())  # 2**(3-1) - 1
    qc = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    assert qc["checkpoint_format"] == "gptq" and qc["bits"] == 3 and qc["desc_act"] is False

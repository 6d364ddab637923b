"""The quantization report from a real (tiny) tuning run: JSON content, layer errors, and a real PNG plot."""

from __future__ import annotations

import json

import pytest
import torch

from auto_quant import AutoRound
from auto_quant import report as rep
from auto_quant.models.discovery import weight_as_out_in
from auto_quant.quant import QuantSpec, quantize_weight
from tiny_models import tiny_model, token_data


@pytest.fixture(scope="module")
def run():
    model = tiny_model("llama", seed=1)
    ar = AutoRound(model, None, bits=3, group_size=32, iters=6, nsamples=8, seqlen=32, batch_size=4,
                   dataset=token_data(8, 64, seed=1), progress=False,
                   layer_config={"model.layers.1.mlp.down_proj": {"bits": 16}})
    float_bytes = rep.tensor_bytes(model)
    reference = rep.snapshot_weights(model, ar.specs)
    ar.quantize()
    samples = ar.calibration_samples()
    errors = rep.measure_layer_errors(model, reference, ar.outcome.specs, samples, max_samples=3, progress=False)
    return ar, model, reference, samples, errors, float_bytes


def test_layer_errors_match_a_hand_computation(run):
    ar, model, reference, samples, errors, _ = run
    name = "model.layers.0.self_attn.q_proj"
    layer = dict(model.named_modules())[name]
    xs = []
    h = layer.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]).float()))
    with torch.no_grad():
        for s in samples[:3]:
            model(input_ids=s["input_ids"][None])
    h.remove()
    x = torch.cat(xs)
    w = reference[name].float()
    w_rtn = quantize_weight(w, QuantSpec(3, 32, True), None, 1.0, 1.0).dequantize(torch.float32)
    w_q = weight_as_out_in(layer).detach().float()
    ref = (x @ w.t()).pow(2).sum()
    assert errors[name].rtn == pytest.approx(float((x @ (w_rtn - w).t()).pow(2).sum() / ref), rel=1e-4)
    assert errors[name].tuned == pytest.approx(float((x @ (w_q - w).t()).pow(2).sum() / ref), rel=1e-4)
    assert 0 < errors[name].rtn < 1


def test_report_json_content(run, tmp_path):
    ar, model, _, _, errors, float_bytes = run
    qbytes = rep.quantized_bytes_estimate(model, ar.outcome.specs, rep.tensor_bytes(model))
    report = rep.build_report(ar.outcome, model_name="tiny-llama", scheme=ar.config.scheme,
                              tuning=ar.export_context().tuning, float_bytes=float_bytes, quantized_bytes=qbytes,
                              layer_errors=errors, disk_bytes={"auto_round": 123}, calibration="tokens",
                              peak_rss_bytes=1)
    paths = rep.write_report(report, tmp_path)
    doc = json.loads(paths["json"].read_text())
    assert [b["name"] for b in doc["blocks"]] == ["model.layers.0", "model.layers.1"]
    for b in doc["blocks"]:
        assert b["loss_tuned"] <= b["loss_start"]  # the kept iterate is never worse than the start
        assert b["curve"][0] == [0, pytest.approx(b["loss_start"])] and len(b["curve"]) >= 2
    assert doc["kept_16bit"] == ["model.layers.1.mlp.down_proj", "lm_head"]  # the head stays 16-bit by default
    layers = {l["name"]: l for l in doc["layers"]}
    assert len(layers) == 13 and layers["model.layers.0.mlp.up_proj"]["bits"] == 3
    assert layers["model.layers.0.mlp.up_proj"]["shape"] == [176, 64]
    assert all(l["rel_error_rtn"] > 0 for l in layers.values())
    assert doc["size"]["float_bytes"] == float_bytes > doc["size"]["quantized_bytes_estimate"]
    assert doc["time"]["tuning_seconds"] > 0
    assert doc["summary"]["layers_quantized"] == 13


def test_quantized_size_estimate_by_hand():
    lin = torch.nn.Linear(100, 8, bias=False)
    model = torch.nn.Sequential()
    model.add_module("fc", lin)
    spec = QuantSpec(4, 32, False, "fp16")
    # 8x100 4-bit codes = 400 B; 8 rows x 4 groups x (2 B scale + 0.5 B zero) = 80 B
    assert rep.quantized_bytes_estimate(model, {"fc": spec}, rep.tensor_bytes(model)) == 400 + 64 + 16


def test_png_is_a_real_plot(run, tmp_path):
    from PIL import Image

    ar, model, _, _, errors, float_bytes = run
    report = rep.build_report(ar.outcome, model_name="tiny-llama", scheme=ar.config.scheme, tuning={"iters": 6},
                              float_bytes=float_bytes, quantized_bytes=float_bytes // 4, layer_errors=errors)
    path = rep.plot_report(report, tmp_path / "r.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (1300, 850)
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # lines, markers, text and bars, not a blank canvas


def test_snapshot_keeps_to_its_memory_budget_with_evenly_spread_blocks():
    model = tiny_model("llama", seed=1, num_hidden_layers=5)
    ar = AutoRound(model, None, bits=4, group_size=32, iters=0, progress=False)
    full = rep.snapshot_weights(model, ar.specs)
    per_block = sum(t.numel() * t.element_size() for n, t in full.items() if n.startswith("model.layers.0."))
    part = rep.snapshot_weights(model, ar.specs, max_bytes=3 * per_block)
    blocks = sorted({int(n.split(".")[2]) for n in part})
    assert blocks == [0, 2, 4] and len(part) == 3 * len(full) // 5
    assert all(torch.equal(part[n], full[n]) for n in part)

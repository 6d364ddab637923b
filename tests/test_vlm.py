"""Vision-language checkpoints (no causal-LM class): loaded as image-text-to-text models, their language model
tuned on text, the vision tower left in 16 bits, the processor files carried into the export."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import auto_quant  # noqa: F401  (routes auto-round checkpoints to auto_quant's loader)
from auto_quant import AutoRound, AutoRoundConfig
from auto_quant.inference.qlinear import QuantLinear
from tiny_models import token_data

TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, pad_token_id=0)


def _llava():
    return transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(**TEXT),
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=28, patch_size=14))


def _qwen2_5_vl():  # multimodal rotary positions (3 x batch x seq) reach every block
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(**TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64))


@pytest.mark.parametrize("make", [_llava, _qwen2_5_vl], ids=["llava", "qwen2_5_vl"])
def test_vision_language_checkpoint_quantizes_its_language_model(make, tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "src"
    transformers.AutoModelForImageTextToText.from_config(make()).save_pretrained(src)
    (src / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    ar = AutoRound(str(src), None, bits=4, group_size=32, iters=2, nsamples=4, seqlen=16,
                   dataset=[r[:16] for r in token_data(4, 16)], progress=False)
    ar.quantize()
    names = list(ar.outcome.layers)
    assert len(names) == 14 and all(n.startswith("model.language_model.layers.") for n in names)
    x = torch.tensor(token_data(2, 16, seed=3))
    with torch.no_grad():
        fq = ar.model(input_ids=x).logits
    out = tmp_path / "q"
    ar.save_quantized(out)
    assert json.loads((out / "preprocessor_config.json").read_text())["image_processor_type"] == "CLIPImageProcessor"
    q = transformers.AutoModelForImageTextToText.from_pretrained(out,
                                                                 quantization_config=AutoRoundConfig(backend="torch"))
    assert isinstance(q.get_submodule(names[0]), QuantLinear)
    assert not any(isinstance(m, QuantLinear) for n, m in q.named_modules() if "language_model" not in n)
    with torch.no_grad():
        torch.testing.assert_close(q(input_ids=x).logits, fq, rtol=2e-3, atol=2e-3)


def test_a_config_no_auto_class_knows_fails_clearly(tmp_path):
    from auto_quant.errors import ModelLoadError

    transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="neither a causal LM nor an image-text-to-text"):
        AutoRound(str(tmp_path), None, iters=0)


def test_low_bit_api_loads_a_vision_language_model(tmp_path):
    from auto_quant.transformers import AutoModelForImageTextToText as LowBit

    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(_llava()).eval()
    model.save_pretrained(tmp_path / "src")
    x = torch.tensor(token_data(2, 16, seed=3))
    with torch.no_grad():
        ref = model(input_ids=x).logits
    q = LowBit.from_pretrained(tmp_path / "src", load_in_low_bit="sym_int8",
                               modules_to_not_convert=["vision_tower", "multi_modal_projector"])
    assert isinstance(q.get_submodule("model.language_model.layers.1.mlp.down_proj"), QuantLinear)
    assert isinstance(q.get_submodule("model.multi_modal_projector.linear_1"), torch.nn.Linear)
    with torch.no_grad():
        assert (q(input_ids=x).logits - ref).abs().max() < 0.05 * ref.abs().max()

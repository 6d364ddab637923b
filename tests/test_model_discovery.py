"""``auto_quant.models.discovery``: giving a tied output head its own weight, and the config flags that keep
transformers from tying it again on load (also in a multimodal config's text config)."""

from __future__ import annotations

import torch
from tiny_models import tiny_model
from transformers import LlamaConfig, LlavaConfig

from auto_quant.models.discovery import find_lm_head, mark_untied, untie_lm_head


def test_mark_untied_sets_the_flag_on_the_config_and_its_text_config():
    cfg = LlavaConfig(text_config=LlamaConfig(tie_word_embeddings=True).to_dict())
    assert cfg.get_text_config().tie_word_embeddings is True
    mark_untied(cfg)
    assert cfg.tie_word_embeddings is False and cfg.get_text_config().tie_word_embeddings is False
    plain = LlamaConfig(tie_word_embeddings=True)
    mark_untied(plain)
    assert plain.tie_word_embeddings is False


def test_untie_lm_head_gives_the_head_its_own_copy():
    model = tiny_model("llama", tie_word_embeddings=True)
    _, head = find_lm_head(model)
    emb = model.get_input_embeddings()
    assert head.weight.data_ptr() == emb.weight.data_ptr()
    assert untie_lm_head(model, head) is True
    assert head.weight.data_ptr() != emb.weight.data_ptr()
    assert torch.equal(head.weight, emb.weight) and model.config.tie_word_embeddings is False
    with torch.no_grad():
        head.weight.add_(1.0)
    assert not torch.equal(head.weight, emb.weight)  # really separate storage
    assert untie_lm_head(model, head) is False  # already separate: nothing to do

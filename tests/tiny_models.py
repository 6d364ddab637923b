"""Tiny randomly initialised transformers models of real architectures, for fast tests."""

from __future__ import annotations

import torch
import transformers

VOCAB = 256


def _cfg(arch: str, **over):
    common = dict(vocab_size=VOCAB, max_position_embeddings=256)
    if arch == "llama":
        c = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, tie_word_embeddings=True, **common)
    elif arch == "qwen2":
        c = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, tie_word_embeddings=False, **common)
    elif arch == "mistral":
        c = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, sliding_window=16, **common)
    elif arch == "opt":
        c = transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                   word_embed_proj_dim=64, **common)
    elif arch == "gpt2":
        c = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=VOCAB)
    elif arch == "gemma":
        c = transformers.GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, **common)
    elif arch == "gemma2":
        c = transformers.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, sliding_window=8, **common)
    elif arch == "gemma3":
        c = transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=16, sliding_window=8, **common)
    elif arch == "mixtral":  # MoE: transformers 5 stores the experts fused, as 3-D tensors
        c = transformers.MixtralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **common)
    elif arch == "qwen2_moe":  # MoE with a shared expert and its Linear gate
        c = transformers.Qwen2MoeConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=64, shared_expert_intermediate_size=64, **common)
    elif arch == "qwen3_moe":
        c = transformers.Qwen3MoeConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=64, **common)
    elif arch == "gpt_oss":  # MoE with transposed, interleaved gate/up and biases, and a clamped gate
        c = transformers.GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                      **common)
    elif arch == "llama4_text":  # MoE whose experts take router-scaled inputs for every token ("dense")
        c = transformers.Llama4TextConfig(hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          num_local_experts=4, num_experts_per_tok=1, pad_token_id=0, **common)
    elif arch == "hunyuan_v1_moe":  # MoE whose router Linear sits inside a gate module (mlp.gate.wg)
        c = transformers.HunYuanMoEV1Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                                            moe_topk=2, pad_token_id=0, **common)
    elif arch == "bloom":  # ALiBi: a bias of [batch * heads, 1, seq] passed to every block
        c = transformers.BloomConfig(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB)
    else:
        raise ValueError(arch)
    for k, v in over.items():
        setattr(c, k, v)
    return c


ARCHS = ("llama", "qwen2", "mistral", "opt", "gpt2", "gemma", "gemma2", "gemma3")
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "llama4_text", "hunyuan_v1_moe")


def tiny_model(arch: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    cfg = _cfg(arch, **over)
    if arch == "gemma3":
        model = transformers.Gemma3ForCausalLM(cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return model


def token_data(n: int = 8, length: int = 64, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=g).tolist() for _ in range(n)]


def tiny_tokenizer():
    """A word-level tokenizer over VOCAB tokens ("w0" … "w251" plus specials), so text flows end to end."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 4)}
    vocab.update({"<unk>": VOCAB - 4, "<s>": VOCAB - 3, "</s>": VOCAB - 2, "<pad>": VOCAB - 1})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def tiny_texts(n: int = 16, words: int = 80, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 4, (words,), generator=g)) for _ in range(n)]

"""Shared fixtures for the GGUF tests: tiny models at shapes llama.cpp's K-quants accept, a real
byte-level BPE tokenizer trained on local text, and perplexity through llama.cpp and torch.

(No tests here; the other ``test_gguf*`` modules import it.)
"""

from __future__ import annotations

import functools
import inspect
import math

import numpy as np
import pytest
import torch
import transformers

from tiny_models import tiny_model

# K-quants need rows that are multiples of 256
GGUF_DIMS = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=64)
GGUF_ARCHS = ("llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "gemma3")
GGUF_MOE_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral")


def _text(module) -> str:
    return inspect.getsource(module)


@functools.lru_cache(maxsize=1)
def calib_text() -> str:
    import argparse

    return _text(argparse)


@functools.lru_cache(maxsize=1)
def eval_text() -> str:
    import textwrap
    import string

    return _text(textwrap) + _text(string)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A GPT-2 style byte-level BPE (400 tokens) trained on a stdlib module."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([calib_text()], trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    return tok


@functools.lru_cache(maxsize=1)
def tiny_spm_tokenizer():
    """A SentencePiece-style BPE with byte fallback (as Llama 2 / Gemma tokenizer.json files are), 500 tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tk.train_from_iterator([calib_text()], trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def gguf_model(arch: str, seed: int = 0, **over):
    """A tiny random model of ``arch`` whose shapes llama.cpp's K-quants hold, with llama.cpp-representable settings."""
    dims = dict(GGUF_DIMS, **over)
    if arch in ("gemma2", "gemma3"):
        dims.setdefault("query_pre_attn_scalar", dims["head_dim"])  # llama.cpp scales queries by 1/sqrt(head_dim)
    if arch == "mistral":
        dims.setdefault("sliding_window", None)  # llama.cpp runs Mistral without it
    if arch in GGUF_MOE_ARCHS:  # expert rows of 256 hold K-quant blocks; the top-k weighting llama.cpp uses
        dims.setdefault("moe_intermediate_size", 256)
        dims.setdefault("shared_expert_intermediate_size", 256)
        dims.setdefault("norm_topk_prob", arch != "qwen2_moe")
    if arch == "qwen3":
        torch.manual_seed(seed)
        cfg = transformers.Qwen3Config(max_position_embeddings=256, num_hidden_layers=2, tie_word_embeddings=False, **dims)
        return transformers.Qwen3ForCausalLM(cfg).eval()
    return tiny_model(arch, seed=seed, **dims)


def token_windows(text: str, n: int, length: int, offset: int = 0) -> list[list[int]]:
    ids = tiny_tokenizer()(text)["input_ids"][offset:]
    return [ids[i * length:(i + 1) * length] for i in range(n) if len(ids) >= (i + 1) * length]


def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")


def open_llama(path, n_ctx: int = 256):
    Llama = llama_cpp().Llama
    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, seed=0)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def _nll(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    lg = logits[:-1]
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    tgt = np.asarray(ids[1:])
    return float((lse - lg[np.arange(len(tgt)), tgt]).sum()), len(tgt)


def gguf_ppl(path, windows) -> float:
    """llama.cpp's perplexity of the GGUF file ``path`` on ``windows`` (opened and closed here)."""
    llm = open_llama(path)
    try:
        return llama_ppl(llm, windows)
    finally:
        llm.close()


def llama_ppl(llm, windows) -> float:
    tot, cnt = 0.0, 0
    for w in windows:
        s, c = _nll(llama_logits(llm, w), w)
        tot, cnt = tot + s, cnt + c
    return math.exp(tot / cnt)


@torch.no_grad()
def torch_ppl(model, windows) -> float:
    tot, cnt = 0.0, 0
    for w in windows:
        logits = model(torch.tensor([w])).logits[0].double().numpy()
        s, c = _nll(logits, w)
        tot, cnt = tot + s, cnt + c
    return math.exp(tot / cnt)


class torch_threads:
    """Run a block with ``n`` torch threads, restoring the previous count (real-model tests on shared cores)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.prev = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.prev)


def only_gguf(out_dir):
    files = sorted(p for p in out_dir.iterdir() if p.suffix == ".gguf")
    assert len(files) == 1, files
    return files[0]

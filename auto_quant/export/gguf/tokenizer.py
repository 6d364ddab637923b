"""``tokenizer.ggml.*`` metadata from a Hugging Face tokenizer.

Two vocabulary models are written: ``gpt2`` (byte-level BPE, with merges and the pre-tokenizer
name ``tokenizer.ggml.pre`` that selects llama.cpp's splitting regex) and ``llama``
(SentencePiece-style BPE with byte fallback, with scores). The pre-tokenizer is identified the
way llama.cpp's converter does — by hashing the tokenization of a fixed probe text — with a
structural fallback for a plain GPT-2 byte-level tokenizer. Special token ids, whether BOS/EOS
are added, and the chat template come from the tokenizer itself.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from hashlib import sha256

import gguf

log = logging.getLogger(__name__)

TT = gguf.TokenType

# the probe text of llama.cpp's convert_hf_to_gguf.py (get_vocab_base_pre); its tokenization's
# sha256 identifies the pre-tokenizer
PROBE_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)

# hash of the probe's token ids → llama.cpp pre-tokenizer name (families relevant to the supported
# architectures; values from llama.cpp's converter)
KNOWN_PRE = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
}


@dataclass
class TokenizerMeta:
    model: str  # "gpt2", "llama" or "none"
    pre: str | None = None
    tokens: list[str] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad/sep/cls/mask → id
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        if self.model == "none":
            return
        if self.pre:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges:
            w.add_token_merges(self.merges)
        for kind, tid in self.special.items():
            key = {"unk": "unknown", "pad": "padding", "sep": "seperator"}.get(kind, kind)  # llama.cpp's key spellings
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", int(tid))
        if self.add_bos is not None:
            w.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def detect_pre(tokenizer, tok_json: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer."""
    try:
        ids = tokenizer.encode(PROBE_TEXT)
        digest = sha256(str(ids).encode()).hexdigest()
    except Exception:  # pragma: no cover - a tokenizer that cannot encode the probe
        digest = ""
    if digest in KNOWN_PRE:
        return KNOWN_PRE[digest]
    pre = tok_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # exactly GPT-2's splitting regex
    log.warning("GGUF export: unknown pre-tokenizer (probe hash %s); writing 'default' — llama.cpp may split "
                "text differently from the Hugging Face tokenizer", digest[:16])
    return "default"


def _added(tok_json: dict) -> dict[int, dict]:
    return {a["id"]: a for a in tok_json.get("added_tokens", [])}


def _specials(tokenizer) -> dict[str, int]:
    out = {}
    for kind, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unk_token_id"),
                       ("pad", "pad_token_id"), ("sep", "sep_token_id"), ("mask", "mask_token_id")):
        tid = getattr(tokenizer, attr, None)
        if isinstance(tid, int) and tid >= 0:
            out[kind] = tid
    return out


def _adds(tokenizer, specials: dict[str, int]) -> tuple[bool | None, bool | None]:
    try:
        ids = tokenizer.encode("a")
    except Exception:  # pragma: no cover
        return None, None
    bos, eos = specials.get("bos"), specials.get("eos")
    add_bos = bool(ids) and bos is not None and ids[0] == bos
    add_eos = bool(ids) and eos is not None and ids[-1] == eos and len(ids) > 1
    return add_bos, add_eos


def _template(tokenizer) -> str | None:
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):
        return t.get("default") or next(iter(t.values()), None)
    return t if isinstance(t, str) else None


def tokenizer_metadata(tokenizer, n_vocab: int) -> TokenizerMeta:
    """Everything llama.cpp needs to tokenize like ``tokenizer``; padded with unused tokens up to ``n_vocab``."""
    if tokenizer is None:
        log.warning("GGUF export without a tokenizer: llama.cpp will only accept token ids")
        return TokenizerMeta(model="none")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise_unsupported(tokenizer)
    tok_json = json.loads(backend.to_str())
    model = tok_json.get("model", {})
    added = _added(tok_json)
    vocab: dict[str, int] = dict(model.get("vocab", {})) if isinstance(model.get("vocab"), dict) else {}
    specials = _specials(tokenizer)
    add_bos, add_eos = _adds(tokenizer, specials)
    meta = TokenizerMeta(model="gpt2", special=specials, add_bos=add_bos, add_eos=add_eos, chat_template=_template(tokenizer))
    byte_level = (tok_json.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") == "BPE" and not model.get("byte_fallback", False) and byte_level:
        meta.model = "gpt2"
        meta.pre = detect_pre(tokenizer, tok_json)
        meta.merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        scores = None
    elif model.get("type") == "BPE" and model.get("byte_fallback", False):
        meta.model = "llama"
        meta.pre = "default"
        meta.add_space_prefix = _adds_space_prefix(tok_json)
        scores = {}
    elif model.get("type") == "Unigram":
        meta.model = "llama"
        meta.pre = "default"
        meta.add_space_prefix = _adds_space_prefix(tok_json)
        vocab = {piece: i for i, (piece, _s) in enumerate(model["vocab"])}
        scores = {i: float(s) for i, (_p, s) in enumerate(model["vocab"])}
    else:
        raise_unsupported(tokenizer)
    by_id = {i: t for t, i in vocab.items()}
    for i, a in added.items():
        by_id[i] = a["content"]
    size = max(n_vocab, (max(by_id) + 1) if by_id else 0)
    tokens, types, score_list = [], [], []
    for i in range(size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
            score_list.append(-1000.0)
            continue
        if text == f"[PAD{i}]":  # a padding slot (written so by llama.cpp's converter, read back by transformers)
            kind = TT.UNUSED
        elif i in added and added[i].get("special", False):
            kind = TT.CONTROL
        elif i in added:
            kind = TT.USER_DEFINED
        elif meta.model == "llama" and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            kind = TT.BYTE
        else:
            kind = TT.NORMAL
        tokens.append(text)
        types.append(int(kind))
        if scores is None:
            continue
        score_list.append(scores.get(i, 0.0) if model.get("type") == "Unigram" else
                          (0.0 if kind != TT.NORMAL else -float(i)))
    meta.tokens = tokens
    meta.types = types
    meta.scores = None if scores is None else score_list
    if len(tokens) > n_vocab:
        log.warning("GGUF export: the tokenizer has %d tokens but the embedding %d rows", len(tokens), n_vocab)
    return meta


def _adds_space_prefix(tok_json: dict) -> bool:
    """SentencePiece's "add dummy prefix": a ``Prepend("▁")`` normalizer or a prepending ``Metaspace``."""
    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "Prepend":
                return True
            if node.get("type") == "Metaspace":
                return node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never") != "never"
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(tok_json.get("normalizer")) or walk(tok_json.get("pre_tokenizer"))


def raise_unsupported(tokenizer):
    from auto_quant.errors import ExportError

    raise ExportError(
        f"GGUF export: cannot convert tokenizer {type(tokenizer).__name__} (need a fast tokenizer with a BPE or "
        "Unigram model); pass tokenizer=None to write a GGUF that takes token ids only"
    )

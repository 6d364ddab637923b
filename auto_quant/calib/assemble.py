"""Tokenize and pack calibration text into ``nsamples`` samples of ``seqlen`` tokens."""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass

import torch

from auto_quant.calib import sources as src
from auto_quant.errors import CalibrationError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationSet:
    samples: tuple[torch.Tensor, ...]  # each 1-D LongTensor of seqlen tokens
    description: str

    def __len__(self) -> int:
        return len(self.samples)

    def as_model_inputs(self) -> list[dict]:
        return [{"input_ids": s} for s in self.samples]


def _need_tokenizer(tokenizer, what: str):
    if tokenizer is None:
        raise CalibrationError(
            f"{what} is text, so a tokenizer is needed: pass tokenizer=..., or give token ids "
            "(a list of lists of ints or tensors) as the dataset"
        )


def _pack_texts(texts, tokenizer, nsamples: int, seqlen: int) -> list[torch.Tensor]:
    """Concatenate documents (separated by EOS) and cut the stream into seqlen chunks."""
    need = nsamples * seqlen
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
        if len(stream) >= need:
            break
    n = len(stream) // seqlen
    if n == 0:
        raise CalibrationError(
            f"the calibration text holds {len(stream)} tokens, fewer than one sample of seqlen={seqlen}; "
            "give more text or lower seqlen"
        )
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
    chunks = []
    for i in range(min(n, nsamples)):
        chunk = stream[i * seqlen : (i + 1) * seqlen]
        if bos is not None:
            chunk = [bos] + chunk[:-1]
        chunks.append(torch.tensor(chunk, dtype=torch.long))
    return chunks


def _pack_ids(seqs, nsamples: int, seqlen: int) -> list[torch.Tensor]:
    stream: list[int] = []
    for s in seqs:
        ids = s.tolist() if isinstance(s, torch.Tensor) else list(s)
        stream.extend(int(x) for x in (ids[0] if ids and isinstance(ids[0], list) else ids))
    n = min(nsamples, len(stream) // seqlen)
    if n == 0:
        raise CalibrationError(f"the token-id dataset holds {len(stream)} tokens, fewer than one sample of seqlen={seqlen}")
    return [torch.tensor(stream[i * seqlen : (i + 1) * seqlen], dtype=torch.long) for i in range(n)]


def _texts_from_file(path: str):
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CalibrationError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                yield rec if isinstance(rec, str) else rec.get("text", "")
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for rec in data:
            yield rec if isinstance(rec, str) else rec.get("text", "")
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()


def default_source_name() -> str:
    for name in src.OFFLINE_DEFAULT_ORDER:
        if src.REGISTRY[name].available():
            return name
    raise CalibrationError("no offline calibration text is installed; pass dataset=... (a file, folder or list of strings)")


def build_calibration(dataset, tokenizer, nsamples: int, seqlen: int, seed: int = 42) -> CalibrationSet:
    """``dataset``: None (offline default), a registered name, a file or folder path,
    a list of strings, or a list of token-id sequences."""
    if dataset is None:
        name = default_source_name()
        log.info("calibration: no dataset given; using offline source %r (%s)", name, src.REGISTRY[name].description)
        dataset = name
    if isinstance(dataset, str):
        if dataset in src.REGISTRY:
            _need_tokenizer(tokenizer, f"source {dataset!r}")
            texts = src.REGISTRY[dataset].iter_texts(seed)
            desc = dataset
        elif os.path.isdir(dataset):
            _need_tokenizer(tokenizer, dataset)
            texts = src.folder_source(dataset).iter_texts(seed)
            desc = dataset
        elif os.path.isfile(dataset):
            _need_tokenizer(tokenizer, dataset)
            texts = _texts_from_file(dataset)
            desc = dataset
        else:
            raise CalibrationError(
                f"unknown calibration dataset {dataset!r}: use one of {sorted(src.REGISTRY)}, an existing file/folder, "
                "or pass a list of strings / token ids"
            )
        samples = _pack_texts(texts, tokenizer, nsamples, seqlen)
    elif isinstance(dataset, (list, tuple)):
        if len(dataset) == 0:
            raise CalibrationError("the calibration dataset is empty; give at least one text or token sequence")
        if all(isinstance(x, str) for x in dataset):
            _need_tokenizer(tokenizer, "the dataset")
            texts = list(dataset)
            random.Random(seed).shuffle(texts)
            samples = _pack_texts(texts, tokenizer, nsamples, seqlen)
            desc = f"{len(dataset)} in-memory texts"
        else:
            samples = _pack_ids(dataset, nsamples, seqlen)
            desc = f"{len(dataset)} in-memory token sequences"
    else:
        raise CalibrationError(f"dataset of type {type(dataset).__name__} is not supported; use a name, path or list")
    if len(samples) < nsamples:
        log.warning("calibration: %s gave %d samples of %d tokens (%d asked for)", desc, len(samples), seqlen, nsamples)
    log.info("calibration: %s -> %d samples x %d tokens", desc, len(samples), seqlen)
    return CalibrationSet(samples=tuple(samples), description=desc)

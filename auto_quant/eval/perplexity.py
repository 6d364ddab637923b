"""Perplexity with a fixed, documented protocol (see docs/evaluation.md).

Protocol
--------
1. Text is tokenized **without** special tokens; documents are joined with the EOS token
   into one stream (the calibration assembler's packing with ``concat=True`` unless the spec sets
   ``concat`` itself, so ``ppl:<spec>`` accepts every calibration spec).
2. The stream is cut into consecutive, non-overlapping windows of ``seqlen`` tokens; a tail
   shorter than ``seqlen`` is dropped. At most ``nsamples`` windows are used, the first ones
   in the source's order for the given seed (deterministic).
3. BOS: when the tokenizer adds a BOS token (``add_bos_token``), every window is
   ``[BOS] + seqlen-1`` text tokens; otherwise it is ``seqlen`` text tokens.
4. Each window is scored independently (no context carried over). Position 0 is context only;
   positions 1..seqlen-1 are predicted, so every window scores exactly ``seqlen - 1`` tokens
   (with BOS: every text token of the window). Positions whose attention mask is 0 are not scored.
5. ``ppl = exp(sum of token NLL / number of scored tokens)`` — token-weighted over all windows,
   computed in float32 from the model's logits.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from auto_quant.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    windows: int
    seqlen: int

    def to_dict(self) -> dict:
        return asdict(self)


def make_windows(ids, seqlen: int, bos_token_id: int | None = None, max_windows: int | None = None) -> list[torch.Tensor]:
    """Cut a 1-D token stream into windows following the protocol (steps 2-3)."""
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ConfigError(f"perplexity seqlen={seqlen!r} is invalid; use an integer >= 2")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    step = seqlen - 1 if bos_token_id is not None else seqlen
    n = ids.numel() // step
    if max_windows is not None:
        n = min(n, max_windows)
    out = []
    for i in range(n):
        chunk = ids[i * step : (i + 1) * step]
        if bos_token_id is not None:
            chunk = torch.cat([torch.tensor([bos_token_id], dtype=torch.long), chunk])
        out.append(chunk)
    return out


def _device_of(model: nn.Module) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device
    except Exception:
        return next(model.parameters()).device


@torch.no_grad()
def perplexity(model: nn.Module, windows, batch_size: int = 1, progress: bool = True, desc: str = "perplexity") -> PerplexityResult:
    """Score ``windows`` (1-D LongTensors, or dicts with ``input_ids`` and an optional
    ``attention_mask``) with ``model`` following the protocol (steps 4-5)."""
    items = [w if isinstance(w, dict) else {"input_ids": w} for w in windows]
    if not items:
        raise ConfigError("perplexity needs at least one window; give more text or lower the window length")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"evaluation batch size {batch_size!r} is invalid; use an integer >= 1")
    device = _device_of(model)
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tok = 0
    lengths = {int(it["input_ids"].numel()) for it in items}
    bar = tqdm(total=len(items), desc=desc, leave=False, disable=not progress)
    try:
        i = 0
        while i < len(items):
            # windows of one length batch together; mixed lengths run one by one
            chunk = items[i : i + batch_size] if len(lengths) == 1 else items[i : i + 1]
            ids = torch.stack([c["input_ids"].reshape(-1) for c in chunk]).to(device)
            mask = None
            if any(c.get("attention_mask") is not None for c in chunk):
                mask = torch.stack([
                    (c["attention_mask"] if c.get("attention_mask") is not None else torch.ones_like(c["input_ids"])).reshape(-1)
                    for c in chunk
                ]).to(device)
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
            logits = out.logits[:, :-1].float()
            labels = ids[:, 1:].clone()
            if mask is not None:
                labels[mask[:, 1:] == 0] = -100
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
            total_nll += float(nll)
            total_tok += int((labels != -100).sum())
            i += len(chunk)
            bar.update(len(chunk))
            if total_tok:
                bar.set_postfix_str(f"ppl {math.exp(total_nll / total_tok):.3f}")
    finally:
        bar.close()
        model.train(was_training)
    if total_tok == 0:
        raise ConfigError("perplexity scored no tokens (every window is masked or one token long)")
    mean = total_nll / total_tok
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=total_tok, windows=len(items),
                            seqlen=max(lengths))


def packed_spec(spec):
    """``spec`` with ``concat=True`` on every source that does not set ``concat`` itself, so documents are
    joined with EOS and cut into consecutive windows (protocol step 1-2) instead of truncated one by one."""
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    try:
        from auto_quant.calib.spec import DatasetSpec, SourceSpec, parse_dataset_spec
    except ImportError:  # a calibration package without the spec language packs by default
        return spec
    text = os.fspath(spec)
    if os.path.exists(os.path.expanduser(text)):
        return DatasetSpec((SourceSpec(source=text, concat=True),))
    parsed = parse_dataset_spec(text)
    return DatasetSpec(tuple(s if s.concat is not None else replace(s, concat=True) for s in parsed.sources))


def windows_for_spec(tokenizer, spec, seqlen: int, nsamples: int, seed: int = 0) -> tuple[list[dict], str]:
    """The evaluation windows of any calibration spec (a source name, a file or folder, a list of texts),
    assembled by the calibration assembler (protocol steps 1-3); returns them and the data description."""
    from auto_quant.calib import build_calibration

    if tokenizer is None and isinstance(spec, str):
        raise ConfigError("perplexity on text needs a tokenizer; the model has none (save one with the model)")
    calib = build_calibration(packed_spec(spec), tokenizer, nsamples, seqlen, seed)
    samples = calib.as_model_inputs()
    log.info("perplexity data: %s, %d windows x %d tokens (seed %d)", calib.description, len(samples), seqlen, seed)
    return samples, calib.description


def perplexity_on_spec(model: nn.Module, tokenizer, spec, seqlen: int, nsamples: int, seed: int = 0,
                       batch_size: int = 1, progress: bool = True) -> tuple[PerplexityResult, str]:
    """Perplexity on any calibration spec; returns the result and the data description."""
    samples, desc = windows_for_spec(tokenizer, spec, seqlen, nsamples, seed)
    return perplexity(model, samples, batch_size=batch_size, progress=progress, desc=f"ppl {desc}"), desc


__all__ = ["PerplexityResult", "make_windows", "perplexity", "perplexity_on_spec", "windows_for_spec"]

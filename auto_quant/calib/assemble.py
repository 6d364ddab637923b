"""Assemble calibration samples: every sample is exactly ``seqlen`` tokens.

Per source (``concat`` key):

* not given (default): a text of at least ``seqlen`` tokens gives one sample, truncated; shorter
  texts are packed together (EOS after each) into further samples;
* ``concat``: every text goes into one token stream (EOS after each) cut into ``seqlen`` chunks;
* ``concat=false``: one text, one sample; shorter texts are padded.

A BOS token (when the tokenizer adds one) starts every sample, once. Nothing short is silently
dropped: a last partial chunk is right-padded and the set then carries an ``attention_mask``
(1 = real token) for every sample; short texts left over once the budget is met are counted in the
log. ``num`` fixes a source's sample count; sources without ``num`` share what is left of
``nsamples`` evenly. The final order is shuffled with the seed.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from auto_quant.calib import cache as cache_mod
from auto_quant.calib.hub import DEFAULT_HUB_SOURCE, HUB_SOURCES, datasets_installed, hub_unavailable_reason
from auto_quant.calib.records import MemorySource, is_memory_dataset
from auto_quant.calib.sources import CORPORA, OFFLINE_DEFAULT_ORDER, check_split, resolve_source
from auto_quant.calib.spec import DatasetSpec, SourceSpec, parse_dataset_spec
from auto_quant.errors import CalibrationError, CalibrationSpecError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class SourceSummary:
    """What one source contributed (the one-line log summary)."""

    source: str
    requested: int
    samples: int
    tokens: int
    real_tokens: int
    # samples == full + packed_samples + padded
    full: int = 0  # full samples cut from one long text
    packed_texts: int = 0  # texts packed together (short ones; all with concat)
    packed_samples: int = 0  # full samples of packed texts
    padded: int = 0  # samples with padding (a short text, or the last packed chunk)
    unused_texts: int = 0  # packed texts left over when the budget was met
    empty_texts: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        parts = [f"{self.full} from long texts (truncated)"]
        if self.packed_texts:
            parts.append(f"{self.packed_samples} packed from {self.packed_texts} texts")
        parts.append(f"{self.padded} padded")
        if self.unused_texts:
            parts.append(f"{self.unused_texts} texts unused (budget met)")
        if self.empty_texts:
            parts.append(f"{self.empty_texts} empty texts skipped")
        return (f"calibration source {self.source}: {self.samples}/{self.requested} samples, {self.tokens} tokens "
                f"({self.real_tokens} real): {', '.join(parts)} [{self.seconds:.1f} s]")


@dataclass(frozen=True)
class CalibrationSet:
    samples: tuple[torch.Tensor, ...]  # each a 1-D LongTensor of exactly seqlen tokens
    description: str
    attention_masks: tuple[torch.Tensor, ...] | None = None  # set for every sample when any is padded
    summaries: tuple[SourceSummary, ...] = ()
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.samples)

    def as_model_inputs(self) -> list[dict]:
        if self.attention_masks is None:
            return [{"input_ids": s} for s in self.samples]
        return [{"input_ids": s, "attention_mask": m} for s, m in zip(self.samples, self.attention_masks)]


@dataclass(frozen=True)
class SourceContext:
    """What a source may use to produce its documents."""

    item: SourceSpec
    tokenizer: Any
    model: Any
    seqlen: int
    seed: int
    budget: int
    bos: int | None
    eos: int | None
    data_dirs: tuple = ()

    @property
    def split(self):
        return self.item.split

    @property
    def concat(self):
        return self.item.concat


# ---------------------------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class SpecialTokens:
    bos: int | None  # prepended once per sample when the tokenizer adds BOS by default
    eos: int | None  # appended after each packed text
    pad: int


def special_tokens(tokenizer) -> SpecialTokens:
    if tokenizer is None:
        return SpecialTokens(None, None, 0)
    bos = tokenizer.bos_token_id
    if bos is not None:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        if not (len(with_special) > len(plain) and with_special[0] == bos):
            bos = None
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos if eos is not None else 0
    return SpecialTokens(bos, eos, int(pad))


def _render_chat(tokenizer, doc, system_prompt: str | None) -> str:
    msgs = [dict(m) for m in doc] if isinstance(doc, tuple) else [{"role": "user", "content": doc}]
    if system_prompt is not None and not (msgs and msgs[0].get("role") == "system"):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception as e:
        raise CalibrationError(f"the tokenizer's chat template failed on a calibration record ({type(e).__name__}: {e})") from None


def make_encoder(tokenizer, item: SourceSpec, special: SpecialTokens) -> Callable[[Any, int | None], list[int]]:
    """``encode(doc, limit)`` -> the document's token ids; with ``limit``, only the first ``limit + 1``
    (so that ``len(ids) > limit`` tells a longer document)."""

    def tokenize(text: str, limit: int | None) -> list[int]:
        if tokenizer is None:
            raise CalibrationError(f"source {item.source!r} gives text, so a tokenizer is needed: pass tokenizer=..., "
                                   "or give token ids as the dataset")
        if limit is None:
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        prefix = text[: 8 * (limit + 16)]
        ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        if len(prefix) < len(text) and len(ids) < limit + 8:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[: limit + 1]

    def encode(doc, limit: int | None) -> list[int]:
        if isinstance(doc, list):
            if item.apply_chat_template:
                raise CalibrationError(f"source {item.source!r} gives token ids; apply_chat_template needs text records")
            return doc if limit is None else doc[: limit + 1]
        if item.apply_chat_template:
            text = _render_chat(tokenizer, doc, item.system_prompt)
        elif isinstance(doc, tuple):  # chat turns without a template: their contents as plain text
            text = "\n\n".join(m["content"] for m in doc)
        else:
            text = doc
        ids = tokenize(text, None if limit is None else limit + 1)
        if special.bos is not None and ids and ids[0] == special.bos:
            ids = ids[1:]  # the template wrote BOS; samples get exactly one
        return ids if limit is None else ids[: limit + 1]

    return encode


# ---------------------------------------------------------------------------------------------- packing
def pack_documents(docs: Iterable, encode: Callable, budget: int, seqlen: int, concat: bool | None,
                   special: SpecialTokens) -> tuple[list[tuple[list[int], int]], dict]:
    """Turn documents into at most ``budget`` samples of ``seqlen`` tokens: a list of
    ``(ids, n_real)`` (real tokens first, then padding) and counts for the summary."""
    bos, eos = special.bos, special.eos
    body = seqlen - (1 if bos is not None else 0)
    if body < 1:
        raise CalibrationError(f"seqlen={seqlen} leaves no room after the BOS token; use seqlen >= 2")
    head = [bos] if bos is not None else []
    sep = [eos] if eos is not None else []
    out: list[tuple[list[int], int]] = []
    st = dict(full=0, packed_texts=0, packed_samples=0, padded=0, unused_texts=0, empty_texts=0)
    buf: list[int] = []
    buf_docs = 0  # documents whose start is in buf and not yet emitted

    def emit(tokens: list[int]) -> None:
        real = len(head) + len(tokens)
        out.append((head + tokens + [special.pad] * (body - len(tokens)), real))

    def drain() -> None:
        nonlocal buf, buf_docs
        while len(buf) >= body and len(out) < budget:
            emit(buf[:body])
            buf = buf[body:]
            st["packed_samples"] += 1
            buf_docs = 1 if buf else 0

    for doc in docs:
        if len(out) >= budget:
            break
        if concat is True:
            need = (budget - len(out)) * body - len(buf)
            ids = encode(doc, max(need, 1))
        else:
            ids = encode(doc, body)
        if not ids:
            st["empty_texts"] += 1
            continue
        if concat is False:
            if len(ids) >= body:
                emit(ids[:body])
                st["full"] += 1
            else:
                emit(ids)
                st["padded"] += 1
            continue
        if concat is None and len(ids) >= body:
            emit(ids[:body])
            st["full"] += 1
            continue
        buf.extend(ids + sep)
        buf_docs += 1
        st["packed_texts"] += 1
        drain()
    if buf and len(out) < budget and any(t != eos for t in buf):
        emit(buf[:body])
        st["padded"] += 1
        buf, buf_docs = [], 0
    if buf_docs and len(out) >= budget:
        st["unused_texts"] += buf_docs
    return out, st


def allocate(nsamples: int, nums: list[int | None], where: list[str]) -> list[int]:
    """Samples per source: ``num`` where given, the rest of ``nsamples`` shared by the others."""
    fixed = sum(n for n in nums if n is not None)
    free = [i for i, n in enumerate(nums) if n is None]
    if not free:
        if fixed != nsamples:
            log.info("calibration: the sources' num values add up to %d samples (nsamples=%d is not used)", fixed, nsamples)
        return list(nums)
    left = nsamples - fixed
    if left < len(free):
        raise CalibrationError(
            f"nsamples={nsamples} minus the num values ({fixed}) leaves {max(left, 0)} samples for "
            f"{len(free)} source(s) without num ({', '.join(where[i] for i in free)}); raise nsamples or give each a num"
        )
    out = list(nums)
    for k, i in enumerate(free):
        out[i] = left // len(free) + (1 if k < left % len(free) else 0)
    return out


# ---------------------------------------------------------------------------------------------- default
def default_source(data_dirs=None, nsamples: int | None = None) -> str:
    """The spec used when no dataset is given: ``NeelNanda/pile-10k`` when it loads (datasets
    installed, and the hub reachable or the dataset cached with ``HF_HUB_OFFLINE``), else an equal
    mix of the installed offline corpora (at most ``nsamples`` of them, in OFFLINE_DEFAULT_ORDER).

    A mix, not one corpus: in docs/bench/calibration.md the mix of all four came within 1.2-1.4x of
    in-domain calibration on both held-out domains, while any single out-of-domain corpus was 2-10x off.
    """
    if datasets_installed():
        reason = hub_unavailable_reason()
        if reason is None:
            try:
                HUB_SOURCES[DEFAULT_HUB_SOURCE].load(None, 0)
                log.info("calibration: no dataset given; using %s", DEFAULT_HUB_SOURCE)
                return DEFAULT_HUB_SOURCE
            except CalibrationError as e:
                log.info("calibration: the default %s is not loadable (%s)", DEFAULT_HUB_SOURCE, e)
        else:
            log.info("calibration: the default %s is not used: %s", DEFAULT_HUB_SOURCE, reason)
    installed = [n for n in OFFLINE_DEFAULT_ORDER if CORPORA[n].available(data_dirs)]
    missing = [n for n in OFFLINE_DEFAULT_ORDER if n not in installed]
    names = installed[: max(nsamples, 1)] if nsamples is not None else installed
    if names:
        log.info("calibration: no dataset given; using the offline corpora %s in equal shares%s", ", ".join(names),
                 f" (not installed: {', '.join(missing)}; see docs/calibration.md)" if missing else "")
        return ",".join(names)
    hints = "; ".join(f"{n}: {CORPORA[n].install_hint}" for n in OFFLINE_DEFAULT_ORDER)
    raise CalibrationError(f"no calibration data is available: {DEFAULT_HUB_SOURCE} cannot be loaded and no offline "
                           f"corpus is installed. Install one ({hints}), or pass dataset= a file, folder or list of texts")


# ---------------------------------------------------------------------------------------------- build
def _check_positive(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise CalibrationError(f"{name}={v!r} is invalid; it must be a positive integer")


def _to_spec(dataset) -> tuple[DatasetSpec | None, str, MemorySource | None]:
    if isinstance(dataset, os.PathLike):
        s = SourceSpec(source=os.fspath(dataset))
        return DatasetSpec((s,)), str(s), None
    if isinstance(dataset, str):
        if any(c in dataset for c in ",:=\"'") and os.path.exists(os.path.expanduser(dataset)):
            # an existing path with spec characters in it needs no quoting
            s = SourceSpec(source=dataset)
            return DatasetSpec((s,)), str(s), None
        return parse_dataset_spec(dataset), dataset, None
    if isinstance(dataset, DatasetSpec):
        return dataset, str(dataset), None
    if isinstance(dataset, SourceSpec):
        return DatasetSpec((dataset,)), str(dataset), None
    if isinstance(dataset, dict):
        raise CalibrationError("a dict is not a calibration dataset; pass a list of records such as "
                               "[{'text': ...}] or [{'input_ids': [...]}], a spec string, or a path")
    if is_memory_dataset(dataset):
        if hasattr(dataset, "__len__") and len(dataset) == 0:
            raise CalibrationError("the calibration dataset is empty; give at least one text or token sequence")
        return None, "", MemorySource(dataset)
    raise CalibrationError(f"a calibration dataset of type {type(dataset).__name__} is not supported; use a spec "
                           "string, a path, a list of texts or token ids, or an iterable of dicts")


def _positioned(e: CalibrationError, text: str, pos: int) -> CalibrationError:
    if isinstance(e, CalibrationSpecError) or not text:
        return e
    return CalibrationSpecError(str(e), text, pos)


def build_calibration(dataset, tokenizer, nsamples: int, seqlen: int, seed: int = 42, *, model=None,
                      cache_dir: str | os.PathLike | None = "auto", data_dirs=None) -> CalibrationSet:
    """Calibration samples of exactly ``seqlen`` tokens.

    ``dataset``: None (the default source), a spec string (see :mod:`auto_quant.calib.spec`), a
    path, a :class:`DatasetSpec`, or in-memory data (a list of strings, of token-id lists or
    tensors, a 2-D id tensor, or an iterable of dicts with "text" / "input_ids" / "messages").
    ``model`` is needed for the ``self`` source. ``cache_dir``: where tokenized sets are cached
    ("auto" = ``~/.cache/auto_quant/calib``, None = no cache). ``data_dirs``: extra folders
    searched for the offline corpora (see ``.ci/fetch_data.sh``).
    """
    _check_positive("nsamples", nsamples)
    _check_positive("seqlen", seqlen)
    if dataset is None:
        dataset = default_source(data_dirs, nsamples)
    spec, text, memory = _to_spec(dataset)
    data_dirs = tuple(str(d) for d in (data_dirs or ()))
    special = special_tokens(tokenizer)

    if memory is not None:
        items = [(SourceSpec(source="in-memory data"), memory)]
    else:
        items = []
        for item in spec.sources:
            try:
                src = resolve_source(item)
            except CalibrationError as e:
                raise _positioned(e, text, item.position) from None
            _validate(item, src, tokenizer, text)
            items.append((item, src))
    budgets = allocate(nsamples, [it.num for it, _ in items], [str(it) for it, _ in items])

    key = None
    if cache_dir is not None and tokenizer is not None and all(src.kind in ("corpus", "folder", "file", "hub") for _, src in items):
        cache_dir = cache_mod.default_cache_dir() if cache_dir == "auto" else Path(cache_dir)
        stamps = []
        for item, src in items:
            try:
                stamps.append(src.stamp(data_dirs) if src.kind in ("corpus", "folder", "hub") else src.stamp())
            except CalibrationError as e:
                raise _positioned(e, text, item.position) from None
        key = cache_mod.cache_key(dict(tok=cache_mod.tokenizer_fingerprint(tokenizer), spec=str(spec), seqlen=seqlen,
                                       nsamples=nsamples, seed=seed, stamps=stamps))
        entry = cache_mod.load_entry(cache_dir, key)
        if entry is not None:
            result = _from_entry(entry)
            for summary in result.summaries:
                log.info("%s (cached)", summary.line())
            log.info("calibration: %s -> %d samples x %d tokens (from the cache %s)", result.description, len(result),
                     seqlen, cache_dir)
            return result

    def run(item: SourceSpec, src, budget: int):
        t0 = time.perf_counter()
        ctx = SourceContext(item=item, tokenizer=tokenizer, model=model, seqlen=seqlen,
                            seed=seed if item.seed is None else item.seed, budget=budget,
                            bos=special.bos, eos=special.eos, data_dirs=data_dirs)
        got, st = pack_documents(src.documents(ctx), make_encoder(tokenizer, item, special), budget, seqlen,
                                 item.concat, special)
        label = str(item) if memory is None else src.describe()
        summary = SourceSummary(source=label, requested=budget, samples=len(got), tokens=len(got) * seqlen,
                                real_tokens=sum(r for _, r in got), seconds=time.perf_counter() - t0, **st)
        return got, summary

    results = [run(item, src, budget) for (item, src), budget in zip(items, budgets)]
    # a source that ran short leaves its share to the sources without num that still have text
    short = sum(budgets) - sum(len(g) for g, _ in results)
    for i, ((item, src), budget) in enumerate(zip(items, budgets)):
        if short <= 0:
            break
        if item.num is None and len(results[i][0]) == budget and budget > 0:
            log.info("calibration: asking %s for %d more samples to make up for a short source", item, short)
            results[i] = run(item, src, budget + short)
            short = sum(budgets) - sum(len(g) for g, _ in results)
    rows: list[tuple[list[int], int]] = []
    summaries = []
    for got, summary in results:
        log.info("%s", summary.line())
        if len(got) < summary.requested:
            log.warning("calibration source %s gave %d of the %d samples asked for (not enough text)", summary.source,
                        len(got), summary.requested)
        rows.extend(got)
        summaries.append(summary)
    if not rows:
        raise CalibrationError(f"the calibration data ({text or 'in-memory data'}) gave no tokens; give non-empty texts")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    ids = torch.tensor([rows[i][0] for i in order], dtype=torch.long)
    real = [rows[i][1] for i in order]
    masks = None
    if any(r < seqlen for r in real):
        masks = (torch.arange(seqlen)[None, :] < torch.tensor(real)[:, None]).long()
    description = str(spec) if memory is None else summaries[0].source
    result = CalibrationSet(samples=tuple(ids), description=description,
                            attention_masks=None if masks is None else tuple(masks), summaries=tuple(summaries))
    total = len(result)
    if total < sum(budgets):
        log.warning("calibration: %d samples of %d tokens (%d asked for)", total, seqlen, sum(budgets))
    log.info("calibration: %s -> %d samples x %d tokens", description, total, seqlen)
    if key is not None:
        cache_mod.save_entry(cache_dir, key, _to_entry(result, ids, masks))
    return result


def _validate(item: SourceSpec, src, tokenizer, text: str) -> None:
    """Spec-level problems found once the source is known, reported at the key's position."""
    if item.split is not None:
        try:
            if src.kind in ("file", "self"):
                raise CalibrationError(f"source {item.source!r} has no splits; remove split=...")
            if src.kind in ("corpus", "folder"):
                check_split(item.source, item.split)
        except CalibrationError as e:
            raise _positioned(e, text, item.key_position("split")) from None
    if item.apply_chat_template:
        msg = None
        if tokenizer is None:
            msg = "apply_chat_template needs a tokenizer; pass tokenizer=..."
        elif not getattr(tokenizer, "chat_template", None):
            msg = (f"apply_chat_template was asked for {item.source!r}, but the tokenizer has no chat template; "
                   "remove apply_chat_template or use a tokenizer that has one")
        if msg:
            raise _positioned(CalibrationError(msg), text, item.key_position("apply_chat_template"))
        if item.system_prompt is None:
            probe = _render_chat(tokenizer, "\x00probe\x00", None)
            if "system" in probe.split("\x00probe\x00")[0].lower():
                log.warning("calibration: the tokenizer's own chat template adds a system turn for %s (auto_quant adds "
                            "none); give system_prompt=... to replace it", item.source)


def _to_entry(result: CalibrationSet, ids: torch.Tensor, masks) -> dict:
    return {
        "input_ids": ids.to(torch.int32),
        "real": None if masks is None else masks.sum(dim=1).to(torch.int32),
        "description": result.description,
        "summaries": [{k: getattr(s, k) for k in s.__dataclass_fields__} for s in result.summaries],
    }


def _from_entry(entry: dict) -> CalibrationSet:
    ids = entry["input_ids"].long()
    masks = None
    if entry.get("real") is not None:
        masks = (torch.arange(ids.shape[1])[None, :] < entry["real"][:, None]).long()
    summaries = tuple(SourceSummary(**s) for s in entry.get("summaries", []))
    return CalibrationSet(samples=tuple(ids), description=entry["description"],
                          attention_masks=None if masks is None else tuple(masks), summaries=summaries, from_cache=True)

"""On-disk cache of assembled calibration tokens, keyed by tokenizer, spec, seqlen, sample count,
seed and the sizes/mtimes of the source files. Writes are atomic; an unreadable entry is rebuilt."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from auto_quant.paths import replace_file, user_cache_dir

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return user_cache_dir("calib")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about a tokenizer that changes token ids."""
    if tokenizer is None:
        return "none"
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "add_bos_token", "add_eos_token", "chat_template"):
        h.update(repr(getattr(tokenizer, attr, None)).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True, default=str).encode()).hexdigest()


def load_entry(cache_dir: Path, key: str) -> dict | None:
    path = Path(cache_dir) / f"{key}.pt"
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(entry, dict) or entry.get("version") != CACHE_VERSION:
            raise ValueError("unexpected layout")
        return entry
    except Exception as e:  # a corrupt or foreign file: rebuild it
        log.warning("calibration cache entry %s is unreadable (%s); rebuilding it", path, e)
        return None


def save_entry(cache_dir: Path, key: str, entry: dict) -> None:
    cache_dir = Path(cache_dir)
    try:
        replace_file(cache_dir / f"{key}.pt", lambda tmp: torch.save({"version": CACHE_VERSION, **entry}, tmp))
    except OSError as e:
        log.warning("could not write the calibration cache in %s (%s); continuing without it", cache_dir, e)

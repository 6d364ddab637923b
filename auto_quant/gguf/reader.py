"""Opening GGUF files safely: every structural problem becomes a :class:`GGUFFileError`.

``gguf``'s reader memory-maps the file and trusts its header; a truncated or corrupted file
surfaces as numpy/struct errors deep inside it, or as tensors that silently run past the end of
the file. :func:`open_gguf` checks the magic, the version, the metadata and that every tensor's
bytes lie inside the file, and names the file, the problem and the fix.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
import numpy as np

from auto_quant.errors import GGUFFileError, ModelLoadError

GGUF_MAGIC = b"GGUF"
_HEADER_BYTES = 24  # magic, version, tensor count, kv count


def _fail(path: Path, what: str) -> GGUFFileError:
    return GGUFFileError(
        f"{str(path)!r} is not a usable GGUF file: {what}. Re-download or re-export it (a partial download or copy "
        "leaves a truncated file)"
    )


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A validated ``gguf.GGUFReader`` for ``path``."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise ModelLoadError(f"GGUF file {str(p)!r} does not exist")
    size = p.stat().st_size
    if size < _HEADER_BYTES:
        raise _fail(p, f"only {size} bytes, shorter than a GGUF header")
    with open(p, "rb") as f:
        head = f.read(8)
    if head[:4] != GGUF_MAGIC:
        raise _fail(p, f"it starts with {head[:4]!r}, not the GGUF magic {GGUF_MAGIC!r}")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise _fail(p, f"GGUF version {version} is not supported (2 or 3)")
    try:
        reader = gguf.GGUFReader(str(p))
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, struct.error, MemoryError, TypeError) as e:
        raise _fail(p, f"its header or metadata cannot be parsed ({type(e).__name__}: {e})") from None
    if "general.architecture" not in reader.fields:
        raise _fail(p, "it has no general.architecture key")
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.size * t.data.dtype.itemsize < int(t.n_bytes):
            raise _fail(p, f"tensor {t.name!r} needs bytes up to {end} but the file has {size} (truncated)")
    return reader


def field_value(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:  # pragma: no cover - a malformed field
        return default


def tensor_array(reader: gguf.GGUFReader, name: str, path: str | os.PathLike = "") -> np.ndarray:
    """One tensor dequantized to float32, in PyTorch order (``[rows, cols]``); non-finite values are an error."""
    for t in reader.tensors:
        if t.name == name:
            try:
                a = gguf.quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise GGUFFileError(f"tensor {name!r} has type {t.tensor_type.name}, which cannot be dequantized") from None
            a = np.asarray(a, dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
            if not np.isfinite(a).all():
                raise _fail(Path(str(path) or "?"), f"tensor {name!r} holds non-finite values (corrupted data)")
            return a
    raise KeyError(name)

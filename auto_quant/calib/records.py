"""Documents from local files (.txt, .json, .jsonl) and from in-memory Python objects.

A *document* is one of: a ``str`` (text), a ``list[int]`` (token ids), or a ``Messages`` tuple
(chat turns, each a ``{"role": ..., "content": ...}`` dict). Records of .json/.jsonl files and of
iterables may be strings, ``{"text": ...}``, ``{"input_ids": [...]}`` (optionally with an
``attention_mask`` whose zeros drop padding) or ``{"messages": [...]}``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Union

import torch

from auto_quant.errors import CalibrationError

Messages = tuple  # tuple of {"role", "content"} dicts
Document = Union[str, list, Messages]

LOCAL_FILE_TYPES = (".txt", ".json", ".jsonl")


def _ids(value, where: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool:
            raise CalibrationError(f"{where}: token ids must be integers, got a {value.dtype} tensor")
        value = value.reshape(-1).tolist()
    if not isinstance(value, (list, tuple)):
        raise CalibrationError(f"{where}: token ids must be a list of ints or an integer tensor, got {type(value).__name__}")
    if len(value) == 1 and isinstance(value[0], (list, tuple)):  # [[...]] from a batch-of-one tokenizer call
        value = value[0]
    out = []
    for x in value:
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise CalibrationError(f"{where}: token ids must be non-negative integers, found {x!r}")
        out.append(x)
    return out


def record_to_document(rec: Any, where: str) -> Document:
    """One record (a string, a dict with text / input_ids / messages, or token ids) as a document."""
    if isinstance(rec, str):
        return rec
    if isinstance(rec, dict):
        if "text" in rec:
            if not isinstance(rec["text"], str):
                raise CalibrationError(f"{where}: \"text\" must be a string, got {type(rec['text']).__name__}")
            return rec["text"]
        if "input_ids" in rec:
            ids = _ids(rec["input_ids"], where)
            mask = rec.get("attention_mask")
            if mask is not None:
                mask = _ids(mask, where + " (attention_mask)")
                if len(mask) != len(ids):
                    raise CalibrationError(f"{where}: attention_mask has {len(mask)} entries for {len(ids)} input_ids")
                ids = [t for t, m in zip(ids, mask) if m]
            return ids
        if "messages" in rec:
            msgs = rec["messages"]
            if not isinstance(msgs, (list, tuple)) or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str) for m in msgs
            ):
                raise CalibrationError(f"{where}: \"messages\" must be a list of {{\"role\": str, \"content\": str}} dicts")
            return tuple(dict(m) for m in msgs)
        keys = ", ".join(map(repr, list(rec)[:6])) or "none"
        raise CalibrationError(f"{where}: a record needs a \"text\", \"input_ids\" or \"messages\" key (it has {keys})")
    if isinstance(rec, (list, tuple, torch.Tensor)):
        return _ids(rec, where)
    raise CalibrationError(
        f"{where}: a record must be a string, token ids, or a dict with \"text\"/\"input_ids\"/\"messages\", "
        f"got {type(rec).__name__}"
    )


# ---------------------------------------------------------------------------------------------- files
def _open_text(path: str):
    try:
        return open(path, encoding="utf-8")
    except IsADirectoryError:
        raise CalibrationError(f"{path} is a folder; give the folder without a file extension or a file") from None
    except OSError as e:
        raise CalibrationError(f"cannot read calibration file {path}: {e.strerror or e}; check the path and permissions") from None


def _decode_error(path: str, text_before: str, e: UnicodeDecodeError) -> CalibrationError:
    line = text_before.count("\n") + 1
    return CalibrationError(f"{path}:{line}: not UTF-8 text ({e.reason}); convert the file to UTF-8")


def _read_text(path: str) -> str:
    with _open_text(path) as f:
        try:
            return f.read()
        except UnicodeDecodeError as e:
            with open(path, "rb") as fb:
                before = fb.read(e.start if e.start is not None else 0).decode("utf-8", errors="replace")
            raise _decode_error(path, before, e) from None


def txt_documents(path: str) -> list[tuple[str, int]]:
    """A .txt file's documents with their first line numbers: blank-line separated paragraphs,
    or one document per line when the file has no blank line."""
    text = _read_text(path)
    lines = text.splitlines()
    has_blank = any(not ln.strip() for ln in lines) and any(ln.strip() for ln in lines)
    docs: list[tuple[str, int]] = []
    if not has_blank:
        return [(ln, i) for i, ln in enumerate(lines, 1) if ln.strip()]
    cur: list[str] = []
    start = 1
    for i, ln in enumerate(lines, 1):
        if ln.strip():
            if not cur:
                start = i
            cur.append(ln)
        elif cur:
            docs.append(("\n".join(cur), start))
            cur = []
    if cur:
        docs.append(("\n".join(cur), start))
    return docs


def jsonl_documents(path: str) -> list[tuple[Document, int]]:
    out = []
    with _open_text(path) as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CalibrationError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                           "each line of a .jsonl file must be one JSON value") from None
                out.append((record_to_document(rec, f"{path}:{lineno}"), lineno))
        except UnicodeDecodeError as e:
            raise CalibrationError(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason}); convert the file to UTF-8") from None
    return out


def json_documents(path: str) -> list[tuple[Document, int]]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()) and len(data) == 1:
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise CalibrationError(f"{path}: a .json calibration file must hold a list of records (strings, "
                               f"{{\"text\": ...}} or {{\"input_ids\": [...]}}); use .jsonl for one record per line")
    return [(record_to_document(rec, f"{path}: record {i}"), i) for i, rec in enumerate(data)]


@dataclass(frozen=True)
class FileSource:
    """A local .txt / .json / .jsonl file; documents are shuffled with the seed."""

    path: str
    kind = "file"

    @property
    def name(self) -> str:
        return self.path

    def describe(self) -> str:
        return f"local file {self.path}"

    def load(self) -> list[Document]:
        ext = os.path.splitext(self.path)[1].lower()
        if ext == ".jsonl":
            docs = [d for d, _ in jsonl_documents(self.path)]
        elif ext == ".json":
            docs = [d for d, _ in json_documents(self.path)]
        else:
            docs = [d for d, _ in txt_documents(self.path)]
        if not docs:
            raise CalibrationError(f"calibration file {self.path} holds no records; give a file with text")
        return docs

    def documents(self, ctx) -> Iterator[Document]:
        docs = self.load()
        order = list(range(len(docs)))
        random.Random(ctx.seed).shuffle(order)
        for i in order:
            yield docs[i]

    def stamp(self) -> list:
        st = os.stat(self.path)
        return [os.path.abspath(self.path), st.st_size, st.st_mtime_ns]


# ---------------------------------------------------------------------------------------------- memory
@dataclass(frozen=True, eq=False)
class MemorySource:
    """An in-memory dataset: strings, token-id lists or tensors, a 2-D id tensor, or an iterable of dicts.

    Sized, indexable collections are shuffled with the seed; other iterables are read in order."""

    data: Any
    kind = "memory"

    @property
    def name(self) -> str:
        return "in-memory data"

    def describe(self) -> str:
        n = len(self.data) if hasattr(self.data, "__len__") else "?"
        return f"{n} in-memory records"

    def documents(self, ctx) -> Iterator[Document]:
        data = self.data
        if isinstance(data, torch.Tensor):
            if data.dim() == 1:
                data = [data]
            elif data.dim() == 2:
                data = list(data)
            else:
                raise CalibrationError(f"a token-id tensor dataset must be 1-D or 2-D, got shape {tuple(data.shape)}")
        if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, dict):
            order = list(range(len(data)))
            random.Random(ctx.seed).shuffle(order)
            for i in order:
                yield record_to_document(data[i], f"dataset record {i}")
        else:
            for i, rec in enumerate(data):
                yield record_to_document(rec, f"dataset record {i}")


def is_memory_dataset(obj) -> bool:
    return not isinstance(obj, (str, bytes, os.PathLike)) and isinstance(obj, (Iterable, torch.Tensor))

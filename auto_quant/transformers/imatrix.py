"""Importance matrices (llama.cpp's ``imatrix``): reading both file formats, writing the legacy one,
and computing one from token batches.

An imatrix holds, per weight tensor, the mean squared activation of each input channel over a
calibration run. llama.cpp writes two formats:

* legacy ``.dat``: ``int32 n_entries``, then per entry ``int32 len, char name[len], int32 ncall,
  int32 nval, float32 values[nval]`` (values are sums over ``ncall`` calls: importance =
  ``values / ncall``), optionally followed by ``int32 last_call, int32 len, char dataset[len]``;
* GGUF (``general.type = imatrix``): tensors ``<name>.in_sum2`` and ``<name>.counts``
  (importance = ``in_sum2 / counts``).

Names are llama.cpp tensor names (``blk.0.attn_q.weight``) or, for files written here, HF module
names; :class:`auto_quant.transformers.convert.Importance` looks up both.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import torch
from torch import nn

from auto_quant.errors import ConfigError


def _read_dat(path: Path) -> dict[str, torch.Tensor]:
    data = path.read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ConfigError(f"imatrix file {str(path)!r} is truncated or not an imatrix file")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n,) = take("<i")
    if n <= 0 or n > 1_000_000:
        raise ConfigError(f"{str(path)!r} is not a llama.cpp imatrix file (bad entry count {n})")
    out: dict[str, torch.Tensor] = {}
    for _ in range(n):
        (ln,) = take("<i")
        if ln <= 0 or ln > 4096:
            raise ConfigError(f"{str(path)!r} is not a llama.cpp imatrix file (bad name length)")
        name = take(f"<{ln}s")[0].decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        if nval <= 0:
            raise ConfigError(f"imatrix entry {name!r} in {str(path)!r} has no values")
        vals = torch.tensor(take(f"<{nval}f"), dtype=torch.float32)
        out[name] = vals / ncall if ncall > 0 else vals
    return out


def _read_gguf(path: Path) -> dict[str, torch.Tensor]:
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - gguf is a dependency of the gguf extra
        raise ConfigError("reading a GGUF imatrix needs the 'gguf' package: pip install gguf") from None
    r = GGUFReader(str(path))
    sums, counts = {}, {}
    for t in r.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = torch.from_numpy(t.data.copy()).to(torch.float32)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = torch.from_numpy(t.data.copy()).to(torch.float32)
    if not sums:
        raise ConfigError(f"{str(path)!r} is a GGUF file without imatrix tensors (*.in_sum2); pass an imatrix file")
    out = {}
    for name, s in sums.items():
        c = counts.get(name)
        s = s.reshape(-1, s.shape[-1])[0] if s.dim() > 1 else s
        cnt = float(c.reshape(-1)[0]) if c is not None else 1.0
        out[name] = s / cnt if cnt > 0 else s
    return out


def load_imatrix(source) -> dict[str, torch.Tensor]:
    """``{tensor name: importance [in_features]}`` from a path (``.dat`` or ``.gguf``) or a dict."""
    if isinstance(source, dict):
        out = {}
        for k, v in source.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise ConfigError("an imatrix dict maps tensor/module names to 1-D tensors of per-input importance")
            out[k] = v.detach().to(torch.float32).reshape(-1)
        return out
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"imatrix={source!r} must be a path to a llama.cpp imatrix file or a dict of tensors")
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"imatrix file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf(path)
    return _read_dat(path)


def write_imatrix_dat(path, table: dict[str, torch.Tensor], ncall: int = 1, dataset: str = "") -> None:
    """Write ``table`` in llama.cpp's legacy imatrix format (values stored as sums over ``ncall``)."""
    parts = [struct.pack("<i", len(table))]
    for name, v in table.items():
        b = name.encode()
        vals = (v.detach().to(torch.float32).reshape(-1) * ncall).tolist()
        parts += [struct.pack("<i", len(b)), b, struct.pack("<ii", ncall, len(vals)), struct.pack(f"<{len(vals)}f", *vals)]
    d = dataset.encode()
    parts += [struct.pack("<i", ncall), struct.pack("<i", len(d)), d]
    Path(path).write_bytes(b"".join(parts))


@torch.no_grad()
def compute_imatrix(model: nn.Module, batches, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Mean squared input activation per input channel of every ``nn.Linear`` (HF module names)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (names is None or name in names):
            def hook(m, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            handles.append(mod.register_forward_pre_hook(hook))
    try:
        for b in batches:
            model(**b) if isinstance(b, dict) else model(b)
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n]).cpu() for n in sums}


__all__ = ["compute_imatrix", "load_imatrix", "write_imatrix_dat"]

"""The backend registry, as data: which kernel serves which QuantLinear.

Each entry declares what it serves; selection is a pure function over the table.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from auto_quant.errors import BackendError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    name: str
    devices: frozenset[str]  # "cpu", "cuda", "xpu", "hpu"
    bits: frozenset[int]
    group_sizes: frozenset[int] | None  # None: any
    sym: bool
    asym: bool
    layouts: frozenset[str]
    act_dtypes: frozenset[torch.dtype]
    priority: int
    requires: tuple[str, ...] = ()  # importable packages it needs
    min_dims: int = 1  # in/out features must be multiples of this
    prepare: Callable[[nn.Module], None] | None = None

    def installed(self) -> bool:
        return all(importlib.util.find_spec(p) is not None for p in self.requires)

    def serves(self, layer, device: str, act_dtype: torch.dtype | None = None) -> bool:
        if device not in self.devices or layer.bits not in self.bits or layer.layout not in self.layouts:
            return False
        if self.group_sizes is not None and layer.group_size not in self.group_sizes:
            return False
        if (layer.sym and not self.sym) or (not layer.sym and not self.asym):
            return False
        if act_dtype is not None and act_dtype not in self.act_dtypes:
            return False
        return layer.in_features % self.min_dims == 0 and layer.out_features % self.min_dims == 0


_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})
_ALL_LAYOUTS = frozenset({"gptq", "gptq_v2", "awq"})

BACKENDS: tuple[Backend, ...] = (
    Backend(
        name="torch",
        devices=frozenset({"cpu", "cuda", "xpu", "hpu", "mps"}),
        bits=frozenset({2, 3, 4, 5, 6, 8}),
        group_sizes=None,
        sym=True,
        asym=True,
        layouts=_ALL_LAYOUTS,
        act_dtypes=_FLOATS,
        priority=0,
    ),
)


def candidates(layer, device: str, table: tuple[Backend, ...] = BACKENDS) -> list[Backend]:
    return sorted((b for b in table if b.serves(layer, device)), key=lambda b: -b.priority)


def select_backend(layer, device: str, forced: str = "auto", table: tuple[Backend, ...] = BACKENDS) -> Backend:
    if forced != "auto":
        named = [b for b in table if b.name == forced]
        if not named:
            raise BackendError(f"unknown backend {forced!r}; known: {', '.join(b.name for b in table)}")
        b = named[0]
        if not b.installed():
            raise BackendError(f"backend {forced!r} needs {', '.join(b.requires)} installed")
        if not b.serves(layer, device):
            raise BackendError(f"backend {forced!r} cannot serve {layer.extra_repr()} on {device}")
        return b
    ok = [b for b in candidates(layer, device, table) if b.installed()]
    if not ok:
        names = [b.name + (f" (needs {', '.join(b.requires)})" if b.requires else "") for b in table if b.serves(layer, "cuda") or b.serves(layer, "cpu")]
        raise BackendError(
            f"no installed backend serves {layer.extra_repr()} on {device}; backends that would: {', '.join(names) or 'none'}"
        )
    return ok[0]


def attach_backends(model: nn.Module, backend: str = "auto") -> dict[str, str]:
    """Pick a backend per QuantLinear; log the choice once per distinct (backend, config)."""
    from auto_quant.inference.qlinear import QuantLinear

    chosen: dict[str, str] = {}
    seen = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        device = mod.qweight.device.type
        b = select_backend(mod, device, backend)
        if b.prepare is not None:
            b.prepare(mod)
        mod.backend = b.name
        chosen[name] = b.name
        key = (b.name, mod.bits, mod.group_size, mod.sym, device)
        if key not in seen:
            seen.add(key)
            log.info("auto_quant: backend %s for %d-bit g%d %s layers on %s", b.name, mod.bits, mod.group_size,
                     "sym" if mod.sym else "asym", device)
    return chosen

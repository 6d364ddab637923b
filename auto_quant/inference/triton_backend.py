"""The ``triton`` backend: auto_quant's own Triton kernels (``auto_quant.kernels``) on CUDA.

``prepare`` builds the kernel layout once (a GPTQ-layout 2/4/8-bit ``qweight`` is used as is;
3-bit and AWQ layouts are repacked) and shares one tuner and one split-K workspace across the
layers of a model (through the attach context). The first call for each (shape, batch-size
bucket) times a few kernel variants and keeps the fastest, on disk too when the attach context
has a tuning cache (``AutoRoundConfig(tuning_cache=...)``, default ``"auto"``), so the next process
on the same GPU takes it without timing; calls under CUDA-graph capture use a cached pick, else the
shape heuristic until a shape has been tuned. When the cache holds picks for a model's layers, the attach
compiles their kernels side by side (``compile_cached_picks``), so a process whose Triton compile cache is empty
(a new container) does not compile them one by one in its first calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from auto_quant.kernels.dispatch import Workspace, quant_matmul
from auto_quant.kernels.tuner import Tuner
from auto_quant.kernels.pack import from_quant_linear

log = logging.getLogger(__name__)


class TritonLinear:
    def __init__(self, module, tuner: Tuner | None, workspace: Workspace):
        self.weight = from_quant_linear(module)
        self.tuner = tuner
        self.workspace = workspace
        self._module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return quant_matmul(x, self.weight, self._module.bias, tuner=self.tuner, workspace=self.workspace)


def prepare(module, ctx=None) -> TritonLinear:
    if ctx is None:
        return TritonLinear(module, None, Workspace())
    tuner, ws = ctx.resource("triton", lambda: (Tuner(cache=ctx.tuning_cache), Workspace()))
    return TritonLinear(module, tuner, ws)


def compile_cached_picks(layers: Sequence[TritonLinear]) -> int:
    """Compile the kernels the tuner's cache picked for the layers of one attach (they share its tuner and
    workspace; :meth:`Tuner.compile_cached`); returns how many, and logs it with the time taken."""
    tuner, ws = layers[0].tuner, layers[0].workspace
    if tuner is None:
        return 0
    t = time.perf_counter()
    n = tuner.compile_cached([(layer.weight, layer._module.bias) for layer in layers], ws)
    if n:
        log.info("auto_quant: compiled %d cached kernel picks for %d layers in %.1f s", n, len(layers),
                 time.perf_counter() - t)
    return n

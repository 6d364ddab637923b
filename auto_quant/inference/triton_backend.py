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

Under ``torch.compile`` a layer is the ``auto_quant::triton_matmul`` custom op, so a whole decoder traces into one
graph (the norms, rotary embeddings and activations between the matmuls fuse; ``mode="reduce-overhead"`` captures
it in one CUDA graph). The kernel variant is chosen while the graph is traced, by the layer's tuner at the row
bucket the traced call falls in (``m_bucket``: powers of two), and passed to the op as constants. A symbolic row
count (``dynamic=True``, or a second prompt length) is guarded into its bucket: one graph per bucket, as the tuner
keeps one pick per bucket.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
import weakref
from collections.abc import Callable, Sequence

import torch

from auto_quant.kernels.bound_launch import BoundLaunch, call_bound
from auto_quant.kernels.dispatch import (
    KERNEL_KINDS,
    KernelConfig,
    Workspace,
    choose_config,
    launch,
    m_bucket,
    quant_matmul,
)
from auto_quant.kernels.pack import KernelWeight, from_quant_linear
from auto_quant.kernels.tuner import Tuner

log = logging.getLogger(__name__)


class TritonLinear:
    def __init__(self, module, tuner: Tuner | None, workspace: Workspace):
        self.weight = from_quant_linear(module)
        self.tuner = tuner
        self.workspace = workspace
        self._module = module
        # what the last pick's split-K calls use on the layer's device (the workspace's buffers; None: none yet)
        self.split_k_acc: torch.Tensor | None = None
        self.split_k_counters: torch.Tensor | None = None
        self.pick_for_trace = traced_pick(self)
        # launches bound per call shape (call_bound, activation_key): an eager call's, and the compiled op's, which
        # finds them on op_qweight, a view of the packed weight (same storage) that traced calls pass to the op in its
        # place: the op's arguments are tensors and ints only, and the module's own buffer stays free of attributes
        self.bound: dict[tuple, BoundLaunch] = {}
        self.op_qweight = self.weight.qweight.view(self.weight.qweight.shape)
        self.op_qweight.auto_quant_bound = self.bound
        # The kernel layout's tensors are reached through this object, not as a module's parameters, so a compiled
        # graph would take them as ordinary inputs: `reduce-overhead` CUDA graphs copy those into static buffers
        # on every replay (the whole weight, each step). Their addresses never change.
        for t in (self.weight.qweight, self.op_qweight, self.weight.qweight_hi, self.weight.scales, self.weight.zeros,
                  module.bias):
            if t is not None:
                torch._dynamo.mark_static_address(t)

    def __deepcopy__(self, memo: dict) -> "TritonLinear":
        """A copy with its own tensors, bindings and trace-time pick: the pick's closure would otherwise still
        reach this layer (deepcopy keeps functions as they are)."""
        new = object.__new__(TritonLinear)
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            if name != "pick_for_trace":
                setattr(new, name, copy.deepcopy(value, memo))
        new.pick_for_trace = traced_pick(new)
        return new

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.traced_call(x)
        w = self.weight
        return call_bound(self.bound, (), x, w.in_features, w.out_features,
                          lambda record: quant_matmul(x, w, self._module.bias, tuner=self.tuner,
                                                      workspace=self.workspace, record=record))

    def traced_call(self, x: torch.Tensor) -> torch.Tensor:
        """What ``torch.compile`` traces: the variant picked now for the call's row bucket, then the custom op."""
        w = self.weight
        bucket = m_bucket(x.numel() // w.in_features)  # symbolic rows: guards on the bucket's bounds, not the count
        config = self.pick_for_trace(x.dtype, bucket)  # also sets the split-K buffers read next
        return torch.ops.auto_quant.triton_matmul(x, self.op_qweight, w.qweight_hi, w.scales, w.zeros,
                                                  self._module.bias, self.split_k_acc, self.split_k_counters, w.bits,
                                                  w.group_size, w.out_features, config)

    def pick(self, dtype: torch.dtype, rows: int) -> KernelConfig:
        """The variant for ``rows`` activation rows of ``dtype``: the tuner's (timed now if it has none), run once
        on a zero activation so its kernel is compiled and its split-K buffers exist before a graph uses them (a
        graph keeps the buffers it was traced with; a workspace that grows later allocates new ones). Traced under
        CUDA-graph capture, nothing runs (the tuner gives a cached pick or the heuristic); a split-K variant without
        buffers yet then allocates them per call."""
        w, bias = self.weight, self._module.bias
        capturing = torch.cuda.is_current_stream_capturing()
        x2 = (torch.empty if capturing else torch.zeros)(rows, w.in_features, dtype=dtype, device=w.device)
        with torch.cuda.device(w.device):
            cfg = choose_config(x2, w, bias, self.workspace, self.tuner)
            if not capturing:
                launch(x2, w, bias, cfg, self.workspace)
        self.split_k_acc, self.split_k_counters = self.workspace.buffers(w.device) or (None, None)
        for t in (self.split_k_acc, self.split_k_counters):
            if t is not None:
                torch._dynamo.mark_static_address(t)
        return cfg


def config_ints(cfg: KernelConfig) -> list[int]:
    """A variant as the op's ``int[]`` argument: its fields in order, the kind as its index in ``KERNEL_KINDS``."""
    kind, *sizes = dataclasses.astuple(cfg)
    return [KERNEL_KINDS.index(kind), *sizes]


def config_from_ints(v: Sequence[int]) -> KernelConfig:
    return KernelConfig(KERNEL_KINDS[v[0]], *v[1:])


def traced_pick(layer: TritonLinear) -> Callable[[torch.dtype, int], list[int]]:
    """The layer's :meth:`TritonLinear.pick` as a function that runs for real while dynamo traces the layer; the
    ``int[]`` it returns is a constant of the graph. Dynamo passes only constants to such a function, so it reaches
    the layer through its closure (a weak reference: no cycle keeps a dropped model's weights alive). Choosing the
    variant here, not in the op, is what lets one tuner per model serve compiled graphs."""
    ref = weakref.ref(layer)

    @torch.compiler.assume_constant_result
    def pick_for_trace(dtype: torch.dtype, rows: int) -> list[int]:
        return config_ints(ref().pick(dtype, rows))

    return pick_for_trace


# The op torch.compile sees. The split-K buffers are zero before and after every call (the kernels clear what they
# use), so the op declares no mutation. Inference only: no autograd formula.
_LIB = torch.library.Library("auto_quant", "FRAGMENT")
_LIB.define("triton_matmul(Tensor x, Tensor qweight, Tensor? qweight_hi, Tensor scales, Tensor? zeros, Tensor? bias, "
            "Tensor? acc, Tensor? counters, int bits, int group_size, int out_features, int[] config) -> Tensor")


def triton_matmul(x: torch.Tensor, qweight: torch.Tensor, qweight_hi: torch.Tensor | None, scales: torch.Tensor,
                  zeros: torch.Tensor | None, bias: torch.Tensor | None, acc: torch.Tensor | None,
                  counters: torch.Tensor | None, bits: int, group_size: int, out_features: int,
                  config: Sequence[int]) -> torch.Tensor:
    """``x [..., K] @ W.T + bias`` with the variant ``config`` (:func:`config_ints`; empty: the shape heuristic).
    Inductor calls this at every step of a graph that is not replayed as a CUDA graph (``torch.compile``'s default
    mode), so it replays the layer's bound launches, found on the ``qweight`` a :class:`TritonLinear` passes."""

    def full_call(record):
        w = KernelWeight(qweight, qweight_hi, scales, zeros, bits, group_size, x.shape[-1], out_features)
        ws = Workspace.holding(x.device, acc, counters) if acc is not None else Workspace()
        return quant_matmul(x, w, bias, config=config_from_ints(config) if config else None, workspace=ws,
                            record=record)

    bound = getattr(qweight, "auto_quant_bound", None)
    if bound is None:
        return full_call(None)
    return call_bound(bound, (tuple(config), acc is not None), x, x.shape[-1], out_features, full_call)


_LIB.impl("triton_matmul", triton_matmul, "CUDA")


@torch.library.register_fake("auto_quant::triton_matmul", lib=_LIB)
def _triton_matmul_fake(x, qweight, qweight_hi, scales, zeros, bias, acc, counters, bits, group_size, out_features,
                        config):
    return x.new_empty((*x.shape[:-1], out_features))


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

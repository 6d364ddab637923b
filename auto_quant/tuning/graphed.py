"""One tuning step on static buffers, recorded once as a CUDA graph and replayed.

For small and medium blocks a GPU tuning step is bound by the CPU: a step issues about two
thousand small operations (forward, backward, the fake-quantizers, the sign update) while the
GPU work behind them takes a few milliseconds. Replaying a recorded graph issues one launch.

The step does exactly what the eager loop does (``unit_loss`` of one full batch, backward,
``p -= lr * sign(grad)``, clamping), with the learning rates read from device scalars so one
recording serves every iteration. It applies only when every batch has the same shapes and the
same call arguments: one batch size, no padding masks, call arguments shared by every sample,
targets stored per sample, every parameter on the tuning device, one micro-batch per step, and no
MoE layer (its routing picks the experts from the data).
:func:`build_static_step` returns None otherwise and the eager loop runs.

On a device without CUDA graphs (tests on CPU) the same step runs directly on the static
buffers, so its arithmetic is checked against the eager loop everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from auto_quant.models.moe import SplitExperts
from auto_quant.tuning.capture import collate_calls, move_call
from auto_quant.tuning.wrapper import TunableLinear, clamp_all, sign_step

log = logging.getLogger(__name__)


def _leaves(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _leaves(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _leaves(y)


def _on(t: torch.Tensor, dev: torch.device) -> bool:
    """Whether ``t`` lives on ``dev``, where ``cuda`` without an index means the current CUDA device."""
    if t.device.type != dev.type:
        return False
    if dev.index is None and dev.type == "cuda":
        return t.device.index == torch.cuda.current_device()
    return dev.index is None or t.device.index == dev.index


def _shared_call(calls, batch_size: int):
    """The one merged call every batch would get, or None when batches would differ."""
    if calls is None:
        return None, True
    n = len(calls)
    first = collate_calls([calls[i] for i in range(min(batch_size, n))])
    other = collate_calls([calls[i] for i in range(n - 1, n - 1 - min(batch_size, n), -1)])
    if first is None or other is None:
        return None, False
    a = list(_leaves((first.args, first.kwargs)))
    b = list(_leaves((other.args, other.kwargs)))
    return first, len(a) == len(b) and all(x is y for x, y in zip(a, b))


class StaticStep:
    """The training step on fixed buffers; ``run(idx, lr, mm_lr)`` loads a batch and steps once."""

    def __init__(self, unit: nn.Module, wrappers: list[TunableLinear], data, forward: Callable, call,
                 v_params: list[torch.Tensor], mm_params: list[torch.Tensor], batch_size: int, use_graph: bool):
        self.unit, self.wrappers, self.data, self.forward = unit, wrappers, data, forward
        self.v_params, self.mm_params = v_params, mm_params
        dev = data.device
        idx = list(range(batch_size))
        self.hidden = torch.cat([data.inputs[i] for i in idx]).to(dev, data.dtype)
        self.target = torch.cat([data.targets[i] for i in idx]).to(dev)
        self.call = None if call is None else move_call(call, dev, data.dtype)
        self.lr = torch.zeros((), dtype=torch.float32, device=dev)
        self.mm_lr = torch.zeros((), dtype=torch.float32, device=dev)
        self.graph = None
        if use_graph:
            self._record()

    def _step(self) -> None:
        out = self.forward(self.unit, self.hidden, self.call)
        F.mse_loss(out.float(), self.target.float()).backward()
        sign_step(self.v_params, self.lr, drop_grads=False)  # the recorded backward rewrites the gradients
        sign_step(self.mm_params, self.mm_lr, drop_grads=False)
        clamp_all(self.wrappers)

    def _record(self) -> None:
        params = self.v_params + self.mm_params
        saved = [p.detach().clone() for p in params]
        side = torch.cuda.Stream(self.hidden.device)
        side.wait_stream(torch.cuda.current_stream(self.hidden.device))
        with torch.cuda.stream(side):  # warm-up (lazy initialisation, autotuning) with zero step sizes
            for _ in range(2):
                self._step()
                for p in params:
                    p.grad = None
        torch.cuda.current_stream(self.hidden.device).wait_stream(side)
        # the recorded backward allocates the gradients in the graph's pool; each replay rewrites them
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        self.graph = graph

    def _load(self, dst: torch.Tensor, src: list[torch.Tensor]) -> None:
        if src[0].device == dst.device and src[0].dtype == dst.dtype:
            torch.cat(src, out=dst)
        else:
            dst.copy_(torch.cat(src))

    def run(self, idx: list[int], lr: float, mm_lr: float) -> None:
        self._load(self.hidden, [self.data.inputs[i] for i in idx])
        self._load(self.target, [self.data.targets[i] for i in idx])
        self.lr.fill_(lr)
        self.mm_lr.fill_(mm_lr)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
            for p in self.v_params + self.mm_params:
                p.grad = None

    def close(self) -> None:
        self.graph = None
        for p in self.v_params + self.mm_params:
            p.grad = None


def build_static_step(unit: nn.Module, wrappers: list[TunableLinear], data, forward: Callable, cfg,
                      v_params, mm_params) -> StaticStep | None:
    """A :class:`StaticStep` for this unit when its batches allow one (see the module doc), else None.

    ``cfg.cuda_graphs``: True records a CUDA graph on CUDA devices and runs the static step directly
    elsewhere; False and None (the default) build none.
    """
    dev = data.device
    on_cuda = dev.type == "cuda"
    if not cfg.cuda_graphs:
        return None
    n = len(data)
    bs = min(cfg.batch_size, n)
    if cfg.gradient_accumulate_steps != 1 or callable(data.targets) or data.masks is not None or not data.batched:
        return None
    if not all(_on(p, dev) for p in list(unit.parameters()) + list(unit.buffers())):
        return None  # layers spread over devices (placement hooks)
    if any(isinstance(m, SplitExperts) for m in unit.modules()):
        return None  # MoE routing picks experts from the data: no fixed graph
    call, shared = _shared_call(data.calls, bs)
    if not shared:
        return None
    try:
        return StaticStep(unit, wrappers, data, forward, call, v_params, mm_params, bs, use_graph=on_cuda)
    except Exception as e:  # something in the block cannot be recorded: fall back to the eager loop
        log.warning("CUDA graph of the tuning step not recorded (%s: %s); tuning this unit eagerly",
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        for p in v_params + mm_params:
            p.grad = None
        if on_cuda:
            torch.cuda.synchronize(dev)
        return None

"""A layer's kernel launch with everything bound but the activations and the output, for eager decode.

A Triton launch (``kernel[grid](...)``) binds and specializes every argument (about 30 for our kernels, most of them
``constexpr``), computes the cache key and looks the compiled kernel up on every call; our launchers first check the
tile and work out the grid. On an H100 host that came to 40-70 µs a call against 20-30 µs for a bf16
``nn.Linear``, while the kernel itself runs 6-30 µs at decode sizes: eager ``generate()`` of a W4 model ran at 0.55×
bf16 (docs/bench/kernels.md, session 25). A :class:`BoundLaunch` is made once per layer and call shape from a
recorded launch (:class:`LaunchRecord`): the compiled kernel, its grid and its argument list, with the slots that
held the activations and the output marked. A call then allocates the output, puts both in those slots and calls
the compiled kernel's launcher directly, as Triton's own ``CompiledKernel[grid](...)`` does.

The binding is only as valid as the call shape it was recorded for: the caller keys it by everything a launch
depends on (the row count, dtype, device, contiguity and 16-byte alignment of the activations; Triton specializes
pointers on that alignment) and records it only once the variant is final (the tuner's pick, not a fallback).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable

import torch


@dataclasses.dataclass
class LaunchRecord:
    """What one call of a launcher launched: ``(compiled kernel, grid, argument values in signature order)`` per
    kernel (:func:`recording_call` appends them), then the call's activations and result (:meth:`done`)."""

    launches: list[tuple[object, tuple[int, int, int], tuple]] = dataclasses.field(default_factory=list)
    x2: torch.Tensor | None = None
    out: torch.Tensor | None = None

    def done(self, x2: torch.Tensor, out: torch.Tensor) -> None:
        self.x2, self.out = x2, out

    def bind(self, out_shape: tuple[int, ...] | None = None) -> BoundLaunch | None:
        """The recorded call as a :class:`BoundLaunch` whose calls return ``out_shape`` (the recorded result's shape
        by default; the caller's, ``(*x.shape[:-1], N)``, lets a call pass its activations as they are, without a 2-D
        view in and out); None where it cannot be replayed with new activations (not one kernel, activations copied
        before the launch, a result the kernel did not write, or an argument of a kind not handled here)."""
        if len(self.launches) != 1 or self.x2 is None or self.out is None:
            return None
        compiled, grid, args = self.launches[0]
        x_slots, desc_slots, out_slots = [], [], []
        for i, a in enumerate(args):
            if a is self.x2:
                x_slots.append(i)
            elif a is self.out:
                out_slots.append(i)
            elif isinstance(a, torch.Tensor) or a is None or isinstance(a, (int, float, bool, str)):
                continue
            elif dataclasses.is_dataclass(a) and getattr(a, "base", None) is self.x2:
                desc_slots.append(i)  # a TMA descriptor over the activations: rebuilt around each call's
            elif dataclasses.is_dataclass(a) and isinstance(getattr(a, "base", None), torch.Tensor):
                continue  # a descriptor over a weight tensor: fixed
            elif type(a).__name__ == "constexpr" or callable(getattr(a, "__index__", None)):
                continue
            else:
                return None
        if not x_slots and not desc_slots or not out_slots:
            return None
        kept = list(args)  # without the call's own tensors, which the binding must not keep alive
        for i in (*x_slots, *out_slots):
            kept[i] = None
        for i in desc_slots:
            kept[i] = copy.copy(args[i])
            object.__setattr__(kept[i], "base", None)
        if out_shape is None:
            out_shape = tuple(self.out.shape)
        if math.prod(out_shape) != self.out.numel():
            raise ValueError(f"a binding of a {tuple(self.out.shape)} result cannot return {tuple(out_shape)}")
        return BoundLaunch(compiled, grid, tuple(kept), tuple(x_slots), tuple(desc_slots), tuple(out_slots),
                           tuple(out_shape), self.out.dtype, self.out.device)


# Calls of up to this many activation rows bind their launch (call_bound): decode and small batches, where the host's
# time per call exceeds the kernel's. Larger calls (prefill) run the full path every time.
BIND_MAX_ROWS = 64


def activation_key(x: torch.Tensor, *extra) -> tuple:
    """What a launch depends on in its activations: shape, strides, dtype, device and address mod 16 (Triton
    specializes pointers on 16-byte alignment); then ``extra``, what else the caller lets vary (a variant)."""
    return (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15, *extra)


def call_bound(bound: dict, extra: tuple, x: torch.Tensor, in_features: int, out_features: int,
               full_call: Callable[[LaunchRecord | None], torch.Tensor]) -> torch.Tensor:
    """``x [..., in_features]`` through the launch bound in ``bound`` (one layer's) under
    ``activation_key(x, *extra)``, or else through ``full_call(record)``, the layer's full path; that call binds its
    launch under the key when ``x`` is decode-sized, contiguous and on a GPU, and no graph is being captured (a
    capture may use a pick that is not final). ``extra`` holds what the launch depends on besides the layer and
    ``x``."""
    key = activation_key(x, *extra)
    b = bound.get(key)
    if b is None:
        rows = x.numel() // in_features if x.shape[-1] == in_features else 0
        record = None
        if (x.is_cuda and 0 < rows <= BIND_MAX_ROWS and x.is_contiguous()
                and not torch.cuda.is_current_stream_capturing()):
            record = LaunchRecord()
        y = full_call(record)
        b = record.bind((*x.shape[:-1], out_features)) if record is not None else None
        if b is not None:
            bound[key] = b
        return y
    if b.device_index == torch.cuda.current_device():
        return b(x)
    with torch.cuda.device(b.device_index):  # a layer on another GPU (a model split over several) launches there
        return b(x)


def recording_call(kernel, grid, record: LaunchRecord) -> Callable:
    """``kernel[grid]`` that also appends what it launched to ``record``."""
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    params = kernel.signature.parameters

    def call(*args, **kwargs):
        compiled = kernel.run(*args, grid=grid, warmup=False, **kwargs)
        bound = kernel.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in params})
        bound.apply_defaults()
        record.launches.append((compiled, grid3, tuple(bound.arguments[name] for name in params)))
        return compiled

    return call


class BoundLaunch:
    """One compiled kernel with its grid and every argument fixed but the activations and the output; calling it
    with new activations (same shape, dtype, device, strides and alignment as the recorded ones) launches it on
    the current stream and returns the new output."""

    def __init__(self, compiled, grid: tuple[int, int, int], args: tuple, x_slots: tuple[int, ...],
                 desc_slots: tuple[int, ...], out_slots: tuple[int, ...], out_shape: tuple[int, ...],
                 out_dtype: torch.dtype, device: torch.device):
        from triton import knobs

        self.compiled = compiled
        self.grid = grid
        self.args = args
        self.x_slots, self.desc_slots, self.out_slots = x_slots, desc_slots, out_slots
        self.out_shape, self.out_dtype, self.device = out_shape, out_dtype, device
        self.device_index = device.index
        self._runtime = knobs.runtime
        # the raw handle of the current stream on a device, as Triton's CUDA driver reads it
        self._stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
            lambda index: torch.cuda.current_stream(index).cuda_stream)
        self._launcher = compiled.run  # loads the kernel onto the GPU if it is not yet
        self._function = compiled.function
        self._metadata = compiled.packed_metadata

    def __deepcopy__(self, memo) -> None:
        """A deep copy of a model has tensors of its own, and this launch holds the original's: the copy gets no
        binding (None, which :func:`call_bound` treats as none) and binds its own at its next call."""
        return None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: contiguous activations of the recorded rows (any leading shape: the kernel reads its address)."""
        out = torch.empty(self.out_shape, dtype=self.out_dtype, device=self.device)
        args = list(self.args)
        for i in self.x_slots:
            args[i] = x
        if self.desc_slots:
            x2 = x if x.dim() == 2 else x.view(-1, x.shape[-1])  # a descriptor describes 2-D activations
            for i in self.desc_slots:  # a copy of the recorded descriptor around x2 (its checks passed when recorded)
                d = copy.copy(args[i])
                object.__setattr__(d, "base", x2)
                args[i] = d
        for i in self.out_slots:
            args[i] = out
        rt = self._runtime
        if hooked(rt.launch_enter_hook) or hooked(rt.launch_exit_hook):
            self.compiled[self.grid](*args)  # a profiler's launch hooks: Triton's own path, which calls them
        else:
            g0, g1, g2 = self.grid
            self._launcher(g0, g1, g2, self._stream(self.device_index), self._function, self._metadata, None, None,
                           None, *args)
        return out


def hooked(hook) -> bool:
    """Whether a Triton launch hook is set: a function, or a non-empty ``HookChain`` (Triton 3.6's empty chain
    stands for none)."""
    return hook is not None and bool(getattr(hook, "calls", True))

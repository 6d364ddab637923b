"""Bound launches (``kernels/bound_launch.py``) on the CPU: which recorded launches bind, which argument slots a
call fills, and that a binding keeps none of the recorded call's tensors alive. The kernel is a stand-in object
with a compiled kernel's attributes (``run``, ``function``, ``packed_metadata``) that records what its launcher was
given; the GPU tests (``test_bound_launch_gpu.py``) run the real kernels."""

from __future__ import annotations

import dataclasses
import weakref

import torch

from auto_quant.kernels.bound_launch import LaunchRecord


class RecordingKernel:
    """A compiled kernel's launch interface: ``run(gridX, gridY, gridZ, stream, function, metadata, ...)``."""

    function = "cu-function"
    packed_metadata = "packed-metadata"

    def __init__(self):
        self.calls = []

    @property
    def run(self):
        return lambda *a: self.calls.append(a)


@dataclasses.dataclass
class Descriptor:  # what a TMA descriptor carries that matters here: the tensor it describes
    base: torch.Tensor | None
    block: tuple


def recorded(x2, out, args, kernel=None):
    rec = LaunchRecord()
    rec.launches.append((kernel or RecordingKernel(), (3, 2, 1), tuple(args)))
    rec.done(x2, out)
    return rec


def test_a_bound_call_fills_the_activation_and_output_slots_and_keeps_the_rest():
    x2, out, w, s = torch.randn(2, 8), torch.empty(2, 4), torch.randn(4, 8), torch.randn(4)
    kernel = RecordingKernel()
    bound = recorded(x2, out, [x2, w, s, out, out, 2, 8, "asm", True, None], kernel).bind()
    assert bound is not None and bound.x_slots == (0,) and bound.out_slots == (3, 4)
    bound._stream = lambda index: 77  # no CUDA here: the stream handle the launcher gets
    x_new = torch.randn(2, 8)
    y = bound(x_new)
    assert y.shape == (2, 4) and y.dtype == out.dtype and y.data_ptr() != out.data_ptr()
    (call,) = kernel.calls
    assert call[:9] == (3, 2, 1, 77, "cu-function", "packed-metadata", None, None, None)
    args = call[9:]
    assert args[0] is x_new and args[1] is w and args[2] is s and args[3] is y and args[4] is y
    assert args[5:] == (2, 8, "asm", True, None)


def test_a_binding_returns_the_callers_shape_and_takes_its_activations_as_they_are():
    """Bound for the caller's ``(*x.shape[:-1], N)``, a call passes 3-D activations to the kernel without a 2-D view
    (the kernel reads their address) and returns its result in that shape; a shape of other size is refused."""
    import pytest

    x2, out, w = torch.randn(2, 8), torch.empty(2, 4), torch.randn(4, 8)
    kernel = RecordingKernel()
    bound = recorded(x2, out, [x2, w, out], kernel).bind((1, 2, 4))
    bound._stream = lambda index: 0
    x = torch.randn(1, 2, 8)
    y = bound(x)
    assert y.shape == (1, 2, 4)
    assert kernel.calls[0][9] is x and kernel.calls[0][11] is y
    with pytest.raises(ValueError, match="cannot return"):
        recorded(x2, out, [x2, w, out]).bind((3, 4))


def test_a_binding_keeps_none_of_the_recorded_calls_tensors_alive():
    x2, out, w = torch.randn(2, 8), torch.empty(2, 4), torch.randn(4, 8)
    desc = Descriptor(x2, (2, 8))
    bound = recorded(x2, out, [desc, w, out], RecordingKernel()).bind()
    assert bound is not None and bound.desc_slots == (0,) and desc.base is x2  # the recorded descriptor untouched
    refs = [weakref.ref(x2), weakref.ref(out)]
    del x2, out, desc
    assert all(r() is None for r in refs)
    bound._stream = lambda index: 0
    x_new = torch.randn(2, 8)
    bound(x_new)
    d = bound.compiled.calls[0][9]
    assert isinstance(d, Descriptor) and d.base is x_new and d.block == (2, 8) and bound.args[0].base is None


def test_launches_that_cannot_be_replayed_do_not_bind():
    x2, out, w = torch.randn(2, 8), torch.empty(2, 4), torch.randn(4, 8)
    assert recorded(x2, out, [x2.clone(), w, out]).bind() is None  # the kernel read a copy of the activations
    assert recorded(x2, out, [x2, w, torch.empty(2, 4)]).bind() is None  # the result is not what it wrote
    assert recorded(x2, out, [x2, w, out, object()]).bind() is None  # an argument of unknown kind
    two = recorded(x2, out, [x2, w, out])
    two.launches.append(two.launches[0])
    assert two.bind() is None  # two kernels (dequantize, then cuBLAS)
    assert LaunchRecord().bind() is None


def test_only_a_set_launch_hook_counts_as_one():
    from triton.knobs import HookChain

    from auto_quant.kernels.bound_launch import hooked

    chain = HookChain()
    assert not hooked(None) and not hooked(chain)
    chain.add(print)
    assert hooked(chain) and hooked(print)


def test_only_gpu_calls_of_decode_size_bind():
    from auto_quant.kernels.bound_launch import call_bound

    bound, records = {}, []
    y = call_bound(bound, (), torch.randn(1, 8), 8, 4, lambda rec: records.append(rec) or torch.zeros(1, 4))
    assert records == [None] and not bound and y.shape == (1, 4)


def test_a_deep_copy_binds_its_own_launches():
    """A deep copy of a model must not launch on the original's tensors: its bindings are dropped and its next
    call takes the full path (which binds again)."""
    import copy

    from auto_quant.kernels.bound_launch import activation_key, call_bound

    x2, out, w = torch.randn(2, 8), torch.empty(2, 4), torch.randn(4, 8)
    x_new = torch.randn(2, 8)
    bound = {activation_key(x_new): recorded(x2, out, [x2, w, out]).bind()}
    copied = copy.deepcopy(bound)
    assert copied[activation_key(x_new)] is None
    records = []
    call_bound(copied, (), x_new, 8, 4, lambda rec: records.append(rec) or torch.zeros(2, 4))
    assert records == [None]  # the full path (a CPU call: nothing to bind)


def test_the_host_time_benchmark_calls_the_bound_path():
    """``benchmarks/bound_call_ab.py`` times ``call_bound`` through one binding with the launcher stubbed: its call
    returns the caller's shape without running the full path (which it gives as None)."""
    from unittest import mock

    from benchmark_scripts import load_benchmark

    from auto_quant.kernels import bound_launch

    bench = load_benchmark("bound_call_ab")
    with mock.patch.object(torch.cuda, "current_device", lambda: 0):
        call = bench.bound_call(bound_launch, torch.randn(1, 3, 64), 32)
        assert call().shape == (1, 3, 32)

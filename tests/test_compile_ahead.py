"""Compiling a shape's candidate kernels side by side before the tuner times them (``kernels/compile_ahead.py``),
without a GPU: the launch wrapper's two paths and the pool around the launchers. The compile itself runs in the GPU
tests (every tuner test) and in ``benchmarks/first_call.py``."""

from __future__ import annotations

import threading

import pytest

triton = pytest.importorskip("triton")


class _Kernel:
    """Records how it was called: ``kernel[grid](...)`` or ``kernel.run(..., warmup=True)``."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(("launch", grid, args, kwargs))

    def run(self, *args, grid, warmup, **kwargs):
        self.calls.append(("run", grid, args, dict(kwargs, warmup=warmup)))


def test_kernel_call_launches_or_only_compiles():
    from auto_quant.kernels.compile_ahead import kernel_call

    k = _Kernel()
    kernel_call(k, (2, 1, 1))(1, 2, BLOCK=16)
    kernel_call(k, (2, 1, 1), compile_only=True)(1, 2, BLOCK=16)
    assert k.calls == [("launch", (2, 1, 1), (1, 2), {"BLOCK": 16}),
                       ("run", (2, 1, 1), (1, 2), {"BLOCK": 16, "warmup": True})]


def test_compile_candidates_runs_every_launcher_inside_triton_async_mode():
    """Every config's launcher is called once, with Triton's async compile mode active (so a warm-up launch queues
    its compile on the pool); a launcher that raises is skipped, the rest still run; the mode is gone afterwards."""
    from triton.runtime import _async_compile

    from auto_quant.kernels.compile_ahead import compile_candidates, default_compile_workers

    seen, modes = [], []

    def launch_one(c):
        modes.append(_async_compile.active_mode.get())
        if c == "bad":
            raise ValueError("the launcher rejects this tile")
        seen.append(c)

    compile_candidates(launch_one, ["a", "bad", "b", "c"], workers=4)
    assert seen == ["a", "b", "c"] and len(modes) == 4
    assert all(isinstance(m, triton.AsyncCompileMode) for m in modes)
    assert _async_compile.active_mode.get() is None
    assert 1 <= default_compile_workers() <= 16


def test_compile_candidates_compiles_on_the_pool_threads():
    """What a launcher queues under the mode runs on the pool's threads, and all of it has finished when the call
    returns (the timing that follows must find every kernel compiled)."""
    from triton.runtime import _async_compile

    from auto_quant.kernels.compile_ahead import compile_candidates

    done, threads = [], set()

    def launch_one(c):
        def compile_fn():
            threads.add(threading.current_thread().name)
            return f"kernel {c}"

        _async_compile.active_mode.get().submit(c, compile_fn, done.append)

    compile_candidates(launch_one, list(range(6)), workers=3)
    assert sorted(done) == sorted(f"kernel {c}" for c in range(6))
    assert threads and all(t.startswith("auto_quant-compile") for t in threads)


def test_one_worker_or_one_candidate_compiles_nothing_ahead():
    from auto_quant.kernels.compile_ahead import compile_candidates

    calls = []
    compile_candidates(calls.append, ["a", "b"], workers=1)
    compile_candidates(calls.append, ["a"], workers=8)
    assert calls == []


def test_compiled_kernels_are_loaded_on_the_pool_before_the_call_returns():
    """After compiling, every kernel that compiled is loaded (Triton's ``CompiledKernel.run``: the module onto the
    GPU, the launch stub built) once, on the pool's threads; a compile that failed or a load that raises is
    skipped without failing the call."""
    from triton.runtime import _async_compile

    from auto_quant.kernels.compile_ahead import compile_candidates

    loaded = []

    class Compiled:
        def __init__(self, name):
            self.name = name

        @property
        def run(self):
            loaded.append((self.name, threading.current_thread().name))
            if self.name == "unloadable":
                raise RuntimeError("out of shared memory")
            return lambda *args: None

    def launch_one(c):
        def compile_fn():
            if c == "broken":
                raise RuntimeError("does not compile")
            return Compiled(c)

        _async_compile.active_mode.get().submit(c, compile_fn, lambda kernel: None)

    compile_candidates(launch_one, ["a", "broken", "unloadable", "b"], workers=3)
    assert sorted(name for name, _ in loaded) == ["a", "b", "unloadable"]
    assert all(t.startswith("auto_quant-compile") for _, t in loaded)

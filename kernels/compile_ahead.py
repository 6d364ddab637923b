"""Compiling a shape's candidate kernels side by side before the tuner times them.

A cold tuner compiles tens of Triton and Gluon variants per layer shape and row bucket, one after another as it
times them: about a minute before a new model's first token on a machine whose compile cache is empty (H100,
Llama-3-8B shapes, docs/bench/kernels.md). Most of a compile runs outside Python (MLIR passes, LLVM, ``ptxas``), so
:func:`compile_candidates` has a thread pool compile every candidate under ``triton.AsyncCompileMode`` (the launchers
called with ``compile_only``, :func:`kernel_call`), then loads each onto the GPU and builds its launch stub on the same
threads (:func:`load_kernel`), so the timing that follows finds them ready. Nothing here changes what is compiled or
picked.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)


def kernel_call(kernel, grid, compile_only: bool = False, record=None) -> Callable:
    """``kernel[grid]``; with ``compile_only`` a call that compiles the same specialization without launching it
    (Triton's warm-up path: under ``AsyncCompileMode`` it is queued on the mode's executor); with ``record`` (a
    :class:`~auto_quant.kernels.bound_launch.LaunchRecord`) a launch that also records what it launched."""
    if compile_only:
        return lambda *args, **kwargs: kernel.run(*args, grid=grid, warmup=True, **kwargs)
    if record is not None:
        from auto_quant.kernels.bound_launch import recording_call

        return recording_call(kernel, grid, record)
    return kernel[grid]


def default_compile_workers() -> int:
    """Threads for :func:`compile_candidates`: the CPUs this process may use, at most 16."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(16, n))


def compile_candidates(launch_one: Callable[[object], object], configs: Sequence, workers: int) -> int:
    """Compile the kernel of every config in ``configs`` on ``workers`` threads: ``launch_one(config)`` calls the
    launcher with ``compile_only`` (the configs may be the launches themselves: ``launch_one=lambda call: call()``).
    A config whose launcher or compile fails is skipped here (its timed launch meets the same error and the tuner
    skips it there). Returns how many configs it took (0: none compiled ahead, each compiles at its first launch)."""
    if workers <= 1 or len(configs) <= 1:
        return 0
    import triton

    mode_cls = getattr(triton, "AsyncCompileMode", None)
    if mode_cls is None:  # an older Triton: the timing compiles them one by one
        return 0
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="auto_quant-compile") as pool:
        with mode_cls(pool, ignore_errors=True) as mode:
            for c in configs:
                try:
                    launch_one(c)
                except Exception as e:  # noqa: BLE001 - e.g. a config the launcher rejects for this shape
                    log.debug("compiling %s ahead failed: %s", c, e)
        compiled = [f.kernel for f in getattr(mode, "future_kernels", {}).values() if f.kernel is not None]
        device = torch.cuda.current_device() if torch.cuda.is_available() else None
        list(pool.map(lambda kernel: load_kernel(kernel, device), compiled))
    return len(configs)


def load_kernel(kernel, device: int | None) -> None:
    """What a compiled kernel's first launch would do, done ahead: load it onto ``device`` and build its launch
    stub, a C module per argument signature that Triton compiles with the host's C compiler (cached on disk like
    the kernels; docs/bench/kernels.md, session 23). A kernel that cannot load (too much shared memory, say) is
    left to its first launch, which meets the same error."""
    try:
        with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
            kernel.run  # noqa: B018 - Triton's CompiledKernel loads and builds its launcher on first access
    except Exception as e:  # noqa: BLE001
        log.debug("loading %s ahead failed: %s", kernel, e)

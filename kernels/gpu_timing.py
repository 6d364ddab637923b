"""GPU time of one kernel call, as a CUDA graph sees it (the tuner's clock).

``triton.testing.do_bench`` times every call between events after an L2 flush; a Python-launched kernel of
10-30 µs then measures the host's launch cost instead (H100, session 8: 42-80 µs for kernels that run 13-18 µs in
a graph, 78-114 µs per call in an eager loop), so the tuner ranked candidates by launch overhead and noise.
Here the calls are captured in a CUDA graph, each after an L2 flush, and the graph of flushes alone is subtracted:
what is left is the kernels' own time with cold weights, as in decode under CUDA graphs. ``warm`` runs after every
flush in both graphs: the tuner passes a copy of the activations, which decode finds in L2 (the previous kernel
wrote them) and a bare flush would have made cold (H100, session 10: the flushed timings ranked the `mma_kw` tiles,
whose warps each read every slice's activations, behind `gemv` on shapes where graph timing with warm activations
put them ahead).

The flush *reads* 64 MiB (:func:`l2_read_flush`), leaving L2 full of clean lines, as decode finds it (the previous
layers' weights). A memset (:func:`l2_write_flush`, the flush until session 15) leaves about 50 MB of dirty lines,
which the timed kernel's reads then write back: on an H100 it timed 29-59 MB kernels 11-18 % above their
back-to-back time (median over a case's candidates), where the read flush agreed within 3 %
(``benchmarks/timing_context.py``, docs/bench/kernels.md).
"""

from __future__ import annotations

import statistics

import torch


def graph_times_ms(fns, flush, launches: int = 8, rounds: int = 5, settle_rounds: int = 0,
                   warm=None) -> list[float]:
    """Milliseconds per call of each of ``fns``: per function a graph of ``launches`` x (``flush()``, ``warm()``,
    ``fn()``), and one graph of ``launches`` x (flush, warm); each round replays the flush-only graph and then every
    function's graph, starting at a different function each round, and a function's time is the median over the
    rounds of (its graph minus that round's flush-only graph) / ``launches``. Interleaved so that a drift of the
    GPU's clock over the rounds (an idle GPU ramping up, a busy one throttling) falls on every function alike, not
    on whichever was timed last. Each function runs once first, outside the capture (it compiles, and allocates any
    workspace it keeps)."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()

    def capture(fn):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(launches):
                flush()
                if warm is not None:
                    warm()
                if fn is not None:
                    fn()
        return g

    flush_only = capture(None)
    works = [capture(fn) for fn in fns]
    for _ in range(1 + settle_rounds):  # first replays upload the graphs (and let an idle GPU's clock ramp up)
        for g in (flush_only, *works):
            g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def replay_ms(g) -> float:
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    diffs: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        base = replay_ms(flush_only)
        for j in range(len(fns)):
            i = (r + j) % len(fns)
            diffs[i].append((replay_ms(works[i]) - base) / launches)
    return [max(statistics.median(d), 1e-6) for d in diffs]


def graph_time_ms(fn, flush, launches: int = 8, rounds: int = 5, settle_rounds: int = 0,
                  warm=None) -> float:
    """Milliseconds per ``fn()`` call (:func:`graph_times_ms` of one function)."""
    return graph_times_ms([fn], flush, launches, rounds, settle_rounds, warm)[0]


def l2_read_flush(device: torch.device):
    """A call that evicts L2 by reading 64 MiB (more than an H100's or A100's L2) into one sum: clean lines."""
    buf = torch.ones(16 << 20, dtype=torch.float32, device=device)
    out = torch.empty((), dtype=torch.float32, device=device)
    return lambda: torch.sum(buf, dim=0, out=out)


def l2_write_flush(device: torch.device):
    """A call that evicts L2 by writing 64 MiB (a memset): dirty lines, for comparison with :func:`l2_read_flush`."""
    buf = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    return buf.zero_

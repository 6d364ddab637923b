"""GPU time of one kernel call, as a CUDA graph sees it (the tuner's clock).

``triton.testing.do_bench`` times every call between events after an L2 flush; a Python-launched kernel of
10-30 µs then measures the host's launch cost instead (H100, session 8: 42-80 µs for kernels that run 13-18 µs in
a graph, 78-114 µs per call in an eager loop), so the tuner ranked candidates by launch overhead and noise.
Here the calls are captured in a CUDA graph, each after a flush of L2 (a 64 MiB memset, above an H100's
50 MiB), and the graph of flushes alone is subtracted: what is left is the kernels' own time with cold
weights, as in decode under CUDA graphs. ``warm`` runs after every flush in both graphs: the tuner passes a copy
of the activations, which decode finds in L2 (the previous kernel wrote them) and a bare flush would have made
cold (H100, session 10: the flushed timings ranked the `mma_kw` tiles, whose warps each read every slice's
activations, behind `gemv` on shapes where graph timing with warm activations put them ahead).
"""

from __future__ import annotations

import statistics

import torch


def graph_time_ms(fn, flush: torch.Tensor, launches: int = 8, rounds: int = 5, settle_rounds: int = 0,
                  warm=None) -> float:
    """Milliseconds per ``fn()`` call: the median over ``rounds`` of (graph of ``launches`` x (flush, warm, fn))
    minus (graph of ``launches`` x (flush, warm)), divided by ``launches``. ``fn`` runs once first, outside the
    capture (it compiles, and allocates any workspace it keeps)."""
    fn()
    torch.cuda.synchronize()
    work, flush_only = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(work):
        for _ in range(launches):
            flush.zero_()
            if warm is not None:
                warm()
            fn()
    with torch.cuda.graph(flush_only):
        for _ in range(launches):
            flush.zero_()
            if warm is not None:
                warm()
    for _ in range(1 + settle_rounds):  # first replays upload the graphs (and let an idle GPU's clock ramp up)
        work.replay()
        flush_only.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    diffs = []
    for _ in range(rounds):
        times = []
        for g in (work, flush_only):
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        diffs.append((times[0] - times[1]) / launches)
    return max(statistics.median(diffs), 1e-6)


def l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """64 MiB to overwrite between timed calls (more than an H100's or A100's L2)."""
    return torch.empty(64 << 20, dtype=torch.uint8, device=device)

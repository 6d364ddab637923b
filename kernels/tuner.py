"""Per-shape kernel choice by timing: ``Tuner`` times the candidate variants of
:func:`~auto_quant.kernels.dispatch.candidates` on the first call per (weight format, dtype, M bucket, N, K,
device) and keeps the fastest. A tuner belongs to whoever creates it (one per loaded model), not to the process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

from auto_quant.kernels.compile_ahead import compile_candidates, default_compile_workers
from auto_quant.kernels.dispatch import KernelConfig, Workspace, candidates, default_config, launch, m_bucket
from auto_quant.kernels.pack import KernelWeight
from auto_quant.kernels.tuner_cache import TunerCache, device_fingerprint

log = logging.getLogger(__name__)


class Tuner:
    """Times candidate variants per shape on first use and remembers the fastest.

    Each candidate is timed inside CUDA graphs, after an L2 flush per call (a read, which leaves L2 clean) and a
    copy of the activations that brings them back into L2, with the flushes' and copies' own time subtracted
    (:func:`~auto_quant.kernels.gpu_timing.graph_time_ms`): event timing of Python-launched calls
    measured the host's launch cost for kernels this short. An idle GPU's SM clock ramps up over the first
    tenths of a second of work (H100: timings 10-15 % slow at first, docs/bench/kernels.md), so the first
    candidate's graphs are replayed ``settle_rounds`` extra times, and the ``recheck`` fastest are timed once more
    together, in twice as many interleaved rounds (:func:`~auto_quant.kernels.gpu_timing.graph_times_ms`), keeping
    the fastest of that second look. ``rep_ms`` scales the rounds per candidate (``rep_ms // 4``, 3 to 30).
    ``flush``: makes the per-call L2 flush for a device (default
    :func:`~auto_quant.kernels.gpu_timing.l2_read_flush`; benchmarks compare others). ``cache``: where picks are
    looked up before timing and stored after (:class:`~auto_quant.kernels.tuner_cache.TunerCache`; None: in
    memory only, the picks of this tuner's life). ``compile_workers``: threads that compile a shape's candidates side by
    side before the first is timed (:mod:`~auto_quant.kernels.compile_ahead`; default: the usable CPUs, at most 16;
    1: one by one as they are timed).
    """

    def __init__(self, rep_ms: float = 25.0, settle_ms: float = 100.0, recheck: int = 4,
                 flush: Callable[[torch.device], Callable[[], object]] | None = None, cache: TunerCache | None = None,
                 compile_workers: int | None = None):
        self.rounds = max(3, min(30, int(rep_ms // 4)))
        self.flush = flush
        self.settle_rounds = max(1, int(settle_ms // 2))
        self.recheck = recheck
        self.best: dict[tuple, KernelConfig] = {}
        self.timings: dict[tuple, dict[KernelConfig, float]] = {}
        self.cache = cache
        self._device_ids: dict[torch.device, str] = {}
        self.compile_workers = default_compile_workers() if compile_workers is None else compile_workers

    def _device_id(self, device: torch.device) -> str:
        """The GPU's fingerprint in the cache's keys (queried once per device)."""
        if device not in self._device_ids:
            self._device_ids[device] = device_fingerprint(device)
        return self._device_ids[device]

    @staticmethod
    def key(x2: torch.Tensor, w: KernelWeight) -> tuple:
        return (w.bits, w.group_size, w.zeros is not None, x2.dtype, m_bucket(x2.shape[0]), w.out_features,
                w.in_features, x2.device)

    def config(self, x2: torch.Tensor, w: KernelWeight, bias: torch.Tensor | None, ws: Workspace) -> KernelConfig:
        key = self.key(x2, w)
        cfg = self.best.get(key)
        if cfg is not None:
            return cfg
        M, K = x2.shape
        if x2.device.type != "cuda":
            return default_config(M, w.out_features, K, x2.device, w.bits, w.group_size, x2.dtype)
        if self.cache is not None:  # a pick timed by an earlier process (reading it is fine under graph capture)
            cfg = self.cache.get(self._device_id(x2.device), key)
            if cfg is not None:
                self.best[key] = cfg
                log.debug("cached pick %s -> %s", key, cfg)
                return cfg
        if torch.cuda.is_current_stream_capturing():  # nothing may run but the captured work: the heuristic
            return default_config(M, w.out_features, K, x2.device, w.bits, w.group_size, x2.dtype)
        from auto_quant.kernels.gpu_timing import graph_time_ms, graph_times_ms, l2_read_flush

        flush = (self.flush or l2_read_flush)(x2.device)
        x_copy = torch.empty_like(x2)

        def timed(c: KernelConfig, settle: int) -> float | None:
            try:  # cold weights, activations in L2 (as decode finds them): a copy reads them after each flush
                return graph_time_ms(lambda: launch(x2, w, bias, c, ws), flush, rounds=self.rounds,
                                     settle_rounds=settle, warm=lambda: x_copy.copy_(x2))
            except Exception as e:  # a variant that does not compile or fit (shared memory) is skipped
                log.debug("kernel variant %s failed: %s", c, e)
                torch.cuda.synchronize()
                return None

        offered = candidates(M, w.out_features, K, x2.device, w.bits, w.group_size, x2.dtype)
        compile_candidates(lambda c: launch(x2, w, bias, c, ws, compile_only=True), offered, self.compile_workers)
        times: dict[KernelConfig, float] = {}
        for i, c in enumerate(offered):
            t = timed(c, self.settle_rounds if i == 0 else 0)
            if t is not None:
                times[c] = t
        if not times:
            cfg = default_config(M, w.out_features, K, x2.device, w.bits, w.group_size, x2.dtype)
        else:
            top = sorted(times, key=times.get)[: self.recheck]
            if len(top) > 1:  # the closest candidates again, in interleaved rounds (a clock drift hits all alike)
                try:
                    second = graph_times_ms([lambda c=c: launch(x2, w, bias, c, ws) for c in top], flush,
                                            rounds=2 * self.rounds, warm=lambda: x_copy.copy_(x2))
                    times.update(zip(top, second))
                except Exception as e:  # e.g. no memory for the graphs side by side: the first look decides
                    log.debug("interleaved recheck of %s failed: %s", top, e)
                    torch.cuda.synchronize()
            cfg = min(top, key=times.get)
        self.best[key] = cfg
        self.timings[key] = times
        if self.cache is not None and times:  # a timed pick (not the fallback when nothing ran)
            self.cache.put(self._device_id(x2.device), key, cfg)
        log.debug("tuned %s -> %s", key, cfg)
        return cfg

    def compile_cached(self, layers: Iterable[tuple[KernelWeight, torch.Tensor | None]], ws: Workspace) -> int:
        """Compile, side by side, the kernels that this tuner's cache picked for ``layers`` (``(weight, bias)``
        pairs; those on CUDA): for each distinct format, shape and bias of a layer, every cached pick of its GPU
        (every activation dtype and row bucket timed before), at the bucket's row count (the kernels do not
        specialize on the row count, so that compile serves every call of the bucket). The picks become this
        tuner's, so the first calls neither read the cache nor wait for a compile one by one
        (a new container given the cache folder: docs/bench/kernels.md). Returns how many kernels it compiled."""
        if self.cache is None:
            return 0
        jobs: dict[torch.device, list[Callable[[], object]]] = {}
        acts: dict[tuple, torch.Tensor] = {}
        seen = set()
        for w, bias in layers:
            dev = w.qweight.device
            shape = (w.bits, w.group_size, w.zeros is not None, w.out_features, w.in_features)
            layer_kind = (shape, dev, None if bias is None else bias.dtype)
            if dev.type != "cuda" or layer_kind in seen:
                continue
            seen.add(layer_kind)
            for key, cfg in self.cache.picks(self._device_id(dev)):
                bits, group_size, has_zero, dtype, bucket, n, k = key
                if (bits, group_size, has_zero, n, k) != shape:
                    continue
                self.best.setdefault(key + (dev,), cfg)
                if (bucket, k, dtype, dev) not in acts:
                    acts[bucket, k, dtype, dev] = torch.zeros(bucket, k, dtype=dtype, device=dev)
                x2 = acts[bucket, k, dtype, dev]
                jobs.setdefault(dev, []).append(
                    lambda x2=x2, w=w, bias=bias, cfg=cfg: launch(x2, w, bias, cfg, ws, compile_only=True))
        compiled = 0
        for dev, calls in jobs.items():
            with torch.cuda.device(dev):  # Triton compiles and caches for the current device
                compiled += compile_candidates(lambda call: call(), calls, self.compile_workers)
        return compiled

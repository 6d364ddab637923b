"""Choosing and launching a Triton kernel variant per call: ``quant_matmul(x, weight, bias)``.

* ``KernelConfig`` is one variant (``gemv`` / ``fma`` / ``tdot`` / ``dot`` / ``dequant``) with its tile
  sizes, split-K factor, warps and pipeline stages. ``gemv`` (:mod:`auto_quant.kernels.triton_gemv`) serves
  one activation row at 2/4/8 bits; ``fma`` is the older single-row kernel, kept for 3 bits where the ``mma``
  kernels cannot serve (groups under 64 inputs, GPUs other than sm_90); ``tdot``
  (:mod:`auto_quant.kernels.triton_qmm_wt`) is the tensor-core kernel with the weight as the tall
  operand (2/3/4/8 bits, a few to a few hundred rows); ``dot`` the older one with the activations as
  the tall operand (every bit width).
* ``default_config`` is a shape heuristic, used when no tuner is given (tests, first calls
  under CUDA-graph capture).
* ``Tuner`` (:mod:`auto_quant.kernels.tuner`) times the candidate variants for a shape on first use and
  keeps the fastest; ``quant_matmul`` takes one.
* ``Workspace`` holds the zero-at-rest fp32 buffer and tile counters that split-K uses.
  One workspace serves calls issued in order on one stream.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from auto_quant.kernels.compile_ahead import kernel_call
from auto_quant.kernels.pack import KernelWeight, codes_per_row

if TYPE_CHECKING:
    from auto_quant.kernels.tuner import Tuner
from auto_quant.kernels.mma_plan import (
    MMA_KW_MAX_M,
    MMA_MAX_M,
    mma_block_ok,
    mma_candidates,
    mma_default,
    mma_kb_block_ok,
    mma_kb_candidates,
    mma_kw_block_ok,
    mma_kw_candidates,
    mma_kw_default,
    mma_serves,
)
from auto_quant.kernels.wgmma_plan import wgmma_block_ok, wgmma_candidates, wgmma_default, wgmma_serves

KERNEL_KINDS = ("gemv", "fma", "tdot", "dot", "dequant", "wgmma", "mma", "mma_kw", "mma_kb")


@dataclass(frozen=True)
class KernelConfig:
    kind: str  # "gemv"/"fma" (one row per program), "tdot"/"dot" (tensor cores), "dequant" (dequantize + cuBLAS)
    block_m: int = 1
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.kind not in KERNEL_KINDS:
            raise ValueError(f"unknown kernel kind {self.kind!r}")
        if self.kind == "fma" and self.block_m != 1:
            raise ValueError("the fma kernel handles one row per program (block_m=1)")
        if self.kind == "gemv" and self.block_m not in (1, 2, 4, 8, 16):
            raise ValueError("the gemv kernel serves 1, 2, 4, 8 or 16 rows per program")
        if self.kind in ("dot", "tdot") and min(self.block_m, self.block_n, self.block_k) < 16:
            raise ValueError("tl.dot needs block sizes >= 16")
        if self.kind == "tdot" and self.block_m >= 128 and self.num_warps < 8:
            # H100, triton 3.6: 128-row blocks on one warpgroup gave intermittently wrong tiles. The cause was a
            # register race (triton-lang/triton#9433, fixed in the kernel by WAIT_MMA); one warpgroup is slower
            # there anyway, and these blocks were not stress-run on it since, so they stay refused
            raise ValueError("the tdot kernel needs 8 warps for 128- and 256-row blocks")
        if self.kind == "mma" and not mma_block_ok(self.block_m, self.block_n, self.block_k, self.num_warps, 8,
                                                   self.num_stages):
            raise ValueError("the mma kernel takes 2, 4 or 8 warps, block_n = 16 x warps x a power of two, block_m 8 or "
                             "16 and block_k a power-of-two number of four-word groups")
        if self.kind == "mma_kw" and (self.split_k != 1 or not mma_kw_block_ok(
                self.block_m, self.block_n, self.block_k, self.num_warps, 8, self.num_stages)):
            raise ValueError("the mma_kw kernel takes 2, 4 or 8 warps (one per K slice), block_m = 8 / warps, block_n "
                             "16 x a power of two, block_k a power-of-two number of four-word groups and no split-K")
        if self.kind == "mma_kb" and (self.split_k != 1 or not mma_kb_block_ok(
                self.block_m, self.block_n, self.block_k, self.num_warps, 8, self.num_stages)):
            raise ValueError("the mma_kb kernel takes 2, 4, 8 or 16 warps (one per K slice), block_n 16 x a power of "
                             "two weight rows per warp, block_m 8 or 16, block_k a power-of-two number of four-word "
                             "groups and no split-K")
        if self.kind == "wgmma" and not wgmma_block_ok(self.block_m, self.block_n, self.block_k, self.num_warps):
            raise ValueError("the wgmma kernel takes 4 or 8 warps, block_n = 16 x warps x a power of two, block_m a "
                             "multiple of 8 up to 256 and block_k a power-of-two number of 8-input words")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def m_bucket(m: int) -> int:
    b = 1
    while b < m:
        b *= 2
    return b


def auto_split(tiles: int, K: int, block_k: int, sms: int) -> int:
    """Split K until the grid covers the machine, keeping at least two K tiles per split."""
    split = 1
    while tiles * split < sms and K >= block_k * 4 * split:
        split *= 2
    return split


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a small grid


def smem_limit(device: torch.device) -> int:
    """Shared memory one program may use on ``device``: CUDA's opt-in maximum per block (H100 227 KiB, A100
    163 KiB, sm_89 99 KiB; torch >= 2.7 reports it, else the multiprocessor's less the 1 KiB CUDA reserves);
    the H100's figure elsewhere (the interpreter)."""
    if device.type != "cuda":
        return TDOT_SMEM_LIMIT
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin:
        return optin
    per_sm = getattr(props, "shared_memory_per_multiprocessor", None)
    return per_sm - 1024 if per_sm else TDOT_SMEM_LIMIT


def _cfg(kind, bm, bn, bkw, bits, split=1, warps=4, stages=2) -> KernelConfig:
    return KernelConfig(kind, bm, bn, bkw * codes_per_row(bits), split, warps, stages)


GEMV_BITS = (2, 4, 8)


def gemv_rows_per_split(K: int, bits: int, group_size: int, block_r: int, split: int) -> int | None:
    """Word rows per split for the gemv kernel (whole tiles), or None where the gemv cannot serve the layer.

    The gemv needs 2, 4 or 8 bits and groups of whole words (a tile taller than a group reads a scale
    row per word row).
    """
    per = codes_per_row(bits)
    if bits not in GEMV_BITS or (group_size != -1 and group_size % per):
        return None
    return _cdiv(_cdiv(_cdiv(K, per), split), block_r) * block_r


def _gemv(bn, br, bits, split=1, warps=4, stages=1) -> KernelConfig:
    """``stages`` 1: register prefetch of the next tile; more: Triton's cp.async pipeline that deep."""
    return KernelConfig("gemv", 1, bn, br * codes_per_row(bits), split, warps, stages)


def _gemv_split(N: int, K: int, bits: int, bn: int, br: int, target: int) -> int:
    """Split K until about ``target`` programs run, keeping at least two tiles per split."""
    tiles = _cdiv(K, codes_per_row(bits)) // br
    return max(1, min(target // _cdiv(N, bn), tiles // 2))


def default_config(M: int, N: int, K: int, device: torch.device, bits: int = 4,
                   group_size: int = 128, act_dtype: torch.dtype | None = None) -> KernelConfig:
    """A reasonable variant without timing anything (``block_k`` counts inputs, ``bkw`` word rows)."""
    sms = _sms(device)
    if M <= 2 and mma_serves(device, bits, group_size, N, K, act_dtype):  # H100: the fastest kernel at 1-2 rows
        cfg = mma_kw_default(M, N, K, group_size, bits)
        if cfg is not None:
            return cfg
    if 1 < M <= 8 and mma_serves(device, bits, group_size, N, K, act_dtype):  # H100: the fastest kernel at 2-8 rows
        cfg = mma_default(M, N, K, group_size, sms, bits)
        if cfg is not None:
            return cfg
    if M > 1 and wgmma_serves(device, bits, group_size, N, K, act_dtype):
        cfg = wgmma_default(M, N, K, group_size, sms, smem_limit(device), bits)
        if cfg is not None:
            return cfg
    if M == 1 and gemv_rows_per_split(K, bits, group_size, 2, 1) is not None:
        bn, br = 512, 4
        return dataclasses.replace(_gemv(bn, br, bits, stages=3), split_k=_gemv_split(N, K, bits, bn, br, 2 * sms))
    if M == 1:
        bn, bkw = 512, 4
        c = _cfg("fma", 1, bn, bkw, bits, warps=4, stages=1)
        return dataclasses.replace(c, split_k=auto_split(_cdiv(N, bn), K, c.block_k, 2 * sms))
    if M <= TDOT_MAX_M and bits in TDOT_BITS:
        fitting = tdot_candidates(M, N, K, bits, group_size, sms, smem_limit(device))
        if fitting:  # the first tile that fits this GPU's shared memory, at its own split
            return fitting[0]
    if M <= 16:
        c = _cfg("dot", 16, 64, 16, bits, warps=4, stages=3)
        return dataclasses.replace(c, split_k=auto_split(_cdiv(N, 64), K, c.block_k, sms))
    # larger batches: dequantize + cuBLAS (on the H100 it beat the fused dot tiles from M = 64 up)
    return _cfg("dequant", 1, 64, 4, bits)


def candidates(M: int, N: int, K: int, device: torch.device, bits: int = 4,
               group_size: int = 128, act_dtype: torch.dtype | None = None) -> list[KernelConfig]:
    """Variants worth timing for one shape: per kernel kind, the tiles the H100 sweeps kept."""
    sms = _sms(device)
    gemv_ok = gemv_rows_per_split(K, bits, group_size, 1, 1) is not None
    use_tdot = 1 < M <= TDOT_MAX_M and bits in TDOT_BITS
    out: list[KernelConfig] = []
    if M <= MMA_MAX_M and mma_serves(device, bits, group_size, N, K, act_dtype):
        out += mma_candidates(M, N, K, group_size, sms, bits)
        out += mma_kb_candidates(M, N, K, group_size, sms, bits)
        if M <= MMA_KW_MAX_M:
            out += mma_kw_candidates(M, N, K, group_size, sms, bits)
    if M == 1 and gemv_ok:
        out += _gemv_candidates(N, K, bits, group_size, sms)
        if bits in (2, 4):  # the paired gemv beats fma on every H100 shape; at 8 bits fma wins the large ones
            return _unique(out)
    if M == 1:
        out += _split_variants("fma", M, N, K, bits, sms, ((1, 512, 4, 4, 1), (1, 256, 8, 4, 1), (1, 512, 8, 8, 1),
                                                          (1, 1024, 4, 8, 1)), ("auto", "half", "quarter"), fill=2)
        return _unique(out)
    if M <= 16 and bits in (2, 4) and gemv_ok:
        out += _rows_candidates(M, N, K, bits, sms)
    if wgmma_serves(device, bits, group_size, N, K, act_dtype):  # H100: won most shapes from 16 rows up
        out += wgmma_candidates(M, N, K, group_size, sms, smem_limit(device), bits)
    if use_tdot:  # the tdot tiles beat the activation-side dot tiles at every H100 shape (2x at 8-16 rows)
        out += tdot_candidates(M, N, K, bits, group_size, sms, smem_limit(device))
    elif bits != 3:  # past tdot's rows the 3-bit dot tiles ran 10-13x behind dequantize + cuBLAS (H100, 1024 rows)
        out += _dot_candidates(M, N, K, bits, sms)
    out.append(_cfg("dequant", 1, 128, 8, bits, warps=8))  # dequantize + cuBLAS: the floor of every batched shape
    return _unique(out)


def _dot_candidates(M: int, N: int, K: int, bits: int, sms: int) -> list[KernelConfig]:
    """The activation-side ``dot`` tiles per row bucket (the kernel where neither ``tdot`` nor ``wgmma`` serves)."""
    if M <= 16:
        return _split_variants("dot", M, N, K, bits, sms, ((16, 64, 16, 4, 3), (16, 128, 16, 4, 3),
                                                          (16, 128, 32, 8, 3)), ("auto", "double"))
    if M <= 64:
        bm = 32 if M <= 32 else 64
        return _split_variants("dot", M, N, K, bits, sms, ((bm, 64, 16, 4, 3), (bm, 128, 16, 8, 3)), ("auto", 1))
    return _split_variants("dot", M, N, K, bits, sms, ((64, 128, 16, 4, 3), (128, 128, 16, 8, 3),
                                                      (128, 256, 16, 8, 3)), (1,))


def _unique(configs: list[KernelConfig]) -> list[KernelConfig]:
    return list(dict.fromkeys(configs))


def _gemv_candidates(N: int, K: int, bits: int, group_size: int, sms: int) -> list[KernelConfig]:
    """M = 1. benchmarks/gemv_sweep.py on an H100: 512 columns and 4 warps won the large shapes, with 2-4 word rows
    per tile, register prefetch or a 3-4 deep cp.async pipeline, and about 2-4 programs per SM; narrow, tall tiles
    without split-K (32 x 64 or 64 x 32 word rows) won 4096x4096 and 14336x4096."""
    out = []
    for bn, br, w, st in ((512, 2, 4, 1), (512, 4, 4, 1), (512, 2, 4, 3), (512, 4, 4, 3), (512, 4, 4, 4),
                          (512, 8, 4, 3), (1024, 4, 8, 3), (256, 4, 2, 4), (32, 64, 4, 4), (64, 32, 4, 3)):
        if gemv_rows_per_split(K, bits, group_size, br, 1) is None:
            continue
        for target in (sms, 2 * sms, 4 * sms, 8 * sms):
            out.append(dataclasses.replace(_gemv(bn, br, bits, warps=w, stages=st),
                                           split_k=_gemv_split(N, K, bits, bn, br, target)))
    return out


def _rows_candidates(M: int, N: int, K: int, bits: int, sms: int) -> list[KernelConfig]:
    """2-16 rows: the multi-row gemv (paired PTX; fp16/bf16 on CUDA only: elsewhere the tuner skips it)."""
    bm = m_bucket(M)
    return [dataclasses.replace(_gemv(512, br, bits, warps=4, stages=st), block_m=bm,
                                split_k=_gemv_split(N, K, bits, 512, br, target))
            for br, st in (((1, 3), (2, 3), (2, 4)) if bm <= 8 else ((1, 3), (1, 4)))
            for target in (sms, 2 * sms, 4 * sms)]


def _split_variants(kind: str, M: int, N: int, K: int, bits: int, sms: int, tiles: tuple, splits: tuple,
                    fill: int = 1) -> list[KernelConfig]:
    """``fma``/``dot`` tiles ``(block_m, block_n, word rows, warps, stages)`` at split-K factors named relative to
    the one that covers ``fill`` x the machine (``"auto"``, ``"half"``, ``"quarter"``, ``"double"``) or given."""
    out = []
    for bm, bn, bkw, warps, stages in tiles:
        c = _cfg(kind, bm, bn, bkw, bits, 1, warps, stages)
        tile_count = _cdiv(N, bn) * (M if kind == "fma" else _cdiv(M, bm))
        auto = auto_split(tile_count, K, c.block_k, fill * sms)
        for s in splits:
            split = {"auto": auto, "half": max(1, auto // 2), "quarter": max(1, auto // 4), "double": auto * 2}.get(s, s)
            if split > 1 and K < c.block_k * 2 * split:
                continue
            out.append(dataclasses.replace(c, split_k=split))
    return out


# (block_n, block_k, warps, stages) of the tdot kernel per row block, from benchmarks/gemv_sweep.py --kernel tdot on
# an H100 (W4 g128, Llama-3-8B shapes): narrow 64-row tiles win at 8-16 rows, 128 rows x 8 warps from 64 rows up;
# 256-row blocks (one 64 x 256 wgmma per warpgroup and k-step) win the wide shapes at 256 rows
TDOT_TILES = {16: ((64, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 4), (128, 128, 8, 3)),
              32: ((64, 128, 4, 4), (64, 128, 4, 3), (128, 128, 8, 3)),
              64: ((128, 128, 8, 3), (64, 128, 4, 4), (128, 64, 8, 4)),
              128: ((128, 64, 8, 4), (128, 128, 8, 3), (256, 128, 8, 3), (256, 64, 8, 3)),
              256: ((128, 64, 8, 4), (128, 64, 8, 3))}
# shared memory per block on an H100 (opt-in); each GPU's own limit comes from smem_limit
TDOT_SMEM_LIMIT = 232448


def tdot_smem_bytes(cfg: KernelConfig, bits: int) -> int:
    """An upper bound of the tdot kernel's shared memory: per pipeline stage the activation tile, the packed words
    and the scales, plus the dequantized tile on its way to the tensor cores (Triton 3.6 on sm_90 used 4-24 %
    less on every tile of TDOT_TILES at 2, 4 and 8 bits)."""
    words = cfg.block_n * (cfg.block_k // codes_per_row(bits)) * 4 * (2 if bits == 3 else 1)  # 3 bits: + high words
    return cfg.num_stages * (cfg.block_k * cfg.block_m * 2 + words + cfg.block_n * 2) + cfg.block_n * cfg.block_k * 2


def _tdot_block_k(block_k: int, bits: int, group_size: int) -> int:
    """``block_k`` cut to the group when a group is shorter (one scale per tile keeps the paired path)."""
    if group_size != -1 and group_size < block_k and group_size % codes_per_row(bits) == 0 and group_size >= 16:
        return group_size
    return block_k


def tdot_row_blocks(M: int) -> list[int]:
    """Row blocks worth timing: the smallest tensor-core width (16 to 256) holding ``M`` rows, and half of it
    from 64 rows up."""
    bm = min(max(16, m_bucket(M)), 256)
    return [bm, bm // 2] if bm >= 64 else [bm]


def tdot_config(M: int, N: int, K: int, bits: int, group_size: int, sms: int, tile: tuple, block_m: int,
                split: int | None = None) -> KernelConfig:
    bn, bk, warps, stages = tile
    bk = _tdot_block_k(bk, bits, group_size)
    if split is None:
        split = auto_split(_cdiv(N, bn) * _cdiv(M, block_m), K, bk, sms)
    return KernelConfig("tdot", block_m, bn, bk, split, warps, stages)


def tdot_candidates(M: int, N: int, K: int, bits: int, group_size: int, sms: int,
                    smem: int = TDOT_SMEM_LIMIT) -> list[KernelConfig]:
    """``tdot`` variants for ``M`` rows: per row block its tiles, split-K around the split that covers the machine;
    tiles whose shared-memory bound exceeds ``smem`` bytes are left out."""
    out = []
    for bm in tdot_row_blocks(M):
        for tile in TDOT_TILES[bm]:
            auto = tdot_config(M, N, K, bits, group_size, sms, tile, bm)
            if tdot_smem_bytes(auto, bits) > smem:
                continue
            for split in (auto.split_k, max(1, auto.split_k // 2), auto.split_k * 2):
                if split > 1 and K < auto.block_k * 2 * split:
                    continue
                c = dataclasses.replace(auto, split_k=split)
                if c not in out:
                    out.append(c)
    return out


class Workspace:
    """Zero-at-rest fp32 scratch and int32 tile counters for split-K, per device."""

    def __init__(self):
        self._bufs: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def holding(cls, device: torch.device, acc: torch.Tensor, counters: torch.Tensor) -> Workspace:
        """A workspace over existing zero-at-rest buffers (a compiled graph's call passes them in)."""
        ws = cls()
        ws._bufs[device] = (acc, counters)
        return ws

    def buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The buffers split-K calls on ``device`` use now; None before the first split-K call there."""
        return self._bufs.get(device)

    def get(self, device: torch.device, n_acc: int, n_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        acc, cnt = self._bufs.get(device, (None, None))
        if acc is None or acc.numel() < n_acc or cnt.numel() < n_tiles:
            n_acc = max(n_acc, 0 if acc is None else acc.numel())
            n_tiles = max(n_tiles, 0 if cnt is None else cnt.numel())
            acc = torch.zeros(n_acc, dtype=torch.float32, device=device)
            cnt = torch.zeros(n_tiles, dtype=torch.int32, device=device)
            self._bufs[device] = (acc, cnt)
        return acc, cnt


def _interpreting() -> bool:
    """Triton's CPU interpreter (``TRITON_INTERPRET=1``) computes bf16 ``tl.dot`` wrongly (triton 3.6)."""
    import triton

    return bool(triton.knobs.runtime.interpret)


def _group_const(w: KernelWeight) -> int:
    return 0 if w.group_size == -1 else w.group_size


def launch(x2: torch.Tensor, w: KernelWeight, bias: torch.Tensor | None, cfg: KernelConfig,
           ws: Workspace, pdl: bool | None = None, compile_only: bool = False, record=None) -> torch.Tensor | None:
    """Run one variant on a 2-D contiguous ``x2 [M, K]``; returns ``[M, N]`` in ``x2.dtype``. ``pdl``: launch the
    1-row ``gemv`` and the ``mma`` kinds with programmatic dependent launch
    (:mod:`~auto_quant.kernels.grid_dependency`); by default as
    :func:`~auto_quant.kernels.grid_dependency.pdl_launch` decides. ``compile_only``: compile the variant's kernel
    for these arguments without running it; what it returns is not written
    (:mod:`~auto_quant.kernels.compile_ahead`). ``record``: a :class:`~auto_quant.kernels.bound_launch.LaunchRecord`
    that the launch appends to."""
    import triton

    from auto_quant.kernels import triton_qmm as k

    M, K = x2.shape
    N = w.out_features
    G = _group_const(w)
    if cfg.kind == "dequant":
        wt = torch.empty((K, N), dtype=x2.dtype, device=x2.device)
        grid = (triton.cdiv(K, cfg.block_k), triton.cdiv(N, cfg.block_n))
        kernel_call(k._dequant_kernel, grid, compile_only, record)(
            w.qweight, w.high_words, w.scales,
            w.zeros if w.zeros is not None else w.scales, wt, N, K,
            BITS=w.bits, GROUP=G, HAS_ZERO=w.zeros is not None, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps,
        )
        if compile_only:
            return None
        if bias is None:
            return x2 @ wt
        return torch.addmm(bias.to(x2.dtype), x2, wt)
    if cfg.kind == "gemv":
        return _launch_gemv(x2, w, bias, cfg, ws, pdl, compile_only, record)
    if cfg.kind == "tdot":
        return _launch_tdot(x2, w, bias, cfg, ws, compile_only, record)
    if cfg.kind == "wgmma":
        from auto_quant.kernels.gluon_wgmma import launch_wgmma

        return launch_wgmma(x2, w, bias, cfg, ws, compile_only, record)
    if cfg.kind in ("mma", "mma_kw", "mma_kb"):
        from auto_quant.kernels.gluon_mma import launch_mma

        return launch_mma(x2, w, bias, cfg, ws, pdl, compile_only, record)
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    grid_n = triton.cdiv(N, cfg.block_n)
    grid_m = M if cfg.kind == "fma" else triton.cdiv(M, cfg.block_m)
    split = cfg.split_k
    per = codes_per_row(w.bits)
    bkw = cfg.block_k // per
    rows_per_split = _cdiv(_cdiv(_cdiv(K, per), split), bkw) * bkw
    if split > 1:
        acc, cnt = ws.get(x2.device, M * N, grid_n * grid_m)
    else:
        acc, cnt = out, out
    kernel_call(k._qmm_kernel, (grid_n, grid_m, split), compile_only, record)(
        x2, w.qweight, w.high_words, w.scales,
        w.zeros if w.zeros is not None else w.scales, bias if bias is not None else out, out, acc, cnt,
        M, N, K, w.n_groups, x2.stride(0), out.stride(0), rows_per_split,
        BITS=w.bits, GROUP=G, HAS_ZERO=w.zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=split > 1,
        EVEN_K=K % cfg.block_k == 0, DOT_F32=_interpreting() and x2.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def paired(x2: torch.Tensor, w: KernelWeight) -> bool:
    """Whether the gemv kernel takes its PTX path (CUDA only, fp16/bf16): paired half precision at 2/4 bits,
    one ``prmt`` per code at 8 bits (:func:`auto_quant.kernels.dequant_ptx.byte_asm`)."""
    per = codes_per_row(w.bits)
    return (x2.is_cuda and not _interpreting() and x2.dtype in (torch.float16, torch.bfloat16)
            and w.bits in (2, 4, 8) and w.in_features % per == 0 and x2.stride(0) % 2 == 0
            and x2.data_ptr() % 4 == 0)


TDOT_BITS = (2, 3, 4, 8)
# above this many rows dequantize + cuBLAS is the floor the tuner chooses from (H100: the tuner's timing misjudged
# dequantize + cuBLAS against tdot at 1024 rows on 4096x4096, a 0.78x -> 0.60x regression in the graph timing)
TDOT_MAX_M = 256


def tdot_pairs(x2: torch.Tensor, w: KernelWeight, block_k: int) -> bool:
    """Whether the ``tdot`` kernel builds its tile with the paired PTX (CUDA, fp16/bf16, one group per tile or
    per-channel scales); otherwise it takes the portable float32 path."""
    return (x2.is_cuda and not _interpreting() and x2.dtype in (torch.float16, torch.bfloat16)
            and (w.group_size == -1 or w.group_size % block_k == 0))


def _launch_tdot(x2: torch.Tensor, w: KernelWeight, bias: torch.Tensor | None, cfg: KernelConfig,
                 ws: Workspace, compile_only: bool = False, record=None) -> torch.Tensor:
    """The tensor-core kernel with the weight as the tall operand (``y^T = W x^T``)."""
    from auto_quant.kernels import dequant_ptx as g
    from auto_quant.kernels import triton_qmm_wt as t

    M, K = x2.shape
    N = w.out_features
    per = codes_per_row(w.bits)
    if w.bits not in TDOT_BITS or cfg.block_k % per:
        raise ValueError(f"the tdot kernel serves {TDOT_BITS} bits in tiles of whole words, not {w.bits} bits "
                         f"with block_k={cfg.block_k}")
    k_per_split = _cdiv(_cdiv(K, cfg.split_k), cfg.block_k) * cfg.block_k
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    grid = (_cdiv(N, cfg.block_n), _cdiv(M, cfg.block_m), _cdiv(K, k_per_split))
    acc, cnt = ws.get(x2.device, M * N, grid[0] * grid[1]) if grid[2] > 1 else (out, out)
    pairs = tdot_pairs(x2, w, cfg.block_k)
    act = "fp16" if x2.dtype == torch.float16 else "bf16"
    zero = None if w.zeros is not None else 1 << (w.bits - 1)
    if not pairs:
        deq, cons = "", ""
    elif w.bits == 3:
        deq, cons = g.dequant3_asm(act, zero), g.dequant3_constraints(zero)
    else:
        deq, cons = g.dequant_asm(w.bits, act, zero), g.dequant_constraints(w.bits, zero)
    kernel_call(t._qmm_wt_kernel, grid, compile_only, record)(
        x2, w.qweight, w.high_words, w.scales, w.zeros if w.zeros is not None else w.scales,
        bias if bias is not None else out, out, acc, cnt, M, N, K, x2.stride(0), out.stride(0), k_per_split,
        BITS=w.bits, GROUP=_group_const(w), HAS_ZERO=w.zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=grid[2] > 1,
        EVEN_K=K % cfg.block_k == 0, PAIRS=pairs, DEQ=deq, DEQ_CONS=cons, ACT_FP16=x2.dtype == torch.float16,
        STAGES=cfg.num_stages, DOT_F32=_interpreting() and x2.dtype == torch.bfloat16,
        WAIT_MMA=wgmma_device(x2.device), num_warps=cfg.num_warps,
    )
    return out


def wgmma_device(device: torch.device) -> bool:
    """Whether Triton lowers ``tl.dot`` to Hopper's asynchronous ``wgmma`` here (sm_90; not the interpreter)."""
    return device.type == "cuda" and not _interpreting() and capability_major(device.index) == 9


@functools.cache  # called on every tdot launch; a GPU's capability does not change
def capability_major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _launch_gemv(x2: torch.Tensor, w: KernelWeight, bias: torch.Tensor | None, cfg: KernelConfig,
                 ws: Workspace, pdl: bool | None = None, compile_only: bool = False, record=None) -> torch.Tensor:
    """The one-row kernel (``block_m == 1``, a program per row) or the multi-row one (paired path only)."""
    from auto_quant.kernels import dequant_ptx as p
    from auto_quant.kernels import triton_gemv as g
    from auto_quant.kernels import triton_gemv_rows as gr

    M, K = x2.shape
    N = w.out_features
    per = codes_per_row(w.bits)
    br = cfg.block_k // per
    pairs = paired(x2, w)
    if cfg.block_m > 1 and not (pairs and w.bits in (2, 4)):
        raise ValueError("the multi-row gemv needs fp16/bf16 activations with 4-byte aligned rows on CUDA and "
                         "2- or 4-bit weights whose in_features fill whole words")
    rows = gemv_rows_per_split(K, w.bits, w.group_size, br, cfg.split_k)
    if rows is None:
        raise ValueError(f"the gemv kernel cannot serve {w.bits}-bit weights with group size {w.group_size} "
                         f"in tiles of {br} word rows")
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    grid = (_cdiv(N, cfg.block_n), _cdiv(M, cfg.block_m), cfg.split_k)
    acc, cnt = ws.get(x2.device, M * N, grid[0] * grid[1]) if cfg.split_k > 1 else (out, out)
    act = "fp16" if x2.dtype == torch.float16 else "bf16"
    zero = None if w.zeros is not None else 1 << (w.bits - 1)
    tensors = (x2, w.qweight, w.scales, w.zeros if w.zeros is not None else w.scales,
               bias if bias is not None else out, out, acc, cnt)
    consts = dict(BITS=w.bits, GROUP=_group_const(w), HAS_ZERO=w.zeros is not None, HAS_BIAS=bias is not None,
                  BLOCK_N=cfg.block_n, BLOCK_R=br, SPLIT=cfg.split_k > 1, EVEN_R=_cdiv(K, per) % br == 0,
                  EVEN_N=N % cfg.block_n == 0, ACT_FP16=x2.dtype == torch.float16, STAGES=cfg.num_stages,
                  num_warps=cfg.num_warps)
    if cfg.block_m == 1:
        from auto_quant.kernels.grid_dependency import pdl_launch

        # one stage (register prefetch, often with a deep split) ran 1-12 % slower with PDL in 4 of 5 A/B pairs
        pdl = pdl_launch(x2.device, N * K * w.bits // 8) and cfg.num_stages > 1 if pdl is None else pdl
        kernel_call(g._gemv_kernel, grid, compile_only, record)(
            *tensors, N, K, x2.stride(0), out.stride(0), rows, EVEN_K=K % per == 0, PAIRS=pairs,
            ASM=p.pair_asm(w.bits, act, zero) if pairs else "", CONS=p.pair_constraints(w.bits, act, zero) if pairs else "",
            PDL=pdl, **({"launch_pdl": True} if pdl else {}), **consts)  # no such launch option in the interpreter
    else:
        kernel_call(gr._gemv_rows_kernel, grid, compile_only, record)(
            *tensors, M, N, K, x2.stride(0), out.stride(0), rows, BLOCK_M=cfg.block_m,
            DEQ=p.dequant_asm(w.bits, act, zero), DEQ_CONS=p.dequant_constraints(w.bits, zero),
            DOT=p.dot_asm(w.bits, act), DOT_CONS=p.dot_constraints(w.bits), **consts)
    return out


def choose_config(x2: torch.Tensor, w: KernelWeight, bias: torch.Tensor | None, ws: Workspace,
                  tuner: Tuner | None) -> KernelConfig:
    """The variant for ``x2 [M, K]``: the tuner's pick (timed on first use), else the shape heuristic."""
    if tuner is not None:
        return tuner.config(x2, w, bias, ws)
    return default_config(x2.shape[0], w.out_features, w.in_features, x2.device, w.bits, w.group_size, x2.dtype)


def quant_matmul(x: torch.Tensor, w: KernelWeight, bias: torch.Tensor | None = None, *,
                 config: KernelConfig | None = None, tuner: Tuner | None = None,
                 workspace: Workspace | None = None, record=None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x [..., K]`` in fp16/bf16; ``W`` in the kernel layout. ``record``: a
    :class:`~auto_quant.kernels.bound_launch.LaunchRecord` that gets what was launched, on what, with what result."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        # Triton launches on the current device: a layer on another GPU (a model split over several) switches to it
        with torch.cuda.device(x.device):
            return quant_matmul(x, w, bias, config=config, tuner=tuner, workspace=workspace, record=record)
    if x.shape[-1] != w.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer takes {w.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    ws = workspace if workspace is not None else Workspace()
    if config is None:
        config = choose_config(x2, w, bias, ws, tuner)
    if x2.shape[0] == 0:
        return x.new_empty(*lead, w.out_features)
    y = launch(x2, w, bias, config, ws, record=record)
    if record is not None:
        record.done(x2, y)
    return y.reshape(*lead, w.out_features)

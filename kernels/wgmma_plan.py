"""Where the Gluon ``wgmma`` kernel (:mod:`~auto_quant.kernels.gluon_wgmma`) applies, and its tiles.

Pure Python (no Gluon import): the dispatcher asks :func:`wgmma_serves` before offering the kernel's
tiles to the tuner or choosing one untuned.

The tiles are ``(block_m, block_n, block_k, warps, stages)`` per activation-row bucket, from
``benchmarks/gemv_sweep.py --kernel wgmma`` on an H100 (W4 g128, the five Llama-3-8B shapes,
``docs/bench/kernels.md``): 64 weight rows on one warpgroup with 128 inputs per tile won every row count
but the widest shapes at 256 rows, where 128 weight rows on two warpgroups and 64 inputs won.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from auto_quant.kernels.pack import codes_per_row

WGMMA_BITS = (2, 3, 4, 8)
# per row bucket (the smallest power of two >= M, at most 256): (block_m, block_n, block_k, warps, stages)
WGMMA_TILES = {16: ((16, 64, 128, 4, 4), (16, 64, 128, 4, 3), (16, 128, 128, 8, 4)),
               32: ((32, 64, 128, 4, 4), (32, 128, 128, 8, 4)),
               64: ((64, 64, 128, 4, 4), (64, 128, 128, 8, 4), (32, 64, 128, 4, 4)),
               128: ((128, 64, 128, 4, 3), (128, 128, 64, 8, 4), (64, 64, 128, 4, 4)),
               256: ((128, 64, 128, 4, 3), (256, 64, 128, 4, 3), (256, 128, 64, 8, 4), (128, 128, 64, 8, 4),
                     (256, 128, 128, 8, 3))}
# (256, 128, 128, 8, 3): 221 KB of shared memory, 241 registers; at 1024 rows the fastest of 12 tiles on 4096x4096,
# 4096x14336 and 28672x4096 (H100, back to back, two rounds; docs/bench/kernels.md, session 16)


def wgmma_block_ok(block_m: int, block_n: int, block_k: int, num_warps: int) -> bool:
    """Tiles the kernel's layouts cover: 4 or 8 warps stacked along the weight rows (16 rows each, a power-of-two
    number of times), 8-256 activation rows in steps of 8, a power-of-two number (>= 2) of 8-input words."""
    reps = block_n // (16 * num_warps) if num_warps in (4, 8) else 0
    bkw = block_k // 8
    return (reps >= 1 and reps & (reps - 1) == 0 and block_n == 16 * num_warps * reps and 8 <= block_m <= 256
            and block_m % 8 == 0 and block_k % 16 == 0 and bkw & (bkw - 1) == 0)


def wgmma_smem_bytes(block_m: int, block_n: int, block_k: int, stages: int, bits: int = 4) -> int:
    """The kernel's shared memory: per stage the activation tile and the packed words (3 bits: the 2-bit plane's
    and the high words, half as many), plus the barriers."""
    words = block_k // codes_per_row(bits) * block_n * 4
    if bits == 3:
        words += words // 2  # a high word per column pair
    return stages * (block_m * block_k * 2 + words) + 8 * stages + 64


@functools.cache
def gluon_arch(arch: str) -> bool:
    """Whether this Triton has Gluon's ``nvidia.<arch>`` language module (``hopper``: wgmma/TMA, ``ampere``:
    mma.sync), looked up without importing it."""
    try:
        return importlib.util.find_spec(f"triton.experimental.gluon.language.nvidia.{arch}") is not None
    except ModuleNotFoundError:
        return False


def wgmma_serves(device: torch.device, bits: int, group_size: int, N: int, K: int,
                 act_dtype: torch.dtype | None) -> bool:
    """Whether the kernel can serve a layer: an sm_90 GPU (``wgmma``), Gluon, 2, 4 or 8 bits, groups of 64 or more
    inputs (one group per tile) or per-channel scales, TMA-aligned rows (``K % 8``, ``N % 4``) and fp16/bf16
    activations (``None``: not known yet)."""
    from auto_quant.kernels.dispatch import wgmma_device

    return (bits in WGMMA_BITS and (group_size == -1 or group_size % 64 == 0) and K % (16 if bits == 3 else 8) == 0
            and N % (8 if bits == 3 else 4) == 0
            and act_dtype in (None, torch.float16, torch.bfloat16) and wgmma_device(device) and gluon_arch("hopper"))


def _block_k(block_k: int, group_size: int) -> int:
    return block_k if group_size == -1 or group_size % block_k == 0 else 64


def _split(tiles: int, K: int, block_k: int, sms: int) -> int:
    """Split K until the grid covers the machine, keeping at least four tiles per split."""
    split = 1
    while tiles * split < sms and K >= block_k * 4 * split * 2:
        split *= 2
    return split


def wgmma_candidates(M: int, N: int, K: int, group_size: int, sms: int, smem: int, bits: int = 4):
    """The tuner's ``wgmma`` variants for ``M`` rows: per tile the split that covers the machine and half of it."""
    from auto_quant.kernels.dispatch import KernelConfig

    bucket = min(max(16, 1 << (M - 1).bit_length()), 256)
    out = []
    for bm, bn, bk, warps, stages in WGMMA_TILES[bucket]:
        bk = _block_k(bk, group_size)
        if wgmma_smem_bytes(bm, bn, bk, stages, bits) > smem:
            continue
        auto = _split(-(-N // bn) * -(-M // bm), K, bk, sms)
        for split in dict.fromkeys((auto, max(1, auto // 2))):
            out.append(KernelConfig("wgmma", bm, bn, bk, split, warps, stages))
    return out


def wgmma_default(M: int, N: int, K: int, group_size: int, sms: int, smem: int, bits: int = 4):
    """The untuned choice: the bucket's first tile that fits, at the split that covers the machine."""
    cands = wgmma_candidates(M, N, K, group_size, sms, smem, bits)
    return cands[0] if cands else None

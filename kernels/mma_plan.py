"""Where the Gluon ``mma`` kernel (:mod:`~auto_quant.kernels.gluon_mma`) applies, and its tiles.

Pure Python (no Gluon import): the dispatcher asks :func:`mma_serves` before offering the kernel's tiles to the
tuner or choosing one untuned. Tiles are ``(block_n, block_k, warps, stages)``; ``block_m`` is 8 up to 8
activation rows and 16 above (one or two ``mma.sync`` column tiles).

``mma_kw`` tiles are the same kernel with the warps splitting K instead of stacking along the weight rows: ``block_n``
weight rows per program, every warp over its own slice of K, and ``block_m = 8 / warps`` activation rows (the
``mma``'s 8 columns hold the rows times the slices). It serves 1 to 4 rows where K divides into whole slices, one
program deep (``split_k`` 1).

``mma_kb`` tiles split K over the warps too, but each warp is its own batch of a batched ``mma``: ``block_n`` weight
rows and all ``block_m`` (8 or 16) activation rows per warp, over its own slice, summed across the warps at the end.
No column of the ``mma`` holds another slice's products, so it serves up to 16 rows (``mma_kw`` runs out of columns
at 8 / warps); each warp reads only its own slice's activations.
"""

from __future__ import annotations

import torch

from auto_quant.kernels.pack import codes_per_row
from auto_quant.kernels.wgmma_plan import gluon_arch

MMA_BITS = (2, 3, 4, 8)
MMA_MAX_M = 16
# (block_n, block_k, warps, tiles in flight in registers)
MMA_TILES = ((64, 128, 4, 2), (128, 128, 4, 2), (128, 128, 8, 2), (128, 64, 4, 2), (256, 128, 8, 2),
             (64, 256, 4, 2), (32, 256, 2, 2), (64, 256, 2, 2),
             (64, 128, 4, 3), (128, 128, 4, 3), (128, 64, 4, 3), (32, 256, 2, 3), (256, 128, 8, 3))

# (block_n weight rows, block_k, warps = K slices, tiles in flight)
MMA_KW_TILES = ((16, 128, 8, 2), (32, 128, 8, 2), (16, 128, 4, 2), (32, 128, 4, 2), (16, 128, 8, 3), (32, 128, 4, 3),
                (32, 64, 8, 3), (16, 128, 2, 2), (32, 128, 2, 2))
MMA_KW_MAX_M = 4

# (block_n weight rows per warp, block_k, warps = K slices = batches, tiles in flight). 16 warps also compile and run
# right, but the tuner timed them 1.3-3.7x the best tile on every H100 case of session 14 (docs/bench/kernels.md)
MMA_KB_TILES = ((16, 128, 8, 2), (32, 128, 8, 2), (16, 128, 4, 2), (32, 128, 4, 2), (64, 128, 4, 2), (32, 64, 8, 3),
                (32, 128, 4, 3), (64, 64, 4, 3), (16, 128, 8, 3))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


def _warp_tile_ok(block_m: int, rows: int, block_k: int, bits: int, stages: int) -> bool:
    """One warp's tile: 16 weight rows a power-of-two number of times, 8 or 16 activation rows, a power-of-two number
    of groups of four packed words, 2 or 3 tiles in flight."""
    per = codes_per_row(bits) if bits in MMA_BITS else 0
    return (per > 0 and rows % 16 == 0 and _pow2(rows // 16) and block_m in (8, 16) and block_k % (4 * per) == 0
            and _pow2(block_k // (4 * per)) and stages in (2, 3))


def mma_block_ok(block_m: int, block_n: int, block_k: int, num_warps: int, bits: int = 4, stages: int = 2) -> bool:
    """Tiles the kernel's layouts cover: 2, 4 or 8 warps stacked along the weight rows (16 rows each, a power-of-two
    number of times), 8 or 16 activation rows, and a power-of-two number of groups of four packed words."""
    return (num_warps in (2, 4, 8) and block_n % num_warps == 0
            and _warp_tile_ok(block_m, block_n // num_warps, block_k, bits, stages))


def mma_kw_block_ok(block_m: int, block_n: int, block_k: int, num_warps: int, bits: int = 4, stages: int = 2) -> bool:
    """``mma_kw`` tiles: 2, 4 or 8 warps, one per K slice, each over the same ``block_n`` weight rows (16 times a power
    of two) and ``block_m = 8 / warps`` activation rows; ``block_k`` as for :func:`mma_block_ok`."""
    return (num_warps in (2, 4, 8) and block_m * num_warps == 8
            and mma_block_ok(8, block_n * num_warps, block_k, num_warps, bits, stages))


def mma_kb_block_ok(block_m: int, block_n: int, block_k: int, num_warps: int, bits: int = 4, stages: int = 2) -> bool:
    """``mma_kb`` tiles: 2, 4, 8 or 16 warps, one batch (K slice) each over the same ``block_n`` weight rows (16 times
    a power of two) and ``block_m`` (8 or 16) activation rows; ``block_k`` as for :func:`mma_block_ok` (each warp's
    rows are a one-warp ``mma`` tile's)."""
    return num_warps in (2, 4, 8, 16) and _warp_tile_ok(block_m, block_n, block_k, bits, stages)


def mma_k_per_split(K: int, block_k: int, split: int, slices: int = 1) -> int | None:
    """Inputs per program of grid axis 2 (whole tiles). With the warps splitting K (``slices`` > 1, one program deep)
    every slice must be whole: ``None`` unless ``slices x block_k`` divides K."""
    if slices > 1:
        return K if split == 1 and K % (slices * block_k) == 0 else None
    return _cdiv(_cdiv(K, split), block_k) * block_k


def mma_serves(device: torch.device, bits: int, group_size: int, N: int, K: int,
               act_dtype: torch.dtype | None) -> bool:
    """Whether the kernel can serve a layer: an sm_90 GPU (the only one it was run on; ``mma.sync`` itself is
    sm_80+), Gluon, 2, 3, 4 or 8 bits, groups that hold whole tiles (``group_size % (4 * PER) == 0``, ``PER`` codes
    per word: 32 / bits, 16 at 3 bits) or per-channel scales, whole words per row (``K % PER == 0``) and fp16/bf16
    activations (``None``: not known yet)."""
    from auto_quant.kernels.dispatch import wgmma_device

    if bits not in MMA_BITS:
        return False
    per = codes_per_row(bits)
    return ((group_size == -1 or group_size % (4 * per) == 0) and K % per == 0
            and act_dtype in (None, torch.float16, torch.bfloat16) and wgmma_device(device) and gluon_arch("ampere"))


def _block_k(block_k: int, group_size: int, bits: int) -> int:
    """The tile's inputs: at most the group (one group per tile), at least one group of four words."""
    if group_size != -1:
        while group_size % block_k:
            block_k //= 2
    return max(block_k, 4 * codes_per_row(bits))


def _split(tiles: int, K: int, block_k: int, target: int) -> int:
    """Split K until about ``target`` programs run, keeping at least two tiles per split."""
    split = 1
    while tiles * split * 2 <= target and K >= block_k * 2 * split * 2:
        split *= 2
    return split


def mma_candidates(M: int, N: int, K: int, group_size: int, sms: int, bits: int = 4):
    """The tuner's ``mma`` variants for ``M <= 16`` rows: per tile, splits that run about 1, 2 and 4 programs per SM."""
    from auto_quant.kernels.dispatch import KernelConfig

    bm = 8 if M <= 8 else 16
    out = []
    for bn, bk, warps, stages in MMA_TILES:
        bk = _block_k(bk, group_size, bits)
        if not mma_block_ok(bm, bn, bk, warps, bits, stages):
            continue
        tiles = _cdiv(N, bn) * _cdiv(M, bm)
        for target in (sms, 2 * sms, 4 * sms):
            out.append(KernelConfig("mma", bm, bn, bk, _split(tiles, K, bk, target), warps, stages))
    return list(dict.fromkeys(out))


def mma_kw_candidates(M: int, N: int, K: int, group_size: int, sms: int, bits: int = 4):
    """The tuner's ``mma_kw`` variants for ``M <= 4`` rows (``8 / warps >= M``, so one program row covers them), where K
    splits into whole slices. No split-K: the warps' slices already give narrow layers enough programs."""
    from auto_quant.kernels.dispatch import KernelConfig

    out = []
    for bn, bk, warps, stages in MMA_KW_TILES:
        bk = _block_k(bk, group_size, bits)
        bm = 8 // warps
        if bm >= M and mma_kw_block_ok(bm, bn, bk, warps, bits, stages) and mma_k_per_split(K, bk, 1, warps):
            out.append(KernelConfig("mma_kw", bm, bn, bk, 1, warps, stages))
    return list(dict.fromkeys(out))


def mma_kb_candidates(M: int, N: int, K: int, group_size: int, sms: int, bits: int = 4):
    """The tuner's ``mma_kb`` variants for ``M <= 16`` rows (8 per program up to 8 rows, else 16), where K splits into
    whole slices; no split-K."""
    from auto_quant.kernels.dispatch import KernelConfig

    bm = 8 if M <= 8 else 16
    out = []
    for bn, bk, warps, stages in MMA_KB_TILES:
        bk = _block_k(bk, group_size, bits)
        if mma_kb_block_ok(bm, bn, bk, warps, bits, stages) and mma_k_per_split(K, bk, 1, warps):
            out.append(KernelConfig("mma_kb", bm, bn, bk, 1, warps, stages))
    return list(dict.fromkeys(out))


def mma_kw_default(M: int, N: int, K: int, group_size: int, bits: int = 4):
    """The untuned choice at 1-2 rows (H100, W4 g128, docs/bench/kernels.md): 32 weight rows on 4 warps for wide layers,
    16 rows on 8 warps (more slices) for long inputs, else 16 rows on 4 warps; ``None`` where K has no whole slices."""
    from auto_quant.kernels.dispatch import KernelConfig

    bn, warps = (32, 4) if N >= 12288 else ((16, 8) if K >= 8192 and M == 1 else (16, 4))
    bk = _block_k(128, group_size, bits)
    if M > 8 // warps or not mma_kw_block_ok(8 // warps, bn, bk, warps, bits) or not mma_k_per_split(K, bk, 1, warps):
        return None
    return KernelConfig("mma_kw", 8 // warps, bn, bk, 1, warps, 2)


def mma_default(M: int, N: int, K: int, group_size: int, sms: int, bits: int = 4):
    """The untuned choice: 128 weight rows on 4 warps, 128 inputs (or the group), at the split that runs about two
    programs per SM; within 5 % of the best tile on every Llama-3-8B shape at 4 rows on an H100
    (docs/bench/kernels.md)."""
    from auto_quant.kernels.dispatch import KernelConfig

    bm = 8 if M <= 8 else 16
    bk = _block_k(128, group_size, bits)
    if not mma_block_ok(bm, 128, bk, 4, bits):
        return None
    return KernelConfig("mma", bm, 128, bk, _split(_cdiv(N, 128) * _cdiv(M, bm), K, bk, 2 * sms), 4, 2)

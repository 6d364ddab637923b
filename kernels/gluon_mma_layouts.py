"""The layouts of the Gluon ``mma`` kernel (:mod:`~auto_quant.kernels.gluon_mma`): which packed words, activations,
operand halves and accumulator entries every lane holds, and the relabelling of the loaded words' physical weight rows
to the operand's logical rows (registers only: no data moves).

A program's weight rows are loaded in physical order, a thread's rows adjacent (one vector load); the ``mma.sync``
operand wants them in its own order, so the kernel writes row ``l`` of the result to column
:func:`~auto_quant.kernels.gluon_wgmma._phys_row` ``(l)``. ``BITS`` here is the packed words' width
(:func:`~auto_quant.kernels.gluon_mma_operands.plane_bits`: 2 for 3-bit weights).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from auto_quant.kernels.gluon_wgmma import logical_rows


@gluon.constexpr_function
def mma_layouts(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, BITS):
    """(accumulator, left operand, right operand, the ``[word rows, BLOCK_N]`` load layout of the packed words in
    physical row order, the ``[BLOCK_N, groups, 4]`` layout of the words in logical row order, the
    ``[BLOCK_M, BLOCK_K / 2]`` load layout of the activations as b32 pairs, the ``[word rows, BLOCK_N / 2]`` load
    layout of 3-bit weights' high words: the words' without the thread's column pairs, which share one).
    ``BITS``: of the packed words (:func:`~auto_quant.kernels.gluon_mma_operands.plane_bits`)."""
    per = 32 // BITS
    reps = BLOCK_N // (16 * num_warps)
    groups = BLOCK_K // (4 * per)  # groups of four word rows: one word per lane t
    acc = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8])
    a = gl.DotOperandLayout(operand_index=0, parent=acc, k_width=2)
    b = gl.DotOperandLayout(operand_index=1, parent=acc, k_width=2)
    # physical row p = h + 2 rep + 2 reps g + 16 reps w (a thread's rows adjacent); lane bits 0-1: word row t
    load = gl.DistributedLinearLayout(
        reg_bases=[[0, 1]] + [[0, 2 << i] for i in range(reps.bit_length() - 1)]
        + [[4 << i, 0] for i in range(groups.bit_length() - 1)],
        lane_bases=[[1, 0], [2, 0]] + [[0, (2 * reps) << i] for i in range(3)],
        warp_bases=[[0, (16 * reps) << i] for i in range(num_warps.bit_length() - 1)], block_bases=[],
        shape=[4 * groups, BLOCK_N])
    hload = gl.DistributedLinearLayout(
        reg_bases=[[0, 1 << i] for i in range(reps.bit_length() - 1)]
        + [[4 << i, 0] for i in range(groups.bit_length() - 1)],
        lane_bases=[[1, 0], [2, 0]] + [[0, reps << i] for i in range(3)],
        warp_bases=[[0, (8 * reps) << i] for i in range(num_warps.bit_length() - 1)], block_bases=[],
        shape=[4 * groups, BLOCK_N // 2])
    # logical row l = ((rep * W + w) * 2 + h) * 8 + g
    word = gl.DistributedLinearLayout(
        reg_bases=[[8, 0, 0]] + [[(16 * num_warps) << i, 0, 0] for i in range(reps.bit_length() - 1)]
        + [[0, 1 << i, 0] for i in range(groups.bit_length() - 1)],
        lane_bases=[[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[16 << i, 0, 0] for i in range(num_warps.bit_length() - 1)], block_bases=[],
        shape=[BLOCK_N, groups, 4])
    # lane (g, t): the PER inputs (PER/2 b32 pairs) of word row t of every group, for activation rows g (and g + 8)
    xload = gl.DistributedLinearLayout(
        reg_bases=[[0, 1 << i] for i in range((per // 2).bit_length() - 1)]
        + [[0, (2 * per) << i] for i in range(groups.bit_length() - 1)]
        + [[8 << i, 0] for i in range((BLOCK_M // 8).bit_length() - 1)],
        lane_bases=[[0, per // 2], [0, per], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[0, 0]] * (num_warps.bit_length() - 1), block_bases=[], shape=[BLOCK_M, BLOCK_K // 2])
    return acc, a, b, load, word, xload, hload


@gluon.constexpr_function
def mma_kb_layouts(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, BITS):
    """:func:`mma_layouts` for the batched mode (``mma_kb``): every warp its own K slice, the slice the leading axis
    of each tile (accumulator ``[W, PR, MR]``, loads ``[W, word rows, PR]``, words ``[W, PR, groups, 4]``,
    activations ``[W, MR, BLOCK_K / 2]``, 3-bit high words ``[W, word rows, PR / 2]``; ``PR = BLOCK_N / W``,
    ``MR = BLOCK_M / W``). Inside a warp the rows are those of a one-warp :func:`mma_layouts` tile."""
    W = num_warps
    per = 32 // BITS
    pr, mr = BLOCK_N // W, BLOCK_M // W
    reps = pr // 16
    groups = BLOCK_K // (4 * per)
    acc = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1, 1], instr_shape=[1, 16, 8])
    a = gl.DotOperandLayout(operand_index=0, parent=acc, k_width=2)
    b = gl.DotOperandLayout(operand_index=1, parent=acc, k_width=2)
    warp3 = [[1 << i, 0, 0] for i in range(W.bit_length() - 1)]
    load = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1]] + [[0, 0, 2 << i] for i in range(reps.bit_length() - 1)]
        + [[0, 4 << i, 0] for i in range(groups.bit_length() - 1)],
        lane_bases=[[0, 1, 0], [0, 2, 0]] + [[0, 0, (2 * reps) << i] for i in range(3)],
        warp_bases=warp3, block_bases=[], shape=[W, 4 * groups, pr])
    hload = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1 << i] for i in range(reps.bit_length() - 1)]
        + [[0, 4 << i, 0] for i in range(groups.bit_length() - 1)],
        lane_bases=[[0, 1, 0], [0, 2, 0]] + [[0, 0, reps << i] for i in range(3)],
        warp_bases=warp3, block_bases=[], shape=[W, 4 * groups, pr // 2])
    word = gl.DistributedLinearLayout(
        reg_bases=[[0, 8, 0, 0]] + [[0, 16 << i, 0, 0] for i in range(reps.bit_length() - 1)]
        + [[0, 0, 1 << i, 0] for i in range(groups.bit_length() - 1)],
        lane_bases=[[0, 0, 0, 1], [0, 0, 0, 2], [0, 1, 0, 0], [0, 2, 0, 0], [0, 4, 0, 0]],
        warp_bases=[[1 << i, 0, 0, 0] for i in range(W.bit_length() - 1)], block_bases=[], shape=[W, pr, groups, 4])
    xload = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1 << i] for i in range((per // 2).bit_length() - 1)]
        + [[0, 0, (2 * per) << i] for i in range(groups.bit_length() - 1)]
        + [[0, 8 << i, 0] for i in range((mr // 8).bit_length() - 1)],
        lane_bases=[[0, 0, per // 2], [0, 0, per], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
        warp_bases=warp3, block_bases=[], shape=[W, mr, BLOCK_K // 2])
    return acc, a, b, load, word, xload, hload


@gluon.constexpr_function
def kernel_layouts(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, BITS, BATCHED):
    """The kernel's layouts: :func:`mma_kb_layouts` in the batched mode, else :func:`mma_layouts`."""
    f = mma_kb_layouts if BATCHED else mma_layouts
    return getattr(f, "__wrapped__", f)(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, BITS)


@gluon.jit
def logical_words(wp, word_l: gl.constexpr, REPS: gl.constexpr, num_warps: gl.constexpr):
    """``[word rows, BLOCK_N]`` words in physical row order -> ``[BLOCK_N, groups, 4]`` in logical row order
    (:func:`~auto_quant.kernels.gluon_wgmma.logical_rows`, the ``wgmma`` kernel's row order; no data moves)."""
    BKW: gl.constexpr = wp.shape[0]
    BLOCK_N: gl.constexpr = wp.shape[1]
    return gl.convert_layout(gl.reshape(logical_rows(wp, REPS, num_warps), [BLOCK_N, BKW // 4, 4]), word_l,
                             assert_trivial=True)


@gluon.jit
def logical_words_batched(wp, word_l: gl.constexpr):
    """:func:`logical_words` in the batched mode, ``[W, word rows, PR]`` -> ``[W, PR, groups, 4]``: in a warp,
    physical ``p = (g * REPS + rep) * 2 + h`` is logical ``l = (rep * 2 + h) * 8 + g``."""
    W: gl.constexpr = wp.shape[0]
    BKW: gl.constexpr = wp.shape[1]
    PR: gl.constexpr = wp.shape[2]
    wl = gl.reshape(gl.permute(gl.reshape(wp, [W, BKW, 8, PR // 16, 2]), (0, 1, 3, 4, 2)), [W, BKW, PR])
    return gl.convert_layout(gl.reshape(gl.permute(wl, (0, 2, 1)), [W, PR, BKW // 4, 4]), word_l, assert_trivial=True)

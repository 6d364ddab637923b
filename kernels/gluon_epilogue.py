"""The Gluon kernels' epilogues (``wgmma`` and ``mma.sync`` accumulators alike): the tile's write, split-K through
the zero-at-rest workspace (atomic adds, grid axis 2), and the serial sum of a tile's K parts through plain scratch
(the ``wgmma`` kernel's one-axis schedules, :func:`~auto_quant.kernels.wgmma_plan.wgmma_schedule`).

Accumulator rows are the kernels' logical operand rows; :func:`_phys_row` maps them to output columns.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.constexpr_function
def store_layout(BLOCK_M, BLOCK_N, num_warps):
    """Eight consecutive output columns (16 bytes) per thread, a warp across the tile's columns."""
    cols = min(BLOCK_N // 8, 32)
    return gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // cols, cols], warps_per_cta=[num_warps, 1],
                            order=[1, 0])


@gluon.jit
def _phys_row(l, REPS: gl.constexpr, W: gl.constexpr):
    """Physical row (within the tile) of logical operand row ``l``."""
    g = l % 8
    h = (l // 8) % 2
    w = (l // 16) % W
    rep = l // (16 * W)
    return h + 2 * rep + 2 * REPS * g + 16 * REPS * w


def split_vector(N: int, split: bool) -> int:
    """``write_tile``'s ``SPLIT`` for a launch: 0 without split-K, else 4 where ``N`` is a multiple of four (a thread
    may add four consecutive output columns at once, a vector then wholly in or out of range), else 1."""
    return 0 if not split else (4 if N % 4 == 0 else 1)


# four consecutive workspace words from a base and a 32-bit word offset: $0 a dummy output; mask, base, offset, values
_RED4 = gl.constexpr("{ .reg .pred p;\n.reg .b64 a;\nmov.b32 $0, 0;\nsetp.ne.b32 p, $1, 0;\n"
                     "mad.wide.u32 a, $3, 4, $2;\n@p red.relaxed.gpu.global.add.v4.f32 [a], {$4, $5, $6, $7};\n}")
# read four consecutive workspace words and zero them (0s where masked): four outputs; mask, base, offset
_TAKE4 = gl.constexpr("{ .reg .pred p;\n.reg .f32 z;\n.reg .b64 a;\nmov.f32 z, 0f00000000;\n"
                      "mov.f32 $0, z;\nmov.f32 $1, z;\nmov.f32 $2, z;\nmov.f32 $3, z;\n"
                      "setp.ne.b32 p, $4, 0;\nmad.wide.u32 a, $6, 4, $5;\n"
                      "@p ld.relaxed.gpu.global.v4.f32 {$0, $1, $2, $3}, [a];\n"
                      "@p st.relaxed.gpu.global.v4.f32 [a], {z, z, z, z};\n}")


@gluon.jit
def _column_quads(acc, REPS: gl.constexpr, num_warps: gl.constexpr):
    """The accumulator ``[BLOCK_N, BLOCK_M]`` (logical rows) as four tensors ``[BLOCK_N / 4, BLOCK_M]``, element
    ``(c, m)`` of tensor ``j`` at physical column ``4 c + j``. With ``REPS >= 2`` a thread's four consecutive physical
    columns (row halves and repetitions, :func:`_phys_row`) are its own registers, so this moves no data."""
    BLOCK_N: gl.constexpr = acc.shape[0]
    BLOCK_M: gl.constexpr = acc.shape[1]
    t = gl.reshape(acc, [REPS, num_warps, 2, 8, BLOCK_M])
    t = gl.reshape(gl.permute(t, (1, 3, 0, 2, 4)), [BLOCK_N // 4, 2, 2, BLOCK_M])  # physical columns, bit 1, bit 0
    e, o = gl.split(gl.permute(t, (0, 3, 1, 2)))  # column bit 0
    v0, v2 = gl.split(e)
    v1, v3 = gl.split(o)
    return v0, v1, v2, v3


@gluon.jit
def write_tile(acc, out_ptr, ws_ptr, cnt_ptr, b_ptr, n0, m0, M, N, stride_om, pid_n, pid_m, REPS: gl.constexpr,
               HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr, num_warps: gl.constexpr):
    """Write the ``[BLOCK_N, BLOCK_M]`` accumulator (logical rows, :func:`_phys_row`) of output rows ``m0..`` and
    columns ``n0..``: directly (``SPLIT`` 0), or with split-K (grid axis 2) through the zero-at-rest workspace, the
    last program of a tile adding the bias and writing the output (``SPLIT``: :func:`split_vector`). Any NVMMA
    accumulator layout (``wgmma`` or ``mma.sync``)."""
    BLOCK_N: gl.constexpr = acc.shape[0]
    BLOCK_M: gl.constexpr = acc.shape[1]
    acc_l: gl.constexpr = acc.type.layout
    # epilogue: acc[l, m] is output (m0 + m, column of l)
    o_cols = n0 + _phys_row(gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_l)), REPS, num_warps)
    o_rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_l))
    c_ok = o_cols < N
    o_mask = gl.expand_dims(c_ok, 1) & gl.expand_dims(o_rows < M, 0)
    o_offs = gl.expand_dims(o_rows, 0) * stride_om + gl.expand_dims(o_cols, 1)
    if SPLIT == 0:
        if HAS_BIAS:
            acc += gl.expand_dims(gl.load(b_ptr + o_cols, mask=c_ok, other=0.0).to(gl.float32), 1)
        # rows back to physical order in registers, then one layout change (through shared memory) to 16-byte
        # stores along the output row: the accumulator layout would scatter 2-byte stores over 8 rows
        res = gl.reshape(acc.to(out_ptr.dtype.element_ty), [REPS, num_warps, 2, 8, BLOCK_M])
        res = gl.reshape(gl.permute(res, (1, 3, 0, 2, 4)), [BLOCK_N, BLOCK_M])
        st_l: gl.constexpr = store_layout(BLOCK_M, BLOCK_N, num_warps)
        res = gl.convert_layout(gl.permute(res, (1, 0)), st_l)  # [BLOCK_M, BLOCK_N], physical columns
        s_cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, st_l))
        s_rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, st_l))
        s_mask = gl.expand_dims(s_rows < M, 1) & gl.expand_dims(s_cols < N, 0)
        gl.store(out_ptr + gl.expand_dims(s_rows, 1) * stride_om + gl.expand_dims(s_cols, 0), res, mask=s_mask)
    else:
        # A thread holding four consecutive columns (REPS >= 2) adds them with one vector reduction, addressed from a
        # 32-bit offset, instead of four atomics with a 64-bit address and a mask each: 1.04-1.24x on the mma tiles of
        # 128 rows on 4 warps at split 8-16, neutral at split 2-4 (H100, docs/bench/kernels.md, session 13). With two
        # columns a thread (REPS 1) a two-wide vector measured 5-12 % slower than the scalar atomics, which stay there.
        QUADS: gl.constexpr = SPLIT == 4 and REPS >= 2
        if QUADS:
            v0, v1, v2, v3 = _column_quads(acc, REPS, num_warps)
            q_l: gl.constexpr = v0.type.layout
            q_cols = n0 + 4 * gl.arange(0, BLOCK_N // 4, layout=gl.SliceLayout(1, q_l))
            q_rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, q_l))
            q_ok = gl.expand_dims(q_cols < N, 1) & gl.expand_dims(q_rows < M, 0)
            q_on = q_ok.to(gl.int32)  # the PTX's predicate
            q_offs = gl.expand_dims(q_rows, 0) * N + gl.expand_dims(q_cols, 1)
            gl.inline_asm_elementwise(_RED4, "=r,r,l,r,f,f,f,f", [q_on, ws_ptr, q_offs, v0, v1, v2, v3],
                                      dtype=gl.int32, is_pure=False, pack=1)
        else:
            w_offs = gl.expand_dims(o_rows, 0) * N + gl.expand_dims(o_cols, 1)
            gl.atomic_add(ws_ptr + w_offs, acc, mask=o_mask, sem="relaxed")
        # the barrier orders every thread's adds before the counter's acq_rel atomic, whose release is cumulative
        # (the split-K semaphore pattern of CUTLASS): one fence per program, not one per thread or per element
        gl.thread_barrier()
        tile = pid_m * gl.num_programs(0) + pid_n
        arrived = gl.atomic_add(cnt_ptr + tile, 1)
        if arrived == gl.num_programs(2) - 1:  # the atomic's acquire orders the reads of the sums after it
            if QUADS:
                tot = gl.inline_asm_elementwise(_TAKE4, "=f,=f,=f,=f,r,l,r", [q_on, ws_ptr, q_offs],
                                                dtype=(gl.float32,) * 4, is_pure=False, pack=1)  # sums, re-zeroed
                q_ptrs = out_ptr + (gl.expand_dims(q_rows, 0) * stride_om + gl.expand_dims(q_cols, 1))
                for j in gl.static_range(4):
                    t = tot[j]
                    if HAS_BIAS:
                        t += gl.expand_dims(gl.load(b_ptr + q_cols + j, mask=q_cols < N, other=0.0).to(gl.float32), 1)
                    gl.store(q_ptrs + j, t.to(out_ptr.dtype.element_ty), mask=q_ok)
            else:
                tot = gl.atomic_xchg(ws_ptr + w_offs, gl.zeros_like(acc), mask=o_mask, sem="relaxed")  # sum, re-zeroed
                if HAS_BIAS:
                    tot += gl.expand_dims(gl.load(b_ptr + o_cols, mask=c_ok, other=0.0).to(gl.float32), 1)
                gl.store(out_ptr + o_offs, tot.to(out_ptr.dtype.element_ty), mask=o_mask)
            gl.atomic_xchg(cnt_ptr + tile, 0)


@gluon.jit
def serial_sum(acc, scr_ptr, cnt_ptr, part, parts):
    """One of a tile's ``parts`` K-range partials: stored (plain stores, in the accumulator's own layout) to slot
    ``part`` of the tile's scratch ``scr_ptr [parts, BLOCK_N, BLOCK_M]``; the tile's last program to arrive at its
    counter ``cnt_ptr`` adds the other parts (read from L2) and returns ``(sum, True)``, resetting the counter; the
    others return ``(acc, False)``. No atomics on the data: the atomic split-K epilogue costs more at 1024 rows."""
    BLOCK_N: gl.constexpr = acc.shape[0]
    BLOCK_M: gl.constexpr = acc.shape[1]
    acc_l: gl.constexpr = acc.type.layout
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_l))
    cols = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_l))
    offs = gl.expand_dims(rows, 1) * BLOCK_M + gl.expand_dims(cols, 0)
    gl.store(scr_ptr + part * (BLOCK_N * BLOCK_M) + offs, acc)
    # every thread's stores, then the counter's acq_rel atomic (cumulative release; write_tile's pattern)
    gl.thread_barrier()
    arrived = gl.atomic_add(cnt_ptr, 1)
    last = arrived == parts - 1
    if last:  # the acquire orders these reads after the other parts' stores; .cg reads them from L2
        # a thread's two adjacent columns split into halves read one after the other: a whole partial read at once
        # next to the accumulator (8 warps, 256 x 128: 128 + 128 registers a thread) spilled inside the stream-K loop
        lo, hi = gl.split(gl.reshape(acc, [BLOCK_N, BLOCK_M // 2, 2]))
        o_lo, o_hi = gl.split(gl.reshape(offs, [BLOCK_N, BLOCK_M // 2, 2]))
        for j in range(parts):
            if j != part:
                lo += gl.load(scr_ptr + j * (BLOCK_N * BLOCK_M) + o_lo, cache_modifier=".cg")
        for j in range(parts):
            if j != part:
                hi += gl.load(scr_ptr + j * (BLOCK_N * BLOCK_M) + o_hi, cache_modifier=".cg")
        acc = gl.convert_layout(gl.reshape(gl.join(lo, hi), [BLOCK_N, BLOCK_M]), acc_l, assert_trivial=True)
        gl.atomic_xchg(cnt_ptr, 0)
    return acc, last

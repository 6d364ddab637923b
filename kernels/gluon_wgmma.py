"""Gluon kernel for Hopper (sm_90): ``y^T[N, M] = W[N, K] @ x^T[K, M]`` at 2, 4 and 8 bits, the dequantized weight
built directly in the register layout of ``wgmma``'s left operand.

Why Gluon: the Triton kernel (:mod:`~auto_quant.kernels.triton_qmm_wt`) leaves the layouts to the compiler,
which makes the dequantized tile in a blocked layout and then moves it through shared memory into the
operand layout (a store, a barrier and a matrix load per tile); and Triton 3.6's pipeline lets the next
tile's operand overwrite registers a pending ``wgmma`` is still reading (triton-lang/triton#9433), so that
kernel waits for every ``wgmma`` before dequantizing. Here every layout is explicit:

* **Operand layout.** In ``wgmma``'s register operand (16-bit types) lane ``4g + t`` of a warp holds rows
  ``g`` and ``g + 8`` and, per 16 inputs, inputs ``2t, 2t+1, 2t+8, 2t+9``; across the 8 inputs of a packed
  word that is byte ``t`` (two codes) of every word. So the four lanes of a quad read the same words
  (one load serves them, the layout broadcasts it over those two lane bits) and each keeps its own byte:
  ``prmt`` moves the byte to the bottom, a multiply by 4097 copies it 12 bits up, ``lop3`` keeps one
  code per 16-bit half and ORs in the exponent (``magic + code``, exact); subtracting ``magic + zero`` and
  multiplying by the scale are one ``add`` and one ``mul`` on the pair. No shared-memory round trip. 2 and 8
  bits take other parts of a word (:func:`operand_layouts`, :func:`dequant_asm`).
* **Row order.** A thread's rows (``g``, ``g + 8``, and the same 64 or 128 rows further) are made
  adjacent in the packed words it loads (one 8- or 16-byte shared load per word row): the tile's logical
  row ``l`` is physical row :func:`_phys_row` ``(l)``; the epilogue writes each row to its physical column.
* **Pipeline.** The packed words and the activations arrive by TMA in a ring of ``STAGES`` slots. The
  next tile is dequantized while the last ``wgmma`` runs; its operand registers stay alive until
  ``warpgroup_mma_wait(1)`` has retired that ``wgmma`` (they are the wait's dependencies), which is the
  ordering #9433 lacked. The loop body holds two tiles (see the comment there: a one-tile body was wrong on
  the GPU).
* Split-K over grid axis 2 adds fp32 partials into a zero-at-rest workspace; the last program of a tile
  reads and re-zeroes it with ``atomic_xchg``, adds the bias and writes the output.

The packed layout is :mod:`~auto_quant.kernels.pack`'s (``[K/PER, N]`` int32, ``PER = 32 / bits`` codes in input
order), shared with every other kernel. Scales ``[G, N]``, zero points ``[G, N]`` uint8 (or the symmetric
``2**(bits-1)``); one group per tile (``group_size % BLOCK_K == 0``) or per-channel.
"""

from __future__ import annotations

import functools

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from auto_quant.kernels.compile_ahead import kernel_call
from auto_quant.kernels.pack import codes_per_row
from auto_quant.kernels.wgmma_plan import WGMMA_BITS


@gluon.constexpr_function
def operand_layouts(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, BITS):
    """(accumulator layout, left-operand layout, the ``[BLOCK_N, words, lanes]`` layout of the dequantization,
    the ``[words, BLOCK_N]`` load layout of the packed words in physical row order, the ``[words, BLOCK_N / 2]``
    load layout of 3-bit weights' high words). ``BITS``: of the packed words (2 for 3-bit weights).

    Per 16 inputs lane ``4g + t`` needs inputs ``2t, 2t+1, 2t+8, 2t+9`` of its rows. At 4 bits (8 inputs a word)
    that is byte ``t`` of every word; at 2 bits (16 a word) the ``t``-th nibble of each half-word; at 8 bits (4 a
    word) half-word ``t % 2`` of the words ``2j + t // 2``. The last axis is the part of a word a lane takes
    (4 bytes, 4 nibble pairs, 2 half-words): lanes that share a word get the same load (a broadcast)."""
    reps = BLOCK_N // (16 * num_warps)
    acc = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_M, 16])
    a = gl.DotOperandLayout(operand_index=0, parent=acc, k_width=2)
    bkw = BLOCK_K // (32 // BITS)
    nb = bkw.bit_length() - 1
    rows = [[16 * num_warps << i, 0, 0] for i in range(reps.bit_length() - 1)]
    g = [[1, 0, 0], [2, 0, 0], [4, 0, 0]]
    warp = [[16 << i, 0, 0] for i in range(num_warps.bit_length() - 1)]
    # physical row p = h + 2 rep + 2 reps g + 16 reps w: a thread's rows are adjacent in the packed words
    lrows = [[0, 1]] + [[0, 2 << i] for i in range(reps.bit_length() - 1)]
    lg = [[0, (2 * reps) << i] for i in range(3)]
    lwarp = [[0, (16 * reps) << i] for i in range(num_warps.bit_length() - 1)]
    # 3-bit high words (a word per column pair): the words' load without the thread's column-pair bit
    hload = gl.DistributedLinearLayout(
        reg_bases=[[0, 1 << i] for i in range(reps.bit_length() - 1)] + [[1 << i, 0] for i in range(nb)],
        lane_bases=[[0, 0], [0, 0]] + [[0, reps << i] for i in range(3)],
        warp_bases=[[0, (8 * reps) << i] for i in range(num_warps.bit_length() - 1)], block_bases=[],
        shape=[bkw, BLOCK_N // 2])
    if BITS == 8:  # lane bit 1 picks the word of a pair, lane bit 0 the half-word
        deq = gl.DistributedLinearLayout(
            reg_bases=[[8, 0, 0]] + [[0, 2 << i, 0] for i in range(nb - 1)] + rows,
            lane_bases=[[0, 0, 1], [0, 1, 0]] + g, warp_bases=warp, block_bases=[], shape=[BLOCK_N, bkw, 2])
        load = gl.DistributedLinearLayout(
            reg_bases=lrows + [[2 << i, 0] for i in range(nb - 1)], lane_bases=[[0, 0], [1, 0]] + lg,
            warp_bases=lwarp, block_bases=[], shape=[bkw, BLOCK_N])
    else:  # the four lanes of a quad share every word
        deq = gl.DistributedLinearLayout(
            reg_bases=[[8, 0, 0]] + [[0, 1 << i, 0] for i in range(nb)] + rows,
            lane_bases=[[0, 0, 1], [0, 0, 2]] + g, warp_bases=warp, block_bases=[], shape=[BLOCK_N, bkw, 4])
        load = gl.DistributedLinearLayout(
            reg_bases=lrows + [[1 << i, 0] for i in range(nb)], lane_bases=[[0, 0], [0, 0]] + lg,
            warp_bases=lwarp, block_bases=[], shape=[bkw, BLOCK_N])
    return acc, a, deq, load, hload


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


@gluon.jit
def _pair(v, ACT_FP16: gl.constexpr):
    """``v`` (float32) rounded to the activation dtype, twice in one b32."""
    if ACT_FP16:
        h = v.to(gl.float16)
        return gl.inline_asm_elementwise("mov.b32 $0, {$1, $1};", "=r,h", [h], dtype=gl.int32, is_pure=True, pack=1)
    else:
        h = v.to(gl.bfloat16)
        return gl.inline_asm_elementwise("mov.b32 $0, {$1, $1};", "=r,h", [h], dtype=gl.int32, is_pure=True, pack=1)


@gluon.constexpr_function
def dequant_asm(BITS, ACT_FP16):
    """PTX for one packed word and this lane's part of it: ``(code - zero) * scale`` as b32 pairs of the
    activation dtype, every intermediate exact until the one rounding of the scale multiply. Inputs after the
    outputs: the word, the lane's selector (a ``prmt`` selector, or a shift at 2 and 3 bits), ``-(magic + zero)`` and
    the scale, each as a pair; at 3 bits then the word's high word (:func:`~auto_quant.kernels.pack.pack_high_bits`,
    the odd column's shifted down one bit)."""
    h = "f16x2" if ACT_FP16 else "bf16x2"
    magic = "0x64006400" if ACT_FP16 else "0x43004300"
    if BITS == 4:  # byte t: prmt it down, copy it 12 bits up, keep one code per half under the exponent
        return ("{ .reg .b32 t;\n"
                "prmt.b32 t, $2, 0, $3;\n"
                "mul.lo.u32 t, t, 4097;\n"
                f"lop3.b32 t, t, 0x000F000F, {magic}, 0xEA;\n"
                f"add.rn.{h} t, t, $4;\n"
                f"mul.rn.{h} t, t, $5;\n"
                "mov.b32 {$0, $1}, t; }")
    if BITS == 2 or BITS == 3:  # nibble t of each half-word: two codes each, split 14 bits apart by a multiply by
        # 0x4001; at 3 bits each code's third bit comes from the high word rotated by the same shift, which puts the
        # third bits of codes 2t, 2t+1, 2t+8, 2t+9 at bits 2, 4, 18, 20: the same multiply lifts them beside the codes
        third = BITS == 3
        lines = ["{ .reg .b32 t, a, b, h, g;" if third else "{ .reg .b32 t, a, b;", "shr.b32 t, $4, $5;"]
        if third:
            lines.append("shf.r.wrap.b32 h, $8, $8, $5;")
        for r in ("a", "b"):
            lines += ["and.b32 a, t, 15;"] if r == "a" else ["shr.b32 b, t, 16;", "and.b32 b, b, 15;"]
            lines += [f"mul.lo.u32 {r}, {r}, 16385;", f"lop3.b32 {r}, {r}, 0x00030003, {magic}, 0xEA;"]
            if third:
                lines += ["and.b32 g, h, 0x14;"] if r == "a" else ["shr.b32 g, h, 16;", "and.b32 g, g, 0x14;"]
                lines += ["mul.lo.u32 g, g, 16385;", f"lop3.b32 {r}, {r}, g, 0x00040004, 0xF8;"]
        return "\n".join(lines + [f"add.rn.{h} a, a, $6;", f"mul.rn.{h} a, a, $7;", f"add.rn.{h} b, b, $6;",
                                  f"mul.rn.{h} b, b, $7;", "mov.b32 {$0, $1}, a;", "mov.b32 {$2, $3}, b; }"])
    if ACT_FP16:  # 8 bits, fp16: each byte under the exponent byte 0x64 (1024 + code)
        return ("{ .reg .b32 t;\n"
                "prmt.b32 t, $2, 0x64, $3;\n"
                "add.rn.f16x2 t, t, $4;\n"
                "mul.rn.f16x2 t, t, $5;\n"
                "mov.b32 {$0, $1}, t; }")
    # 8 bits, bf16 (integers exact only up to 256, so 128 + zero is not): each nibble under the exponent, less
    # 128, then 16 * high + low = code, then code - zero (the zero pair is -zero here), every step exact
    return ("{ .reg .b32 t, u, c;\n"
            "prmt.b32 t, $2, 0, $3;\n"
            "shr.b32 u, t, 4;\n"
            "lop3.b32 t, t, 0x000F000F, 0x43004300, 0xEA;\n"
            "lop3.b32 u, u, 0x000F000F, 0x43004300, 0xEA;\n"
            "mov.b32 c, 0xC300C300;\n"
            "add.rn.bf16x2 u, u, c;\n"
            "add.rn.bf16x2 t, t, c;\n"
            "mov.b32 c, 0x41804180;\n"
            "fma.rn.bf16x2 t, u, c, t;\n"
            "add.rn.bf16x2 t, t, $4;\n"
            "mul.rn.bf16x2 t, t, $5;\n"
            "mov.b32 {$0, $1}, t; }")


@gluon.constexpr_function
def lane_selector(BITS):
    """Per lane part ``i`` of a word, the selector the PTX takes: a ``prmt`` selector (byte ``i`` down, zeros
    elsewhere; at 8 bits half-word ``i`` into both halves' low bytes) or, at 2 bits, a shift."""
    return {4: (1, 0x4440), 2: (4, 0), 3: (4, 0), 8: (0x0202, 0x4140)}[BITS]


@gluon.jit
def _dequant(words, sel, zz, ss, BITS: gl.constexpr, ACT_FP16: gl.constexpr, hwords):
    """The ``[BLOCK_N, BLOCK_K]`` dequantized tile, inputs in order, from the ``[BLOCK_N, words, 1]`` packed words
    (at 3 bits the 2-bit plane's, with their high words ``hwords``; other widths ignore them)."""
    BN: gl.constexpr = words.shape[0]
    BKW: gl.constexpr = words.shape[1]
    ASM: gl.constexpr = dequant_asm(BITS, ACT_FP16)
    if BITS == 2 or BITS == 3:
        CONS: gl.constexpr = "=h,=h,=h,=h,r,r,r,r,r" if BITS == 3 else "=h,=h,=h,=h,r,r,r,r"
        if BITS == 3:
            args = [words, sel, zz, ss, hwords]
        else:
            args = [words, sel, zz, ss]
        if ACT_FP16:
            a0, a1, b0, b1 = gl.inline_asm_elementwise(ASM, CONS, args, dtype=(gl.float16,) * 4, is_pure=True, pack=1)
        else:
            a0, a1, b0, b1 = gl.inline_asm_elementwise(ASM, CONS, args, dtype=(gl.bfloat16,) * 4, is_pure=True,
                                                       pack=1)
        t = gl.join(gl.join(a0, a1), gl.join(b0, b1))  # [BN, BKW, 4 (lane), 2 (input), 2 (half-word)]
        tile = gl.reshape(gl.permute(t, (0, 1, 4, 2, 3)), [BN, BKW * 16])
    else:
        if ACT_FP16:
            lo, hi = gl.inline_asm_elementwise(ASM, "=h,=h,r,r,r,r", [words, sel, zz, ss],
                                               dtype=(gl.float16, gl.float16), is_pure=True, pack=1)
        else:
            lo, hi = gl.inline_asm_elementwise(ASM, "=h,=h,r,r,r,r", [words, sel, zz, ss],
                                               dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
        tile = gl.reshape(gl.join(lo, hi), [BN, BKW * (32 // BITS)])
    return tile


@gluon.jit
def _tile_scales(s_ptr, z_ptr, cols, col_ok, N, k_lo, t, n_tiles, GROUP: gl.constexpr, HAS_ZERO: gl.constexpr,
                 BLOCK_K: gl.constexpr):
    """Tile ``t``'s scales and zero points as loaded (a tile past the last re-reads the last one's): issued a tile
    ahead of their use, so that their latency hides behind a tile's dequantization and ``wgmma``."""
    k0 = k_lo + gl.minimum(t, n_tiles - 1) * BLOCK_K
    g = 0 if GROUP == 0 else k0 // GROUP
    sc = gl.load(s_ptr + g * N + cols, mask=col_ok, other=0.0)
    zp = sc
    if HAS_ZERO:
        zp = gl.load(z_ptr + g * N + cols, mask=col_ok, other=0)
    return sc, zp


@gluon.jit
def logical_rows(wp, REPS: gl.constexpr, num_warps: gl.constexpr):
    """``[words, BLOCK_N]`` in physical row order -> ``[BLOCK_N, words]`` in logical row order (the inverse of
    :func:`_phys_row`; no data moves once converted to the caller's layout): physical
    ``p = ((w * 8 + g) * REPS + rep) * 2 + h`` is logical ``l = ((rep * W + w) * 2 + h) * 8 + g``."""
    BKW: gl.constexpr = wp.shape[0]
    BLOCK_N: gl.constexpr = wp.shape[1]
    wl = gl.reshape(wp, [BKW, num_warps, 8, REPS, 2])
    wl = gl.reshape(gl.permute(wl, (0, 3, 1, 4, 2)), [BKW, BLOCK_N])
    return gl.permute(wl, (1, 0))


@gluon.jit
def _operand(w_smem, h_smem, bars, scz, sel, zz, t, a_l: gl.constexpr, load_l: gl.constexpr, word_l: gl.constexpr,
             hload_l: gl.constexpr, HAS_ZERO: gl.constexpr, ACT_FP16: gl.constexpr, MAGIC: gl.constexpr,
             STAGES: gl.constexpr, BLOCK_K: gl.constexpr, BITS: gl.constexpr, num_warps: gl.constexpr):
    """Tile ``t``'s dequantized weight in the left-operand layout (waits for the tile's TMA copies); ``scz``: its
    scales and zero points (:func:`_tile_scales`). 3 bits: ``h_smem`` holds the tiles' high words, one per column
    pair, expanded here to one per column (the odd column's shifted down one bit)."""
    BLOCK_N: gl.constexpr = w_smem.shape[2]
    REPS: gl.constexpr = BLOCK_N // (16 * num_warps)
    s = t % STAGES
    sc, zp = scz
    ss = gl.expand_dims(gl.expand_dims(_pair(sc.to(gl.float32), ACT_FP16), 1), 2)
    if HAS_ZERO:
        zz = gl.expand_dims(gl.expand_dims(_pair(-(zp.to(gl.float32) + MAGIC), ACT_FP16), 1), 2)
    mbarrier.wait(bars.index(s), (t // STAGES) & 1)
    wp = w_smem.index(s).load(load_l)  # [BKW, BLOCK_N], physical rows
    words = gl.convert_layout(logical_rows(wp, REPS, num_warps), word_l, assert_trivial=True)
    hwords = words
    if BITS == 3:
        hp = h_smem.index(s).load(hload_l)  # [BKW, BLOCK_N / 2]
        hx = gl.reshape(gl.join(hp, hp >> 1), [hp.shape[0], BLOCK_N])
        hx = gl.convert_layout(hx, load_l, assert_trivial=True)
        hwords = gl.convert_layout(logical_rows(hx, REPS, num_warps), word_l, assert_trivial=True)
    a = _dequant(gl.expand_dims(words, 2), sel, zz, ss, BITS, ACT_FP16, gl.expand_dims(hwords, 2))
    return gl.convert_layout(a, a_l, assert_trivial=True)


@gluon.jit
def _copy_tile(w_desc, x_desc, h_desc, w_smem, x_smem, h_smem, bars, n0, m0, k_lo, i, BLOCK_K: gl.constexpr,
               BITS: gl.constexpr, STAGES: gl.constexpr):
    """Start the TMA copies of tile ``i`` into its slot: the packed words, the activations and at 3 bits the high
    words."""
    PER: gl.constexpr = 16 if BITS == 3 else 32 // BITS
    ns = i % STAGES
    if BITS == 3:
        mbarrier.expect(bars.index(ns), w_desc.block_type.nbytes + x_desc.block_type.nbytes + h_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(h_desc, [(k_lo + i * BLOCK_K) // PER, n0 // 2], bars.index(ns),
                                        h_smem.index(ns))
    else:
        mbarrier.expect(bars.index(ns), w_desc.block_type.nbytes + x_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(w_desc, [(k_lo + i * BLOCK_K) // PER, n0], bars.index(ns), w_smem.index(ns))
    tma.async_copy_global_to_shared(x_desc, [m0, k_lo + i * BLOCK_K], bars.index(ns), x_smem.index(ns))


@gluon.jit
def _refill(w_desc, x_desc, h_desc, w_smem, x_smem, h_smem, bars, n0, m0, k_lo, t, n_tiles, STAGES: gl.constexpr,
            BLOCK_K: gl.constexpr, BITS: gl.constexpr, num_warps: gl.constexpr):
    """After tile ``t - 1``'s wgmma retired: copy tile ``t + STAGES - 1`` into its slot."""
    if num_warps > 4:  # both warpgroups are past their wait
        gl.thread_barrier()
    nxt = t + STAGES - 1
    if nxt < n_tiles:
        _copy_tile(w_desc, x_desc, h_desc, w_smem, x_smem, h_smem, bars, n0, m0, k_lo, nxt, BLOCK_K, BITS, STAGES)


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


@gluon.jit(do_not_specialize=["M"])  # one compile serves every row count of a bucket
def _qmm_wgmma_kernel(
    x_desc, w_desc, h_desc, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_om, k_per_split,
    BITS: gl.constexpr, GROUP: gl.constexpr, HAS_ZERO: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT: gl.constexpr,
    ACT_FP16: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
):
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[1]
    REPS: gl.constexpr = BLOCK_N // (16 * num_warps)
    # the zero pair is -(MAGIC + zero): the exponent trick's base plus the zero point, exact in the activation dtype
    # (bf16 8-bit codes are rebuilt from nibbles without a base, and 128 + zero would not be exact there)
    MAGIC: gl.constexpr = 1024.0 if ACT_FP16 else (0.0 if BITS == 8 else 128.0)
    # 3 bits: the packed words are the 2-bit plane's (PB = 2), h_desc the high words of column pairs
    PB: gl.constexpr = 2 if BITS == 3 else BITS
    acc_l: gl.constexpr = operand_layouts(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, PB)[0]
    a_l: gl.constexpr = operand_layouts(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, PB)[1]
    deq_l: gl.constexpr = operand_layouts(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, PB)[2]
    load_l: gl.constexpr = operand_layouts(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, PB)[3]
    hload_l: gl.constexpr = operand_layouts(BLOCK_N, BLOCK_M, BLOCK_K, num_warps, PB)[4]
    word_l: gl.constexpr = gl.SliceLayout(2, deq_l)
    row_l: gl.constexpr = gl.SliceLayout(1, word_l)

    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    pid_k = gl.program_id(2)
    n0 = pid_n * BLOCK_N
    m0 = pid_m * BLOCK_M
    k_lo = pid_k * k_per_split
    k_hi = gl.minimum(k_lo + k_per_split, K)
    n_tiles = gl.cdiv(k_hi - k_lo, BLOCK_K)

    # per-thread constants: the byte selector (lane % 4 into byte 0, zeros elsewhere), the rows' columns
    PARTS: gl.constexpr = 2 if BITS == 8 else 4
    SEL_MUL: gl.constexpr = lane_selector(BITS)[0]
    SEL_ADD: gl.constexpr = lane_selector(BITS)[1]
    part = gl.arange(0, PARTS, layout=gl.SliceLayout(0, gl.SliceLayout(0, deq_l))) * SEL_MUL + SEL_ADD
    sel = gl.expand_dims(gl.expand_dims(part, 0), 0)
    cols = n0 + _phys_row(gl.arange(0, BLOCK_N, layout=row_l), REPS, num_warps)
    col_ok = cols < N
    if HAS_ZERO:
        zz = 0  # per tile, in _operand
    else:
        zz = _pair(gl.full([BLOCK_N], -(MAGIC + (1 << (BITS - 1))), gl.float32, row_l), ACT_FP16)
        zz = gl.expand_dims(gl.expand_dims(zz, 1), 2)

    w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    h_smem = w_smem
    if BITS == 3:
        h_smem = gl.allocate_shared_memory(h_desc.dtype, [STAGES] + h_desc.block_type.shape, h_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()
    for i in gl.static_range(STAGES - 1):
        if i < n_tiles:
            _copy_tile(w_desc, x_desc, h_desc, w_smem, x_smem, h_smem, bars, n0, m0, k_lo, i, BLOCK_K, BITS, STAGES)

    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=acc_l)
    # Two tiles per iteration, each with its own operand value: an operand carried round the loop would be
    # copied into other registers for the wait's dependency while the wgmma still reads the originals, and the
    # next tile's operand could then be built there (seen on the H100: wrong tiles whenever two programs
    # shared a multiprocessor). Here a1 is only redefined after the wait that retired its wgmma.
    a1 = gl.zeros([BLOCK_N, BLOCK_K], gl.float16 if ACT_FP16 else gl.bfloat16, layout=a_l)
    # each tile's scales (and zero points) are loaded two tiles ahead, both of an iteration's at its top (the copies
    # into the loop-carried registers at its end wait for them): read just before the dequantization, their latency
    # from L2 stalled every tile (Nsight Compute: the only global loads of the loop); one tile ahead still left 13 %
    # of the one-warpgroup tile's stall samples at 1024 rows on the conversion of the scale (session 18)
    sz_a = _tile_scales(s_ptr, z_ptr, cols, col_ok, N, k_lo, 0, n_tiles, GROUP, HAS_ZERO, BLOCK_K)
    sz_b = _tile_scales(s_ptr, z_ptr, cols, col_ok, N, k_lo, 1, n_tiles, GROUP, HAS_ZERO, BLOCK_K)
    for t2 in range(n_tiles // 2):
        t = 2 * t2
        sz_c = _tile_scales(s_ptr, z_ptr, cols, col_ok, N, k_lo, t + 2, n_tiles, GROUP, HAS_ZERO, BLOCK_K)
        sz_d = _tile_scales(s_ptr, z_ptr, cols, col_ok, N, k_lo, t + 3, n_tiles, GROUP, HAS_ZERO, BLOCK_K)
        a0 = _operand(w_smem, h_smem, bars, sz_a, sel, zz, t, a_l, load_l, word_l, hload_l,
                      HAS_ZERO, ACT_FP16, MAGIC, STAGES, BLOCK_K, BITS, num_warps)
        acc = warpgroup_mma(a0, x_smem.index(t % STAGES).permute((1, 0)), acc, is_async=True)
        acc, a1 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a1))
        _refill(w_desc, x_desc, h_desc, w_smem, x_smem, h_smem, bars,
                n0, m0, k_lo, t, n_tiles, STAGES, BLOCK_K, BITS, num_warps)
        a1 = _operand(w_smem, h_smem, bars, sz_b, sel, zz, t + 1, a_l, load_l, word_l, hload_l,
                      HAS_ZERO, ACT_FP16, MAGIC, STAGES, BLOCK_K, BITS, num_warps)
        acc = warpgroup_mma(a1, x_smem.index((t + 1) % STAGES).permute((1, 0)), acc, is_async=True)
        acc, a0 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a0))
        _refill(w_desc, x_desc, h_desc, w_smem, x_smem, h_smem, bars,
                n0, m0, k_lo, t + 1, n_tiles, STAGES, BLOCK_K, BITS, num_warps)
        sz_a = sz_c
        sz_b = sz_d
    if n_tiles % 2:
        t = n_tiles - 1
        a0 = _operand(w_smem, h_smem, bars, sz_a, sel, zz, t, a_l, load_l, word_l, hload_l,
                      HAS_ZERO, ACT_FP16, MAGIC, STAGES, BLOCK_K, BITS, num_warps)
        acc = warpgroup_mma(a0, x_smem.index(t % STAGES).permute((1, 0)), acc, is_async=True)
        acc, a1 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a1))
        acc, a0 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a0))
    acc, a1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a1))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    write_tile(acc, out_ptr, ws_ptr, cnt_ptr, b_ptr, n0, m0, M, N, stride_om, pid_n, pid_m, REPS, HAS_BIAS, SPLIT,
               num_warps)


@functools.cache
def shared_layouts(block_m: int, block_n: int, block_k: int, act_fp16: bool):
    """NVMMA shared layouts of the activation tile (swizzled, ``wgmma`` reads it) and of the packed words
    (unswizzled: only plain shared loads read it)."""
    x_l = gl.NVMMASharedLayout.get_default_for([block_m, block_k], gl.float16 if act_fp16 else gl.bfloat16)
    w_l = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    return x_l, w_l



def launch_wgmma(x2, w, bias, cfg, ws, compile_only=False, record=None):
    """Run the kernel on ``x2 [M, K]`` (contiguous rows, fp16/bf16, CUDA sm_90) for a 2-, 3-, 4- or 8-bit
    ``KernelWeight``. ``compile_only``: compile, do not run. ``record``: a
    :class:`~auto_quant.kernels.bound_launch.LaunchRecord` the launch appends to."""
    import torch

    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    M, K = x2.shape
    N = w.out_features
    if w.bits not in WGMMA_BITS:
        raise ValueError(f"the wgmma kernel serves {WGMMA_BITS}-bit weights, not {w.bits} bits")
    if w.group_size != -1 and w.group_size % cfg.block_k:
        raise ValueError(f"the wgmma kernel needs one group per tile: group size {w.group_size}, "
                         f"block_k {cfg.block_k}")
    if x2.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the wgmma kernel takes fp16/bf16 activations, not {x2.dtype}")
    if K % 8 or N % (8 if w.bits == 3 else 4):
        raise ValueError("the wgmma kernel's TMA copies need in_features % 8 == 0 and out_features % 4 == 0 (3 bits: "
                         f"% 8, the high words' rows of N / 2 words), not {K} and {N}")
    if x2.stride(1) != 1 or (x2.stride(0) * x2.element_size()) % 16 or x2.data_ptr() % 16:
        x2 = x2.clone(memory_format=torch.contiguous_format)  # TMA needs 16-byte aligned rows: a fresh copy
    act_fp16 = x2.dtype == torch.float16
    x_l, w_l = shared_layouts(cfg.block_m, cfg.block_n, cfg.block_k, act_fp16)
    x_desc = TensorDescriptor(x2, [M, K], [x2.stride(0), 1], [cfg.block_m, cfg.block_k], x_l)
    per = codes_per_row(w.bits)
    w_desc = TensorDescriptor(w.qweight, [w.qweight.shape[0], N], [N, 1], [cfg.block_k // per, cfg.block_n], w_l)
    h_desc = w_desc
    if w.bits == 3:  # the high words, a word per 16 inputs and column pair
        hq = w.qweight_hi
        h_desc = TensorDescriptor(hq, list(hq.shape), [hq.shape[1], 1], [cfg.block_k // per, cfg.block_n // 2], w_l)
    k_per_split = triton.cdiv(triton.cdiv(K, cfg.split_k), cfg.block_k) * cfg.block_k
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m), triton.cdiv(K, k_per_split))
    acc, cnt = ws.get(x2.device, M * N, grid[0] * grid[1]) if grid[2] > 1 else (out, out)
    kernel_call(_qmm_wgmma_kernel, grid, compile_only, record)(
        x_desc, w_desc, h_desc, w.scales, w.zeros if w.zeros is not None else w.scales,
        bias if bias is not None else out, out, acc, cnt, M, N, K, out.stride(0), k_per_split,
        GROUP=0 if w.group_size == -1 else w.group_size, HAS_ZERO=w.zeros is not None, HAS_BIAS=bias is not None,
        BITS=w.bits, SPLIT=split_vector(N, grid[2] > 1), ACT_FP16=act_fp16, STAGES=cfg.num_stages,
        num_warps=cfg.num_warps,
    )
    return out

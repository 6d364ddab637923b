"""The Gluon ``mma`` kernel without a GPU: its sm_90 compile, its layouts' row and input bookkeeping, and where the
dispatcher offers it. The numbers are checked on the GPU in test_kernels_mma_gpu.py.
"""

from __future__ import annotations

import re

import pytest
import torch
from gluon_helpers import fake_sm90, run_triton_nvidia_tool, thread_coords

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon.language.nvidia.ampere")


def _compile(act="bf16", sym=True, group=128, bm=8, bn=128, bk=128, warps=4, split=True, bits=4, even=True,
             stages=2, slices=1, pdl=False, batched=False, one_row=False):
    """Compile for sm_90 with Triton's bundled ptxas (no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from auto_quant.kernels import gluon_mma as m

    sig = {"x_ptr": f"*{act}", "qw_ptr": "*i32", "qh_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "b_ptr": f"*{act}",
           "out_ptr": f"*{act}", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M_rows": "i32", "N": "i32", "K": "i32",
           "stride_xm": "i32", "stride_om": "i32", "k_range": "i32"}
    const = dict(BITS=bits, GROUP=group, HAS_ZERO=not sym, HAS_BIAS=True, SPLIT=m.split_vector(4096, split),
                 ACT_FP16=act == "fp16", EVEN_N=even, EVEN_K=even, BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, STAGES=stages,
                 SLICES=slices, BATCHED=batched, PDL=pdl, ONE_ROW=one_row, num_warps=warps)
    sig |= {k: "constexpr" for k in const}
    keys = list(sig)
    div = [k for k in sig if sig[k] != "constexpr" and k not in ("M_rows",)]
    src = GluonASTSource(m._qmm_mma_kernel, sig, constexprs={(keys.index(k),): v for k, v in const.items()},
                         attrs={(keys.index(a),): [["tt.divisibility", 16]] for a in div})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))


@pytest.mark.parametrize("bits,act,sym,group,bm,bn,bk,warps,split,even", [
    (4, "bf16", True, 128, 8, 128, 128, 4, True, True), (4, "fp16", False, 0, 16, 64, 256, 4, False, False),
    (4, "bf16", False, 32, 8, 32, 32, 2, True, True), (2, "bf16", True, 64, 16, 256, 64, 8, False, True),
    (2, "fp16", False, 128, 8, 64, 128, 4, True, False), (8, "bf16", True, 128, 8, 128, 128, 4, True, True),
    (8, "bf16", False, 0, 16, 64, 16, 2, False, False), (8, "fp16", True, 32, 8, 128, 32, 8, True, True),
    (3, "bf16", True, 128, 8, 128, 128, 4, True, True), (3, "fp16", False, 64, 16, 64, 64, 4, False, False),
])
def test_mma_compiles_for_sm90(bits, act, sym, group, bm, bn, bk, warps, split, even):
    """mma.sync with float32 accumulation, the operands built in registers (no shared memory before the split-K
    epilogue; without split-K the output tile goes through it), vector weight loads when the columns fill the
    tiles, and the bit width's unpacking."""
    ck = _compile(act, sym, group, bm, bn, bk, warps, split, bits, even)
    ptx = ck.asm["ptx"]
    h = "bf16" if act == "bf16" else "f16"
    assert re.search(rf"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.{h}\.{h}\.f32", ptx)
    if split:  # up to the split-K epilogue's atomics (whose tile counter goes through shared memory)
        loop = ptx.split("atom.")[0]
        assert "st.shared" not in loop and "ld.shared" not in loop and "ldmatrix" not in loop
    if even:
        assert "ld.global.v4.b32" in ptx or "ld.global.v2.b32" in ptx
    assert "prmt.b32" in ptx  # the activation pairs
    if bits == 8 and act == "bf16":  # each byte under the float32 2**23, less 2**23 + zero, two into one bf16x2
        assert "cvt.rn.bf16x2.f32" in ptx
    elif bits == 8:
        assert "add.rn.f16x2" in ptx
    else:
        assert "lop3.b32" in ptx and f"fma.rn.{h}x2" in ptx
    # 3 bits: the high words rotated into place (a right shift would lose the last code's bit)
    assert ("shf.r.wrap.b32" in ptx) == (bits == 3)


@pytest.mark.parametrize("bits,act,sym,group,rows,bk,warps,stages", [
    (4, "bf16", True, 128, 16, 128, 8, 2), (4, "bf16", False, 128, 32, 128, 8, 3),
    (4, "fp16", True, 0, 32, 128, 4, 2), (2, "bf16", True, 64, 16, 64, 8, 2),
    (8, "bf16", False, 32, 16, 32, 2, 2), (8, "fp16", True, 128, 32, 128, 4, 3), (3, "bf16", False, 128, 16, 128, 8, 2),
])
def test_mma_kw_compiles_for_sm90(bits, act, sym, group, rows, bk, warps, stages):
    """Warps splitting K (``mma_kw``): the same register operands and mma.sync, vector loads of the words and of the
    activations (whole slices), and one sum over the slices through shared memory at the end, none in the loop and
    no atomics."""
    ck = _compile(act, sym, group, 8, rows * warps, bk, warps, False, bits, True, stages, slices=warps)
    ptx = ck.asm["ptx"]
    h = "bf16" if act == "bf16" else "f16"
    assert re.search(rf"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.{h}\.{h}\.f32", ptx)
    loop = ptx.split("st.shared")[0]
    assert "ld.shared" not in loop and "ldmatrix" not in loop and "mma.sync" in loop
    assert "st.shared" in ptx  # the slices' sum crosses warps
    # a word row's activations in one load (16 bytes, 8 at 8 bits); the words 8 bytes at a time from 16 rows, 16 above
    assert ("ld.global.v4.b32" if bits != 8 else "ld.global.v2.b32") in ptx
    assert ("ld.global.v2.b32" if rows == 16 else "ld.global.v4.b32") in ptx
    assert "atom." not in ptx


@pytest.mark.parametrize("bits,act,sym,group,rows,bm,bk,warps,stages", [
    (4, "bf16", True, 128, 16, 16, 128, 8, 2), (4, "bf16", False, 128, 32, 8, 128, 4, 3),
    (4, "fp16", True, 0, 32, 16, 128, 4, 2), (2, "bf16", True, 64, 32, 16, 64, 8, 2),
    (8, "bf16", False, 32, 16, 16, 32, 2, 2), (8, "fp16", True, 128, 32, 8, 128, 4, 3),
    (4, "bf16", False, 128, 16, 8, 128, 16, 2), (2, "fp16", True, 64, 16, 16, 64, 16, 3),
    (3, "bf16", True, 128, 16, 8, 128, 8, 2), (3, "fp16", False, 64, 32, 16, 64, 4, 3),
])
def test_mma_kb_compiles_for_sm90(bits, act, sym, group, rows, bm, bk, warps, stages):
    """A batch of the mma per warp (``mma_kb``): per tile and warp exactly its own ``rows x bm`` products (no column
    of another slice's), the operands built in registers, one sum over the warps through shared memory at the end,
    none in the loop, no atomics."""
    ck = _compile(act, sym, group, bm * warps, rows * warps, bk, warps, False, bits, True, stages, slices=warps,
                  batched=True)
    ptx = ck.asm["ptx"]
    h = "bf16" if act == "bf16" else "f16"
    assert re.search(rf"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.{h}\.{h}\.f32", ptx)
    per_tile = (rows // 16) * (bm // 8) * (bk // 16)  # one warp's mma per tile: its own rows and activation rows
    assert ptx.count("mma.sync") == per_tile * (stages + stages - 1)  # the loop's STAGES tiles and the remainders
    loop = ptx.split("st.shared")[0]
    assert "ld.shared" not in loop and "ldmatrix" not in loop and "mma.sync" in loop
    assert "st.shared" in ptx and "atom." not in ptx
    assert ("ld.global.v4.b32" if bits != 8 else "ld.global.v2.b32") in ptx  # a word row's activations at once


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("rows,bk,warps", [(16, 128, 8), (32, 128, 4), (64, 128, 4), (32, 256, 2), (16, 64, 8),
                                           (16, 128, 16)])
def test_mma_kb_layouts_keep_each_warp_on_its_slice(rows, bk, warps, bits):
    """Batched mode: a warp holds only its own slice (batch index = warp) in the word loads, the words and the
    activations; inside the slice its rows and words agree between the load and the word layouts
    through ``_phys_row(l, reps, 1)``, and its activations are the PER inputs of its word rows (as one warp of
    :func:`mma_layouts`)."""
    from auto_quant.kernels import gluon_mma as m
    from auto_quant.kernels import gluon_mma_layouts as ml

    if bk % (4 * 32 // bits):
        pytest.skip("the tile holds no whole group of four words")
    fn = getattr(ml.mma_kb_layouts, "__wrapped__", ml.mma_kb_layouts)
    per = 32 // bits
    for bm in (8, 16):
        _, _, _, load, word, xload, hload = fn(rows * warps, bm * warps, bk, warps, bits)
        seen = set()
        for warp in range(warps):
            for lane in range(32):
                logical = {(c[0], c[1], c[2] * 4 + c[3]) for c in thread_coords(word, warp, lane)}
                physical = {(c[0], c[2], c[1]) for c in thread_coords(load, warp, lane)}
                assert {s for s, _, _ in logical | physical} == {warp}
                assert {(s, m._phys_row.fn(l, rows // 16, 1), kw) for s, l, kw in logical} == physical, (warp, lane)
                assert {kw % 4 for _, _, kw in physical} == {lane % 4}
                # 3 bits (2-bit plane): the high word of a column pair sits with the pair's words
                assert {tuple(c) for c in thread_coords(hload, warp, lane)} == {(s, kw, p // 2) for s, kw, p in
                                                                               {(c[0], c[1], c[2]) for c in
                                                                                thread_coords(load, warp, lane)}}
                seen |= physical
                xs = {tuple(c) for c in thread_coords(xload, warp, lane)}
                kws = {kw for _, _, kw in physical}
                assert xs == {(warp, g, (kw * per) // 2 + q)
                              for g in range(lane // 4, bm, 8) for kw in kws for q in range(per // 2)}, (warp, lane)
        assert seen == {(s, p, kw) for s in range(warps) for p in range(rows) for kw in range(bk // per)}


@pytest.mark.parametrize("slices,stages", [(1, 2), (8, 3)])
def test_mma_pdl_reads_only_the_weight_before_the_grid_wait(slices, stages):
    """With programmatic dependent launch the first tiles' words load before ``griddepcontrol.wait`` (the weight is
    never written by another kernel; so would their zero points, and at 16 rows their scales), the activations and
    every store after it; without PDL there is no wait."""
    warps = 8 if slices > 1 else 4
    ck = _compile("bf16", True, 128, 8, 16 * warps, 128, warps, False, 4, True, stages, slices=slices, pdl=True)
    body = ck.asm["ptx"][ck.asm["ptx"].index(".entry"):]
    wait = body.index("griddepcontrol.wait")
    before = body[:wait]
    # the words of the first tiles (8-byte loads, 4 per tile and thread here); no activations (16-byte loads), no
    # scales (loaded at their tile's use at 8 rows), no stores
    assert re.findall(r"ld\.global[\w.]*", before) == ["ld.global.v2.b32"] * (4 * stages)
    assert "st." not in before
    assert "griddepcontrol.launch_dependents" in body[wait:]
    assert "griddepcontrol" not in _compile("bf16", True, 128, 8, 16 * warps, 128, warps, False, 4, True, stages,
                                            slices=slices).asm["ptx"]


@pytest.mark.parametrize("slices,batched", [(1, False), (8, False), (8, True)])
def test_one_row_variant_folds_the_row_count(slices, batched):
    """The row count is a runtime argument (one compile per row bucket); ``ONE_ROW`` (decode) makes it the constant
    1, which the compiler folds: the one-row PTX never reads the row-count parameter (param 9), the general one does."""
    warps = 8 if slices > 1 else 4
    bm = 8 * warps if batched else 8  # mma and mma_kw: 8 rows a program in all; mma_kb: 8 rows a warp
    kw = dict(slices=slices, batched=batched)
    one, general = (_compile("bf16", True, 128, bm, 16 * warps, 128, warps, False, 4, True, 2, one_row=o, **kw)
                    for o in (True, False))
    reads = [re.findall(r"ld\.param\.\w+\s+%\w+,\s*\[(\w+)\]", ck.asm["ptx"]) for ck in (one, general)]
    row_param = [p for p in reads[1] if p.endswith("_param_9")]
    assert row_param and not [p for p in reads[0] if p.endswith("_param_9")]


@pytest.mark.parametrize("sym,bm,stages", [(False, 8, 2), (True, 16, 2), (False, 16, 3), (True, 8, 3)])
def test_mma_loads_zero_points_and_16_row_scales_with_the_words(sym, bm, stages):
    """Each of the first ``STAGES`` tiles loads its zero points (bytes) and, for 16-row tiles, its fp16 scales with
    its words, ahead of use (here: before the PDL wait); 8-row tiles read their scales at use."""
    ck = _compile("bf16", sym, 128, bm, 64, 128, 4, True, 4, True, stages, pdl=True)
    body = ck.asm["ptx"][ck.asm["ptx"].index(".entry"):]
    before = body[:body.index("griddepcontrol.wait")]
    tile = ["ld.global.v2.b32"] * 4 + ["ld.global.b16"] * 2 * (bm == 16) + ["ld.global.b8"] * 2 * (not sym)
    assert re.findall(r"ld\.global[\w.]*", before) == tile * stages


def _loop_sass(cubin: bytes) -> str:
    """The loop body of a kernel's sm_90 SASS (the longest backward branch's span) as a string of ``L`` (global load)
    and ``M`` (``mma``), in issue order; from the ``cuobjdump`` next to Triton's bundled ``ptxas``."""
    sass = run_triton_nvidia_tool("cuobjdump", cubin, ".cubin", "--dump-sass").stdout
    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(m.group(1), 16), a) for a, t in ins if (m := re.search(r"BRA (0x[0-9a-f]+)", t))
             and int(m.group(1), 16) < a]
    lo, hi = max(loops, key=lambda span: span[1] - span[0])
    ops = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for a, t in ins if lo <= a <= hi]
    return "".join("L" if op.startswith("LDG") else "M" for op in ops if op.startswith(("LDG", "HMMA")))


@pytest.mark.parametrize("bm,bn,warps,slices,batched,split", [(64, 64, 4, 4, True, True), (16, 128, 4, 1, False, True),
                                                              (64, 128, 8, 8, True, False)])
def test_mma_loop_loads_the_next_tiles_between_its_mmas(bm, bn, warps, slices, batched, split):
    """With 4 warps the loop body is split by a branch after each tile, so each tile's next words and activations
    issue before the following tile's ``mma``; ptxas would otherwise sink (nearly) every load below the last ``mma``,
    as it does in the 8-warp tiles, which stay unsplit."""
    ck = _compile("bf16", True, 128, bm, bn, 128 if batched else 64, warps, False, 4, True, 2, slices=slices,
                  batched=batched)
    order = _loop_sass(ck.asm["cubin"])
    after_last_mma = len(order) - 1 - order.rindex("M")
    assert order.count("M") >= 16 and order.count("L") >= 8, order
    assert (after_last_mma < order.count("L") / 2) == split, order


def test_pdl_launch_needs_sm90_and_a_small_weight(monkeypatch):
    """PDL only where the instructions exist (sm_90+) and for weights up to the bound (where it measured faster)."""
    from auto_quant.kernels import dispatch
    from auto_quant.kernels import grid_dependency as g

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(dispatch, "capability_major", lambda index: 9)
    assert g.pdl_launch(cuda, g.PDL_MAX_WEIGHT_BYTES) and not g.pdl_launch(cuda, g.PDL_MAX_WEIGHT_BYTES + 1)
    # mma_kb measured faster with PDL on larger weights too (29 and 59 MB); the other kinds keep the 16 MB bound
    kb = g.pdl_max_weight_bytes("mma_kb")
    assert kb == g.PDL_MAX_WEIGHT_BYTES_MMA_KB > 59e6
    assert g.pdl_launch(cuda, kb, kb) and not g.pdl_launch(cuda, kb + 1, kb)
    assert g.pdl_max_weight_bytes("mma") == g.pdl_max_weight_bytes("mma_kw") == g.PDL_MAX_WEIGHT_BYTES
    assert not g.pdl_launch(torch.device("cpu"), 1 << 20)
    monkeypatch.setattr(dispatch, "capability_major", lambda index: 8)
    assert not g.pdl_launch(cuda, 1 << 20)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("bn,bk,warps", [(64, 128, 4), (128, 128, 4), (256, 128, 8), (32, 256, 2), (64, 256, 2)])
def test_mma_layouts_rows_and_inputs_agree(bn, bk, warps, bits):
    """Each thread loads the packed words of physical rows p and word rows kw (load layout) and dequantizes logical
    rows l of words (group, t) (word layout); the kernel relabels p -> l in registers and writes row l to column
    _phys_row(l). For every thread both must be the same rows and the same words, a thread's rows adjacent (one
    16-byte load), word row t of each group of four on lane t % 4, and the activations it loads (the x layout)
    exactly the PER inputs of those word rows for activation rows g = lane // 4."""
    from auto_quant.kernels import gluon_mma as m
    from auto_quant.kernels import gluon_mma_layouts as ml

    if bk % (4 * 32 // bits):
        pytest.skip("the tile holds no whole group of four words")
    fn = getattr(ml.mma_layouts, "__wrapped__", ml.mma_layouts)
    per = 32 // bits
    for bm in (8, 16):
        _, _, _, load, word, xload, hload = fn(bn, bm, bk, warps, bits)
        reps = bn // (16 * warps)
        seen = set()
        for warp in range(warps):
            for lane in range(32):
                logical = {(c[0], c[1] * 4 + c[2]) for c in thread_coords(word, warp, lane)}
                physical = {(c[1], c[0]) for c in thread_coords(load, warp, lane)}
                assert {(m._phys_row.fn(l, reps, warps), kw) for l, kw in logical} == physical, (warp, lane)
                assert {kw % 4 for _, kw in physical} == {lane % 4}
                rows = {p for p, _ in physical}
                assert max(rows) - min(rows) == len(rows) - 1
                # 3 bits (2-bit plane): the high word of a column pair sits with the pair's words
                assert {tuple(c) for c in thread_coords(hload, warp, lane)} == {(kw, p // 2) for p, kw in physical}
                seen |= physical
                xs = {(c[0], c[1]) for c in thread_coords(xload, warp, lane)}  # (row, b32 pair)
                kws = {kw for _, kw in physical}
                want = {(g, (kw * per) // 2 + q)
                        for g in range(lane // 4, bm, 8) for kw in kws for q in range(per // 2)}
                assert xs == want, (warp, lane)
        assert seen == {(p, kw) for p in range(bn) for kw in range(bk // per)}


def test_dispatch_offers_mma_only_where_it_serves(monkeypatch):
    from auto_quant.kernels.mma_plan import mma_block_ok

    d = fake_sm90(monkeypatch)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for bits, gs in ((4, 128), (4, 32), (2, 64), (8, -1), (8, 32), (3, 128), (3, 64)):
        for M in (1, 2, 8, 9, 16):
            mm = [c for c in d.candidates(M, 4096, 4096, cuda, bits, gs, torch.bfloat16) if c.kind == "mma"]
            assert mm, (bits, gs, M)
            per = 16 if bits == 3 else 32 // bits
            for c in mm:
                assert mma_block_ok(c.block_m, c.block_n, c.block_k, c.num_warps, bits)
                assert c.block_m == (8 if M <= 8 else 16)
                assert gs == -1 or gs % c.block_k == 0
                assert c.block_k % (4 * per) == 0
    assert not any(c.kind == "mma" for c in d.candidates(17, 4096, 4096, cuda, 4, 128, torch.bfloat16))
    # the untuned choice from 2 to 8 rows (one program per 128 rows, about two programs per SM), not at 1 or 9+
    for N, split in ((4096, 8), (14336, 2), (28672, 1)):
        cfg = d.default_config(4, N, 4096, cuda, 4, 128, torch.bfloat16)
        assert (cfg.kind, cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k) == ("mma", 8, 128, 128, split)
    assert d.default_config(2, 4096, 4096, cuda, 2, 64, torch.float16).block_k == 64
    assert d.default_config(1, 4096, 4096, cuda, 4, 128, torch.bfloat16).kind == "mma_kw"
    assert d.default_config(9, 4096, 4096, cuda, 4, 128, torch.bfloat16).kind != "mma"
    for bits, gs, dt, K, dev in ((3, 32, torch.float16, 4096, cuda), (2, 32, torch.float16, 4096, cuda),
                                 (4, 16, torch.float16, 4096, cuda), (4, 128, torch.float32, 4096, cuda),
                                 (4, -1, torch.float16, 4100, cuda), (4, 128, torch.float16, 4096, cpu)):
        assert all(c.kind != "mma" for c in d.candidates(4, 4096, K, dev, bits, gs, dt)), (bits, gs, dt, K, dev)


def test_dispatch_offers_mma_kw_where_slices_are_whole(monkeypatch):
    """``mma_kw`` for 1-4 rows (8 / warps rows a program, at least M), only where K splits into whole slices."""
    from auto_quant.kernels.mma_plan import mma_k_per_split, mma_kw_block_ok

    d = fake_sm90(monkeypatch)
    cuda = torch.device("cuda")
    for bits, gs in ((4, 128), (2, 64), (8, -1), (4, 32)):
        for M in (1, 2, 3, 4):
            for N, K in ((4096, 4096), (28672, 4096), (4096, 14336), (1000, 2048)):
                kw = [c for c in d.candidates(M, N, K, cuda, bits, gs, torch.bfloat16) if c.kind == "mma_kw"]
                assert kw, (bits, gs, M, N, K)
                for c in kw:
                    assert mma_kw_block_ok(c.block_m, c.block_n, c.block_k, c.num_warps, bits, c.num_stages)
                    assert c.block_m >= M and c.block_m * c.num_warps == 8
                    assert gs == -1 or gs % c.block_k == 0
                    assert c.split_k == 1 and mma_k_per_split(K, c.block_k, 1, c.num_warps) == K
                    assert K % (c.block_k * c.num_warps) == 0
        assert not any(c.kind == "mma_kw" for c in d.candidates(5, 4096, 4096, cuda, bits, gs, torch.bfloat16))
    # K that does not split into whole slices of 2 x 64 inputs: no mma_kw tile; the mma tiles still serve
    assert not any(c.kind == "mma_kw" for c in d.candidates(1, 4096, 4096 + 64, cuda, 4, -1, torch.bfloat16))
    assert any(c.kind == "mma" for c in d.candidates(1, 4096, 4096 + 64, cuda, 4, -1, torch.bfloat16))
    assert mma_k_per_split(4096 + 64, 128, 1, 8) is None and mma_k_per_split(4096 + 64, 64, 1, 1) == 4096 + 64
    assert mma_k_per_split(4096, 128, 2, 8) is None  # no split-K with slices
    # the untuned choice at 1-2 rows: 16 weight rows per program (8 slices for long inputs), 32 rows for wide layers
    for M, N, K, tile in ((1, 4096, 4096, (2, 16, 4)), (1, 4096, 14336, (1, 16, 8)), (2, 4096, 14336, (2, 16, 4)),
                          (1, 28672, 4096, (2, 32, 4)), (2, 14336, 4096, (2, 32, 4))):
        cfg = d.default_config(M, N, K, cuda, 4, 128, torch.bfloat16)
        assert (cfg.kind, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.split_k) == ("mma_kw",) + tile + (1,), (M, N, K)
    assert d.default_config(1, 4096, 4096 + 128, cuda, 4, 128, torch.bfloat16).kind == "gemv"  # no whole slices


def test_dispatch_offers_mma_kb_up_to_16_rows(monkeypatch):
    """``mma_kb`` for 1-16 rows (8 rows a program up to 8, then 16), only where K splits into whole slices."""
    from auto_quant.kernels.mma_plan import mma_k_per_split, mma_kb_block_ok

    d = fake_sm90(monkeypatch)
    cuda = torch.device("cuda")
    for bits, gs in ((4, 128), (2, 64), (8, -1), (4, 32)):
        for M in (1, 5, 8, 9, 16):
            kb = [c for c in d.candidates(M, 4096, 4096, cuda, bits, gs, torch.bfloat16) if c.kind == "mma_kb"]
            assert kb, (bits, gs, M)
            for c in kb:
                assert mma_kb_block_ok(c.block_m, c.block_n, c.block_k, c.num_warps, bits, c.num_stages)
                assert c.block_m == (8 if M <= 8 else 16) and c.split_k == 1
                assert gs == -1 or gs % c.block_k == 0
                assert mma_k_per_split(4096, c.block_k, 1, c.num_warps) == 4096
    assert not any(c.kind == "mma_kb" for c in d.candidates(17, 4096, 4096, cuda, 4, 128, torch.bfloat16))
    assert not any(c.kind == "mma_kb" for c in d.candidates(16, 4096, 4096 + 64, cuda, 4, -1, torch.bfloat16))


def test_mma_config_validation():
    from auto_quant.kernels.dispatch import KernelConfig
    from auto_quant.kernels.mma_plan import mma_block_ok

    KernelConfig("mma", 8, 128, 128, 2, 4, 2)
    KernelConfig("mma", 16, 32, 256, 1, 2, 2)
    for bad in ((8, 96, 128, 4), (8, 64, 128, 1), (12, 64, 128, 4), (8, 64, 96, 4), (32, 64, 64, 4), (8, 64, 8, 4)):
        with pytest.raises(ValueError, match="mma"):
            KernelConfig("mma", bad[0], bad[1], bad[2], 1, bad[3], 2)
    assert not mma_block_ok(8, 128, 32, 4, 2)  # 2 bits: a group of four words is 64 inputs
    assert mma_block_ok(8, 128, 64, 4, 2) and mma_block_ok(8, 128, 16, 4, 8)
    KernelConfig("mma_kw", 1, 16, 128, 1, 8, 2)
    KernelConfig("mma_kw", 4, 64, 128, 1, 2, 3)
    for bad in ((2, 16, 128, 1, 8), (1, 24, 128, 1, 8), (1, 16, 96, 1, 8), (8, 16, 128, 1, 1), (2, 16, 128, 1, 2),
                (1, 16, 128, 2, 8)):
        with pytest.raises(ValueError, match="mma_kw"):
            KernelConfig("mma_kw", bad[0], bad[1], bad[2], bad[3], bad[4], 2)
    KernelConfig("mma_kb", 16, 16, 128, 1, 8, 2)
    KernelConfig("mma_kb", 8, 64, 64, 1, 4, 3)
    KernelConfig("mma_kb", 16, 16, 128, 1, 16, 2)
    for bad in ((12, 16, 128, 1, 8), (16, 24, 128, 1, 8), (16, 16, 96, 1, 8), (16, 16, 128, 1, 1), (16, 16, 128, 2, 8),
                (32, 16, 128, 1, 4), (16, 16, 128, 1, 32)):
        with pytest.raises(ValueError, match="mma_kb"):
            KernelConfig("mma_kb", bad[0], bad[1], bad[2], bad[3], bad[4], 2)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act", ["bf16", "fp16"])
@pytest.mark.parametrize("sym", [True, False])
def test_pair_asm_decodes_every_pair(bits, act, sym):
    """Each pair's PTX, run instruction by instruction (:func:`gluon_helpers.run_ptx_pairs`), leaves the exact
    ``code - zero`` of codes ``I`` and ``I + PER/2`` of a packed word in its two halves, for both columns of a pair
    and codes at both ends of the range; at 3 bits from the 2-bit plane's word and the column pair's high word
    (:func:`~auto_quant.kernels.pack.pack_high_bits`), shifted one bit for the odd column as the kernel does."""
    from gluon_helpers import _halves, _pack_halves, run_ptx_pairs

    from auto_quant.export import packing
    from auto_quant.kernels.gluon_mma_operands import mma_pair_asm
    from auto_quant.kernels.pack import pack_high_bits

    asm = getattr(mma_pair_asm, "__wrapped__", mma_pair_asm)
    per = 16 if bits == 3 else 32 // bits
    g = torch.Generator().manual_seed(bits)
    for trial in range(6):
        codes = torch.randint(0, 2**bits, (per, 2), generator=g)
        if trial < 2:
            codes[:, trial] = (2**bits - 1) * trial  # every code 0, then every code the largest
        if bits == 3:
            lo = packing.pack_bitstream(codes & 3, 2, dim=0)
            high = int(pack_high_bits(codes >> 2)[0, 0])
        else:
            lo = packing.pack_bitstream(codes, bits, dim=0)
        for col in (0, 1):
            zero = 1 << (bits - 1) if sym else int(torch.randint(0, 2**bits, (1,), generator=g))
            ops = {"$1": int(lo[0, col]) & 0xFFFFFFFF}
            if bits == 3:
                ops["$3"] = (high >> col) & 0xFFFFFFFF  # int32's arithmetic shift, as in the kernel
            if not sym:  # the per-row pair -(base + zero) of _zero_pair
                base = 1024.0 if act == "fp16" else 128.0
                ops["$5" if bits == 3 else "$3"] = _pack_halves(-(base + zero), -(base + zero), act)
            for i in range(per // 2):
                out = run_ptx_pairs(asm(bits, act == "fp16", zero if sym else None, i), ops)
                want = [float(codes[i, col] - zero), float(codes[i + per // 2, col] - zero)]
                assert _halves(out, act) == want, (trial, col, i)

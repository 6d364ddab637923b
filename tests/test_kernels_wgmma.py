"""The Gluon ``wgmma`` kernel without a GPU: its sm_90 compile, its layouts' row bookkeeping, and where the
dispatcher offers it. The numbers are checked on the GPU in test_kernels_wgmma_gpu.py.
"""

from __future__ import annotations

import re

import pytest
import torch
from gluon_helpers import bases_value, fake_sm90, run_triton_nvidia_tool, thread_coords

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")


def _compile(act="bf16", sym=True, group=128, bm=16, bn=64, bk=128, warps=4, stages=4, split=True, bits=4):
    """Compile for sm_90 with Triton's bundled ptxas (no GPU needed). The kernel's layout conversions are
    ``assert_trivial``: a layout that would move data through shared memory fails here."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from auto_quant.kernels import gluon_wgmma as m
    from auto_quant.kernels.pack import codes_per_row

    x_l, w_l = m.shared_layouts(bm, bn, bk, act == "fp16")
    bkw = bk // codes_per_row(bits)
    sig = {"x_desc": f"tensordesc<{act}[{bm}, {bk}],{x_l!r}>", "w_desc": f"tensordesc<i32[{bkw}, {bn}],{w_l!r}>",
           "h_desc": f"tensordesc<i32[{bkw}, {bn // 2 if bits == 3 else bn}],{w_l!r}>", "s_ptr": "*fp16",
           "z_ptr": "*u8", "b_ptr": f"*{act}", "out_ptr": f"*{act}", "ws_ptr": "*fp32",
           "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_om": "i32", "k_per_split": "i32"}
    const = dict(BITS=bits, GROUP=group, HAS_ZERO=not sym, HAS_BIAS=True, SPLIT=m.split_vector(4096, split),
                 ACT_FP16=act == "fp16", STAGES=stages, num_warps=warps)
    sig |= {k: "constexpr" for k in const}
    keys = list(sig)
    src = GluonASTSource(m._qmm_wgmma_kernel, sig, constexprs={(keys.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))


@pytest.mark.parametrize("bits,act,sym,group,bm,bn,bk,warps,stages,split", [
    (4, "bf16", True, 128, 16, 64, 128, 4, 4, True), (4, "fp16", False, 0, 16, 128, 128, 4, 3, False),
    (4, "bf16", False, 64, 64, 128, 64, 8, 4, True), (4, "fp16", True, 128, 256, 128, 64, 8, 4, False),
    (4, "bf16", True, 128, 128, 64, 128, 4, 3, False),
    (8, "bf16", True, 128, 16, 64, 128, 4, 4, True), (8, "fp16", False, 0, 128, 128, 64, 8, 3, False),
    (2, "bf16", False, 64, 16, 64, 64, 4, 4, True), (2, "fp16", True, 128, 256, 128, 128, 8, 3, False),
    (3, "bf16", True, 128, 16, 64, 128, 4, 4, True), (3, "fp16", False, 0, 128, 128, 64, 8, 4, False),
])
def test_wgmma_compiles_for_sm90(bits, act, sym, group, bm, bn, bk, warps, stages, split):
    """The weight tile is built in the wgmma register-operand layout (no shared-memory staging), the tensor cores
    run one tile behind the dequantization (wait_group 1), and the dequantization is the bit-width's PTX."""
    ptx = _compile(act, sym, group, bm, bn, bk, warps, stages, split, bits).asm["ptx"]
    h = "bf16" if act == "bf16" else "f16"
    # the left operand is a register list, the right one a shared-memory descriptor
    assert re.search(rf"wgmma\.mma_async\.sync\.aligned\.m64n{bm}k16\.f32\.{h}\.{h}\s+\{{[^}}]+\}},\s*\{{%r", ptx)
    assert "wgmma.wait_group.sync.aligned 1;" in ptx
    if split:  # the operand is never staged through shared memory (without split-K the output tile is)
        assert "ldmatrix" not in ptx
    assert "cp.async.bulk.tensor.2d" in ptx and "mbarrier.try_wait" in ptx
    assert f"add.rn.{h}x2" in ptx and f"mul.rn.{h}x2" in ptx
    assert ("mul.lo.u32" in ptx) == (bits != 8)  # the 4097 / 0x4001 spreads of 4, 3 and 2 bits
    # 3 bits: the high words come by TMA too (a third copy per tile) and are rotated into place
    assert ("shf.r.wrap.b32" in ptx) == (bits == 3)
    assert ptx.count("cp.async.bulk.tensor.2d") == (3 if bits == 3 else 2) * ptx.count("mbarrier.arrive.expect_tx")
    if bits == 8 and act == "bf16":  # 16 * high nibble + (low nibble - zero), exact in bf16
        assert "fma.rn.bf16x2" in ptx


@pytest.mark.parametrize("sym", [True, False])
def test_wgmma_loads_scales_two_tiles_ahead(sym):
    """Scales (and zero points) load two tiles ahead, both of a loop iteration's at its top: before the loop's first
    wait on a tile's TMA copies the scales of tiles 0-3 are in flight (2 fp16 per thread each here), and between
    that wait and the next one (the iteration's second tile) nothing is read from global memory, so the copies into
    the loop-carried registers at the iteration's end wait on loads a whole iteration old."""
    ptx = _compile("bf16", sym, 128, 64, 64, 128, 4, 3, False, 4).asm["ptx"]
    body = ptx[ptx.index(".entry"):]
    parts = body.split("mbarrier.try_wait")
    before = re.findall(r"ld\.global[\w.]*", parts[0])
    assert before.count("ld.global.b16") == 8
    assert before.count("ld.global.b8") == (0 if sym else 8)
    assert not re.findall(r"ld\.global", parts[1])


def _spill_bytes(ptx: str) -> int:
    """Spill stores of an sm_90 PTX, as Triton's bundled ptxas reports them."""
    out = run_triton_nvidia_tool("ptxas", ptx, ".ptx", "-arch=sm_90a", "-v", "-o", "{out}").stderr
    return int(re.search(r"(\d+) bytes spill stores", out).group(1))


@pytest.mark.parametrize("bm,bn,bk,warps,quads", [(16, 128, 128, 4, True), (128, 256, 64, 8, True),
                                                   (16, 64, 128, 4, False), (256, 128, 64, 8, False)])
def test_wgmma_split_k_adds_column_quads(bm, bn, bk, warps, quads):
    """Where a thread holds four consecutive output columns (two weight-row repetitions), split-K adds them with one
    vector reduction and the last program takes the sums with vector loads; elsewhere scalar atomics. The quads'
    32-bit offsets keep the 8-warp tile of 256 weight rows from spilling (per-element atomics spilled 1.7 KB)."""
    ptx = _compile("bf16", True, 128, bm, bn, bk, warps, 4, True, 4).asm["ptx"]
    assert ("red.relaxed.gpu.global.add.v4.f32" in ptx) == quads
    assert ("ld.relaxed.gpu.global.v4.f32" in ptx) == quads
    assert ("atom.global.gpu.relaxed.add.f32" in ptx) == (not quads)
    if bn == 256:
        assert _spill_bytes(ptx) == 0


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("bn,warps", [(64, 4), (128, 4), (256, 4), (128, 8), (256, 8)])
def test_wgmma_rows_physical_and_logical_agree(bn, warps, bits):
    """Each thread loads the packed words of physical rows p (load layout) and dequantizes logical operand rows l
    (the wgmma layout); the kernel relabels p -> l in registers and writes row l of the result to column
    _phys_row(l). For every thread the two row sets must be the same rows."""
    from auto_quant.kernels import gluon_wgmma as m

    fn = getattr(m.operand_layouts, "__wrapped__", m.operand_layouts)
    _, _, deq, load, hload = fn(bn, 16, 128, warps, bits)
    reps = bn // (16 * warps)

    def phys(l):  # the kernel's own formula, run on Python ints
        return m._phys_row.fn(l, reps, warps)

    seen = set()
    for warp in range(warps):
        for lane in range(32):
            hw_l = bases_value(deq.lane_bases, lane)
            hw_w = bases_value(deq.warp_bases, warp)
            logical = {(bases_value(deq.reg_bases, r)[0] ^ hw_l[0] ^ hw_w[0]) for r in range(1 << len(deq.reg_bases))}
            ll = bases_value(load.lane_bases, lane)
            lw = bases_value(load.warp_bases, warp)
            physical = {(bases_value(load.reg_bases, r)[1] ^ ll[1] ^ lw[1]) for r in range(1 << len(load.reg_bases))}
            assert {phys(l) for l in logical} == physical, (warp, lane)
            # a thread's physical rows are adjacent: one 8- or 16-byte shared load per word row
            assert max(physical) - min(physical) == len(physical) - 1
            if bits == 2:  # 3 bits (the 2-bit plane's words): the high word of a column pair with the pair's words
                assert ({tuple(c) for c in thread_coords(hload, warp, lane)}
                        == {(c[0], c[1] // 2) for c in thread_coords(load, warp, lane)}), (warp, lane)
            seen |= physical
    assert seen == set(range(bn))


from auto_quant.kernels.wgmma_plan import wgmma_smem_bytes  # noqa: E402


def test_dispatch_offers_wgmma_only_where_it_serves(monkeypatch):
    d = fake_sm90(monkeypatch)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for M in (2, 16, 64, 200, 256, 1024):
        cands = d.candidates(M, 4096, 4096, cuda, 4, 128, torch.bfloat16)
        wg = [c for c in cands if c.kind == "wgmma"]
        assert wg, M
        assert all(wgmma_smem_bytes(c.block_m, c.block_n, c.block_k, c.num_stages, 4) <= 232448 for c in wg)
        assert all(c.block_m >= min(M, 16) or c.block_m * 2 >= M for c in wg)
        # up to 8 rows the untuned choice is one of the mma kernels (test_kernels_mma.py)
        want = "mma_kw" if M <= 2 else ("mma" if M <= 8 else "wgmma")
        assert d.default_config(M, 4096, 4096, cuda, 4, 128, torch.float16).kind == want
    assert d.default_config(1, 4096, 4096, cuda, 4, 128, torch.float16).kind == "mma_kw"
    for bits in (2, 3, 8):  # the other widths the kernel builds
        assert d.default_config(16, 4096, 4096, cuda, bits, 128, torch.bfloat16).kind == "wgmma"
    # not for 3 bits with N % 8 (the high words' TMA rows), 32-input groups, fp32 activations, unaligned rows, or off
    # sm_90
    for bits, gs, dt, N, K, dev in ((3, 128, torch.float16, 4100, 4096, cuda), (2, 32, torch.float16, 4096, 4096, cuda),
                                    (4, 32, torch.float16, 4096, 4096, cuda), (4, 128, torch.float32, 4096, 4096, cuda),
                                    (4, -1, torch.float16, 4094, 4096, cuda), (4, -1, torch.float16, 4096, 4100, cuda),
                                    (4, 128, torch.float16, 4096, 4096, cpu)):
        assert all(c.kind != "wgmma" for c in d.candidates(16, N, K, dev, bits, gs, dt)), (bits, gs, dt, N, K, dev)
        assert d.default_config(16, N, K, dev, bits, gs, dt).kind != "wgmma"
    # 3 bits past tdot's rows: wgmma and the dequantize floor, not the 3-bit dot tiles (10-13x slower on the H100)
    assert {c.kind for c in d.candidates(1024, 4096, 4096, cuda, 3, 128, torch.bfloat16)} == {"wgmma", "dequant"}
    assert "dot" in {c.kind for c in d.candidates(1024, 4096, 4096, cuda, 4, 128, torch.bfloat16)}
    # group 64: 64-input tiles (one group per tile)
    assert {c.block_k for c in d.candidates(16, 4096, 4096, cuda, 4, 64, None) if c.kind == "wgmma"} == {64}


def test_wgmma_tiles_fit_smaller_shared_memory(monkeypatch):
    d = fake_sm90(monkeypatch)
    monkeypatch.setattr(d, "smem_limit", lambda device: 101376)  # sm_89-sized
    for bits in (2, 4, 8):
        for M in (16, 256):
            for c in d.candidates(M, 4096, 4096, torch.device("cuda"), bits, 128, torch.bfloat16):
                if c.kind == "wgmma":
                    assert wgmma_smem_bytes(c.block_m, c.block_n, c.block_k, c.num_stages, bits) <= 101376


def test_wgmma_config_validation():
    from auto_quant.kernels.dispatch import KernelConfig

    KernelConfig("wgmma", 16, 64, 128, 2, 4, 4)
    KernelConfig("wgmma", 256, 256, 64, 1, 8, 3)
    for bad in ((16, 96, 128, 4), (16, 64, 128, 2), (12, 64, 128, 4), (16, 64, 96, 4), (512, 64, 64, 4),
                (16, 64, 8, 4)):
        with pytest.raises(ValueError, match="wgmma"):
            KernelConfig("wgmma", bad[0], bad[1], bad[2], 1, bad[3], 3)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("act", ["bf16", "fp16"])
@pytest.mark.parametrize("sym", [True, False])
def test_wgmma_dequant_asm_decodes_each_lanes_codes(bits, act, sym):
    """The 2- and 3-bit ``wgmma`` dequantization, run instruction by instruction (:func:`gluon_helpers.run_ptx`):
    lane ``t`` (shift ``4t``) gets the exact ``code - zero`` of codes ``2t, 2t + 1, 2t + 8, 2t + 9`` of the word, at
    3 bits with their third bits from the column pair's high word (both columns; codes at both ends of the range)."""
    from gluon_helpers import _halves, _pack_halves, run_ptx

    from auto_quant.export import packing
    from auto_quant.kernels import gluon_wgmma as m
    from auto_quant.kernels.pack import pack_high_bits

    asm = getattr(m.dequant_asm, "__wrapped__", m.dequant_asm)(bits, act == "fp16")
    base = 1024.0 if act == "fp16" else 128.0
    g = torch.Generator().manual_seed(bits)
    for trial in range(6):
        codes = torch.randint(0, 2**bits, (16, 2), generator=g)
        if trial < 2:
            codes[:, trial] = (2**bits - 1) * trial
        lo = packing.pack_bitstream(codes & 3, 2, dim=0)
        high = int(pack_high_bits(codes >> 2)[0, 0]) if bits == 3 else 0
        for col in (0, 1):
            zero = 1 << (bits - 1) if sym else int(torch.randint(0, 2**bits, (1,), generator=g))
            ops = {"$4": int(lo[0, col]) & 0xFFFFFFFF, "$6": _pack_halves(-(base + zero), -(base + zero), act),
                   "$7": _pack_halves(1.0, 1.0, act), "$8": (high >> col) & 0xFFFFFFFF}
            for t in range(4):
                regs = run_ptx(asm, ops | {"$5": 4 * t})
                got = [_halves(regs[f"${i}"], act)[0] for i in range(4)]
                want = [float(codes[j, col] - zero) for j in (2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9)]
                assert got == want, (trial, col, t)

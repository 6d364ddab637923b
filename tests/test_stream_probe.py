"""``benchmarks/stream_probe.py`` without a GPU: its read-only probes compile for sm_90 as designed (the TMA ring
fills every slot with bulk tensor copies and waits on one mbarrier per slot; the register probe issues ``U`` loads
per tile step). Their timings come from the device machine."""

from __future__ import annotations

import re

import pytest
from benchmark_scripts import load_benchmark

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")


@pytest.mark.parametrize("BR,BN,stages,warps", [(32, 64, 4, 4), (16, 128, 8, 4)])
def test_tma_ring_compiles_for_sm90(BR, BN, stages, warps):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sp = load_benchmark("stream_probe")
    sig = {"w_desc": f"tensordesc<i32[{BR}, {BN}],{sp.shared_layout()!r}>", "out_ptr": "*i32", "rows_per_prog": "i32",
           "STAGES": "constexpr", "num_warps": "constexpr"}
    keys = list(sig)
    src = GluonASTSource(sp._tma_read, sig, constexprs={(keys.index("STAGES"),): stages,
                                                        (keys.index("num_warps"),): warps})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    ptx = ck.asm["ptx"]
    assert len(re.findall(r"cp\.async\.bulk\.tensor\.2d", ptx)) == stages + 1  # the prologue's unrolled, the loop's
    assert "mbarrier.try_wait.parity" in ptx
    assert ck.metadata.shared >= stages * BR * BN * 4  # the ring itself


def test_ldg_probe_issues_u_loads_per_step():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sp = load_benchmark("stream_probe")
    sig = {"w_ptr": "*i32", "out_ptr": "*i32", "row_stride": "i32", "block_stride": "i32", "rows_per_prog": "i32",
           "BR": "constexpr", "BN": "constexpr", "U": "constexpr"}
    keys = list(sig)

    def loads(U):
        src = ASTSource(sp._ldg_read, sig, constexprs={(keys.index("BR"),): 16, (keys.index("BN"),): 32,
                                                       (keys.index("U"),): U})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1)).asm["ptx"]
        return len(re.findall(r"ld\.global", ptx))

    assert loads(4) == 4 * loads(1)


@pytest.mark.parametrize("N,R,BN,split,BR", [(256, 64, 32, 2, 16), (512, 32, 128, 1, 8)])
def test_ldg_layouts_read_every_word_once(N, R, BN, split, BR):
    """Both address maps of the register probe (row-major and column-blocked) cover the ``R x N`` words exactly once,
    and the row-major one is the ``[R, N]`` array's own order (the kernel's arithmetic, run on Python ints)."""
    sp = load_benchmark("stream_probe")
    rpp = R // split
    for probe, (row_stride, block_stride) in sp.ldg_strides(N, R, BN).items():
        seen = [pn * block_stride + (pk * rpp + r) * row_stride + c
                for pn in range(N // BN) for pk in range(split) for r in range(rpp) for c in range(BN)]
        assert sorted(seen) == list(range(R * N)), probe
        if probe == "ldg":
            assert {(a // N, a % N) for a in seen[:BN]} == {(0, c) for c in range(BN)}

"""``benchmarks/mma_ws_probe.py`` without a GPU: the warp-specialized prototype compiles for sm_90 as designed (one
one-warp worker per K slice, each filling its own ring with bulk tensor copies before the PDL wait, and no CTA-wide
barrier between a worker's mbarrier waits). Its numbers come from the device machine."""

from __future__ import annotations

import re

import pytest
from benchmark_scripts import load_benchmark

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")


def _compile(bits=4, group=128, sym=True, bm=8, bn=32, bk=128, slices=4, stages=4, maxnreg=128, wregs=128):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    m = load_benchmark("mma_ws_probe")
    per = 32 // bits
    lay = m.words_layout(bn, bk // per)
    sig = {"x_ptr": "*bf16", "w_desc": f"tensordesc<i32[1, {bk // per}, {bn}],{lay!r}>", "s_ptr": "*fp16",
           "z_ptr": "*u8", "b_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
           "stride_xm": "i32", "stride_om": "i32", "k_len": "i32"}
    const = dict(BITS=bits, GROUP=group, HAS_ZERO=not sym, HAS_BIAS=True, ACT_FP16=False, PR=bn, MR=bm, BLOCK_K=bk,
                 STAGES=stages, SLICES=slices, WREGS=wregs, PDL=True, num_warps=4)
    sig |= {k: "constexpr" for k in const}
    keys = list(sig)
    div = [k for k in sig if sig[k] != "constexpr" and k not in ("M", "w_desc")]
    src = GluonASTSource(m._qmm_mma_ws_kernel, sig, constexprs={(keys.index(k),): v for k, v in const.items()},
                         attrs={(keys.index(a),): [["tt.divisibility", 16]] for a in div})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=maxnreg))


@pytest.mark.parametrize("bits,group,sym,bm,bn,bk,slices,stages", [
    (4, 128, True, 8, 32, 128, 4, 4), (4, 0, False, 16, 16, 128, 8, 2), (2, 64, True, 8, 32, 64, 4, 4),
])
def test_mma_ws_workers_wait_only_on_their_own_slots(bits, group, sym, bm, bn, bk, slices, stages):
    ck = _compile(bits, group, sym, bm, bn, bk, slices, stages)
    ptx = ck.asm["ptx"]
    assert f".reqntid {32 * (4 + slices)}" in ptx  # four default warps and one per slice
    body = ptx[ptx.index(".entry"):]
    waits = [m.start() for m in re.finditer(r"mbarrier\.try_wait", body)]
    assert len(waits) == slices  # one loop per worker
    for w in waits:  # a worker: its ring's copies, its PDL wait, then its loop up to its last mma
        start = body.rindex("griddepcontrol.wait", 0, w)
        assert len(re.findall(r"cp\.async\.bulk\.tensor\.3d", body[body.rindex("setmaxnreg", 0, start):start])) == stages
        end = body.find("setmaxnreg", w)
        loop = body[start:body.rindex("mma.sync", start, end)]
        assert "bar.sync" not in loop and "barrier.sync" not in loop
    assert ck.metadata.shared >= slices * stages * (bk * bits // 32) * bn * 4

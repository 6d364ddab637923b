"""The ``mma_tma`` kernel without a GPU: its sm_90 compile (a ring of TMA bulk copies, the weight read from shared
memory, PDL order), its tiles and where the dispatcher offers it. The numbers are checked on the GPU in
test_kernels_mma_tma_gpu.py."""

from __future__ import annotations

import re

import pytest
import torch
from gluon_helpers import fake_sm90

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")


def _compile(act="bf16", bits=4, group=128, sym=True, bm=8, bn=32, bk=128, warps=4, stages=4, pdl=False):
    """Compile for sm_90 with Triton's bundled ptxas (no GPU needed); ``bm``/``bn``: per warp, as the config's."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from auto_quant.kernels import gluon_mma_tma as m

    lay = m.words_layout(bn)
    sig = {"x_ptr": f"*{act}", "w_desc": f"tensordesc<i32[{warps}, {bk * bits // 32}, {bn}],{lay!r}>",
           "s_ptr": "*fp16", "z_ptr": "*u8", "b_ptr": f"*{act}", "out_ptr": f"*{act}", "M": "i32", "N": "i32",
           "K": "i32", "stride_xm": "i32", "stride_om": "i32", "k_len": "i32"}
    const = dict(BITS=bits, GROUP=group, HAS_ZERO=not sym, HAS_BIAS=True, ACT_FP16=act == "fp16", BLOCK_N=bn * warps,
                 BLOCK_M=bm * warps, BLOCK_K=bk, STAGES=stages, PDL=pdl, num_warps=warps)
    sig |= {k: "constexpr" for k in const}
    keys = list(sig)
    div = [k for k in sig if sig[k] != "constexpr" and k not in ("M", "w_desc")]
    src = GluonASTSource(m._qmm_mma_tma_kernel, sig, constexprs={(keys.index(k),): v for k, v in const.items()},
                         attrs={(keys.index(a),): [["tt.divisibility", 16]] for a in div})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))


@pytest.mark.parametrize("bits,act,sym,group,bm,bn,bk,warps,stages", [
    (4, "bf16", True, 128, 8, 32, 128, 4, 4), (4, "fp16", False, 0, 16, 16, 128, 8, 2),
    (2, "bf16", True, 64, 8, 64, 64, 2, 8), (8, "fp16", False, 32, 16, 32, 32, 4, 3),
])
def test_mma_tma_compiles_for_sm90(bits, act, sym, group, bm, bn, bk, warps, stages):
    """The words arrive only by 3-D bulk tensor copies (the prologue's ``STAGES``, unrolled, and the loop's refill)
    into a ring of ``STAGES`` slots, each waited for on its mbarrier and read from shared memory."""
    ck = _compile(act, bits, group, sym, bm, bn, bk, warps, stages)
    ptx = ck.asm["ptx"]
    assert len(re.findall(r"cp\.async\.bulk\.tensor\.3d", ptx)) == stages + 1
    assert "mbarrier.try_wait.parity" in ptx and "ld.shared" in ptx and "mma.sync" in ptx
    assert ck.metadata.shared >= stages * warps * (bk * bits // 32) * bn * 4


def test_mma_tma_pdl_requests_the_ring_before_the_grid_wait():
    """With PDL the first ``STAGES`` tiles' copies are issued before ``griddepcontrol.wait``; no activation load and
    no store comes before it; without PDL there is no wait."""
    ck = _compile(stages=4, pdl=True)
    body = ck.asm["ptx"][ck.asm["ptx"].index(".entry"):]
    before = body[:body.index("griddepcontrol.wait")]
    assert len(re.findall(r"cp\.async\.bulk\.tensor", before)) == 4
    assert "st.global" not in before and "ld.global.v4" not in before
    assert "griddepcontrol" not in _compile(stages=4).asm["ptx"]


def test_mma_tma_tiles_and_offer(monkeypatch):
    """Tiles: an ``mma_kb`` warp tile, 2-8 warps, 2-8 slots, whole tiles only; the dispatcher offers them at 1-16 rows
    where every tile is whole, and nowhere else."""
    from auto_quant.kernels.dispatch import KernelConfig
    from auto_quant.kernels.mma_plan import mma_tma_candidates, mma_tma_ok

    assert mma_tma_ok(8, 32, 128, 4, 4, 8, 4096, 4096)
    assert not mma_tma_ok(8, 32, 128, 8, 4, 8, 4096, 4096)  # 4 tiles per slice, 8 slots
    assert not mma_tma_ok(8, 32, 128, 4, 4, 4, 4040, 4096)  # columns not whole tiles
    assert not mma_tma_ok(8, 32, 128, 16, 4, 2) and not mma_tma_ok(8, 32, 128, 4, 4, 9)
    KernelConfig("mma_tma", 16, 16, 128, 1, 8, 2)
    for bad in ((12, 16, 128, 1, 8, 2), (16, 16, 128, 2, 8, 2), (16, 16, 128, 1, 16, 2), (8, 16, 128, 1, 4, 1),
                (8, 24, 128, 1, 4, 2)):
        with pytest.raises(ValueError, match="mma_tma"):
            KernelConfig("mma_tma", *bad)
    d = fake_sm90(monkeypatch)
    cuda = torch.device("cuda")
    for bits, gs in ((4, 128), (2, 64), (8, -1), (4, 32)):
        for M in (1, 8, 9, 16):
            tma = [c for c in d.candidates(M, 4096, 4096, cuda, bits, gs, torch.bfloat16) if c.kind == "mma_tma"]
            assert len(tma) >= 8, (bits, gs, M)
            assert all(c.block_m == (8 if M <= 8 else 16) and mma_tma_ok(c.block_m, c.block_n, c.block_k, c.num_warps,
                                                                          bits, c.num_stages, 4096, 4096) for c in tma)
    odd = mma_tma_candidates(1, 4000, 4096, 128, 132)  # 4000 columns: 16- and 32-row tiles only
    assert odd and all(c.block_n in (16, 32) for c in odd)
    assert not any(c.kind == "mma_tma" for c in d.candidates(17, 4096, 4096, cuda, 4, 128, torch.bfloat16))

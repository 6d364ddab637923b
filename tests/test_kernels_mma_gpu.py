"""The Gluon ``mma`` kernel (1-16 activation rows; 2, 3, 4 and 8 bits) against the float64 reference product, on the GPU
(``pytest -m gpu``).

Skipped without CUDA (``conftest``) and on GPUs other than sm_90, where the kernel is never chosen.
"""

from __future__ import annotations

import pytest
import torch
from gluon_helpers import needs_sm90, quantized_weight, rel_err

pytestmark = pytest.mark.gpu

TOL = 8e-3


FORMATS = [(4, 128, True), (4, 128, False), (4, 32, True), (4, -1, False), (8, 128, True), (8, -1, False),
           (8, 32, False), (2, 64, True), (2, 128, False), (2, -1, True)]
# 3 bits: one activation dtype per format (each compiles every tile again: the GPU suite's longest tests)
FORMATS_DTYPES = ([(*f, dt) for f in FORMATS for dt in (torch.float16, torch.bfloat16)]
                  + [(3, 128, True, torch.bfloat16), (3, 64, False, torch.float16), (3, -1, True, torch.bfloat16)])


@needs_sm90
@pytest.mark.parametrize("bits,group_size,sym,dt", FORMATS_DTYPES)
@pytest.mark.parametrize("kind", ["mma", "mma_kw", "mma_kb"])
def test_mma_every_candidate(kind, bits, group_size, sym, dt):
    """Every tile and split the tuner may time (``mma`` at 1-16 rows; ``mma_kw``, the warps splitting K, at 1-4;
    ``mma_kb``, a batch per warp, at 1-16), with a bias, on a shape whose columns do not fill the tiles, every row
    checked on its own (a slice or row mix-up shows there); split-K leaves its workspace clean."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, launch
    from auto_quant.kernels.mma_plan import mma_candidates, mma_kb_candidates, mma_kw_candidates

    plan, K, row_counts = {"mma": (mma_candidates, 2048, (1, 3, 8, 13, 16)),
                           "mma_kw": (mma_kw_candidates, 4096, (1, 2, 3, 4)),
                           "mma_kb": (mma_kb_candidates, 4096, (1, 5, 8, 9, 16))}[kind]
    N = 1000
    kw = quantized_weight(N, K, group_size, sym, seed=group_size + sym + bits + len(kind), bits=bits)
    W = dequantize(kw).double()
    ws = Workspace()
    bias = torch.randn(N, device="cuda").to(dt)
    for M in row_counts:
        x = torch.randn(M, K, device="cuda").to(dt)
        ref = x.double() @ W.t() + bias.double()
        cands = plan(M, N, K, group_size, 132, bits)
        assert cands and all(c.kind == kind for c in cands)
        for cfg in cands:
            y = launch(x, kw, bias, cfg, ws)
            assert y.dtype == dt and torch.isfinite(y).all()
            for m in range(M):
                assert rel_err(y[m], ref[m]) < TOL, (M, m, cfg, rel_err(y[m], ref[m]))
    torch.cuda.synchronize()
    for acc, cnt in ws._bufs.values():
        assert not acc.any() and not cnt.any()


@needs_sm90
def test_mma_kw_strided_rows_and_uneven_k():
    """Activation rows with a stride (a slice of a wider tensor) at every slice count, and a program row covering fewer
    rows than it could; K that does not split into whole slices is refused by the launcher with a message naming the
    fix."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import KernelConfig, Workspace, launch

    N, K = 256, 2048
    kw = quantized_weight(N, K, 128, False, seed=3)
    W = dequantize(kw).double()
    ws = Workspace()
    wide = torch.randn(4, K + 64, device="cuda").to(torch.bfloat16)
    for warps, bn, stages, M in ((8, 16, 2, 1), (8, 32, 3, 1), (4, 32, 2, 2), (4, 64, 3, 1), (2, 64, 2, 4),
                                 (2, 32, 2, 3)):
        x = wide[:M, :K]
        ref = x.double() @ W.t()
        y = launch(x, kw, None, KernelConfig("mma_kw", 8 // warps, bn, 128, 1, warps, stages), ws)
        for m in range(M):
            assert rel_err(y[m], ref[m]) < TOL, (m, warps, bn, M)
    odd = quantized_weight(N, K + 128, 128, True, seed=4)
    with pytest.raises(ValueError, match="whole K slices"):
        launch(torch.randn(1, K + 128, device="cuda").to(torch.bfloat16), odd, None,
               KernelConfig("mma_kw", 1, 16, 128, 1, 8, 2), ws)


@needs_sm90
def test_mma_kb_strided_rows_and_every_slice_count():
    """``mma_kb`` (a batch of the mma per warp, each over its own K slice) with activation rows that have a stride, at
    every slice count, 8 and 16 rows a program and fewer rows than that; K without whole slices is refused."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import KernelConfig, Workspace, launch

    N, K = 320, 2048
    kw = quantized_weight(N, K, 128, False, seed=5)
    W = dequantize(kw).double()
    ws = Workspace()
    wide = torch.randn(16, K + 64, device="cuda").to(torch.bfloat16)
    for warps, bn, bm, stages, M in ((8, 16, 16, 2, 16), (8, 32, 8, 3, 7), (4, 64, 16, 2, 11), (4, 16, 8, 3, 1),
                                     (2, 32, 16, 2, 16), (2, 64, 8, 2, 3), (8, 16, 16, 3, 2), (16, 16, 16, 2, 13),
                                     (16, 16, 8, 2, 1)):
        x = wide[:M, :K]
        ref = x.double() @ W.t()
        y = launch(x, kw, None, KernelConfig("mma_kb", bm, bn, 128, 1, warps, stages), ws)
        for m in range(M):
            assert rel_err(y[m], ref[m]) < TOL, (m, warps, bn, bm, M)
    odd = quantized_weight(N, K + 128, 128, True, seed=6)
    with pytest.raises(ValueError, match="whole K slices"):
        launch(torch.randn(9, K + 128, device="cuda").to(torch.bfloat16), odd, None,
               KernelConfig("mma_kb", 16, 16, 128, 1, 8, 2), ws)


@needs_sm90
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mma_partial_tiles_and_odd_rows(bits):
    """A split that ends inside a tile (K not a multiple of split x block_k), x rows with a stride (a slice of a wider
    tensor) and every row of a 16-row block checked on its own: a row-order or input-order slip shows up here."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import KernelConfig, Workspace, launch

    per = 16 if bits == 3 else 32 // bits
    N, K = 256, 4 * per * 21  # 5.25 tiles of four word groups: the last tile of every split count is partial
    kw = quantized_weight(N, K, -1, False, seed=bits, bits=bits)
    W = dequantize(kw).double()
    ws = Workspace()
    wide = torch.randn(16, K + 64, device="cuda").to(torch.bfloat16)
    x = wide[:, :K]
    ref = x.double() @ W.t()
    for split in (1, 2, 4):
        for warps, bn, stages in ((4, 64, 2), (4, 128, 2), (8, 128, 2), (2, 64, 2), (4, 128, 3), (2, 32, 3)):
            cfg = KernelConfig("mma", 16, bn, 4 * per * 4, split, warps, stages)
            y = launch(x, kw, None, cfg, ws)
            for m in range(16):
                assert rel_err(y[m], ref[m]) < TOL, (m, cfg)


@needs_sm90
def test_mma_every_launch_right():
    """Many programs per multiprocessor, repeated launches: every launch matches the reference."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, launch
    from auto_quant.kernels.mma_plan import mma_candidates, mma_kb_candidates, mma_kw_candidates

    N, K = 4096, 4096
    kw = quantized_weight(N, K, 128, True, seed=7)
    W = dequantize(kw).double()
    ws = Workspace()
    for M in (1, 16):
        x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
        ref = x.double() @ W.t()
        cands = mma_candidates(M, N, K, 128, 132) + mma_kb_candidates(M, N, K, 128, 132)
        for cfg in cands + (mma_kw_candidates(M, N, K, 128, 132) if M == 1 else []):
            for _ in range(10):
                assert rel_err(launch(x, kw, None, cfg, ws), ref) < TOL, cfg


@needs_sm90
def test_tuner_offers_mma():
    """From 1 to 16 rows the dispatcher offers the kernel to the tuner on sm_90."""
    from auto_quant.kernels.dispatch import candidates

    for M in (1, 4, 16):
        assert any(c.kind == "mma" for c in candidates(M, 4096, 4096, torch.device("cuda"), 4, 128, torch.bfloat16))
    for M in (1, 4):
        assert any(c.kind == "mma_kw" for c in candidates(M, 4096, 4096, torch.device("cuda"), 4, 128, torch.bfloat16))
    for M in (1, 8, 16):
        assert any(c.kind == "mma_kb" for c in candidates(M, 4096, 4096, torch.device("cuda"), 4, 128, torch.bfloat16))
    assert not any(c.kind == "mma" for c in candidates(17, 4096, 4096, torch.device("cuda"), 4, 128, torch.bfloat16))


@needs_sm90
@pytest.mark.parametrize("kind,M", [("mma_kw", 1), ("gemv", 1), ("mma", 4), ("mma", 16), ("mma_kb", 16)])
def test_pdl_chain_reads_the_previous_output(kind, M):
    """Launched with programmatic dependent launch a kernel starts while the one before it still runs: a chain in
    which each matmul's input is the previous one's output (eager, and replayed in a CUDA graph) must equal the same
    chain launched plainly. A read of the activations before ``griddepcontrol.wait`` would see the old values."""
    from auto_quant.kernels.dispatch import Workspace, candidates, launch

    N = K = 4096  # 8 MB at 4 bits: launched with PDL by default
    weights = [quantized_weight(N, K, 128, True, seed=s) for s in range(4)]
    cfg = next(c for c in candidates(M, N, K, torch.device("cuda"), 4, 128, torch.bfloat16) if c.kind == kind)
    ws = Workspace()
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)

    def chain(pdl):  # each kernel reads the output of the one launched just before it
        y = x
        for w in weights:
            y = launch(y, w, None, cfg, ws, pdl=pdl)
        return y

    plain = chain(False)  # split-K sums in any order: equal to rounding, not bit for bit
    assert torch.isfinite(plain).all() and rel_err(chain(True), plain) < 1e-2
    static = torch.empty_like(plain)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static.copy_(chain(True))
    for _ in range(3):
        static.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(static, plain) < 1e-2


@needs_sm90
@pytest.mark.parametrize("N", [1001, 1002, 1004])
def test_mma_split_k_vector_widths(N):
    """The split-K epilogue adds one, two or four consecutive output columns per instruction, as ``N`` allows
    (odd, even, a multiple of four), with the last column tile partial: every row right, the workspace left clean."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import KernelConfig, Workspace, launch

    K = 2048
    kw = quantized_weight(N, K, 128, False, seed=N)
    W = dequantize(kw).double()
    ws = Workspace()
    bias = torch.randn(N, device="cuda").to(torch.bfloat16)
    for M, cfg in ((3, KernelConfig("mma", 8, 64, 128, 4, 4, 2)), (16, KernelConfig("mma", 16, 128, 128, 8, 4, 3)),
                   (13, KernelConfig("mma", 16, 256, 128, 2, 8, 2))):
        x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
        ref = x.double() @ W.t() + bias.double()
        y = launch(x, kw, bias, cfg, ws)
        for m in range(M):
            assert rel_err(y[m], ref[m]) < TOL, (N, M, m, cfg, rel_err(y[m], ref[m]))
    torch.cuda.synchronize()
    for acc, cnt in ws._bufs.values():
        assert not acc.any() and not cnt.any()


@needs_sm90
@pytest.mark.parametrize("N", [1001, 1003, 40])
def test_3bit_odd_column_counts(N):
    """3 bits: the high words come a column pair per word, so an odd last column shares its word with a column that
    does not exist; every mma kind's first tiles at 1 and 16 rows and the tdot kernel's at 16 (the last column
    checked on its own)."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, launch, tdot_candidates
    from auto_quant.kernels.mma_plan import mma_candidates, mma_kb_candidates, mma_kw_candidates

    K = 2048
    kw = quantized_weight(N, K, 128, N % 2 == 0, seed=N, bits=3)
    W = dequantize(kw).double()
    ws = Workspace()

    def tdot(M, N, K, gs, sms, bits):  # the mma plans' argument order
        return tdot_candidates(M, N, K, bits, gs, sms)

    for M, plans in ((1, (mma_candidates, mma_kw_candidates, mma_kb_candidates)),
                     (16, (mma_candidates, mma_kb_candidates, tdot))):
        x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
        ref = x.double() @ W.t()
        for plan in plans:
            for cfg in plan(M, N, K, 128, 132, 3)[:3]:
                y = launch(x, kw, None, cfg, ws)
                assert rel_err(y, ref) < TOL, (M, cfg)
                assert rel_err(y[:, -1], ref[:, -1]) < TOL, (M, cfg)

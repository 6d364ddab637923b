"""The ``mma_tma`` kernel (``mma_kb`` fed by a TMA ring; 1-16 activation rows, 2, 4 and 8 bits) against the float64
reference product, on the GPU (``pytest -m gpu``). Skipped without an sm_90 GPU (the only one it is offered on)."""

from __future__ import annotations

import pytest
import torch
from gluon_helpers import needs_sm90, quantized_weight, rel_err

pytestmark = pytest.mark.gpu

TOL = 8e-3

FORMATS = [(4, 128, True), (4, 128, False), (4, 32, True), (4, -1, False), (8, 128, True), (8, -1, False),
           (8, 32, False), (2, 64, True), (2, 128, False), (2, -1, True)]


@needs_sm90
@pytest.mark.parametrize("bits,group_size,sym", FORMATS)
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_mma_tma_every_candidate(bits, group_size, sym, dt):
    """Every tile and ring depth the tuner may time, at 1-16 rows with a bias, each row checked on its own (a slice,
    slot or row mix-up shows there). 960 columns: 15-60 column tiles, not a power of two."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, launch
    from auto_quant.kernels.mma_plan import mma_tma_candidates

    N, K = 960, 4096
    kw = quantized_weight(N, K, group_size, sym, seed=group_size + sym + bits, bits=bits)
    W = dequantize(kw).double()
    ws = Workspace()
    bias = torch.randn(N, device="cuda").to(dt)
    for M in (1, 5, 8, 9, 16):
        x = torch.randn(M, K, device="cuda").to(dt)
        ref = x.double() @ W.t() + bias.double()
        cands = mma_tma_candidates(M, N, K, group_size, 132, bits)
        assert len(cands) >= 8 and all(c.kind == "mma_tma" for c in cands)
        for cfg in cands:
            y = launch(x, kw, bias, cfg, ws)
            assert y.dtype == dt and torch.isfinite(y).all()
            for m in range(M):
                assert rel_err(y[m], ref[m]) < TOL, (M, m, cfg, rel_err(y[m], ref[m]))


@needs_sm90
def test_mma_tma_strided_rows_long_inputs_and_refusals():
    """Activation rows with a stride, long inputs (many ring turns per slice), every warp count; a layer whose columns
    do not fill the tiles, or whose slices hold fewer tiles than the ring, is refused with a message naming why."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import KernelConfig, Workspace, launch

    N, K = 256, 14336
    kw = quantized_weight(N, K, 128, False, seed=8)
    W = dequantize(kw).double()
    ws = Workspace()
    wide = torch.randn(16, K + 64, device="cuda").to(torch.bfloat16)
    for warps, bn, bm, stages, M in ((8, 16, 16, 2, 16), (8, 32, 8, 4, 7), (4, 64, 16, 4, 11), (4, 16, 8, 8, 1),
                                     (2, 32, 16, 8, 16), (2, 64, 8, 3, 3), (4, 32, 8, 5, 2)):
        x = wide[:M, :K]
        ref = x.double() @ W.t()
        y = launch(x, kw, None, KernelConfig("mma_tma", bm, bn, 128, 1, warps, stages), ws)
        for m in range(M):
            assert rel_err(y[m], ref[m]) < TOL, (m, warps, bn, bm, stages, M)
    x = torch.randn(1, 2048, device="cuda").to(torch.bfloat16)
    with pytest.raises(ValueError, match="N % block_n"):
        launch(x, quantized_weight(200, 2048, 128, True, seed=9), None, KernelConfig("mma_tma", 8, 16, 128, 1, 8, 2),
               ws)
    with pytest.raises(ValueError, match="at least num_stages tiles"):
        launch(x, quantized_weight(256, 2048, 128, True, seed=9), None, KernelConfig("mma_tma", 8, 16, 128, 1, 8, 4),
               ws)


@needs_sm90
def test_mma_tma_every_launch_right():
    """Many programs per multiprocessor, repeated launches, on the Llama shape: every launch matches the reference."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, launch
    from auto_quant.kernels.mma_plan import mma_tma_candidates

    N, K = 4096, 4096
    kw = quantized_weight(N, K, 128, True, seed=7)
    W = dequantize(kw).double()
    ws = Workspace()
    for M in (1, 16):
        x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
        ref = x.double() @ W.t()
        for cfg in mma_tma_candidates(M, N, K, 128, 132):
            for _ in range(10):
                assert rel_err(launch(x, kw, None, cfg, ws), ref) < TOL, cfg

"""The Gluon ``wgmma`` kernel (sm_90 only; 2, 3, 4 and 8 bits) against the float64 reference product, on the GPU
(``pytest -m gpu``).

Skipped without CUDA (``conftest``) and on GPUs other than sm_90, where the kernel is never chosen.
"""

from __future__ import annotations

import pytest
import torch
from gluon_helpers import needs_sm90, quantized_weight, rel_err

pytestmark = pytest.mark.gpu

TOL = 8e-3


@needs_sm90
@pytest.mark.parametrize("bits,group_size,sym", [(4, 128, True), (4, 128, False), (4, 64, True), (4, -1, False),
                                                 (8, 128, True), (8, -1, False), (8, 64, False),
                                                 (2, 64, True), (2, 128, False), (2, -1, True),
                                                 (3, 128, True), (3, 64, False), (3, -1, True)])
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_wgmma_every_candidate(bits, group_size, sym, dt):
    """Every tile and split the tuner may time, at every row bucket, with a bias; split-K leaves its workspace clean."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, launch
    from auto_quant.kernels.wgmma_plan import wgmma_candidates

    N, K = 1024, 2048
    kw = quantized_weight(N, K, group_size, sym, seed=group_size + sym + bits, bits=bits)
    W = dequantize(kw).double()
    ws = Workspace()
    bias = torch.randn(N, device="cuda").to(dt)
    for M in (2, 16, 40, 100, 256, 600):
        x = torch.randn(M, K, device="cuda").to(dt)
        ref = x.double() @ W.t() + bias.double()
        for cfg in wgmma_candidates(M, N, K, group_size, 132, 232448, bits):
            y = launch(x, kw, bias, cfg, ws)
            assert y.dtype == dt and torch.isfinite(y).all()
            assert rel_err(y, ref) < TOL, (M, cfg, rel_err(y, ref))
    torch.cuda.synchronize()
    for acc, cnt in ws._bufs.values():
        assert not acc.any() and not cnt.any()


@needs_sm90
def test_wgmma_split_k_partial_column_tiles():
    """Split-K on a layer whose columns fill no tile size (1000 = 3 x 256 + 232): the vector reductions of the
    epilogue stop at the last column, every tile the tuner may time at 100 and 256 rows is right, the workspace clean."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, launch
    from auto_quant.kernels.wgmma_plan import wgmma_candidates

    N, K = 1000, 4096
    kw = quantized_weight(N, K, 128, True, seed=11)
    W = dequantize(kw).double()
    ws = Workspace()
    for M in (100, 256):
        x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
        ref = x.double() @ W.t()
        cands = [c for c in wgmma_candidates(M, N, K, 128, 132, 232448) if c.split_k > 1]
        assert cands
        for cfg in cands:
            y = launch(x, kw, None, cfg, ws)
            assert rel_err(y, ref) < TOL, (M, cfg, rel_err(y, ref))
    torch.cuda.synchronize()
    for acc, cnt in ws._bufs.values():
        assert not acc.any() and not cnt.any()


@needs_sm90
def test_wgmma_operand_registers_across_tiles():
    """The loop builds two tiles per iteration so that no operand is carried round it: carried operands were
    copied for the wait while the wgmma still read the original registers, and on an H100 these configurations
    (two or more programs per multiprocessor) were wrong in 30 of 30 launches, 1e22 at worst. Every launch must
    now be right."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import KernelConfig, Workspace, launch

    ws = Workspace()
    for N, K, M, cfg in ((14336, 4096, 16, KernelConfig("wgmma", 16, 64, 128, 1, 4, 6)),
                         (4096, 4096, 64, KernelConfig("wgmma", 64, 128, 128, 1, 4, 4)),
                         (4096, 4096, 64, KernelConfig("wgmma", 64, 128, 64, 2, 8, 4)),
                         (4096, 4096, 256, KernelConfig("wgmma", 256, 128, 64, 1, 8, 4))):
        kw = quantized_weight(N, K, 128, True, seed=N + M)
        x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
        ref = x.double() @ dequantize(kw).double().t()
        errs = [rel_err(launch(x, kw, None, cfg, ws), ref) for _ in range(20)]
        assert max(errs) < TOL, (cfg, sum(not e < TOL for e in errs), max(errs))


@needs_sm90
def test_wgmma_partial_tiles_and_unaligned_rows():
    """Partial tiles in every dimension (TMA fills them with zeros), an odd number of K tiles, and activation rows
    that are not 16-byte aligned (copied first)."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import KernelConfig, Workspace, quant_matmul

    ws = Workspace()
    for N, K, gs, bits in ((4100, 1000, -1, 4), (200, 3 * 128, 128, 4), (1028, 64 * 9, 64, 4), (4100, 1000, -1, 8),
                           (1028, 64 * 9, 64, 2), (200, 3 * 128, 128, 8), (1032, 64 * 9, 64, 3)):
        kw = quantized_weight(N, K, gs, False, seed=N, bits=bits)
        W = dequantize(kw).double()
        for dt in (torch.float16, torch.bfloat16):
            base = torch.randn(37, K + 8, device="cuda").to(dt)
            for x in (base[:, :K], base[:, 2:2 + K]):  # strided rows; then also misaligned
                ref = x.double() @ W.t()
                for cfg in (KernelConfig("wgmma", 16, 64, 64, 1, 4, 3), KernelConfig("wgmma", 32, 128, 64, 2, 8, 4),
                            KernelConfig("wgmma", 64, 64, 64, 3, 4, 4)):
                    y = quant_matmul(x, kw, config=cfg, workspace=ws)
                    assert torch.isfinite(y).all() and rel_err(y, ref) < TOL, (N, K, bits, dt, cfg, rel_err(y, ref))
    torch.cuda.synchronize()
    for acc, cnt in ws._bufs.values():
        assert not acc.any() and not cnt.any()


@needs_sm90
def test_wgmma_is_the_untuned_choice_on_sm90():
    """On sm_90 the untuned default for 2/4/8-bit layers with 9+ rows is the wgmma kernel (fp16/bf16; 1-2 rows the
    mma_kw kernel, 3-8 the mma kernel), not for fp32 activations or 32-input groups."""
    from auto_quant.kernels.dispatch import default_config

    cuda = torch.device("cuda")
    for M in (2, 16, 256, 1024):
        for bits in (2, 3, 4, 8):
            want = "mma_kw" if M <= 2 else ("mma" if M <= 8 else "wgmma")
            assert default_config(M, 4096, 4096, cuda, bits, 128, torch.bfloat16).kind == want
    assert default_config(16, 4096, 4096, cuda, 4, 128, torch.float32).kind != "wgmma"
    assert default_config(16, 4096, 4096, cuda, 4, 32, torch.float16).kind != "wgmma"
    assert default_config(1, 4096, 4096, cuda, 4, 128, torch.float16).kind == "mma_kw"

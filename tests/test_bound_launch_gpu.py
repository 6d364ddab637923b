"""Bound launches (``kernels/bound_launch.py``): an eager layer call replays its recorded kernel launch with new
activations. On a real GPU (``pytest -m gpu``; skipped without CUDA)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from test_kernels_gpu import TOL, quantized_weight, rel_err

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("M", [1, 16, 64])
def test_every_small_row_candidate_binds_and_replays(M):
    """Each variant the tuner may pick at decode sizes (every kernel kind, with and without split-K), recorded
    once, replays with new activations to the result of a full launch, and keeps none of the recorded call's
    tensors. Dequantize + cuBLAS (two launches) does not bind."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.bound_launch import LaunchRecord
    from auto_quant.kernels.dispatch import Workspace, candidates, launch, quant_matmul, wgmma_device

    N, K = 4096, 4096
    dev = torch.device("cuda")
    ws = Workspace()
    kinds = set()
    for bits, gs, sym in ((4, 128, True), (3, 32, False), (8, -1, True)):
        kw = quantized_weight(N, K, bits, gs, sym, seed=N + K + bits)
        W = dequantize(kw).double()
        for cfg in candidates(M, N, K, dev, bits, gs):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            record = LaunchRecord()
            try:
                quant_matmul(x, kw, config=cfg, workspace=ws, record=record)
            except Exception as e:  # out of shared memory / registers: the tuner skips such a variant too
                assert "OutOfResources" in type(e).__name__ or "out of resource" in str(e).lower(), (cfg, e)
                continue
            bound = record.bind()
            if cfg.kind == "dequant":
                assert bound is None
                continue
            assert bound is not None, cfg
            kinds.add(cfg.kind)
            assert all(bound.args[j] is None for j in (*bound.x_slots, *bound.out_slots))
            assert all(bound.args[j].base is None for j in bound.desc_slots)
            x_new = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            y = bound(x_new)
            assert rel_err(y, x_new.double() @ W.t()) < TOL, (bits, gs, cfg)
            assert rel_err(y, launch(x_new, kw, None, cfg, ws)) < 1e-3, cfg
    wgmma = {"wgmma"} if wgmma_device(dev) else set()
    expected = {1: {"gemv", "mma_kw", "mma_kb", "fma"}, 16: {"gemv", "mma", "tdot"} | wgmma, 64: {"tdot"} | wgmma}[M]
    assert expected <= kinds, kinds
    torch.cuda.synchronize()
    for acc, cnt in ws._bufs.values():
        assert not acc.any() and not cnt.any()


def attached_layer(N, K, bits=4, group_size=128, sym=True, bias=False):
    """A QuantLinear on the GPU with the ``triton`` backend attached (its own tuner), and its float64 weight."""
    from auto_quant.inference.backends import attach_backends
    from auto_quant.inference.qlinear import QuantLinear
    from auto_quant.quant import QuantSpec, quantize_weight

    torch.manual_seed(0)
    qw = quantize_weight(torch.randn(N, K), QuantSpec(bits=bits, group_size=group_size, sym=sym))
    b = torch.randn(N, dtype=torch.float16) if bias else None
    q = QuantLinear.from_quantized(qw, b, layout="gptq").cuda()
    holder = torch.nn.Sequential(q)
    assert set(attach_backends(holder, tuning_cache=None).values()) == {"triton"}
    return q, q.dequantize_weight(torch.float64), None if b is None else b.cuda().double()


def test_a_layers_second_call_takes_the_bound_launch():
    """The first decode-sized call binds its launch; later calls of that shape skip the full path (quant_matmul)
    and are right, also under CUDA-graph capture; other strides, alignments and prefill sizes take the full path."""
    q, W, b = attached_layer(2048, 1024, bias=True)
    layer = q.kernel.run
    x = torch.randn(1, 1, 1024, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        q(x)
        assert len(layer.bound) == 1
        with mock.patch("auto_quant.inference.triton_backend.quant_matmul", side_effect=AssertionError("full path")):
            for _ in range(3):
                x = torch.randn(1, 1, 1024, device="cuda", dtype=torch.float16)
                y = q(x)
                assert y.shape == (1, 1, 2048) and rel_err(y, x.double() @ W.t() + b) < TOL
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                y = q(x)
            for _ in range(2):
                x.copy_(torch.randn_like(x))
                g.replay()
                assert rel_err(y, x.double() @ W.t() + b) < TOL
        strided = torch.randn(1024, 2, device="cuda", dtype=torch.float16).t()[:1]  # a stride of 2 along K
        odd = torch.randn(1025, device="cuda", dtype=torch.float16)[1:].view(1, 1024)  # 2-byte aligned
        prefill = torch.randn(2, 100, 1024, device="cuda", dtype=torch.float16)
        for xs in (strided, odd, prefill):
            y = q(xs)
            assert rel_err(y, xs.double() @ W.t() + b) < TOL
        assert len(layer.bound) in (1, 2)  # the 2-byte aligned row may bind (its own key); the others may not


def test_eager_decode_with_bound_launches_matches_the_reference():
    """A small Llama decoding token by token eagerly (dynamic cache): the logits of every step with the ``triton``
    layers (bound launches from the second step) match the torch reference path's."""
    from test_kernels_gpu import quantized_llama

    from auto_quant.inference.backends import attach_backends, detach_backends

    model = quantized_llama(2, group_size=64, sym=False, seed=0)
    ids = torch.randint(0, 512, (1, 6), device="cuda")
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
        attach_backends(model, tuning_cache=None)
        out = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
        layers = [m.kernel.run for m in model.modules() if getattr(m, "backend", None) == "triton"]
        detach_backends(model)
    assert layers and all(len(layer.bound) >= 2 for layer in layers)  # the prompt's 6 rows and the decode's 1
    for a, r in zip(out.logits, ref.logits):
        assert rel_err(a, r) < 1e-2

"""The ``marlin`` adapter's guards (zero points, keyword drift, the check against the reference), and the adapter
itself on a GPU where GPTQModel or vLLM is installed (neither is in CI nor on the device machine)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from auto_quant.errors import BackendError
from auto_quant.inference import marlin
from auto_quant.inference.qlinear import QuantLinear
from auto_quant.quant import QuantSpec, quantize_weight


def make_layer(bits=4, group_size=128, sym=True, out_f=128, in_f=256, bias=True, device="cpu"):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g)
    qw = quantize_weight(w, QuantSpec(bits=bits, group_size=group_size, sym=sym))
    b = torch.randn(out_f, generator=g) if bias else None
    return QuantLinear.from_quantized(qw, b, layout="gptq", bias_dtype=torch.float32).to(device)


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_layers_have_the_zero_point_marlin_applies(bits):
    marlin.check_zero_points(make_layer(bits=bits))


def test_a_layer_with_other_zero_points_is_refused():
    with pytest.raises(BackendError, match=r"zero point 8 .* stores others .*backend='triton'"):
        marlin.check_zero_points(make_layer(sym=False))


def test_the_reference_check_passes_the_reference_and_refuses_a_misplaced_bias():
    layer = make_layer()
    assert marlin.check_against_reference(layer, layer.forward_reference, torch.float32) < 1e-6

    def bias_rotated(x):  # what an unpermuted bias handed to a kernel that permutes it looks like
        return layer.forward_reference(x) - layer.bias + layer.bias.roll(1)

    with pytest.raises(BackendError, match=r"from the reference on a 256->128 layer"):
        marlin.check_against_reference(layer, bias_rotated, torch.float32)
    with pytest.raises(BackendError, match=r"nan \(relative\)"):
        marlin.check_against_reference(layer, lambda x: torch.full((x.shape[0], 128), float("nan")), torch.float32)
    with pytest.raises(BackendError, match=r"returned shape \(2, 64\)"):
        marlin.check_against_reference(layer, lambda x: layer.forward_reference(x)[:, :64], torch.float32)


def test_keywords_a_function_does_not_take_are_dropped():
    def old(w, perm, size_k):
        return (w, perm, size_k)

    def new(w, size_k, **kwargs):
        return (w, size_k, kwargs)

    assert marlin.call_supported(old, 1, perm=2, size_k=3, is_a_8bit=False) == (1, 2, 3)
    assert marlin.call_supported(new, 1, perm=2, size_k=3) == (1, 3, {"perm": 2})
    with pytest.raises(TypeError):  # a missing required argument still fails loudly
        marlin.call_supported(old, 1, size_k=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only answer")
def test_on_cpu_prepare_says_why_marlin_cannot_serve():
    """Without either package the error names them; with GPTQModel installed (it is in CI) its own refusal of a CPU
    layer comes back as a BackendError, which automatic selection turns into 'use the next backend'."""
    installed = [p for p in ("gptqmodel", "vllm") if importlib.util.find_spec(p)]
    why = r"(GptqModelMarlin|VllmMarlin): " if installed else r"neither gptqmodel nor vllm"
    want = r"marlin could not serve this layer: " + why
    with pytest.raises(BackendError, match=want):
        marlin.prepare(make_layer())


@pytest.mark.gpu
@pytest.mark.skipif(not any(importlib.util.find_spec(p) for p in ("gptqmodel", "vllm")),
                    reason="needs gptqmodel or vllm")
@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, -1), (8, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_marlin_matches_the_reference_on_the_gpu(bits, group_size, dtype):
    from auto_quant.inference.backends import AttachContext, attach_layer

    layer = make_layer(bits=bits, group_size=group_size, out_f=256, in_f=512, device="cuda")
    b = attach_layer(layer, "cuda", AttachContext(forced="marlin", act_dtype=dtype))
    assert b.name == "marlin"
    x = torch.randn(3, 5, 512, device="cuda", dtype=dtype)
    ref = layer.forward_reference(x.float())
    assert (layer(x).float() - ref).norm() / ref.norm() < 1e-2

"""GGUF blocks from tuned integer weights: exact against gguf-py, and the llama.cpp grids the tuner uses."""

import gguf
import numpy as np
import pytest
import torch

from auto_quant.errors import ConfigError, ExportError
from auto_quant.export.gguf.blocks import pack
from auto_quant.export.gguf.types import TENSOR_TYPES, fit_type, tensor_type_of_spec
from auto_quant.quant import QuantSpec, fake_quantize, quantize_weight
from auto_quant.quant import kquant
from auto_quant.quant.search import search_clip_coef
from auto_quant.tuning.wrapper import TunableLinear

LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
K = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


def _weight(rows=48, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[3, 7] = 0.4  # an outlier, as real weights have
    w[5, 320:352] = 0.0  # an all-zero block
    return w


def _tuned_state(spec, rows, cols, seed=1):
    """Rounding offsets and clipping coefficients like the tuner leaves them."""
    g = torch.Generator().manual_seed(seed)
    n_groups = cols // spec.group_size
    v = (torch.rand(rows, n_groups, spec.group_size, generator=g) - 0.5) * 0.9
    coef = 0.75 + 0.25 * torch.rand(rows, n_groups, generator=g)
    return v, coef


@pytest.mark.parametrize("name", LEGACY + K)
def test_blocks_decode_exactly_to_the_fake_quantized_weight(name):
    t = TENSOR_TYPES[name]
    w = _weight()
    v, coef = _tuned_state(t.spec, *w.shape)
    fq = fake_quantize(w, t.spec, v, coef, coef)
    qw = quantize_weight(w, t.spec, v, coef, coef)
    assert torch.equal(qw.dequantize(), fq)
    blocks = pack(qw, name)
    assert blocks.shape == (w.shape[0], w.shape[1] // t.block_size * t.type_size)
    decoded = gguf.quants.dequantize(blocks, t.qtype)
    np.testing.assert_array_equal(decoded, fq.numpy())
    assert ((fq - w) ** 2).mean() < 0.5 * (w**2).mean()  # and it is a real quantization of w


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_blocks_bit_identical_to_gguf_py(name):
    """gguf-py's own quantizer, given the dequantized values, writes the very same bytes."""
    t = TENSOR_TYPES[name]
    w = _weight(seed=3)
    coef = search_clip_coef(w, t.spec)
    cmin, cmax = coef if isinstance(coef, tuple) else (coef, coef)
    qw = quantize_weight(w, t.spec, None, cmin, cmax)
    ours = pack(qw, name)
    ref = gguf.quants.quantize(qw.dequantize().numpy().astype(np.float32), t.qtype)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("bits,name", [(4, "q4_0"), (5, "q5_0")])
def test_integer_sym_grid_is_the_legacy_grid(bits, name):
    """Our full-range symmetric int (zero 2^(b-1), signed scale) is Q4_0/Q5_0's d·(q - 2^(b-1)), d = max / -2^(b-1)."""
    spec = QuantSpec(bits=bits, group_size=32, sym=True)
    assert tensor_type_of_spec(spec) == name
    w = _weight(seed=4)
    qw = quantize_weight(w, spec)
    ours = pack(qw, name)
    np.testing.assert_array_equal(gguf.quants.dequantize(ours, TENSOR_TYPES[name].qtype), qw.dequantize().numpy())
    np.testing.assert_array_equal(ours, gguf.quants.quantize(qw.dequantize().numpy(), TENSOR_TYPES[name].qtype))


def test_integer_asym_maps_to_q4_1_up_to_the_fp16_min():
    """An integer zero point becomes Q4_1's float min -zero·scale, rounded to fp16: < 1 % of a step off."""
    spec = QuantSpec(bits=4, group_size=32, sym=False)
    assert tensor_type_of_spec(spec) == "q4_1"
    w = _weight(seed=5)
    qw = quantize_weight(w, spec)
    decoded = gguf.quants.dequantize(pack(qw, "q4_1"), gguf.GGMLQuantizationType.Q4_1)
    step = qw.scale.float().repeat_interleave(32, dim=1).numpy()
    assert np.abs(decoded - qw.dequantize().numpy()).max() <= (0.0075 * np.abs(step)).max()
    assert np.all(np.abs(decoded - qw.dequantize().numpy()) <= 0.0075 * np.abs(step) + 1e-12)


def test_8bit_integer_is_not_q8_0():
    """Q8_0 holds -127..127 (llama.cpp's dot products need it), so full-range 8-bit int has no GGUF type."""
    assert tensor_type_of_spec(QuantSpec(bits=8, group_size=32, sym=True)) is None
    w = _weight()
    qw = quantize_weight(w, QuantSpec(bits=8, group_size=32, sym=True))
    with pytest.raises(ExportError, match="-128"):
        pack(qw, "q8_0")


@pytest.mark.parametrize("name", K + ("q8_0", "q4_1"))
def test_grids_are_differentiable_and_bake_to_the_same_values(name):
    spec = TENSOR_TYPES[name].spec
    layer = torch.nn.Linear(512, 32, bias=False)
    with torch.no_grad():
        layer.weight.copy_(_weight(32, 512, seed=6))
    wrap = TunableLinear(layer, spec)
    x = torch.randn(2, 5, 512)
    wrap(x).pow(2).sum().backward()
    assert wrap.v.grad is not None and wrap.v.grad.abs().sum() > 0
    assert wrap.max_coef.grad is not None and wrap.max_coef.grad.abs().sum() > 0
    with torch.no_grad():
        wrap.v.uniform_(-0.4, 0.4)
        wrap.max_coef.uniform_(0.8, 1.0)
        soft = wrap.qdq_weight().clone()
    qw = wrap.bake()
    assert torch.equal(qw.dequantize(), soft)
    assert torch.equal(layer.weight.data, soft)


def test_k_grid_parameters_follow_llama_cpp_ranges():
    w = _weight(seed=7)
    for name in K:
        spec = TENSOR_TYPES[name].spec
        qw = quantize_weight(w, spec)
        f = kquant.FORMATS[name]
        assert int(qw.codes.max()) <= 2**f.bits - 1
        if f.sym:
            assert qw.sc.min() >= -f.super_levels and qw.sc.max() <= f.super_levels - 1 and qw.mins is None
        else:
            assert qw.sc.min() >= 0 and qw.sc.max() <= f.super_levels
            assert qw.mins.min() >= 0 and qw.mins.max() <= f.super_levels
        assert qw.d.dtype == torch.float16 and qw.d.shape == (w.shape[0], w.shape[1] // 256)


def test_native_grid_spec_validation():
    assert QuantSpec().to_dict() == {"bits": 4, "group_size": 128, "sym": True, "scale_dtype": "fp16"}  # int path unchanged
    assert QuantSpec(4, 32, False, fmt="q4_k").to_dict()["fmt"] == "q4_k"
    with pytest.raises(ConfigError, match="q4_k"):
        QuantSpec(bits=4, group_size=128, sym=False, fmt="q4_k")
    with pytest.raises(ConfigError, match="not a llama.cpp grid"):
        QuantSpec(bits=4, group_size=32, sym=False, fmt="q4_x")
    with pytest.raises(ConfigError, match="multiple of 256"):
        fake_quantize(torch.randn(4, 96), TENSOR_TYPES["q4_k"].spec)


def test_row_length_fallbacks_follow_llama_cpp():
    assert fit_type("q4_k", 512) == ("q4_k", None)
    assert fit_type("q4_k", 576)[0] == "q5_0"
    assert fit_type("q2_k", 576)[0] == "q4_0"
    assert fit_type("q3_k", 896)[0] == "q4_0"
    assert fit_type("q5_k", 96)[0] == "q5_1"
    assert fit_type("q6_k", 96)[0] == "q8_0"
    assert fit_type("q4_0", 100)[0] == "f16"
    assert fit_type("q6_k", 100)[0] == "f16"
    assert "not a multiple of 256" in fit_type("q4_k", 576)[1]

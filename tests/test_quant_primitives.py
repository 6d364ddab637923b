"""Round-trip and hand-computed checks of the pure quantization primitives."""

import pytest
import torch

from auto_quant.errors import ConfigError
from auto_quant.quant import QuantSpec, dequantize, fake_quantize, group_weight, quantize_weight, round_ste
from auto_quant.quant.search import search_clip_coef


def test_asym_hand_computed():
    # one group of 4 values in [-1, 2]: scale = 3/3 = 1, zero = round(1/1) = 1
    w = torch.tensor([[-1.0, 0.0, 0.6, 2.0]])
    spec = QuantSpec(bits=2, group_size=4, sym=False, scale_dtype=torch.float32)
    qw = quantize_weight(w, spec)
    assert qw.scale.item() == pytest.approx(1.0)
    assert qw.zero.item() == 1
    assert qw.codes.tolist() == [[0, 1, 2, 3]]
    assert dequantize(qw.codes, qw.scale, qw.zero, spec).tolist() == [[-1.0, 0.0, 1.0, 2.0]]


def test_sym_full_range_signed_scale():
    # max side dominates: scale = -max / 2^(b-1) (negative) so the max maps to -2^(b-1)
    w = torch.tensor([[-1.0, 0.5, 4.0, 2.0]])
    spec = QuantSpec(bits=4, group_size=4, sym=True, scale_dtype=torch.float32)
    qw = quantize_weight(w, spec)
    assert qw.scale.item() == pytest.approx(-0.5)
    assert qw.zero.item() == 8
    assert qw.codes.tolist() == [[10, 7, 0, 4]]  # round(w/-0.5)+8
    assert dequantize(qw.codes, qw.scale, qw.zero, spec).tolist() == [[-1.0, 0.5, 4.0, 2.0]]
    # min side dominates: positive scale, the min maps to code 0
    w2 = torch.tensor([[-4.0, 1.0, 2.0, 3.5]])
    qw2 = quantize_weight(w2, spec)
    assert qw2.scale.item() == pytest.approx(0.5)
    assert qw2.codes[0, 0].item() == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128, 48])
def test_roundtrip_and_error_bound(bits, sym, group_size):
    torch.manual_seed(bits * 7 + group_size)
    w = torch.randn(16, 200)  # 200 is a multiple of none of 32/64/128/48: the last group is padded
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, scale_dtype=torch.float32)
    qw = quantize_weight(w, spec)
    assert qw.codes.shape == (16, 200)
    assert int(qw.codes.max()) <= 2**bits - 1
    assert qw.scale.shape == (16, spec.groups(200))
    deq = qw.dequantize()
    assert torch.allclose(deq, fake_quantize(w, spec), atol=1e-6)
    # asym: every element within half a step (no clipping at coef 1); full-range sym: the
    # non-dominant side has one level fewer, so its extreme may be off by up to one step
    gs = 200 if group_size == -1 else group_size
    step = qw.scale.abs()[:, torch.arange(200) // gs]
    assert ((deq - w).abs() <= step * (1.0 if sym else 0.5) + 1e-5).all()
    # the padded tail is really quantized
    assert not torch.equal(deq[:, -8:], torch.zeros_like(deq[:, -8:]))


def test_scale_dtype_is_respected():
    w = torch.randn(4, 64)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        qw = quantize_weight(w, QuantSpec(4, 32, True, dt))
        assert qw.scale.dtype == dt


def test_all_zero_group_stays_finite():
    w = torch.zeros(2, 32)
    for sym in (True, False):
        qw = quantize_weight(w, QuantSpec(4, 32, sym))
        assert torch.isfinite(qw.scale.float()).all()
        assert torch.equal(qw.dequantize(), w)


def test_straight_through_gradient():
    x = torch.tensor([0.2, 1.7], requires_grad=True)
    round_ste(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0]
    w = torch.randn(4, 32)
    v = torch.zeros(4, 1, 32, requires_grad=True)
    coef = torch.ones(4, 1, requires_grad=True)
    fake_quantize(w, QuantSpec(4, 32, False), v, coef, coef).pow(2).sum().backward()
    assert v.grad is not None and coef.grad is not None and v.grad.abs().sum() > 0


def test_rounding_offset_moves_codes():
    w = torch.tensor([[0.26, 1.0, -1.0, 0.74]])
    spec = QuantSpec(2, 4, False, torch.float32)
    base = quantize_weight(w, spec).codes
    shifted = quantize_weight(w, spec, v=torch.full((1, 1, 4), 0.49)).codes
    assert (shifted >= base).all() and (shifted > base).any()


def test_group_weight_pads():
    g = group_weight(torch.ones(3, 10), 4)
    assert g.shape == (3, 3, 4)
    assert g[:, -1, 2:].abs().sum() == 0


@pytest.mark.parametrize("bad", [dict(bits=7), dict(bits=1), dict(bits=16), dict(group_size=0), dict(group_size=-2), dict(bits=True)])
def test_invalid_specs(bad):
    with pytest.raises(ConfigError) as e:
        QuantSpec(**{**dict(bits=4, group_size=128, sym=True), **bad})
    assert "bits" in str(e.value) or "group_size" in str(e.value)


def test_clip_search_never_worse_than_rtn():
    torch.manual_seed(0)
    w = torch.randn(32, 256) * torch.linspace(0.1, 3, 256)
    w[0, 0] = 25.0  # an outlier makes clipping worthwhile
    imp = torch.rand(256) + 0.1
    for spec in (QuantSpec(2, 64, True), QuantSpec(3, 128, False)):
        coef = search_clip_coef(w, spec, imp)
        err_rtn = ((fake_quantize(w, spec) - w) ** 2 * imp).sum()
        err = ((fake_quantize(w, spec, None, coef, coef) - w) ** 2 * imp).sum()
        assert err <= err_rtn + 1e-6
        assert err < err_rtn * 0.98

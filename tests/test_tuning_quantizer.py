"""The tuner's fake-quantizer: eager and torch.compile'd forms agree, and the config switch is validated."""

import pytest
import torch

from auto_quant.config import TuningConfig
from auto_quant.errors import ConfigError
from auto_quant.quant import QuantSpec, fake_quantize
from auto_quant.tuning.wrapper import TunableLinear, clamp_all, grouped_quantizer


def _wrapper(spec, out_f=48, in_f=200, quantizer=None, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    w = TunableLinear(lin, spec, quantizer=quantizer)
    with torch.no_grad():
        w.v.uniform_(-0.5, 0.5)
        w.min_coef.uniform_(0.7, 1.0)
        w.max_coef.uniform_(0.7, 1.0)
    return w


@pytest.mark.parametrize("sym", [True, False])
def test_wrapper_weight_is_the_functional_fake_quantize(sym):
    spec = QuantSpec(bits=3, group_size=64, sym=sym)
    w = _wrapper(spec)
    ref = fake_quantize(w.layer.weight.detach().float(), spec, w.v, w.min_coef, w.max_coef)
    assert torch.equal(w.qdq_weight(), ref)
    # the baked integer codes reproduce the tuned weight exactly
    qw = w.bake()
    assert torch.equal(qw.dequantize(torch.float32), ref.detach())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("sym", [True, False])
def test_compiled_quantizer_matches_eager_values_and_gradients(sym, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    spec = QuantSpec(bits=4, group_size=64, sym=sym)
    eager = _wrapper(spec, seed=1).to(device)
    compiled = _wrapper(spec, seed=1, quantizer=grouped_quantizer(spec, compile=True)).to(device)
    x = torch.randn(5, 200, device=device)
    outs = []
    for w in (eager, compiled):
        y = w(x)
        (y * torch.linspace(-1, 1, y.shape[-1], device=device)).sum().backward()
        outs.append((y.detach(), w.v.grad.clone(), w.min_coef.grad.clone(), w.max_coef.grad.clone()))
    (y_e, v_e, *coef_e), (y_c, v_c, *coef_c) = outs
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_c, v_e, rtol=1e-5, atol=1e-5)
    # eager rounds the scale's gradient to the fp16 scale dtype; the fused kernel keeps fp32,
    # so the coefficient gradients agree to fp16 precision and in sign
    for e, c in zip(coef_e, coef_c):
        torch.testing.assert_close(c, e, rtol=0, atol=2e-3 * float(e.abs().max()))
        assert torch.equal(torch.sign(c), torch.sign(e))


def test_clamp_all_projects_every_parameter():
    spec = QuantSpec(bits=4, group_size=64, sym=True)
    ws = [_wrapper(spec, seed=s) for s in range(3)]
    with torch.no_grad():
        for w in ws:
            w.v.mul_(4)
            w.min_coef.add_(0.5)
            w.max_coef.sub_(1.5)
    clamp_all(ws)
    for w in ws:
        assert w.v.abs().max() <= 0.5 and w.v.abs().max() > 0.49
        assert w.min_coef.max() <= 1.0 and w.max_coef.min() >= 0.0


def test_compile_and_graph_settings_are_validated():
    assert TuningConfig().compile is False and TuningConfig().cuda_graphs is False
    with pytest.raises(ConfigError, match="compile"):
        TuningConfig(compile="yes")
    with pytest.raises(ConfigError, match="cuda_graphs"):
        TuningConfig(cuda_graphs=1)


def _tune(arch, device, **kw):
    from auto_quant import AutoRound
    from tiny_models import tiny_model, token_data

    model = tiny_model(arch).to(device)
    ar = AutoRound(model, None, bits=4, group_size=32, iters=12, nsamples=8, seqlen=32, batch_size=4,
                   dataset=token_data(8, 32), device=device, progress=False, **kw)
    ar.quantize()
    return ar.outcome


def _assert_same_outcome(a, b):
    assert a.layers.keys() == b.layers.keys()
    for name, layer in a.layers.items():
        other = b.layers[name].weight
        assert torch.equal(layer.weight.codes, other.codes), name
        assert torch.equal(layer.weight.scale, other.scale), name
    for unit, res in a.units.items():
        assert b.units[unit].loss_after == res.loss_after
        assert b.units[unit].best_iter == res.best_iter


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_static_step_is_the_eager_step(arch):
    """The step a CUDA graph records, run directly on its fixed buffers, reproduces the eager loop bit for bit."""
    eager, static = _tune(arch, "cpu"), _tune(arch, "cpu", cuda_graphs=True)
    assert {r.step for r in eager.units.values()} == {"eager"}
    assert {r.step for r in static.units.values()} == {"static"}
    _assert_same_outcome(eager, static)


def test_static_step_declines_what_it_cannot_replay():
    from auto_quant.tuning.graphed import build_static_step
    from auto_quant.tuning.loop import UnitData

    spec = QuantSpec(bits=4, group_size=64, sym=True)
    w = _wrapper(spec)
    unit = torch.nn.Sequential(w)
    xs = [torch.randn(1, 3, 200) for _ in range(4)]
    ys = [torch.randn(1, 3, 48) for _ in range(4)]
    fwd = lambda u, h, c: u(h)  # noqa: E731
    params = ([w.v], [w.min_coef, w.max_coef])
    ok = build_static_step(unit, [w], UnitData(xs, ys, None, torch.device("cpu"), torch.float32), fwd,
                           TuningConfig(batch_size=2, cuda_graphs=True), *params)
    assert ok is not None
    masked = UnitData(xs, ys, None, torch.device("cpu"), torch.float32, masks=[torch.ones(3)] * 4)
    assert build_static_step(unit, [w], masked, fwd, TuningConfig(batch_size=2, cuda_graphs=True), *params) is None
    data = UnitData(xs, ys, None, torch.device("cpu"), torch.float32)
    assert build_static_step(unit, [w], data, fwd, TuningConfig(batch_size=2, gradient_accumulate_steps=2,
                                                                cuda_graphs=True), *params) is None
    assert build_static_step(unit, [w], data, fwd, TuningConfig(batch_size=2), *params) is None  # off by default


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cuda_graph_tuning_matches_eager(arch):
    """With cuda_graphs=True each block's step is recorded once and replayed; the outcome equals the eager loop's."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    graphed = _tune(arch, "cuda", cuda_graphs=True)
    assert {r.step for r in graphed.units.values()} == {"cuda_graph"}  # recorded, not a fallback
    eager = _tune(arch, "cuda")
    for name, layer in eager.layers.items():
        same = (graphed.layers[name].weight.codes == layer.weight.codes).float().mean()
        assert same > 0.999, (name, float(same))
    for unit, res in eager.units.items():
        assert graphed.units[unit].loss_after == pytest.approx(res.loss_after, rel=1e-3)


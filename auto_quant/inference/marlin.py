"""The ``marlin`` backend: Marlin kernels from GPTQModel (preferred) or vLLM, when installed.

Neither package is a dependency of auto_quant, and neither is installed in its CI or on the GPU machine its
GPU tests run on, so the adapters below are written against the packages' published sources (GPTQModel 6.x-7.x:
``MarlinQuantLinear``, renamed ``MarlinLinear``; vLLM up to and past the release that dropped act-order from
``gptq_marlin_repack``) and guarded at run time:

* **Zero points.** Marlin's GPTQ kernels never read ``qzeros``: the weight is ``(code - 2 ** (bits - 1)) * scale``
  (vLLM's ``uint4b8`` / ``uint8b128``). A layer whose stored zeros differ is refused (:func:`check_zero_points`).
* **Keyword drift.** Calls into vLLM pass only the keywords its installed functions take (:func:`call_supported`);
  the bias is added after the kernel, since newer vLLM permutes a bias it is given and older vLLM did not.
* **A numerical check per layer.** The prepared layer runs two random activation rows once and must match the
  torch reference (:func:`check_against_reference`). A mismatch, or any error from the package, is a
  :class:`~auto_quant.errors.BackendError`: automatic selection then logs one warning and uses the next backend
  (``triton``) for the rest of the model; ``backend="marlin"`` raises it.

It serves symmetric 4/8-bit GPTQ-layout layers with group sizes -1/32/64/128, ``in_features % 128 == 0`` and
``out_features % 64 == 0`` (the registry entry declares exactly that). The checkpoint's ``qweight`` (codes packed
along the input dimension, 32/bits per int32, lowest bits first) is what both packages' ``gptq_marlin_repack``
reads.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable

import torch

from auto_quant.errors import BackendError

# the relative Frobenius error a prepared layer may show against the reference: half-precision rounding of a
# K-long dot product stays near 1e-3, a wrong layout or permutation is of order 1
REFERENCE_TOLERANCE = 2e-2


def supported_kwargs(fn: Callable, **kwargs) -> dict:
    """``kwargs`` without the keywords ``fn`` does not take (all of them if it has ``**kwargs``)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params}
    return {k: v for k, v in kwargs.items() if k in names}


def call_supported(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` without the keywords ``fn`` does not take."""
    return fn(*args, **supported_kwargs(fn, **kwargs))


def check_zero_points(module) -> None:
    """Raise unless every zero point of ``module`` is ``2 ** (bits - 1)``, the only one Marlin's GPTQ kernels apply."""
    zero = module.zero_points()
    middle = 2 ** (module.bits - 1)
    if bool((zero != middle).any()):
        found = sorted({int(z) for z in zero.unique()[:4]})
        raise BackendError(f"marlin applies the zero point {middle} to every {module.bits}-bit weight and this layer "
                           f"stores others ({found}...); use backend='triton'")


def check_against_reference(module, run: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype,
                            rows: int = 2, tolerance: float = REFERENCE_TOLERANCE) -> float:
    """Run ``rows`` random activation rows through ``run`` and through the torch reference (dequantize, then
    ``F.linear``); returns the relative Frobenius error, or raises :class:`BackendError` above ``tolerance``."""
    dev = module.qweight.device
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(rows, module.in_features, generator=gen, device=dev, dtype=torch.float32).to(dtype)
    with torch.no_grad():
        got = run(x).float()
        want = module.forward_reference(x.float())
    if got.shape != want.shape:
        raise BackendError(f"the marlin layer returned shape {tuple(got.shape)} for {tuple(want.shape)}")
    err = float((got - want).norm() / want.norm().clamp_min(1e-12))
    if not err <= tolerance:  # also catches NaN
        raise BackendError(f"the marlin layer's output is {err:.3g} (relative) from the reference on a "
                           f"{module.in_features}->{module.out_features} layer (tolerance {tolerance}): the "
                           "installed package's kernel API may have changed; use backend='triton'")
    return err


def _marlin_linear_class():
    from gptqmodel.nn_modules.qlinear import marlin

    cls = getattr(marlin, "MarlinLinear", None) or getattr(marlin, "MarlinQuantLinear", None)
    if cls is None:
        raise BackendError("gptqmodel has neither MarlinLinear nor MarlinQuantLinear")
    return cls


class GptqModelMarlin:
    def __init__(self, module, dtype: torch.dtype):
        dev = module.qweight.device
        # GPTQModel 7 builds its fp16 or bf16 kernel from `dtype` (and creates scales and bias in it); 6 ignores it
        m = call_supported(_marlin_linear_class(), bits=module.bits, group_size=module.group_size, desc_act=False,
                           sym=True, in_features=module.in_features, out_features=module.out_features,
                           bias=module.bias is not None, dtype=dtype)
        m = m.to(dev)
        with torch.no_grad():
            m.qweight.data = module.qweight.detach().clone()
            m.scales.data = module.scales.detach().to(dtype).clone()
            m.g_idx.data = (torch.arange(module.in_features, device=dev, dtype=torch.int32)
                            // (module.in_features if module.group_size == -1 else module.group_size))
            if module.bias is not None:
                m.bias = torch.nn.Parameter(module.bias.detach().to(dtype).clone(), requires_grad=False)
        m.post_init()
        self.layer, self.dtype = m, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.layer(x.reshape(-1, x.shape[-1]).to(self.dtype))
        return y.reshape(*lead, y.shape[-1]).to(x.dtype)


def _vllm_scalar_types():
    try:
        from vllm.scalar_type import scalar_types
    except ImportError:
        from vllm.backends.compute.scalar_type import scalar_types
    return scalar_types


class VllmMarlin:
    def __init__(self, module, dtype: torch.dtype):
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.quantization.utils import marlin_utils as mu

        dev = module.qweight.device
        self.dtype = dtype
        self.in_features, self.out_features = module.in_features, module.out_features
        empty = torch.empty(0, dtype=torch.int32, device=dev)
        qweight = call_supported(ops.gptq_marlin_repack, module.qweight.contiguous(), perm=empty,
                                 size_k=module.in_features, size_n=module.out_features, num_bits=module.bits)
        scales = call_supported(mu.marlin_permute_scales, module.scales.to(dtype).contiguous(),
                                size_k=module.in_features, size_n=module.out_features, group_size=module.group_size)
        self.bias = None if module.bias is None else module.bias.to(dtype)
        types = _vllm_scalar_types()
        # every argument but the input, filtered once here (inspecting a signature per call would cost the host more
        # than the kernel at decode sizes)
        self.apply = functools.partial(mu.apply_gptq_marlin_linear, **supported_kwargs(
            mu.apply_gptq_marlin_linear, weight=qweight, weight_scale=scales, weight_zp=empty, g_idx=empty,
            g_idx_sort_indices=empty, workspace=mu.marlin_make_workspace_new(dev),
            wtype=types.uint4b8 if module.bits == 4 else types.uint8b128, output_size_per_partition=self.out_features,
            input_size_per_partition=self.in_features, is_k_full=True, bias=None))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.apply(input=x.reshape(-1, self.in_features).to(self.dtype))
        if self.bias is not None:  # after the kernel: vLLM versions differ in how a bias given to it is laid out
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)


def prepare(module, ctx=None):
    """The layer through GPTQModel's Marlin, else vLLM's, checked once against the reference (module docstring)."""
    dtype = getattr(ctx, "act_dtype", None) or torch.float16
    check_zero_points(module)
    builders = [b for name, b in (("gptqmodel", GptqModelMarlin), ("vllm", VllmMarlin))
                if importlib.util.find_spec(name) is not None]
    failures = []
    for build in builders:
        try:
            run = build(module, dtype)
            check_against_reference(module, run, dtype)
            return run
        except Exception as e:  # a third-party package's own errors (JIT build, API change) and our checks alike
            failures.append(f"{build.__name__}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    raise BackendError("marlin could not serve this layer: " + ("; ".join(failures) or "neither gptqmodel nor vllm "
                                                                "is installed (pip install gptqmodel (or vllm))"))

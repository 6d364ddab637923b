"""A linear layer whose weight is fake-quantized with learnable rounding and clipping."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from auto_quant.models.discovery import Conv1D, weight_as_out_in
from auto_quant.quant import (
    QuantSpec,
    QuantizedWeight,
    fake_quantize_grouped,
    group_weight,
    qparams_from_range,
    ungroup_weight,
    weight_range,
)
from auto_quant.quant.search import coef_pair

V_BOUND = 0.5  # the rounding offset stays in [-V_BOUND, V_BOUND]
COEF_RANGE = (0.0, 1.0)  # clipping coefficients of the min and the max side

# (wg, wmin, wmax, v, min_coef, max_coef, in_features) -> fake-quantized [out, in] weight
GroupedQuantizer = Callable[..., torch.Tensor]


def grouped_quantizer(spec: QuantSpec, compile: bool = False) -> GroupedQuantizer:
    """The integer fake-quantizer of one spec, optionally through ``torch.compile``.

    Compiled, its ~20 elementwise operations (and their backward) become a few fused kernels:
    on a GPU the tuning step is otherwise bound by kernel launches for small models. Fused
    arithmetic may differ from eager in the last bit of a division, which can move a value
    that sits exactly on a rounding boundary; the exported codes always come from the eager
    :meth:`TunableLinear.bake`.
    """

    def qdq(wg, wmin, wmax, v, min_coef, max_coef, in_features: int) -> torch.Tensor:
        return ungroup_weight(fake_quantize_grouped(wg, wmin, wmax, spec, v, min_coef, max_coef), in_features)

    # emulate_precision_casts: keep the fp16 rounding of the scales (Inductor would otherwise fuse it away)
    return torch.compile(qdq, dynamic=False, options={"emulate_precision_casts": True}) if compile else qdq


@torch.no_grad()
def sign_step(params: list[torch.Tensor], step, drop_grads: bool = True) -> None:
    """``p -= step * sign(grad)`` for every parameter with a gradient, batched over parameters.

    ``step`` is a float or a 0-d tensor (a CUDA graph reads it from the device each replay). A block has
    dozens of small tensors; one kernel per tensor and operation would dominate a GPU step. With
    ``drop_grads`` the gradients are released afterwards (the eager loop); a recorded step keeps them.
    """
    live = [p for p in params if p.grad is not None]
    if not live:
        return
    signs = [p.grad for p in live]
    torch._foreach_sign_(signs)
    torch._foreach_mul_(signs, step)
    torch._foreach_sub_(live, signs)
    if drop_grads:
        for p in live:
            p.grad = None


@torch.no_grad()
def clamp_all(wrappers) -> None:
    """Project every wrapper's parameters back into their ranges (one batched kernel per bound)."""
    vs = [w.v for w in wrappers]
    coefs = [c for w in wrappers for c in (w.min_coef, w.max_coef)]
    for ts, (lo, hi) in ((vs, (-V_BOUND, V_BOUND)), (coefs, COEF_RANGE)):
        if ts:
            torch._foreach_clamp_min_(ts, lo)
            torch._foreach_clamp_max_(ts, hi)


class TunableLinear(nn.Module):
    """Wraps a Linear/Conv1D: ``y = x @ fake_quant(W; v, min_coef, max_coef)^T + b``.

    The float weight and its per-group range are computed once; each forward only rebuilds
    the scale, zero and codes from the current parameters.
    """

    def __init__(self, layer: nn.Module, spec: QuantSpec, tune_minmax: bool = True, init_coef: torch.Tensor | None = None,
                 quantizer: GroupedQuantizer | None = None):
        super().__init__()
        # integer grids: the fake-quantizer (shared, possibly compiled); llama.cpp grids use kquant's
        self._quantizer = (quantizer or grouped_quantizer(spec)) if spec.fmt == "int" else None
        self.layer = layer
        self.spec = spec
        self.is_conv1d = bool(Conv1D) and isinstance(layer, Conv1D)
        w = weight_as_out_in(layer).detach().to(torch.float32)
        self.in_features = w.shape[1]
        if spec.fmt != "int":  # a llama.cpp grid (auto_quant.quant.kquant): fixed block layout
            from auto_quant.quant.kquant import check_row_length

            check_row_length(self.in_features, spec.fmt)
        wg = group_weight(w, spec.group_size)
        self.register_buffer("wg", wg, persistent=False)
        wmin, wmax = weight_range(wg)
        self.register_buffer("wmin", wmin, persistent=False)
        self.register_buffer("wmax", wmax, persistent=False)
        self.v = nn.Parameter(torch.zeros_like(wg))
        self._frozen_weight = None  # set inside frozen(): the weight quantized once per evaluation pass
        # separate (min, max) starting points for llama.cpp grids' search
        cmin, cmax = (c.to(wmin).clone() for c in coef_pair(torch.ones_like(wmin) if init_coef is None else init_coef))
        self.min_coef = nn.Parameter(cmin.clone(), requires_grad=tune_minmax)
        self.max_coef = nn.Parameter(cmax.clone(), requires_grad=tune_minmax)

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's float weight, for model code that reads ``proj.weight`` (e.g. its dtype)."""
        return self.layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def tunables(self) -> list[nn.Parameter]:
        return [p for p in (self.v, self.min_coef, self.max_coef) if p.requires_grad]

    @torch.no_grad()
    def clamp_(self) -> None:
        clamp_all([self])

    def qdq_weight(self) -> torch.Tensor:
        if self.spec.fmt != "int":
            from auto_quant.quant.kquant import qdq_grouped

            deq = qdq_grouped(self.wg, self.wmin, self.wmax, self.spec, self.v, self.min_coef, self.max_coef)
            return ungroup_weight(deq, self.in_features)
        return self._quantizer(self.wg, self.wmin, self.wmax, self.v, self.min_coef, self.max_coef, self.in_features)

    @contextlib.contextmanager
    def frozen(self):
        """Within the block, forwards reuse one fake-quantized weight (no-grad evaluation passes)."""
        with torch.no_grad():
            self._frozen_weight = self.qdq_weight()
        try:
            yield
        finally:
            self._frozen_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = self._frozen_weight
        w = (frozen if frozen is not None else self.qdq_weight()).to(x.dtype)
        bias = self.layer.bias
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @torch.no_grad()
    def reset_to_rtn(self) -> None:
        """Plain round-to-nearest over the full range: no rounding offset, both coefficients 1."""
        self.v.zero_()
        self.min_coef.fill_(1.0)
        self.max_coef.fill_(1.0)

    @torch.no_grad()
    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.v.detach().clone(), self.min_coef.detach().clone(), self.max_coef.detach().clone()

    @torch.no_grad()
    def restore(self, state) -> None:
        self.v.copy_(state[0])
        self.min_coef.copy_(state[1])
        self.max_coef.copy_(state[2])

    @torch.no_grad()
    def bake(self) -> QuantizedWeight:
        """Write the fake-quantized weight into the wrapped layer; return its integer form."""
        if self.spec.fmt != "int":
            from auto_quant.quant.kquant import bake_grouped

            qw, deq = bake_grouped(self.wg, self.wmin, self.wmax, self.spec, self.in_features, self.v,
                                   self.min_coef, self.max_coef)
            self.layer.weight.data.copy_((deq.t() if self.is_conv1d else deq).to(self.layer.weight.dtype))
            return qw.cpu() if hasattr(qw, "cpu") else QuantizedWeight(
                qw.codes.cpu(), qw.scale.cpu(), qw.zero.cpu(), qw.spec)
        scale, zero = qparams_from_range(self.wmin, self.wmax, self.spec, self.min_coef, self.max_coef)
        s = scale.to(torch.float32).unsqueeze(-1)
        q = (torch.round(self.wg / s + self.v) + zero.unsqueeze(-1)).clamp(0, self.spec.maxq)
        deq = ungroup_weight((q - zero.unsqueeze(-1)) * s, self.in_features)
        weight = self.layer.weight
        weight.data.copy_((deq.t() if self.is_conv1d else deq).to(weight.dtype))
        codes = ungroup_weight(q, self.in_features).to(torch.uint8)
        return QuantizedWeight(
            codes=codes.cpu().contiguous(), scale=scale.cpu().contiguous(), zero=zero.to(torch.uint8).cpu().contiguous(), spec=self.spec
        )

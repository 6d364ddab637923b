"""A linear layer whose weight is fake-quantized with learnable rounding and clipping."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from auto_quant.models.discovery import Conv1D, weight_as_out_in
from auto_quant.quant import QuantSpec, QuantizedWeight, group_weight, qparams_from_range, round_ste, ungroup_weight, weight_range
from auto_quant.quant.search import coef_pair

V_BOUND = 0.5  # the rounding offset stays in [-V_BOUND, V_BOUND]
COEF_RANGE = (0.0, 1.0)  # clipping coefficients of the min and the max side


class TunableLinear(nn.Module):
    """Wraps a Linear/Conv1D: ``y = x @ fake_quant(W; v, min_coef, max_coef)^T + b``.

    The float weight and its per-group range are computed once; each forward only rebuilds
    the scale, zero and codes from the current parameters.
    """

    def __init__(self, layer: nn.Module, spec: QuantSpec, tune_minmax: bool = True, init_coef: torch.Tensor | None = None):
        super().__init__()
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

    def tunables(self) -> list[nn.Parameter]:
        return [p for p in (self.v, self.min_coef, self.max_coef) if p.requires_grad]

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-V_BOUND, V_BOUND)
        self.min_coef.clamp_(*COEF_RANGE)
        self.max_coef.clamp_(*COEF_RANGE)

    def qdq_weight(self) -> torch.Tensor:
        if self.spec.fmt != "int":
            from auto_quant.quant.kquant import qdq_grouped

            deq = qdq_grouped(self.wg, self.wmin, self.wmax, self.spec, self.v, self.min_coef, self.max_coef)
            return ungroup_weight(deq, self.in_features)
        scale, zero = qparams_from_range(self.wmin, self.wmax, self.spec, self.min_coef, self.max_coef)
        s = scale.to(torch.float32).unsqueeze(-1)
        q = (round_ste(self.wg / s + self.v) + zero.unsqueeze(-1)).clamp(0, self.spec.maxq)
        return ungroup_weight((q - zero.unsqueeze(-1)) * s, self.in_features)

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

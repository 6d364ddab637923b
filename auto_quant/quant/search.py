"""Importance-weighted clipping search: a cheap, better-than-RTN starting point for tuning.

For each group the clipping ratio ``c`` (applied to both the min and the max side) is
chosen from a grid to minimise ``sum_i imp_i * (w_i - qdq(w_i))^2``, where ``imp_i`` is
the mean squared activation of input channel ``i`` (uniform when no statistics are given).
This is the same objective llama.cpp's imatrix quantization minimises, on our parametrisation.
"""

from __future__ import annotations

import torch

from auto_quant.quant.integer import group_weight, qparams_from_range, quantize_weight, weight_range
from auto_quant.quant.spec import QuantSpec

DEFAULT_GRID = tuple(1.0 - 0.025 * i for i in range(17))  # 1.0 … 0.6


def coef_pair(coef):
    """``(min_coef, max_coef)`` from :func:`search_clip_coef`'s result (integer grids give one coefficient)."""
    return coef if isinstance(coef, tuple) else (coef, coef)


@torch.no_grad()
def rtn_weight(w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None, search: bool = True):
    """``w`` (float32 ``[out, in]``) rounded to ``spec``'s grid, after the clipping search when ``search``."""
    coef = search_clip_coef(w, spec, importance) if search else 1.0
    cmin, cmax = coef_pair(coef)
    return quantize_weight(w, spec, None, cmin, cmax)


@torch.no_grad()
def search_clip_coef(
    w: torch.Tensor,
    spec: QuantSpec,
    importance: torch.Tensor | None = None,
    grid: tuple[float, ...] = DEFAULT_GRID,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Best clipping coefficient per group, ``[out, n_groups]`` (float32).

    For a llama.cpp grid (``spec.fmt != "int"``) a ``(min_coef, max_coef)`` pair (see
    :func:`auto_quant.quant.kquant.search_clip_coef`).
    """
    if spec.fmt != "int":
        from auto_quant.quant import kquant

        return kquant.search_clip_coef(w, spec, importance, grid)
    wg = group_weight(w.to(torch.float32), spec.group_size)
    wmin, wmax = weight_range(wg)
    if importance is None:
        imp = torch.ones(wg.shape[1:], device=wg.device)
    else:
        imp = group_weight(importance.to(torch.float32).reshape(1, -1).to(wg.device), spec.group_size)[0]
        imp = imp + 1e-8 * imp.mean().clamp(min=1e-12)
    best_err = None
    best = torch.ones_like(wmin)
    for c in grid:
        scale, zero = qparams_from_range(wmin, wmax, spec, c, c)
        s = scale.to(torch.float32).unsqueeze(-1)
        q = (torch.round(wg / s) + zero.unsqueeze(-1)).clamp(0, spec.maxq)
        err = (((q - zero.unsqueeze(-1)) * s - wg) ** 2 * imp).sum(-1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, c), best)
    return best

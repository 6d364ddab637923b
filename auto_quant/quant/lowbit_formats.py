"""Non-integer low-bit weight formats as pure functions: NormalFloat (nf3, nf4) and small floats
(fp4 e2m1, fp6 e3m2, fp8 e4m3 / e5m2), plus llama.cpp's iq4_nl codebook.

Every format here is a *codebook*: a sorted tuple of representable values ``c``. A weight
``[out, in]`` is split into groups along ``in`` (``group_size``; ``-1`` = one group per row, the
last group zero-padded as in :func:`auto_quant.quant.group_weight`); each group gets
``scale = absmax / max|c|`` (signed for lopsided grids such as iq4_nl, see
:attr:`Codebook.anchor`) and each element the index of its nearest codebook value:
``w ≈ c[code] * scale``. Codes are uint8 indices into the sorted codebook (not bit patterns),
so every format packs through the same bit stream (``auto_quant.export.packing``).

With ``importance`` (per input channel, e.g. from an imatrix) or ``search=True`` the scale of
each group is picked from a grid of shrink factors to minimise the importance-weighted squared
error, the same objective as :func:`auto_quant.quant.search.search_clip_coef`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from auto_quant.quant.integer import group_weight, ungroup_weight

SCALE_EPS = 1e-12
SEARCH_GRID = tuple(1.0 - 0.025 * i for i in range(17))  # 1.0 … 0.6, as search_clip_coef


def normal_float_values(bits: int, offset: float = 0.9677083) -> tuple[float, ...]:
    """QLoRA's NormalFloat codebook for ``bits`` bits: normal quantiles, an exact zero, max |v| = 1.

    ``bits=4`` gives the published NF4 table; ``bits=3`` is the same construction with 8 values.
    """
    n = 2 ** (bits - 1)
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, n + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, n, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return tuple((v / v.abs().max()).tolist())


def minifloat_values(exp_bits: int, man_bits: int, bias: int, finite_max: float | None = None) -> tuple[float, ...]:
    """Every finite value of a sign/exponent/mantissa float without inf/NaN codes (OCP MX style),
    optionally capped at ``finite_max``; ±0 merged."""
    mags = set()
    for e in range(2**exp_bits):
        for m in range(2**man_bits):
            if e == 0:
                v = (m / 2**man_bits) * 2.0 ** (1 - bias)
            else:
                v = (1 + m / 2**man_bits) * 2.0 ** (e - bias)
            if finite_max is None or v <= finite_max:
                mags.add(v)
    vals = sorted({-v for v in mags} | mags)
    return tuple(vals)


def torch_float8_values(dtype: torch.dtype) -> tuple[float, ...]:
    """Every finite value of a torch float8 dtype (±0 merged)."""
    v = torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float32)
    v = v[torch.isfinite(v)]
    return tuple(sorted(set(v.tolist())))


# llama.cpp's kvalues_iq4nl (the IQ4_NL non-linear 4-bit grid), scaled by 1/127.
_IQ4_NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class Codebook:
    name: str
    values: tuple[float, ...]  # sorted ascending
    description: str

    @property
    def bits(self) -> int:
        return max(1, math.ceil(math.log2(len(self.values))))

    @property
    def absmax(self) -> float:
        return max(abs(self.values[0]), abs(self.values[-1]))

    @property
    def anchor(self) -> float:
        """The value a group's largest-magnitude weight maps to: the positive extreme when both
        extremes are equally large, else the larger one (llama.cpp's signed scale for IQ4_NL)."""
        lo, hi = self.values[0], self.values[-1]
        return lo if abs(lo) > abs(hi) else hi

    def tensor(self, device=None) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a constant of the graph: dynamo would trace through the cache and warn
            return torch.tensor(self.values, dtype=torch.float32, device=device)
        return _codebook_tensor(self.name, self.values, str(device) if device is not None else "cpu")


@lru_cache(maxsize=64)
def _codebook_tensor(name: str, values: tuple[float, ...], device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _build_codebooks() -> dict[str, Codebook]:
    books = [
        Codebook("nf4", normal_float_values(4), "4-bit NormalFloat (QLoRA): normal-distribution quantiles"),
        Codebook("nf3", normal_float_values(3), "3-bit NormalFloat: QLoRA's construction with 8 values"),
        Codebook("fp4_e2m1", minifloat_values(2, 1, 1), "4-bit float e2m1 (OCP MX FP4): ±{0, .5, 1, 1.5, 2, 3, 4, 6}"),
        Codebook("fp6_e3m2", minifloat_values(3, 2, 3), "6-bit float e3m2 (OCP MX FP6), max 28"),
        Codebook("fp8_e4m3", torch_float8_values(torch.float8_e4m3fn), "8-bit float e4m3fn (OCP FP8), max 448"),
        Codebook("fp8_e5m2", torch_float8_values(torch.float8_e5m2), "8-bit float e5m2 (OCP FP8), max 57344"),
        Codebook("iq4_nl", tuple(v / 127 for v in _IQ4_NL), "llama.cpp's IQ4_NL non-linear 4-bit grid"),
    ]
    return {b.name: b for b in books}


CODEBOOKS: dict[str, Codebook] = _build_codebooks()


def get_codebook(name: str) -> Codebook:
    try:
        return CODEBOOKS[name]
    except KeyError:
        raise KeyError(f"unknown codebook {name!r}; known: {', '.join(sorted(CODEBOOKS))}") from None


@dataclass(frozen=True)
class CodebookWeight:
    """A weight in a codebook format: ``w ≈ codebook[codes] * scale`` (scale per group)."""

    codes: torch.Tensor  # uint8 [out, in], indices into the sorted codebook
    scale: torch.Tensor  # [out, n_groups]
    codebook: str
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_codebook(self.codes, self.scale, self.codebook, self.group_size, dtype)


def nearest_codes(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted ``values`` for each element of ``x`` (ties go up)."""
    mids = (values[1:] + values[:-1]) / 2
    return torch.bucketize(x.contiguous(), mids, right=True)


def _group_scales(wg: torch.Tensor, book: Codebook) -> torch.Tensor:
    """Per group: the largest-magnitude weight divided by the codebook's anchor (signed when the
    codebook is lopsided, so the dominant weight always lands on the longer side)."""
    if book.anchor > 0:
        return (wg.abs().amax(dim=-1) / book.anchor).clamp(min=SCALE_EPS)
    idx = wg.abs().argmax(dim=-1, keepdim=True)
    s = wg.gather(-1, idx).squeeze(-1) / book.anchor
    return torch.where(s < 0, s.clamp(max=-SCALE_EPS), s.clamp(min=SCALE_EPS))


@torch.no_grad()
def quantize_codebook(
    w: torch.Tensor,
    codebook: str,
    group_size: int,
    scale_dtype: torch.dtype = torch.float16,
    importance: torch.Tensor | None = None,
    search: bool = False,
    grid: tuple[float, ...] = SEARCH_GRID,
) -> CodebookWeight:
    """Quantize ``w`` (``[out, in]``) to ``codebook`` with one absmax scale per group.

    ``importance`` (``[in]``, non-negative) or ``search`` turns on a per-group scale search that
    minimises ``sum imp * (w - qdq(w))**2`` over shrink factors in ``grid``.
    """
    book = get_codebook(codebook)
    vals = book.tensor(w.device)
    wf = w.detach().to(torch.float32)
    wg = group_weight(wf, group_size)  # [out, G, gs]
    base = _group_scales(wg, book)
    scale = base
    if importance is not None or search:
        if importance is None:
            imp = torch.ones(wg.shape[1:], device=wg.device)
        else:
            imp = group_weight(importance.to(torch.float32).reshape(1, -1).to(wg.device), group_size)[0]
            imp = imp + 1e-8 * imp.mean().clamp(min=1e-12)
        best_err = None
        for c in grid:
            s = _round_scale(base * c, scale_dtype)
            q = vals[nearest_codes(wg / s.unsqueeze(-1), vals)] * s.unsqueeze(-1)
            err = (((q - wg) ** 2) * imp).sum(-1)
            if best_err is None:
                best_err, scale = err, s
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                scale = torch.where(better, s, scale)
    scale = _round_scale(scale, scale_dtype)
    codes = nearest_codes(wg / scale.unsqueeze(-1), vals)
    codes = ungroup_weight(codes, wf.shape[1]).to(torch.uint8).contiguous()
    return CodebookWeight(codes=codes, scale=scale.to(scale_dtype).contiguous(), codebook=codebook, group_size=group_size)


def _round_scale(s: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """The scale as it will be stored (so codes are chosen against the stored value)."""
    finfo = torch.finfo(scale_dtype)
    mag = s.abs().clamp(min=max(SCALE_EPS, finfo.tiny), max=finfo.max)
    return torch.where(s < 0, -mag, mag).to(scale_dtype).to(torch.float32)


def dequantize_codebook(codes: torch.Tensor, scale: torch.Tensor, codebook: str, group_size: int,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codebook[codes] * scale`` with the scale broadcast over each group; ``[rows, in]``."""
    vals = get_codebook(codebook).tensor(codes.device)
    in_f = codes.shape[-1]
    gs = in_f if group_size == -1 else group_size
    idx = torch.arange(in_f, device=codes.device) // gs
    return (vals[codes.long()] * scale.to(torch.float32)[..., idx]).to(dtype)


def fake_quantize_codebook(w: torch.Tensor, codebook: str, group_size: int, **kw) -> torch.Tensor:
    return quantize_codebook(w, codebook, group_size, **kw).dequantize(w.dtype)


__all__ = [
    "CODEBOOKS",
    "Codebook",
    "CodebookWeight",
    "dequantize_codebook",
    "fake_quantize_codebook",
    "get_codebook",
    "minifloat_values",
    "nearest_codes",
    "normal_float_values",
    "quantize_codebook",
    "torch_float8_values",
]

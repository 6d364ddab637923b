"""llama.cpp's native weight grids that are not plain integer grids (pure functions).

The tuner optimises directly in these parametrisations (``QuantSpec.fmt``), so a GGUF export
writes exactly the weights that were tuned:

* **K-quants** (``q2_k`` … ``q6_k``): rows split into super-blocks of 256 weights, each made of
  sub-blocks (16 or 32 weights) with their own scale — and, for the asymmetric types, min —
  which are themselves quantized to a few bits against one fp16 super-scale (and super-min):

  - asymmetric (``q2_k``, ``q4_k``, ``q5_k``): ``w = d·sc_j·q − dmin·m_j`` with ``q`` in
    ``[0, 2^b−1]`` and ``sc_j, m_j`` in ``[0, L]`` (``L`` = 63, or 15 for ``q2_k``);
  - symmetric (``q3_k``, ``q6_k``): ``w = d·sc_j·(q − 2^(b−1))`` with signed ``sc_j`` in
    ``[−L, L−1]`` (``L`` = 32 for ``q3_k``, 128 for ``q6_k``).

* **Q8_0** (``q8_0``): symmetric 8-bit with levels ``−127 … 127`` (llama.cpp's dot products
  need ``|q| ≤ 127``), ``w = d·(code − 128)``. Its integer form is an ordinary
  :class:`~auto_quant.quant.integer.QuantizedWeight` (codes in ``[1, 255]``, zero 128).

* **Q4_1 / Q5_1** (``q4_1``, ``q5_1``): asymmetric with a *float* (fp16) min instead of an
  integer zero point, ``w = d·q + m``. (The integer grid ``(q − zero)·scale`` maps onto them
  only up to rounding ``m = −zero·scale`` to fp16.) Integer form: :class:`AffineWeight`.

Each sub-block is clipped like the integer path (``lo = wmin·min_coef``, ``hi = wmax·max_coef``)
and its float scale/min come from the clipped range; the super-block quantization of those
scales and mins then happens inside the fake-quant (straight-through rounding), so what the
tuner sees is bit-for-bit what llama.cpp dequantizes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from auto_quant.errors import ConfigError
from auto_quant.quant.integer import (
    SCALE_EPS,
    QuantizedWeight,
    group_weight,
    round_ste,
    ungroup_weight,
    weight_range,
)

QK_K = 256  # weights per K-quant super-block


@dataclass(frozen=True)
class NativeFormat:
    """One llama.cpp grid: its fixed bit width, sub-block size and scale quantization."""

    name: str
    bits: int
    group_size: int  # sub-block (K) or block (Q8_0) size
    sym: bool
    super_levels: int  # K: L above; 0 for Q8_0
    super_block: int = QK_K  # 0: no super-block

    @property
    def is_k(self) -> bool:
        return self.super_block > 0

    @property
    def sub_blocks(self) -> int:
        return self.super_block // self.group_size if self.is_k else 1


FORMATS: dict[str, NativeFormat] = {
    "q2_k": NativeFormat("q2_k", 2, 16, False, 15),
    "q3_k": NativeFormat("q3_k", 3, 16, True, 32),
    "q4_k": NativeFormat("q4_k", 4, 32, False, 63),
    "q5_k": NativeFormat("q5_k", 5, 32, False, 63),
    "q6_k": NativeFormat("q6_k", 6, 16, True, 128),
    "q8_0": NativeFormat("q8_0", 8, 32, True, 0, super_block=0),
    "q4_1": NativeFormat("q4_1", 4, 32, False, 0, super_block=0),
    "q5_1": NativeFormat("q5_1", 5, 32, False, 0, super_block=0),
}
Q8_0_MAX = 127


def native_format(fmt: str) -> NativeFormat:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ConfigError(f"fmt={fmt!r} is not a llama.cpp grid; use 'int' or one of {', '.join(FORMATS)}") from None


def check_spec(bits: int, group_size: int, sym: bool, fmt: str) -> None:
    """Raise ConfigError unless ``bits/group_size/sym`` are the ones ``fmt`` fixes."""
    f = native_format(fmt)
    if (bits, group_size, sym) != (f.bits, f.group_size, f.sym):
        raise ConfigError(
            f"fmt={fmt!r} means bits={f.bits}, group_size={f.group_size}, sym={f.sym}; "
            f"got bits={bits}, group_size={group_size}, sym={sym} (pass the format's values, or fmt='int')"
        )


def check_row_length(in_features: int, fmt: str, name: str = "") -> None:
    f = native_format(fmt)
    block = f.super_block if f.is_k else f.group_size
    if in_features % block:
        where = f" of {name}" if name else ""
        raise ConfigError(
            f"row length {in_features}{where} is not a multiple of {block}, which {fmt} needs; "
            "quantize that layer with a type whose block fits (the GGUF scheme falls back per tensor)"
        )


# ------------------------------------------------------------------------------------------
# the integer form of a K-quant weight


@dataclass(frozen=True)
class KQuantWeight:
    """A weight in a K-quant grid, as its GGUF blocks hold it.

    ``codes``: uint8 ``[out, in]`` in ``[0, 2^b−1]``; ``sc``: int16 ``[out, n_sub]`` sub-block
    scales (signed for the symmetric types); ``mins``: int16 ``[out, n_sub]`` (asymmetric types,
    else None); ``d`` / ``dmin``: float16 ``[out, n_super]``.
    """

    codes: torch.Tensor
    sc: torch.Tensor
    mins: torch.Tensor | None
    d: torch.Tensor
    dmin: torch.Tensor | None
    spec: object  # QuantSpec

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def sub_scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float ``(scale, min)`` per sub-block, ``[out, n_sub]``, exactly as llama.cpp computes them."""
        f = native_format(self.spec.fmt)
        rep = f.sub_blocks
        d = self.d.to(torch.float32).repeat_interleave(rep, dim=1)
        scale = d * self.sc.to(torch.float32)
        if f.sym:
            return scale, None
        dmin = self.dmin.to(torch.float32).repeat_interleave(rep, dim=1)
        return scale, dmin * self.mins.to(torch.float32)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        f = native_format(self.spec.fmt)
        scale, mn = self.sub_scales()
        q = group_weight(self.codes.to(torch.float32), f.group_size)
        if f.sym:
            out = (q - 2 ** (f.bits - 1)) * scale.unsqueeze(-1)
        else:
            out = q * scale.unsqueeze(-1) - mn.unsqueeze(-1)
        return ungroup_weight(out, self.codes.shape[1]).to(dtype)

    def cpu(self) -> "KQuantWeight":
        def c(t):
            return None if t is None else t.cpu().contiguous()

        return KQuantWeight(c(self.codes), c(self.sc), c(self.mins), c(self.d), c(self.dmin), self.spec)


@dataclass(frozen=True)
class AffineWeight:
    """A weight in Q4_1 / Q5_1's grid: ``w = d·code + m`` per block of 32 (``d``, ``m`` float16 ``[out, n_blocks]``)."""

    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    spec: object

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = group_weight(self.codes.to(torch.float32), self.spec.group_size)
        out = q * self.d.to(torch.float32).unsqueeze(-1) + self.m.to(torch.float32).unsqueeze(-1)
        return ungroup_weight(out, self.codes.shape[1]).to(dtype)

    def cpu(self) -> "AffineWeight":
        return AffineWeight(self.codes.cpu().contiguous(), self.d.cpu().contiguous(), self.m.cpu().contiguous(), self.spec)


# ------------------------------------------------------------------------------------------
# differentiable parameters of one grid


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 and back (differentiable as identity)."""
    return x + (x.detach().to(torch.float16).to(x.dtype) - x.detach())


def _super(x: torch.Tensor, f: NativeFormat) -> torch.Tensor:
    """``[out, n_sub]`` → ``[out, n_super, sub_blocks]``."""
    return x.reshape(x.shape[0], -1, f.sub_blocks)


def _asym_k_params(wmin, wmax, f: NativeFormat, min_coef, max_coef, hard: bool):
    maxq = 2**f.bits - 1
    L = f.super_levels
    rnd = torch.round if hard else round_ste
    lo = wmin * min_coef
    hi = wmax * max_coef
    scale = ((hi - lo) / maxq).clamp(min=SCALE_EPS)
    mn = (-lo).clamp(min=0)
    s3 = _super(scale, f)
    m3 = _super(mn, f)
    d = _fp16(s3.amax(-1, keepdim=True) / L)
    sc = rnd(s3 / d).clamp(1, L)
    dmin = _fp16(m3.amax(-1, keepdim=True) / L)
    safe = torch.where(dmin > 0, dmin, torch.ones_like(dmin))
    mq = torch.where(dmin > 0, rnd(m3 / safe), torch.zeros_like(m3)).clamp(0, L)
    s_hat = (d * sc).reshape(scale.shape)
    m_hat = (dmin * mq).reshape(scale.shape)
    return s_hat, m_hat, (d.squeeze(-1), sc.reshape(scale.shape), dmin.squeeze(-1), mq.reshape(scale.shape))


def _sym_k_params(wmin, wmax, f: NativeFormat, min_coef, max_coef, hard: bool):
    half = 2 ** (f.bits - 1)
    L = f.super_levels
    rnd = torch.round if hard else round_ste
    neg = -(wmin * min_coef)
    pos = wmax * max_coef
    signed_max = torch.where(pos < neg, neg, -pos)
    scale = signed_max / half
    scale = torch.where(scale < 0, scale.clamp(max=-SCALE_EPS), scale.clamp(min=SCALE_EPS))
    s3 = _super(scale, f)
    idx = s3.abs().argmax(-1, keepdim=True)
    dominant = torch.gather(s3, -1, idx)
    d = _fp16(dominant / -L)
    r = s3 / d
    sc = rnd(r).clamp(-L, L - 1)
    # a sub-block whose scale rounds to 0 keeps the smallest step of its sign (never a dead block)
    sc = torch.where(sc == 0, torch.where(r < 0, -torch.ones_like(sc), torch.ones_like(sc)), sc)
    s_hat = (d * sc).reshape(scale.shape)
    return s_hat, (d.squeeze(-1), sc.reshape(scale.shape))


def _affine_params(wmin, wmax, f: NativeFormat, min_coef, max_coef):
    lo = wmin * min_coef
    hi = wmax * max_coef
    d = _fp16(((hi - lo) / (2**f.bits - 1)).clamp(min=SCALE_EPS))
    return d, _fp16(lo)


def _q8_0_params(wmin, wmax, min_coef, max_coef):
    amax = torch.maximum(-(wmin * min_coef), wmax * max_coef)
    return _fp16((amax / Q8_0_MAX).clamp(min=SCALE_EPS))


# ------------------------------------------------------------------------------------------
# fake quantization on grouped weights (what TunableLinear calls every step)


def qdq_grouped(wg, wmin, wmax, spec, v=None, min_coef=1.0, max_coef=1.0, hard: bool = False) -> torch.Tensor:
    """Quantize-dequantize a grouped weight ``[out, n_sub, gs]``; straight-through in ``v`` and the coefficients.

    ``hard=True`` rounds without the straight-through graph (same values; for searches under no_grad).
    """
    f = native_format(spec.fmt)
    x_off = 0.0 if v is None else v
    rnd = torch.round if hard else round_ste
    if f.name in ("q4_1", "q5_1"):
        d, m = _affine_params(wmin, wmax, f, min_coef, max_coef)
        q = rnd((wg - m.unsqueeze(-1)) / d.unsqueeze(-1) + x_off).clamp(0, 2**f.bits - 1)
        return q * d.unsqueeze(-1) + m.unsqueeze(-1)
    if not f.is_k:  # q8_0
        s = _q8_0_params(wmin, wmax, min_coef, max_coef).unsqueeze(-1)
        q = rnd(wg / s + x_off).clamp(-Q8_0_MAX, Q8_0_MAX)
        return q * s
    if f.sym:
        s_hat, _ = _sym_k_params(wmin, wmax, f, min_coef, max_coef, hard=hard)
        s = s_hat.unsqueeze(-1)
        half = 2 ** (f.bits - 1)
        q = (rnd(wg / s + x_off) + half).clamp(0, 2**f.bits - 1)
        return (q - half) * s
    s_hat, m_hat, _ = _asym_k_params(wmin, wmax, f, min_coef, max_coef, hard=hard)
    s = s_hat.unsqueeze(-1)
    m = m_hat.unsqueeze(-1)
    q = rnd((wg + m) / s + x_off).clamp(0, 2**f.bits - 1)
    return q * s - m


@torch.no_grad()
def bake_grouped(wg, wmin, wmax, spec, in_features: int, v=None, min_coef=1.0, max_coef=1.0):
    """The integer form matching :func:`qdq_grouped` (hard rounding): ``(weight, dequantized [out, in])``."""
    f = native_format(spec.fmt)
    x_off = 0.0 if v is None else v
    if f.name in ("q4_1", "q5_1"):
        d, m = _affine_params(wmin, wmax, f, min_coef, max_coef)
        q = torch.round((wg - m.unsqueeze(-1)) / d.unsqueeze(-1) + x_off).clamp(0, 2**f.bits - 1)
        deq = ungroup_weight(q * d.unsqueeze(-1) + m.unsqueeze(-1), in_features)
        codes = ungroup_weight(q, in_features).to(torch.uint8).contiguous()
        return AffineWeight(codes, d.to(torch.float16), m.to(torch.float16), spec), deq
    if not f.is_k:
        s = _q8_0_params(wmin, wmax, min_coef, max_coef)
        q = torch.round(wg / s.unsqueeze(-1) + x_off).clamp(-Q8_0_MAX, Q8_0_MAX)
        deq = ungroup_weight(q * s.unsqueeze(-1), in_features)
        codes = ungroup_weight(q + 128, in_features).to(torch.uint8)
        zero = torch.full_like(s, 128, dtype=torch.uint8)
        return QuantizedWeight(codes.contiguous(), s.to(torch.float16).contiguous(), zero, spec), deq
    if f.sym:
        s_hat, (d, sc) = _sym_k_params(wmin, wmax, f, min_coef, max_coef, hard=True)
        half = 2 ** (f.bits - 1)
        q = (torch.round(wg / s_hat.unsqueeze(-1) + x_off) + half).clamp(0, 2**f.bits - 1)
        deq = ungroup_weight((q - half) * s_hat.unsqueeze(-1), in_features)
        qw = KQuantWeight(ungroup_weight(q, in_features).to(torch.uint8).contiguous(), sc.to(torch.int16),
                          None, d.to(torch.float16), None, spec)
        return qw, deq
    s_hat, m_hat, (d, sc, dmin, mq) = _asym_k_params(wmin, wmax, f, min_coef, max_coef, hard=True)
    q = torch.round((wg + m_hat.unsqueeze(-1)) / s_hat.unsqueeze(-1) + x_off).clamp(0, 2**f.bits - 1)
    deq = ungroup_weight(q * s_hat.unsqueeze(-1) - m_hat.unsqueeze(-1), in_features)
    qw = KQuantWeight(ungroup_weight(q, in_features).to(torch.uint8).contiguous(), sc.to(torch.int16),
                      mq.to(torch.int16), d.to(torch.float16), dmin.to(torch.float16), spec)
    return qw, deq


def _prepare(w: torch.Tensor, spec):
    f = native_format(spec.fmt)
    check_row_length(w.shape[1], spec.fmt)
    wg = group_weight(w.to(torch.float32), f.group_size)
    wmin, wmax = weight_range(wg)
    return wg, wmin, wmax


def fake_quantize(w: torch.Tensor, spec, v=None, min_coef=1.0, max_coef=1.0) -> torch.Tensor:
    """``[out, in]`` quantize-dequantize in the grid ``spec.fmt`` (same signature as the integer one)."""
    wg, wmin, wmax = _prepare(w, spec)
    return ungroup_weight(qdq_grouped(wg, wmin, wmax, spec, v, min_coef, max_coef), w.shape[1]).to(w.dtype)


@torch.no_grad()
def quantize_weight(w: torch.Tensor, spec, v=None, min_coef=1.0, max_coef=1.0):
    """The integer form (``KQuantWeight``; ``AffineWeight`` for q4_1/q5_1; ``QuantizedWeight`` for q8_0).

    Its ``dequantize()`` equals :func:`fake_quantize`.
    """
    wg, wmin, wmax = _prepare(w, spec)
    return bake_grouped(wg, wmin, wmax, spec, w.shape[1], v, min_coef, max_coef)[0]


def _lsq_asym(wg, a, codes, C, E):
    """Weighted least-squares ``(scale, min)`` of ``w ≈ scale·code − min`` per sub-block; ``min ≥ 0``.

    ``C = Σa`` and ``E = Σa·w`` do not depend on the codes and are passed in.
    """
    ac = a * codes
    A = (ac * codes).sum(-1)
    B = ac.sum(-1)
    D = (ac * wg).sum(-1)
    det = A * C - B * B
    ok = det > 1e-20
    s = torch.where(ok, (C * D - B * E) / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det))
    m = torch.where(ok, (s * B - E) / C.clamp(min=1e-20), torch.zeros_like(det))
    neg = m < 0  # a positive offset is not representable (llama.cpp clamps the min to 0 too)
    s = torch.where(neg, D / A.clamp(min=1e-20), s)
    m = torch.where(neg, torch.zeros_like(m), m)
    return s, m


LSQ_STEPS_ASYM = tuple(-1.0 + 0.2 * i for i in range(11))  # scale offsets around 2^b - 1 (llama.cpp: -1 … 1)
LSQ_STEPS_SYM = tuple(range(-9, 10, 2))  # tenths around 2^(b-1) (llama.cpp: -9 … 9)


def _lsq_candidates(wg, wmin, wmax, f: NativeFormat, imp):
    """Clipping coefficients from llama.cpp-style candidate roundings refitted by weighted least squares.

    Asymmetric grids: codes from scales around ``range / (2^b − 1)``, then the optimal scale and
    min for those codes; symmetric grids: codes from scales around ``max / 2^(b−1)``, then the
    optimal scale. Each refit is expressed as ``(min_coef, max_coef)`` (clipped to ``[0, 1]``).
    A generator: one candidate (and its code tensor) is alive at a time.
    """
    maxq = 2**f.bits - 1
    if not f.sym:
        span = (wmax - wmin).clamp(min=1e-12).unsqueeze(-1)
        shifted = wg - wmin.unsqueeze(-1)
        C = imp.sum(-1)
        E = (imp * wg).sum(-1)
        neg_ok = wmin < 0
        pos_ok = wmax > 0
        safe_min = torch.where(neg_ok, wmin, -torch.ones_like(wmin))
        safe_max = torch.where(pos_ok, wmax, torch.ones_like(wmax))
        for t in LSQ_STEPS_ASYM:
            codes = torch.round(shifted * ((maxq + t) / span)).clamp_(0, maxq)
            sc, mn = _lsq_asym(wg, imp, codes, C, E)
            cmin = torch.where(neg_ok, -mn / safe_min, torch.ones_like(wmin))
            cmax = torch.where(pos_ok, (sc * maxq - mn) / safe_max, torch.ones_like(wmax))
            yield cmin.clamp(0, 1), cmax.clamp(0, 1)
        return
    half = 2 ** (f.bits - 1)
    amax = torch.maximum(-wmin, wmax).clamp(min=1e-12)
    dominant = torch.where(wmax < -wmin, wmin, wmax).unsqueeze(-1)
    dominant = torch.where(dominant == 0, torch.full_like(dominant, 1e-12), dominant)
    aw = imp * wg
    for t in LSQ_STEPS_SYM:
        codes = torch.round(wg * (-(half + 0.1 * t) / dominant)).clamp_(-half, half - 1)
        sc = (aw * codes).sum(-1) / (imp * codes * codes).sum(-1).clamp(min=1e-20)
        c = (sc.abs() * half / amax).clamp(0, 1)
        yield c, c


@torch.no_grad()
def search_clip_coef(w: torch.Tensor, spec, importance: torch.Tensor | None = None,
                     grid: tuple[float, ...] | None = None):
    """Per sub-block clipping coefficients minimising the importance-weighted error in this grid.

    Candidates: the symmetric clipping grid (one coefficient for both sides) and llama.cpp-style
    least-squares refits of candidate roundings (asymmetric for Q2_K/Q4_K/Q5_K/Q4_1/Q5_1). Each
    candidate is evaluated with the whole tensor at that setting (super-block scales included) and
    every sub-block keeps its best. Returns ``(min_coef, max_coef)``, each ``[out, n_sub]``.
    """
    from auto_quant.quant.search import DEFAULT_GRID

    grid = DEFAULT_GRID if grid is None else grid
    f = native_format(spec.fmt)
    wg, wmin, wmax = _prepare(w, spec)
    if importance is None:
        imp = torch.ones(wg.shape[1:], device=wg.device)
    else:
        imp = group_weight(importance.to(torch.float32).reshape(1, -1).to(wg.device), f.group_size)[0]
        imp = imp + 1e-8 * imp.mean().clamp(min=1e-12)
    ones = torch.ones_like(wmin)
    if f.name == "q8_0":
        candidates = ((ones * c, ones * c) for c in grid)
    else:  # the refits cover the fine steps: every other clipping ratio is enough next to them
        candidates = itertools.chain(((ones * c, ones * c) for c in grid[::2]),
                                     _lsq_candidates(wg, wmin, wmax, f, imp.expand_as(wg)))
    best_err = None
    best_min, best_max = ones.clone(), ones.clone()
    for cmin, cmax in candidates:
        deq = qdq_grouped(wg, wmin, wmax, spec, None, cmin, cmax, hard=True)
        err = ((deq - wg) ** 2 * imp).sum(-1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_min = torch.where(better, cmin, best_min)
        best_max = torch.where(better, cmax, best_max)
    return best_min, best_max

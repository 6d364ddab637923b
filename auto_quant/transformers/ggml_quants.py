"""llama.cpp's k-quant (Q2_K, Q4_K, Q5_K, Q6_K) and 2-bit lattice (IQ2_XXS, IQ2_XS) block formats as pure
torch functions.

Rows are stored exactly as llama.cpp / GGUF store them (super-blocks of 256 weights, the same
bytes), so ``gguf``'s reference dequantizers read what these encoders write (tested). The
encoders follow llama.cpp's reference quantizers (``quantize_row_q4_K_ref`` & co.):
``make_qkx2_quants`` (weighted least-squares scale + min search) for Q2_K/Q4_K/Q5_K and
``make_qx_quants`` (symmetric scale search) for Q6_K; an importance vector (imatrix) weights the
search as llama.cpp's ``*_impl`` variants do. All math is vectorised over super-blocks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

QK_K = 256


@dataclass(frozen=True)
class GGMLType:
    name: str
    block_bytes: int  # bytes per 256 weights
    description: str

    def row_bytes(self, n: int) -> int:
        return n // QK_K * self.block_bytes


GGML_TYPES = {
    "q2_k": GGMLType("q2_k", 84, "llama.cpp Q2_K: 2-bit asym, 16×16 sub-blocks, 4-bit scales/mins (2.625 bpw)"),
    "q4_k": GGMLType("q4_k", 144, "llama.cpp Q4_K: 4-bit asym, 8×32 sub-blocks, 6-bit scales/mins (4.5 bpw)"),
    "q5_k": GGMLType("q5_k", 176, "llama.cpp Q5_K: 5-bit asym, 8×32 sub-blocks, 6-bit scales/mins (5.5 bpw)"),
    "q6_k": GGMLType("q6_k", 210, "llama.cpp Q6_K: 6-bit sym, 16×16 sub-blocks, 8-bit scales (6.56 bpw)"),
    "iq2_xxs": GGMLType("iq2_xxs", 66, "llama.cpp IQ2_XXS: 8-weight groups on a 256-point E8 grid, 4-bit scale per 32 (2.06 bpw)"),
    "iq2_xs": GGMLType("iq2_xs", 74, "llama.cpp IQ2_XS: 8-weight groups on a 512-point E8 grid, 4-bit scale per 16 (2.31 bpw)"),
}


def _nearest(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """``[n]`` float → ``[n, 2]`` uint8 (little-endian fp16)."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _fp16_from(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32).reshape(-1)


# ------------------------------------------------------------------------------------------
# scale searches (vectorised over sub-blocks: x, w are [n, L])
# ------------------------------------------------------------------------------------------


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Asymmetric ``x ≈ scale * L - the_min``; returns ``(scale [n], the_min [n], L [n, L] int)``.

    Each candidate's weighted error is evaluated in closed form from the sums the least-squares fit
    already needs (``sum w (s l + m - x)^2`` expanded), so a step costs three reductions.
    """
    mn = x.amin(-1).clamp(max=0)
    mx = x.amax(-1)
    rng = mx - mn
    flat = rng <= 0
    safe = torch.where(flat, torch.ones_like(rng), rng)
    xm = x - mn[:, None]
    wx = w * x
    sum_w = w.sum(-1)
    sum_x = wx.sum(-1)
    sum_xx = (wx * x).sum(-1)

    def fit_error(La, scale, the_min):
        sum_l = (w * La).sum(-1)
        sum_l2 = (w * La * La).sum(-1)
        sum_xl = (wx * La).sum(-1)
        err = (scale * scale * sum_l2 + 2 * scale * the_min * sum_l - 2 * scale * sum_xl + the_min * the_min * sum_w
               - 2 * the_min * sum_x + sum_xx)
        return err, sum_l, sum_l2, sum_xl

    iscale = nmax / safe
    scale = 1 / iscale
    L = _nearest(iscale[:, None] * xm).clamp(0, nmax)
    best, *_ = fit_error(L, scale, mn)
    cur_min = mn.clone()
    for step in range(nstep + 1):
        isc = (rmin + rdelta * step + nmax) / safe
        La = _nearest(isc[:, None] * xm).clamp(0, nmax)
        sum_l = (w * La).sum(-1)
        sum_l2 = (w * La * La).sum(-1)
        sum_xl = (wx * La).sum(-1)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / sum_l2.clamp(min=1e-30), this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        err = (this_scale * this_scale * sum_l2 + 2 * this_scale * this_min * sum_l - 2 * this_scale * sum_xl
               + this_min * this_min * sum_w - 2 * this_min * sum_x + sum_xx)
        better = ok & (err < best)
        L = torch.where(better[:, None], La, L)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        cur_min = torch.where(better, this_min, cur_min)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat[:, None], torch.zeros_like(L), L)
    return scale, -cur_min, L


def make_qx_quants(x: torch.Tensor, nmax: int, w: torch.Tensor | None = None):
    """Symmetric ``x ≈ scale * l`` with ``l`` in ``[-nmax, nmax-1]`` (llama.cpp rmse_type 1)."""
    amax_idx = x.abs().argmax(-1, keepdim=True)
    mx = x.gather(-1, amax_idx).squeeze(-1)
    zero = mx.abs() < 1e-30
    mxs = torch.where(zero, torch.ones_like(mx), mx)
    if w is None:
        w = x * x

    def attempt(iscale):
        l = _nearest(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        return l, (w * x * l).sum(-1), (w * l * l).sum(-1)

    l, sumlx, suml2 = attempt(-nmax / mxs)
    scale = torch.where(suml2 > 0, sumlx / suml2.clamp(min=1e-30), torch.zeros_like(sumlx))
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        la, slx, sl2 = attempt(-(nmax + 0.1 * i) / mxs)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        s = torch.where(sl2 > 0, slx / sl2.clamp(min=1e-30), torch.zeros_like(slx))
        l = torch.where(better[:, None], la, l)
        scale = torch.where(better, s, scale)
        best = torch.where(better, s * slx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, l


# ------------------------------------------------------------------------------------------
# Q4_K / Q5_K
# ------------------------------------------------------------------------------------------


def _pack_scale_min(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins per super-block → 12 bytes (llama.cpp's get_scale_min_k4 layout)."""
    sc = sc.to(torch.int32)
    mn = mn.to(torch.int32)
    out = torch.empty(sc.shape[0], 12, dtype=torch.int32, device=sc.device)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return out.to(torch.uint8)


def _unpack_scale_min(b: torch.Tensor):
    b = b.to(torch.int32)
    d, m, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([d & 63, (md & 0xF) | ((d >> 2) & 0x30)], -1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 0x30)], -1)
    return sc.to(torch.float32), mn.to(torch.float32)


def _kx_search_weights(xb: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
    """Per-element weights of the scale search: llama.cpp's ``av_x + |x|`` (no imatrix) or
    ``imp * sqrt(sigma2 + x^2)`` (with one)."""
    if imp is None:
        av = (xb.pow(2).mean(-1, keepdim=True)).sqrt()
        return av + xb.abs()
    sigma2 = 2 * xb.pow(2).reshape(-1, QK_K).mean(-1)  # per super-block
    n_sub = xb.shape[0] // sigma2.shape[0]
    sigma2 = sigma2.repeat_interleave(n_sub)[:, None]
    return imp * (sigma2 + xb * xb).sqrt()


def _quantize_qk_asym(x: torch.Tensor, nmax: int, imp: torch.Tensor | None, rmin: float, rdelta: float, nstep: int):
    """Common part of Q4_K / Q5_K: returns d, dmin [nb], packed scales [nb, 12], L [nb, 256]."""
    nb = x.shape[0]
    xb = x.reshape(nb * 8, 32)
    impb = None if imp is None else imp.reshape(nb * 8, 32)
    w = _kx_search_weights(xb, impb)
    if imp is not None:
        rmin, rdelta, nstep = -0.9, 0.05, 36  # llama.cpp's make_qkx3 grid for the imatrix path
    scales, mins, _ = make_qkx2_quants(xb, w, nmax, rmin, rdelta, nstep)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    max_scale = scales.amax(-1)
    max_min = mins.amax(-1)
    inv_scale = torch.where(max_scale > 0, 63 / max_scale.clamp(min=1e-30), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63 / max_min.clamp(min=1e-30), torch.zeros_like(max_min))
    ls = _nearest(inv_scale[:, None] * scales).clamp(max=63).clamp(min=0)
    lm = _nearest(inv_min[:, None] * mins).clamp(max=63).clamp(min=0)
    d = (max_scale / 63).to(torch.float16).to(torch.float32)
    dmin = (max_min / 63).to(torch.float16).to(torch.float32)
    dl = d[:, None] * ls
    ml = dmin[:, None] * lm
    xs = x.reshape(nb, 8, 32)
    safe = torch.where(dl > 0, dl, torch.ones_like(dl))
    L = _nearest((xs + ml[..., None]) / safe[..., None]).clamp(0, nmax)
    L = torch.where((dl > 0)[..., None], L, torch.zeros_like(L))
    return d, dmin, _pack_scale_min(ls, lm), L.reshape(nb, QK_K).to(torch.int32)


def quantize_q4_k(x: torch.Tensor, imp: torch.Tensor | None = None) -> torch.Tensor:
    """``[nb, 256]`` float → ``[nb, 144]`` uint8 Q4_K blocks."""
    d, dmin, sc, L = _quantize_qk_asym(x, 15, imp, -1.0, 0.1, 20)
    q = L.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128).to(torch.uint8)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), sc, qs], -1)


def dequantize_q4_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    d, dmin = _fp16_from(b[:, 0:2]), _fp16_from(b[:, 2:4])
    sc, mn = _unpack_scale_min(b[:, 4:16])
    qs = b[:, 16:144].to(torch.int32).reshape(nb, 4, 1, 32)
    q = ((qs >> torch.tensor([0, 4], device=b.device).reshape(1, 1, 2, 1)) & 0xF).reshape(nb, 8, 32)
    return ((d[:, None] * sc)[..., None] * q - (dmin[:, None] * mn)[..., None]).reshape(nb, QK_K)


def quantize_q5_k(x: torch.Tensor, imp: torch.Tensor | None = None) -> torch.Tensor:
    """``[nb, 256]`` float → ``[nb, 176]`` uint8 Q5_K blocks."""
    d, dmin, sc, L = _quantize_qk_asym(x, 31, imp, -0.5, 0.1, 15)
    q = L.reshape(-1, 8, 32)
    lo = (q & 0xF).reshape(-1, 4, 2, 32)
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    hi = (q >> 4) & 1  # [nb, 8, 32]: bit s of qh[l]
    qh = (hi << torch.arange(8, device=x.device, dtype=torch.int32).reshape(1, 8, 1)).sum(1)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), sc, qh.to(torch.uint8), qs.to(torch.uint8)], -1)


def dequantize_q5_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    d, dmin = _fp16_from(b[:, 0:2]), _fp16_from(b[:, 2:4])
    sc, mn = _unpack_scale_min(b[:, 4:16])
    qh = b[:, 16:48].to(torch.int32).reshape(nb, 1, 32)
    qs = b[:, 48:176].to(torch.int32).reshape(nb, 4, 1, 32)
    lo = ((qs >> torch.tensor([0, 4], device=b.device).reshape(1, 1, 2, 1)) & 0xF).reshape(nb, 8, 32)
    hi = (qh >> torch.arange(8, device=b.device).reshape(1, 8, 1)) & 1
    q = lo | (hi << 4)
    return ((d[:, None] * sc)[..., None] * q - (dmin[:, None] * mn)[..., None]).reshape(nb, QK_K)


# ------------------------------------------------------------------------------------------
# Q2_K
# ------------------------------------------------------------------------------------------


def quantize_q2_k(x: torch.Tensor, imp: torch.Tensor | None = None) -> torch.Tensor:
    """``[nb, 256]`` float → ``[nb, 84]`` uint8 Q2_K blocks (2-bit asym, 16×16 sub-blocks, 4-bit scales/mins)."""
    nb = x.shape[0]
    xb = x.reshape(nb * 16, 16)
    w = xb.abs() if imp is None else imp.reshape(nb * 16, 16) * (x.pow(2).mean(-1).repeat_interleave(16)[:, None] + xb * xb).sqrt()
    scales, mins, _ = make_qkx2_quants(xb, w, 3, -0.5, 0.1, 15)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale, max_min = scales.amax(-1), mins.amax(-1)
    ls = torch.where(max_scale[:, None] > 0, _nearest(15 / max_scale.clamp(min=1e-30)[:, None] * scales), torch.zeros_like(scales))
    lm = torch.where(max_min[:, None] > 0, _nearest(15 / max_min.clamp(min=1e-30)[:, None] * mins), torch.zeros_like(mins))
    ls, lm = ls.clamp(0, 15), lm.clamp(0, 15)
    d = (max_scale / 15).to(torch.float16).to(torch.float32)
    dmin = (max_min / 15).to(torch.float16).to(torch.float32)
    dl = (d[:, None] * ls)[..., None]
    ml = (dmin[:, None] * lm)[..., None]
    xs = x.reshape(nb, 16, 16)
    L = _nearest((xs + ml) / torch.where(dl > 0, dl, torch.ones_like(dl))).clamp(0, 3)
    L = torch.where(dl > 0, L, torch.zeros_like(L)).reshape(nb, 2, 4, 32).to(torch.int32)
    qs = (L << torch.tensor([0, 2, 4, 6], device=x.device, dtype=torch.int32).reshape(1, 1, 4, 1)).sum(2).reshape(nb, 64)
    sc = (ls.to(torch.int32) | (lm.to(torch.int32) << 4)).to(torch.uint8)
    return torch.cat([sc, qs.to(torch.uint8), _fp16_bytes(d), _fp16_bytes(dmin)], -1)


def dequantize_q2_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    sc = b[:, 0:16].to(torch.int32)
    qs = b[:, 16:80].to(torch.int32).reshape(nb, 2, 1, 32)
    d, dmin = _fp16_from(b[:, 80:82]), _fp16_from(b[:, 82:84])
    q = ((qs >> torch.tensor([0, 2, 4, 6], device=b.device).reshape(1, 1, 4, 1)) & 3).reshape(nb, 16, 16).to(torch.float32)
    dl = (d[:, None] * (sc & 0xF))[..., None]
    ml = (dmin[:, None] * (sc >> 4))[..., None]
    return (dl * q - ml).reshape(nb, QK_K)


# ------------------------------------------------------------------------------------------
# Q6_K
# ------------------------------------------------------------------------------------------


def quantize_q6_k(x: torch.Tensor, imp: torch.Tensor | None = None) -> torch.Tensor:
    """``[nb, 256]`` float → ``[nb, 210]`` uint8 Q6_K blocks."""
    nb = x.shape[0]
    xb = x.reshape(nb * 16, 16)
    w = None
    if imp is not None:
        sigma2 = (x.pow(2).mean(-1)).repeat_interleave(16)[:, None]
        w = imp.reshape(nb * 16, 16) * (sigma2 + xb * xb).sqrt()
    scales, _ = make_qx_quants(xb, 32, w)
    scales = scales.reshape(nb, 16)
    idx = scales.abs().argmax(-1, keepdim=True)
    max_scale = scales.gather(-1, idx).squeeze(-1)
    zero = max_scale.abs() < 1e-30
    iscale = torch.where(zero, torch.zeros_like(max_scale), -128 / torch.where(zero, torch.ones_like(max_scale), max_scale))
    ls = _nearest(iscale[:, None] * scales).clamp(-128, 127)
    d = torch.where(zero, torch.zeros_like(iscale), 1 / torch.where(zero, torch.ones_like(iscale), iscale))
    d = d.to(torch.float16).to(torch.float32)
    dl = (d[:, None] * ls)[..., None]  # [nb, 16, 1]
    xs = x.reshape(nb, 16, 16)
    safe = torch.where(dl != 0, dl, torch.ones_like(dl))
    l = _nearest(xs / safe).clamp(-32, 31)
    l = torch.where(dl != 0, l, torch.zeros_like(l))
    L = (l + 32).reshape(nb, QK_K).to(torch.int32)
    q = L.reshape(nb, 2, 128)  # halves
    low = q & 0xF
    ql = (low[:, :, 0:64] | (low[:, :, 64:128] << 4)).reshape(nb, 128)
    hi = (q >> 4).reshape(nb, 2, 4, 32)
    qh = (hi << torch.tensor([0, 2, 4, 6], device=x.device, dtype=torch.int32).reshape(1, 1, 4, 1)).sum(2).reshape(nb, 64)
    sc = ls.to(torch.int8).view(torch.uint8)
    return torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), sc, _fp16_bytes(d)], -1)


def dequantize_q6_k(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    ql = b[:, 0:128].to(torch.int32).reshape(nb, 2, 1, 64)
    qh = b[:, 128:192].to(torch.int32).reshape(nb, 2, 1, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = _fp16_from(b[:, 208:210])
    lo = ((ql >> torch.tensor([0, 4], device=b.device).reshape(1, 1, 2, 1)) & 0xF).reshape(nb, 8, 32)
    hi = ((qh >> torch.tensor([0, 2, 4, 6], device=b.device).reshape(1, 1, 4, 1)) & 3).reshape(nb, 8, 32)
    q = ((lo | (hi << 4)) - 32).to(torch.float32).reshape(nb, 16, 16)
    return ((d[:, None] * sc)[..., None] * q).reshape(nb, QK_K)


# ------------------------------------------------------------------------------------------
# IQ2_XXS / IQ2_XS: groups of 8 weights on an E8-lattice grid (values 8, 25, 43) with even-parity signs
# ------------------------------------------------------------------------------------------

_IQ2 = {  # name: (gguf-py class name, grid entries, weights per 4-bit sub-scale)
    "iq2_xxs": ("IQ2_XXS", 256, 32),
    "iq2_xs": ("IQ2_XS", 512, 16),
}
IQ2_SCALE_CANDIDATES = tuple(0.5 + 0.0625 * i for i in range(17))  # max|x| / (43 c): 0.5 … 1.5


@functools.cache  # a constant table per (type, device): built once, never written to
def _iq2_grid(name: str, device) -> torch.Tensor:
    """The lattice grid ``[K, 8]`` as llama.cpp decodes it (from gguf-py's tables)."""
    from gguf import quants

    cls = getattr(quants, _IQ2[name][0])
    cls.init_grid()
    return torch.from_numpy(cls.grid.reshape(-1, 8).copy()).to(device=device, dtype=torch.float32)


def _as_signed(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit values (int64) → the signed int tensor with the same bit pattern."""
    dt = {16: torch.int16, 32: torch.int32}[bits]
    return torch.where(v >= 2 ** (bits - 1), v - 2**bits, v).to(dt)


def _ksign_index(neg: torch.Tensor) -> torch.Tensor:
    """8 sign bits with even parity → llama.cpp's 7-bit ``ksigns`` index (the 8th bit is the parity)."""
    bits = (neg.to(torch.int32) << torch.arange(8, device=neg.device, dtype=torch.int32)).sum(-1)
    return bits & 0x7F


def _quantize_iq2(x: torch.Tensor, imp: torch.Tensor | None, name: str):
    """Common IQ2 search: returns ``(d [nb], sub-scale codes [nb, n_sub], grid idx [nb, 32], sign idx [nb, 32])``.

    Follows llama.cpp's ``quantize_row_iq2_*_impl``: per group of 8 the signs are taken from the
    weights (the least important one flipped to make the parity even), the magnitudes are matched to
    the nearest grid point under the importance weights ``imp * sqrt(sigma2 + x^2)``, the sub-block
    scale is the best of a grid of candidates refined by least squares, and the sub-block scales are
    stored as 4 bits against one fp16 scale per super-block.
    """
    nb = x.shape[0]
    grid = _iq2_grid(name, x.device)
    per_scale = _IQ2[name][2] // 8  # groups of 8 per sub-scale
    sigma2 = x.pow(2).mean(-1, keepdim=True)
    w = (sigma2 + x * x).sqrt()
    if imp is not None:
        w = w * imp
    xg, wg = x.reshape(nb, 32, 8), w.reshape(nb, 32, 8)
    neg = xg < 0
    a = xg.abs()
    odd = (neg.sum(-1) % 2) == 1
    imin = (wg * xg * xg).argmin(-1, keepdim=True)
    flip = torch.zeros_like(neg).scatter_(-1, imin, True) & odd[..., None]
    neg = neg ^ flip
    a = torch.where(flip, -a, a)  # that weight's sign is lost: its target magnitude becomes -|x|
    wa_g = torch.einsum("bgi,ki->bgk", wg * a, grid)  # sum w a g   [nb, 32, K]
    w_g2 = torch.einsum("bgi,ki->bgk", wg, grid * grid)  # sum w g^2
    n_sub = 32 // per_scale
    amax = a.reshape(nb, n_sub, per_scale * 8).amax(-1).clamp(min=1e-30)  # [nb, n_sub]

    neg2_wa_g = wa_g.mul_(-2)  # in place: only -2 * sum(w a g) is needed from here on

    def pick(scale):  # scale [nb, n_sub] → best grid index and error per group
        # err_j = s^2 sum(w g^2) - 2 s sum(w a g) = s * (s sum(w g^2) - 2 sum(w a g)); s > 0, so one fused pass
        s = scale.repeat_interleave(per_scale, dim=1)[..., None]  # [nb, 32, 1]
        best, idx = torch.addcmul(neg2_wa_g, w_g2, s).min(-1)
        return idx, (best * s[..., 0]).reshape(nb, n_sub, per_scale).sum(-1)

    best_err = best_scale = best_idx = None
    for c in IQ2_SCALE_CANDIDATES:
        scale = amax / (43.0 * c)
        idx, err = pick(scale)
        if best_err is None:
            best_err, best_scale, best_idx = err, scale, idx
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_idx = torch.where(better.repeat_interleave(per_scale, dim=1), idx, best_idx)
    g = grid[best_idx]  # [nb, 32, 8]
    num = (wg * a * g).reshape(nb, n_sub, -1).sum(-1)
    den = (wg * g * g).reshape(nb, n_sub, -1).sum(-1).clamp(min=1e-30)
    scale = torch.where(num > 0, num / den, best_scale)  # least-squares refinement
    max_s = scale.amax(-1)
    d = (max_s / (0.25 * 15.5)).to(torch.float16).to(torch.float32)
    dsafe = torch.where(d > 0, d, torch.ones_like(d))
    ls = _nearest(scale / (0.25 * dsafe[:, None]) - 0.5).clamp(0, 15)
    sq = d[:, None] * (0.5 + ls) * 0.25
    idx, _ = pick(sq)  # final grid points against the stored scales
    return d, ls.to(torch.int32), idx.to(torch.int32), _ksign_index(neg)


def quantize_iq2_xxs(x: torch.Tensor, imp: torch.Tensor | None = None) -> torch.Tensor:
    """``[nb, 256]`` float → ``[nb, 66]`` uint8 IQ2_XXS blocks (2.06 bpw)."""
    nb = x.shape[0]
    d, ls, idx, sg = _quantize_iq2(x, imp, "iq2_xxs")
    idx = idx.reshape(nb, 8, 4)
    sg = sg.reshape(nb, 8, 4)
    aux0 = (idx << torch.tensor([0, 8, 16, 24], device=x.device, dtype=torch.int32)).sum(-1)
    aux1 = (sg << torch.tensor([0, 7, 14, 21], device=x.device, dtype=torch.int32)).sum(-1) | (ls << 28)
    words = _as_signed(torch.stack([aux0, aux1], -1).reshape(nb, 16).to(torch.int64), 32)  # uint32 patterns
    return torch.cat([_fp16_bytes(d), words.contiguous().view(torch.uint8).reshape(nb, 64)], -1)


def quantize_iq2_xs(x: torch.Tensor, imp: torch.Tensor | None = None) -> torch.Tensor:
    """``[nb, 256]`` float → ``[nb, 74]`` uint8 IQ2_XS blocks (2.31 bpw)."""
    nb = x.shape[0]
    d, ls, idx, sg = _quantize_iq2(x, imp, "iq2_xs")
    qs = _as_signed((idx | (sg << 9)).to(torch.int64), 16)  # uint16 bit patterns
    ls = ls.reshape(nb, 8, 2)
    sc = (ls[..., 0] | (ls[..., 1] << 4)).to(torch.uint8)
    return torch.cat([_fp16_bytes(d), qs.contiguous().view(torch.uint8).reshape(nb, 64), sc], -1)


def _iq2_signs(sign_idx: torch.Tensor) -> torch.Tensor:
    """7-bit ksigns index → ``[..., 8]`` of ±1 (the 8th sign restores even parity)."""
    return _iq2_sign_table(sign_idx.device)[sign_idx.to(torch.int64)]


@functools.cache  # a constant table per device: built once, never written to
def _iq2_sign_table(device) -> torch.Tensor:
    """``[128, 8]`` of ±1: the signs of every 7-bit ksigns index."""
    i = torch.arange(128, device=device, dtype=torch.int32)
    parity = torch.zeros_like(i)
    for b in range(7):
        parity ^= (i >> b) & 1
    mask = i | (parity << 7)
    bits = (mask[..., None] >> torch.arange(8, device=i.device, dtype=torch.int32)) & 1
    return 1.0 - 2.0 * bits.to(torch.float32)


def dequantize_iq2_xxs(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    d = _fp16_from(b[:, 0:2])
    words = b[:, 2:66].contiguous().view(torch.int32).reshape(nb, 8, 2).to(torch.int64) & 0xFFFFFFFF
    ls = (words[..., 1] >> 28).to(torch.float32)
    db = d[:, None] * (0.5 + ls) * 0.25  # [nb, 8]
    idx = (words[..., 0:1] >> torch.tensor([0, 8, 16, 24], device=b.device)) & 0xFF  # [nb, 8, 4]
    sg = (words[..., 1:2] >> torch.tensor([0, 7, 14, 21], device=b.device)) & 0x7F
    vals = _iq2_grid("iq2_xxs", b.device)[idx] * _iq2_signs(sg)  # [nb, 8, 4, 8]
    return (db[..., None, None] * vals).reshape(nb, QK_K)


def dequantize_iq2_xs(b: torch.Tensor) -> torch.Tensor:
    nb = b.shape[0]
    d = _fp16_from(b[:, 0:2])
    qs = b[:, 2:66].contiguous().view(torch.int16).reshape(nb, 32).to(torch.int32) & 0xFFFF
    sc = b[:, 66:74].to(torch.int32)
    ls = torch.stack([sc & 0xF, sc >> 4], -1).reshape(nb, 16).to(torch.float32)
    db = (d[:, None] * (0.5 + ls) * 0.25).repeat_interleave(2, dim=1)  # per group of 8
    vals = _iq2_grid("iq2_xs", b.device)[qs & 511] * _iq2_signs(qs >> 9)  # [nb, 32, 8]
    return (db[..., None] * vals).reshape(nb, QK_K)


# super-blocks encoded at a time (bounds the [blocks, 32, grid] search tensors of the IQ2 types)
ROW_CHUNK_BLOCKS = {"iq2_xxs": 256, "iq2_xs": 128}

_QUANTIZE = {"q2_k": quantize_q2_k, "q4_k": quantize_q4_k, "q5_k": quantize_q5_k, "q6_k": quantize_q6_k,
             "iq2_xxs": quantize_iq2_xxs, "iq2_xs": quantize_iq2_xs}
_DEQUANTIZE = {"q2_k": dequantize_q2_k, "q4_k": dequantize_q4_k, "q5_k": dequantize_q5_k, "q6_k": dequantize_q6_k,
               "iq2_xxs": dequantize_iq2_xxs, "iq2_xs": dequantize_iq2_xs}


@torch.no_grad()
def quantize_rows(w: torch.Tensor, ggml_type: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """``[rows, n]`` (``n % 256 == 0``) → ``[rows, row_bytes]`` uint8 in llama.cpp's block layout."""
    rows, n = w.shape
    if n % QK_K:
        raise ValueError(f"{ggml_type} needs rows that are a multiple of {QK_K} long, got {n}")
    x = w.detach().to(torch.float32).reshape(-1, QK_K)
    imp = None
    if importance is not None:
        imp = importance.to(torch.float32).to(w.device).reshape(1, n).expand(rows, n).reshape(-1, QK_K)
    step = ROW_CHUNK_BLOCKS.get(ggml_type) or max(1, x.shape[0])
    out = [_QUANTIZE[ggml_type](x[i:i + step], None if imp is None else imp[i:i + step]) for i in range(0, x.shape[0], step)]
    return torch.cat(out).reshape(rows, -1).contiguous()


def dequantize_rows(blocks: torch.Tensor, ggml_type: str, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_rows`: ``[rows, row_bytes]`` → ``[rows, n]``."""
    rows = blocks.shape[0]
    bb = GGML_TYPES[ggml_type].block_bytes
    x = _DEQUANTIZE[ggml_type](blocks.reshape(-1, bb))
    return x.reshape(rows, n).to(dtype)


__all__ = ["GGML_TYPES", "QK_K", "dequantize_rows", "make_qkx2_quants", "make_qx_quants", "quantize_rows"]

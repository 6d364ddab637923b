"""Helpers shared by the Gluon kernel tests (``test_kernels_wgmma*.py``, ``test_kernels_mma*.py``)."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest
import torch


def sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


needs_sm90 = pytest.mark.skipif(not sm90(), reason="the Gluon kernels are offered on sm_90 GPUs only")


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def quantized_weight(N, K, group_size, sym, seed, bits=4):
    """A random ``[N, K]`` weight quantized and packed into the kernel layout, on the GPU."""
    from auto_quant.kernels import pack_codes
    from auto_quant.quant import QuantSpec, quantize_weight

    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(N, K, device="cuda", generator=g)
    qw = quantize_weight(w, QuantSpec(bits=bits, group_size=group_size, sym=sym))
    return pack_codes(qw.codes, qw.zero, qw.scale, bits, group_size, torch.float16)


def bases_value(bases, index, rank=None):
    """The coordinates a linear layout gives the bits of ``index`` (XOR of the bases of its set bits); ``rank``: the
    number of coordinates where ``bases`` may be empty."""
    v = [0] * (len(bases[0]) if bases else rank or 0)
    for bit, b in enumerate(bases):
        if index >> bit & 1:
            v = [x ^ y for x, y in zip(v, b)]
    return v


def thread_coords(layout, warp, lane):
    """Every coordinate one thread holds in a ``DistributedLinearLayout``."""
    rank = len(layout.shape)
    hw = [a ^ b for a, b in zip(bases_value(layout.lane_bases, lane, rank), bases_value(layout.warp_bases, warp, rank))]
    return [[a ^ b for a, b in zip(bases_value(layout.reg_bases, r, rank), hw)]
            for r in range(1 << len(layout.reg_bases))]


def fake_sm90(monkeypatch):
    """Make the dispatcher see an sm_90 GPU with 132 SMs and 227 KiB of shared memory (no GPU needed)."""
    from auto_quant.kernels import dispatch as d
    from auto_quant.kernels import mma_plan, wgmma_plan

    monkeypatch.setattr(d, "wgmma_device", lambda device: device.type == "cuda")
    monkeypatch.setattr(d, "_sms", lambda device: 132)
    monkeypatch.setattr(d, "smem_limit", lambda device: 232448)
    monkeypatch.setattr(wgmma_plan, "gluon_arch", lambda arch: True)
    monkeypatch.setattr(mma_plan, "gluon_arch", lambda arch: True)
    return d


def run_triton_nvidia_tool(tool: str, data: bytes | str, suffix: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``tool`` (``ptxas``, ``cuobjdump``, ...) from the NVIDIA bin folder of Triton's wheel on ``data``, written
    to a temporary ``k<suffix>`` file (its path is the last argument; ``{out}`` in ``args`` names a file beside it)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90)
    path = os.path.join(os.path.dirname(getattr(ptxas, "path", ptxas)), tool)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k" + suffix)
        with open(src, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        argv = [a.replace("{out}", os.path.join(d, "k.out")) for a in args]
        return subprocess.run([path, *argv, src], capture_output=True, text=True, check=True)


def _halves(v: int, act: str) -> list[float]:
    """The two fp16/bf16 halves of a b32 as floats (low half first)."""
    h = torch.tensor([v & 0xFFFF, v >> 16], dtype=torch.int32).to(torch.int16)
    return h.view(torch.float16 if act == "fp16" else torch.bfloat16).float().tolist()


def _pack_halves(lo: float, hi: float, act: str) -> int:
    h = torch.tensor([lo, hi]).to(torch.float16 if act == "fp16" else torch.bfloat16).view(torch.int16)
    return (int(h[0]) & 0xFFFF) | (int(h[1]) & 0xFFFF) << 16


def run_ptx_pairs(asm: str, operands: dict[str, int]) -> int:
    """Run the handful of b32 PTX instructions the pair-decoding asm uses (``mov``, ``shr``, ``and``, ``mul.lo``,
    ``shf.r.wrap``, ``lop3``, packed half ``fma``/``add``/``mul``) on ``operands`` (``"$1"``: value); the value it
    leaves in ``$0``. Halves are rounded once per instruction (exact for the integers the asm makes)."""
    return run_ptx(asm, operands)["$0"]


def run_ptx(asm: str, operands: dict[str, int]) -> dict[str, int]:
    """:func:`run_ptx_pairs`, every register afterwards; ``mov.b32 {$i, $j}, r`` splits ``r`` into its halves."""
    regs = dict(operands)

    def val(t: str) -> int:
        t = t.strip()
        return regs[t] if t in regs else int(t, 0) & 0xFFFFFFFF

    statements = [st.strip() for line in asm.splitlines() for st in line.split(";")]
    for line in statements:
        line = line.removeprefix("{").strip() if line.startswith("{ ") or line == "{" else line
        if not line or line == "}" or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        if op == "mov.b32" and args.startswith("{"):  # unpack a b32 into two 16-bit outputs
            lo, hi, src = re.fullmatch(r"\{\s*(\S+),\s*(\S+)\s*\},\s*(\S+)", args).groups()
            regs[lo], regs[hi] = val(src) & 0xFFFF, val(src) >> 16
            continue
        dst, *src = [a.strip() for a in args.split(",")]
        a = [val(s) for s in src]
        if op == "mov.b32":
            r = a[0]
        elif op in ("shr.u32", "shr.b32"):
            r = a[0] >> a[1]
        elif op == "and.b32":
            r = a[0] & a[1]
        elif op == "mul.lo.u32":
            r = a[0] * a[1]
        elif op == "shf.r.wrap.b32":  # the funnel of (b:a) shifted right, low word kept
            r = (((a[1] << 32) | a[0]) >> (a[2] % 32)) & 0xFFFFFFFF
        elif op == "lop3.b32":
            r = 0
            for bit in range(32):
                idx = (a[0] >> bit & 1) << 2 | (a[1] >> bit & 1) << 1 | (a[2] >> bit & 1)
                r |= (a[3] >> idx & 1) << bit
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            act = "bf16" if "bf16" in op else "fp16"
            x, y, z = (_halves(v, act) for v in a)
            r = _pack_halves(x[0] * y[0] + z[0], x[1] * y[1] + z[1], act)
        elif op in ("add.rn.bf16x2", "add.rn.f16x2", "mul.rn.bf16x2", "mul.rn.f16x2"):
            act = "bf16" if "bf16" in op else "fp16"
            x, y = (_halves(v, act) for v in a)
            f = (lambda p, q: p + q) if op.startswith("add") else (lambda p, q: p * q)
            r = _pack_halves(f(x[0], y[0]), f(x[1], y[1]), act)
        else:
            raise NotImplementedError(f"the emulator does not run {op!r}")
        regs[dst] = r & 0xFFFFFFFF
    return regs

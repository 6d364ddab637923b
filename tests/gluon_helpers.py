"""Helpers shared by the Gluon kernel tests (``test_kernels_wgmma*.py``, ``test_kernels_mma*.py``)."""

from __future__ import annotations

import os
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


def bases_value(bases, index):
    """The coordinates a linear layout gives the bits of ``index`` (XOR of the bases of its set bits)."""
    v = [0] * len(bases[0]) if bases else []
    for bit, b in enumerate(bases):
        if index >> bit & 1:
            v = [x ^ y for x, y in zip(v, b)]
    return v


def thread_coords(layout, warp, lane):
    """Every coordinate one thread holds in a ``DistributedLinearLayout``."""
    hw = [a ^ b for a, b in zip(bases_value(layout.lane_bases, lane), bases_value(layout.warp_bases, warp))]
    return [[a ^ b for a, b in zip(bases_value(layout.reg_bases, r), hw)] for r in range(1 << len(layout.reg_bases))]


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

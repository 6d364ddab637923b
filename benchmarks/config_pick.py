"""Time named kernel configurations with the installed tree; prints one JSON line per case.

    python benchmarks/config_pick.py TAG [--cases NxK:M:CONFIG,...] [--bits 4 --group-size 128] [--pdl on|off]

With ``--ncu`` nothing is timed: every case (and, per shape and row count, cuBLAS bf16 ``F.linear``) runs once
between ``cudaProfilerStart`` and ``cudaProfilerStop``, its name on stderr, for Nsight Compute
(``ncu --profile-from-start off --clock-control none ... python benchmarks/config_pick.py x --ncu --cases ...``;
docs/bench/kernels.md, session 18).

``CONFIG`` is ``benchmarks/kernels.py``'s ``config_name`` (``kind:MxNxKsSPLITwWARPSstSTAGES``, e.g.
``mma:16x128x128s16w4st2``). Each case is one CUDA graph over weight copies beyond L2, median of 20 replays
(``graph_time_us``), bf16 activations, symmetric weights. For an interleaved A/B of two trees, run it alternately
with each installed (``pip install -e``), a few rounds each on one machine, and compare the medians per case
(docs/bench/kernels.md, session 13). Unlike ``config_times.py`` the cases need not be the tuner's candidates.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re

import torch

# benchmarks/kernels.py by path (the checkout root must not go on sys.path: its kernels/ folder shadows a package)
_spec = importlib.util.spec_from_file_location("_bench_kernels", os.path.join(os.path.dirname(__file__), "kernels.py"))
_bk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bk)

SESSION_13 = ("4096x14336:256:wgmma:128x64x128s2w4st3,4096x14336:256:wgmma:128x64x128s1w4st3,"
              "4096x4096:256:wgmma:128x64x128s2w4st3,4096x4096:256:wgmma:128x64x128s1w4st3,"
              "4096x4096:16:mma:16x64x128s8w4st2,4096x4096:16:mma:16x128x128s16w4st2,"
              "4096x4096:16:tdot:16x64x128s8w4st4,4096x4096:16:wgmma:16x64x128s4w4st3,"
              "14336x4096:16:mma:16x64x128s2w4st2,14336x4096:16:mma:16x128x128s2w8st2,"
              "4096x4096:4:mma:8x64x128s8w4st2,4096x4096:4:mma:8x128x128s8w4st2,"
              "4096x14336:4:mma:8x128x128s16w4st2,4096x14336:16:wgmma:16x128x128s8w8st4,"
              "6144x4096:4:mma:8x128x64s8w4st2,14336x4096:4:mma:8x128x128s4w4st2,"
              "4096x14336:4:mma:8x128x128s8w4st2,28672x4096:16:mma:16x128x128s2w4st3")


def parse_config(name: str):
    """A ``KernelConfig`` from its ``config_name``."""
    from auto_quant.kernels.dispatch import KernelConfig

    m = re.fullmatch(r"(\w+):(\d+)x(\d+)x(\d+)s(\d+)w(\d+)st(\d+)", name)
    if m is None:
        raise ValueError(f"not a config name (kind:MxNxKsSPLITwWARPSstSTAGES): {name!r}")
    return KernelConfig(m.group(1), *(int(v) for v in m.groups()[1:]))


def main():
    from auto_quant.kernels.dispatch import Workspace, launch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tag", help="a label written into every row (e.g. base1, new1)")
    p.add_argument("--cases", default=SESSION_13, help="comma-separated NxK:M:CONFIG")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--pdl", choices=["default", "on", "off"], default="default",
                   help="programmatic dependent launch for the kinds that take it (default: the launcher's choice)")
    p.add_argument("--ncu", action="store_true", help="run each case once inside a profiler range instead of timing")
    args = p.parse_args()
    pdl = {"default": None, "on": True, "off": False}[args.pdl]
    dev = torch.device("cuda")
    copies_of = {}
    profiled, bf16_cases = [], set()
    for case in args.cases.split(","):
        shape, m, name = case.split(":", 2)
        N, K = (int(v) for v in shape.split("x"))
        M, cfg = int(m), parse_config(name)
        if (N, K) not in copies_of:
            w = _bk.random_kernel_weight(N, K, args.bits, args.group_size, True, dev)
            copies_of[(N, K)] = [w] if args.ncu else _bk.copies_beyond_l2(w, w.nbytes(), _bk.clone_weight)
        copies = copies_of[(N, K)]
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        ws = Workspace()
        if args.ncu:
            launch(x, copies[0], None, cfg, ws, pdl=pdl)  # compiled (and its first launch) outside the range
            profiled.append((case, lambda x=x, w=copies[0], cfg=cfg, ws=ws: launch(x, w, None, cfg, ws, pdl=pdl)))
            if (N, K, M) not in bf16_cases:
                bf16_cases.add((N, K, M))
                wf = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
                torch.nn.functional.linear(x, wf)  # cuBLAS's first-call work outside the range too
                profiled.append((f"{shape}:{M}:bf16", lambda x=x, wf=wf: torch.nn.functional.linear(x, wf)))
            continue
        us = _bk.graph_time_us([lambda c=c: launch(x, c, None, cfg, ws, pdl=pdl) for c in copies], replays=20,
                               warm_s=0.1)
        print(json.dumps({"tag": args.tag, "N": N, "K": K, "M": M, "cfg": name, "pdl": args.pdl, "us": round(us, 2)}),
              flush=True)
    if args.ncu:
        _profile(profiled)


def _profile(cases):
    """Each ``(name, call)`` once, in a profiler range; names on stderr in launch order."""
    import sys

    torch.cuda.synchronize()
    for name, _ in cases:
        print("CASE", name, file=sys.stderr)
    torch.cuda.cudart().cudaProfilerStart()
    for _, call in cases:
        call()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()

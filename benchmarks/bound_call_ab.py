"""Host time of a bound layer call (``kernels/bound_launch.py``'s ``call_bound``) at two revisions, launcher stubbed.

A decode-sized eager call of a ``triton`` layer, and every call of the compiled op in ``torch.compile``'s default mode,
goes through ``call_bound``: the activation key, the dict lookup, the output's allocation and the argument list, then
Triton's launcher. This times everything but the launcher (replaced by a no-op, so it runs on a CPU and the GPU
host's noise does not enter), the working tree's module against ``--base``'s, in alternating rounds in one process.

    python benchmarks/bound_call_ab.py --base 42e9362 [--rounds 7] [--calls 50000]    # prints JSON
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


class StubKernel:
    """A compiled kernel's launch interface whose launcher does nothing."""

    function = "cu-function"
    packed_metadata = "packed-metadata"
    run = staticmethod(lambda *args: None)


def bound_call(module, x: torch.Tensor, out_features: int):
    """``call_bound`` of ``module`` with one binding for ``x`` (a gemv-like argument list of 29 values)."""
    k = x.shape[-1]
    x2, out, w = x.view(-1, k), torch.empty(x.numel() // k, out_features), torch.zeros(8)
    record = module.LaunchRecord()
    args = (x2, w, w, w, None, out, 1, out_features, k, 1, 4, 128, 8, 16, 2) + (0,) * 14
    record.launches.append((StubKernel(), (64, 1, 1), args))
    record.done(x2, out)
    try:
        binding = record.bind((*x.shape[:-1], out_features))
    except TypeError:  # a revision whose bind() takes no shape
        binding = record.bind()
    binding._stream = lambda index: 0
    binding.device_index = 0
    table = {module.activation_key(x): binding}
    return lambda: module.call_bound(table, (), x, k, out_features, None)


def per_call_us(fn, calls: int) -> float:
    for _ in range(1000):
        fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="git revision whose kernels/bound_launch.py is the baseline")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=50000)
    args = p.parse_args()
    src = subprocess.run(["git", "-C", ROOT, "show", f"{args.base}:kernels/bound_launch.py"], check=True,
                         capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(src)
    modules = {"base": load_module(f.name, "bound_launch_base"),
               "head": load_module(os.path.join(ROOT, "kernels", "bound_launch.py"), "bound_launch_head")}
    os.unlink(f.name)
    torch.set_num_threads(1)
    x = torch.randn(1, 1, 4096)
    with mock.patch.object(torch.cuda, "current_device", lambda: 0):
        calls = {name: bound_call(m, x, 4096) for name, m in modules.items()}
        shapes = {name: tuple(fn().shape) for name, fn in calls.items()}
        times = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, fn in calls.items():
                times[name].append(per_call_us(fn, args.calls))
    res = {"command": " ".join(["python"] + sys.argv), "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "layer": "4096 -> 4096, activations [1, 1, 4096], float32 on CPU",
           "returned_shapes": shapes}
    for name, v in times.items():
        res[f"{name}_us_best"] = round(min(v), 2)
        res[f"{name}_us_median"] = round(statistics.median(v), 2)
    res["head_x_base_median"] = round(res["base_us_median"] / res["head_us_median"], 2)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

"""A quantized model's first calls in a new process, with and without the tuner's picks on disk; prints JSON.

    python benchmarks/first_call.py [--layers 2] [--format w4g128] [--prefill 512]

A Llama-3-8B-shaped model (random weights, ``--layers`` blocks: every block has the same linear shapes, so the
tuning work does not grow with depth) is quantized and attached to the ``triton`` backend in a fresh process per
case, then times its first decode step (1 token), a second one, a first and a second prefill (``--prefill`` tokens)
and one of another length in the same row bucket (``--other-prefill``: a new prompt length must not compile again):

* ``cold``: an empty Triton compile cache and an empty tuner cache (a first run on a new machine);
* ``tuner_cache``: both caches as the first case left them (the next process serving the model);
* ``no_tuner_cache``: the compile cache warm, ``tuning_cache=None`` (every process times every candidate again);
* ``tuner_cache_fresh_compile``: the tuner cache warm, the compile cache empty (a new container given the tuner's
  folder: only the picked kernels compile, side by side in the attach);
* ``tuner_cache_fresh_compile_lazy``: the same with ``attach_backends(compile_ahead=False)`` (each picked kernel
  compiles at its first call, one by one).

The compile cache is Triton's (``TRITON_CACHE_DIR``, set per case to a temporary folder here); the tuner cache is
``attach_backends(tuning_cache=)``. ``no_tuner_cache`` against ``tuner_cache`` is what the tuner cache saves.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402


def _kernels_bench():
    spec = importlib.util.spec_from_file_location("_kernels_bench", os.path.join(os.path.dirname(__file__),
                                                                                 "kernels.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def worker(args) -> dict:
    from auto_quant.inference.backends import attach_backends

    bench = _kernels_bench()
    bits, group_size, sym = bench.parse_format(args.format)
    if not sym:
        raise SystemExit("first_call.py: the model is quantized symmetric (--format w4g128)")
    dev = torch.device("cuda")
    model = bench.llama_shaped_model(args.layers, bench.LLAMA3_8B_DIMS, dev)
    bench.quantize_linears(model, bits, group_size)
    t = time.perf_counter()
    attach_backends(model, backend="triton", tuning_cache=args.tuning_cache or None,
                    compile_ahead=not args.lazy_compile)
    torch.cuda.synchronize()
    out = {"attach_s": round(time.perf_counter() - t, 3)}

    def timed(name, n_tokens):
        ids = torch.zeros(1, n_tokens, dtype=torch.long, device=dev)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
        out[name] = round(time.perf_counter() - t, 3)

    timed("first_decode_s", 1)
    timed("second_decode_s", 1)
    timed("first_prefill_s", args.prefill)
    timed("second_prefill_s", args.prefill)
    timed("other_length_prefill_s", args.other_prefill)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--format", default="w4g128")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--other-prefill", type=int, default=300,
                   help="a later prompt length in the first one's row bucket (not a multiple of 16)")
    p.add_argument("--cases", default="cold,tuner_cache,no_tuner_cache,tuner_cache_fresh_compile,"
                                      "tuner_cache_fresh_compile_lazy",
                   help="which cases, in this order (all but no_tuner_cache need cold before them)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tuning-cache", default="", help=argparse.SUPPRESS)
    p.add_argument("--lazy-compile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if not torch.cuda.is_available():
        raise SystemExit("first_call.py needs CUDA")
    result = {"machine": torch.cuda.get_device_name(0), "command": " ".join(["python"] + sys.argv), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(tmp, "triton"))
        tuner_dir = os.path.join(tmp, "tuner")
        base = [sys.executable, os.path.abspath(__file__), "--worker", "--layers", str(args.layers), "--format",
                args.format, "--prefill", str(args.prefill), "--other-prefill", str(args.other_prefill)]
        fresh = dict(env, TRITON_CACHE_DIR=os.path.join(tmp, "triton_fresh"))
        fresh_lazy = dict(env, TRITON_CACHE_DIR=os.path.join(tmp, "triton_fresh_lazy"))
        for case, extra, case_env in [("cold", ["--tuning-cache", tuner_dir], env),
                                      ("tuner_cache", ["--tuning-cache", tuner_dir], env),
                                      ("no_tuner_cache", [], env),
                                      ("tuner_cache_fresh_compile", ["--tuning-cache", tuner_dir], fresh),
                                      ("tuner_cache_fresh_compile_lazy", ["--tuning-cache", tuner_dir,
                                                                          "--lazy-compile"], fresh_lazy)]:
            if case not in args.cases.split(","):
                continue
            run = subprocess.run(base + extra, env=case_env, capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(f"first_call.py: the {case} case failed:\n{run.stderr[-2000:]}")
            result["cases"][case] = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

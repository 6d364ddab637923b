"""Perplexity of float / RTN / tuned models on held-out text, auto_quant vs Intel auto-round, as JSON.

    python benchmarks/quality.py --device cpu --schemes w4g128,w3g128,w2g64 \
        --methods float,rtn,auto_quant:default,auto_round:default --nsamples 128 --seqlen 2048

Calibration and evaluation texts are disjoint: by default calibration comes from the State
of the Union ``train`` split and evaluation from its ``validation`` split (different speeches;
see docs/calibration.md), both assembled once here and shared by every run, so every method
sees identical tokens. Each run is a separate process (clean peak-memory figures); tuning time
excludes model loading, which is reported separately.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# run as a script, this folder is sys.path[0]; its benchmark scripts (gguf.py, kernels.py) must
# not shadow the packages of the same names
_sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _os.path.dirname(_os.path.abspath(__file__))]

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor() or "cpu"


def build_data(model_path, calib, evaluation, nsamples, seqlen, eval_seqlen, eval_windows, seed, path):
    from auto_quant.calib import build_calibration
    from auto_quant.models.loading import load_model

    _, tok = load_model(model_path)
    c = build_calibration(calib, tok, nsamples, seqlen, seed)
    e = build_calibration(evaluation, tok, eval_windows, eval_seqlen, 0)
    torch.save({"calib": [s for s in c.samples], "eval": [s for s in e.samples],
                "calib_desc": c.description, "eval_desc": e.description}, path)
    return c.description, e.description, len(c.samples), len(e.samples)


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def same_run_ratios(runs: list[dict]) -> list[dict]:
    """auto_quant vs its peers measured in this run, per scheme: ΔPPL, tuning time and peak memory ratios.

    Pairs: each ``auto_quant:<recipe>`` with ``auto_round:<recipe>`` (same settings), ``auto_quant:light``
    with ``auto_round:default`` (issue 9's "light within 1.1x of auto-round default's ΔPPL at ≤ 0.3x its
    time"), and each ``auto_quant:<recipe>`` with ``gptqmodel:gptq``.
    """
    ok = {(r["method"], r["scheme"]): r for r in runs if "delta_ppl" in r}
    ratios = []
    for (method, scheme), r in ok.items():
        kind, _, recipe = method.partition(":")
        if kind != "auto_quant":
            continue
        peers = ["auto_round:" + recipe, "gptqmodel:gptq"] + (["auto_round:default"] if recipe == "light" else [])
        for peer_name in peers:
            peer = ok.get((peer_name, scheme))
            if peer is None:
                continue
            ratios.append({"scheme": scheme, "ours": method, "peer": peer_name,
                           "delta_ppl_ratio": _ratio(r["delta_ppl"], peer["delta_ppl"]),
                           "tune_time_ratio": _ratio(r["tune_seconds"], peer["tune_seconds"]),
                           "peak_gpu_ratio": _ratio(r.get("peak_gpu_mb"), peer.get("peak_gpu_mb")),
                           "peak_rss_ratio": _ratio(r.get("peak_rss_mb"), peer.get("peak_rss_mb"))})
    return ratios


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model dir / .gguf (default: the embedded SmolLM2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 on cpu, bfloat16 on cuda by default")
    p.add_argument("--schemes", default="w4g128,w3g128,w2g64")
    p.add_argument("--methods", default="float,rtn,auto_quant:default,auto_round:default",
                   help="float, rtn, auto_quant:<recipe>, auto_round:<recipe>, gptqmodel:gptq; a recipe is "
                        "light/default/best or explicit settings such as 'iters=100;lr=0.005'")
    p.add_argument("--calib", default="sotu:split=train")
    p.add_argument("--eval", default="sotu:split=validation")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--iters", type=int, default=None, help="override every recipe's iters")
    p.add_argument("--eval_seqlen", type=int, default=512)
    p.add_argument("--eval_windows", type=int, default=40)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--intel_compile", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--data", default=None, help="reuse token data written by --prepare_only (for machines without the corpora)")
    p.add_argument("--prepare_only", default=None, metavar="PATH", help="write the calibration/evaluation tokens to PATH and stop")
    args = p.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.data:
        data = args.data
        d = torch.load(data)
        cdesc, edesc, nc, ne = d.get("calib_desc", args.calib), d.get("eval_desc", args.eval), len(d["calib"]), len(d["eval"])
        args.seqlen, args.eval_seqlen = d["calib"][0].numel(), d["eval"][0].numel()
    else:
        data = args.prepare_only or os.path.join(tempfile.mkdtemp(prefix="aq_bench_"), "data.pt")
        cdesc, edesc, nc, ne = build_data(args.model, args.calib, args.eval, args.nsamples, args.seqlen,
                                          args.eval_seqlen, args.eval_windows, args.seed, data)
        if args.prepare_only:
            print(json.dumps({"prepared": data, "calibration": cdesc, "evaluation": edesc, "samples": nc, "windows": ne}))
            return
    runs = []
    methods = args.methods.split(",")
    for scheme in args.schemes.split(","):
        for method in methods:
            if method == "float" and any(r["method"] == "float" for r in runs):
                continue
            # the worker runs as a script (not ``-m`` from the checkout root), so the checkout's
            # top-level kernels/ folder never shadows the `kernels` package transformers probes for
            worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quality_worker.py")
            cmd = [sys.executable, worker, "--method", method, "--scheme", scheme,
                   "--data", data, "--device", args.device, "--dtype", dtype, "--batch_size", str(args.batch_size),
                   "--seed", str(args.seed)]
            if args.model:
                cmd += ["--model", args.model]
            if args.iters is not None:
                cmd += ["--iters", str(args.iters)]
            if args.intel_compile:
                cmd += ["--intel_compile"]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                runs.append({"method": method, "scheme": scheme, "error": r.stderr.strip().splitlines()[-1:]})
            else:
                runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
            runs[-1]["wall_seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    base = next((r["ppl"] for r in runs if r.get("method") == "float" and "ppl" in r), None)
    for r in runs:
        if base is not None and "ppl" in r:
            r["delta_ppl"] = round(r["ppl"] - base, 4)
    ratios = same_run_ratios(runs)
    report = {
        "benchmark": "quality", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "torch": torch.__version__, "command": " ".join(["python benchmarks/quality.py"] + (argv or sys.argv[1:])),
        "calibration": {"spec": args.calib, "description": cdesc, "samples": nc, "seqlen": args.seqlen},
        "evaluation": {"spec": args.eval, "description": edesc, "windows": ne, "seqlen": args.eval_seqlen},
        "runs": runs, "ratios": ratios,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

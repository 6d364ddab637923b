"""One benchmark run in its own process (clean peak-memory accounting): load, quantize one way, score.

Invoked by ``benchmarks/quality.py``; prints one JSON object on the last line of stdout.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# run as a script, this folder is sys.path[0]; its benchmark scripts (gguf.py, kernels.py) must
# not shadow the packages of the same names
_sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != _os.path.dirname(_os.path.abspath(__file__))]

import argparse
import json
import resource
import sys
import time

import torch

SCHEMES = {
    "w4g128": dict(bits=4, group_size=128, sym=True),
    "w4g128asym": dict(bits=4, group_size=128, sym=False),
    "w3g128": dict(bits=3, group_size=128, sym=True),
    "w2g64": dict(bits=2, group_size=64, sym=True),
}
# auto_quant recipes (see recipes/*.yaml) and their Intel auto-round counterparts at the same settings
RECIPES = {
    "light": dict(iters=50, lr=5e-3),
    "default": dict(iters=200),
    "best": dict(iters=1000),
}


def recipe_settings(recipe: str) -> dict:
    """A named recipe (``light``/``default``/``best``) or explicit settings such as ``iters=100;lr=0.005``."""
    if "=" not in recipe:
        return dict(RECIPES[recipe])
    out = {}
    for item in recipe.split(";"):
        k, _, v = item.partition("=")
        out[k.strip()] = float(v) if any(c in v for c in ".e") else int(v)
    return out


def load(model_path, device, dtype):
    from auto_quant.models.loading import load_model

    t0 = time.perf_counter()
    model, tok = load_model(model_path)
    model = model.to(device=device, dtype=dtype).eval()
    return model, tok, time.perf_counter() - t0


def run_auto_quant(model, tok, scheme, recipe, samples, args, device):
    from auto_quant import AutoRound

    r = recipe_settings(recipe) if recipe != "rtn" else dict(iters=0)
    if args.iters is not None and recipe != "rtn":
        r["iters"] = args.iters
    ar = AutoRound(model, tok, **SCHEMES[scheme], **r, nsamples=len(samples), seqlen=samples[0].numel(),
                   batch_size=args.batch_size, dataset=[s.tolist() for s in samples], seed=args.seed,
                   device=str(device), progress=False, init_search=not args.no_init_search)
    t0 = time.perf_counter()
    ar.quantize()
    return time.perf_counter() - t0


def run_intel(model, tok, scheme, recipe, samples, args, device):
    from auto_round import AutoRound as IntelAutoRound

    r = recipe_settings(recipe)
    if args.iters is not None:
        r["iters"] = args.iters
    ar = IntelAutoRound(model, tok, **SCHEMES[scheme], **r, nsamples=len(samples), seqlen=samples[0].numel(),
                        batch_size=args.batch_size, dataset=[s.reshape(1, -1) for s in samples], seed=args.seed,
                        enable_torch_compile=args.intel_compile, device_map=str(device))
    t0 = time.perf_counter()
    ar.quantize()
    return time.perf_counter() - t0


def run_gptqmodel(model, tok, scheme, samples, args, device):
    """GPTQModel's GPTQ on the same calibration tokens; returns (tuning seconds, quantized model)."""
    import tempfile

    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    # GPTQModel 7.6 sizes its CPU pool as ceil(cores / 2) but always asks for a 2-worker loader pool on it,
    # which fails on machines with fewer than 3 cores; give its pool 2 workers there (its numerics are unaffected)
    _cpu_workers = gptqmodel._default_cpu_workers
    gptqmodel._default_cpu_workers = lambda: max(2, _cpu_workers())
    src = tempfile.mkdtemp(prefix="gptq_src_")
    dst = tempfile.mkdtemp(prefix="gptq_out_")
    model.save_pretrained(src)
    tok.save_pretrained(src)
    sch = SCHEMES[scheme]
    cfg = QuantizeConfig(bits=sch["bits"], group_size=sch["group_size"], sym=sch["sym"], desc_act=False)
    gm = GPTQModel.load(src, cfg, device=str(device))
    calib = [{"input_ids": s.reshape(1, -1).tolist(), "attention_mask": [[1] * s.numel()]} for s in samples]
    t0 = time.perf_counter()
    gm.quantize(calib, batch_size=1)
    tune = time.perf_counter() - t0
    gm.save(dst)
    # scored through auto_quant's exact dequantize-then-matmul loader (tests/test_foreign.py checks it against
    # GPTQModel's own loader): GPTQModel's CPU kernel refuses g128 when K = 576 (SmolLM2)
    from auto_quant.convert import load_quantized

    q, _ = load_quantized(dst, dtype=next(model.parameters()).dtype, backend="torch")
    return tune, q.to(device)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--method", required=True, help="float | rtn | auto_quant:<recipe> | auto_round:<recipe> | gptqmodel:gptq")
    p.add_argument("--scheme", default="w4g128", choices=sorted(SCHEMES))
    p.add_argument("--data", required=True, help=".pt with 'calib' and 'eval' token tensors")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--intel_compile", action="store_true")
    p.add_argument("--no_init_search", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    data = torch.load(args.data)
    model, tok, load_s = load(args.model, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    kind, _, recipe = args.method.partition(":")
    tune_s = 0.0
    if kind == "rtn":
        tune_s = run_auto_quant(model, tok, args.scheme, "rtn", data["calib"], args, device)
    elif kind == "auto_quant":
        tune_s = run_auto_quant(model, tok, args.scheme, recipe, data["calib"], args, device)
    elif kind == "auto_round":
        tune_s = run_intel(model, tok, args.scheme, recipe, data["calib"], args, device)
    elif kind == "gptqmodel":
        tune_s, model = run_gptqmodel(model, tok, args.scheme, data["calib"], args, device)
    elif kind != "float":
        raise SystemExit(f"unknown method {args.method}")
    peak_gpu = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    from auto_quant.eval.perplexity import perplexity

    model.to(device)
    windows = [{"input_ids": w} for w in data["eval"]]
    ppl = perplexity(model, windows, batch_size=4, progress=False).ppl
    out = {
        "method": args.method, "scheme": args.scheme if kind != "float" else "float", "ppl": ppl,
        "tune_seconds": round(tune_s, 2), "load_seconds": round(load_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": None if peak_gpu is None else round(peak_gpu / 2**20, 1),
        "iters": args.iters, "batch_size": args.batch_size, "device": args.device, "dtype": args.dtype,
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""Tuning wall time and peak memory at real model shapes (random weights), auto_quant vs Intel auto-round.

    python benchmarks/tuning_cost.py --device cuda --shapes smollm2-135m:2,qwen2.5-0.5b:2,llama-3-8b:1 \
        --nsamples 128 --seqlen 2048 --iters 200 --batch_size 8

Each shape is a transformers model built from that architecture's real config with random weights
and only the first ``N`` decoder blocks (``name:N``). Tuning cost per block does not depend on the
weight values, so a few blocks give the per-block cost; ``extrapolated_seconds`` multiplies it by
the real depth (the capture stage and the rest of a run are a small, separately reported share).
Each (shape, method) runs in its own process, so peak memory is that run's alone. Calibration
tokens are random ids; both tuners get the same ones, seed and settings. Prints JSON.

``--profile`` adds a torch.profiler table of one auto_quant block (top operators by device time).
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
import subprocess
import sys
import time

import torch

# architecture, hidden, intermediate, heads, kv heads, vocab, real depth
SHAPES = {
    "smollm2-135m": ("llama", 576, 1536, 9, 3, 49152, 30),
    "qwen2.5-0.5b": ("qwen2", 896, 4864, 14, 2, 151936, 24),
    "llama-3.2-1b": ("llama", 2048, 8192, 32, 8, 128256, 16),
    "llama-3-8b": ("llama", 4096, 14336, 32, 8, 128256, 32),
}
SCHEME = dict(bits=4, group_size=128, sym=True)


def build_model(shape: str, layers: int, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, hidden, inter, heads, kv, vocab, _ = SHAPES[shape]
    cfg = AutoConfig.for_model(arch, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                               num_key_value_heads=kv, vocab_size=vocab, num_hidden_layers=layers,
                               max_position_embeddings=32768, tie_word_embeddings=arch == "llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()
    return model


def stand_in_tokenizer():
    """A one-word tokenizer: the calibration data is token ids, but Intel's AutoRound insists on a tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                   unk_token="<unk>", pad_token="<unk>", eos_token="<unk>")


def worker(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape, _, n = args.shape.partition(":")
    layers = int(n or 2)
    model = build_model(shape, layers, device, dtype)
    g = torch.Generator().manual_seed(args.seed)
    vocab = SHAPES[shape][5]
    samples = [torch.randint(0, vocab, (args.seqlen,), generator=g) for _ in range(args.nsamples)]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_gpu = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    t0 = time.perf_counter()
    prof = None
    kind, _, variant = args.method.partition(":")
    if variant not in ("", "compile", "graphs"):
        raise ValueError(f"unknown variant {variant!r} of {kind}")
    compile_flag = variant == "compile"
    if kind == "auto_quant":
        from auto_quant import AutoRound

        ar = AutoRound(model, None, **SCHEME, iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen,
                       batch_size=args.batch_size, dataset=[s.tolist() for s in samples], seed=args.seed,
                       device=str(device), progress=False, enable_torch_compile=compile_flag,
                       cuda_graphs=variant == "graphs")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                ar.quantize()
        else:
            ar.quantize()
    elif kind == "auto_round":
        from auto_round import AutoRound as IntelAutoRound

        ar = IntelAutoRound(model, stand_in_tokenizer(), **SCHEME, iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen,
                            batch_size=args.batch_size, dataset=[s.reshape(1, -1) for s in samples], seed=args.seed,
                            enable_torch_compile=compile_flag, device_map=str(device))
        ar.quantize()
    else:
        raise ValueError(f"unknown method {args.method!r}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    real_depth = SHAPES[shape][6]
    out = {
        "shape": shape, "blocks": layers, "method": args.method, "tune_seconds": round(secs, 2),
        "seconds_per_block": round(secs / layers, 2), "real_depth": real_depth,
        "extrapolated_seconds": round(secs / layers * real_depth, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
        "model_gpu_mb": round(base_gpu / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if prof is not None:
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=30)
        out["profile_file"] = args.profile
        with open(args.profile, "w") as f:
            f.write(table)
        ev = prof.key_averages()
        out["profile_device_ms"] = round(sum(getattr(e, "self_device_time_total", 0) for e in ev) / 1e3, 1)
        out["profile_ops"] = int(sum(e.count for e in ev if not e.key.startswith(("cuda", "Memcpy", "Memset"))))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--shapes", default="smollm2-135m:2,qwen2.5-0.5b:2,llama-3-8b:1",
                   help=f"comma list of name:blocks; names: {', '.join(SHAPES)}")
    p.add_argument("--methods", default="auto_quant,auto_round",
                   help="auto_quant[:graphs|:compile], auto_round[:compile]")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--profile", default=None, metavar="PATH", help="profile auto_quant runs, one table per run at PATH.<shape>.<method>.txt")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    runs = []
    for shape in args.shapes.split(","):
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--worker", "--shape", shape, "--method", method]
            for k in ("device", "dtype", "nsamples", "seqlen", "iters", "batch_size", "seed"):
                cmd += [f"--{k}", str(getattr(args, k))]
            if args.profile and method.startswith("auto_quant"):
                cmd += ["--profile", f"{args.profile}.{shape.replace(':', '_')}.{method.replace(':', '_')}.txt"]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                runs.append({"shape": shape, "method": method, "error": r.stderr.strip().splitlines()[-3:]})
            else:
                runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
            runs[-1]["wall_seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    ratios = []
    for r in runs:
        if not r.get("method", "").startswith("auto_quant") or "tune_seconds" not in r:
            continue
        for peer in [x for x in runs if x.get("method", "").startswith("auto_round") and x.get("shape") == r["shape"]
                     and "tune_seconds" in x]:
            ratios.append({"shape": r["shape"], "ours": r["method"], "peer": peer["method"],
                           "tune_time_ratio": round(r["tune_seconds"] / peer["tune_seconds"], 3),
                           "peak_gpu_ratio": (round(r["peak_gpu_mb"] / peer["peak_gpu_mb"], 3)
                                              if r.get("peak_gpu_mb") and peer.get("peak_gpu_mb") else None)})
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    report = {"benchmark": "tuning_cost", "date": time.strftime("%Y-%m-%d"), "machine": gpu or "cpu",
              "torch": torch.__version__, "command": " ".join(["python benchmarks/tuning_cost.py"] + (argv or sys.argv[1:])),
              "scheme": SCHEME, "runs": runs, "ratios": ratios}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

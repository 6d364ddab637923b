"""The CPU half of ``benchmarks/kernels.py`` (run it as ``python benchmarks/kernels.py cpu ...``, whose docstring
describes the method): decode tokens/s of SmolLM2-135M, float32 vs auto_quant W4 through the CPU backends vs
llama.cpp Q4_0, and a one-layer GEMV micro-benchmark. Loaded by path by ``kernels.py``."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time

import torch


def hf_decoder(model, ids):
    """``run(n)``: greedy-decode n tokens after the prompt with the model's KV cache; returns seconds."""

    def run(n):
        with torch.no_grad():
            out = model(ids, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(n):
                out = model(tok, past_key_values=cache, use_cache=True)
                cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return time.perf_counter() - t

    return run


def hf_compiled_decoder(model, ids, max_cache_len: int = 256):
    """``run(n)`` for ``torch.compile(model.forward)`` (default mode) over a ``StaticCache``: an eager prefill of
    the prompt, then n greedy decode steps through the compiled forward, timed like :func:`hf_decoder`."""
    from transformers import StaticCache

    forward = torch.compile(model.forward)

    def run(n):
        cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        with torch.no_grad():
            pos = torch.arange(ids.shape[1])
            out = model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for i in range(ids.shape[1], ids.shape[1] + n):
                pos = torch.tensor([i])
                out = forward(input_ids=tok, past_key_values=cache, cache_position=pos, position_ids=pos[None],
                              use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            return time.perf_counter() - t

    return run


def llama_cpp_decoder(gguf_path: str, threads: int):
    """``(run, info)`` for llama.cpp on the same model requantized to Q4_0; run is None if unavailable."""
    try:
        import llama_cpp
    except Exception as e:
        return None, {"skipped": f"llama-cpp-python not importable ({type(e).__name__})"}
    import ctypes
    import tempfile

    out = os.path.join(tempfile.mkdtemp(prefix="aq_q4_0_"), "model-q4_0.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(gguf_path.encode(), out.encode(), ctypes.byref(params))
    if rc != 0:
        return None, {"skipped": f"llama_model_quantize returned {rc}"}
    llm = llama_cpp.Llama(model_path=out, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    prompt = llm.tokenize(b"The capital of France is")

    def run(n):
        it = llm.generate(prompt, temp=0.0, top_k=1, reset=True)
        next(it)  # prompt evaluation and the first token
        t = time.perf_counter()
        for _ in range(n):
            next(it)
        return time.perf_counter() - t

    info = {"file": "SmolLM2 Q4_1 GGUF requantized to Q4_0 by llama.cpp (allow_requantize)",
            "size_MB": round(os.path.getsize(out) / 2**20, 1), "llama_cpp_python": llama_cpp.__version__}
    return run, info


CPU_BACKENDS = {"torch_cpu_int4": "", "cpu_gemv": "_cpu_gemv"}  # backend -> engine label suffix
GEMV_SHAPES = [(1536, 576), (576, 1536), (49152, 576)]  # SmolLM2-135M: up/gate, down, lm_head (out N, in K)


def cpu_gemv_micro(group_size: int, rounds: int = 5, copies_bytes: int = 96 * 2**20) -> list[dict]:
    """µs and GB/s of one M = 1 GEMV per CPU backend; each timing cycles through weight copies
    totalling ``copies_bytes`` (beyond the L3 cache), so the weights come from memory as in decode."""
    from auto_quant.inference import cpu_gemv, cpu_int4
    from auto_quant.inference.qlinear import QuantLinear
    from auto_quant.quant import QuantSpec, quantize_weight

    rows = []
    for n, k in GEMV_SHAPES:
        g = torch.Generator().manual_seed(0)
        qw = quantize_weight(torch.randn(n, k, generator=g), QuantSpec(bits=4, group_size=group_size, sym=True))
        layer = QuantLinear.from_quantized(qw, None, layout="gptq_v2")
        x = torch.randn(1, k, generator=g)
        layers = {"torch_cpu_int4": cpu_int4.prepare(layer), "cpu_gemv": cpu_gemv.prepare(layer)}
        sizes = {"torch_cpu_int4": tensor_bytes(layers["torch_cpu_int4"].packed, layers["torch_cpu_int4"].scale_and_zero),
                 "cpu_gemv": tensor_bytes(layers["cpu_gemv"].weight.data)}
        row = {"N": n, "K": k, "group_size": group_size}
        for name, run in layers.items():
            copies = [copy_cpu_layer(run) for _ in range(max(1, math.ceil(copies_bytes / sizes[name])))]
            for c in copies[:3]:
                c(x)
            best = math.inf
            for _ in range(rounds):
                t = time.perf_counter()
                for c in copies:
                    c(x)
                best = min(best, (time.perf_counter() - t) / len(copies))
            row[f"{name}_us"] = round(best * 1e6, 2)
            row[f"{name}_GBps"] = round(sizes[name] / best / 1e9, 2)
            row[f"{name}_MB"] = round(sizes[name] / 2**20, 2)
        row["cpu_gemv_speedup"] = round(row["torch_cpu_int4_us"] / row["cpu_gemv_us"], 2)
        rows.append(row)
    return rows


def copy_cpu_layer(run):
    """A prepared CPU layer of either backend with its own copy of the packed weight tensors."""
    import copy
    import dataclasses

    from auto_quant.inference import cpu_gemv

    if isinstance(run, cpu_gemv.CpuGemvLinear):
        w = run.weight
        return cpu_gemv.CpuGemvLinear(dataclasses.replace(w, data=w.data.clone()), run.bias)
    c = copy.copy(run)
    c.packed, c.scale_and_zero = run.packed.clone(), run.scale_and_zero.clone()
    return c


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def cpu_main(args):
    import copy
    import pathlib
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM

    from auto_quant import AutoRound, AutoRoundConfig
    from auto_quant.inference import cpu_gemv
    from auto_quant.models.loading import default_model_path, load_model

    torch.set_num_threads(args.threads)
    res = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                       "cores": os.cpu_count(), "torch": torch.__version__, "load_avg_at_start": os.getloadavg(),
                       "cpu_gemv_path": cpu_gemv.vector_path()},
           "command": " ".join(["python"] + sys.argv),
           "model": "SmolLM2-135M-Instruct (embedded GGUF, loaded as float32)",
           "method": f"{args.rounds} interleaved rounds of {args.tokens} greedy decode tokens per engine after a "
                     "6-token prompt (HF: model forward with its KV cache, dynamic eager and static compiled; llama.cpp: "
                     "Llama.generate); tokens/s of the best round and the median round"}
    gs = args.group_size
    engines, tmps = {}, []
    model, tok = load_model(None)
    model.eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    engines["float32"] = hf_decoder(model, ids)
    for head in (False, True):
        base = f"w4g{gs}" + ("_lm_head_w4" if head else "")
        tmp = tempfile.mkdtemp(prefix="aq_bench_")
        tmps.append(tmp)
        m = copy.deepcopy(model)  # quantize() leaves its model fake-quantized: start from the float one each time
        AutoRound(m, tok, bits=4, group_size=gs, sym=True, iters=0, progress=False,
                  quant_lm_head=head).quantize_and_save(tmp)
        del m
        res[f"{base}_checkpoint_MB"] = round(sum(f.stat().st_size for f in pathlib.Path(tmp).glob("*.safetensors"))
                                             / 2**20, 1)
        for backend, suffix in CPU_BACKENDS.items():
            # each CPU kernel forced in turn (automatic selection would take cpu_gemv for both)
            config = AutoRoundConfig(backend=backend)
            label = base + suffix
            qm = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, quantization_config=config).eval()
            res[f"{label}_backends"] = sorted({q.backend for q in qm.modules() if hasattr(q, "kernel")})
            engines[label] = hf_decoder(qm, ids)
            if args.compile and head:
                qc = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, quantization_config=config).eval()
                engines[label + "_compiled"] = hf_compiled_decoder(qc, ids)
        if args.reference and not head:
            ref = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
            from auto_quant.inference.backends import detach_backends

            detach_backends(ref)
            t = hf_decoder(ref, ids)(4)
            res[f"{base}_torch_reference_tokens_per_s"] = round(4 / t, 2)
            del ref
    run, info = llama_cpp_decoder(str(default_model_path()), args.threads)
    res["llama_cpp_q4_0"] = info
    if run is not None:
        engines["llama_cpp_q4_0"] = run
    for f in engines.values():  # warm-up
        f(2)
    times = {k: [] for k in engines}
    for _ in range(args.rounds):
        for k, f in engines.items():
            times[k].append(f(args.tokens))
    for k, ts in times.items():
        res[f"{k}_tokens_per_s"] = {"best": round(args.tokens / min(ts), 2),
                                    "median": round(args.tokens / statistics.median(ts), 2)}
    for k in engines:
        if k != "float32":
            res[f"{k}_vs_float32"] = round(min(times["float32"]) / min(times[k]), 3)
        if k.startswith("w4") and "llama_cpp_q4_0" in times:
            res[f"{k}_vs_llama_cpp_q4_0"] = round(min(times["llama_cpp_q4_0"]) / min(times[k]), 3)
    res["gemv_micro"] = cpu_gemv_micro(gs)
    res["load_avg_at_end"] = os.getloadavg()
    for t in tmps:
        shutil.rmtree(t, ignore_errors=True)
    print(json.dumps(res, indent=1))

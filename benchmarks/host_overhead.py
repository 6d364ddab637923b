"""Host (CPU) time per call of a quantized layer, and eager ``generate()`` tokens/s, on a GPU.

Decode in eager mode (no CUDA graph, no ``torch.compile``) is what ``model.generate(...)`` runs by default. There
every layer call costs host time for Python and the kernel launch; once that exceeds the GPU time of the kernel,
the host sets the pace and a faster kernel buys nothing. This script measures that cost for a W4 g128 layer
(``triton`` backend) against ``nn.Linear`` in bf16, at each level of the call:

* ``module``: ``QuantLinear.__call__`` (what a model runs);
* ``layer``: the backend's ``TritonLinear.__call__`` (a bound launch from the second call on);
* ``quant_matmul``: with the variant given (no tuner lookup);
* ``launch``: the variant's kernel launch alone.

Each is called ``--calls`` times in a row with one synchronize at the end. The same weight stays in L2, so each
kernel runs a few µs (less than on a decode's cold weights, docs/bench/kernels.md) and the loop measures the host.
Then transformers' ``generate()`` with its default (dynamic) cache decodes a Llama-3-8B-shaped model of
``--layers`` blocks in bf16 and in W4 g128; with ``--compiled`` also a decode loop under ``torch.compile``'s
default mode, with ``--profile-eager`` a profiled eager decode loop.

    python benchmarks/host_overhead.py --layers 16            # prints JSON
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import torch

# benchmarks/kernels.py by path (the checkout root must not go on sys.path: its kernels/ folder shadows a package)
_spec = importlib.util.spec_from_file_location("_bench_kernels", os.path.join(os.path.dirname(__file__), "kernels.py"))
_bk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bk)
llama_shaped_model, quantize_linears, LLAMA3_8B_DIMS = _bk.llama_shaped_model, _bk.quantize_linears, _bk.LLAMA3_8B_DIMS


def per_call_us(fn, calls: int) -> float:
    """Mean wall time of ``fn()`` over ``calls`` back-to-back calls (host-bound when the GPU work is shorter)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return round(best, 2)


def layer_costs(N: int, K: int, rows: int, calls: int) -> dict:
    from auto_quant.inference.backends import attach_backends
    from auto_quant.kernels.dispatch import launch, quant_matmul

    dev = torch.device("cuda")
    torch.manual_seed(0)
    holder = torch.nn.Sequential(torch.nn.Linear(K, N, bias=False)).to(dev, torch.bfloat16)
    dense = torch.nn.Linear(K, N, bias=False).to(dev, torch.bfloat16)
    quantize_linears(holder, 4, 128)
    attach_backends(holder, tuning_cache=None)
    q = holder[0]
    layer = q.kernel.run
    x = torch.randn(1, rows, K, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        q(x)  # tunes this row count
        x2 = x.reshape(-1, K)
        cfg = layer.tuner.config(x2, layer.weight, None, layer.workspace)
        ws = layer.workspace
        out = {"shape": f"{N}x{K}", "rows": rows, "variant": str(cfg),
               "host_us": {
                   "bf16 nn.Linear": per_call_us(lambda: dense(x), calls),
                   "module": per_call_us(lambda: q(x), calls),
                   "layer": per_call_us(lambda: layer(x), calls),
                   "quant_matmul": per_call_us(lambda: quant_matmul(x, layer.weight, None, config=cfg, workspace=ws),
                                               calls),
                   "launch": per_call_us(lambda: launch(x2, layer.weight, None, cfg, ws), calls),
               }}
    return out


def eager_generate(layers: int, new_tokens: int, batch: int) -> dict:
    from auto_quant.inference.backends import attach_backends

    dev = torch.device("cuda")
    model = llama_shaped_model(layers, LLAMA3_8B_DIMS, dev)
    ids = torch.zeros(batch, 8, dtype=torch.long, device=dev)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def timed():
        with torch.no_grad():
            model.generate(ids, **kw)  # tunes, allocates
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(ids, **kw)
            torch.cuda.synchronize()
            return round(batch * new_tokens / (time.perf_counter() - t), 2)

    out = {"model": f"Llama-3-8B shape, {layers} blocks, random weights, batch {batch}, eager generate() of "
                    f"{new_tokens} tokens, dynamic cache", "bf16": timed()}
    quantize_linears(model, 4, 128)
    attach_backends(model, tuning_cache=None)
    out["w4g128"] = timed()
    out["speedup"] = round(out["w4g128"] / out["bf16"], 3)
    return out


def compiled_decode(layers: int, steps: int, batch: int) -> dict:
    """Tokens/s of a decode loop over a static cache with ``torch.compile(model.forward)`` in its default mode (no
    CUDA graphs): Inductor's wrapper launches the fused kernels from Python and calls each layer's op, so the
    op's host time per call counts as in eager mode."""
    from transformers import StaticCache

    from auto_quant.inference.backends import attach_backends

    dev = torch.device("cuda")
    model = llama_shaped_model(layers, LLAMA3_8B_DIMS, dev)

    def timed():
        torch._dynamo.reset()
        forward = torch.compile(model.forward, dynamic=False)
        cache = StaticCache(config=model.config, max_cache_len=2 * steps + 16)
        ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        pos = torch.zeros(1, dtype=torch.long, device=dev)
        with torch.no_grad():
            for i in range(2 * steps):
                if i == steps:
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                pos.fill_(i)
                ids = forward(input_ids=ids, past_key_values=cache, cache_position=pos, position_ids=pos[None],
                              use_cache=True).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
        return round(batch * steps / (time.perf_counter() - t), 2)

    out = {"model": f"Llama-3-8B shape, {layers} blocks, random weights, batch {batch}, {steps} decode steps over a "
                    "static cache, torch.compile default mode (no CUDA graphs)", "bf16": timed()}
    quantize_linears(model, 4, 128)
    attach_backends(model, tuning_cache=None)
    out["w4g128"] = timed()
    out["speedup"] = round(out["w4g128"] / out["bf16"], 3)
    return out


def eager_loop_profile(layers: int, steps: int = 64) -> dict:
    """ms per step of a plain eager decode loop over a dynamic cache (8-token prompt, then ``steps`` steps, three
    runs), bf16 then W4 g128, and the CPU time the profiler records in the ops of 8 steps (its tables go to
    stderr): what a quantized model's step adds outside the recorded ops is Python."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    from auto_quant.inference.backends import attach_backends

    dev = torch.device("cuda")
    model = llama_shaped_model(layers, LLAMA3_8B_DIMS, dev)

    def loop(n):
        cache = DynamicCache(config=model.config)
        ids = torch.zeros(1, 8, dtype=torch.long, device=dev)
        with torch.no_grad():
            ids = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n):
                ids = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / n * 1e3

    out = {"model": f"Llama-3-8B shape, {layers} blocks, random weights, batch 1, eager decode loop, dynamic cache"}
    for label in ("bf16", "w4g128"):
        if label == "w4g128":
            quantize_linears(model, 4, 128)
            attach_backends(model, tuning_cache=None)
        loop(4)  # warm-up (and the tuner's first calls)
        ms = [round(loop(steps), 3) for _ in range(3)]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loop(8)
        table = prof.key_averages()
        print(label, table.table(sort_by="self_cpu_time_total", row_limit=18), file=sys.stderr)
        out[label] = {"ms_per_step": ms,
                      "profiled_self_cpu_ms_8_steps": round(sum(e.self_cpu_time_total for e in table) / 1e3, 3)}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="4096x4096,28672x4096")
    p.add_argument("--rows", default="1,16")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--layers", type=int, default=16, help="blocks of the generate() model; 0: skip it")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--compiled", action="store_true", help="also a decode loop under torch.compile's default mode")
    p.add_argument("--profile-eager", action="store_true", help="also a profiled eager decode loop, bf16 and W4")
    args = p.parse_args()
    import transformers
    import triton

    result = {"machine": {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                          "triton": triton.__version__, "transformers": transformers.__version__},
              "command": " ".join(["python"] + sys.argv), "layers": []}
    for s in args.shapes.split(","):
        N, K = (int(v) for v in s.split("x"))
        for r in args.rows.split(","):
            result["layers"].append(layer_costs(N, K, int(r), args.calls))
            print(json.dumps(result["layers"][-1]), file=sys.stderr)
    if args.layers:
        result["generate"] = eager_generate(args.layers, args.new_tokens, 1)
        if args.compiled:
            result["compiled_default_mode"] = compiled_decode(args.layers, args.new_tokens, 1)
        if args.profile_eager:
            result["eager_loop"] = eager_loop_profile(args.layers)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Tune one model twice, on one GPU and with each block's MLP on a second GPU; prints JSON.

    python benchmarks/multigpu.py [--layers 4] [--iters 50] [--nsamples 16] [--seqlen 512]

A Llama-3-8B-shaped model (hidden 4096, MLP 14336, 32 query and 8 key/value heads, vocabulary 128256; random
weights, ``--layers`` of its 32 blocks, bf16, kept on the CPU as auto_quant keeps a float model) is tuned at W4 g128
with ``AutoRound(device="cuda:0")`` and with ``AutoRound(device="cuda:0", device_map={"mlp": "cuda:1"})`` (the
MLP's linears on the second GPU through accelerate hooks, docs/multigpu.md). Reported per run: the wall time of
``quantize()``, each GPU's peak allocated memory, the planner's estimate; across the runs: how many layers' codes
are equal and the quantized models' logits on held-out tokens (relative difference).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch


def build(layers: int, seed: int, tiny: bool):
    import transformers

    dims = (dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
            if tiny else dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=128256))
    cfg = transformers.LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, rope_theta=500000.0,
                                   tie_word_embeddings=False, **dims)
    torch.manual_seed(seed)
    init = "cuda:0" if torch.cuda.is_available() else "cpu"
    with torch.device(init):  # random init on the GPU is much faster; the model then lives on the CPU
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.cpu().eval(), cfg.vocab_size


def tune(model, args, data, **where):
    from auto_quant import AutoRound

    gpus = range(torch.cuda.device_count())
    for i in gpus:
        torch.cuda.reset_peak_memory_stats(i)
    ar = AutoRound(model, None, bits=4, group_size=128, sym=True, iters=args.iters, nsamples=args.nsamples,
                   seqlen=args.seqlen, batch_size=args.batch_size, dataset=data, progress=False, **where)
    t = time.perf_counter()
    ar.quantize()
    for i in gpus:
        torch.cuda.synchronize(i)
    run = {"where": {k: str(v) for k, v in where.items()}, "quantize_s": round(time.perf_counter() - t, 2),
           "peak_GiB": {f"cuda:{i}": round(torch.cuda.max_memory_allocated(i) / 2**30, 3) for i in gpus}}
    if getattr(ar, "placement", None) is not None:
        run["plan"] = ar.placement.describe()
    return ar, run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tiny", action="store_true", help="a tiny model (a check of the script, not a measurement)")
    args = p.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("multigpu.py needs two CUDA devices")
    base, vocab = build(args.layers, 0, args.tiny)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=g).tolist()
    held_out = torch.randint(0, vocab, (2, 256), generator=g)
    result = {"machine": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
              "torch": torch.__version__, "args": vars(args), "runs": []}
    outs = []
    for where in ({"device": "cuda:0"}, {"device": "cuda:0", "device_map": {"mlp": "cuda:1"}}):
        ar, run = tune(copy.deepcopy(base), args, data, **where)
        result["runs"].append(run)
        print(json.dumps(run), file=sys.stderr, flush=True)  # a run's numbers survive a later failure
        codes = {k: v.weight.codes.cpu() for k, v in ar.outcome.layers.items()}
        with torch.no_grad():
            logits = ar.model.to("cuda:0")(held_out.to("cuda:0")).logits.float().cpu()
        outs.append((codes, logits))
        del ar
        torch.cuda.empty_cache()
    (ca, la), (cb, lb) = outs
    result["layers_with_equal_codes"] = f"{sum(torch.equal(ca[k], cb[k]) for k in ca)}/{len(ca)}"
    result["codes_differing_fraction"] = float(sum((ca[k] != cb[k]).sum() for k in ca) / sum(ca[k].numel() for k in ca))
    result["logits_rel_diff"] = float((la - lb).norm() / la.norm())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

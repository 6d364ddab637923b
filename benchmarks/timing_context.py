"""How the tuner's clock ranks kernel candidates, against back-to-back timing and against decode; prints JSON.

    python benchmarks/timing_context.py clocks [--cases NxK:M:FORMAT,...] [--out picks.json]
    python benchmarks/timing_context.py e2e [--tune 2] [--rep-ms 25,100] [--tune-memset] [--picks a.json b.json]
                                            [--batches 1,4,16]

``clocks``: for each case every candidate of ``kernels.dispatch.candidates`` is timed three ways:

* ``chain_us``: one CUDA graph over weight copies beyond L2, back to back (``benchmarks/kernels.py``'s table);
* ``memset_us``: the tuner's clock until session 15 (``kernels.gpu_timing.graph_times_ms``), each call after a
  64 MiB memset that flushes L2 and a copy of the activations, less the flushes alone;
* ``read_us``: the tuner's clock now, the same with a 64 MiB *read* (a sum) as the flush, which leaves L2 holding
  clean lines, as decode finds it (the previous layers' weights), where a memset leaves about 50 MB of dirty lines
  that the timed kernel's reads must write back.

Per case: each clock's pick, its ``chain_us`` against the best ``chain_us``, and the rank correlation.

``e2e``: decode tokens/s of ``benchmarks/kernels.py``'s Llama-3-8B-shaped model (W4 g128) with the picks of fresh
tuners as shipped, of one with the memset flush, and of earlier runs (each clock of a ``clocks`` run, each variant
of an ``e2e`` run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import types

import torch

_spec = importlib.util.spec_from_file_location("_bench_kernels", os.path.join(os.path.dirname(__file__), "kernels.py"))
_bk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bk)

CASES = ("4096x4096:1:w4g128,6144x4096:1:w4g128,14336x4096:1:w4g128,4096x4096:16:w4g128,6144x4096:16:w4g128,"
         "4096x4096:1:w8g128,6144x4096:1:w8g128,14336x4096:1:w8g128,28672x4096:1:w2g64,4096x14336:1:w2g64")
CLOCKS = ("memset", "read")


def spearman(a, b):
    def ranks(v):
        r = [0] * len(v)
        for i, j in enumerate(sorted(range(len(v)), key=v.__getitem__)):
            r[j] = i
        return r

    ra, rb, n = ranks(a), ranks(b), len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1)) if n > 1 else 1.0


def clock_times(N, K, M, fmt, flushes, per_case=200):
    """``{config name: {"config": ..., "chain_us": ..., "<clock>_us": ...}}`` over the case's candidates."""
    from auto_quant.kernels.dispatch import Workspace, candidates, launch
    from auto_quant.kernels.gpu_timing import graph_times_ms

    dev, dt = torch.device("cuda"), torch.bfloat16
    bits, gs, sym = _bk.parse_format(fmt)
    w = _bk.random_kernel_weight(N, K, bits, gs, sym, dev)
    copies = _bk.copies_beyond_l2(w, w.nbytes(), _bk.clone_weight)
    ws = Workspace()
    x = torch.randn(M, K, device=dev, dtype=dt)
    x_copy = torch.empty_like(x)
    cfgs = []
    for c in candidates(M, N, K, dev, bits, gs, dt)[:per_case]:
        try:
            launch(x, w, None, c, ws)
            torch.cuda.synchronize()
            cfgs.append(c)
        except Exception as e:  # does not compile or fit
            print(f"skip {c}: {type(e).__name__}", file=sys.stderr)
            torch.cuda.synchronize()
    rows = {_bk.config_name(c): {"config": c.__dict__} for c in cfgs}
    for c in cfgs:
        rows[_bk.config_name(c)]["chain_us"] = round(
            _bk.graph_time_us([lambda cc=cc, c=c: launch(x, cc, None, c, ws) for cc in copies], replays=10,
                              warm_s=0.05), 2)
    for name, fl in flushes.items():
        ts = graph_times_ms([lambda c=c: launch(x, w, None, c, ws) for c in cfgs], fl, rounds=5, settle_rounds=20,
                            warm=lambda: x_copy.copy_(x))
        for c, t in zip(cfgs, ts):
            rows[_bk.config_name(c)][f"{name}_us"] = round(t * 1e3, 2)
    del copies, w
    torch.cuda.empty_cache()
    return rows


def clocks_main(args):
    from auto_quant.kernels.gpu_timing import l2_read_flush, l2_write_flush

    dev = torch.device("cuda")
    flushes = {"memset": l2_write_flush(dev), "read": l2_read_flush(dev)}
    summary = []
    for case in args.cases.split(","):
        shape, m, fmt = case.split(":")
        N, K = (int(v) for v in shape.split("x"))
        rows = clock_times(N, K, int(m), fmt, flushes, args.per_case)
        names = list(rows)
        chain = [rows[n]["chain_us"] for n in names]
        best = min(chain)
        out = {"case": case, "candidates": len(names), "picks": {"chain": names[chain.index(best)]},
               "best_chain_us": best}
        for clock in CLOCKS:
            v = [rows[n][f"{clock}_us"] for n in names]
            pick = names[v.index(min(v))]
            top4 = sorted(names, key=lambda n: rows[n][f"{clock}_us"])[:4]
            out["picks"][clock] = pick
            out[clock] = {"pick_chain_us": rows[pick]["chain_us"],
                          "pick_vs_best": round(rows[pick]["chain_us"] / best, 3),
                          "best_of_top4_vs_best": round(min(rows[n]["chain_us"] for n in top4) / best, 3),
                          "spearman": round(spearman(v, chain), 3),
                          "median_ratio_to_chain": round(sorted(a / b for a, b in zip(v, chain))[len(v) // 2], 3)}
        print(json.dumps(out), flush=True)
        summary.append({**out, "rows": rows})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "command": " ".join(sys.argv), "cases": summary}, f)


def seeded_tuner(picks: dict):
    """A tuner that starts with ``picks`` (``{(M bucket, N, K): config dict}``, W4 g128 sym bf16 keys)."""
    from auto_quant.kernels.dispatch import KernelConfig
    from auto_quant.kernels.tuner import Tuner

    t = Tuner()
    for (mb, N, K), cfg in picks.items():  # the key reads only the weight's format and shape: no weight is built
        w = types.SimpleNamespace(bits=4, group_size=128, zeros=None, out_features=N, in_features=K)
        x = torch.empty(mb, K, device="cuda", dtype=torch.bfloat16)
        t.best[Tuner.key(x, w)] = KernelConfig(**cfg)
    return t


def load_picks(path: str) -> dict:
    """``{variant: {(M bucket, N, K): config dict}}`` from a ``clocks --out`` file (one variant per clock) or an
    ``e2e --out`` file (its variants)."""
    from auto_quant.kernels.dispatch import m_bucket

    with open(path) as f:
        d = json.load(f)
    picks: dict = {}
    if "picks" in d:
        for variant, by_key in d["picks"].items():
            picks[variant] = {tuple(int(v) for v in k.strip("()").split(",")): cfg for k, cfg in by_key.items()}
    for case in d.get("cases", []):
        shape, m, _ = case["case"].split(":")
        N, K = (int(v) for v in shape.split("x"))
        for clock, name in case["picks"].items():
            picks.setdefault(clock, {})[(m_bucket(int(m)), N, K)] = case["rows"][name]["config"]
    return picks


def e2e_main(args):
    """``--tune`` fresh tuners as shipped per ``--rep-ms`` (and with ``--tune-memset`` one with the memset flush)
    each tune the model once; then every variant's picks (and those of ``--picks`` files) decode ``--repeats``
    times, in rotating order, from a tuner seeded with them."""
    import auto_quant.inference.triton_backend as tb
    import auto_quant.kernels.gpu_timing as gt
    from auto_quant.kernels.tuner import Tuner

    batches = tuple(int(b) for b in args.batches.split(","))
    tuner_class = tb.Tuner  # the backend's tuner, patched below (this script only), restored at the end
    try:
        picks = {}
        reps = [float(r) for r in args.rep_ms.split(",")]
        tunings = [(f"tuner_{i + 1}" if len(reps) == 1 else f"tuner_rep{r:g}_{i + 1}", gt.l2_read_flush, r)
                   for r in reps for i in range(args.tune)]
        tunings += [("tuner_memset", gt.l2_write_flush, reps[0])] if args.tune_memset else []
        for variant, flush, rep_ms in tunings:
            tuner = Tuner(rep_ms=rep_ms, recheck=args.recheck, flush=flush)
            tb.Tuner = lambda tuner=tuner: tuner
            _bk.e2e_decode(args.layers, steps=8, batches=batches)
            picks[variant] = {k[4:7]: v.__dict__ for k, v in tuner.best.items()}
        for path in args.picks or []:
            for variant, p in load_picks(path).items():
                picks[f"{os.path.basename(path)}:{variant}"] = p
        names = list(picks)
        runs = []
        for r in range(args.repeats):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                seeded = seeded_tuner(picks[name])
                tb.Tuner = lambda seeded=seeded: seeded
                out = _bk.e2e_decode(args.layers, batches=batches)
                row = {"variant": name, "round": r, "tuned_here": sorted(str(k[4:7]) for k in seeded.timings),
                       "speedup": [out["speedup"]] + [b["speedup"] for b in out.get("batched", [])],
                       "tokens_per_s": [out["w4g128"]["tokens_per_s"]] + [b["w4g128"]["tokens_per_s"]
                                                                            for b in out.get("batched", [])],
                       "bf16_tokens_per_s": [out["bf16"]["tokens_per_s"]] + [b["bf16"]["tokens_per_s"]
                                                                             for b in out.get("batched", [])]}
                runs.append(row)
                print(json.dumps(row), flush=True)
    finally:
        tb.Tuner = tuner_class
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "command": " ".join(sys.argv), "batches": batches,
                       "picks": {k: {str(kk): vv for kk, vv in v.items()} for k, v in picks.items()}, "runs": runs},
                      f)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("clocks")
    c.add_argument("--cases", default=CASES)
    c.add_argument("--per-case", type=int, default=200)
    c.add_argument("--out", help="write every candidate's times and each clock's picks to this JSON file")
    e = sub.add_parser("e2e")
    e.add_argument("--picks", nargs="*", help="also decode with the picks of these `clocks --out` / `e2e --out` files")
    e.add_argument("--tune", type=int, default=1, help="fresh tuners as shipped, each tuning the model once")
    e.add_argument("--tune-memset", action="store_true", help="and one tuning with the memset flush")
    e.add_argument("--recheck", type=int, default=4, help="the tuners' recheck (1: the first look decides)")
    e.add_argument("--rep-ms", default="25", help="the tuners' rep_ms, comma-separated: --tune tunings of each "
                                                   "(rounds per candidate: rep_ms // 4, 3 to 30)")
    e.add_argument("--repeats", type=int, default=3)
    e.add_argument("--layers", type=int, default=16)
    e.add_argument("--batches", default="1,4,16")
    e.add_argument("--out")
    args = p.parse_args()
    (clocks_main if args.cmd == "clocks" else e2e_main)(args)


if __name__ == "__main__":
    main()

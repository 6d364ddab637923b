"""Console entry points ``auto-round``, ``auto-round-best``, ``auto-round-light`` (and ``python -m auto_quant``).

Every :class:`~auto_quant.errors.AutoQuantError` and every usage error becomes one line on
stderr and a non-zero exit status (2 for usage errors, 1 for the rest); the library itself
never exits.
"""

from __future__ import annotations

import logging
import os
import sys

from auto_quant.cli.args import CliUsageError, build_parser, parse
from auto_quant.errors import AutoQuantError

_NOISY = ("transformers", "datasets", "lm-eval", "lm_eval", "accelerate", "urllib3", "filelock", "huggingface_hub",
          "httpx", "matplotlib", "PIL", "torchao")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    for h in list(root.handlers):  # a second call in one process (tests) replaces the first handler
        if getattr(h, "_auto_quant_cli", False):
            root.removeHandler(h)
    handler._auto_quant_cli = True
    root.addHandler(handler)
    root.setLevel(level)
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    for name in ("lm-eval", "lm_eval"):  # its warnings about in-memory models are not actionable here
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(logging.DEBUG if verbose else logging.ERROR)
        if quiet:
            hf_logging.disable_progress_bar()
        else:
            hf_logging.enable_progress_bar()
    except Exception:
        pass


def run(argv: list[str] | None, recipe: str, prog: str) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(prog, recipe)
        try:
            args = parse(parser, argv)
        except SystemExit as e:  # --help / --version
            return int(e.code or 0)
        _setup_logging(args.verbose, args.quiet)
        from auto_quant.cli import plan as planning
        from auto_quant.cli import run as flows

        if args.eval:
            p = planning.plan_eval(args, prog)
            print(planning.describe(p), flush=True)
            return flows.evaluate_existing(p)
        p = planning.plan_quantize(args, prog, recipe)
        print(planning.describe(p), flush=True)
        return flows.quantize(p, argv)
    except CliUsageError as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except AutoQuantError as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _prog(default: str) -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name.startswith("auto-") else default


def main_default(argv: list[str] | None = None) -> int:
    return run(argv, "default", _prog("auto-round") if argv is None else "auto-round")


def main_best(argv: list[str] | None = None) -> int:
    return run(argv, "best", "auto-round-best")


def main_light(argv: list[str] | None = None) -> int:
    return run(argv, "light", "auto-round-light")


__all__ = ["main_best", "main_default", "main_light", "run"]

"""Evaluation: perplexity with a documented protocol, the lm-eval adapter, result tables and JSON."""

from auto_quant.eval.perplexity import PerplexityResult, make_windows, perplexity, perplexity_on_spec
from auto_quant.eval.runner import EvalSettings, PreparedData, evaluate, prepare, format_table, results_document, write_results
from auto_quant.eval.tasks import TaskSpec, parse_tasks

__all__ = [
    "EvalSettings",
    "PreparedData",
    "prepare",
    "PerplexityResult",
    "TaskSpec",
    "evaluate",
    "format_table",
    "make_windows",
    "parse_tasks",
    "perplexity",
    "perplexity_on_spec",
    "results_document",
    "write_results",
]

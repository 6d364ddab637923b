"""Shared helpers of the CLI / evaluation / report tests (no tests here): a tiny model directory with a
tokenizer, calibration and evaluation texts, and an offline lm-eval multiple-choice task."""

from __future__ import annotations

import json
from pathlib import Path

from tiny_models import tiny_model, tiny_texts, tiny_tokenizer

# Multiple-choice items over the tiny tokenizer's words; answers are arbitrary (the model is random).
MC_ITEMS = [
    {"question": "w1 w2 w3", "choices": ["w4", "w9", "w17"], "answer": 0},
    {"question": "w10 w11", "choices": ["w12 w13", "w40", "w41 w42 w43"], "answer": 1},
    {"question": "w100 w101 w102 w103", "choices": ["w104", "w7"], "answer": 0},
    {"question": "w5", "choices": ["w6", "w60", "w66", "w200"], "answer": 3},
    {"question": "w20 w21 w22", "choices": ["w23", "w24"], "answer": 1},
]


def write_mc_task(root: Path, name: str = "tiny_mc") -> Path:
    """A local lm-eval task YAML (dataset_path json + data_files) and its data; returns the YAML path."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in MC_ITEMS))
    path = root / f"{name}.yaml"
    path.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_target: answer\n"
        "doc_to_choice: choices\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    return path


def write_tiny_model(root: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny random model of a real architecture saved with its tokenizer, as a user would pass it to --model."""
    root.mkdir(parents=True, exist_ok=True)
    tiny_model(arch, seed=seed).save_pretrained(root)
    tiny_tokenizer().save_pretrained(root)
    return root


def write_texts(path: Path, seed: int, n: int = 16, words: int = 80) -> Path:
    path.write_text("\n".join(tiny_texts(n, words, seed)) + "\n")
    return path

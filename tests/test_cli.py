"""The three commands end to end on a tiny model, and every usage/config error as one line + non-zero exit."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from auto_quant.cli.main import main_best, main_default, main_light
from auto_quant.recipes import load_recipe
from test_cli_helpers import write_mc_task, write_texts, write_tiny_model

HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None  # CI installs it (the test extra)
TINY = ["--bits", "4", "--group_size", "32", "--iters", "2", "--nsamples", "4", "--seqlen", "32", "--batch_size", "2",
        "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {
        "root": root,
        "model": write_tiny_model(root / "tiny-llama"),
        "calib": write_texts(root / "calib.txt", seed=0),
        "eval": write_texts(root / "eval.txt", seed=1),
        "task": write_mc_task(root / "tasks"),
    }


@pytest.fixture(scope="module")
def quantized(assets, tmp_path_factory):
    """One full `auto-round` run: tune, save, evaluate (ppl + local lm-eval task, with the float baseline), report."""
    out = tmp_path_factory.mktemp("runs") / "w4g32"
    tasks = f"ppl:{assets['eval']}" + (f",{assets['task']}" if HAVE_LM_EVAL else "")
    argv = ["--model", str(assets["model"]), *TINY, "--dataset", str(assets["calib"]),
            "--tasks", tasks, "--eval_baseline",
            "--ppl_seqlen", "32", "--ppl_nsamples", "4", "--output_dir", str(out)]
    return out, argv, main_default(argv)


def _one_error_line(err: str, prog: str = "auto-round") -> str:
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith(f"{prog}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_auto_round_end_to_end(quantized, assets, capsys):
    out, argv, rc = quantized
    assert rc == 0
    for name in ("config.json", "model.safetensors", "run_config.yaml", "eval_results.json",
                 "quantization_report.json", "quantization_report.png"):
        assert (out / name).is_file(), name
    # the saved effective configuration is itself a recipe that repeats the run
    saved = load_recipe(out / "run_config.yaml")
    assert saved.kind == "full"
    assert saved.settings["iters"] == 2 and saved.settings["group_size"] == 32
    assert saved.settings["lr"] == pytest.approx(0.5)  # the default recipe's 1/iters, resolved with --iters 2
    run = yaml.safe_load((out / "run_config.yaml").read_text())["run"]
    assert run["origin"]["iters"] == "flag" and run["origin"]["seqlen"] == "flag"
    assert run["origin"]["lr"].startswith("recipe default")

    res = json.loads((out / "eval_results.json").read_text())
    ppl_task = f"ppl:{assets['eval']}"
    q, b = res["results"]["quantized"], res["results"]["baseline"]
    assert set(q) == set(b) == ({ppl_task, "tiny_mc"} if HAVE_LM_EVAL else {ppl_task})
    assert q[ppl_task]["info"]["windows"] == 4 and q[ppl_task]["info"]["tokens"] == 4 * 31
    assert 1 < q[ppl_task]["metrics"]["ppl"] < 10_000
    assert res["delta"][ppl_task]["ppl"] == pytest.approx(q[ppl_task]["metrics"]["ppl"] - b[ppl_task]["metrics"]["ppl"])
    if HAVE_LM_EVAL:
        assert 0.0 <= q["tiny_mc"]["metrics"]["acc"] <= 1.0

    # plain transformers loads what the command saved
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out)
    assert any(type(mod).__name__ == "QuantLinear" for mod in m.modules())
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_eval_existing_checkpoint_matches_in_memory(quantized, assets, tmp_path, capsys):
    out, _, rc = quantized
    assert rc == 0
    capsys.readouterr()
    ppl_task = f"ppl:{assets['eval']}"
    tasks = ppl_task + (f",{assets['task']}" if HAVE_LM_EVAL else "")
    rc = main_default(["--eval", "--model", str(out), "--tasks", tasks, "--ppl_seqlen", "32",
                       "--ppl_nsamples", "4", "--output_dir", str(tmp_path / "ev"), "-q"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert ppl_task in stdout and ("tiny_mc" in stdout) == HAVE_LM_EVAL
    got = json.loads((tmp_path / "ev" / "eval_results.json").read_text())["results"]["model"]
    tuned = json.loads((out / "eval_results.json").read_text())["results"]["quantized"]
    # the reloaded checkpoint (packed weights, QuantLinear) scores what the in-memory fake-quantized model scored
    assert got[ppl_task]["metrics"]["ppl"] == pytest.approx(tuned[ppl_task]["metrics"]["ppl"], rel=1e-4)
    if HAVE_LM_EVAL:
        assert got["tiny_mc"]["metrics"]["acc"] == tuned["tiny_mc"]["metrics"]["acc"]


def test_best_and_light_commands(assets, tmp_path):
    common = ["--model", str(assets["model"]), *TINY, "--dataset", str(assets["calib"]), "--disable_eval",
              "--disable_report"]
    assert main_best([*common, "--bits", "3", "--output_dir", str(tmp_path / "best")]) == 0
    best = load_recipe(tmp_path / "best" / "run_config.yaml").settings
    assert best["bits"] == 3 and best["iters"] == 2
    assert best["lr"] == pytest.approx(2 / 2)  # best: 2/iters at 3 bits or fewer
    assert best["nsamples"] == 4  # the flag beats the recipe's 512

    assert main_light([*common, "--output_dir", str(tmp_path / "light")]) == 0
    light = load_recipe(tmp_path / "light" / "run_config.yaml").settings
    assert light["lr"] == pytest.approx(5e-3)  # light's fixed lr survives --iters
    assert (tmp_path / "light" / "model.safetensors").is_file()


def test_several_formats_from_one_run(assets, tmp_path, capsys):
    from auto_quant.export import EXPORTERS

    out = tmp_path / "multi"
    rc = main_default(["--model", str(assets["model"]), *TINY, "--dataset", str(assets["calib"]), "--disable_eval",
                       "--format", "auto_round,auto_gptq", "--output_dir", str(out)])
    if "auto_gptq" not in EXPORTERS:
        assert rc == 1
        assert "auto_gptq" in _one_error_line(capsys.readouterr().err)
        assert not out.exists()  # refused before any tuning
        return
    assert rc == 0
    from transformers import AutoModelForCausalLM

    for fmt in ("auto_round", "auto_gptq"):
        assert (out / fmt / "config.json").is_file()
        AutoModelForCausalLM.from_pretrained(out / fmt)
    assert (out / "quantization_report.json").is_file()


def test_python_dash_m_reports_one_line(tmp_path):
    not_a_model = tmp_path / "empty-dir"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("not a model")
    p = subprocess.run([sys.executable, "-m", "auto_quant", "--eval", "--model", str(not_a_model), "--tasks",
                        "ppl:stdlib"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 1
    line = _one_error_line(p.stderr)
    assert "config.json" in line


def _bad_recipe(tmp_path: Path) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text("name: bad\nkind: tuning\nsettings:\n  iters: 10\n  learning_rate: 0.1\n")
    return p


@pytest.mark.parametrize(
    "case, expect, code",
    [
        ("recipe_unknown_key", "unknown key 'learning_rate'", 1),
        ("unknown_flag", "did you mean --bits", 2),
        ("conflicting_sym", "not allowed with argument", 2),
        ("bad_bits", "bits=9 is not supported", 1),
        ("bad_format", "'no_such_format' is not available", 1),
        ("output_not_empty", "exists and is not empty", 1),
        ("eval_with_tuning_flag", "--bits only applies when quantizing", 2),
        ("recipe_conflict", "conflicts with --recipe light", 1),
        ("missing_task_file", "does not exist", 1),
    ],
)
def test_errors_are_one_line(case, expect, code, assets, tmp_path, capsys):
    model = str(assets["model"])
    out = str(tmp_path / "out")
    main = main_default
    argv = {
        "recipe_unknown_key": ["--model", model, "--recipe", str(_bad_recipe(tmp_path)), "--output_dir", out],
        "unknown_flag": ["--model", model, "--bitz", "4"],
        "conflicting_sym": ["--model", model, "--asym", "--sym"],
        "bad_bits": ["--model", model, "--bits", "9", "--output_dir", out],
        "bad_format": ["--model", model, "--format", "auto_round,no_such_format", "--output_dir", out],
        "output_not_empty": ["--model", model, "--output_dir", str(assets["root"])],
        "eval_with_tuning_flag": ["--eval", "--model", model, "--bits", "4"],
        "recipe_conflict": ["--model", model, "--recipe", "light", "--output_dir", out],
        "missing_task_file": ["--model", model, "--tasks", str(tmp_path / "nope.yaml"), "--output_dir", out],
    }[case]
    if case == "recipe_conflict":
        main = main_best
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == code
    prog = "auto-round-best" if main is main_best else "auto-round"
    assert expect in _one_error_line(err, prog)
    assert not Path(out).exists()  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_one_line(assets, tmp_path, capsys):
    rc = main_default(["--model", str(assets["model"]), "--device", "cuda", "--output_dir", str(tmp_path / "o")])
    assert rc == 1
    assert "CUDA is not available" in _one_error_line(capsys.readouterr().err)


def test_unknown_lm_eval_task_is_one_line(assets, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    rc = main_default(["--model", str(assets["model"]), "--tasks", "no_such_task_xyz", "--output_dir",
                       str(tmp_path / "o")])
    assert rc == 1
    assert "does not know the task 'no_such_task_xyz'" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_eval_on_a_directory_that_is_not_a_model(tmp_path, capsys):
    d = tmp_path / "not-a-model"
    d.mkdir()
    rc = main_default(["--eval", "--model", str(d), "--tasks", "ppl:stdlib", "--output_dir", str(tmp_path / "ev")])
    assert rc == 1
    assert "not a transformers model" in _one_error_line(capsys.readouterr().err)


def test_help_lists_groups(capsys):
    assert main_default(["--help"]) == 0
    text = capsys.readouterr().out
    for group in ("model, data and output", "quantization scheme", "tuning", "evaluation", "logging and report"):
        assert group in text
    for flag in ("--model", "--bits", "--group_size", "--asym", "--data_type", "--iters", "--nsamples", "--seqlen",
                 "--batch_size", "--gradient_accumulate_steps", "--lr", "--minmax_lr", "--dataset", "--format",
                 "--output_dir", "--device", "--low_gpu_mem_usage", "--enable_torch_compile", "--quant_lm_head",
                 "--layer_config", "--seed", "--eval", "--tasks", "--eval_bs", "--recipe", "--verbose", "--quiet"):
        assert flag in text, flag

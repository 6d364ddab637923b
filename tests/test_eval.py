"""Perplexity protocol, the --tasks grammar, the lm-eval adapter on a local task, tables and JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from auto_quant.errors import ConfigError
from auto_quant.eval import EvalSettings, evaluate, format_table, make_windows, parse_tasks, perplexity, results_document
from auto_quant.eval.perplexity import windows_for_spec
from test_cli_helpers import MC_ITEMS, write_mc_task, write_texts
from tiny_models import VOCAB, tiny_model, tiny_tokenizer


# ----------------------------------------------------------------------------------- windows
def test_make_windows_without_bos():
    ids = torch.arange(23)
    w = make_windows(ids, seqlen=5)
    assert [x.tolist() for x in w] == [list(range(i, i + 5)) for i in range(0, 20, 5)]  # tail of 3 dropped
    assert len(make_windows(ids, seqlen=5, max_windows=2)) == 2


def test_make_windows_with_bos_prefixes_every_window():
    w = make_windows(torch.arange(10, 19), seqlen=4, bos_token_id=99)
    assert [x.tolist() for x in w] == [[99, 10, 11, 12], [99, 13, 14, 15], [99, 16, 17, 18]]


def test_make_windows_rejects_short_seqlen():
    with pytest.raises(ConfigError, match="seqlen"):
        make_windows(torch.arange(10), seqlen=1)


# ------------------------------------------------------------------------------- perplexity
def test_uniform_model_has_perplexity_vocab_size():
    m = tiny_model("llama")
    with torch.no_grad():
        m.lm_head.weight.zero_()  # tied: the embeddings are zero too, the logits are all 0 -> uniform
    res = perplexity(m, make_windows(torch.randint(0, VOCAB, (100,)), seqlen=16), batch_size=3, progress=False)
    assert res.ppl == pytest.approx(VOCAB, rel=1e-5)
    assert res.windows == 6 and res.tokens == 6 * 15


def test_perplexity_matches_the_models_own_loss():
    m = tiny_model("qwen2")
    g = torch.Generator().manual_seed(0)
    windows = make_windows(torch.randint(0, VOCAB, (4 * 24,), generator=g), seqlen=24)
    with torch.no_grad():
        losses = [float(m(input_ids=w[None], labels=w[None]).loss) for w in windows]
    res = perplexity(m, windows, batch_size=2, progress=False)
    assert res.ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)  # equal windows: token mean


def test_masked_positions_are_not_scored():
    m = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (12,))
    full = perplexity(m, [{"input_ids": ids[:8]}], progress=False)
    mask = torch.tensor([1] * 8 + [0] * 4)
    padded = perplexity(m, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    assert padded.tokens == full.tokens == 7
    assert padded.ppl == pytest.approx(full.ppl, rel=1e-5)


def test_windows_for_spec_reads_a_calibration_spec(tmp_path):
    tok = tiny_tokenizer()
    path = write_texts(tmp_path / "eval.txt", seed=3)
    samples, desc = windows_for_spec(tok, str(path), seqlen=16, nsamples=5, seed=1234)
    assert len(samples) == 5 and all(s["input_ids"].shape == (16,) for s in samples)
    assert str(path) in desc
    with pytest.raises(ConfigError, match="tokenizer"):
        windows_for_spec(None, str(path), seqlen=16, nsamples=5)


# ------------------------------------------------------------------------------------ tasks
def test_parse_tasks_grammar(tmp_path):
    task = write_mc_task(tmp_path)
    got = parse_tasks(f"ppl:stdlib, {task},hellaswag,ppl:\"a.txt,b.txt\",ppl:sotu:num=8,concat=True")
    assert [(t.kind, t.value) for t in got] == [
        ("ppl", "stdlib"), ("yaml", str(task)), ("lm_eval", "hellaswag"), ("ppl", "a.txt,b.txt"),
        ("ppl", "sotu:num=8,concat=True"),
    ]
    assert got[1].label == "tiny_mc"


@pytest.mark.parametrize("text, match", [
    ("", "empty"), ("ppl:", "names no data"), ("x.yaml", "does not exist"), ("ppl:a,ppl:a", "more than once"),
    ("ppl:\"a", "unclosed"),
])
def test_parse_tasks_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_tasks(text)


def test_eval_settings_validate():
    with pytest.raises(ConfigError, match="batch_size"):
        EvalSettings(batch_size=0)
    with pytest.raises(ConfigError, match="limit"):
        EvalSettings(limit=-1)


# ---------------------------------------------------------------------------------- lm-eval
def _choice_logprob(model, tok, question: str, choice: str) -> float:
    ctx = tok(question, add_special_tokens=False)["input_ids"]
    full = tok(question + " " + choice, add_special_tokens=False)["input_ids"]
    cont = full[len(ctx):]
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0].float(), -1)
    return sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont))


def test_lm_eval_local_task_scores_the_given_model(tmp_path):
    pytest.importorskip("lm_eval")
    model, tok = tiny_model("llama", seed=3), tiny_tokenizer()
    tasks = parse_tasks(str(write_mc_task(tmp_path)))
    res = evaluate(model, tok, tasks, EvalSettings(batch_size=2, progress=False))
    # lm-eval's accuracy equals the argmax of the choice log-likelihoods computed by hand on the same model
    expect = sum(
        int(max(range(len(it["choices"])), key=lambda c: _choice_logprob(model, tok, it["question"], it["choices"][c]))
            == it["answer"])
        for it in MC_ITEMS
    ) / len(MC_ITEMS)
    assert res["tiny_mc"]["metrics"]["acc"] == pytest.approx(expect)


# ---------------------------------------------------------------------------- table + JSON
def test_table_and_json(tmp_path):
    base = {"ppl:x": {"metrics": {"ppl": 10.0}}, "mc": {"metrics": {"acc": 0.5}}}
    quant = {"ppl:x": {"metrics": {"ppl": 12.5}}, "mc": {"metrics": {"acc": 0.75}}}
    table = format_table(quant, base)
    lines = table.splitlines()
    assert lines[0].split() == ["task", "metric", "float", "quantized", "delta"]
    assert "+2.5000 (worse)" in table and "+0.2500 (better)" in table
    assert len(format_table(quant).splitlines()[0].split()) == 3
    doc = results_document("m", parse_tasks("ppl:x"), EvalSettings(), {"quantized": quant, "baseline": base})
    assert doc["delta"] == {"ppl:x": {"ppl": 2.5}, "mc": {"acc": 0.25}}
    json.dumps(doc)  # JSON-ready


def test_lm_eval_tasks_without_lm_eval_fail_early(monkeypatch, tmp_path):
    from auto_quant.eval import lm_eval_adapter

    monkeypatch.setattr(lm_eval_adapter, "lm_eval_available", lambda: False)
    for text in ("hellaswag", str(write_mc_task(tmp_path))):
        with pytest.raises(ConfigError, match=r"auto_quant\[eval\]"):
            lm_eval_adapter.check_tasks(parse_tasks(text))
    lm_eval_adapter.check_tasks(parse_tasks("ppl:stdlib"))  # the built-in task needs no lm-eval

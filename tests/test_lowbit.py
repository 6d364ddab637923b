"""The load-time low-bit API on tiny random models of real architectures (transformers loads them)."""

import json
import struct

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    TextStreamer,
)

from auto_quant.errors import CheckpointError, ConfigError
from auto_quant.inference.qlinear import QuantLinear
from auto_quant.transformers import (
    QTYPES,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    CPUEmbedding,
    LowBitEmbedding,
    LowBitLinear,
    WeightOnlyQuantConfig,
    load_imatrix,
    write_imatrix_dat,
)
from auto_quant.transformers.convert import LowBitSettings, PendingLayer
from auto_quant.transformers.modules import LayerTarget
from auto_quant.transformers.qtypes import resolve_qtype

VOCAB = 128


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster than two on a shared 2-core runner."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama_config(**kw):
    # hidden 256 lets k-quants apply; intermediate 320 makes down_proj fall back like llama.cpp does
    base = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    return path, ids, ref


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def rel(a, b):
    return (((a - b) ** 2).sum() / (b**2).sum()).item()


def test_every_qtype_quantizes_while_loading_with_sane_ordering(tiny):
    path, ids, ref = tiny
    err = {}
    for name, qt in QTYPES.items():
        m = AutoModelForCausalLM.from_pretrained(path, load_in_low_bit=name)
        assert m.hf_quantizer.plan is not None
        kinds = {type(mod) for mod in m.modules()}
        assert not any(isinstance(mod, (nn.Linear, PendingLayer)) for mod in m.modules()), name
        planned = {t.qtype.kind for t in m.hf_quantizer.plan.linears.values()}
        assert (QuantLinear in kinds) == ("int" in planned)  # integer layers are QuantLinear (backend registry)
        if qt.kind == "ggml":  # down_proj rows (320) are not a multiple of 256: llama.cpp's fallback type
            assert m.hf_quantizer.plan.linears["model.layers.0.mlp.down_proj"].qtype.kind != "ggml"
        err[name] = rel(logits(m, ids), ref)
        assert err[name] < (1.0 if qt.bits == 2 else 0.5), (name, err[name])
    assert err["fp16"] < err["sym_int8"] < err["sym_int5"] < err["sym_int4"]
    assert err["asym_int5"] < err["asym_int4"]
    assert err["fp8_e4m3"] < err["fp6"] < err["fp4"] and err["nf4"] < err["nf3"]
    assert err["q6_k"] < err["q5_k"] < err["q4_k"] < err["q2_k"]
    assert err["q4_k"] < err["iq2_xs"] < err["iq2_xxs"]
    assert err["sym_int8"] < err["nf4"] and err["fp6"] < err["nf3"]


def test_layers_are_encoded_as_their_weights_arrive(tiny):
    path, _, _ = tiny
    m = AutoModelForCausalLM.from_pretrained(path, load_in_low_bit="nf4", embedding_qtype="sym_int8")
    assert len(m.hf_quantizer.plan.linears) == 15
    assert m.hf_quantizer.late_layers == []  # every layer was encoded when transformers assigned its weight


def test_pending_layer_encodes_on_assignment():
    with torch.device("meta"):
        lin = nn.Linear(64, 8)
    target = LayerTarget(resolve_qtype("nf4"), 64)
    p = PendingLayer("x", lin, target, "linear", None, torch.float32)
    w = torch.randn(8, 64)
    p.weight = nn.Parameter(w)
    assert p.weight.device.type == "meta"  # the float copy is not kept
    p.bias = nn.Parameter(torch.ones(8))
    done = p.finish()
    assert isinstance(done, LowBitLinear) and torch.equal(done.bias, torch.ones(8))
    assert rel(done.dequantize_weight(), w) < 0.02


@pytest.mark.parametrize("kw", [
    dict(load_in_4bit=True),
    dict(load_in_low_bit="gguf_q4k_m", embedding_qtype="q4_k"),
    dict(load_in_low_bit="nf3", mixed_precision=True, cpu_embedding=True),
    dict(load_in_low_bit="bf16", modules_to_not_convert=["lm_head"]),
])
def test_save_low_bit_then_load_low_bit_gives_identical_logits(tiny, tmp_path, kw):
    path, ids, _ = tiny
    m = AutoModelForCausalLM.from_pretrained(path, **kw)
    out = logits(m, ids)
    m.save_low_bit(tmp_path / "lb")
    manifest = json.loads((tmp_path / "lb" / "lowbit_config.json").read_text())
    assert manifest["format"] == "auto_quant.lowbit/1" and manifest["modules"]
    m2 = AutoModelForCausalLM.load_low_bit(tmp_path / "lb")
    assert [type(x).__name__ for x in m2.modules()] == [type(x).__name__ for x in m.modules()]
    assert torch.equal(logits(m2, ids), out)


def test_mixed_precision_embedding_and_cpu_embedding(tiny):
    path, ids, ref = tiny
    m = AutoModelForCausalLM.from_pretrained(path, load_in_low_bit="sym_int4", mixed_precision=True,
                                             embedding_qtype="sym_int8")
    assert isinstance(m.lm_head, QuantLinear) and m.lm_head.bits == 8
    assert m.model.layers[0].mlp.up_proj.bits == 4
    assert isinstance(m.model.embed_tokens, LowBitEmbedding) and m.model.embed_tokens.qtype == "sym_int8"
    assert m.config.tie_word_embeddings is False  # the head has its own quantized weight now
    assert rel(logits(m, ids), ref) < 0.1
    c = AutoModelForCausalLM.from_pretrained(path, load_in_low_bit="sym_int4", cpu_embedding=True)
    assert isinstance(c.model.embed_tokens, CPUEmbedding)
    c.to("meta")  # a device move leaves the embedding on the CPU
    assert c.model.embed_tokens.weight.device.type == "cpu"
    assert c.model.layers[0].mlp.up_proj.qweight.device.type == "meta"


def test_modules_to_not_convert_and_woq_config(tiny):
    path, ids, ref = tiny
    m = AutoModelForCausalLM.from_pretrained(path, load_in_low_bit="asym_int4",
                                             modules_to_not_convert=["lm_head", "mlp.down_proj"])
    assert type(m.lm_head) is nn.Linear and type(m.model.layers[1].mlp.down_proj) is nn.Linear
    assert isinstance(m.model.layers[1].mlp.up_proj, QuantLinear)
    w = AutoModelForCausalLM.from_pretrained(path, quantization_config=WeightOnlyQuantConfig(
        weight_dtype="nf4", group_size=32, compute_dtype="bf16", scale_dtype="fp32", alg="RTN", mse_range=True))
    up = w.model.layers[0].mlp.up_proj
    assert isinstance(up, LowBitLinear) and up.qtype == "nf4" and up.group_size == 32
    assert up.scales.dtype == torch.float32 and w.dtype == torch.bfloat16
    assert rel(logits(w, ids), ref) < 0.2


def test_generate_with_text_streamer(tiny, capsys):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    path, _, _ = tiny
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tk = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", pad_token="w0", eos_token="w1")
    m = AutoModelForCausalLM.from_pretrained(path, load_in_low_bit="q4_k")
    prompt = tok("w5 w9 w17", return_tensors="pt")
    out = m.generate(**prompt, max_new_tokens=6, do_sample=False, streamer=TextStreamer(tok, skip_prompt=True),
                     pad_token_id=0, eos_token_id=None)
    streamed = capsys.readouterr().out.strip()
    assert out.shape[1] == prompt["input_ids"].shape[1] + 6
    assert streamed == tok.decode(out[0, prompt["input_ids"].shape[1]:]).strip() and streamed


def test_other_auto_classes_and_conv1d(tmp_path):
    torch.manual_seed(1)
    cls_dir = tmp_path / "cls"
    LlamaForSequenceClassification(tiny_llama_config(num_labels=3, pad_token_id=0)).save_pretrained(cls_dir)
    m = AutoModelForSequenceClassification.from_pretrained(cls_dir, load_in_low_bit="sym_int8")
    assert isinstance(m.score, QuantLinear) and m(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3)
    bert_dir = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=96, max_position_embeddings=32)).eval().save_pretrained(bert_dir)
    ref = BertForMaskedLM.from_pretrained(bert_dir).eval()
    b = AutoModelForMaskedLM.from_pretrained(bert_dir, load_in_low_bit="sym_int8")
    ids = torch.randint(0, VOCAB, (1, 10))
    assert isinstance(b.bert.encoder.layer[0].attention.self.query, QuantLinear)
    assert rel(logits(b, ids), logits(ref, ids)) < 0.01
    gpt_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=2, n_positions=32)).eval().save_pretrained(gpt_dir)
    ref = GPT2LMHeadModel.from_pretrained(gpt_dir).eval()
    g = AutoModelForCausalLM.from_pretrained(gpt_dir, load_in_low_bit="fp8_e4m3")
    assert isinstance(g.transformer.h[0].mlp.c_fc, LowBitLinear)  # Conv1D weights ([in, out]) are transposed
    assert rel(logits(g, ids), logits(ref, ids)) < 0.01


def test_imatrix_files_steer_rounding(tiny, tmp_path):
    gguf = pytest.importorskip("gguf")
    path, ids, ref = tiny
    torch.manual_seed(2)
    table = {f"blk.{i}.{r}.weight": torch.rand(256) ** 4 * 100 for i in range(2) for r in ("attn_q", "ffn_up")}
    table["model.layers.0.mlp.down_proj"] = torch.rand(320)  # HF names are accepted too
    write_imatrix_dat(tmp_path / "imatrix.dat", table, ncall=7, dataset="test")
    loaded = load_imatrix(tmp_path / "imatrix.dat")
    assert set(loaded) == set(table) and all(torch.allclose(loaded[k], table[k], rtol=1e-5) for k in table)
    # the GGUF imatrix format (llama.cpp >= b5900) is read too
    w = gguf.GGUFWriter(str(tmp_path / "imatrix.gguf"), arch="imatrix")
    w.add_type("imatrix")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", (table["blk.0.attn_q.weight"] * 5).numpy())
    w.add_tensor("blk.0.attn_q.weight.counts", torch.tensor([5.0]).numpy())
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    g = load_imatrix(tmp_path / "imatrix.gguf")
    assert torch.allclose(g["blk.0.attn_q.weight"], table["blk.0.attn_q.weight"], rtol=1e-5)

    float_model = LlamaForCausalLM.from_pretrained(path).eval()
    wq = float_model.model.layers[1].self_attn.q_proj.weight.detach()
    imp = table["blk.1.attn_q.weight"]
    plain = AutoModelForCausalLM.from_pretrained(path, load_in_low_bit="sym_int4")
    steered = AutoModelForCausalLM.from_pretrained(path, load_in_low_bit="sym_int4", imatrix=tmp_path / "imatrix.dat")

    def werr(m):
        d = m.model.layers[1].self_attn.q_proj.dequantize_weight() - wq
        return ((d**2) * imp).sum().item()

    assert werr(steered) < werr(plain)
    with pytest.raises(ConfigError, match="names no layer"):
        AutoModelForCausalLM.from_pretrained(path, load_in_low_bit="sym_int4", imatrix={"foo.weight": torch.ones(4)})


def test_prequantized_gptq_checkpoint_keeps_its_codes(tiny, tmp_path):
    from safetensors.torch import save_file

    from auto_quant.export import packing
    from auto_quant.quant import QuantSpec, quantize_weight

    path, ids, ref = tiny
    m = LlamaForCausalLM.from_pretrained(path).eval()
    sd = dict(m.state_dict())
    sd.pop("lm_head.weight", None)
    stored = {}
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith("model.layers"):
            qw = quantize_weight(mod.weight.detach(), QuantSpec(4, 32, False))
            t = packing.pack_gptq(qw.codes, qw.zero.clamp(min=1), qw.scale, 4, -1, torch.float16)  # GPTQ v1: zero-1
            del sd[name + ".weight"]
            sd.update({f"{name}.{k}": v for k, v in t.items()})
            sd[f"{name}.g_idx"] = torch.arange(mod.in_features, dtype=torch.int32) // 32
            stored[name] = t["qweight"]
    out = tmp_path / "gptq"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = m.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False,
                                  "desc_act": False, "checkpoint_format": "gptq"}
    (out / "config.json").write_text(json.dumps(cfg))
    q = AutoModelForCausalLM.from_pretrained(out, load_in_4bit=True)
    layer = q.model.layers[1].mlp.down_proj
    assert torch.equal(layer.qweight.cpu(), stored["model.layers.1.mlp.down_proj"])  # the stored codes, untouched
    assert rel(logits(q, ids), ref) < 0.1
    with pytest.raises(ConfigError, match="already 4-bit gptq"):
        AutoModelForCausalLM.from_pretrained(out, load_in_low_bit="sym_int8")


def test_bad_input_errors(tiny, tmp_path):
    path, _, _ = tiny
    with pytest.raises(ConfigError, match="unknown low-bit type 'int3'.*sym_int4"):
        AutoModelForCausalLM.from_pretrained(path, load_in_low_bit="int3")
    with pytest.raises(ConfigError, match="gguf_iq1_s.*not supported.*llama-quantize.*Supported: .*gguf_iq2_xxs"):
        AutoModelForCausalLM.from_pretrained(path, load_in_low_bit="gguf_iq1_s")
    with pytest.raises(ConfigError, match="load_in_4bit=True conflicts with load_in_low_bit='sym_int8'"):
        AutoModelForCausalLM.from_pretrained(path, load_in_4bit=True, load_in_low_bit="sym_int8")
    with pytest.raises(ConfigError, match="modules_to_not_convert entry 'lm_haed' names no module"):
        AutoModelForCausalLM.from_pretrained(path, load_in_low_bit="nf4", modules_to_not_convert=["lm_haed"])
    with pytest.raises(ConfigError, match="conflicts with quantization_config"):
        AutoModelForCausalLM.from_pretrained(path, load_in_low_bit="nf3",
                                             quantization_config=WeightOnlyQuantConfig(weight_dtype="nf4"))
    with pytest.raises(ConfigError, match="int4_clip.*Supported"):
        WeightOnlyQuantConfig(weight_dtype="int4_clip")
    with pytest.raises(ConfigError, match="scheme='asym'.*Supported"):
        WeightOnlyQuantConfig(weight_dtype="nf4", scheme="asym")
    with pytest.raises(ConfigError, match="RTN only.*AutoRound"):
        WeightOnlyQuantConfig(weight_dtype="int4", algorithm="GPTQ")
    with pytest.raises(ConfigError, match="compute_dtype='int8'"):
        WeightOnlyQuantConfig(compute_dtype="int8")
    with pytest.raises(ConfigError, match="model_hub='hf-mirror'"):
        AutoModelForCausalLM.from_pretrained(path, load_in_4bit=True, model_hub="hf-mirror")
    # load_low_bit on directories written by other tools
    with pytest.raises(CheckpointError, match="not a save_low_bit directory.*from_pretrained"):
        AutoModelForCausalLM.load_low_bit(path)
    ipex = tmp_path / "ipex"
    ipex.mkdir()
    (ipex / "config.json").write_text(json.dumps({"model_type": "llama", "bigdl_transformers_low_bit": "sym_int4"}))
    with pytest.raises(CheckpointError, match="IPEX-LLM"):
        AutoModelForCausalLM.load_low_bit(ipex)
    other = tmp_path / "newer"
    other.mkdir()
    (other / "lowbit_config.json").write_text(json.dumps({"format": "auto_quant.lowbit/99"}))
    with pytest.raises(CheckpointError, match="auto_quant.lowbit/99"):
        AutoModelForCausalLM.load_low_bit(other)
    with pytest.raises(ConfigError, match="imatrix file .* does not exist"):
        AutoModelForCausalLM.from_pretrained(path, load_in_4bit=True, imatrix=tmp_path / "missing.dat")
    bad = tmp_path / "bad.dat"
    bad.write_bytes(struct.pack("<i", -3))
    with pytest.raises(ConfigError, match="not a llama.cpp imatrix"):
        load_imatrix(bad)


def test_settings_are_frozen_and_described():
    s = LowBitSettings(qtype=resolve_qtype("nf4"))
    with pytest.raises(Exception):
        s.qtype = resolve_qtype("fp4")
    assert s.to_dict()["qtype"] == "nf4"
    assert resolve_qtype("FP8").name == "fp8_e4m3"


@pytest.mark.gpu
def test_quantize_on_load_onto_cuda(tiny, tmp_path):
    path, ids, ref = tiny
    for q in ("sym_int4", "nf4", "q4_k", "fp8_e4m3"):
        m = AutoModelForCausalLM.from_pretrained(path, load_in_low_bit=q, device_map="cuda", cpu_embedding=True)
        assert m.model.layers[0].mlp.up_proj.qweight.device.type == "cuda"
        assert m.model.embed_tokens.weight.device.type == "cpu"
        with torch.no_grad():
            out = m(ids.cuda()).logits.float().cpu()
        assert rel(out, ref) < 0.5, q
    m.save_low_bit(tmp_path / "g")
    m2 = AutoModelForCausalLM.load_low_bit(tmp_path / "g").to("cuda")
    assert m2.model.embed_tokens.weight.device.type == "cpu"
    with torch.no_grad():
        assert torch.equal(m2(ids.cuda()).logits.float().cpu(), out)


def test_a_codebook_layer_compiles_without_tracing_through_a_cache():
    """Dynamo traces through functools caches and warns that this may be silently wrong: a compiled codebook
    layer takes its grid as a constant of the graph instead, and matches eager."""
    import warnings

    from auto_quant.transformers.modules import LowBitLinear

    layer = LowBitLinear(64, 32, "nf4", bias=False, group_size=32)
    layer._fill(torch.randn(32, 64), None, False)
    x = torch.randn(3, 64)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = torch.compile(layer, backend="eager")(x)
    assert torch.equal(out, layer(x))
    assert not [w for w in caught if "lru_cache" in str(w.message)]


@pytest.mark.parametrize("qtype", ["nf4", "q4_k", "fp8_e4m3"])
def test_a_large_low_bit_layer_runs_in_row_slices_like_the_whole_weight(qtype, monkeypatch):
    """Above the chunk size a low-bit layer dequantizes and multiplies slices of its output rows (bounded memory),
    a ragged last slice included, and gives what the whole dequantized weight gives."""
    from auto_quant.inference import qlinear
    from auto_quant.transformers.modules import LowBitLinear

    layer = LowBitLinear(256, 100, qtype, bias=True, group_size=64)
    layer._fill(torch.randn(100, 256), None, False)
    layer.bias.copy_(torch.randn(100))
    x = torch.randn(2, 3, 256, dtype=torch.float64)
    want = torch.nn.functional.linear(x, layer.dequantize_weight(torch.float64), layer.bias.double())
    monkeypatch.setattr(qlinear, "REFERENCE_CHUNK_WEIGHTS", 32 * 256)  # 32-row slices, the last one 4 rows
    sliced = []
    decode = layer.decode_rows
    monkeypatch.setattr(layer, "decode_rows", lambda rows, dtype: sliced.append(len(rows)) or decode(rows, dtype))
    got = layer(x)
    assert sliced == [32, 32, 32, 4]
    assert got.shape == (2, 3, 100) and torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["sym_int4", "nf4", "q4_k"])
def test_generate_with_a_static_cache_compiles_a_low_bit_model(tiny, qtype):
    """The low-bit quantizer lets transformers compile a static-cache decode: integer layers (the ``triton``
    backend's op), codebook and k-quant layers (torch dequantization) generate what eager decoding does."""
    path, ids, _ = tiny
    torch._dynamo.reset()
    m = AutoModelForCausalLM.from_pretrained(path, load_in_low_bit=qtype, device_map="cuda", dtype=torch.float16)
    assert m.hf_quantizer.is_compileable
    ids = ids[:1].cuda()
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        eager = m.generate(ids, **kw)
        static = m.generate(ids, cache_implementation="static", **kw)
    assert getattr(m, "_compiled_call", None) is not None  # generate compiled the forward
    same = (static.sequences == eager.sequences).all(0).tolist()[ids.shape[1]:]
    steps = same.index(False) + 1 if False in same else len(same)  # up to a near-tie's first different token
    assert steps >= 2
    assert rel(torch.stack(static.logits[:steps]).float(), torch.stack(eager.logits[:steps]).float()) < 1e-3

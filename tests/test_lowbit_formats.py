"""Pure low-bit formats: codebooks (nf/fp), k-quant blocks, round trips and error ordering."""

import numpy as np
import pytest
import torch

from auto_quant.export import packing
from auto_quant.quant.lowbit_formats import (
    CODEBOOKS,
    dequantize_codebook,
    get_codebook,
    nearest_codes,
    quantize_codebook,
)
from auto_quant.transformers import ggml_quants
from auto_quant.transformers.modules import LayerTarget, LowBitEmbedding, build_linear
from auto_quant.transformers.qtypes import QTYPES, mix_layer_type, resolve_qtype

# QLoRA's published NF4 table (bitsandbytes)
NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster than two on a shared 2-core runner."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_err(a, b, imp=None):
    d = (a - b) ** 2
    if imp is not None:
        d = d * imp
        return (d.sum() / ((b**2) * imp).sum()).item()
    return (d.sum() / (b**2).sum()).item()


def test_nf4_matches_published_table():
    assert np.allclose(get_codebook("nf4").values, NF4_PUBLISHED, atol=1e-6)
    nf3 = get_codebook("nf3").values
    assert len(nf3) == 8 and nf3[0] == -1.0 and nf3[-1] == 1.0 and 0.0 in nf3


@pytest.mark.parametrize("name,size,vmax", [("fp4_e2m1", 15, 6.0), ("fp6_e3m2", 63, 28.0),
                                             ("fp8_e4m3", 253, 448.0), ("fp8_e5m2", 247, 57344.0)])
def test_float_grids(name, size, vmax):
    vals = get_codebook(name).values
    assert len(vals) == size and max(vals) == vmax and min(vals) == -vmax
    assert list(vals) == sorted(vals) and len(set(vals)) == len(vals)
    if name.startswith("fp8"):
        dt = torch.float8_e4m3fn if name == "fp8_e4m3" else torch.float8_e5m2
        t = torch.tensor(vals)
        assert torch.equal(t.to(dt).to(torch.float32), t)  # every entry is exactly representable


def test_nearest_codes_is_nearest():
    torch.manual_seed(0)
    for name in ("nf3", "fp6_e3m2", "fp8_e5m2"):
        vals = get_codebook(name).tensor()
        x = torch.randn(2000) * vals.abs().max() / 2
        idx = nearest_codes(x, vals)
        brute = (x[:, None] - vals[None]).abs().min(-1).values
        assert torch.allclose((x - vals[idx]).abs(), brute)


@pytest.mark.parametrize("name", sorted(CODEBOOKS))
def test_codebook_round_trip_exact_on_grid(name):
    torch.manual_seed(1)
    book = get_codebook(name)
    vals = book.tensor()
    codes = torch.randint(0, len(vals), (6, 96))
    top = book.values.index(book.anchor)
    codes[codes == (len(vals) - 1 - top)] = top  # the anchor stays the strict absmax of every group
    codes[:, [0, 32, 64]] = top
    scale = torch.rand(6, 3) + 0.5
    w = dequantize_codebook(codes, scale.to(torch.float16), name, 32)
    cw = quantize_codebook(w, name, 32, scale_dtype=torch.float16)
    assert torch.equal(cw.dequantize(), w)
    # packing the codes through the shared bit stream is lossless
    bits = get_codebook(name).bits
    assert torch.equal(packing.unpack_bitstream(packing.pack_bitstream(cw.codes, bits, dim=1), bits, 96, dim=1),
                       cw.codes.to(torch.int32))


def test_codebook_error_ordering_and_padding():
    torch.manual_seed(2)
    w = torch.randn(64, 200)  # 200 is not a multiple of the group size: the last group is padded
    err = {n: rel_err(quantize_codebook(w, n, 32).dequantize(), w) for n in CODEBOOKS}
    assert err["fp8_e4m3"] < err["fp6_e3m2"] < err["fp4_e2m1"] < err["nf3"]
    assert err["nf4"] < err["nf3"] and err["nf4"] < err["fp4_e2m1"]
    assert err["fp8_e4m3"] < err["fp8_e5m2"]  # more mantissa wins on Gaussian weights
    assert quantize_codebook(w, "nf4", 32).codes.shape == (64, 200)


def test_importance_weighted_scale_search_helps():
    torch.manual_seed(3)
    w = torch.randn(32, 128)
    imp = torch.rand(128) ** 4 * 10
    plain = quantize_codebook(w, "nf3", 64).dequantize()
    weighted = quantize_codebook(w, "nf3", 64, importance=imp).dequantize()
    assert rel_err(weighted, w, imp) < rel_err(plain, w, imp)


@pytest.mark.parametrize("t,gt", [("q2_k", "Q2_K"), ("q4_k", "Q4_K"), ("q5_k", "Q5_K"), ("q6_k", "Q6_K"),
                                  ("iq2_xxs", "IQ2_XXS"), ("iq2_xs", "IQ2_XS")])
def test_kquants_read_by_gguf_reference(t, gt):
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    torch.manual_seed(4)
    w = torch.randn(4, 512) * torch.rand(4, 1)
    w[0, :256] = 0  # an all-zero super-block stays finite
    b = ggml_quants.quantize_rows(w, t)
    assert b.shape == (4, 2 * ggml_quants.GGML_TYPES[t].block_bytes) and b.dtype == torch.uint8
    ours = ggml_quants.dequantize_rows(b, t, 512)
    ref = dequantize(b.numpy(), getattr(gguf.GGMLQuantizationType, gt)).reshape(4, 512)
    assert torch.equal(ours, torch.from_numpy(ref.astype(np.float32)))
    assert torch.all(ours[0, :256] == 0)


def test_kquant_error_ordering_and_imatrix():
    torch.manual_seed(5)
    w = torch.randn(16, 512)
    err = {t: rel_err(ggml_quants.dequantize_rows(ggml_quants.quantize_rows(w, t), t, 512), w)
           for t in ("q2_k", "q4_k", "q5_k", "q6_k", "iq2_xxs", "iq2_xs")}
    assert err["q6_k"] < err["q5_k"] < err["q4_k"] < 0.01
    assert err["q4_k"] < err["q2_k"] < 0.15 and err["q4_k"] < err["iq2_xs"] < err["iq2_xxs"] < 0.15
    imp = torch.rand(512) ** 4 * 10
    for t in ("q4_k", "iq2_xxs"):
        plain = ggml_quants.dequantize_rows(ggml_quants.quantize_rows(w, t), t, 512)
        weighted = ggml_quants.dequantize_rows(ggml_quants.quantize_rows(w, t, imp), t, 512)
        assert rel_err(weighted, w, imp) < rel_err(plain, w, imp), t


def test_kquant_rejects_short_rows():
    with pytest.raises(ValueError, match="multiple of 256"):
        ggml_quants.quantize_rows(torch.randn(2, 300), "q4_k")


@pytest.mark.parametrize("qtype", [q for q in QTYPES if QTYPES[q].kind != "mix"])
def test_lowbit_linear_and_embedding_rows(qtype):
    torch.manual_seed(6)
    w = torch.randn(24, 256)
    b = torch.randn(24)
    qt = resolve_qtype(qtype)
    target = LayerTarget(qt, qt.group_size)
    lin = build_linear(w, b, target)
    x = torch.randn(3, 256)
    deq = lin.dequantize_weight()
    assert torch.allclose(lin(x), x @ deq.t() + b, atol=1e-4)
    emb = LowBitEmbedding(24, 256, qtype if qt.kind != "int" else qtype, group_size=qt.group_size)
    emb._fill(w, None, False)
    ids = torch.tensor([[3, 0, 23], [5, 5, 1]])
    assert torch.allclose(emb(ids), emb.decode_rows()[ids])
    if qt.kind == "int":  # the row-major integer embedding decodes like the QuantLinear of the same weight
        assert torch.allclose(emb.decode_rows(), deq)


def test_gguf_mix_rules():
    n = 32
    m = [mix_layer_type("gguf_q4k_m", "ffn_down", i, n) for i in range(n)]
    assert m[:4] == ["q6_k"] * 4 and m[-4:] == ["q6_k"] * 4 and "q4_k" in m
    assert mix_layer_type("gguf_q4k_m", "attn_q", 10, n) == "q4_k"
    assert mix_layer_type("gguf_q4k_s", "attn_v", 2, n) == "q5_k"
    assert mix_layer_type("gguf_q4k_s", "attn_v", 5, n) == "q4_k"
    assert mix_layer_type("gguf_q4k_s", "output", None, n) == "q6_k"
    assert mix_layer_type("gguf_iq2_xxs", "attn_q", 9, n) == "iq2_xxs"
    assert mix_layer_type("gguf_iq2_xs", "ffn_down", 1, n) == "q2_k"
    assert mix_layer_type("gguf_iq2_xs", "attn_v", 9, n, n_gqa=4) == "q4_k"
    assert mix_layer_type("gguf_iq2_xxs", "attn_v", 9, n, n_gqa=2) == "q2_k"
    assert mix_layer_type("gguf_iq2_xxs", "output", None, n) == "q5_k"


def test_chunked_encoding_equals_whole_matrix(monkeypatch):
    from auto_quant.inference.qlinear import QuantLinear
    from auto_quant.quant import QuantSpec, quantize_weight
    from auto_quant.transformers import modules

    torch.manual_seed(7)
    w, b = torch.randn(2 * 64 + 37, 96), torch.randn(2 * 64 + 37)
    monkeypatch.setattr(modules, "ROW_CHUNK", 64)  # three chunks, the last one short
    for q in ("sym_int4", "asym_int5"):
        qt = resolve_qtype(q)
        got = build_linear(w, b, LayerTarget(qt, 32))
        ref = QuantLinear.from_quantized(quantize_weight(w, QuantSpec(qt.bits, 32, qt.sym)), b, layout="gptq_v2",
                                         bias_dtype=torch.float32)
        for k in ("qweight", "qzeros", "scales", "bias"):
            assert torch.equal(getattr(got, k), getattr(ref, k)), (q, k)
    chunked = build_linear(w, None, LayerTarget(resolve_qtype("nf4"), 64))
    monkeypatch.setattr(modules, "ROW_CHUNK", 10**6)
    whole = build_linear(w, None, LayerTarget(resolve_qtype("nf4"), 64))
    assert torch.equal(chunked.qweight, whole.qweight) and torch.equal(chunked.scales, whole.scales)

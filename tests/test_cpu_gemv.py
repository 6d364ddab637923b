"""The cpu_gemv backend: the C kernel against the torch reference (2/3/4 and 8 bits), its packing
contracts, its three vector paths, reloaded tiny Llamas, torch.compile, and what happens without a C
compiler."""

from __future__ import annotations

import logging
import platform

import pytest
import torch

from auto_quant.errors import BackendError
from auto_quant.inference import backends as B
from auto_quant.inference import cpu_gemv as G
from auto_quant.inference.qlinear import QuantLinear
from auto_quant.quant import QuantSpec, quantize_weight

pytestmark = pytest.mark.skipif(not B.c_compiler_found(), reason="cpu_gemv needs a C compiler")

# int8 activations (absmax / 127 per block of 32) put about 5e-3 relative error on the outputs of
# random layers (the rounding step is ~1 % of a block's largest value); 1e-2 leaves room and is
# still far below what a one-bit-coarser weight costs (asserted next to it, so the bound can fail)
TOL = 1e-2


def make_layer(out_f=40, in_f=576, bits=4, group_size=32, sym=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    qw = quantize_weight(w, QuantSpec(bits=bits, group_size=group_size, sym=sym))
    b = torch.randn(out_f, generator=g) if bias else None
    return QuantLinear.from_quantized(qw, b, layout="gptq_v2", bias_dtype=torch.float32)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def coarser_reference(layer, x, drop=1):
    """The reference output with every code's ``drop`` lowest bits dropped (a coarser grid, same range)."""
    codes, zero, scale = layer.unpack()
    gs = layer.in_features if layer.group_size == -1 else layer.group_size
    z = zero.repeat_interleave(gs, dim=1)[:, :layer.in_features].float()
    s = scale.float().repeat_interleave(gs, dim=1)[:, :layer.in_features]
    step = 2 ** drop
    w = ((codes >> drop) * step + (step - 1) / 2 - z) * s
    return torch.nn.functional.linear(x, w, layer.bias.float())


def q8_activations(x):
    """x with the kernel's activation rounding: int8 per block of 32, absmax / 127 (llama.cpp's Q8_0)."""
    blocks = x.reshape(*x.shape[:-1], -1, G.BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(blocks / d), 0.0).clamp(-127, 127)
    return (q * d).reshape(x.shape)


# ----------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("in_f", [576, 96])
def test_matches_reference(bits, group_size, sym, in_f):
    layer = make_layer(in_f=in_f, bits=bits, group_size=group_size, sym=sym, seed=bits)
    run = G.prepare(layer)
    for m in (1, 3, 9):
        x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(m))  # seeded: a row of 96 is noisy
        ref = layer(x)  # nothing attached: the torch reference
        y = run(x)
        assert y.shape == ref.shape and y.dtype == torch.float32
        err = rel_err(y, ref)
        assert err < TOL, (m, err)
        assert err < rel_err(coarser_reference(layer, x), ref) / 5, (m, err)


@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("in_f", [576, 96])
def test_8bit_matches_reference(group_size, sym, in_f):
    """8-bit weights are about as fine as the int8 activations, so the error (still ~5e-3) is all
    activation rounding: the bound is against a 3-bit-coarser (5-bit) grid, and the same
    activation rounding done in torch gives the kernel's output to float32 accuracy."""
    layer = make_layer(in_f=in_f, bits=8, group_size=group_size, sym=sym, seed=8)
    run = G.prepare(layer)
    assert run.weight.bits == 8
    for m in (1, 3, 9):
        x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(m))  # seeded: a row of 96 is noisy
        ref = layer(x)
        y = run(x)
        assert y.shape == ref.shape and y.dtype == torch.float32
        err = rel_err(y, ref)
        assert err < TOL, (m, err)
        assert err < rel_err(coarser_reference(layer, x, drop=3), ref) / 4, (m, err)
        assert rel_err(y, layer(q8_activations(x))) < 1e-5, m


def test_input_dtypes_shapes_and_bias():
    layer = make_layer(out_f=48, in_f=192, bits=4, group_size=64)
    run = G.prepare(layer)
    x = torch.randn(2, 5, 192)
    ref = layer(x)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        y = run(x.to(dt))
        assert y.dtype == dt and y.shape == (2, 5, 48)
        assert rel_err(y, ref) < TOL
    assert rel_err(run(x[0, 0]), ref[0, 0]) < TOL  # a 1-D input
    nobias = make_layer(out_f=48, in_f=192, bias=False)
    assert rel_err(G.prepare(nobias)(x), nobias(x)) < TOL
    strided = x.transpose(0, 1)  # not contiguous
    assert rel_err(run(strided), ref.transpose(0, 1)) < TOL


def test_many_rows_and_threads():
    layer = make_layer(out_f=160, in_f=576)
    run = G.prepare(layer)
    x = torch.randn(150, 576)  # 150 x 576 int8 activations exceed the kernel's stack scratch: heap path
    ref = layer(x)
    one = run(x)
    assert rel_err(one, ref) < TOL
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(run(x), one)  # OpenMP splits whole output tiles: identical sums
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction sets")
@pytest.mark.parametrize("march, path", [("-march=x86-64", "scalar"), ("-march=haswell", "avx2")])
def test_fallback_paths_agree(march, path):
    lib = G.load_library(march)
    assert G.vector_path(lib) == path
    for bits, group_size, sym in ((4, 32, True), (4, 128, False), (3, -1, False), (2, 64, True), (8, 32, True),
                                  (8, 128, False), (8, -1, False)):
        layer = make_layer(in_f=96, bits=bits, group_size=group_size, sym=sym)
        run = G.prepare(layer)
        for m in (1, 6):
            x = torch.randn(m, 96)
            fast = run(x)
            other = G.gemm(x, run.weight, run.bias, 1, lib)
            assert rel_err(other, fast) < 1e-5, (bits, group_size, sym, m)


@pytest.mark.parametrize("bits", [4, 8])
def test_largest_codes_and_activations_do_not_overflow(bits):
    """The AVX2 path sums a block's u8 x s8 products in int16 before widening them: with every code at its top
    and every activation at +-127 the sums sit at their bound (8 products of 2 * 15 * 127 each), and the result
    must still equal the float one, as it does on the other paths."""
    top, n, k = 2 ** bits - 1, 32, 576
    w = G.pack_weight(torch.full((n, k), top), torch.zeros(n, k // 32, dtype=torch.int32), torch.ones(n, k // 32),
                      bits, 32)
    assert w.zero == 0
    x = torch.ones(3, k)
    x[1] = -1.0
    x[2, ::2] = -1.0  # alternating signs: a sum of zero
    ref = x @ torch.full((k, n), float(top))
    assert rel_err(G.gemm(x, w, None, 1), ref) < 1e-5
    if platform.machine() in ("x86_64", "AMD64"):
        assert rel_err(G.gemm(x, w, None, 1, G.load_library("-march=haswell")), ref) < 1e-5


@pytest.mark.parametrize("march", [None, "-march=x86-64"], ids=["native", "scalar"])
def test_nan_activations_give_nan_rows_like_the_reference(march):
    """int8 activation rounding takes a block's absmax, and max drops NaN: a NaN input must still make its
    row NaN (not silently finite), an inf row non-finite, and leave the other rows alone."""
    if march is not None and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 instruction sets")
    layer = make_layer(in_f=96, bits=4)
    run = G.prepare(layer)
    lib = G.load_library(march) if march else None
    x = torch.randn(3, 96)
    x[0, 40] = float("nan")
    x[1, 7] = float("inf")
    y = run(x) if lib is None else G.gemm(x, run.weight, run.bias, 1, lib)
    ref = torch.nn.functional.linear(x, layer.dequantize_weight(torch.float32), layer.bias.float())
    assert torch.isnan(y[0]).all() and torch.isnan(ref[0]).all()
    assert not torch.isfinite(y[1]).any()
    assert torch.isfinite(y[2]).all() and rel_err(y[2], ref[2]) < TOL


def test_native_path_is_vectorised_here():
    flags = G._host_cpu_flags().split()
    if {"avx512_vnni", "avx512vl", "avx512bw"} <= set(flags):
        assert G.vector_path() == "avx512_vnni"
    elif "avx2" in flags:
        assert G.vector_path() == "avx2"


# ------------------------------------------------------------------------------------------ packing


def test_packing_contract():
    codes = torch.randint(0, 16, (20, 64))
    packed = G.pack_codes(codes)
    assert packed.shape == (2, 2, 4, 16, 4) and packed.dtype == torch.uint8  # rows padded to 2 tiles of 16
    for n, k in ((0, 0), (3, 5), (17, 20), (19, 63), (5, 47)):
        t, r, b, j = n // 16, n % 16, k // 32, k % 32
        byte = int(packed[t, b, (j % 16) // 4, r, j % 4])
        assert (byte >> 4 if j >= 16 else byte & 15) == int(codes[n, k])
    assert int(packed[1, :, :, 4:].max()) == 0  # padding rows
    scale = torch.rand(20, 2)
    per_block = G.block_values(scale, 64, 32)
    assert torch.equal(G.tile_blocks(per_block)[1, :, 3], scale[19])


def test_8bit_packing_contract():
    codes = torch.randint(0, 256, (20, 64))
    packed = G.pack_code_bytes(codes)
    assert packed.shape == (2, 2, 8, 16, 4) and packed.dtype == torch.uint8
    for n, k in ((0, 0), (3, 5), (17, 20), (19, 63), (5, 47)):
        t, r, b, j = n // 16, n % 16, k // 32, k % 32
        assert int(packed[t, b, j // 4, r, j % 4]) == int(codes[n, k])
    assert int(packed[1, :, :, 4:].max()) == 0  # padding rows
    w = G.pack_weight(codes, torch.full((20, 1), 128), torch.rand(20, 1), bits=8, group_size=-1)
    assert w.bits == 8 and w.zero == 128 and w.zeros is None
    assert torch.equal(w.codes, packed) and w.scales.shape == (2, 2, 16)
    assert w.data.numel() == 2 * 2 * (512 + 32)  # codes, fp16 scales, no zeros


def test_zero_points_fold_or_stay_per_block():
    sym = G.pack_weight(*make_layer(bits=4, sym=True).unpack(), bits=4, group_size=32)
    assert sym.zeros is None and sym.zero == 8
    asym3 = G.pack_weight(*make_layer(bits=3, sym=False).unpack(), bits=3, group_size=32)
    assert asym3.zeros is None and asym3.zero == 8  # code - zero + 8 fits in 4 bits: folded
    asym4 = G.pack_weight(*make_layer(bits=4, sym=False).unpack(), bits=4, group_size=32)
    assert asym4.zero == -1 and asym4.zeros.shape == (3, 18, 16) and int(asym4.zeros.max()) <= 15
    assert sym.bits == asym3.bits == asym4.bits == 4
    sym8 = G.pack_weight(*make_layer(bits=8, sym=True).unpack(), bits=8, group_size=32)
    assert sym8.bits == 8 and sym8.zeros is None and sym8.zero == 128
    asym8 = G.pack_weight(*make_layer(bits=8, sym=False).unpack(), bits=8, group_size=32)
    assert asym8.bits == 8 and asym8.zero == -1 and asym8.zeros.shape == (3, 18, 16)
    with pytest.raises(ValueError, match=r"packs 4-bit codes in \[0, 15\]"):
        G.pack_weight(torch.full((16, 32), 16), torch.zeros(16, 1), torch.ones(16, 1), 4, -1)
    with pytest.raises(ValueError, match="multiples of 32"):
        G.pack_weight(torch.zeros(16, 48, dtype=torch.int32), torch.zeros(16, 1), torch.ones(16, 1), 4, -1)


# ----------------------------------------------------------------------------------- build and cache


def test_build_is_cached_per_source_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = G.build_library()
    assert path.parent == tmp_path / "auto_quant" / "kernels" and path.exists()
    mtime = path.stat().st_mtime_ns
    assert G.build_library() == path and path.stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_no_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    b = next(x for x in B.BACKENDS if x.name == "cpu_gemv")
    assert not B.c_compiler_found() and not b.available()
    key = B.LayerKey(576, 64, 4, 32, True, "gptq")
    with pytest.raises(BackendError, match=r"'cpu_gemv' is not available here; install a C compiler"):
        B.select_backend(key, "cpu", "cpu_gemv")
    assert B.select_backend(key, "cpu", act_dtype=torch.bfloat16).name == "torch_cpu_int4"
    with pytest.raises(BackendError, match=r"no C compiler was found.*install gcc"):
        G.build_library()


def test_failing_compile_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(BackendError, match=r"(?s)could not compile its C kernel.*exit status 1.*install a working gcc"):
        G.build_library(cc="false")


def test_automatic_selection_moves_on_when_the_kernel_does_not_build(monkeypatch, tmp_path, caplog):
    """A compiler that is there but cannot build: automatic selection warns once and takes torch_cpu_int4;
    forcing cpu_gemv raises the build error."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    G.load_library.cache_clear()
    try:
        model = torch.nn.Sequential(make_layer(64, 576), make_layer(64, 576, seed=1)).to(torch.bfloat16)
        with caplog.at_level(logging.WARNING, logger="auto_quant.inference.backends"):
            chosen = B.attach_backends(model)
        assert set(chosen.values()) == {"torch_cpu_int4"}
        warned = [r for r in caplog.records if "cpu_gemv is unavailable here" in r.getMessage()]
        assert len(warned) == 1  # the second layer does not try the build again
        with pytest.raises(BackendError, match="could not compile its C kernel"):
            B.attach_backends(model, backend="cpu_gemv")
    finally:
        G.load_library.cache_clear()


def test_selection():
    key = B.LayerKey(576, 64, 4, 32, True, "gptq")
    assert B.select_backend(key, "cpu", act_dtype=torch.bfloat16).name == "cpu_gemv"
    assert B.select_backend(key, "cpu", act_dtype=torch.float32).name == "cpu_gemv"
    assert B.select_backend(key, "cpu", "torch", act_dtype=torch.float32).name == "torch"  # exact when asked
    assert B.select_backend(B.LayerKey(576, 64, 4, 32, True, "gptq"), "cpu", "gemv_cpu").name == "cpu_gemv"
    key8 = B.LayerKey(576, 64, 8, 32, False, "gptq")
    assert B.select_backend(key8, "cpu", act_dtype=torch.bfloat16).name == "cpu_gemv"
    assert B.select_backend(key8, "cpu", act_dtype=torch.float32).name == "cpu_gemv"
    with pytest.raises(BackendError, match=r"cannot serve .* serves 2/3/4/8 bits, not 6"):
        B.select_backend(B.LayerKey(576, 64, 6, 32, True, "gptq"), "cpu", "cpu_gemv")
    with pytest.raises(BackendError, match=r"multiples of 32, not 48"):
        B.select_backend(B.LayerKey(96, 64, 4, 48, True, "gptq"), "cpu", "cpu_gemv")


# ------------------------------------------------------------------------------- models and compile


def save_tiny(out, bits, group_size, sym):
    from tiny_models import tiny_model, token_data

    from auto_quant import AutoRound

    model = tiny_model("llama", intermediate_size=192)
    AutoRound(model, None, bits=bits, group_size=group_size, sym=sym, iters=0, dataset=token_data(2, 32),
              nsamples=2, seqlen=32, progress=False).quantize_and_save(str(out))
    return out


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("q") / "tiny_w4", 4, 32, True)


@pytest.fixture(scope="module")
def saved_tiny_w8(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("q") / "tiny_w8", 8, 128, False)


@pytest.mark.parametrize("saved, logged", [("saved_tiny", "14 4-bit g32 sym"), ("saved_tiny_w8", "14 8-bit g128 asym")])
def test_reloaded_tiny_llama_generates_like_the_reference(saved, logged, request, caplog):
    from transformers import AutoModelForCausalLM

    from auto_quant import AutoRoundConfig

    saved_dir = request.getfixturevalue(saved)
    with caplog.at_level(logging.INFO, logger="auto_quant.inference.backends"):
        m = AutoModelForCausalLM.from_pretrained(saved_dir, dtype=torch.float32,
                                                 quantization_config=AutoRoundConfig(backend="cpu_gemv")).eval()
    assert {q.backend for q in m.modules() if isinstance(q, QuantLinear)} == {"cpu_gemv"}
    assert any(f"backend cpu_gemv for {logged} layers on cpu" in r.getMessage() for r in caplog.records)
    ref = AutoModelForCausalLM.from_pretrained(saved_dir, dtype=torch.float32,
                                               quantization_config=AutoRoundConfig(backend="torch")).eval()
    assert {q.backend for q in ref.modules() if isinstance(q, QuantLinear)} == {"torch"}
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(m(ids).logits, ref(ids).logits) < 2e-2
        kw = dict(max_new_tokens=12, do_sample=False)
        assert torch.equal(m.generate(ids[:1], **kw), ref.generate(ids[:1], **kw))


def test_compiles_without_graph_breaks():
    model = torch.nn.Sequential(make_layer(out_f=64, in_f=96), torch.nn.ReLU(), make_layer(out_f=32, in_f=64, seed=1))
    B.attach_backends(model, backend="cpu_gemv")
    x = torch.randn(3, 96)
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # the fake kernel gives the shapes
        assert torch.equal(compiled(x), eager)
        explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.skipif(G.find_cxx_compiler() is None, reason="the op's C++ kernel needs a C++ compiler")
def test_the_ops_cpp_kernel_serves_cpu_calls_like_the_python_one():
    """Tracing the op builds and loads its C++ CPU kernel (compiled graphs then skip the Python implementation);
    both make the same aq_gemm call, so they agree bit for bit, for every dtype, layout and bias."""
    assert G.load_native_op() is None
    dump = torch._C._dispatch_dump("auto_quant::cpu_gemv")
    assert "cpu_gemv_op.cpp" in next(line for line in dump.splitlines() if line.startswith("CPU:"))
    layer = make_layer(out_f=48, in_f=192, group_size=64)
    run = G.prepare(layer)
    x = torch.randn(2, 5, 192)
    op = torch.ops.auto_quant.cpu_gemv.default
    for inp, bias in ((x, run.bias), (x.to(torch.bfloat16), run.bias), (x.transpose(0, 1), None), (x[0, 0], None)):
        got = op(inp, run.data, run.bits, run.zero, bias, 48)
        want = G.cpu_gemv_python(inp, run.data, run.bits, run.zero, bias, 48)
        assert got.dtype == inp.dtype and torch.equal(got, want)
    with pytest.raises(RuntimeError, match="bias must be float32"):
        op(x, run.data, run.bits, run.zero, run.bias.to(torch.float64), 48)


def test_the_ops_cpp_kernel_build_failure_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(BackendError, match=r"(?s)cpu_gemv_op.cpp did not build.*exit status 1.*install a working g\+\+"):
        G.build_native_op(cxx="false")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(BackendError, match=r"no C\+\+ compiler was found.*install g\+\+"):
        G.build_native_op()

"""Triton kernels and the ``triton`` backend on a real GPU, real shapes (``pytest -m gpu``; skipped without CUDA).

Compared with the float64 product of the reference dequantized weight, fresh random inputs per
check, outputs poisoned (NaN-filled buffers are never reused: every element must be written).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

COMBOS = [(b, g, s) for b in (2, 3, 4, 8) for g in (32, 64, 128, -1) for s in (True, False)]
TOL = 8e-3


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def quantized_weight(N, K, bits, group_size, sym, seed):
    from auto_quant.kernels import pack_codes
    from auto_quant.quant import QuantSpec, quantize_weight

    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(N, K, device="cuda", generator=g)
    qw = quantize_weight(w, QuantSpec(bits=bits, group_size=group_size, sym=sym))
    return pack_codes(qw.codes, qw.zero, qw.scale, bits, group_size, torch.float16)


@pytest.mark.parametrize("bits,group_size,sym", COMBOS)
def test_default_variants_real_shape(bits, group_size, sym):
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, default_config, quant_matmul

    N, K = 4096, 4096
    kw = quantized_weight(N, K, bits, group_size, sym, seed=bits * 131 + group_size)
    W = dequantize(kw).double()
    ws = Workspace()
    for dt in (torch.float16, torch.bfloat16):
        for M in (1, 7, 64, 300):
            x = torch.randn(M, K, device="cuda").to(dt)
            bias = torch.randn(N, device="cuda").to(dt)
            y = quant_matmul(x, kw, bias, workspace=ws)
            ref = x.double() @ W.t() + bias.double()
            assert y.dtype == dt and torch.isfinite(y).all()
            assert rel_err(y, ref) < TOL, (dt, M, default_config(M, N, K, x.device), rel_err(y, ref))
    torch.cuda.synchronize()
    for acc, cnt in ws._bufs.values():
        assert not acc.any() and not cnt.any()


@pytest.mark.parametrize("M", [1, 16, 64, 256])
@pytest.mark.parametrize("N,K", [(4096, 4096), (6144, 4096), (4096, 14336)])
def test_every_tuning_candidate(N, K, M):
    """Every variant the tuner may pick compiles and is correct (W4 g128 sym, W3 g32 asym, W8 per-channel)."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, candidates, launch

    ws = Workspace()
    for bits, gs, sym in ((4, 128, True), (3, 32, False), (8, -1, True)):
        kw = quantized_weight(N, K, bits, gs, sym, seed=N + K + bits)
        W = dequantize(kw).double()
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ W.t()
        for cfg in candidates(M, N, K, x.device, bits, gs):
            try:
                y = launch(x, kw, None, cfg, ws)
            except Exception as e:  # out of shared memory / registers is a legal skip for the tuner, nothing else
                assert "OutOfResources" in type(e).__name__ or "out of resource" in str(e).lower(), (cfg, e)
                continue
            assert rel_err(y, ref) < TOL, (bits, gs, M, cfg, rel_err(y, ref))
    torch.cuda.synchronize()
    for acc, cnt in ws._bufs.values():
        assert not acc.any() and not cnt.any()


@pytest.mark.parametrize("bits,group_size,sym", [c for c in COMBOS if c[0] != 3])
def test_gemv_every_candidate(bits, group_size, sym):
    """The one-row kernel: every tuning candidate, fp16 and bf16; 2/4 bits must take the paired PTX path."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, candidates, launch, paired

    N, K = 4096, 4096
    kw = quantized_weight(N, K, bits, group_size, sym, seed=bits * 17 + group_size)
    W = dequantize(kw).double()
    ws = Workspace()
    # the mma kernels' candidates are checked in test_kernels_mma_gpu.py
    cands = [c for c in candidates(1, N, K, torch.device("cuda"), bits, group_size) if not c.kind.startswith("mma")]
    assert cands and all(c.kind == "gemv" for c in cands if bits != 8) and any(c.kind == "gemv" for c in cands)
    for dt in (torch.float16, torch.bfloat16):
        x = torch.randn(1, K, device="cuda").to(dt)
        assert paired(x, kw) == (bits in (2, 4, 8))
        bias = torch.randn(N, device="cuda").to(dt)
        ref = x.double() @ W.t() + bias.double()
        for cfg in cands:
            y = launch(x, kw, bias, cfg, ws)
            assert torch.isfinite(y).all() and rel_err(y, ref) < TOL, (dt, cfg, rel_err(y, ref))
    torch.cuda.synchronize()
    for acc, cnt in ws._bufs.values():
        assert not acc.any() and not cnt.any()


@pytest.mark.parametrize("bits,group_size,sym", [c for c in COMBOS if c[0] != 3]
                         + [(3, 128, True), (3, 64, False), (3, -1, True), (3, 32, True)])
def test_tdot_every_candidate(bits, group_size, sym):
    """The weight-side tensor-core kernel: every candidate for a few row counts, fp16 and bf16; the paired PTX tile
    wherever a tile lies in one group (3 bits: with the high words)."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, launch, tdot_candidates, tdot_pairs

    N, K = 4096, 4096
    kw = quantized_weight(N, K, bits, group_size, sym, seed=bits * 37 + group_size)
    W = dequantize(kw).double()
    ws = Workspace()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for M, dts in ((3, (torch.float16, torch.bfloat16)), (16, (torch.bfloat16,)), (40, (torch.float16,)),
                   (256, (torch.bfloat16,))):
        cands = tdot_candidates(M, N, K, bits, group_size, sms)
        assert cands
        for dt in dts:
            x = torch.randn(M, K, device="cuda").to(dt)
            bias = torch.randn(N, device="cuda").to(dt)
            ref = x.double() @ W.t() + bias.double()
            for cfg in cands:
                assert tdot_pairs(x, kw, cfg.block_k) == (group_size == -1 or group_size % cfg.block_k == 0)
                y = launch(x, kw, bias, cfg, ws)
                assert torch.isfinite(y).all() and rel_err(y, ref) < TOL, (M, dt, cfg, rel_err(y, ref))
    torch.cuda.synchronize()
    for acc, cnt in ws._bufs.values():
        assert not acc.any() and not cnt.any()


@pytest.mark.parametrize("group_size", [-1, 128])
def test_tdot_repeated_launches(group_size):
    """Every tdot candidate at 64 and 256 rows, 20 launches each: intermittently wrong tiles (13 % error in about
    1 of 30 launches with 128 x 256 tiles, the register race of test_tdot_register_operand_race) must not come
    back."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, launch, tdot_candidates

    N, K = 4096, 4096
    kw = quantized_weight(N, K, 4, group_size, True, seed=11 + group_size)
    W = dequantize(kw).double()
    ws = Workspace()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for M in (64, 256):
        x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
        ref = x.double() @ W.t()
        for cfg in tdot_candidates(M, N, K, 4, group_size, sms):
            errs = [rel_err(launch(x, kw, None, cfg, ws), ref) for _ in range(20)]
            assert max(errs) < TOL, (M, cfg, max(errs))
    torch.cuda.synchronize()
    for acc, cnt in ws._bufs.values():
        assert not acc.any() and not cnt.any()


def test_tdot_register_operand_race():
    """triton-lang/triton#9433: Triton 3.6 let a tile's dequantized weight overwrite the registers the previous
    tile's wgmma still read. On an H100 these configurations gave inf or 1e34 in 22-31 of 40 launches before the
    kernel waited for the tensor cores (WAIT_MMA); every launch must now be right."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import KernelConfig, Workspace, launch, wgmma_device

    N, K, M = 28672, 4096, 256
    kw = quantized_weight(N, K, 4, 128, True, seed=5)
    W = dequantize(kw).double()
    ws = Workspace()
    x = torch.randn(M, K, device="cuda").to(torch.bfloat16)
    ref = x.double() @ W.t()
    assert wgmma_device(x.device) == (torch.cuda.get_device_capability()[0] == 9)
    for cfg in (KernelConfig("tdot", 128, 128, 64, 1, 8, 4), KernelConfig("tdot", 128, 128, 64, 1, 8, 3),
                KernelConfig("tdot", 256, 128, 64, 1, 8, 4)):
        errs = [rel_err(launch(x, kw, None, cfg, ws), ref) for _ in range(25)]
        assert max(errs) < TOL, (cfg, sum(not e < TOL for e in errs), max(errs))


def test_tdot_odd_shapes_and_wide_tiles():
    """Partial tiles in every dimension, tiles wider than the group (float path), per-channel asym, a strided x."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import KernelConfig, Workspace, quant_matmul

    ws = Workspace()
    for bits, gs, sym, N, K in ((4, 32, False, 200, 416), (2, 64, True, 136, 320), (8, 128, False, 72, 384),
                                (4, -1, False, 4096, 1000)):
        kw = quantized_weight(N, K, bits, gs, sym, seed=N + K)
        W = dequantize(kw).double()
        for dt in (torch.float16, torch.bfloat16):
            base = torch.randn(37, K + 8, device="cuda").to(dt)
            x = base[:, 4:4 + K]  # rows not contiguous with each other
            ref = x.double() @ W.t()
            for cfg in (KernelConfig("tdot", 16, 64, 128, 1, 4, 3), KernelConfig("tdot", 64, 128, 64, 2, 4, 3),
                        KernelConfig("tdot", 32, 128, 256, 3, 8, 2)):
                y = quant_matmul(x, kw, config=cfg, workspace=ws)
                assert torch.isfinite(y).all() and rel_err(y, ref) < TOL, (bits, gs, dt, cfg, rel_err(y, ref))
    torch.cuda.synchronize()
    for acc, cnt in ws._bufs.values():
        assert not acc.any() and not cnt.any()


@pytest.mark.parametrize("bits,group_size,sym", [c for c in COMBOS if c[0] in (2, 4)])
def test_gemv_rows_every_candidate(bits, group_size, sym):
    """The multi-row gemv (2-16 rows): every candidate the tuner may time, fp16 and bf16."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, candidates, launch, m_bucket

    N, K = 4096, 4096
    kw = quantized_weight(N, K, bits, group_size, sym, seed=bits * 29 + group_size)
    W = dequantize(kw).double()
    ws = Workspace()
    for M, dts in ((3, (torch.float16, torch.bfloat16)), (6, (torch.bfloat16,)), (16, (torch.float16, torch.bfloat16))):
        cands = [c for c in candidates(M, N, K, torch.device("cuda"), bits, group_size) if c.kind == "gemv"]
        assert cands and all(c.block_m == m_bucket(M) for c in cands)
        for dt in dts:
            x = torch.randn(M, K, device="cuda").to(dt)
            bias = torch.randn(N, device="cuda").to(dt)
            ref = x.double() @ W.t() + bias.double()
            for cfg in cands:
                y = launch(x, kw, bias, cfg, ws)
                assert torch.isfinite(y).all() and rel_err(y, ref) < TOL, (M, dt, cfg, rel_err(y, ref))
    torch.cuda.synchronize()
    for acc, cnt in ws._bufs.values():
        assert not acc.any() and not cnt.any()


def test_gemv_rows_odd_shape_and_outliers():
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import KernelConfig, Workspace, launch

    N, K = 1000, 4160
    for bits, gs, sym in ((4, 128, False), (2, 64, True)):
        kw = quantized_weight(N, K, bits, gs, sym, seed=7 + bits)
        kw.scales.mul_(0.02)
        W = dequantize(kw).double()
        ws = Workspace()
        per = 32 // bits
        for dt in (torch.float16, torch.bfloat16):
            x = torch.randn(5, K, device="cuda").to(dt)
            x[:, ::97] = 3000.0
            for cfg in (KernelConfig("gemv", 8, 512, 2 * per, 7, 4, 3), KernelConfig("gemv", 8, 512, per, 1, 4, 3)):
                y = launch(x, kw, None, cfg, ws)
                assert torch.isfinite(y).all() and rel_err(y, x.double() @ W.t()) < TOL, (bits, dt, cfg)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gemv_odd_shapes_strides_and_large_activations(bits):
    """Partial column tiles, a partial last group, an odd row stride (portable path) and fp16 outliers."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, default_config, paired, quant_matmul

    N, K = 1000, 4160  # N not a multiple of any block; K = 32.5 groups of 128
    for gs, sym in ((128, True), (64, False)):
        kw = quantized_weight(N, K, bits, gs, sym, seed=bits + gs)
        kw.scales.mul_(0.02)  # LLM-sized weights, so the outputs below stay inside the fp16 range
        W = dequantize(kw).double()
        ws = Workspace()
        assert default_config(1, N, K, torch.device("cuda"), bits, gs).kind == "gemv"
        for dt in (torch.float16, torch.bfloat16):
            x = torch.randn(1, K, device="cuda").to(dt)
            x[0, ::97] = 3000.0  # outliers: fp16 half-precision partial sums must not overflow
            y = quant_matmul(x, kw, workspace=ws)
            assert torch.isfinite(y).all() and rel_err(y, x.double() @ W.t()) < TOL, (gs, dt)
            wide = torch.randn(3, K + 1, device="cuda").to(dt)[:, :K]  # row stride K + 1 (odd)
            assert not paired(wide, kw)
            y = quant_matmul(wide, kw, workspace=ws)
            assert rel_err(y, wide.double() @ W.t()) < TOL


def test_split_k_under_cuda_graph_and_tuner():
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import KernelConfig, Workspace, quant_matmul
    from auto_quant.kernels.tuner import Tuner

    N, K = 4096, 4096
    kw = quantized_weight(N, K, 4, 128, False, seed=5)
    W = dequantize(kw).double()
    ws = Workspace()
    tuner = Tuner(rep_ms=5)
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    for cfg in (KernelConfig("fma", 1, 256, 64, 8), KernelConfig("gemv", 1, 1024, 8, 16, 4, 1)):
        quant_matmul(x, kw, config=cfg, workspace=ws)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = quant_matmul(x, kw, config=cfg, workspace=ws)
        for _ in range(3):
            x.copy_(torch.randn(1, K, device="cuda"))
            g.replay()
            assert rel_err(y, x.double() @ W.t()) < TOL
    for M in (1, 16, 512):
        xm = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        assert rel_err(quant_matmul(xm, kw, tuner=tuner, workspace=ws), xm.double() @ W.t()) < TOL
    assert len(tuner.best) == 3


def test_tuner_times_every_candidate_that_runs():
    """The tuner times every candidate it is offered that compiles and fits (each a positive time, its flush and
    activation copy subtracted) and keeps one of them; the tuned matmul is right."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, candidates, quant_matmul
    from auto_quant.kernels.tuner import Tuner

    N, K = 1024, 2048
    kw = quantized_weight(N, K, 4, 128, True, seed=7)
    W = dequantize(kw).double()
    x = torch.randn(4, K, device="cuda", dtype=torch.bfloat16)
    offered = candidates(4, N, K, x.device, 4, 128, x.dtype)
    tuner = Tuner(rep_ms=5)
    assert rel_err(quant_matmul(x, kw, tuner=tuner, workspace=Workspace()), x.double() @ W.t()) < TOL
    times = tuner.timings[tuner.key(x, kw)]
    assert len(times) >= len(offered) - 2 and all(t > 0 for t in times.values())
    assert tuner.best[tuner.key(x, kw)] in times


def test_tuner_cache_spares_a_second_tuner_the_timing(tmp_path):
    """A second tuner over the first one's cache folder (a new process on the same GPU) takes its pick without timing
    anything, and the matmul with it is right."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, quant_matmul
    from auto_quant.kernels.tuner import Tuner
    from auto_quant.kernels.tuner_cache import TunerCache

    N, K = 1024, 2048
    kw = quantized_weight(N, K, 4, 128, True, seed=8)
    W = dequantize(kw).double()
    x = torch.randn(4, K, device="cuda", dtype=torch.bfloat16)
    first = Tuner(rep_ms=5, cache=TunerCache(tmp_path))
    quant_matmul(x, kw, tuner=first, workspace=Workspace())
    key = first.key(x, kw)
    assert first.timings[key] and [p.suffix for p in tmp_path.iterdir()] == [".json"]
    second, ws = Tuner(rep_ms=5, cache=TunerCache(tmp_path)), Workspace()
    y = quant_matmul(x, kw, tuner=second, workspace=ws)
    assert second.best[key] == first.best[key] and key not in second.timings
    assert rel_err(y, x.double() @ W.t()) < TOL
    # under CUDA-graph capture (nothing may be timed) a fresh tuner takes the cached pick, not the heuristic
    third, g = Tuner(rep_ms=5, cache=TunerCache(tmp_path)), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y3 = quant_matmul(x, kw, tuner=third, workspace=ws)
    g.replay()
    torch.cuda.synchronize()
    assert third.best[key] == first.best[key] and key not in third.timings
    assert rel_err(y3, x.double() @ W.t()) < TOL


def test_interleaved_graph_times_rank_work_and_ignore_order():
    """The tuner's second look times candidates side by side in interleaved rounds: a matmul with 8x the work
    measures several times longer whichever order the two are given in, the small one alike in both orders, and
    every time is the call's own (the flushes subtracted: positive and far below the 64 MiB flush's own time)."""
    from auto_quant.kernels.gpu_timing import graph_time_ms, graph_times_ms, l2_read_flush

    flush = l2_read_flush(torch.device("cuda"))
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for n in (2048, 4096))

    def small():
        return a @ a

    def big():
        return b @ b

    s1, b1 = graph_times_ms([small, big], flush, rounds=7)
    b2, s2 = graph_times_ms([big, small], flush, rounds=7)
    assert 0 < s1 < b1 / 3 and 0 < s2 < b2 / 3
    assert 0.7 < s1 / s2 < 1.4 and 0.7 < b1 / b2 < 1.4
    assert 0.7 < graph_time_ms(big, flush, rounds=7) / b1 < 1.4


def quantized_llama(layers, group_size, sym, seed):
    """A small fp16 Llama on the GPU whose decoder linears are W4 ``QuantLinear`` layers (the reference path until a
    backend is attached)."""
    import transformers

    from auto_quant.inference.qlinear import QuantLinear
    from auto_quant.quant import QuantSpec, quantize_weight

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
    for mod in list(model.model.modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear):
                qw = quantize_weight(child.weight.float(), QuantSpec(bits=4, group_size=group_size, sym=sym))
                q = QuantLinear.from_quantized(qw, None, layout="gptq_v2", bias_dtype=torch.float16)
                setattr(mod, cname, q.to("cuda"))
    return model


def test_attach_triton_backend_on_cuda_model():
    from auto_quant.inference.backends import attach_backends, detach_backends

    model = quantized_llama(2, group_size=64, sym=False, seed=0)
    ids = torch.randint(0, 512, (2, 24), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits
        chosen = attach_backends(model)
        assert set(chosen.values()) == {"triton"}
        out = model(ids).logits
        detach_backends(model)
    assert rel_err(out, ref) < 1e-2


def compiled_kernels(device_index: int) -> int:
    """How many kernel specializations the package's Triton and Gluon kernels hold compiled for one GPU."""
    from auto_quant.kernels import gluon_mma, gluon_wgmma, triton_gemv, triton_gemv_rows, triton_qmm, triton_qmm_wt

    n = 0
    for mod in (gluon_mma, gluon_wgmma, triton_gemv, triton_gemv_rows, triton_qmm, triton_qmm_wt):
        for obj in vars(mod).values():
            caches = getattr(obj, "device_caches", None)
            if isinstance(caches, dict) and device_index in caches:
                n += len(caches[device_index][0])
    return n


def test_cached_picks_compiled_at_attach_leave_nothing_to_compile(tmp_path):
    """A tuner given a cache with picks for a layer compiles them ahead (at each bucket's row count); the first
    calls at 1, 40 and 48 rows (bucket 64: other row counts than the compile's, a multiple of 16 and not) and 300
    rows then compile nothing, time nothing and are right."""
    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, default_config, m_bucket, quant_matmul
    from auto_quant.kernels.tuner import Tuner
    from auto_quant.kernels.tuner_cache import TunerCache, device_fingerprint

    N, K = 776, 1536  # N not a multiple of 16 nor of any tile: specializations no other test compiles
    kw = quantized_weight(N, K, 4, 128, True, seed=21)
    W = dequantize(kw).double()
    dev = torch.device("cuda", torch.cuda.current_device())
    cache = TunerCache(tmp_path)
    for m in (1, 40, 300):
        key = (4, 128, False, torch.bfloat16, m_bucket(m), N, K, dev)
        cache.put(device_fingerprint(dev), key, default_config(m, N, K, dev, 4, 128, torch.bfloat16))
    tuner, ws = Tuner(rep_ms=5, cache=TunerCache(tmp_path)), Workspace()
    assert tuner.compile_cached([(kw, None)], ws) == 3  # at 1, 64 and 512 rows
    before = compiled_kernels(dev.index)
    for m in (1, 40, 48, 300):
        x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        y = quant_matmul(x, kw, tuner=tuner, workspace=ws)
        assert rel_err(y, x.double() @ W.t()) < TOL
        assert tuner.key(x, kw) in tuner.best and tuner.key(x, kw) not in tuner.timings
    assert compiled_kernels(dev.index) == before


def test_attach_compiles_the_cached_picks_of_its_layers(tmp_path):
    """``attach_backends`` with a tuning cache that already holds this model's picks takes them at attach (its
    tuner knows every layer's pick before the first call); ``compile_ahead=False`` leaves that to the first calls."""
    from auto_quant.inference.backends import attach_backends, detach_backends
    from auto_quant.inference.qlinear import QuantLinear

    model = quantized_llama(1, group_size=128, sym=True, seed=1)
    ids = torch.randint(0, 512, (1, 5), device="cuda")

    def tuner_of(m):
        return next(q.kernel.run.tuner for q in m.modules() if isinstance(q, QuantLinear))

    with torch.no_grad():
        attach_backends(model, tuning_cache=tmp_path)
        ref = model(ids).logits  # tunes every shape at 8 rows, stores the picks
        picked = dict(tuner_of(model).best)
        detach_backends(model)
        attach_backends(model, tuning_cache=tmp_path)
        assert tuner_of(model).best == picked  # before any call
        out = model(ids).logits
        detach_backends(model)
        attach_backends(model, tuning_cache=tmp_path, compile_ahead=False)
        assert tuner_of(model).best == {}
        detach_backends(model)
    assert rel_err(out, ref) < 1e-3  # the same kernels (split-K sums may differ in order)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_layer_on_the_second_gpu_runs_there(tmp_path):
    """A model split over GPUs: the kernels of a layer on cuda:1 launch there while cuda:0 is current (Triton
    launches on the current device), tuned or compiled ahead from the cache, and are right."""
    import dataclasses

    from auto_quant.kernels import dequantize
    from auto_quant.kernels.dispatch import Workspace, quant_matmul
    from auto_quant.kernels.tuner import Tuner
    from auto_quant.kernels.tuner_cache import TunerCache

    one = torch.device("cuda", 1)
    kw0 = quantized_weight(1024, 2048, 4, 128, True, seed=5)
    kw = dataclasses.replace(kw0, **{f.name: getattr(kw0, f.name).to(one) for f in dataclasses.fields(kw0)
                                    if isinstance(getattr(kw0, f.name), torch.Tensor)})
    W = dequantize(kw0).double().to(one)
    on_first = compiled_kernels(0)
    with torch.cuda.device(0):
        for m in (1, 16, 300):
            x = torch.randn(m, 2048, device=one, dtype=torch.float16)
            for tuner in (None, Tuner(rep_ms=5, cache=TunerCache(tmp_path))):
                y = quant_matmul(x, kw, tuner=tuner, workspace=Workspace())
                assert y.device == one and rel_err(y, x.double() @ W.t()) < TOL
        second = Tuner(rep_ms=5, cache=TunerCache(tmp_path))
        assert second.compile_cached([(kw, None)], Workspace()) == 3  # at 1, 16 and 512 rows
        assert torch.cuda.current_device() == 0
        y = quant_matmul(x, kw, tuner=second, workspace=Workspace())
        assert rel_err(y, x.double() @ W.t()) < TOL and second.key(x, kw) not in second.timings
    assert compiled_kernels(1) > 0 and compiled_kernels(0) == on_first  # nothing compiled for (or ran on) cuda:0


def two_gpu_checkpoint(tmp_path, layers=4):
    """A tiny W4 Llama checkpoint and a ``device_map`` putting its first half of blocks on cuda:0, the rest on
    cuda:1."""
    from tiny_models import tiny_model, token_data

    from auto_quant import AutoRound

    model = tiny_model("llama", intermediate_size=256, num_hidden_layers=layers)
    out = tmp_path / "tiny_w4"
    AutoRound(model, None, bits=4, group_size=32, sym=True, iters=0, dataset=token_data(2, 32), nsamples=2,
              seqlen=32, progress=False).quantize_and_save(str(out))
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 0}  # tied to the embedding
    split.update({f"model.layers.{i}": int(i >= layers // 2) for i in range(layers)})
    return out, split


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_checkpoint_split_over_two_gpus_matches_one_gpu(tmp_path):
    """``from_pretrained(device_map=...)`` with the blocks spread over cuda:0 and cuda:1: every quantized layer runs
    the ``triton`` backend on its own GPU, and the logits match the model loaded on one GPU."""
    from transformers import AutoModelForCausalLM

    from auto_quant import AutoRoundConfig
    from auto_quant.inference.qlinear import QuantLinear

    out, split = two_gpu_checkpoint(tmp_path)
    ids = torch.randint(0, 200, (2, 12))
    logits = []
    for device_map in ({"": 0}, split):
        qc = AutoRoundConfig(backend="triton", tuning_cache=str(tmp_path / "picks"))
        m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16, device_map=device_map,
                                                 quantization_config=qc)
        qls = [q for q in m.modules() if isinstance(q, QuantLinear)]
        assert {q.backend for q in qls} == {"triton"}
        with torch.no_grad():
            logits.append(m(ids.to(m.model.embed_tokens.weight.device)).logits.to(0).float())
        placed = {q.qweight.device.index for q in qls}
    assert placed == {0, 1}
    assert rel_err(logits[1], logits[0]) < 1e-3

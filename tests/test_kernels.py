"""Triton kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1), small shapes.

Every declared combination (W2/W3/W4/W8, group 32/64/128/-1, sym/asym, fp16/bf16) runs each
kernel variant (the gemv's portable path and the older fma GEMV, each with and without split-K, tensor-core dot with and without split-K,
dequantize + matmul) and is compared with the float64 product of the reference dequantized
weight. Real shapes run on the GPU in test_kernels_gpu.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from auto_quant.kernels import dequantize, from_quant_linear, pack_codes
from auto_quant.quant import QuantSpec, quantize_weight

triton = pytest.importorskip("triton")
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def quantized(N, K, bits, group_size, sym, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    return quantize_weight(w, QuantSpec(bits=bits, group_size=group_size, sym=sym))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------ layout (pure torch)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_pack_round_trip(bits, group_size, sym):
    qw = quantized(24, 200, bits, group_size, sym)
    kw = pack_codes(qw.codes, qw.zero, qw.scale, bits, group_size, torch.float16)
    from auto_quant.quant import dequantize as ref_dequantize

    ref = ref_dequantize(qw.codes, qw.scale.to(torch.float16).float(), qw.zero, qw.spec)
    assert torch.allclose(dequantize(kw), ref, atol=0, rtol=0)
    assert (kw.zeros is None) == sym
    if bits == 3:
        assert kw.qweight_hi is not None and kw.qweight.shape[0] == -(-200 // 16)
        assert tuple(kw.qweight_hi.shape) == (-(-200 // 16), 12)  # a word per column pair and 16 inputs


@pytest.mark.parametrize("K,N", [(32, 2), (200, 25), (17, 1)])
def test_high_bit_plane_round_trip_and_order(K, N):
    """The 3-bit high-bit plane: bits come back from any shape (odd columns, inputs past the last whole word), and
    code j of column n sits at bit (2j + 2 + n % 2) % 32 of its pair's word: the even column on even bits, code 15
    wrapped to the bottom."""
    from auto_quant.kernels.pack import pack_high_bits, unpack_high_bits

    hi = torch.randint(0, 2, (K, N), generator=torch.Generator().manual_seed(K + N))
    q = pack_high_bits(hi)
    assert q.dtype == torch.int32 and tuple(q.shape) == (-(-K // 16), -(-N // 2))
    assert torch.equal(unpack_high_bits(q, K, N), hi)
    one = torch.zeros(32, 2, dtype=torch.int64)
    one[15, 0] = one[0, 1] = one[30, 1] = 1  # word 0: code 15 (col 0) -> bit 0, code 0 (col 1) -> bit 3
    assert pack_high_bits(one).tolist() == [[1 | 1 << 3], [-(1 << 31)]]  # word 1: code 14 (col 1) -> bit 31


def test_from_quant_linear_reuses_gptq_qweight():
    from auto_quant.inference.qlinear import QuantLinear

    qw = quantized(64, 256, 4, 128, True)
    for layout in ("gptq", "gptq_v2"):
        m = QuantLinear.from_quantized(qw, None, layout=layout)
        kw = from_quant_linear(m)
        assert kw.qweight.data_ptr() == m.qweight.data_ptr() and kw.zeros is None
        assert torch.equal(dequantize(kw), m.dequantize_weight())
    for layout, bits in (("awq", 4), ("gptq_v2", 3)):
        q = quantized(64, 256, bits, 32, False)
        m = QuantLinear.from_quantized(q, None, layout=layout)
        assert torch.equal(dequantize(from_quant_linear(m)), m.dequantize_weight())


# ------------------------------------------------------------------------ kernels (interpreter)
# Triton chooses interpreter or compiler when its modules are decorated, at import, and importing
# auto_quant already imports triton; so the interpreted runs happen in one child process started
# with TRITON_INTERPRET=1, and the tests below check its per-combination results.

VARIANTS = [
    # (M, kind, block_m, block_n, word rows per tile, split_k, stages); block_k = rows x codes per word
    (1, "gemv", 1, 64, 1, 1, 1),  # register prefetch; 3 bits: fma (the gemv serves 2/4/8)
    (1, "gemv", 1, 32, 2, 2, 3),  # Triton's software pipeline
    (1, "gemv", 1, 32, 8, 2, 1),  # tiles taller than small groups: a scale row per word row
    (1, "gemv", 1, 64, 16, 1, 3),
    (1, "fma", 1, 64, 2, 1, 2),
    (1, "fma", 1, 32, 4, 3, 2),
    (5, "tdot", 16, 32, 8, 2, 2),  # weight-side tensor-core tile, wider than g32 (and g64 at 2 bits)
    (20, "tdot", 32, 64, 4, 1, 3),
    (5, "dot", 16, 32, 16, 2, 2),
    (20, "dot", 16, 64, 16, 1, 2),
    (6, "dequant", 1, 64, 2, 1, 2),
]
COMBOS = [(b, g, s) for b in (2, 3, 4, 8) for g in (32, 64, 128, -1) for s in (True, False)]
TOL = 8e-3  # bf16 output rounding is ~4e-3


def run_interpreter_checks() -> dict:
    """Runs in the child process: every combination x dtype x variant; returns errors per combination."""
    from auto_quant.inference.qlinear import QuantLinear
    from auto_quant.inference.triton_backend import prepare
    from auto_quant.kernels.dispatch import Workspace, _cfg, quant_matmul

    out = {}
    N, K = 48, 160  # K not a multiple of 64 or 128: partial tiles and a partial last group
    for bits, group_size, sym in COMBOS:
        qw = quantized(N, K, bits, group_size, sym, seed=bits * 7 + group_size)
        kw = pack_codes(qw.codes, qw.zero, qw.scale, bits, group_size, torch.float16)
        W = dequantize(kw).double()
        ws = Workspace()
        g = torch.Generator().manual_seed(1)
        errs = []
        c = COMBOS.index((bits, group_size, sym))
        for i, (M, kind, bm, bn, bkw, split, stages) in enumerate(VARIANTS):  # fp16/bf16 alternate across combos
            dt = torch.float16 if (i + c) % 2 == 0 else torch.bfloat16
            x = torch.randn(M, K, generator=g).to(dt)
            bias = torch.randn(N, generator=g).to(dt)
            kind = "fma" if kind == "gemv" and bits == 3 else kind
            y = quant_matmul(x, kw, bias, config=_cfg(kind, bm, bn, bkw, bits, split, stages=stages), workspace=ws)
            ref = x.double() @ W.t() + bias.double()
            ok = y.dtype == dt and tuple(y.shape) == (M, N) and bool(torch.isfinite(y).all())
            errs.append([str(dt), M, kind, split, rel_err(y, ref) if ok else 1e9])
        clean = all(not a.any() and not c.any() for a, c in ws._bufs.values())
        out[f"{bits},{group_size},{sym}"] = {"errors": errs, "workspace_clean": clean}
    # defaults (no config), 3-D input, and a QuantLinear through the triton backend's prepare()
    qw = quantized(32, 256, 4, 64, False)
    kw = pack_codes(qw.codes, qw.zero, qw.scale, 4, 64)
    W = dequantize(kw).double()
    extra = []
    for M in (1, 3, 40, 300):
        x = torch.randn(2, M, 256, dtype=torch.float16)
        y = quant_matmul(x, kw)
        extra.append(["default", M, list(y.shape), rel_err(y, x.double() @ W.t())])
    qw = quantized(48, 192, 3, 32, False)
    m = QuantLinear.from_quantized(qw, torch.randn(48), layout="gptq_v2", bias_dtype=torch.float16)
    x = torch.randn(4, 192, dtype=torch.float16)
    extra.append(["triton_backend", 4, [4, 48], rel_err(prepare(m)(x), m.forward_reference(x.float()))])
    out["extra"] = extra
    return out


@pytest.fixture(scope="module")
def interp():
    code = ("import json, sys; sys.path.insert(0, %r); import test_kernels as t; "
            "print('RESULT' + json.dumps(t.run_interpreter_checks()))" % TESTS_DIR)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
    assert r.returncode == 0 and lines, r.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT"):])


@pytest.mark.parametrize("bits,group_size,sym", COMBOS)
def test_kernels_match_reference(interp, bits, group_size, sym):
    res = interp[f"{bits},{group_size},{sym}"]
    assert len(res["errors"]) == len(VARIANTS)
    bad = [e for e in res["errors"] if not e[-1] < TOL]
    assert not bad, bad
    assert res["workspace_clean"]  # split-K leaves its workspace zeroed and its counters reset


def test_default_configs_3d_input_and_backend(interp):
    for name, M, shape, err in interp["extra"]:
        assert err < 5e-3, (name, M, err)
        if name == "default":
            assert shape == [2, M, 32]


@pytest.mark.parametrize("limit", [232448, 166912, 101376])  # H100, A100, sm_89 (opt-in shared memory per block)
def test_tdot_tiles_fit_the_gpu_shared_memory(monkeypatch, limit):
    """Neither the tuner's tdot candidates nor the untuned default may ask for more shared memory than the GPU
    has (a launch would fail: out of resources). The bound is checked against the largest tiles' real use
    on sm_90 in docs/kernels.md."""
    from auto_quant.kernels import dispatch as d

    monkeypatch.setattr(d, "smem_limit", lambda device: limit)
    cpu = torch.device("cpu")
    for bits in (2, 4, 8):
        for M in (2, 16, 48, 100, 200, 256):
            cands = d.tdot_candidates(M, 4096, 4096, bits, 128, 132, limit)
            assert all(d.tdot_smem_bytes(c, bits) <= limit for c in cands), (bits, M)
            assert cands or (limit < 232448 and M > 64)  # on an H100 every row count has tiles
            cfg = d.default_config(M, 4096, 4096, cpu, bits, 128)
            if cands:
                assert cfg.kind == "tdot" and d.tdot_smem_bytes(cfg, bits) <= limit, (bits, M, cfg)
            else:  # no tile fits: dequantize + cuBLAS
                assert cfg.kind == "dequant", (bits, M, cfg)
    # the largest tile really is left out where it does not fit
    big = d.KernelConfig("tdot", 256, 128, 64, 1, 8, 4)
    assert (d.tdot_smem_bytes(big, 8) <= limit) == (limit == 232448)


def test_smem_limit_reads_the_device(monkeypatch):
    """CUDA's opt-in per-block limit where torch reports it; else the multiprocessor's less 1 KiB; else the H100's."""
    from types import SimpleNamespace

    from auto_quant.kernels import dispatch as d

    cuda = torch.device("cuda")
    for props, want in ((SimpleNamespace(shared_memory_per_block_optin=166912, shared_memory_per_multiprocessor=167936),
                         166912),
                        (SimpleNamespace(shared_memory_per_multiprocessor=102400), 101376),
                        (SimpleNamespace(), d.TDOT_SMEM_LIMIT)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, props=props: props)
        assert d.smem_limit(cuda) == want
    assert d.smem_limit(torch.device("cpu")) == d.TDOT_SMEM_LIMIT


def test_default_config_choice_and_bad_input():
    from auto_quant.kernels.dispatch import default_config, quant_matmul

    cpu = torch.device("cpu")
    assert default_config(1, 4096, 4096, cpu).kind == "gemv"
    assert default_config(1, 4096, 4096, cpu, bits=3).kind == "fma"
    assert default_config(16, 4096, 4096, cpu).kind == "tdot"
    assert default_config(256, 4096, 4096, cpu, bits=8).kind == "tdot"
    assert default_config(16, 4096, 4096, cpu, bits=3).kind == "tdot"
    assert default_config(512, 4096, 4096, cpu).kind == "dequant"
    qw = quantized(32, 256, 4, 64, False)
    kw = pack_codes(qw.codes, qw.zero, qw.scale, 4, 64)
    with pytest.raises(ValueError, match="takes 256"):
        quant_matmul(torch.randn(2, 128, dtype=torch.float16), kw)
    from auto_quant.kernels.dispatch import KernelConfig

    with pytest.raises(ValueError, match="multi-row gemv needs fp16/bf16 activations"):  # its PTX needs CUDA
        quant_matmul(torch.randn(3, 256, dtype=torch.float16), kw, config=KernelConfig("gemv", 4, 512, 16, 1, 4, 3))
    with pytest.raises(ValueError, match="1, 2, 4, 8 or 16 rows"):
        KernelConfig("gemv", 3, 512, 16)
    with pytest.raises(ValueError, match="8 warps for 128- and 256-row blocks"):
        KernelConfig("tdot", 128, 128, 64, 4, 4, 4)
    with pytest.raises(ValueError, match="whole words"):  # 24 inputs: a word and a half of the 3-bit 2-bit plane
        quant_matmul(torch.randn(3, 256, dtype=torch.float16), pack_codes(*_q3(), 3, 64),
                     config=KernelConfig("tdot", 16, 32, 24, 1, 4, 2))


def _q3():
    qw = quantized(32, 256, 3, 64, True)
    return qw.codes, qw.zero, qw.scale


# ------------------------------------------------------------------------ compiled for the GPU, on the CPU
# Triton's interpreter runs the portable path only and does not type-check the way the compiler does;
# Triton ships ptxas, so every gemv variant's PTX path is compiled for sm_90 here (no GPU needed).


_KERNEL_ARGS = ["x_ptr", "qw_ptr", "s_ptr", "z_ptr", "b_ptr", "out_ptr", "ws_ptr", "cnt_ptr"]


def _compile_sm90(fn, act, int_args, const, high_words=False):
    """Compile a kernel for sm_90 (PTX and cubin through Triton's bundled ptxas) without a GPU; ``high_words``: the
    kernel takes the 3-bit high words' pointer after the packed words'."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = _KERNEL_ARGS[:2] + ["qh_ptr"] * high_words + _KERNEL_ARGS[2:]
    types = [f"*{act}", "*i32"] + ["*i32"] * high_words + ["*fp16", "*u8", f"*{act}", f"*{act}", "*fp32", "*i32"]
    sig = dict(zip(names + int_args, types + ["i32"] * len(int_args))) | {k: "constexpr" for k in const}
    keys = list(sig)
    src = ASTSource(fn, sig, constexprs={(keys.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


def _compile_gemv_sm90(bits, act, sym, group, block_r, stages, pairs, pdl=False):
    from auto_quant.kernels import dequant_ptx as p
    from auto_quant.kernels import triton_gemv as g

    zero = 1 << (bits - 1) if sym else None
    const = dict(BITS=bits, GROUP=group, HAS_ZERO=not sym, HAS_BIAS=True, BLOCK_N=256, BLOCK_R=block_r, SPLIT=True,
                 EVEN_K=True, EVEN_R=False, EVEN_N=False, PAIRS=pairs,
                 ASM=p.pair_asm(bits, act, zero) if pairs else "", CONS=p.pair_constraints(bits, act, zero) if pairs else "",
                 ACT_FP16=act == "fp16", STAGES=stages, PDL=pdl)
    ints = ["N", "K", "stride_xm", "stride_om", "rows_per_split"]
    return _compile_sm90(g._gemv_kernel, act, ints, const)


@pytest.mark.parametrize("bits,act,sym,group,block_r,stages", [
    (4, "bf16", True, 128, 2, 1), (4, "fp16", False, 128, 4, 3), (4, "bf16", False, 32, 8, 3),  # 8 rows > g32
    (2, "fp16", True, 64, 8, 1), (2, "bf16", False, -1, 4, 3), (8, "bf16", True, 128, 2, 3), (8, "fp16", False, 32, 16, 1),
])
def test_gemv_compiles_for_sm90(bits, act, sym, group, block_r, stages):
    ck = _compile_gemv_sm90(bits, act, sym, 0 if group == -1 else group, block_r, stages, True)
    ptx = ck.asm["ptx"]
    assert ".target sm_90" in ptx and ck.asm["cubin"]
    if bits == 8:  # one prmt per code, float32 products
        assert "prmt.b32" in ptx and "fma.rn.f32" in ptx
    else:  # the paired PTX made it in: packed half-precision fma on the right type
        assert ("fma.rn.bf16x2" if act == "bf16" else "fma.rn.f16x2") in ptx
    if stages > 1:  # Triton's pipeliner copies tiles ahead with cp.async
        assert "cp.async" in ptx


@pytest.mark.parametrize("stages", [1, 3])
def test_gemv_pdl_reads_activations_after_the_grid_wait(stages):
    """Launched with programmatic dependent launch, the kernel may start while the previous kernel still writes its
    activations: every activation load and every store come after ``griddepcontrol.wait`` (one tile's words may
    come before it with one stage); without PDL there is no wait at all."""
    ptx = _compile_gemv_sm90(4, "bf16", True, 128, 4, stages, True, pdl=True).asm["ptx"]
    body = ptx[ptx.index(".entry"):]
    wait = body.index("griddepcontrol.wait")
    assert "griddepcontrol.launch_dependents" in body[wait:]
    before = body[:wait]
    assert "st.global" not in before and "atom." not in before and "cp.async" not in before
    loads = re.findall(r"ld\.global[\w.]*", before)
    if stages == 1:  # the first tile's words (4 word rows x 256 columns over 128 threads) and its scales
        assert loads.count("ld.global.b32") == 8 and set(loads) == {"ld.global.b32", "ld.global.b16"}
    else:  # Triton's pipeliner issues words and activations together: nothing before the wait
        assert not loads
    assert "griddepcontrol" not in _compile_gemv_sm90(4, "bf16", True, 128, 4, stages, True).asm["ptx"]


def _compile_tdot_sm90(bits, act, sym, group, block_k, pairs):
    from auto_quant.kernels import dequant_ptx as g
    from auto_quant.kernels import triton_qmm_wt as t

    zero = 1 << (bits - 1) if sym else None
    if not pairs:
        deq, cons = "", ""
    elif bits == 3:
        deq, cons = g.dequant3_asm(act, zero), g.dequant3_constraints(zero)
    else:
        deq, cons = g.dequant_asm(bits, act, zero), g.dequant_constraints(bits, zero)
    const = dict(BITS=bits, GROUP=group, HAS_ZERO=not sym, HAS_BIAS=True, BLOCK_M=16, BLOCK_N=128, BLOCK_K=block_k,
                 SPLIT=True, EVEN_K=True, PAIRS=pairs, DEQ=deq, DEQ_CONS=cons, ACT_FP16=act == "fp16", STAGES=3,
                 DOT_F32=False, WAIT_MMA=True)
    ints = ["M", "N", "K", "stride_xm", "stride_om", "k_per_split"]
    return _compile_sm90(t._qmm_wt_kernel, act, ints, const, high_words=True)


@pytest.mark.parametrize("bits,act,sym,group,block_k", [
    (4, "bf16", True, 128, 128), (4, "fp16", False, 64, 64), (2, "bf16", False, 0, 128), (2, "fp16", True, 128, 128),
    (8, "bf16", False, 128, 64), (8, "bf16", True, 0, 128), (8, "fp16", False, 64, 64), (8, "fp16", True, 128, 128),
    (4, "bf16", True, 32, 64),  # a tile wider than the group: float32 path
    (3, "bf16", True, 128, 128), (3, "fp16", False, 64, 64), (3, "bf16", False, 32, 64),
])
def test_tdot_compiles_for_sm90_with_wgmma(bits, act, sym, group, block_k):
    """The weight-side tile compiles to Hopper's wgmma with the paired PTX where it applies, and pipelines its copies."""
    pairs = group == 0 or group % block_k == 0
    ptx = _compile_tdot_sm90(bits, act, sym, group, block_k, pairs).asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async" in ptx
    # the kernel's own wait for the tensor cores (triton-lang/triton#9433) is in the loop, as inline PTX
    assert re.search(r"begin inline asm\s*\n\s*wgmma\.wait_group\.sync\.aligned 0;", ptx)
    if pairs and bits == 8 and act == "fp16":  # bytes under the exponent byte 0x64, one packed add
        assert "prmt.b32" in ptx and "add.rn.f16x2" in ptx
    elif pairs:
        assert ("fma.rn.bf16x2" if act == "bf16" else "fma.rn.f16x2") in ptx
    assert ("shf.r.wrap.b32" in ptx) == (pairs and bits == 3)  # the high words rotated into place


def _compile_rows_sm90(bits, act, sym, group, block_m, block_r, stages):
    from auto_quant.kernels import dequant_ptx as g
    from auto_quant.kernels import triton_gemv_rows as gr

    zero = 1 << (bits - 1) if sym else None
    const = dict(BITS=bits, GROUP=group, HAS_ZERO=not sym, HAS_BIAS=True, BLOCK_M=block_m, BLOCK_N=512,
                 BLOCK_R=block_r, SPLIT=True, EVEN_R=False, EVEN_N=False, DEQ=g.dequant_asm(bits, act, zero),
                 DEQ_CONS=g.dequant_constraints(bits, zero), DOT=g.dot_asm(bits, act), DOT_CONS=g.dot_constraints(bits),
                 ACT_FP16=act == "fp16", STAGES=stages)
    ints = ["M", "N", "K", "stride_xm", "stride_om", "rows_per_split"]
    return _compile_sm90(gr._gemv_rows_kernel, act, ints, const)


@pytest.mark.parametrize("bits,act,sym,group,block_m,block_r", [
    (4, "bf16", True, 128, 4, 2), (4, "fp16", False, 32, 8, 8), (2, "bf16", False, 64, 2, 4), (2, "fp16", True, -1, 16, 1),
])
def test_gemv_rows_compiles_for_sm90(bits, act, sym, group, block_m, block_r):
    ck = _compile_rows_sm90(bits, act, sym, 0 if group == -1 else group, block_m, block_r, 3)
    ptx = ck.asm["ptx"]
    assert ("fma.rn.bf16x2" if act == "bf16" else "fma.rn.f16x2") in ptx and "cp.async" in ptx

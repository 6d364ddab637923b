"""Shared by the format tests: a tiny Llama whose dims the GPTQ/AWQ/compressed-tensors kernels
accept (multiples of 128), edge-case weights, and the real-consumer subprocess runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
import transformers

VOCAB = 256


def tiny_llama(seed: int = 0, tie: bool = True, layers: int = 2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def force_edge_zeros(model, name: str = "model.layers.0.self_attn.q_proj", group: int = 32):
    """Row 0's first group all positive (asym zero 0), row 1's all negative (zero 2**b - 1)."""
    w = model.get_submodule(name).weight
    g = w.shape[1] if group == -1 else group
    w[0, :g] = w[0, :g].abs() + 1e-3
    w[1, :g] = -(w[1, :g].abs() + 1e-3)


def ids(n: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


# A consumer process: plain transformers (+ GPTQModel / compressed-tensors), never auto_quant.
CONSUMER = r"""
import json, sys, os, torch
from transformers import AutoModelForCausalLM
cases = json.load(open(sys.argv[1]))
results = {}
for case in cases:
    kw = {"dtype": getattr(torch, case["dtype"])}
    if case.get("ct_dequantize"):
        from transformers import CompressedTensorsConfig
        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    try:
        m = AutoModelForCausalLM.from_pretrained(case["dir"], **kw)
    except Exception as e:  # reported per case
        results[case["name"]] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        continue
    x = torch.load(case["ids"])
    out = {"classes": {}, "weights": {}}
    with torch.no_grad():
        out["logits"] = m(x).logits.float()
        for name in case["layers"]:
            mod = m.get_submodule(name)
            out["classes"][name] = type(mod).__module__ + "." + type(mod).__name__
            eye = torch.eye(case["in_features"][name], dtype=kw["dtype"])
            out["weights"][name] = mod(eye).float().t().contiguous()  # W [out, in] as the kernel computes it
    results[case["name"]] = out
results["_imported_auto_quant"] = "auto_quant" in sys.modules
torch.save(results, sys.argv[2])
"""


def run_consumers(cases: list[dict], workdir) -> dict:
    """Load every case in ONE fresh process (GPTQModel's import is paid once)."""
    spec = os.path.join(str(workdir), "cases.json")
    out = os.path.join(str(workdir), "results.pt")
    with open(spec, "w") as f:
        json.dump(cases, f)
    # TORCH_COMPILE_DISABLE: GPTQModel torch.compiles its CPU dequantizer per layer shape, which
    # costs minutes of C++ builds on a 2-core machine and changes no value
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "PYTHONPATH": "", "TORCH_COMPILE_DISABLE": "1"}
    # cwd outside the repository: its top-level kernels/ folder must not shadow the `kernels` package
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(CONSUMER), spec, out], capture_output=True, text=True,
                       env=env, timeout=900, cwd=str(workdir))
    assert r.returncode == 0, r.stderr[-4000:]
    return torch.load(out)

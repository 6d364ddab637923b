"""The low-bit weight types of the load-time API, as data.

Each :class:`QType` says how many bits a weight takes, what the format is, the default group
size, and which module serves it. Kinds:

* ``int``: integer codes with a scale and zero point per group (auto_quant's
  :class:`~auto_quant.quant.QuantSpec`); served by :class:`auto_quant.inference.qlinear.QuantLinear`
  and the backend registry.
* ``codebook``: NormalFloat / small-float grids (:mod:`auto_quant.quant.lowbit_formats`).
* ``ggml``: llama.cpp k-quant blocks (:mod:`auto_quant.transformers.ggml_quants`).
* ``float``: plain fp16 / bf16 weights.
* ``mix``: a llama.cpp file type (``gguf_q4k_s``/``gguf_q4k_m``): a per-tensor rule picking
  ``ggml`` types, with llama.cpp's fallbacks for rows that are not a multiple of 256.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from auto_quant.errors import ConfigError


@dataclass(frozen=True)
class QType:
    name: str
    kind: str  # "int" | "codebook" | "ggml" | "float" | "mix"
    bits: int  # bits of one code (storage of the weights themselves)
    bpw: float  # bits per weight including scales/zeros at the default group size
    group_size: int  # default; -1 = per output channel; 256 for k-quant super-blocks
    description: str
    sym: bool = True
    codebook: str | None = None
    ggml_type: str | None = None
    float_dtype: torch.dtype | None = None

    @property
    def is_low_bit(self) -> bool:
        return self.kind != "float"


def _int(name, bits, sym, bpw, desc):
    return QType(name, "int", bits, bpw, 32, desc, sym=sym)


def _cb(name, book, bits, gs, bpw, desc):
    return QType(name, "codebook", bits, bpw, gs, desc, codebook=book)


QTYPES: dict[str, QType] = {
    q.name: q
    for q in (
        _int("sym_int4", 4, True, 4.5, "4-bit symmetric integer, groups of 32 (= llama.cpp Q4_0)"),
        _int("asym_int4", 4, False, 4.625, "4-bit asymmetric integer, groups of 32 (≈ llama.cpp Q4_1, integer zero)"),
        _int("sym_int5", 5, True, 5.5, "5-bit symmetric integer, groups of 32 (= llama.cpp Q5_0)"),
        _int("asym_int5", 5, False, 5.625, "5-bit asymmetric integer, groups of 32 (≈ llama.cpp Q5_1, integer zero)"),
        _int("sym_int8", 8, True, 8.5, "8-bit symmetric integer, groups of 32 (≈ llama.cpp Q8_0, full range)"),
        _cb("nf3", "nf3", 3, 64, 3.25, "3-bit NormalFloat, absmax scale per 64"),
        _cb("nf4", "nf4", 4, 64, 4.25, "4-bit NormalFloat (QLoRA), absmax scale per 64"),
        _cb("fp4", "fp4_e2m1", 4, 32, 4.5, "4-bit float e2m1 (OCP MX FP4 grid), absmax scale per 32"),
        _cb("fp6", "fp6_e3m2", 6, 32, 6.5, "6-bit float e3m2 (OCP MX FP6 grid), absmax scale per 32"),
        _cb("fp8_e4m3", "fp8_e4m3", 8, -1, 8.0, "8-bit float e4m3fn, one scale per output channel"),
        _cb("fp8_e5m2", "fp8_e5m2", 8, -1, 8.0, "8-bit float e5m2, one scale per output channel"),
        _cb("iq4_nl", "iq4_nl", 4, 32, 4.5, "llama.cpp's IQ4_NL non-linear 4-bit grid, absmax scale per 32"),
        QType("fp16", "float", 16, 16.0, -1, "weights stored in float16", float_dtype=torch.float16),
        QType("bf16", "float", 16, 16.0, -1, "weights stored in bfloat16", float_dtype=torch.bfloat16),
        QType("q2_k", "ggml", 2, 2.625, 256, "llama.cpp Q2_K blocks (rows must be a multiple of 256)", sym=False, ggml_type="q2_k"),
        QType("iq2_xxs", "ggml", 2, 2.0625, 256, "llama.cpp IQ2_XXS: 8-weight groups on a 256-point E8 lattice grid", ggml_type="iq2_xxs"),
        QType("iq2_xs", "ggml", 2, 2.3125, 256, "llama.cpp IQ2_XS: 8-weight groups on a 512-point E8 lattice grid", ggml_type="iq2_xs"),
        QType("q4_k", "ggml", 4, 4.5, 256, "llama.cpp Q4_K blocks (rows must be a multiple of 256)", sym=False, ggml_type="q4_k"),
        QType("q5_k", "ggml", 5, 5.5, 256, "llama.cpp Q5_K blocks (rows must be a multiple of 256)", sym=False, ggml_type="q5_k"),
        QType("q6_k", "ggml", 6, 6.5625, 256, "llama.cpp Q6_K blocks (rows must be a multiple of 256)", ggml_type="q6_k"),
        QType("gguf_q4k_s", "mix", 4, 4.6, 256, "llama.cpp's Q4_K_S file type: Q4_K, Q5_K for the first attn_v / ffn_down, Q6_K output"),
        QType("gguf_q4k_m", "mix", 4, 4.9, 256, "llama.cpp's Q4_K_M file type: Q4_K, Q6_K for half of attn_v / ffn_down and the output"),
        QType("gguf_iq2_xxs", "mix", 2, 2.2, 256, "llama.cpp's IQ2_XXS file type: IQ2_XXS, Q2_K/Q4_K attn_v, Q2_K first ffn_down, Q5_K output"),
        QType("gguf_iq2_xs", "mix", 2, 2.4, 256, "llama.cpp's IQ2_XS file type: IQ2_XS, Q2_K/Q4_K attn_v, Q2_K first ffn_down, Q5_K output"),
    )
}

ALIASES = {"fp8": "fp8_e4m3", "int4": "sym_int4", "int8": "sym_int8", "q4_0": "sym_int4", "q5_0": "sym_int5"}

# Named by IPEX-LLM but refused here, with the reason.
REFUSED = {
    "gguf_iq1_s": "IQ1_S needs llama.cpp's ternary-lattice search with an importance matrix; quantize with llama.cpp's "
                  "llama-quantize, or use gguf_iq2_xxs",
    "iq1_s": "IQ1_S needs llama.cpp's ternary-lattice search with an importance matrix; quantize with llama.cpp's "
             "llama-quantize, or use iq2_xxs",
    "mixed_fp4": "mixed_fp4 is an IPEX-LLM heuristic; use fp4 with mixed_precision=True",
    "mixed_fp8": "mixed_fp8 is an IPEX-LLM heuristic; use fp8_e4m3 with mixed_precision=True",
    "woq_int4": "woq_int4 is an IPEX-LLM XPU kernel layout; use sym_int4",
    "torch_fp8": "use fp8_e4m3",
}


def supported_names() -> list[str]:
    return sorted(QTYPES) + sorted(ALIASES)


def resolve_qtype(name) -> QType:
    """The :class:`QType` called ``name`` (aliases accepted); a clear error for anything else."""
    if isinstance(name, QType):
        return name
    if not isinstance(name, str):
        raise ConfigError(f"low-bit type {name!r} must be a string; supported: {', '.join(supported_names())}")
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in QTYPES:
        return QTYPES[key]
    if key in REFUSED:
        raise ConfigError(f"load_in_low_bit={name!r} is not supported: {REFUSED[key]}. Supported: {', '.join(supported_names())}")
    raise ConfigError(f"unknown low-bit type {name!r}; supported: {', '.join(supported_names())}")


# ------------------------------------------------------------------------------------------
# llama.cpp file-type mixes (``llama_tensor_get_type`` for Q4_K_S / Q4_K_M), as data.
# ------------------------------------------------------------------------------------------

# HF module name suffix → GGUF tensor role
GGUF_ROLES = (
    (r"(self_attn|attention)\.(v_proj|value)$", "attn_v"),
    (r"(self_attn|attention)\.(k_proj|key)$", "attn_k"),
    (r"(self_attn|attention)\.(q_proj|query)$", "attn_q"),
    (r"(self_attn|attention)\.(o_proj|dense|out_proj)$", "attn_output"),
    (r"mlp\.(down_proj|fc2|c_proj)$", "ffn_down"),
    (r"mlp\.(up_proj|fc1|c_fc)$", "ffn_up"),
    (r"mlp\.gate_proj$", "ffn_gate"),
)

# llama.cpp: when a row length is not a multiple of 256 the k-quant falls back to a legacy type
KQUANT_FALLBACK = {"q4_k": "sym_int5", "q5_k": "asym_int5", "q6_k": "sym_int8",
                   "q2_k": "iq4_nl", "iq2_xxs": "iq4_nl", "iq2_xs": "iq4_nl"}


def gguf_role(name: str, is_output: bool = False) -> str | None:
    if is_output:
        return "output"
    for pat, role in GGUF_ROLES:
        if re.search(pat, name):
            return role
    return None


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_layer_type(mix: str, role: str | None, i_layer: int | None, n_layer: int, n_gqa: int = 1) -> str:
    """The ggml type llama.cpp gives a tensor under a file type (``gguf_q4k_s``, ``gguf_iq2_xxs``, ...)."""
    if mix.startswith("gguf_iq2"):
        if role == "output":
            return "q5_k"
        if role == "attn_v":
            return "q4_k" if n_gqa >= 4 else "q2_k"
        if role == "ffn_down" and i_layer is not None and i_layer < n_layer // 8:
            return "q2_k"
        return mix.removeprefix("gguf_")
    if role == "output":
        return "q6_k"
    if mix == "gguf_q4k_m" and role in ("attn_v", "ffn_down") and i_layer is not None:
        return "q6_k" if _use_more_bits(i_layer, n_layer) else "q4_k"
    if mix == "gguf_q4k_s" and i_layer is not None:
        if role == "attn_v" and i_layer < 4:
            return "q5_k"
        if role == "ffn_down" and i_layer < n_layer // 8:
            return "q5_k"
    return "q4_k"


def gguf_tensor_name(name: str, is_output: bool = False) -> str | None:
    """``model.layers.3.self_attn.q_proj`` → ``blk.3.attn_q.weight`` (for imatrix lookups)."""
    if is_output:
        return "output.weight"
    m = re.search(r"\.(\d+)\.", name)
    role = gguf_role(name)
    if m is None or role is None:
        return None
    return f"blk.{m.group(1)}.{role}.weight"


__all__ = [
    "ALIASES",
    "GGUF_ROLES",
    "KQUANT_FALLBACK",
    "QTYPES",
    "QType",
    "REFUSED",
    "gguf_role",
    "gguf_tensor_name",
    "mix_layer_type",
    "resolve_qtype",
    "supported_names",
]

"""GGML tensor types and llama.cpp's file-type mixes, as data.

A *tensor type* (``q4_0``, ``q4_k``, ``f16`` …) is how one tensor is stored; a *file type*
(``q4_k_m``, ``q3_k_s`` …) is llama.cpp's recipe assigning tensor types per tensor (see
:mod:`auto_quant.export.gguf.plan`). Every quantized tensor type has exactly one
:class:`~auto_quant.quant.QuantSpec` whose grid it stores without loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch

from auto_quant.quant import QuantSpec

QT = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class TensorType:
    name: str  # lower-case, e.g. "q4_k"
    qtype: gguf.GGMLQuantizationType
    spec: QuantSpec | None  # None: a float type
    fallback: str | None = None  # what llama.cpp uses when a row does not hold whole blocks

    @property
    def block_size(self) -> int:
        return gguf.GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return gguf.GGML_QUANT_SIZES[self.qtype][1]

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size

    def fits(self, row_length: int) -> bool:
        return row_length % self.block_size == 0


def _spec(bits, gs, sym, fmt="int"):
    return QuantSpec(bits=bits, group_size=gs, sym=sym, scale_dtype=torch.float16, fmt=fmt)


TENSOR_TYPES: dict[str, TensorType] = {
    t.name: t
    for t in (
        TensorType("f32", QT.F32, None),
        TensorType("f16", QT.F16, None),
        TensorType("bf16", QT.BF16, None),
        TensorType("q4_0", QT.Q4_0, _spec(4, 32, True), "f16"),
        TensorType("q4_1", QT.Q4_1, _spec(4, 32, False, "q4_1"), "f16"),
        TensorType("q5_0", QT.Q5_0, _spec(5, 32, True), "f16"),
        TensorType("q5_1", QT.Q5_1, _spec(5, 32, False, "q5_1"), "f16"),
        TensorType("q8_0", QT.Q8_0, _spec(8, 32, True, "q8_0"), "f16"),
        TensorType("q2_k", QT.Q2_K, _spec(2, 16, False, "q2_k"), "q4_0"),
        TensorType("q3_k", QT.Q3_K, _spec(3, 16, True, "q3_k"), "q4_0"),
        TensorType("q4_k", QT.Q4_K, _spec(4, 32, False, "q4_k"), "q5_0"),
        TensorType("q5_k", QT.Q5_K, _spec(5, 32, False, "q5_k"), "q5_1"),
        TensorType("q6_k", QT.Q6_K, _spec(6, 16, True, "q6_k"), "q8_0"),
    )
}
QUANTIZED_TYPES = tuple(n for n, t in TENSOR_TYPES.items() if t.spec is not None)
FLOAT_TYPES = ("f32", "f16", "bf16")


def fit_type(name: str, row_length: int) -> tuple[str, str | None]:
    """The type a row of ``row_length`` can hold: ``name`` or its fallback chain (llama.cpp's rules).

    Returns ``(type, note)``; ``note`` says why a fallback was taken (None when ``name`` fits).
    """
    t = TENSOR_TYPES[name]
    if t.fits(row_length):
        return name, None
    chosen = t.fallback or "f16"
    if not TENSOR_TYPES[chosen].fits(row_length):
        chosen = "f16"
    return chosen, f"row length {row_length} is not a multiple of {t.block_size} ({name}) -> {chosen}"


def tensor_type_of_spec(spec: QuantSpec | None) -> str | None:
    """The GGML type that stores ``spec``'s grid exactly, or None when no type does."""
    if spec is None:
        return "f16"
    if spec.fmt != "int":
        return spec.fmt
    if spec.group_size != 32 or spec.scale_dtype == torch.float32:
        return None
    if spec.bits == 4:
        return "q4_0" if spec.sym else "q4_1"
    if spec.bits == 5:
        return "q5_0" if spec.sym else "q5_1"
    return None


@dataclass(frozen=True)
class FileType:
    """One of llama.cpp's ``--type`` choices (``llama_ftype``)."""

    name: str
    base: str  # the default tensor type
    ftype: gguf.LlamaFileType

    @property
    def is_float(self) -> bool:
        return self.base in FLOAT_TYPES


LFT = gguf.LlamaFileType
FILE_TYPES: dict[str, FileType] = {
    f.name: f
    for f in (
        FileType("f32", "f32", LFT.ALL_F32),
        FileType("f16", "f16", LFT.MOSTLY_F16),
        FileType("bf16", "bf16", LFT.MOSTLY_BF16),
        FileType("q4_0", "q4_0", LFT.MOSTLY_Q4_0),
        FileType("q4_1", "q4_1", LFT.MOSTLY_Q4_1),
        FileType("q5_0", "q5_0", LFT.MOSTLY_Q5_0),
        FileType("q5_1", "q5_1", LFT.MOSTLY_Q5_1),
        FileType("q8_0", "q8_0", LFT.MOSTLY_Q8_0),
        FileType("q2_k", "q2_k", LFT.MOSTLY_Q2_K),
        FileType("q2_k_s", "q2_k", LFT.MOSTLY_Q2_K_S),
        FileType("q3_k", "q3_k", LFT.MOSTLY_Q3_K_M),  # llama.cpp's "Q3_K" alias is Q3_K_M
        FileType("q3_k_s", "q3_k", LFT.MOSTLY_Q3_K_S),
        FileType("q3_k_m", "q3_k", LFT.MOSTLY_Q3_K_M),
        FileType("q3_k_l", "q3_k", LFT.MOSTLY_Q3_K_L),
        FileType("q4_k", "q4_k", LFT.MOSTLY_Q4_K_M),  # llama.cpp's "Q4_K" alias is Q4_K_M
        FileType("q4_k_s", "q4_k", LFT.MOSTLY_Q4_K_S),
        FileType("q4_k_m", "q4_k", LFT.MOSTLY_Q4_K_M),
        FileType("q5_k", "q5_k", LFT.MOSTLY_Q5_K_M),  # llama.cpp's "Q5_K" alias is Q5_K_M
        FileType("q5_k_s", "q5_k", LFT.MOSTLY_Q5_K_S),
        FileType("q5_k_m", "q5_k", LFT.MOSTLY_Q5_K_M),
        FileType("q6_k", "q6_k", LFT.MOSTLY_Q6_K),
    )
}


def file_type(name: str) -> FileType:
    from auto_quant.errors import FormatNotAvailableError

    key = name.lower().removeprefix("gguf:")
    if key not in FILE_TYPES:
        raise FormatNotAvailableError(
            f"GGUF type {name!r} is not available; choose one of {', '.join('gguf:' + n for n in FILE_TYPES)}"
        )
    return FILE_TYPES[key]

"""QuantSpec: what one weight tensor is quantized to."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from auto_quant.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
_SCALE_DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def parse_scale_dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value in _SCALE_DTYPES.values():
            return value
    elif isinstance(value, str):
        key = value.lower().removeprefix("torch.")
        if key in _SCALE_DTYPES:
            return _SCALE_DTYPES[key]
    raise ConfigError(f"scale_dtype={value!r} is not supported; use one of 'fp16', 'bf16', 'fp32'")


def scale_dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


@dataclass(frozen=True)
class QuantSpec:
    """Integer weight quantization of one tensor.

    Contract (shared by every exporter through ``auto_quant.export.packing``):
    codes are unsigned integers in ``[0, 2**bits - 1]``; ``w ≈ (code - zero) * scale``.
    Asymmetric: ``zero`` is an integer in ``[0, 2**bits - 1]`` per group.
    Symmetric (full range, as auto-round >= 0.4): ``zero == 2**(bits-1)`` and ``scale`` is
    signed, so the dominant side of each group lands on ``-2**(bits-1)``.
    ``group_size == -1`` means one group per output channel; an ``in_features`` that is not a
    multiple of the group size gets a shorter (zero-padded) last group.

    ``fmt`` picks the grid: ``"int"`` (the contract above) or one of llama.cpp's native grids
    (``q2_k`` … ``q6_k``, ``q8_0``; see :mod:`auto_quant.quant.kquant`), which fix bits, group
    size and sym and are what the GGUF exporter writes exactly.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    scale_dtype: torch.dtype = torch.float16
    fmt: str = "int"

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise ConfigError(
                f"bits={self.bits!r} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))} "
                "(or 16 in layer_config to keep a layer in 16 bits)"
            )
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or (
            self.group_size < -1 or self.group_size == 0
        ):
            raise ConfigError(
                f"group_size={self.group_size!r} is invalid; use a positive integer (e.g. 32, 64, 128) "
                "or -1 for one group per output channel"
            )
        if not isinstance(self.sym, bool):
            raise ConfigError(f"sym={self.sym!r} must be True or False")
        object.__setattr__(self, "scale_dtype", parse_scale_dtype(self.scale_dtype))
        if self.fmt != "int":
            from auto_quant.quant.kquant import check_spec

            check_spec(self.bits, self.group_size, self.sym, self.fmt)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def sym_zero(self) -> int:
        return 2 ** (self.bits - 1)

    def groups(self, in_features: int) -> int:
        gs = self.effective_group_size(in_features)
        return -(-in_features // gs)

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def to_dict(self) -> dict:
        out = {
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "scale_dtype": scale_dtype_name(self.scale_dtype),
        }
        if self.fmt != "int":
            out["fmt"] = self.fmt
        return out

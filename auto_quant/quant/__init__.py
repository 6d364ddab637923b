"""Pure quantization primitives: no module state, no device juggling."""

from auto_quant.quant.spec import QuantSpec, SUPPORTED_BITS
from auto_quant.quant.integer import (
    QuantizedWeight,
    dequantize,
    fake_quantize,
    fake_quantize_grouped,
    group_weight,
    quantize_weight,
    qparams_from_range,
    round_ste,
    ungroup_weight,
    weight_range,
)

__all__ = [
    "QuantSpec",
    "SUPPORTED_BITS",
    "QuantizedWeight",
    "dequantize",
    "fake_quantize",
    "fake_quantize_grouped",
    "group_weight",
    "quantize_weight",
    "qparams_from_range",
    "round_ste",
    "ungroup_weight",
    "weight_range",
]

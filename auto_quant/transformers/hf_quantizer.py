"""Quantize-on-load inside ``transformers``' own ``from_pretrained``.

transformers builds the model on the meta device, calls the quantizer's
``_process_model_before_weight_loading`` (we swap the planned layers for
:class:`~auto_quant.transformers.convert.PendingLayer`), streams the checkpoint tensor by tensor
(each pending layer encodes its weight as it arrives), then calls
``_process_model_after_weight_loading`` (we put the final low-bit modules in place).

The quantizer is registered with transformers' public ``register_quantizer`` under the method
name ``auto_quant_lowbit`` the first time the load-time API runs: a new key, so no existing
loading path changes.
"""

from __future__ import annotations

import logging

from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from auto_quant.transformers.convert import (
    Importance,
    LowBitSettings,
    finish_pending,
    install_pending,
    plan_model,
    quantize_fused_experts,
)

log = logging.getLogger(__name__)

QUANT_METHOD = "auto_quant_lowbit"


class LowBitLoadConfig(QuantizationConfigMixin):
    """Carries the resolved settings (and the imatrix) into transformers' loading."""

    def __init__(self, settings: LowBitSettings | None = None, importance: dict | None = None, optimize_model: bool = True,
                 **kwargs):
        self.quant_method = QUANT_METHOD
        self.settings = settings
        self.importance = importance
        self.optimize_model = optimize_model

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, **(self.settings.to_dict() if self.settings else {})}

    def to_json_string(self, use_diff: bool = True) -> str:
        import json

        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_diff_dict(self) -> dict:
        return self.to_dict()


class LowBitHfQuantizer(HfQuantizer):
    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.plan = None
        self.late_layers: list[str] = []

    def validate_environment(self, *args, **kwargs):
        return

    def _process_model_before_weight_loading(self, model, **kwargs):
        qc = self.quantization_config
        if qc.settings is None:
            raise ValueError("auto_quant_lowbit loading needs settings; use auto_quant.transformers.AutoModelForCausalLM")
        self.plan = plan_model(model, qc.settings)
        install_pending(model, self.plan, Importance(qc.importance), qc.settings)
        log.info("auto_quant: quantizing while loading: %s", self.plan.summary())
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        self.late_layers = finish_pending(model, self.plan)
        if self.late_layers:
            log.info("auto_quant: %d layers were encoded after loading (their weight was not assigned while loading)",
                     len(self.late_layers))
        self.expert_layers = quantize_fused_experts(model, self.quantization_config.settings,
                                                    self.quantization_config.importance)
        if self.quantization_config.optimize_model:
            from auto_quant.inference.backends import attach_backends

            attach_backends(model)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def is_serializable(self, *args, **kwargs):
        return False

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        """transformers' ``generate`` compiles a static-cache decode on a GPU only when the quantizer says so. The
        integer layers are ``QuantLinear`` (their backends trace, docs/loading.md) and the float, codebook and
        k-quant layers dequantize with torch ops (tests/test_lowbit.py)."""
        return True


def ensure_registered() -> None:
    """Register the config and quantizer with transformers (idempotent; adds a new method name only)."""
    from transformers.quantizers import auto as hf_auto

    if QUANT_METHOD not in hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        hf_auto.register_quantization_config(QUANT_METHOD)(LowBitLoadConfig)
    if QUANT_METHOD not in hf_auto.AUTO_QUANTIZER_MAPPING:
        hf_auto.register_quantizer(QUANT_METHOD)(LowBitHfQuantizer)


__all__ = ["LowBitHfQuantizer", "LowBitLoadConfig", "QUANT_METHOD", "ensure_registered"]

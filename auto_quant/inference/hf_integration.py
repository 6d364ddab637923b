"""How ``AutoModelForCausalLM.from_pretrained(quantized_dir)`` reaches auto_quant.

transformers maps ``quant_method: "auto-round"`` to its own quantizer, which requires Intel's
``auto_round`` package. ``install()`` points that entry (and ``gptq`` / ``awq`` for
checkpoints when their own stacks are not installed) at auto_quant's quantizer. It runs once
when ``auto_quant`` is imported; ``uninstall()`` restores transformers' own entries. It is
the only process-wide change auto_quant makes, and it is documented in docs/loading.md.
"""

from __future__ import annotations

import importlib.util
import logging

from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import AutoRoundConfig as _HfAutoRoundConfig

log = logging.getLogger(__name__)


class AutoRoundConfig(_HfAutoRoundConfig):
    """Loading options for auto_round (and GPTQ/AWQ) checkpoints in auto_quant.

    ``backend``: ``"auto"`` picks per layer from the backend registry; a name forces one. ``tuning_cache`` (a
    keyword): where the Triton backend keeps the kernel picks it timed, so the next process on the same GPU skips
    the timing (``"auto"``, the default: ``~/.cache/auto_quant/tuner``; None: in memory only; else a folder).
    """

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = True, backend: str = "auto", **kwargs):
        super().__init__(bits=bits, group_size=group_size, sym=sym, backend=backend, **kwargs)

    def get_loading_attributes(self) -> dict:
        """What ``from_pretrained(..., quantization_config=AutoRoundConfig(...))`` sets on the checkpoint's own
        config: the backend and, when given, the tuning cache."""
        attrs = super().get_loading_attributes()
        if hasattr(self, "tuning_cache"):
            attrs["tuning_cache"] = self.tuning_cache
        return attrs


class AutoQuantHfQuantizer(HfQuantizer):
    """transformers' quantizer hook for pre-quantized integer checkpoints."""

    requires_calibration = True

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs):
        self.device_map = kwargs.get("device_map")

    def update_dtype(self, dtype):
        return dtype

    def _config_dict(self) -> dict:
        qc = self.quantization_config
        return qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)

    def _process_model_before_weight_loading(self, model, **kwargs):
        from auto_quant.inference.checkpoint import convert_for_loading

        if not self.pre_quantized:
            raise ValueError("auto_quant loads pre-quantized checkpoints only; use auto_quant.AutoRound to quantize")
        skip = kwargs.get("keep_in_fp32_modules") or []
        self._converted = convert_for_loading(model, self._config_dict(), modules_to_not_convert=None)
        del skip

    def _process_model_after_weight_loading(self, model, **kwargs):
        from auto_quant.inference.backends import attach_backends

        backend = getattr(self.quantization_config, "backend", "auto") or "auto"
        attach_backends(model, backend=backend, tuning_cache=getattr(self.quantization_config, "tuning_cache", "auto"))
        return model

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        """transformers' ``generate`` compiles the forward of a model with a static cache on a GPU only when its
        quantizer says so. Every backend's layer traces: the ``torch`` and ``torch_cpu_int4`` paths are aten ops,
        ``triton`` and ``cpu_gemv`` are custom ops (tests/test_compile_gpu.py, tests/test_cpu_gemv.py)."""
        return True

    def is_serializable(self, safe_serialization=None):
        return True


_saved: dict[str, tuple] = {}


def install() -> None:
    """Route ``auto-round`` checkpoints (and GPTQ/AWQ ones when their own loaders are absent) to auto_quant."""
    from transformers.quantizers import auto as hf_auto

    routes = {"auto-round": AutoRoundConfig}
    for method, pkg in (("gptq", "gptqmodel"), ("awq", "gptqmodel")):
        if importlib.util.find_spec(pkg) is None:
            routes[method] = None  # keep transformers' config class, swap the quantizer only
    for method, cfg_cls in routes.items():
        if method in _saved:
            continue
        _saved[method] = (
            hf_auto.AUTO_QUANTIZER_MAPPING.get(method),
            hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(method),
        )
        hf_auto.AUTO_QUANTIZER_MAPPING[method] = AutoQuantHfQuantizer
        if cfg_cls is not None:
            hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[method] = cfg_cls


def uninstall() -> None:
    from transformers.quantizers import auto as hf_auto

    for method, (q, c) in list(_saved.items()):
        if q is not None:
            hf_auto.AUTO_QUANTIZER_MAPPING[method] = q
        if c is not None:
            hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[method] = c
        del _saved[method]

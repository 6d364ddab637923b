"""auto_quant: calibration-based LLM weight quantization.

Importing auto_quant routes transformers' ``auto-round`` checkpoints to auto_quant's loader
(see :mod:`auto_quant.inference.hf_integration`).
"""

__version__ = "0.1.0"

from auto_quant.errors import (  # noqa: E402
    AutoQuantError,
    BackendError,
    CalibrationError,
    CheckpointError,
    ConfigError,
    DeviceError,
    ExportError,
    FormatNotAvailableError,
    LayerConfigError,
    ModelLoadError,
)
from auto_quant.inference.hf_integration import AutoRoundConfig, install as _install_hf_hook  # noqa: E402
from auto_quant.autoround import AutoRound  # noqa: E402

_install_hf_hook()

__all__ = [
    "AutoRound",
    "AutoRoundConfig",
    "AutoQuantError",
    "BackendError",
    "CalibrationError",
    "CheckpointError",
    "ConfigError",
    "DeviceError",
    "ExportError",
    "FormatNotAvailableError",
    "LayerConfigError",
    "ModelLoadError",
    "__version__",
]

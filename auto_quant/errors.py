"""Typed errors. Every error names the problem and, where there is one, the fix."""


class AutoQuantError(Exception):
    """Base class of every error auto_quant raises on purpose."""


class ConfigError(AutoQuantError, ValueError):
    """A configuration value is invalid (names the field and the accepted values)."""


class ModelLoadError(AutoQuantError):
    """A model could not be found or loaded."""


class LayerConfigError(ConfigError):
    """A layer_config entry is invalid or matches no layer."""


class CalibrationError(AutoQuantError):
    """Calibration data is missing, empty or malformed."""


class ExportError(AutoQuantError):
    """A checkpoint could not be written, or the format cannot hold the configuration."""


class FormatNotAvailableError(ExportError):
    """The requested export format does not exist or is not available in this build."""


class CheckpointError(AutoQuantError):
    """A quantized checkpoint on disk is malformed or from an unsupported producer."""


class BackendError(AutoQuantError):
    """No inference backend can serve a layer."""


class DeviceError(AutoQuantError):
    """A requested device is not available on this machine."""


class CalibrationSpecError(CalibrationError, ValueError):
    """A calibration dataset spec string is malformed; ``position`` is the 0-based offending character."""

    def __init__(self, message: str, spec: str = "", position: int = 0):
        self.message = message
        self.spec = spec
        self.position = position
        text = f"calibration spec, character {position}: {message}"
        if spec:
            shown = "".join(c if c.isprintable() else " " for c in spec)  # keeps the caret under its character
            text += f"\n  {shown}\n  {' ' * position}^"
        super().__init__(text)


class GGUFFileError(CheckpointError, ModelLoadError):
    """A GGUF file is truncated, corrupted or not a GGUF file at all (names the file and what is wrong)."""


class PlacementError(DeviceError, ConfigError):
    """The tuning does not fit the given devices (names what would fit), or a device_map is inconsistent."""

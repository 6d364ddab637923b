"""Calibration data: a spec language, a registry of sources, and assembly into fixed-length samples.

See docs/calibration.md. Entry point: :func:`build_calibration`.
"""

from auto_quant.calib.assemble import CalibrationSet, SourceSummary, build_calibration, default_source
from auto_quant.calib.spec import DatasetSpec, SourceSpec, format_dataset_spec, parse_dataset_spec

__all__ = ["CalibrationSet", "DatasetSpec", "SourceSpec", "SourceSummary", "build_calibration", "default_source",
           "format_dataset_spec", "parse_dataset_spec"]

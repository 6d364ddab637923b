"""Calibration data: sources of text or tokens, assembled into fixed-length token samples."""

from auto_quant.calib.assemble import CalibrationSet, build_calibration

__all__ = ["CalibrationSet", "build_calibration"]

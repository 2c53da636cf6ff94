"""Calibration observers (VoltageHook) and current scalers (VoltageScaler) for ANN-to-SNN conversion."""

from ann2snn_calib.__about__ import __version__

__all__ = ["__version__"]

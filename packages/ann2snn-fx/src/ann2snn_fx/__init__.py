"""torch.fx converters: ReLU -> IF neurons with calibration, and transformers -> TD operators."""

from ann2snn_fx.__about__ import __version__

__all__ = ["__version__"]

"""Temporal-difference (TD) operators that make transformer blocks spiking-equivalent."""

from ann2snn_ops.__about__ import __version__

__all__ = ["__version__"]

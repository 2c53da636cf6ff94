"""Resumable, verified downloads for ANN-to-SNN workflows."""

from ann2snn_utils.__about__ import __version__

__all__ = ["__version__"]

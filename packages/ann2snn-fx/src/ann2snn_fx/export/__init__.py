"""NIR export and import (the ``ann2snn-fx[nir]`` extra); ``nir`` is imported only when called."""

from ann2snn_fx.export._from_nir import from_nir
from ann2snn_fx.export._lower import ExportError
from ann2snn_fx.export._nir import METADATA, to_nir, write_nir

__all__ = ["METADATA", "ExportError", "from_nir", "to_nir", "write_nir"]

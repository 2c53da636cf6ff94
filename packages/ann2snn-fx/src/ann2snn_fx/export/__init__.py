"""NIR export and import (the ``ann2snn-fx[nir]`` extra).

``nir`` is imported only when a function is called; importing this package needs numpy (a dependency of
nir), and without it the ImportError names the extra.
"""

try:
    import numpy  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised where numpy is absent
    raise ImportError("ann2snn_fx.export needs numpy and nir: pip install 'ann2snn-fx[nir]'.") from error

from ann2snn_fx.export._from_nir import NIRIFNode, SumPool2d, from_nir
from ann2snn_fx.export._lower import ExportError
from ann2snn_fx.export._nir import METADATA, to_nir, write_nir

__all__ = ["METADATA", "ExportError", "NIRIFNode", "SumPool2d", "from_nir", "to_nir", "write_nir"]

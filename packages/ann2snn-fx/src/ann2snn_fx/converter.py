"""Compatibility shim: this code now lives in :mod:`ann2snn_fx.relu.converter`.

``import ann2snn_fx.converter`` and ``from ann2snn_fx.converter import ...`` keep working: this module replaces
itself in ``sys.modules`` by :mod:`ann2snn_fx.relu.converter`, so every name (public or private) is the same object.
New code should import from :mod:`ann2snn_fx.relu.converter` or from :mod:`ann2snn_fx`.
"""

import sys

from ann2snn_fx.relu import converter as _moved
from ann2snn_fx.relu.converter import *  # noqa: F403

__all__ = _moved.__all__

sys.modules[__name__] = _moved

"""Compatibility shim: this code now lives in :mod:`ann2snn_fx.snn.runner`.

``import ann2snn_fx.runner`` and ``from ann2snn_fx.runner import ...`` keep working: this module replaces
itself in ``sys.modules`` by :mod:`ann2snn_fx.snn.runner`, so every name (public or private) is the same object.
New code should import from :mod:`ann2snn_fx.snn.runner` or from :mod:`ann2snn_fx`.
"""

import sys

from ann2snn_fx.snn import runner as _moved
from ann2snn_fx.snn.runner import *  # noqa: F403

__all__ = _moved.__all__

sys.modules[__name__] = _moved

"""Compatibility shim: this code now lives in :mod:`ann2snn_fx.relu.factories`.

``import ann2snn_fx.factories`` and ``from ann2snn_fx.factories import ...`` keep working: this module replaces
itself in ``sys.modules`` by :mod:`ann2snn_fx.relu.factories`, so every name (public or private) is the same object.
New code should import from :mod:`ann2snn_fx.relu.factories` or from :mod:`ann2snn_fx`.
"""

import sys

from ann2snn_fx.relu import factories as _moved
from ann2snn_fx.relu.factories import *  # noqa: F403

__all__ = _moved.__all__

sys.modules[__name__] = _moved

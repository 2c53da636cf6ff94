"""Compatibility shim: this code now lives in :mod:`ann2snn_fx.relu.thresholds`.

``import ann2snn_fx.threshold`` and ``from ann2snn_fx.threshold import ...`` keep working: this module replaces
itself in ``sys.modules`` by :mod:`ann2snn_fx.relu.thresholds`, so every name (public or private) is the same object.
New code should import from :mod:`ann2snn_fx.relu.thresholds` or from :mod:`ann2snn_fx`.
"""

import sys

from ann2snn_fx.relu import thresholds as _moved
from ann2snn_fx.relu.thresholds import *  # noqa: F403

__all__ = _moved.__all__

sys.modules[__name__] = _moved

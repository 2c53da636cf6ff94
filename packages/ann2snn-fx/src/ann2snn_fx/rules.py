"""Compatibility shim: this code now lives in :mod:`ann2snn_fx.relu.rules`.

``import ann2snn_fx.rules`` and ``from ann2snn_fx.rules import ...`` keep working: this module replaces
itself in ``sys.modules`` by :mod:`ann2snn_fx.relu.rules`, so every name (public or private) is the same object.
New code should import from :mod:`ann2snn_fx.relu.rules` or from :mod:`ann2snn_fx`.
"""

import sys

from ann2snn_fx.relu import rules as _moved
from ann2snn_fx.relu.rules import *  # noqa: F403

__all__ = _moved.__all__

sys.modules[__name__] = _moved

"""Compatibility shim: this code now lives in :mod:`ann2snn_fx.snn.neurons`.

``import ann2snn_fx.neuron`` and ``from ann2snn_fx.neuron import ...`` keep working: this module replaces
itself in ``sys.modules`` by :mod:`ann2snn_fx.snn.neurons`, so every name (public or private) is the same object.
New code should import from :mod:`ann2snn_fx.snn.neurons` or from :mod:`ann2snn_fx`.
"""

import sys

from ann2snn_fx.snn import neurons as _moved
from ann2snn_fx.snn.neurons import *  # noqa: F403

__all__ = _moved.__all__

sys.modules[__name__] = _moved

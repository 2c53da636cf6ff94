"""The TD fx pass's dispatch table: node target -> handler, one module per op family.

Modelled on torch.ao's pattern -> handler registries: each family module (``shapes``, ``constants``,
``linear``, ``norms``, ``pointwise``, ``softmax``, ``products``) exposes ``HANDLERS``, a dict from a
``call_function`` target (a callable) or a ``call_method`` name (a str) to a function
``handler(state, node)`` that classifies ``node`` in ``state.kinds``, rewrites it into TD operators, or
records an issue. :data:`HANDLERS` merges them; a key claimed by two families is an error at import.
``attention`` (SDPA calls) and ``modules`` (``call_module`` nodes) are whole-graph steps, not table entries.

To add an op: write ``handler(state, node)`` in the family's module (or a new module copied from
``softmax.py``) and add its targets to that module's ``HANDLERS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ann2snn_fx.td.handlers import constants, linear, norms, pointwise, products, shapes, softmax
from ann2snn_fx.td.handlers._types import Handler

__all__ = ["HANDLERS", "Handler", "merge"]


def merge(*tables: Mapping[Any, Handler]) -> dict[Any, Handler]:
    """One table from several; raises ``ValueError`` naming a key that two tables claim."""
    merged: dict[Any, Handler] = {}
    for table in tables:
        for key, handler in table.items():
            if key in merged:
                raise ValueError(f"TD handler for {key!r} registered twice.")
            merged[key] = handler
    return merged


HANDLERS: dict[Any, Handler] = merge(
    shapes.HANDLERS,
    constants.HANDLERS,
    linear.HANDLERS,
    norms.HANDLERS,
    pointwise.HANDLERS,
    softmax.HANDLERS,
    products.HANDLERS,
)

"""Softmax calls: ``F.softmax`` / ``torch.softmax`` / ``Tensor.softmax`` -> :class:`ann2snn_ops.TDSoftmax`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from ann2snn_fx.td.build import read_arg, shift_dim
from ann2snn_fx.td.handlers._types import table
from ann2snn_fx.td.state import Kind, PassState
from ann2snn_ops import TDSoftmax

__all__ = ["HANDLERS"]


def softmax(state: PassState, node: fx.Node) -> None:
    """A literal int dim (shifted past the time axis) and an optional dtype (a cast before)."""
    args, kwargs = node.args, dict(node.kwargs)
    x = args[0] if args else None
    dim = read_arg(args, kwargs, 1, "dim", None)
    dtype = kwargs.get("dtype", read_arg(args, kwargs, 3 if node.target is F.softmax else 2, "dtype", None))
    if not isinstance(dim, int) or not state.is_time(x):
        state.issue(node, f"softmax with dim={dim!r} cannot be converted (needs a literal int dim)")
        return
    source: Any = x
    if dtype is not None:
        with state.graph.inserting_before(node):
            source = state.graph.call_method("to", (x, dtype))
        state.kinds[source] = Kind.TIME
    state.swap(node, state.describe(node), "td_softmax", TDSoftmax(dim=shift_dim(dim)), [source])


HANDLERS = table(({F.softmax, torch.softmax, "softmax"}, softmax))

"""Linear-like calls: ``F.linear`` keeps its matmul and adds its bias at t = 0 only (as TDLinear does)."""

from __future__ import annotations

import operator

import torch.nn.functional as F
from torch import fx

from ann2snn_fx.td.build import read_arg
from ann2snn_fx.td.handlers._types import table
from ann2snn_fx.td.state import Kind, PassState

__all__ = ["HANDLERS"]


def linear(state: PassState, node: fx.Node) -> None:
    """``F.linear(x, W, b)`` -> ``F.linear(x, W) + td_impulse(b)``; a time-varying weight/bias is an issue."""
    args, kwargs = node.args, dict(node.kwargs)
    x = args[0]
    weight = read_arg(args, kwargs, 1, "weight", None)
    bias = read_arg(args, kwargs, 2, "bias", None)
    if not state.is_time(x) or state.kind(weight) is not Kind.CONST or state.kind(bias) is not Kind.CONST:
        state.issue(node, "F.linear with a time-varying weight or bias is not converted")
        return
    if bias is None:
        return
    graph = state.graph
    with graph.inserting_before(node):
        no_bias = graph.call_function(F.linear, args=(x, weight))
    state.kinds[no_bias] = Kind.TIME
    with graph.inserting_after(node):
        total = graph.call_function(operator.add, args=(no_bias, bias))
    node.replace_all_uses_with(total)
    graph.erase_node(node)
    state.kinds[total] = Kind.TIME
    total.args = (no_bias, state.impulse(total, bias, no_bias))
    state.converted(total, "call_function F.linear", "bias added at t = 0 only (as TDLinear does)")


HANDLERS = table(({F.linear}, linear))

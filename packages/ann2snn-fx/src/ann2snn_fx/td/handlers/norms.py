"""Norm calls: ``F.layer_norm`` / ``F.rms_norm`` (norm subclasses traced through) -> TD normalisation."""

from __future__ import annotations

import operator

import torch.nn.functional as F
from torch import fx

from ann2snn_fx.td.build import read_arg
from ann2snn_fx.td.handlers._types import table
from ann2snn_fx.td.state import BoundPointwise, Kind, PassState, fn_name, leaves
from ann2snn_ops import TDFunction

__all__ = ["HANDLERS"]


def norm(state: PassState, node: fx.Node) -> None:
    """The normalisation as a TDFunction; the affine part outside (weight multiplied, bias at t = 0)."""
    args, kwargs = node.args, dict(node.kwargs)
    layer = node.target is F.layer_norm
    x = args[0]
    shape = read_arg(args, kwargs, 1, "normalized_shape", None)
    weight = read_arg(args, kwargs, 2, "weight", None)
    bias = read_arg(args, kwargs, 3, "bias", None) if layer else None
    eps = read_arg(args, kwargs, 4 if layer else 3, "eps", 1e-5 if layer else None)
    literal = not any(isinstance(v, fx.Node) for v in leaves([shape, eps]))
    if not state.is_time(x) or not literal or state.kind([weight, bias]) is not Kind.CONST:
        state.issue(node, "normalisation with non-literal shape/eps or time-varying affine parameters")
        return
    function = BoundPointwise(
        F.layer_norm if layer else F.rms_norm,
        (shape, None, None, eps) if layer else (shape, None, eps),
        {},
    )
    name = state.add_root_module(
        "td_function", TDFunction(function, name="TDLayerNorm" if layer else "TDRMSNorm")
    )
    graph = state.graph
    with graph.inserting_before(node):
        out: fx.Node = graph.call_module(name, args=(x,))
        state.kinds[out] = Kind.TIME
        if weight is not None:
            out = graph.call_function(operator.mul, args=(out, weight))
            state.kinds[out] = Kind.TIME
        if bias is not None:
            add = graph.call_function(operator.add, args=(out, bias))
            add.args = (out, state.impulse(add, bias, out))
            out = add
            state.kinds[out] = Kind.TIME
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    state.converted(
        out, f"call_function {fn_name(node.target)}", f"-> {name} (affine part outside, bias at t = 0)"
    )


HANDLERS = table(({F.layer_norm, F.rms_norm}, norm))

"""Max pooling in the ReLU -> IF path, and the review of what the converter leaves on spike trains.

Two stages of :class:`~ann2snn_fx.relu.converter.Converter`:

- :func:`commute_max_pools` (before the hooks): ``activation -> max pool`` becomes ``max pool -> activation``
  for ReLUs and clipped ReLUs (a monotone non-decreasing function commutes with a max, with any padding,
  dilation or ``ceil_mode``: the pool pads with ``-inf``), so the neuron integrates the pooled current.
- :func:`spiking_max_pools` (after the neurons): every max pool still fed by a time-varying value becomes a
  :class:`~ann2snn_fx.snn.pooling.SpikingMaxPool` (exact in the cumulative sense); those it cannot replace
  (``return_indices=True``), and other operations on spike trains that do not preserve rates (``max``,
  products of two spike trains, ...), are returned for the conversion report.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ann2snn_fx.relu.report import LeftActivation
from ann2snn_fx.relu.rule_base import _describe_target, _free_name, _is_inplace, _node_parent
from ann2snn_fx.relu.rules import ClippedReLURule, FunctionalReLURule, ReLURule, is_activation
from ann2snn_fx.snn.pooling import SpikingMaxPool

__all__ = ["commute_max_pools", "max_pool_call", "spiking_max_pools"]

_MODULE_POOLS: dict[type[nn.Module], str] = {
    nn.MaxPool1d: "max_pool1d",
    nn.MaxPool2d: "max_pool2d",
    nn.MaxPool3d: "max_pool3d",
    nn.AdaptiveMaxPool1d: "adaptive_max_pool1d",
    nn.AdaptiveMaxPool2d: "adaptive_max_pool2d",
    nn.AdaptiveMaxPool3d: "adaptive_max_pool3d",
}
_FUNCTION_POOLS: dict[Any, str] = {
    F.max_pool1d: "max_pool1d",
    F.max_pool2d: "max_pool2d",
    F.max_pool3d: "max_pool3d",
    torch.max_pool1d: "max_pool1d",
    torch.max_pool2d: "max_pool2d",
    torch.max_pool3d: "max_pool3d",
    F.adaptive_max_pool1d: "adaptive_max_pool1d",
    F.adaptive_max_pool2d: "adaptive_max_pool2d",
    F.adaptive_max_pool3d: "adaptive_max_pool3d",
}
# These always return (values, indices).
_INDEX_POOLS: dict[Any, str] = {
    F.max_pool1d_with_indices: "max_pool1d",
    F.max_pool2d_with_indices: "max_pool2d",
    F.max_pool3d_with_indices: "max_pool3d",
    F.adaptive_max_pool1d_with_indices: "adaptive_max_pool1d",
    F.adaptive_max_pool2d_with_indices: "adaptive_max_pool2d",
    F.adaptive_max_pool3d_with_indices: "adaptive_max_pool3d",
    torch.adaptive_max_pool1d: "adaptive_max_pool1d",
}
_MODULE_OPTIONS = (
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "ceil_mode",
    "return_indices",
    "output_size",
)
# Operations that are not linear in a time-varying operand (they do not preserve rates on spike trains).
_NONLINEAR_FUNCTIONS: dict[Any, str] = {
    torch.max: "torch.max",
    torch.min: "torch.min",
    torch.amax: "torch.amax",
    torch.amin: "torch.amin",
    torch.maximum: "torch.maximum",
    torch.minimum: "torch.minimum",
    torch.abs: "torch.abs",
    torch.sqrt: "torch.sqrt",
    torch.exp: "torch.exp",
    torch.log: "torch.log",
    F.softmax: "F.softmax",
    torch.softmax: "torch.softmax",
    F.lp_pool1d: "F.lp_pool1d",
    F.lp_pool2d: "F.lp_pool2d",
}
_NONLINEAR_METHODS = ("max", "min", "amax", "amin", "abs", "sqrt", "exp", "log", "softmax", "pow")
_PRODUCTS: tuple[Any, ...] = (
    operator.mul,
    operator.matmul,
    operator.truediv,
    operator.pow,
    torch.mul,
    torch.matmul,
    torch.bmm,
    torch.div,
    torch.pow,
)
_PRODUCT_METHODS = ("mul", "matmul", "bmm", "div", "pow")


def max_pool_call(node: fx.Node, gm: fx.GraphModule) -> tuple[str, dict[str, Any]] | None:
    """``(function name, options)`` of a max-pool node (module or function), or ``None`` if it is none.

    Examples:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.MaxPool2d(2, ceil_mode=True)))
        >>> name, options = max_pool_call(list(gm.graph.nodes)[1], gm)
        >>> name, options["ceil_mode"]
        ('max_pool2d', True)
    """
    if node.op == "call_module" and isinstance(node.target, str):
        module = gm.get_submodule(node.target)
        name = _MODULE_POOLS.get(type(module))
        if name is None:
            return None
        return name, {k: getattr(module, k) for k in _MODULE_OPTIONS if hasattr(module, k)}
    if node.op == "call_function":
        name = next((n for f, n in _FUNCTION_POOLS.items() if node.target is f), None)
        indices = next((n for f, n in _INDEX_POOLS.items() if node.target is f), None)
        if indices is not None:
            return indices, {"return_indices": True}
        if name is None:
            return None
        normalized = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
        if normalized is None:
            return None
        options = {k: v for k, v in normalized.kwargs.items() if k != "input"}
        if options.get("stride") == []:
            options["stride"] = None
        return name, options
    return None


def _pool_input(node: fx.Node) -> Any:
    return node.args[0] if node.args else node.kwargs.get("input")


_COMMUTING_RULES = (ReLURule, FunctionalReLURule, ClippedReLURule)


def commute_max_pools(gm: fx.GraphModule, rules: list[Any]) -> int:
    """Turn every ``ReLU/clipped ReLU -> max pool`` into ``max pool -> activation``; return how many.

    Only activations matched by a built-in rule in ``rules`` (monotone non-decreasing), whose only user is
    the pool, and that mutate no tensor another node reads, are moved.

    Examples:
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv1d(1, 1, 1), nn.ReLU(), nn.MaxPool1d(2)))
        >>> commute_max_pools(gm, [ReLURule()])
        1
        >>> [n.target for n in gm.graph.nodes if n.op == "call_module"]
        ['0', '2', '1']
    """
    active = [rule for rule in rules if type(rule) in _COMMUTING_RULES]
    if not active:
        return 0
    modules = dict(gm.named_modules())
    moved = 0
    for pool in list(gm.graph.nodes):
        call = max_pool_call(pool, gm)
        if call is None or call[1].get("return_indices"):
            continue
        act = _pool_input(pool)
        if not isinstance(act, fx.Node) or len(act.users) != 1 or not act.args:
            continue
        offered = [r for r in active if act.op == "call_module" or act.op in getattr(r, "node_ops", ())]
        if not any(rule.match(act, modules) for rule in offered):
            continue
        source = act.args[0]
        if not isinstance(source, fx.Node) or (_is_inplace(act, modules) and len(source.users) != 1):
            continue
        pool.replace_input_with(act, source)
        pool.replace_all_uses_with(act)
        act.replace_input_with(source, pool)
        act.prepend(pool)
        moved += 1
    if moved:
        gm.graph.lint()
        gm.recompile()
    return moved


def _temporal_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value changes from step to step (a stateful module or anything downstream of one)."""
    temporal: set[fx.Node] = set()
    for node in gm.graph.nodes:
        stateful = node.op == "call_module" and callable(
            getattr(gm.get_submodule(str(node.target)), "reset", None)
        )
        if stateful or any(a in temporal for a in node.all_input_nodes):
            temporal.add(node)
    return temporal


def _nonlinear_reason(node: fx.Node, temporal: set[fx.Node]) -> str | None:
    """Why ``node`` (on a time-varying value) does not preserve rates, or ``None`` if it does or is unknown."""
    if node.op == "call_function":
        name = next((n for f, n in _NONLINEAR_FUNCTIONS.items() if node.target is f), None)
        if name is not None:
            return f"{name} of a spike train is not {name} of its rate"
    if node.op == "call_method" and node.target in _NONLINEAR_METHODS:
        return f"Tensor.{node.target} of a spike train is not Tensor.{node.target} of its rate"
    is_product = (node.op == "call_function" and any(node.target is f for f in _PRODUCTS)) or (
        node.op == "call_method" and node.target in _PRODUCT_METHODS
    )
    if is_product and sum(1 for a in node.all_input_nodes if a in temporal) >= 2:
        return "a product of two time-varying values is not the product of their rates"
    return None


def spiking_max_pools(gm: fx.GraphModule) -> list[LeftActivation]:
    """Replace max pools on time-varying values by :class:`SpikingMaxPool`; report what stays inexact.

    Examples:
        >>> from ann2snn_fx import IFNode, trace_model
        >>> gm = trace_model(nn.Sequential(IFNode(), nn.MaxPool1d(2)))
        >>> spiking_max_pools(gm)
        []
        >>> type(gm.get_submodule("spiking_max_pool_0")).__name__
        'SpikingMaxPool'
    """
    temporal = _temporal_nodes(gm)
    left: list[LeftActivation] = []
    counts: dict[str, int] = {}
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node not in temporal:
            continue
        call = max_pool_call(node, gm)
        kind = f"module {node.target!r}" if node.op == "call_module" else _describe_target(node)
        if call is not None and call[1].get("return_indices"):
            left.append(
                LeftActivation(
                    node.name,
                    kind,
                    "a max pool with return_indices=True on spike trains: the indices of one step's max are "
                    "not those of the rates, and no spiking max pool returns indices",
                )
            )
            continue
        if call is not None:
            parent = _node_parent(gm, node)
            start = counts.get(parent, 0)
            target, k = _free_name(gm, parent, "spiking_max_pool_", start)
            counts[parent] = k + 1
            gm.add_submodule(target, SpikingMaxPool(*call))
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(target, args=(_pool_input(node),))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            temporal.add(new)
            continue
        reason = None if is_activation(node, modules) else _nonlinear_reason(node, temporal)
        if reason is not None:
            left.append(
                LeftActivation(node.name, kind, reason + " (the SNN's output there is not the ANN's)")
            )
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return left

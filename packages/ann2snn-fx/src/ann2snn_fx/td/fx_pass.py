"""The torch.fx pass of :func:`ann2snn_fx.replace_by_td_operators`: trace, then three steps on the graph.

1. :func:`~ann2snn_fx.td.handlers.modules.replace_modules`: modules with a TD counterpart are swapped.
2. :func:`~ann2snn_fx.td.handlers.attention.replace_sdpa`: SDPA calls become TD attention modules.
3. :func:`analyse`: every node is classified (constant / time sequence / shape) and every call is sent to
   its handler in :data:`ann2snn_fx.td.handlers.HANDLERS` (node target -> handler, by op family).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Collection, Iterable
from typing import Any

import torch
import torch.nn as nn
from torch import fx

from ann2snn_fx.relu.rule_base import _is_inplace
from ann2snn_fx.td.handlers import HANDLERS
from ann2snn_fx.td.handlers.attention import replace_sdpa
from ann2snn_fx.td.handlers.modules import replace_modules, visit_module
from ann2snn_fx.td.handlers.shapes import visit_shape
from ann2snn_fx.td.impulse import TDImpulse, td_impulse
from ann2snn_fx.td.layers import make_traceable, torch_layer_defaults
from ann2snn_fx.td.state import Kind, PassState
from ann2snn_fx.tracing import (
    ModelTraceError,
    _resolve_string_annotations,
    _split_leaves,
    specialise_defaults,
    specialised_placeholders,
)
from ann2snn_ops import TDModule

__all__ = ["TDImpulse", "analyse", "replace_by_td_operators_fx", "td_impulse", "visit_call"]


def visit_call(state: PassState, node: fx.Node) -> None:
    """Classify a ``call_function``/``call_method`` node and dispatch it to its handler."""
    if visit_shape(state, node):
        return
    if state.kind((node.args, dict(node.kwargs))) is Kind.CONST:
        state.kinds[node] = Kind.CONST
        return
    state.kinds[node] = Kind.TIME
    handler = HANDLERS.get(node.target)
    if handler is None:
        state.issue(node, "op not known to be time-transparent")
    else:
        handler(state, node)


def analyse(state: PassState) -> None:
    """Step 3: kinds of every node, functional conversions, constants at t = 0, equivalence checks."""
    for node in list(state.graph.nodes):
        if node.op == "placeholder":
            state.kinds[node] = Kind.CONST if node.target in state.static_inputs else Kind.TIME
        elif node.op == "get_attr":
            state.kinds[node] = Kind.CONST
        elif node.op == "call_module":
            visit_module(state, node)
        elif node.op in ("call_function", "call_method"):
            visit_call(state, node)


def rewire_inplace(gm: fx.GraphModule) -> None:
    """Readers of a tensor that an earlier op overwrote in place (``F.relu(y, inplace=True); return f(y)``)
    read that op's output instead: the TD operators are not in place, so the mutation must become data flow."""
    modules = dict(gm.named_modules())
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method", "call_module") or not node.args:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or not _is_inplace(node, modules):
            continue
        for user in list(source.users):
            if user is not node and order.get(user, -1) > order[node]:
                user.replace_input_with(source, node)


def _td_leaves(tracer_class: type[fx.Tracer], leaf_modules: Iterable[Any] | None = None) -> type[fx.Tracer]:
    """``tracer_class`` that also keeps TD operators (a model converted before) and ``leaf_modules`` (module
    classes or paths) as leaves."""
    leaf_types, leaf_names = _split_leaves(leaf_modules)

    class _Tracer(tracer_class):  # type: ignore[valid-type,misc]
        def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
            if isinstance(m, TDModule | TDImpulse) or module_qualified_name in leaf_names:
                return True
            return (bool(leaf_types) and isinstance(m, leaf_types)) or bool(
                super().is_leaf_module(m, module_qualified_name)
            )

    return _Tracer


def _resolve_device(ann: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(ann.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def replace_by_td_operators_fx(
    ann: nn.Module,
    device: torch.device | str | None = None,
    *,
    strict: bool = False,
    static_inputs: Collection[str] = (),
    tracer_class: type[fx.Tracer] = fx.Tracer,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Iterable[Any] | None = None,
) -> fx.GraphModule:
    """Implementation of :func:`ann2snn_fx.replace_by_td_operators` (see there)."""
    if not isinstance(ann, nn.Module):
        raise TypeError(f"replace_by_td_operators expects an nn.Module, but got {type(ann).__name__}.")
    target_device = _resolve_device(ann, device)
    training = {name: module.training for name, module in ann.named_modules()}
    model = make_traceable(copy.deepcopy(ann))
    if concrete_args is None:
        concrete_args = torch_layer_defaults(model, static_inputs)
    tracer = _td_leaves(tracer_class, leaf_modules)()
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as error:  # TraceError, and raw TypeError/RuntimeError of code probing a proxy
        raise ModelTraceError(
            f"replace_by_td_operators could not trace {type(ann).__name__} with torch.fx "
            f"({type(error).__name__}: {error}). Models with data-dependent control flow or *args unpacking of "
            "shapes (Hugging Face transformers, ...) convert with TDTimeFolded, which runs the model's own "
            "forward instead of tracing it; or pass concrete_args= (inputs to specialise on) or leaf_modules= "
            "(submodules kept untraced)."
        ) from error
    name = type(model).__name__ if isinstance(model, nn.Module) else "GraphModule"
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.to(target_device)
    specialise_defaults(graph, concrete_args)
    fixed = [str(node.target) for node in specialised_placeholders(graph, concrete_args)]
    state = PassState(gm, [*static_inputs, *fixed])
    rewire_inplace(gm)
    replace_modules(state)
    replace_sdpa(state)
    analyse(state)
    _resolve_string_annotations(gm, type(tracer.root).forward)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    for qualname, module in gm.named_modules():
        module.training = training.get(qualname, gm.training)
    gm.td_report = state.report  # type: ignore[assignment]
    if strict:
        state.report.raise_if_not_equivalent()
    reshapes = [record.node for record in state.report.issues if "explicit sizes" in record.detail]
    if reshapes:
        warnings.warn(
            f"replace_by_td_operators: {reshapes} reshape with explicit sizes, which do not count the leading "
            "time axis: the converted graph fails or mixes steps at run time. Convert this model with "
            "TDTimeFolded (it keeps the ANN's shapes), or size the reshape from x.shape[:-k].",
            UserWarning,
            stacklevel=3,
        )
    return gm

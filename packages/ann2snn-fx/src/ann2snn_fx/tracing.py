"""Symbolic tracing with caller-supplied options and errors that say what to do."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterable
from typing import Any, ForwardRef

from torch import fx, nn
from torch.fx.proxy import TraceError

from ann2snn_calib import VoltageHook, VoltageScaler
from ann2snn_fx.snn.neurons import IFNode

__all__ = ["ModelTraceError", "trace_model"]


class ModelTraceError(TraceError):
    """Raised when torch.fx cannot trace the model; the message says how to get around it.

    A subclass of :class:`torch.fx.proxy.TraceError` (itself a ``ValueError``), so existing handlers keep working.
    """


_ADVICE = (
    "torch.fx symbolic tracing cannot follow Python control flow that depends on tensor values (an `if` on a "
    "tensor, a loop over a tensor's size, len() of a tensor, ...). To convert this model: pass concrete_args= to "
    "fix the inputs the control flow depends on; pass leaf_modules= (module classes or module paths) to keep the "
    "offending submodules untraced (they run as a whole and activations inside them are not converted); pass a "
    "custom tracer= (a torch.fx.Tracer); or trace the model yourself and pass the resulting fx.GraphModule."
)


# Stateful neurons and the calibration modules stay call_module nodes when a converted model is traced again.
_ALWAYS_LEAVES = (IFNode, VoltageHook, VoltageScaler)


class _LeafTracer(fx.Tracer):
    # Default arguments: torch.fx re-instantiates the tracer class without arguments when unpickling.
    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _ALWAYS_LEAVES) or getattr(type(m), "fx_leaf", False) is True:
            return True  # the project's own modules (a class attribute ``fx_leaf = True`` opts in)
        if (self.leaf_types and isinstance(m, self.leaf_types)) or module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _split_leaves(leaf_modules: Iterable[Any] | None) -> tuple[tuple[type, ...], frozenset[str]]:
    if leaf_modules is None:
        return (), frozenset()
    if isinstance(leaf_modules, (str, type)):
        leaf_modules = [leaf_modules]
    types: list[type] = []
    names: set[str] = set()
    for item in leaf_modules:
        if isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        elif isinstance(item, str):
            names.add(item)
        else:
            raise TypeError(
                f"leaf_modules must hold nn.Module subclasses or module paths (str), but got {item!r}."
            )
    return tuple(types), frozenset(names)


def trace_model(
    model: nn.Module,
    *,
    tracer: fx.Tracer | type[fx.Tracer] | None = None,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Iterable[Any] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` into an ``fx.GraphModule`` (returned as is when it already is one and no option is given).

    Args:
        model: The module to trace. It is not copied: the GraphModule shares its leaf modules.
        tracer: A ``torch.fx.Tracer`` instance or subclass to use instead of the default one.
        concrete_args: Inputs to specialise on, forwarded to ``Tracer.trace``.
        leaf_modules: Module classes or module paths to keep as opaque ``call_module`` nodes (only with the
            default tracer, which also keeps ``IFNode``, ``VoltageHook`` and ``VoltageScaler`` as leaves).

    Returns:
        The traced GraphModule.

    Raises:
        ModelTraceError: when tracing fails, with advice on the options above.
        TypeError: for a ``tracer`` or ``leaf_modules`` of the wrong type.

    Examples:
        >>> gm = trace_model(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module to trace, but got {type(model).__name__}.")
    leaf_types, leaf_names = _split_leaves(leaf_modules)
    if (
        isinstance(model, fx.GraphModule)
        and tracer is None
        and concrete_args is None
        and leaf_modules is None
    ):
        return model
    if tracer is None:
        active: fx.Tracer = _LeafTracer(leaf_types, leaf_names)
    else:
        if leaf_types or leaf_names:
            raise TypeError(
                "leaf_modules= only applies to the default tracer; make your tracer= decide leaves."
            )
        if isinstance(tracer, type) and issubclass(tracer, fx.Tracer):
            active = tracer()
        elif isinstance(tracer, fx.Tracer):
            active = tracer
        else:
            raise TypeError(f"tracer must be a torch.fx.Tracer instance or subclass, but got {tracer!r}.")
    name = type(model).__name__
    try:
        graph = active.trace(model, concrete_args=concrete_args)
    except ModelTraceError:
        raise
    except Exception as exc:  # TraceError, and the raw TypeError/RuntimeError of code that probes a proxy
        raise ModelTraceError(f"Could not trace {name}: {type(exc).__name__}: {exc}. {_ADVICE}") from exc
    specialise_defaults(graph, concrete_args)
    return fx.GraphModule(active.root, graph, name)


def specialised_placeholders(graph: fx.Graph, concrete_args: dict[str, Any] | None) -> dict[fx.Node, Any]:
    """``placeholder -> value`` for the inputs fixed by ``concrete_args`` (fx names them ``<name>_1``).

    Examples:
        >>> class Flag(nn.Module):
        ...     def forward(self, x, double=False):
        ...         return x * 2 if double else x
        >>> graph = fx.Tracer().trace(Flag(), concrete_args={"double": True})
        >>> [(n.name, v) for n, v in specialised_placeholders(graph, {"double": True}).items()]
        [('double_1', True)]
    """
    if not concrete_args:
        return {}
    found = {}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        base = str(node.target).lstrip("*")
        stem, _, suffix = base.rpartition("_")
        key = base if base in concrete_args else stem if suffix.isdigit() and stem in concrete_args else None
        if key is not None and not isinstance(concrete_args[key], fx._symbolic_trace.PHBase):
            found[node] = concrete_args[key]
    return found


def specialise_defaults(graph: fx.Graph, concrete_args: dict[str, Any] | None) -> None:
    """Make the values of ``concrete_args`` the defaults of their placeholders, so that the traced graph,
    called with the other inputs only, runs the way it was specialised (fx checks the value at run time and
    would otherwise compare the forward's own default with it).

    Examples:
        >>> class Flag(nn.Module):
        ...     def forward(self, x, double=False):
        ...         return x * 2 if double else x
        >>> import torch
        >>> tracer = fx.Tracer()
        >>> graph = tracer.trace(Flag(), concrete_args={"double": True})
        >>> specialise_defaults(graph, {"double": True})
        >>> fx.GraphModule(tracer.root, graph)(torch.ones(1)).item()  # no double=True needed
        2.0
    """
    for node, value in specialised_placeholders(graph, concrete_args).items():
        node.args = (value,)


def _contains_string_annotation(annotation: Any) -> bool:
    """Whether ``annotation`` is, or holds (``list["Foo"]``, ``Optional["Foo"]``), an unresolved forward reference."""
    if isinstance(annotation, str | ForwardRef):
        return True
    return any(_contains_string_annotation(arg) for arg in typing.get_args(annotation))


def _resolve_annotation(forward: Any, name: str) -> Any:
    """The annotation of parameter (or ``"return"``) ``name`` of ``forward``, evaluated; ``None`` if it fails."""
    function = inspect.unwrap(forward)
    annotations = getattr(function, "__annotations__", None)
    if not isinstance(annotations, dict) or name not in annotations:
        return None

    def probe() -> None: ...  # one annotation at a time: a broken one does not hide the others

    probe.__annotations__ = {name: annotations[name]}
    try:
        resolved = typing.get_type_hints(probe, globalns=getattr(function, "__globals__", None))[name]
    except Exception:  # NameError, TypeError...: a user's annotation that does not evaluate stays unresolved
        return None
    return None if _contains_string_annotation(resolved) else resolved


def _resolve_string_annotations(gm: fx.GraphModule, forward: Any) -> None:
    """Replace the string (PEP 563) annotations of the inputs and the output by the types they name.

    fx copies a ``node.type`` into the generated code as a global, and ``torch.save`` cannot pickle a string
    global (it looks it up as an importable name). An annotation that cannot be resolved is dropped: it only
    documents the code.
    """
    for node in gm.graph.nodes:
        if not _contains_string_annotation(node.type):
            continue
        key = {"output": "return", "placeholder": str(node.target).lstrip("*")}.get(node.op)
        node.type = _resolve_annotation(forward, key) if key is not None else None

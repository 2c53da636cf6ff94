"""Tracing on an example input: control flow on shapes and config flags resolved with real values.

Models written for eager execution (Hugging Face's ``ResNetForImageClassification``,
``MobileNetV2ForImageClassification``) check input shapes (``if pixel_values.shape[1] != ...``), compute
padding with ``int(x.shape[-1])`` or branch on optional inputs: plain torch.fx cannot trace them.
:class:`ExampleInputTracer` runs every traced op on an example input alongside the graph it records, so
that a branch, ``int()``, ``len()`` or iteration on a traced value takes the value the example gives; the
graph is specialised to that example (same shapes and flags at run time). Inputs the example does not give
are fixed to the forward's defaults (``labels=None``, ``return_dict=None``).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.fx import _symbolic_trace
from torch.fx.node import map_aggregate

__all__ = ["ExampleInputTracer"]

_MISSING = object()


class _ValueProxy(fx.Proxy):
    """An fx proxy that knows its value on the example input (for ``int()``, ``len()``, indexing)."""

    def _value(self) -> Any:
        tracer = self.tracer
        value = tracer.values.get(self.node, _MISSING) if isinstance(tracer, ExampleInputTracer) else _MISSING
        if value is _MISSING:
            raise TypeError(
                f"{self.node.name} has no value on the example input, so it cannot be used as a Python number"
            )
        return value

    def __int__(self) -> int:
        return int(self._value())

    def __index__(self) -> int:
        return operator.index(self._value())

    def __float__(self) -> float:
        return float(self._value())

    def __len__(self) -> int:
        return len(self._value())


class ExampleInputTracer(fx.Tracer):
    """A ``torch.fx.Tracer`` that resolves Python control flow with the values of an example input.

    Pass it as ``tracer=`` to ``Converter.convert_to_spiking_neurons`` or :func:`~ann2snn_fx.trace_model`.
    The graph is specialised to the example: convert with inputs of the shapes the SNN will run on.

    Args:
        *example_args: The example's positional inputs of ``forward``.
        **example_kwargs: Its keyword inputs.

    Examples:
        >>> class Checks(nn.Module):
        ...     def forward(self, x, scale=None):
        ...         if x.shape[1] != 3:
        ...             raise ValueError("3 channels")
        ...         return x * int(x.shape[-1]) if scale is None else x * scale
        >>> from ann2snn_fx import trace_model
        >>> gm = trace_model(Checks(), tracer=ExampleInputTracer(torch.ones(1, 3, 4)))
        >>> gm(torch.ones(1, 3, 4)).sum().item()
        48.0
    """

    def __init__(self, *example_args: Any, **example_kwargs: Any) -> None:
        super().__init__()
        self.example_args = example_args
        self.example_kwargs = example_kwargs
        self.values: dict[fx.Node, Any] = {}
        self._inputs: dict[str, Any] = {}

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:  # type: ignore[override]
        """Trace ``root`` on the example (the inputs it does not give fixed to the forward's defaults)."""
        forward = root.forward if isinstance(root, nn.Module) else root
        signature = inspect.signature(forward)
        bound = signature.bind_partial(*self.example_args, **self.example_kwargs)
        self._inputs = dict(bound.arguments)
        fixed = {
            name: p.default
            for name, p in signature.parameters.items()
            if name not in bound.arguments
            and p.default is not inspect.Parameter.empty
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        }
        fixed.update(concrete_args or {})
        self.values = {}
        with torch.no_grad():
            return super().trace(root, concrete_args=fixed or None)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def create_proxy(
        self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **options: Any
    ) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **options)
        # While tracing, fx patches nn.Module.__call__/__getattr__; the example runs with torch's own.
        patched = nn.Module.__call__, nn.Module.__getattr__
        nn.Module.__call__ = _symbolic_trace._orig_module_call  # type: ignore[method-assign]
        nn.Module.__getattr__ = _symbolic_trace._orig_module_getattr  # type: ignore[method-assign]
        try:
            self.values[proxy.node] = self._run(kind, target, args, kwargs)
        except Exception:  # an op the example cannot run (or an input not given): its value stays unknown
            pass
        finally:
            nn.Module.__call__, nn.Module.__getattr__ = patched  # type: ignore[method-assign]
        return proxy

    def _concrete(self, value: Any) -> Any:
        def one(a: Any) -> Any:
            if isinstance(a, fx.Proxy):
                found = self.values.get(a.node, _MISSING)
                if found is _MISSING:
                    raise LookupError(a.node.name)
                return found
            return a

        return map_aggregate(value, one)

    def _run(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        if kind == "placeholder":
            name = str(target).lstrip("*")
            if name not in self._inputs:
                raise LookupError(name)
            return self._inputs[name]
        if kind == "get_attr":
            obj: Any = self.root
            for part in str(target).split("."):
                obj = getattr(obj, part)
            return obj
        a, k = self._concrete(args), self._concrete(kwargs)
        if kind == "call_function":
            return target(*a, **k)
        if kind == "call_method":
            return getattr(a[0], target)(*a[1:], **k)
        if kind == "call_module":
            return self.root.get_submodule(target)(*a, **k)
        raise LookupError(kind)

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self.values.get(obj.node, _MISSING)
        if value is _MISSING:
            return super().to_bool(obj)
        return bool(value)

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        value = self.values.get(obj.node, _MISSING)
        if value is _MISSING:
            return super().iter(obj)
        return iter([obj[i] for i in range(len(value))])  # type: ignore[index]

    def keys(self, obj: fx.Proxy) -> Any:
        value = self.values.get(obj.node, _MISSING)
        if value is _MISSING or not hasattr(value, "keys"):
            return super().keys(obj)
        return value.keys()

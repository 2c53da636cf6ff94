"""Activation rules: which graph nodes become spiking blocks, and how.

A rule finds activations, puts a calibration hook behind each, and later replaces every
``(activation, hook)`` pair by ``VoltageScaler(theta / s) -> neuron -> VoltageScaler(s)``, where ``s`` is the
threshold chosen by the threshold optimizer from the hook and ``theta`` the neuron's own threshold.

Built-in rules:

- :class:`ReLURule`: ``nn.ReLU`` modules (the reference rule; exact type).
- :class:`FunctionalReLURule`: ``F.relu``, ``torch.relu``, ``Tensor.relu`` and their in-place variants.
- :class:`ClippedReLURule`: ``nn.ReLU6``, ``nn.Hardtanh(0, c)``, ``F.relu6``, ``F.hardtanh(x, 0, c)``,
  ``torch.clamp(x, 0, c)`` / ``clip`` / ``clamp_min(x, 0)`` (and the methods); the threshold is at most ``c``.

:func:`all_rules` returns one of each.
"""

from __future__ import annotations

import math
import operator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from ann2snn_fx.relu.rule_base import (  # noqa: F401 - re-exported for ann2snn_fx.rules users
    BLOCKS_META_KEY,
    FIRST_LEVEL_KEY,
    ActivationRule,
    _describe_target,
    _SpikingBlockRule,
)

__all__ = [
    "ActivationRule",
    "ClippedReLURule",
    "FunctionalReLURule",
    "ReLURule",
    "all_rules",
]


class ReLURule(_SpikingBlockRule):
    """Converts ``nn.ReLU`` modules (exact type; ``inplace=True`` included).

    Examples:
        >>> from types import SimpleNamespace
        >>> ReLURule().match(SimpleNamespace(op="call_module", target="act"), {"act": nn.ReLU()})
        True
    """

    def match(self, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
        """True for a ``call_module`` node whose module is exactly an ``nn.ReLU``."""
        return node.op == "call_module" and type(modules.get(node.target)) is nn.ReLU  # type: ignore[arg-type]


_RELU_FUNCTIONS: tuple[Any, ...] = (F.relu, torch.relu, torch.relu_, F.relu_)
_RELU_METHODS = ("relu", "relu_")


class FunctionalReLURule(_SpikingBlockRule):
    """Converts functional ReLUs: ``F.relu``, ``torch.relu``, ``x.relu()`` and in-place variants.

    Spiking blocks are named after the module whose ``forward`` called the function
    (``<module path>.spiking_<k>``), or the root for top-level calls.

    Examples:
        >>> gm = fx.symbolic_trace(lambda x: F.relu(x) + x.relu())
        >>> [FunctionalReLURule().match(n, {}) for n in gm.graph.nodes]
        [False, True, True, False, False]
    """

    node_ops: ClassVar[tuple[str, ...]] = ("call_function", "call_method")

    def match(self, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
        """True for ``F.relu``/``torch.relu``/``Tensor.relu`` calls (in-place too)."""
        if node.op == "call_function":
            return any(node.target is f for f in _RELU_FUNCTIONS)
        return node.op == "call_method" and node.target in _RELU_METHODS

    def activation_input(self, node: fx.Node) -> Any:
        extra = [k for k in node.kwargs if k != "inplace"]
        # F.relu(x, True): a positional ``inplace`` flag is not an input.
        args = node.args[:1] if len(node.args) == 2 and isinstance(node.args[1], bool) else node.args
        if len(args) != 1 or extra:
            raise ValueError(
                f"The activation node {node.target!r} must have exactly 1 argument, but got {len(args) + len(extra)}."
            )
        return node.args[0]


_CLAMP_FUNCTIONS: tuple[Any, ...] = (torch.clamp, torch.clip, torch.clamp_, torch.clip_)
_CLAMP_METHODS = ("clamp", "clip", "clamp_", "clip_")
_HARDTANH_FUNCTIONS: tuple[Any, ...] = (F.hardtanh, F.hardtanh_, torch._C._nn.hardtanh_)
_CLAMP_MIN_FUNCTIONS: tuple[Any, ...] = (torch.clamp_min, torch.clamp_min_)
_CLAMP_MIN_METHODS = ("clamp_min", "clamp_min_")


def _literal_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def clip_bounds(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[Any, Any] | None:
    """``(lower, upper)`` of a clipping node (module, function or method), or ``None`` if it is none."""
    if node.op == "call_module":
        module = modules.get(node.target)  # type: ignore[arg-type]
        if type(module) is nn.ReLU6:
            return 0.0, 6.0
        if type(module) is nn.Hardtanh:
            return module.min_val, module.max_val
        return None
    if node.op == "call_function":
        if node.target is F.relu6:
            return 0.0, 6.0
        if any(node.target is f for f in _HARDTANH_FUNCTIONS):
            return _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
        if any(node.target is f for f in _CLAMP_FUNCTIONS):
            return _arg(node, 1, "min", None), _arg(node, 2, "max", None)
        if any(node.target is f for f in _CLAMP_MIN_FUNCTIONS):
            return _arg(node, 1, "min", None), None
        return None
    if node.op == "call_method":
        if node.target in _CLAMP_METHODS:
            return _arg(node, 1, "min", None), _arg(node, 2, "max", None)
        if node.target in _CLAMP_MIN_METHODS:
            return _arg(node, 1, "min", None), None
    return None


def clip_rejection(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """Why a clipping node is not a convertible clipped ReLU (``None`` if it is one, or no clipping node)."""
    bounds = clip_bounds(node, modules)
    if bounds is None:
        return None
    lower, upper = bounds
    low = _literal_number(lower)
    if low is None:
        return f"its lower bound {lower!r} is not a literal number (it must be 0)"
    if low != 0.0:
        return f"its lower bound is {lower!r}, not 0 (only clipped ReLUs, clamp(x, 0, c), map to IF neurons)"
    if upper is not None:
        high = _literal_number(upper)
        if high is None:
            return f"its upper bound {upper!r} is not a literal number"
        if not (high > 0 and math.isfinite(high)):
            return f"its upper bound {upper!r} is not a finite positive number"
    return None


class ClippedReLURule(_SpikingBlockRule):
    """Converts clipped ReLUs: ``nn.ReLU6``, ``nn.Hardtanh(0, c)``, ``F.relu6``, ``F.hardtanh(x, 0, c)``,
    ``torch.clamp(x, 0, c)`` / ``torch.clip`` / ``Tensor.clamp`` (``c`` may be omitted), ``clamp_min(x, 0)``.

    Bounds must be literal numbers with a lower bound of exactly 0. The layer's threshold is
    ``min(threshold, c)``, so the spiking block saturates where the ANN clipped.

    Examples:
        >>> from types import SimpleNamespace
        >>> ClippedReLURule().match(SimpleNamespace(op="call_module", target="a"), {"a": nn.ReLU6()})
        True
    """

    node_ops: ClassVar[tuple[str, ...]] = ("call_module", "call_function", "call_method")

    def match(self, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
        """True for a clipping node with literal bounds ``(0, c)`` or ``(0, None)``."""
        return clip_bounds(node, modules) is not None and clip_rejection(node, modules) is None

    def activation_input(self, node: fx.Node) -> Any:
        if not node.args:
            raise ValueError(f"The activation node {node.target!r} must have exactly 1 argument, but got 0.")
        return node.args[0]

    def clip(self, node: fx.Node, modules: dict[str, nn.Module]) -> float | None:
        bounds = clip_bounds(node, modules)
        if bounds is None or bounds[1] is None:
            return None
        return float(bounds[1])


def all_rules() -> list[ActivationRule]:
    """One instance of every built-in rule: ``[ReLURule(), FunctionalReLURule(), ClippedReLURule()]``.

    Examples:
        >>> [type(rule).__name__ for rule in all_rules()]
        ['ReLURule', 'FunctionalReLURule', 'ClippedReLURule']
    """
    return [ReLURule(), FunctionalReLURule(), ClippedReLURule()]


# Activation-like node kinds, for the conversion report.
_ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Threshold,
)
_ACTIVATION_FUNCTIONS: tuple[Any, ...] = (
    *_RELU_FUNCTIONS,
    F.relu6,
    *_HARDTANH_FUNCTIONS,
    *_CLAMP_FUNCTIONS,
    *_CLAMP_MIN_FUNCTIONS,
    F.leaky_relu,
    F.gelu,
    F.silu,
    F.elu,
    F.selu,
    F.mish,
    F.softplus,
    F.hardswish,
    F.hardsigmoid,
    torch.sigmoid,
    torch.tanh,
    F.sigmoid,
    F.tanh,
)
_ACTIVATION_METHODS = (*_RELU_METHODS, *_CLAMP_METHODS, *_CLAMP_MIN_METHODS, "sigmoid", "tanh")


def is_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True for nodes that look like an activation function (for the conversion report)."""
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _ACTIVATION_MODULES)  # type: ignore[arg-type]
    if node.op == "call_function":
        return any(node.target is f for f in _ACTIVATION_FUNCTIONS) and node.target is not operator.getitem
    return node.op == "call_method" and node.target in _ACTIVATION_METHODS


def describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """Short human description of an activation node, e.g. ``"nn.ReLU 'features.1'"`` or ``"F.relu"``."""
    if node.op == "call_module":
        module = modules.get(node.target)  # type: ignore[arg-type]
        return (
            f"nn.{type(module).__name__} {node.target!r}" if module is not None else f"module {node.target!r}"
        )
    return _describe_target(node)

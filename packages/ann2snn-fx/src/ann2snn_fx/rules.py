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
from collections.abc import Iterator
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import fx, nn

from ann2snn_calib import VoltageHook, VoltageScaler

__all__ = [
    "ActivationRule",
    "ClippedReLURule",
    "FunctionalReLURule",
    "ReLURule",
    "all_rules",
]

FIRST_LEVEL_KEY = "__FIRST_LEVEL_OF_MODULE__"
#: ``fx_model.meta`` key under which the built-in rules record ``hook target -> (block path, threshold)``.
BLOCKS_META_KEY = "ann2snn_fx.blocks"


class ActivationRule(Protocol):
    """Protocol of an activation conversion rule (duck-typed: any object with these four methods works).

    The converter offers each ``call_module`` node whose target is a submodule to every rule, in order, and
    the first rule whose :meth:`match` is true inserts the calibration hook. A rule that also handles
    functional nodes lists the node kinds in an optional ``node_ops`` attribute (e.g.
    ``("call_function", "call_method")``).
    """

    def match(self, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
        """Return True if this rule handles ``node``."""
        ...

    def insert_hooks(
        self,
        fx_model: fx.GraphModule,
        node: fx.Node,
        hook_factory: Any,
        hook_counts_per_prefix: dict[str, int],
    ) -> fx.Node:
        """Insert a hook from ``hook_factory`` after ``node`` and return the hook node."""
        ...

    def find_replacements(
        self, fx_model: fx.GraphModule, modules: dict[str, nn.Module]
    ) -> Iterator[tuple[fx.Node, fx.Node]]:
        """Yield the ``(activation_node, hook_node)`` pairs to replace."""
        ...

    def replace_with_neurons(
        self,
        fx_model: fx.GraphModule,
        activation_node: fx.Node,
        hook_node: fx.Node,
        neuron_factory: Any,
        threshold_optimizer: Any,
    ) -> None:
        """Replace an activation and its hook by a spiking block."""
        ...


def _has_attribute(fx_model: nn.Module, path: str) -> bool:
    """True if ``path`` (dotted) names anything (module, parameter, buffer, plain attribute) in ``fx_model``."""
    obj: Any = fx_model
    for part in path.split("."):
        if isinstance(obj, nn.Module):
            if (
                part in obj._modules
                or part in obj._parameters
                or part in obj._buffers
                or part in obj.__dict__
            ):
                obj = getattr(obj, part)
                continue
            return hasattr(type(obj), part)
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _join(parent: str, leaf: str) -> str:
    return f"{parent}.{leaf}" if parent else leaf


def _parent_is_usable(fx_model: nn.Module, parent: str) -> bool:
    """True if new submodules can be added under ``parent`` (missing levels are created as modules)."""
    obj: Any = fx_model
    for part in parent.split(".") if parent else []:
        if not isinstance(obj, nn.Module):
            return False
        if part in obj._modules:
            obj = obj._modules[part]
        else:
            return not _has_attribute(obj, part)
    return isinstance(obj, nn.Module)


def _free_name(fx_model: nn.Module, parent: str, stem: str, start: int) -> tuple[str, int]:
    """First ``{parent}.{stem}{k}`` with ``k >= start`` that names nothing yet; returns (path, k)."""
    k = start
    while _has_attribute(fx_model, _join(parent, f"{stem}{k}")):
        k += 1
    return _join(parent, f"{stem}{k}"), k


def _node_parent(fx_model: nn.Module, node: fx.Node) -> str:
    """Module path owning ``node``: the target's parent for modules, the traced module stack otherwise."""
    if node.op == "call_module" and isinstance(node.target, str):
        return node.target.rpartition(".")[0]
    stack = getattr(node, "meta", {}).get("nn_module_stack") if hasattr(node, "meta") else None
    if stack:
        key, value = next(reversed(stack.items()))
        path = value[0] if isinstance(value, tuple) and value and isinstance(value[0], str) else key
        if isinstance(path, str) and path and _parent_is_usable(fx_model, path):
            return path
    return ""


def _insert_hook_after(
    fx_model: fx.GraphModule,
    node: fx.Node,
    parent: str,
    hook_factory: Any,
    hook_counts_per_prefix: dict[str, int],
) -> fx.Node:
    key = parent if parent else FIRST_LEVEL_KEY
    target, k = _free_name(fx_model, parent, "voltage_hook_", hook_counts_per_prefix.get(key, 0))
    hook_counts_per_prefix[key] = k + 1
    fx_model.add_submodule(target, hook_factory.create())
    with fx_model.graph.inserting_after(node):
        hook_node = fx_model.graph.call_module(target, args=(node,))
    # Route the activation's users through the hook (an identity) so that the hook is no dead-end node a
    # dead-code pass could drop.
    node.replace_all_uses_with(hook_node, delete_user_cb=lambda user: user is not hook_node)
    return hook_node


def _check_threshold(value: Any, hook_target: str, activation: fx.Node) -> float | torch.Tensor:
    where = (
        f"for hook {hook_target!r}. The layer is the activation {activation.name!r} "
        f"({_describe_target(activation)}); a calibrated scale of zero means it never produced a positive value "
        "on the calibration data (a dead layer): calibrate with more or other data, or floor thresholds with "
        "ThresholdOptimizer(min_threshold=...)."
    )
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        bad = ~(torch.isfinite(value) & (value > 0))
        if bool(bad.any()):
            raise ValueError(
                f"Threshold must be a finite positive number, got {value.flatten()[bad.flatten()][0].item()} "
                f"(in a per-channel threshold of shape {tuple(value.shape)}) {where}"
            )
        return value.detach()
    s = float(value.item() if isinstance(value, torch.Tensor) else value)
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"Threshold must be a finite positive number, got {s} {where}")
    return s


def _describe_target(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", repr(target))
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    return f"torch.{name}" if module in ("torch", "") or module.startswith("torch") else name


def _is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_function":
        positions: dict[Any, int] = {F.relu: 1, F.relu6: 1, F.hardtanh: 3}
        position = positions.get(node.target)
        if position is not None and len(node.args) > position and node.args[position] is True:
            return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


class _SpikingBlockRule:
    """Shared hook insertion, pair discovery and spiking-block construction of the built-in rules."""

    node_ops: ClassVar[tuple[str, ...]] = ("call_module",)

    def match(self, node: fx.Node, modules: dict[str, nn.Module]) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def activation_input(self, node: fx.Node) -> Any:
        """The activation's input (what the first scaler receives)."""
        if len(node.args) != 1:
            raise ValueError(
                f"The activation node {node.target!r} must have exactly 1 argument, but got {len(node.args)}."
            )
        return node.args[0]

    def clip(self, node: fx.Node, modules: dict[str, nn.Module]) -> float | None:
        """Upper clip of the activation (``None`` for a plain ReLU); the threshold never exceeds it."""
        return None

    def insert_hooks(
        self,
        fx_model: fx.GraphModule,
        node: fx.Node,
        hook_factory: Any,
        hook_counts_per_prefix: dict[str, int],
    ) -> fx.Node:
        """Insert ``<parent>.voltage_hook_<k>`` after ``node`` (users rewired through it); return its node."""
        if node.op == "call_module" and not isinstance(node.target, str):
            raise TypeError("node.target must be a module path string.")
        parent = _node_parent(fx_model, node)
        return _insert_hook_after(fx_model, node, parent, hook_factory, hook_counts_per_prefix)

    def find_replacements(
        self, fx_model: fx.GraphModule, modules: dict[str, nn.Module]
    ) -> Iterator[tuple[fx.Node, fx.Node]]:
        """Yield ``(activation_node, hook_node)`` for every hook placed behind an activation this rule matches."""
        for node in fx_model.graph.nodes:
            if node.op != "call_module" or not isinstance(modules.get(node.target), VoltageHook):
                continue
            if not node.args or not isinstance(node.args[0], fx.Node):
                continue
            activation = node.args[0]
            if activation.op == "call_module" and activation.target not in modules:
                continue
            if self.match(activation, modules):
                yield activation, node

    def replace_with_neurons(
        self,
        fx_model: fx.GraphModule,
        activation_node: fx.Node,
        hook_node: fx.Node,
        neuron_factory: Any,
        threshold_optimizer: Any,
    ) -> None:
        """Replace the pair by ``<parent>.spiking_<k>.{scaler0, if_node, scaler1}``."""
        modules = dict(fx_model.named_modules())
        source = self.activation_input(activation_node)
        if not isinstance(hook_node.target, str):
            raise TypeError("hook_node.target must be a module path string.")
        hook_parent, _, hook_leaf = hook_node.target.rpartition(".")
        hook = fx_model.get_submodule(hook_node.target)
        if not isinstance(hook, VoltageHook):
            raise TypeError("hook_node must target a VoltageHook module.")
        threshold = _check_threshold(
            threshold_optimizer.compute_threshold(hook), hook_node.target, activation_node
        )
        clip = self.clip(activation_node, modules)
        if clip is not None:
            threshold = (
                threshold.clamp(max=clip) if isinstance(threshold, torch.Tensor) else min(threshold, clip)
            )

        leaf = hook_leaf.replace("voltage_hook_", "spiking_")
        prefix = _join(hook_parent, leaf)
        if _has_attribute(fx_model, prefix):
            stem, digits = leaf.rstrip("0123456789"), leaf[len(leaf.rstrip("0123456789")) :]
            prefix, _ = _free_name(fx_model, hook_parent, stem, int(digits) if digits else 0)

        neuron = neuron_factory.create(scale=threshold)
        layer_threshold = threshold
        burst = getattr(neuron, "burst", 1)
        if isinstance(burst, int) and burst > 1:
            # A burst neuron emits up to ``burst`` spikes a step: each is worth threshold / burst, so the block
            # keeps the layer's range with ``burst`` times finer steps.
            threshold = threshold / burst
        theta: Any = getattr(neuron, "v_threshold", 1.0)
        if hasattr(theta, "item") and (not hasattr(theta, "numel") or theta.numel() == 1):
            theta = theta.item()
        if isinstance(threshold, torch.Tensor):
            channel_dim = getattr(hook, "channel_dim", None)
            options = {"channel_dim": channel_dim} if threshold.dim() == 1 and channel_dim is not None else {}
            scaler0 = VoltageScaler(torch.as_tensor(theta, dtype=threshold.dtype) / threshold, **options)
            scaler1 = VoltageScaler(threshold.clone(), **options)
        else:
            scaler0 = VoltageScaler(theta / threshold)
            scaler1 = VoltageScaler(threshold)
        fx_model.add_submodule(f"{prefix}.scaler0", scaler0)
        fx_model.add_submodule(f"{prefix}.if_node", neuron)
        fx_model.add_submodule(f"{prefix}.scaler1", scaler1)

        graph = fx_model.graph
        with graph.inserting_after(hook_node):
            n0 = graph.call_module(f"{prefix}.scaler0", args=(source,))
        with graph.inserting_after(n0):
            n1 = graph.call_module(f"{prefix}.if_node", args=(n0,))
        with graph.inserting_after(n1):
            n2 = graph.call_module(f"{prefix}.scaler1", args=(n1,))

        if _is_inplace(activation_node, modules) and isinstance(source, fx.Node):
            # The ANN overwrote its input in place: later readers of that input saw the activation's output.
            order = {n: i for i, n in enumerate(graph.nodes)}
            position = order[activation_node]
            for user in list(source.users):
                if user not in (n0, activation_node, hook_node) and order.get(user, -1) > position:
                    user.replace_input_with(source, n2)
        hook_node.replace_all_uses_with(n2)
        activation_node.replace_all_uses_with(n2)
        graph.erase_node(hook_node)
        graph.erase_node(activation_node)
        record = fx_model.meta.setdefault(BLOCKS_META_KEY, {}) if hasattr(fx_model, "meta") else {}
        record[hook_node.target] = (prefix, layer_threshold)


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

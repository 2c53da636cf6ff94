"""What every activation rule shares: the :class:`ActivationRule` protocol and :class:`SpikingBlockRule`.

``SpikingBlockRule`` does the graph surgery (hook after the activation, then
``VoltageScaler(theta / s) -> neuron -> VoltageScaler(s)`` in place of the pair); a concrete rule in
:mod:`ann2snn_fx.relu.rules` only says which nodes it matches (``match``), where the activation's input is
(``activation_input``) and its clip (``clip``). A new rule: copy ``ReLURule`` there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import fx, nn

from ann2snn_calib import VoltageHook, VoltageScaler

__all__ = ["BLOCKS_META_KEY", "FIRST_LEVEL_KEY", "ActivationRule", "SpikingBlockRule"]

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

        prefix = _block_prefix(fx_model, hook_parent, hook_leaf)
        neuron = neuron_factory.create(scale=threshold)
        layer_threshold = threshold
        burst = getattr(neuron, "burst", 1)
        if isinstance(burst, int) and burst > 1:
            # A burst neuron emits up to ``burst`` spikes a step: each is worth threshold / burst, so the block
            # keeps the layer's range with ``burst`` times finer steps.
            threshold = threshold / burst
        scaler0, scaler1 = _block_scalers(neuron, threshold, hook)
        fx_model.add_submodule(f"{prefix}.scaler0", scaler0)
        fx_model.add_submodule(f"{prefix}.if_node", neuron)
        fx_model.add_submodule(f"{prefix}.scaler1", scaler1)
        _splice_block(
            fx_model, activation_node, hook_node, source, prefix, _is_inplace(activation_node, modules)
        )
        record = fx_model.meta.setdefault(BLOCKS_META_KEY, {}) if hasattr(fx_model, "meta") else {}
        record[hook_node.target] = (prefix, layer_threshold)


def _block_prefix(fx_model: nn.Module, hook_parent: str, hook_leaf: str) -> str:
    """``<parent>.spiking_<k>`` beside the hook, at the first free index."""
    leaf = hook_leaf.replace("voltage_hook_", "spiking_")
    prefix = _join(hook_parent, leaf)
    if _has_attribute(fx_model, prefix):
        stem, digits = leaf.rstrip("0123456789"), leaf[len(leaf.rstrip("0123456789")) :]
        prefix, _ = _free_name(fx_model, hook_parent, stem, int(digits) if digits else 0)
    return prefix


def _block_scalers(
    neuron: nn.Module, threshold: float | torch.Tensor, hook: Any
) -> tuple[VoltageScaler, VoltageScaler]:
    """``VoltageScaler(theta / s)`` and ``VoltageScaler(s)`` around a neuron of threshold ``theta``."""
    theta: Any = getattr(neuron, "v_threshold", 1.0)
    if hasattr(theta, "item") and (not hasattr(theta, "numel") or theta.numel() == 1):
        theta = theta.item()
    if isinstance(threshold, torch.Tensor):
        channel_dim = getattr(hook, "channel_dim", None)
        options = {"channel_dim": channel_dim} if threshold.dim() == 1 and channel_dim is not None else {}
        scaler0 = VoltageScaler(torch.as_tensor(theta, dtype=threshold.dtype) / threshold, **options)
        scaler1 = VoltageScaler(threshold.clone(), **options)
    else:
        # A skeleton (calibrate=False) of a per-channel conversion keeps the channel dimension, so that it
        # adopts the per-channel scales of a saved state_dict along the right dimension.
        channel_dim = getattr(hook, "channel_dim", None)
        options = {} if channel_dim is None else {"channel_dim": channel_dim}
        scaler0 = VoltageScaler(theta / threshold, **options)
        scaler1 = VoltageScaler(threshold, **options)
    return scaler0, scaler1


def _splice_block(
    fx_model: fx.GraphModule,
    activation_node: fx.Node,
    hook_node: fx.Node,
    source: Any,
    prefix: str,
    inplace: bool,
) -> None:
    """Put ``scaler0 -> if_node -> scaler1`` in the graph in place of the activation and its hook."""
    graph = fx_model.graph
    with graph.inserting_after(hook_node):
        n0 = graph.call_module(f"{prefix}.scaler0", args=(source,))
    with graph.inserting_after(n0):
        n1 = graph.call_module(f"{prefix}.if_node", args=(n0,))
    with graph.inserting_after(n1):
        n2 = graph.call_module(f"{prefix}.scaler1", args=(n1,))

    if inplace and isinstance(source, fx.Node):
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


SpikingBlockRule = _SpikingBlockRule

"""What a conversion converted, and what it left as ANN operations (and why)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ann2snn_fx.relu.rules import BLOCKS_META_KEY, all_rules, clip_rejection, describe, is_activation

__all__ = ["ConversionReport", "ConvertedActivation", "LeftActivation", "build_report", "why_left"]


@dataclass(frozen=True)
class ConvertedActivation:
    """One activation call site replaced by a spiking block.

    Attributes:
        node: Name of the activation's node in the traced graph (e.g. ``"layer1_0_relu"``).
        kind: What it was, e.g. ``"nn.ReLU 'layer1.0.relu'"`` or ``"F.relu"``.
        rule: Class name of the rule that converted it.
        block: Module path of the spiking block (``"<parent>.spiking_<k>"``), if the rule recorded it.
        threshold: The layer threshold ``s`` (a float, or a tuple of per-channel values), if recorded.
    """

    node: str
    kind: str
    rule: str
    block: str | None = None
    threshold: float | tuple[float, ...] | None = None


@dataclass(frozen=True)
class LeftActivation:
    """An activation-like operation that stayed an ANN operation.

    Attributes:
        node: Name of its node (or the module path of an untraced leaf module that contains it).
        kind: What it is, e.g. ``"F.gelu"``.
        reason: Why it was not converted, and what to do if it should be.
    """

    node: str
    kind: str
    reason: str


@dataclass
class ConversionReport:
    """The result of one ``Converter.convert_to_spiking_neurons`` call.

    Available as ``converter.last_report`` and as the ``conversion_report`` attribute of the returned model.

    Examples:
        >>> report = ConversionReport(converted=[ConvertedActivation("relu", "F.relu", "FunctionalReLURule")])
        >>> print(report)
        converted 1 activation(s), left 0
          converted relu (F.relu) by FunctionalReLURule
    """

    converted: list[ConvertedActivation] = field(default_factory=list)
    left: list[LeftActivation] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} activation(s), left {len(self.left)}"]
        for item in self.converted:
            where = f" -> {item.block}" if item.block else ""
            lines.append(f"  converted {item.node} ({item.kind}) by {item.rule}{where}")
        for left in self.left:
            lines.append(f"  left {left.node} ({left.kind}): {left.reason}")
        return "\n".join(lines)


def _summary(left: list[LeftActivation], limit: int = 6) -> str:
    text = "; ".join(f"{item.node} ({item.kind}: {item.reason})" for item in left[:limit])
    return text + (f"; and {len(left) - limit} more" if len(left) > limit else "")


def build_report(
    gm: fx.GraphModule,
    activations: dict[str, str],
    replaced: list[tuple[str, str, str, str]],
    rules: list[Any],
    inexact: list[LeftActivation] | None = None,
) -> ConversionReport:
    """The last stage of the Converter: what was converted and what was left (and why); warns when
    something was left. ``inexact`` lists further operations on spike trains that do not preserve rates
    (from :func:`ann2snn_fx.relu.pools.spiking_max_pools`)."""
    blocks = gm.meta.get(BLOCKS_META_KEY, {})
    converted = []
    for node_name, kind, rule_name, hook_target in replaced:
        block, threshold = blocks.get(hook_target, (None, None))
        if isinstance(threshold, torch.Tensor):
            threshold = tuple(float(v) for v in threshold.flatten())
        converted.append(
            ConvertedActivation(node_name, activations.get(node_name, kind), rule_name, block, threshold)
        )
    modules = dict(gm.named_modules())
    rule_types = {type(rule) for rule in rules}
    left = []
    for node in gm.graph.nodes:
        if not is_activation(node, modules):
            continue
        left.append(LeftActivation(node.name, describe(node, modules), why_left(node, modules, rule_types)))
    for node in gm.graph.nodes:
        if node.op != "call_module" or is_activation(node, modules):
            continue
        module = modules.get(node.target)
        hidden = [
            f"{node.target}.{name}"
            for name, sub in (module.named_modules() if module is not None else [])
            if name
            if isinstance(sub, (nn.ReLU, nn.ReLU6, nn.Hardtanh))
        ]
        if hidden:
            left.append(
                LeftActivation(
                    str(node.target),
                    f"untraced module {type(module).__name__} {node.target!r}",
                    f"it is a leaf module (not traced), so the activations inside it ({', '.join(hidden)}) "
                    "stay ANN operations",
                )
            )
    left.extend(inexact or [])
    report = ConversionReport(converted=converted, left=left)
    if not converted:
        warnings.warn(
            "No activation was converted to spiking neurons: the result is still an ANN. "
            + (f"Left: {_summary(left)}." if left else "The model has no ReLU-type activation.")
            + " Rules in use: "
            + ", ".join(type(rule).__name__ for rule in rules)
            + "; ann2snn_fx.all_rules() also converts F.relu, torch.relu, Tensor.relu, ReLU6, Hardtanh(0, c) "
            "and clamp(x, 0, c).",
            UserWarning,
            stacklevel=3,
        )
    elif left:
        warnings.warn(
            f"{len(left)} activation(s) stayed ANN operations: {_summary(left)}. See the model's "
            "conversion_report for details.",
            UserWarning,
            stacklevel=3,
        )
    return report


def why_left(node: fx.Node, modules: dict[str, nn.Module], rule_types: set[type]) -> str:
    """Why an activation stayed an ANN operation."""
    for rule in all_rules():
        ops = ("call_module", *getattr(rule, "node_ops", ()))
        if node.op in ops and rule.match(node, modules) and type(rule) not in rule_types:
            return (
                f"no rule in Converter.rules matches it; add {type(rule).__name__}() to rules= "
                "(ann2snn_fx.all_rules() gives every built-in rule)"
            )
    rejection = clip_rejection(node, modules)
    if rejection is not None:
        return f"not a clipped ReLU: {rejection}"
    module = modules.get(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]
    if isinstance(module, nn.ReLU) and type(module) is not nn.ReLU:
        return "a subclass of nn.ReLU; the built-in rules match exact types (write a rule for it)"
    return "not a ReLU-type activation: an integrate-and-fire neuron only represents max(0, x) (clipped)"

"""What a conversion converted, and what it left as ANN operations (and why)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ConversionReport", "ConvertedActivation", "LeftActivation"]


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

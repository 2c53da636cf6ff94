"""The conversion report of the TD path and the error raised by ``strict=True``."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TDConversionReport", "TDEquivalenceError", "TDNodeRecord"]


@dataclass(frozen=True)
class TDNodeRecord:
    """One graph node (or, in the time-folded wrapper, one op) the TD conversion looked at.

    Attributes:
        node: The FX node name, or ``"<op>#<k>"`` for ops seen by :class:`TDTimeFolded`.
        op: What the node calls, e.g. ``"call_module nn.Linear"`` or ``"call_function torch.matmul"``.
        detail: What was done (converted nodes) or why the cumulative equivalence breaks (issues).
    """

    node: str
    op: str
    detail: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.detail}"


class TDEquivalenceError(ValueError):
    """Raised by ``strict=True`` when nodes that break the cumulative equivalence are left.

    Attributes:
        issues: The offending records, in graph order.
    """

    def __init__(self, issues: list[TDNodeRecord], where: str = "replace_by_td_operators") -> None:
        self.issues = list(issues)
        lines = "\n".join(f"  - {issue}" for issue in self.issues)
        what = (
            "node(s) left in the graph" if where == "replace_by_td_operators" else "op(s) met in the forward"
        )
        super().__init__(
            f"{where}(strict=True): {len(self.issues)} {what} break the cumulative "
            f"equivalence (sum over time of the output == ANN on the cumulative input):\n{lines}"
        )


@dataclass
class TDConversionReport:
    """What a TD conversion replaced, and what it left that breaks the cumulative equivalence.

    ``converted`` lists every node rewritten into a TD operator (or a constant moved to t = 0);
    ``issues`` lists every node left in place that is not time-transparent: a constant added outside
    a TD operator that could not be moved, a shape op using a non-negative dim on a ``[T, ...]``
    tensor, dropout in training mode, an unconverted nonlinearity, or an op the pass does not know.
    An empty ``issues`` list means the pass found nothing that breaks the equivalence.

    Examples:
        >>> import torch
        >>> from ann2snn_fx import replace_by_td_operators
        >>> gm = replace_by_td_operators(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()))
        >>> report = gm.td_report
        >>> report.equivalent, len(report.converted)
        (True, 2)
    """

    converted: list[TDNodeRecord] = field(default_factory=list)
    issues: list[TDNodeRecord] = field(default_factory=list)

    @property
    def equivalent(self) -> bool:
        """True when no node that breaks the cumulative equivalence was found."""
        return not self.issues

    def raise_if_not_equivalent(self, where: str = "replace_by_td_operators") -> None:
        """Raise :class:`TDEquivalenceError` listing every issue, if there is any."""
        if self.issues:
            raise TDEquivalenceError(self.issues, where)

    def __str__(self) -> str:
        lines = [f"TD conversion: {len(self.converted)} converted, {len(self.issues)} issue(s)"]
        lines += [f"  converted {record}" for record in self.converted]
        lines += [f"  ISSUE {record}" for record in self.issues]
        return "\n".join(lines)

"""The state one run of the TD fx pass shares with its handlers: kinds of nodes, naming, the report."""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from ann2snn_fx.td.impulse import TDImpulse
from ann2snn_fx.td.report import TDConversionReport, TDNodeRecord

__all__ = ["BoundPointwise", "Kind", "PassState", "describe", "dims_of", "fn_name", "leaves"]


class Kind(enum.Enum):
    """How a graph value behaves on a differential sequence."""

    CONST = "const"  # does not depend on the time-sequence inputs (parameters, literals, shapes)
    TIME = "time"  # a [T, ...] differential sequence
    TIME_SEQ = "time_seq"  # a tuple/list holding [T, ...] sequences (MHA output, split, chunk)
    SHAPE = "shape"  # the shape of a time sequence: constant, but its leading entries count T
    SHAPE_PREFIX = "shape_prefix"  # x.shape[:-k] (+ literal sizes): keeps [T, B, ...], valid for view/reshape


_FUNCTIONAL_ALIASES: set[Any] = {F.linear, F.gelu, F.silu, F.scaled_dot_product_attention, F.conv2d}


def fn_name(target: Any) -> str:
    """A readable name of a call target: ``operator.add``, ``F.gelu``, ``torch.exp``."""
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", repr(target))
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    if module.startswith("torch.nn.functional") or target in _FUNCTIONAL_ALIASES:
        return f"F.{name}"
    if module.startswith("torch"):
        return f"torch.{name}"
    return f"{module}.{name}" if module else name


def describe(node: fx.Node, gm: fx.GraphModule) -> str:
    """The op of ``node`` as the report names it."""
    if node.op == "call_module":
        return f"call_module {type(gm.get_submodule(str(node.target))).__name__}"
    if node.op == "call_method":
        return f"call_method Tensor.{node.target}"
    return f"{node.op} {fn_name(node.target)}"


def dims_of(value: Any) -> list[int] | None:
    """``value`` as a list of literal dims, or None when it is not one."""
    if isinstance(value, int):
        return [value]
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def leaves(value: Any) -> list[Any]:
    """The leaves of nested tuples/lists/dicts."""
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in leaves(v)]
    if isinstance(value, dict):
        return leaves(list(value.values()))
    return [value]


class BoundPointwise:
    """``z -> target(z, *args, **kwargs)`` (or the method ``z.target(...)``) with literal extra arguments."""

    def __init__(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.target, self.args, self.kwargs = target, tuple(args), dict(kwargs)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if isinstance(self.target, str):
            return getattr(z, self.target)(*self.args, **self.kwargs)  # type: ignore[no-any-return]
        return self.target(z, *self.args, **self.kwargs)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        name = self.target if isinstance(self.target, str) else fn_name(self.target)
        extra = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{name}({', '.join(['x', *extra])})"


class PassState:
    """State of one conversion: the GraphModule, the report and the kinds of the nodes seen."""

    def __init__(self, gm: fx.GraphModule, static_inputs: Collection[str]) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.static_inputs = set(static_inputs)
        self.report = TDConversionReport()
        self.kinds: dict[fx.Node, Kind] = {}
        self.td_targets: dict[str, Kind] = {}
        self.counters: dict[str, int] = {}
        self.impulse_name: str | None = None

    # ---- naming and reporting ----------------------------------------------------------------
    def add_root_module(self, prefix: str, module: nn.Module) -> str:
        """Register ``module`` at the root as ``<prefix>_<first free index>``; return the name."""
        index = self.counters.get(prefix, 0)
        while hasattr(self.gm, f"{prefix}_{index}"):
            index += 1
        self.counters[prefix] = index + 1
        name = f"{prefix}_{index}"
        module.train(self.gm.training)
        self.gm.add_submodule(name, module)
        return name

    def describe(self, node: fx.Node) -> str:
        return describe(node, self.gm)

    def converted(self, node: fx.Node, op: str, detail: str) -> None:
        self.report.converted.append(TDNodeRecord(node.name, op, detail))

    def issue(self, node: fx.Node, detail: str) -> None:
        self.report.issues.append(TDNodeRecord(node.name, describe(node, self.gm), detail))

    # ---- kinds ---------------------------------------------------------------------------------
    def kind(self, value: Any) -> Kind:
        if isinstance(value, fx.Node):
            return self.kinds.get(value, Kind.CONST)
        if isinstance(value, (tuple, list)):
            kinds = [self.kind(v) for v in value]
            return Kind.TIME_SEQ if any(k in (Kind.TIME, Kind.TIME_SEQ) for k in kinds) else Kind.CONST
        if isinstance(value, dict):
            return self.kind(list(value.values()))
        if isinstance(value, slice):
            return self.kind([value.start, value.stop, value.step])
        return Kind.CONST

    def is_time(self, value: Any) -> bool:
        return self.kind(value) is Kind.TIME

    def check_dims(self, node: fx.Node, dims: Iterable[Any]) -> None:
        bad = [d for d in dims if not (isinstance(d, int) and d < 0)]
        if bad:
            self.issue(
                node,
                f"shape op with dim(s) {bad} on a [T, ...] time sequence: a non-negative dim now counts the "
                "time axis (use negative dims, or TDTimeFolded)",
            )

    # ---- graph edits ---------------------------------------------------------------------------
    def swap(
        self, node: fx.Node, op_name: str, prefix: str, module: nn.Module, inputs: Iterable[Any]
    ) -> None:
        """Replace ``node`` by a call of ``module`` (registered at the root) on ``inputs``."""
        name = self.add_root_module(prefix, module)
        with self.graph.inserting_after(node):
            new = self.graph.call_module(name, args=tuple(inputs))
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        self.kinds[new] = Kind.TIME
        self.converted(new, op_name, f"-> {name} ({type(module).__name__})")

    def impulse(self, node: fx.Node, value: Any, reference: fx.Node) -> fx.Node:
        """Insert, before ``node``, ``value`` at t = 0 (shaped after ``reference``): one shared TDImpulse."""
        if self.impulse_name is None:
            self.impulse_name = self.add_root_module("td_impulse", TDImpulse())
        with self.graph.inserting_before(node):
            new = self.graph.call_module(self.impulse_name, args=(value, reference))
        self.kinds[new] = Kind.TIME
        return new

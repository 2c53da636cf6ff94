"""Pointwise calls: GELU, SiLU, tanh/sigmoid/relu, literal-argument functions -> TD operators; dropout, pad."""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx

from ann2snn_fx.td.build import read_arg
from ann2snn_fx.td.handlers._types import table
from ann2snn_fx.td.state import BoundPointwise, Kind, PassState, leaves
from ann2snn_ops import TDGELU, TDFunction, TDSiLU

__all__ = ["HANDLERS"]

_ELEMENTWISE: dict[object, Callable[[torch.Tensor], torch.Tensor]] = {
    torch.tanh: torch.tanh,
    F.tanh: torch.tanh,
    "tanh": torch.tanh,
    torch.sigmoid: torch.sigmoid,
    F.sigmoid: torch.sigmoid,
    "sigmoid": torch.sigmoid,
    torch.relu: torch.relu,
    F.relu: torch.relu,
    "relu": torch.relu,
    # in place: readers of the input were rewired to the result (fx_pass.rewire_inplace)
    torch.relu_: torch.relu,
    F.relu_: torch.relu,
    "relu_": torch.relu,
}
# Pointwise in their first argument: with literal extra arguments, TDFunction makes them exact.
_POINTWISE = {
    torch.exp,
    "exp",
    torch.log,
    "log",
    torch.pow,
    "pow",
    operator.pow,
    torch.sqrt,
    "sqrt",
    torch.rsqrt,
    "rsqrt",
    torch.abs,
    "abs",
    torch.erf,
    "erf",
    torch.clamp,
    "clamp",
    F.elu,
    F.leaky_relu,
    F.relu6,
    F.hardtanh,
    F.mish,
    F.softplus,
    F.hardswish,
    F.hardsigmoid,
    F.selu,
    F.celu,
}
# Nonlinear and not converted (F.layer_norm / F.rms_norm are converted in norms.py).
_NONLINEAR = {torch.max, "max", torch.min, "min", torch.amax, "amax", F.conv2d}
_DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, "dropout"}


def gelu(state: PassState, node: fx.Node) -> None:
    args, kwargs = node.args, dict(node.kwargs)
    x = args[0] if args else None
    approximate = read_arg(args, kwargs, 1, "approximate", "none")
    if not isinstance(approximate, str) or not state.is_time(x):
        state.issue(node, "F.gelu needs a literal approximate and one time-sequence input")
        return
    state.swap(node, state.describe(node), "td_gelu", TDGELU(approximate=approximate), [x])  # type: ignore[arg-type]


def silu(state: PassState, node: fx.Node) -> None:
    state.swap(node, state.describe(node), "td_silu", TDSiLU(), [node.args[0] if node.args else None])


def elementwise(state: PassState, node: fx.Node) -> None:
    """tanh / sigmoid / relu -> TDFunction of the torch function."""
    function = TDFunction(_ELEMENTWISE[node.target])
    state.swap(node, state.describe(node), "td_function", function, [node.args[0] if node.args else None])


def pointwise(state: PassState, node: fx.Node) -> None:
    """A pointwise function of a time sequence with literal extra arguments -> TDFunction."""
    args, kwargs = node.args, dict(node.kwargs)
    x = args[0] if args else None
    if not state.is_time(x):
        state.issue(node, "unconverted nonlinearity")
        return
    rest = (args[1:], kwargs)
    if state.kind(rest) is not Kind.CONST or any(isinstance(a, fx.Node) for a in leaves(rest)):
        state.issue(node, "pointwise op with non-literal extra arguments is not converted")
        return
    function = BoundPointwise(node.target, args[1:], kwargs)
    state.swap(node, state.describe(node), "td_function", TDFunction(function, name=f"TD({function})"), [x])


def nonlinear(state: PassState, node: fx.Node) -> None:
    state.issue(node, "unconverted nonlinearity")


def dropout(state: PassState, node: fx.Node) -> None:
    """Identity in eval mode; in training mode a new mask every step breaks the equivalence."""
    args, kwargs = node.args, dict(node.kwargs)
    p = read_arg(args, kwargs, 1, "p", 0.5)
    training = read_arg(args, kwargs, 2, "training", True)
    if node.target == "dropout" or isinstance(training, fx.Node) or (training and p != 0):
        state.issue(node, "dropout in training mode draws a different mask at every time step")


def pad(state: PassState, node: fx.Node) -> None:
    """Zero padding is linear; padding with another constant adds it at every step."""
    value = read_arg(node.args, dict(node.kwargs), 3, "value", None)
    if value not in (None, 0, 0.0):
        state.issue(node, f"padding with the constant {value!r} adds it at every time step")


HANDLERS = table(
    ({F.gelu}, gelu),
    ({F.silu, "silu"}, silu),
    (_ELEMENTWISE, elementwise),
    (_POINTWISE, pointwise),
    (_NONLINEAR, nonlinear),
    (_DROPOUT, dropout),
    ({F.pad}, pad),
)

"""Products of two tensors: matmul / ``*`` of two time sequences become TD operators; division is checked."""

from __future__ import annotations

import operator

import torch
from torch import fx

from ann2snn_fx.td.build import read_arg
from ann2snn_fx.td.handlers._types import table
from ann2snn_fx.td.state import PassState
from ann2snn_ops import TDMatMul, TDMul

__all__ = ["HANDLERS"]


def matmul(state: PassState, node: fx.Node) -> None:
    """``matmul``/``@``/``bmm`` of two time sequences -> TDMatMul (with a constant side it is linear)."""
    args, kwargs = node.args, dict(node.kwargs)
    other = read_arg(args, kwargs, 1, "mat2" if node.target in (torch.bmm, "bmm") else "other", None)
    if state.is_time(args[0]) and state.is_time(other):
        state.swap(node, state.describe(node), "td_matmul", TDMatMul(), [args[0], other])


def mul(state: PassState, node: fx.Node) -> None:
    """Elementwise ``*`` of two time sequences -> TDMul (with a constant side it is linear)."""
    args, kwargs = node.args, dict(node.kwargs)
    other = read_arg(args, kwargs, 1, "other", None)
    if state.is_time(args[0]) and state.is_time(other):
        state.swap(node, state.describe(node), "td_mul", TDMul(), [args[0], other])


def div(state: PassState, node: fx.Node) -> None:
    """Division by a constant is linear; by a time-varying tensor it is not."""
    args, kwargs = node.args, dict(node.kwargs)
    other = read_arg(args, kwargs, 1, "other", None)
    if not state.is_time(args[0] if args else None) or state.is_time(other):
        state.issue(node, "division by a time-varying tensor is a nonlinearity")


HANDLERS = table(
    ({torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm"}, matmul),
    ({operator.mul, torch.mul, "mul", operator.imul}, mul),
    ({operator.truediv, torch.div, "div", torch.true_divide, operator.itruediv}, div),
)

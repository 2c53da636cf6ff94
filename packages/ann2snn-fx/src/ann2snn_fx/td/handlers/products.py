"""Products of two tensors: matmul / ``*`` of two time sequences become TD operators; division is checked."""

from __future__ import annotations

import operator

import torch
from torch import fx

from ann2snn_fx.td.build import read_arg
from ann2snn_fx.td.handlers._types import table
from ann2snn_fx.td.state import Kind, PassState
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


_ADD_PRODUCTS = {torch.baddbmm: "batch", "baddbmm": "batch", torch.addbmm: "batch", "addbmm": "batch"}


def add_product(state: PassState, node: fx.Node) -> None:
    """``addmm``/``baddbmm``/``addbmm(input, a, b, beta=, alpha=)`` -> ``alpha * (a @ b) + beta * input``:
    the product as a TD matmul (linear with a constant side), a constant ``beta * input`` at t = 0 only."""
    args, kwargs = node.args, dict(node.kwargs)
    stem = _ADD_PRODUCTS.get(node.target, "mat")  # type: ignore[arg-type]
    inp = read_arg(args, kwargs, 0, "input", None)
    a = read_arg(args, kwargs, 1, f"{stem}1", None)
    b = read_arg(args, kwargs, 2, f"{stem}2", None)
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    literal = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (beta, alpha))
    if len(args) > 3 or not literal or not (state.is_time(a) or state.is_time(b)):
        state.issue(node, "addmm/baddbmm/addbmm needs literal beta/alpha and a time-varying factor")
        return
    graph = state.graph
    with graph.inserting_before(node):
        product = graph.call_function(torch.matmul, args=(a, b))
        state.kinds[product] = Kind.TIME
        total = product
        if node.target in (torch.addbmm, "addbmm"):
            total = graph.call_method("sum", args=(total, -3))  # the bmm batch, past the time axis
            state.kinds[total] = Kind.TIME
        if alpha != 1:
            total = graph.call_function(operator.mul, args=(total, alpha))
            state.kinds[total] = Kind.TIME
        if beta != 0:
            term = inp if beta == 1 else graph.call_function(operator.mul, args=(inp, beta))
            if not isinstance(term, fx.Node) or term is not inp:
                state.kinds[term] = state.kind(inp)  # type: ignore[index]
            before = total
            total = graph.call_function(operator.add, args=(before, term))
            state.kinds[total] = Kind.TIME
            if state.kind(inp) is Kind.CONST:
                total.args = (before, state.impulse(total, term, before))
    node.replace_all_uses_with(total)
    graph.erase_node(node)
    state.converted(total, state.describe(total), "beta * input at t = 0 only, alpha * (a @ b) every step")
    if state.is_time(a) and state.is_time(b):
        state.swap(product, "matmul", "td_matmul", TDMatMul(), [a, b])


HANDLERS = table(
    ({torch.addmm, "addmm", torch.baddbmm, "baddbmm", torch.addbmm, "addbmm"}, add_product),
    ({torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm"}, matmul),
    ({operator.mul, torch.mul, "mul", operator.imul}, mul),
    ({operator.truediv, torch.div, "div", torch.true_divide, operator.itruediv}, div),
)

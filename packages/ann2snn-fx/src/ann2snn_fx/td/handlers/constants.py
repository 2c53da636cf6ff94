"""Constants meeting a time sequence: added, subtracted or concatenated at t = 0 only (``td_impulse``)."""

from __future__ import annotations

import operator

import torch
from torch import fx

from ann2snn_fx.td.build import read_arg
from ann2snn_fx.td.handlers._types import table
from ann2snn_fx.td.state import Kind, PassState

__all__ = ["HANDLERS"]


def affine(state: PassState, node: fx.Node) -> None:
    """``a + b`` / ``a - b``: a constant operand is added at t = 0 only."""
    args = list(node.args)
    operands = args[:2]
    reference = next((a for a in operands if state.is_time(a)), None)
    if not isinstance(reference, fx.Node):
        state.issue(node, "addition involving a non-tensor time-varying value")
        return
    changed = False
    for i, value in enumerate(operands):
        if state.kind(value) is Kind.CONST and isinstance(value, (fx.Node, int, float)):
            args[i] = state.impulse(node, value, reference)
            changed = True
    if changed:
        node.args = tuple(args)
        state.converted(node, state.describe(node), "constant operand added at t = 0 only")


def cat(state: PassState, node: fx.Node) -> None:
    """``torch.cat``/``stack``: constant members are placed at t = 0 only; the dim must be negative."""
    args, kwargs = node.args, dict(node.kwargs)
    tensors = read_arg(args, kwargs, 0, "tensors", [])
    dim = read_arg(args, kwargs, 1, "dim", 0)
    state.check_dims(node, [dim])
    if not isinstance(tensors, (list, tuple)):
        return
    reference = next((t for t in tensors if state.is_time(t)), None)
    if reference is None:
        return
    new_tensors = [t if state.is_time(t) else state.impulse(node, t, reference) for t in tensors]
    if any(a is not b for a, b in zip(new_tensors, tensors, strict=True)):
        if "tensors" in kwargs:
            node.update_kwarg("tensors", new_tensors)
        else:
            node.update_arg(0, new_tensors)
        state.converted(node, state.describe(node), "constant members placed at t = 0 only")


HANDLERS = table(
    ({operator.add, torch.add, "add", operator.iadd, operator.sub, torch.sub, "sub", operator.isub}, affine),
    ({torch.cat, torch.concat, torch.stack}, cat),
)

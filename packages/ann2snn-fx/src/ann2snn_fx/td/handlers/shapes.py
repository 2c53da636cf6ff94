"""Shape ops: shape queries, indexing, dims, splits, reshapes and casts of a ``[T, ...]`` time sequence.

They are time-transparent when they leave the leading time axis alone: the handlers only classify the
result and record an issue where a non-negative dim, an explicit size or an index would count that axis.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from ann2snn_fx.td.build import read_arg
from ann2snn_fx.td.handlers._types import table
from ann2snn_fx.td.state import Kind, PassState, dims_of

__all__ = ["HANDLERS", "visit_shape"]

_PASS = {
    "contiguous",
    "clone",
    "to",
    "float",
    "double",
    "half",
    "bfloat16",
    "type",
    "type_as",
    "detach",
    "view_as",
    "reshape_as",
    "expand_as",
    torch.clone,
    operator.pos,
    operator.neg,
    torch.neg,
    "neg",
}
_META = {"size", "dim", "numel", "ndimension", "nelement", len, torch.numel}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_floating_point"}
# op -> (index, keyword, default) of each dim argument
_DIMS: dict[Any, tuple[tuple[int, str, Any], ...]] = {
    torch.transpose: ((1, "dim0", None), (2, "dim1", None)),
    torch.roll: ((2, "dims", None),),
    "roll": ((1, "dims", None),),
    "transpose": ((0, "dim0", None), (1, "dim1", None)),
    torch.swapaxes: ((1, "axis0", None), (2, "axis1", None)),
    "swapaxes": ((0, "axis0", None), (1, "axis1", None)),
    torch.flatten: ((1, "start_dim", 0), (2, "end_dim", -1)),
    "flatten": ((0, "start_dim", 0), (1, "end_dim", -1)),
    torch.unflatten: ((1, "dim", None),),
    "unflatten": ((0, "dim", None),),
    torch.squeeze: ((1, "dim", None),),
    "squeeze": ((0, "dim", None),),
    torch.unsqueeze: ((1, "dim", None),),
    "unsqueeze": ((0, "dim", None),),
    torch.sum: ((1, "dim", None),),
    "sum": ((0, "dim", None),),
    torch.mean: ((1, "dim", None),),
    "mean": ((0, "dim", None),),
    torch.narrow: ((1, "dim", None),),
    "narrow": ((0, "dim", None),),
    torch.select: ((1, "dim", None),),
    "select": ((0, "dim", None),),
    torch.movedim: ((1, "source", None), (2, "destination", None)),
    "movedim": ((0, "source", None), (1, "destination", None)),
}
_SPLIT: dict[Any, tuple[int, str, Any]] = {
    torch.split: (2, "dim", 0),
    "split": (1, "dim", 0),
    torch.chunk: (2, "dim", 0),
    "chunk": (1, "dim", 0),
    torch.unbind: (1, "dim", 0),
    "unbind": (0, "dim", 0),
    torch.tensor_split: (2, "dim", 0),
    "tensor_split": (1, "dim", 0),
}
_SHAPE_WITH_SIZES = {"view", "reshape", "expand", "permute", "repeat", torch.reshape, torch.permute}


def _index_repr(index: Any) -> str:
    if isinstance(index, slice):
        parts = ["" if v is None else str(v) for v in (index.start, index.stop)]
        return f"[{parts[0]}:{parts[1]}]"
    return f"[{index!r}]"


def visit_shape(state: PassState, node: fx.Node) -> bool:
    """Shape queries on a time sequence; True when ``node`` was one (and has been classified).

    Runs before the table (a shape query's input is a shape, not a time sequence).
    """
    key, args, kwargs = node.target, node.args, dict(node.kwargs)
    x = args[0] if args else None
    if key is operator.getitem and isinstance(x, fx.Node) and state.kinds.get(x) is Kind.SHAPE:
        index: Any = args[1]
        bounds = [index.start, index.stop] if isinstance(index, slice) else [index]
        if not all(b is None or (isinstance(b, int) and b < 0) for b in bounds):
            state.issue(node, f"shape{_index_repr(index)} of a [T, ...] time sequence counts the time axis")
        prefix = isinstance(index, slice) and index.start is None and index.step is None
        state.kinds[node] = Kind.SHAPE_PREFIX if prefix else Kind.CONST
        return True
    if (
        key is operator.add
        and isinstance(x, fx.Node)
        and state.kinds.get(x) is Kind.SHAPE_PREFIX
        and isinstance(args[1], tuple)
        and state.kind(args[1]) is Kind.CONST
    ):
        state.kinds[node] = Kind.SHAPE_PREFIX
        return True
    if not state.is_time(x):
        return False
    if key == "size" or (key is getattr and args[1] == "shape"):
        dim = read_arg(args, kwargs, 1, "dim", None) if key == "size" else None
        if dim is None:
            state.kinds[node] = Kind.SHAPE
            return True
        if not (isinstance(dim, int) and dim < 0):
            state.issue(node, f"size({dim!r}) of a [T, ...] time sequence counts the time axis")
    elif key in ("dim", "ndimension", "numel", "nelement", len, torch.numel) or (
        key is getattr and args[1] == "ndim"
    ):
        state.issue(node, "the rank/size of a [T, ...] time sequence includes the time axis")
    else:
        return False
    state.kinds[node] = Kind.CONST
    return True


def attribute(state: PassState, node: fx.Node) -> None:
    """``getattr(x, name)``: metadata is constant; any other attribute is an issue."""
    if node.args[1] not in _META_ATTRS:
        state.issue(node, f"attribute {node.args[1]!r} of a [T, ...] time sequence")
    else:
        state.kinds[node] = Kind.CONST


def meta(state: PassState, node: fx.Node) -> None:
    state.kinds[node] = Kind.CONST


def passthrough(state: PassState, node: fx.Node) -> None:
    """Casts, copies, negation: time-transparent."""


def getitem(state: PassState, node: fx.Node) -> None:
    """Indexing a tuple of sequences is fine; indexing a sequence must start with ``...`` or ``:``."""
    x = node.args[0]
    if state.kind(x) is Kind.TIME_SEQ:
        return
    index = node.args[1]
    ok = index == slice(None) or (isinstance(index, tuple) and len(index) > 0 and index[0] is Ellipsis)
    if not ok:
        state.issue(node, f"indexing a [T, ...] time sequence with {index!r} indexes the time axis first")


def _dim_arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    """A dim argument; a method's positions start after ``self``."""
    return read_arg(
        node.args, dict(node.kwargs), index + (1 if isinstance(node.target, str) else 0), name, default
    )


def dims(state: PassState, node: fx.Node) -> None:
    """transpose / flatten / squeeze / sum / ...: every dim must be negative."""
    found: list[Any] = []
    for index, name, default in _DIMS[node.target]:
        value = _dim_arg(node, index, name, default)
        found += dims_of(value) or [value]
    if node.target in ("sum", torch.sum, "mean", torch.mean, "squeeze", torch.squeeze) and found == [None]:
        state.issue(node, "reduction or squeeze over all dims includes the time axis")
    else:
        state.check_dims(node, found)


def split(state: PassState, node: fx.Node) -> None:
    """split / chunk / unbind: a tuple of sequences, along a negative dim."""
    index, name, default = _SPLIT[node.target]
    state.kinds[node] = Kind.TIME_SEQ
    value = _dim_arg(node, index, name, default)
    state.check_dims(node, dims_of(value) or [value])


def sizes(state: PassState, node: fx.Node) -> None:
    """view / reshape with ``x.shape[:-k]`` keep the time axis; explicit sizes do not."""
    given = node.args[1:]
    prefix = (
        len(given) == 1
        and isinstance(given[0], fx.Node)
        and state.kinds.get(given[0]) in (Kind.SHAPE, Kind.SHAPE_PREFIX)
    )
    if not (prefix and node.target in ("view", "reshape", torch.reshape)):
        state.issue(
            node,
            "reshape/permute/expand with explicit sizes sees the extra leading time axis (the converted graph "
            "fails or mixes steps at run time): convert this model with TDTimeFolded, which keeps the ANN's "
            "shapes, or write the sizes as x.shape[:-k] + (...) / negative dims",
        )


HANDLERS = table(
    ({getattr}, attribute),
    (_META, meta),
    (_PASS, passthrough),
    ({operator.getitem}, getitem),
    (_DIMS, dims),
    (_SPLIT, split),
    (_SHAPE_WITH_SIZES, sizes),
)

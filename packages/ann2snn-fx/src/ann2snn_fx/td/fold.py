"""TD conversion of any model by folding time into the batch: :class:`TDTimeFolded`."""

from __future__ import annotations

import contextvars
import copy
import weakref
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ann2snn_fx.td.build import build_td_module, check_mha_call_args, read_arg, shift_dim
from ann2snn_fx.td.report import TDConversionReport, TDNodeRecord
from ann2snn_ops import (
    TDGELU,
    TDFunction,
    TDMatMul,
    TDMul,
    TDScaledDotProductAttention,
    TDSiLU,
    TDSoftmax,
)

__all__ = ["TDTimeFolded"]

Tensor = torch.Tensor
_Handler = Callable[["_FoldMode", Any, tuple[Any, ...], dict[str, Any]], Any]


def _name(func: Any) -> str:
    if isinstance(func, type):
        return func.__name__
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    qualname = qualname.replace("_TensorBase.", "Tensor.").replace("TensorBase.", "Tensor.")
    qualname = qualname.replace("_VariableFunctionsClass.", "")
    module = getattr(func, "__module__", None)
    if module and module.startswith("torch.nn.functional"):
        return f"F.{qualname}"
    if module == "torch._C._nn":
        return f"F.{qualname}"
    if qualname.startswith("Tensor."):
        return qualname
    return f"torch.{qualname}"


class _FoldMode(TorchFunctionMode):
    """Runs a model's forward on time-folded ``[T*B, ...]`` tensors with TD semantics.

    Tensors derived from the time inputs are tracked (by identity); an op that touches one is
    routed through the TD operator or identity that keeps ``sum_t y == f(sum_t x)``.
    """

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps
        # id -> (weak ref, dim holding the time-folded batch; 0 except after a permute that moved it)
        self._time: dict[int, tuple[weakref.ReferenceType[Tensor], int]] = {}
        self.converted: Counter[tuple[str, str]] = Counter()
        self.issues: Counter[tuple[str, str]] = Counter()

    # ---- bookkeeping -------------------------------------------------------------------------
    def batch_dim(self, value: Any) -> int | None:
        """The dim holding the time-folded batch if ``value`` is time-varying, else None."""
        if not isinstance(value, Tensor):
            return None
        entry = self._time.get(id(value))
        if entry is None or entry[0]() is not value:
            return None
        return entry[1]

    def is_time(self, value: Any) -> bool:
        return self.batch_dim(value) is not None

    def mark(self, value: Any, batch_dim: int = 0) -> Any:
        for leaf in pytree.tree_leaves(value):
            if isinstance(leaf, Tensor) and not self.is_time(leaf):
                self._time[id(leaf)] = (weakref.ref(leaf), batch_dim)
        return value

    def issue(self, func: Any, detail: str) -> None:
        self.issues[(_name(func), detail)] += 1

    def done(self, func: Any, detail: str) -> None:
        self.converted[(_name(func), detail)] += 1

    # ---- time axis helpers -------------------------------------------------------------------
    def unfold(self, x: Tensor) -> Tensor:
        return x.unflatten(0, (self.steps, -1))

    def step_constant(self, constant: Any, reference: Tensor) -> Any:
        """One time step's worth of a constant: a per-sample constant of the folded batch loses it."""
        if isinstance(constant, Tensor) and constant.dim() >= reference.dim() and constant.shape[0] != 1:
            if constant.dim() > reference.dim() or constant.shape[0] != reference.shape[0]:
                raise _Unsupported("a constant whose leading dim is not the time-folded batch")
            return self.unfold(constant)[0]
        return constant

    def add_at_t0(self, x: Tensor, constant: Any) -> Tensor:
        """``x`` plus ``constant`` at t = 0 only (the differential form of adding a constant)."""
        steps = self.unfold(x)
        head = steps[0] + self.step_constant(constant, x)
        tail = steps[1:].expand(self.steps - 1, *head.shape)
        return torch.cat([head.unsqueeze(0), tail], dim=0).flatten(0, 1)

    def add_at_t0_(self, fresh: Tensor, constant: Any) -> Tensor:
        """:meth:`add_at_t0` in place, for a tensor this mode just created (no other user sees it)."""
        head = self.unfold(fresh)[0]
        step = self.step_constant(constant, fresh)
        if torch.broadcast_shapes(head.shape, getattr(step, "shape", ())) != head.shape:
            return self.add_at_t0(fresh, constant)
        head.add_(step)
        return fresh

    def impulse(self, constant: Tensor, reference: Tensor) -> Tensor:
        """A folded constant as a differential sequence: itself at t = 0, zeros after."""
        if constant.dim() != reference.dim() or constant.shape[0] != reference.shape[0]:
            raise _Unsupported("concatenating a constant without the time-folded batch dim")
        steps = self.unfold(constant)
        return torch.cat([steps[:1], torch.zeros_like(steps[1:])], dim=0).flatten(0, 1)

    def td(self, module: nn.Module, *inputs: Tensor) -> Tensor:
        out = module(*[self.unfold(x) for x in inputs])
        return out.flatten(0, 1)

    # ---- dispatch ----------------------------------------------------------------------------
    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        leaves = pytree.tree_leaves((args, kwargs))
        if not any(self.is_time(leaf) for leaf in leaves):
            return func(*args, **kwargs)
        if func in _SELF_ONLY and not self.is_time(args[0] if args else None):
            return func(*args, **kwargs)  # uses only the shape/dtype of its time-varying argument
        if func in _FACTORIES:
            return func(*args, **kwargs)  # new tensors that take only shape/dtype/device from the input
        if any(self.batch_dim(leaf) not in (None, 0) for leaf in leaves):
            return self.displaced(func, args, kwargs)
        handler = _HANDLERS.get(func)
        if handler is None:
            if func in _META:
                return func(*args, **kwargs)
            if func in _NONLINEAR:
                self.issue(func, "unconverted nonlinearity")
            else:
                self.issue(func, "op not known to be time-transparent")
            return self.mark(func(*args, **kwargs))
        try:
            return self.mark(handler(self, func, args, kwargs))
        except _Unsupported as error:
            self.issue(func, str(error))
            return self.mark(func(*args, **kwargs))

    def displaced(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Ops on a tensor whose folded batch was moved off dim 0 (``qkv.permute(2, 0, 3, 1, 4)``).

        Only taking slices along a leading dim (``unbind(0)``, ``x[i]``, ``select(0, i)``) is
        understood; it moves the batch dim back towards 0.
        """
        if func in _META:
            return func(*args, **kwargs)
        x = args[0]
        position = self.batch_dim(x)
        if position is None:  # the displaced tensor is another argument
            self.issue(func, "op on a tensor whose time-folded batch dim was moved off dim 0")
            return self.mark(func(*args, **kwargs))
        removed: int | None = None
        if func is Tensor.unbind or func is torch.unbind:
            removed = read_arg(args, kwargs, 1, "dim", 0) % x.dim()
        elif func is Tensor.select or func is torch.select:
            removed = read_arg(args, kwargs, 1, "dim", None) % x.dim()
        elif func is Tensor.__getitem__ and isinstance(args[1], int):
            removed = 0
        elif func in (Tensor.permute, torch.permute):
            order = _permutation(args)
            return self.mark(func(*args, **kwargs), order.index(position))
        if removed is None or removed >= position:
            self.issue(func, "op on a tensor whose time-folded batch dim was moved off dim 0")
            return self.mark(func(*args, **kwargs))
        return self.mark(func(*args, **kwargs), position - 1)


def _permutation(args: tuple[Any, ...]) -> list[int]:
    dims = args[1:]
    flat = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else list(dims)
    return [d % args[0].dim() for d in flat]


class _Unsupported(Exception):
    """An op the fold mode cannot make time-equivalent; it runs unchanged and is reported."""


# ---- handlers ---------------------------------------------------------------------------------
def _passthrough(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return func(*args, **kwargs)


def _reshape(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    out = func(*args, **kwargs)
    for leaf in pytree.tree_leaves(out):
        if isinstance(leaf, Tensor) and (leaf.dim() == 0 or leaf.shape[0] % mode.steps != 0):
            raise _Unsupported("reshape that does not keep the time-folded batch as the leading dim")
    return out


def _no_dim0(*positions: tuple[int, str, Any]) -> _Handler:
    """Linear ops whose dim arguments must not touch the time-folded batch dim 0."""

    def handler(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = args[0]
        for index, name, default in positions:
            value = read_arg(args, kwargs, index, name, default)
            values = value if isinstance(value, (tuple, list)) else [value]
            for dim in values:
                if dim is None or (isinstance(dim, int) and dim % max(x.dim(), 1) == 0):
                    raise _Unsupported(f"dim={value!r} mixes the time-folded batch")
        return func(*args, **kwargs)

    return handler


def _getitem(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    index = args[1]
    first = index[0] if isinstance(index, tuple) and index else index
    if not (first is Ellipsis or first == slice(None)):
        raise _Unsupported("indexing the time-folded batch dim")
    return func(*args, **kwargs)


def _permute(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    order = _permutation(args)
    return mode.mark(func(*args, **kwargs), order.index(0))


def _cat(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    tensors = list(read_arg(args, kwargs, 0, "tensors", []))
    dim = read_arg(args, kwargs, 1, "dim", 0)
    reference = next(t for t in tensors if mode.is_time(t))
    if func is not torch.stack and dim % reference.dim() == 0:
        raise _Unsupported("concatenation along the time-folded batch dim")
    if func is torch.stack and dim % (reference.dim() + 1) == 0:
        raise _Unsupported("stacking along the time-folded batch dim")
    # an empty constant (a fresh cache, the legacy 1-D [0] tensor) contributes nothing
    fixed = [
        t if mode.is_time(t) else mode.impulse(t, reference) for t in tensors if mode.is_time(t) or t.numel()
    ]
    if len(fixed) != len(tensors) or any(a is not b for a, b in zip(fixed, tensors, strict=True)):
        mode.done(func, "constant members placed at t = 0 only")
    rest = {k: v for k, v in kwargs.items() if k != "tensors"}
    return func(fixed, *args[1:], **rest)


def _add(sign: int, reverse: bool = False) -> _Handler:
    """add/sub (``reverse`` for ``c - x`` written as ``x.__rsub__(c)``); constants go to t = 0."""

    def handler(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        a, b = args[0], read_arg(args, kwargs, 1, "other", None)
        if mode.is_time(a) and mode.is_time(b):
            return func(*args, **kwargs)
        scale = sign * kwargs.get("alpha", 1)
        if reverse:  # b - a
            time, constant = (-a, b) if mode.is_time(a) else (b, -a)
        elif mode.is_time(a):
            time, constant = a, b * scale
        else:
            time, constant = b * scale, a
        if isinstance(constant, Tensor) and not constant.is_floating_point() and constant.dim() > 0:
            raise _Unsupported("adding an integer tensor to a time sequence")
        mode.done(func, "constant added at t = 0 only")
        return mode.add_at_t0(time, constant)

    return handler


def _inplace(kind: str) -> _Handler:
    """In-place add/sub/mul/div on a time-varying tensor (``x += residual``, ``x *= scale``)."""

    def handler(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x, other = args[0], read_arg(args, kwargs, 1, "other", None)
        if not mode.is_time(x):
            raise _Unsupported("an in-place op that makes a constant tensor time-varying")
        if kind in ("add", "sub"):
            if mode.is_time(other):
                return func(*args, **kwargs)
            scale = kwargs.get("alpha", 1) * (1 if kind == "add" else -1)
            mode.done(func, "constant added at t = 0 only")
            return mode.add_at_t0_(x, other * scale)
        if mode.is_time(other):
            if kind == "div":
                raise _Unsupported("division by a time-varying tensor is a nonlinearity")
            mode.done(func, "-> TDMul")
            return x.copy_(mode.td(TDMul(), *torch.broadcast_tensors(x, other)))
        return func(*args, **kwargs)

    return handler


def _mul(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    a, b = args[0], read_arg(args, kwargs, 1, "other", None)
    if mode.is_time(a) and mode.is_time(b):
        mode.done(func, "-> TDMul")
        a, b = torch.broadcast_tensors(a, b)
        return mode.td(TDMul(), a, b)
    return func(*args, **kwargs)


def _div(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    b = read_arg(args, kwargs, 1, "other", None)
    if mode.is_time(b):
        raise _Unsupported("division by a time-varying tensor is a nonlinearity")
    return func(*args, **kwargs)


def _matmul(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    a, b = args[0], args[1] if len(args) > 1 else next(iter(kwargs.values()))
    if mode.is_time(a) and mode.is_time(b):
        if a.dim() != b.dim():
            raise _Unsupported("matmul of two time sequences of different ranks")
        mode.done(func, "-> TDMatMul")
        return mode.td(TDMatMul(), a, b)
    if (not mode.is_time(a) and a.dim() >= 3) or (not mode.is_time(b) and b.dim() >= 3):
        # a batched constant factor must not be mistaken for per-sample data of the folded batch
        raise _Unsupported("matmul with a batched constant factor")
    return func(*args, **kwargs)


def _unary(make: Callable[[tuple[Any, ...], dict[str, Any]], nn.Module]) -> _Handler:
    def handler(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        module = make(args, kwargs)
        mode.done(func, f"-> {type(module).__name__}")
        return mode.td(module, args[0])

    return handler


def _softmax(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    dim = read_arg(args, kwargs, 1, "dim", None)
    dtype = kwargs.get("dtype", read_arg(args, kwargs, 3 if func is F.softmax else 2, "dtype", None))
    if not isinstance(dim, int) or dim % x.dim() == 0:
        raise _Unsupported(f"softmax over dim={dim!r} mixes the time-folded batch")
    if dtype is not None:
        x = x.to(dtype)
    mode.done(func, "-> TDSoftmax")
    return mode.td(TDSoftmax(dim=shift_dim(dim)), x)


def _gelu(args: tuple[Any, ...], kwargs: dict[str, Any]) -> nn.Module:
    return TDGELU(approximate=read_arg(args, kwargs, 1, "approximate", "none"))


def _norm(kind: str) -> _Handler:
    """layer_norm/rms_norm: the normalisation as a TD op, then the affine part on the folded steps.

    The affine part is linear (weight on every step, bias at t = 0), and keeping it outside the TD
    op lets gradients reach the model's own weight and bias.
    """

    def handler(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        shape = read_arg(args, kwargs, 1, "normalized_shape", None)
        weight = read_arg(args, kwargs, 2, "weight", None)
        bias = read_arg(args, kwargs, 3, "bias", None) if kind == "layer" else None
        eps = read_arg(args, kwargs, 4 if kind == "layer" else 3, "eps", 1e-5 if kind == "layer" else None)
        if mode.is_time(weight) or mode.is_time(bias):
            raise _Unsupported("a time-varying weight or bias")
        if kind == "layer":
            td = TDFunction(lambda z: F.layer_norm(z, shape, None, None, eps), name="TDLayerNorm")
        else:
            td = TDFunction(lambda z: F.rms_norm(z, shape, None, eps), name="TDRMSNorm")
        mode.done(func, f"-> {td.name}")
        out = mode.td(td, args[0])
        if weight is not None:
            out = out * weight
        return out if bias is None else mode.add_at_t0_(out, bias)

    return handler


def _affine(bias_index: int, channel_dims: int | None) -> _Handler:
    """linear/conv: apply the weight to every step, the bias at t = 0 only (as TDLinear/TDConv2d)."""

    def handler(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if any(mode.is_time(a) for a in pytree.tree_leaves((args[1:], kwargs))):
            raise _Unsupported("a time-varying weight or bias")
        bias = read_arg(args, kwargs, bias_index, "bias", None)
        call_args = list(args)
        if len(call_args) > bias_index:
            call_args[bias_index] = None
        rest = {k: v for k, v in kwargs.items() if k != "bias"}
        out = func(*call_args, **rest)
        if bias is None:
            return out
        mode.done(func, "bias added at t = 0 only")
        if channel_dims is not None:
            bias = bias.reshape(-1, *([1] * (out.dim() - 2)))
        return mode.add_at_t0_(out, bias)

    return handler


def _sdpa(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    q, k, v = (read_arg(args, kwargs, i, n, None) for i, n in enumerate(("query", "key", "value")))
    if not (mode.is_time(q) and mode.is_time(k) and mode.is_time(v)):
        raise _Unsupported("attention whose query, key and value are not all time-varying")
    mask = read_arg(args, kwargs, 3, "attn_mask", None)
    dropout_p = read_arg(args, kwargs, 4, "dropout_p", 0.0)
    is_causal = read_arg(args, kwargs, 5, "is_causal", False)
    scale = read_arg(args, kwargs, 6, "scale", None)
    if read_arg(args, kwargs, 7, "enable_gqa", False) and k.shape[-3] != q.shape[-3]:
        # grouped-query attention: each key/value head serves q_heads / kv_heads query heads
        if q.shape[-3] % k.shape[-3]:
            raise _Unsupported("enable_gqa=True with query heads not a multiple of key/value heads")
        groups = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    if dropout_p != 0.0:
        raise _Unsupported("attention dropout draws a different mask at every time step")
    if mode.is_time(mask):
        raise _Unsupported("a time-varying attention mask")
    if isinstance(mask, Tensor) and mask.dim() == q.dim() and mask.shape[0] == q.shape[0]:
        mask = mode.unfold(mask)[0]
    if is_causal and mask is not None:
        # SDPA ignores neither; keep the plain call's semantics by folding causality into the mask
        raise _Unsupported("is_causal=True together with attn_mask")
    mode.done(func, "-> TDScaledDotProductAttention")
    module = TDScaledDotProductAttention(is_causal=bool(is_causal), scale=scale)
    return module(mode.unfold(q), mode.unfold(k), mode.unfold(v), mask).flatten(0, 1)


def _dropout(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    p = read_arg(args, kwargs, 1, "p", 0.5)
    training = read_arg(args, kwargs, 2, "training", True)
    if training and p != 0:
        raise _Unsupported("dropout in training mode draws a different mask at every time step")
    return func(*args, **kwargs)


def _masked_fill(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x, mask, value = (
        args[0],
        read_arg(args, kwargs, 1, "mask", None),
        read_arg(args, kwargs, 2, "value", None),
    )
    if mode.is_time(mask) or mode.is_time(value):
        raise _Unsupported("a time-varying mask or fill value")
    if isinstance(value, (int, float)) and value == 0:
        return func(*args, **kwargs)
    zeroed = func(x, mask, 0)
    filled = torch.zeros_like(x).masked_fill(mask, value)
    mode.done(func, "fill value placed at t = 0 only")
    return mode.add_at_t0(zeroed, filled)


def _pointwise(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A pointwise function of its first argument; the others must be constants that need no gradient."""
    x, rest = args[0], args[1:]
    if not mode.is_time(x) or any(
        mode.is_time(a) or (isinstance(a, Tensor) and a.requires_grad)
        for a in pytree.tree_leaves((rest, kwargs))
    ):
        raise _Unsupported("a pointwise op whose extra arguments are time-varying or trainable")
    mode.done(func, "-> TDFunction")
    return mode.td(TDFunction(lambda z: func(z, *rest, **kwargs), name=f"TD({_name(func)})"), x)


def _addmm(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``addmm(bias, x, w)`` (e.g. GPT-2's Conv1D): the product on every step, the bias at t = 0."""
    bias, x, weight = args[:3]
    if mode.is_time(bias) or mode.is_time(weight) or not mode.is_time(x) or args[3:] or kwargs:
        raise _Unsupported("addmm other than bias + time-varying input @ constant weight")
    mode.done(func, "bias added at t = 0 only")
    return mode.add_at_t0_(torch.mm(x, weight), bias)


def _elementwise(fn: Callable[[Tensor], Tensor]) -> _Handler:
    return _unary(lambda args, kwargs: TDFunction(fn))


_DIM1 = ((1, "dim", None),)
_HANDLERS: dict[Any, _Handler] = {}
_f: Any
_fn: Any
for _f in (
    Tensor.view,
    Tensor.reshape,
    torch.reshape,
    Tensor.view_as,
    Tensor.reshape_as,
    Tensor.expand,
    Tensor.expand_as,
    Tensor.repeat,
):
    _HANDLERS[_f] = _reshape
for _f in (
    Tensor.contiguous,
    Tensor.clone,
    torch.clone,
    Tensor.to,
    Tensor.float,
    Tensor.double,
    Tensor.half,
    Tensor.bfloat16,
    Tensor.type_as,
    Tensor.type,
    Tensor.detach,
    Tensor.neg,
    Tensor.__neg__,
    torch.neg,
    Tensor.__pos__,
    F.pad,
):
    _HANDLERS[_f] = _passthrough
_HANDLERS.update(
    {
        Tensor.__getitem__: _getitem,
        Tensor.transpose: _no_dim0((1, "dim0", None), (2, "dim1", None)),
        torch.transpose: _no_dim0((1, "dim0", None), (2, "dim1", None)),
        Tensor.swapaxes: _no_dim0((1, "axis0", None), (2, "axis1", None)),
        Tensor.flatten: _passthrough,
        torch.flatten: _passthrough,
        Tensor.unflatten: _no_dim0((1, "dim", None)),
        Tensor.squeeze: _no_dim0((1, "dim", None)),
        Tensor.unsqueeze: _no_dim0((1, "dim", None)),
        torch.unsqueeze: _no_dim0((1, "dim", None)),
        Tensor.sum: _no_dim0((1, "dim", None)),
        torch.sum: _no_dim0((1, "dim", None)),
        Tensor.mean: _no_dim0((1, "dim", None)),
        torch.mean: _no_dim0((1, "dim", None)),
        Tensor.split: _no_dim0((2, "dim", 0)),
        torch.split: _no_dim0((2, "dim", 0)),
        Tensor.chunk: _no_dim0((2, "dim", 0)),
        torch.chunk: _no_dim0((2, "dim", 0)),
        Tensor.unbind: _no_dim0((1, "dim", 0)),
        Tensor.narrow: _no_dim0((1, "dim", None)),
        Tensor.select: _no_dim0((1, "dim", None)),
        Tensor.permute: _permute,
        torch.permute: _permute,
        torch.cat: _cat,
        torch.concat: _cat,
        torch.stack: _cat,
        Tensor.add: _add(1),
        torch.add: _add(1),
        Tensor.__add__: _add(1),
        Tensor.__radd__: _add(1),
        Tensor.sub: _add(-1),
        torch.sub: _add(-1),
        Tensor.__sub__: _add(-1),
        Tensor.__rsub__: _add(-1, reverse=True),
        Tensor.mul: _mul,
        torch.mul: _mul,
        Tensor.__mul__: _mul,
        Tensor.__rmul__: _mul,
        Tensor.div: _div,
        torch.div: _div,
        Tensor.__truediv__: _div,
        Tensor.matmul: _matmul,
        torch.matmul: _matmul,
        Tensor.__matmul__: _matmul,
        Tensor.bmm: _matmul,
        torch.bmm: _matmul,
        F.linear: _affine(2, None),
        F.conv1d: _affine(2, 1),
        F.conv2d: _affine(2, 2),
        F.conv3d: _affine(2, 3),
        F.softmax: _softmax,
        torch.softmax: _softmax,
        Tensor.softmax: _softmax,
        F.gelu: _unary(_gelu),
        F.silu: _unary(lambda args, kwargs: TDSiLU()),
        F.layer_norm: _norm("layer"),
        F.rms_norm: _norm("rms"),
        F.scaled_dot_product_attention: _sdpa,
        F.dropout: _dropout,
        Tensor.masked_fill: _masked_fill,
        Tensor.add_: _inplace("add"),
        Tensor.__iadd__: _inplace("add"),
        Tensor.sub_: _inplace("sub"),
        Tensor.__isub__: _inplace("sub"),
        Tensor.mul_: _inplace("mul"),
        Tensor.__imul__: _inplace("mul"),
        Tensor.div_: _inplace("div"),
        Tensor.__itruediv__: _inplace("div"),
        torch.addmm: _addmm,
        torch.masked_fill: _masked_fill,
    }
)
for _f, _fn in (
    (torch.tanh, torch.tanh),
    (Tensor.tanh, torch.tanh),
    (F.tanh, torch.tanh),
    (torch.sigmoid, torch.sigmoid),
    (Tensor.sigmoid, torch.sigmoid),
    (F.sigmoid, torch.sigmoid),
    (torch.relu, torch.relu),
    (Tensor.relu, torch.relu),
    (F.relu, torch.relu),
):
    _HANDLERS[_f] = _elementwise(_fn)
_META: set[Any] = {
    Tensor.size,
    Tensor.dim,
    Tensor.numel,
    Tensor.shape.__get__,  # type: ignore[attr-defined]
    Tensor.dtype.__get__,  # type: ignore[attr-defined]
    Tensor.device.__get__,  # type: ignore[attr-defined]
    Tensor.ndim.__get__,  # type: ignore[attr-defined]
    Tensor.is_floating_point,
    Tensor.__len__,
    Tensor.requires_grad.__get__,  # type: ignore[attr-defined]
    Tensor.is_nested.__get__,  # type: ignore[attr-defined]
}
_SELF_ONLY: set[Any] = {Tensor.expand_as, Tensor.view_as, Tensor.reshape_as, Tensor.type_as, Tensor.to}
_FACTORIES: set[Any] = {
    Tensor.new_tensor,
    Tensor.new_zeros,
    Tensor.new_ones,
    Tensor.new_full,
    Tensor.new_empty,
    torch.zeros_like,
    torch.ones_like,
    torch.full_like,
    torch.empty_like,
}
# Pointwise functions of one time-varying tensor (further arguments constant): TDFunction makes them exact.
_POINTWISE: set[Any] = {
    torch.exp,
    Tensor.exp,
    torch.log,
    Tensor.log,
    torch.pow,
    Tensor.pow,
    Tensor.__pow__,
    torch.sqrt,
    Tensor.sqrt,
    torch.rsqrt,
    Tensor.rsqrt,
    torch.abs,
    Tensor.abs,
    torch.erf,
    Tensor.erf,
    torch.sin,
    torch.cos,
    torch.clamp,
    Tensor.clamp,
    F.elu,
    F.leaky_relu,
    F.relu6,
    F.hardtanh,
    F.hardswish,
    F.hardsigmoid,
    F.mish,
    F.softplus,
    F.selu,
    F.celu,
}
for _f in _POINTWISE:
    _HANDLERS[_f] = _pointwise
_NONLINEAR: set[Any] = {F.batch_norm, F.group_norm, F.instance_norm}


_CURRENT_MODE: contextvars.ContextVar[_FoldMode | None] = contextvars.ContextVar("td_fold_mode", default=None)


class _FoldedMultiheadAttention(nn.Module):
    """Stands in for an ``nn.MultiheadAttention`` inside :class:`TDTimeFolded` (unfolds, runs TD, folds)."""

    def __init__(self, td: nn.Module) -> None:
        super().__init__()
        self.td = td

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, None]:
        mode = _CURRENT_MODE.get()
        check_mha_call_args((query, key, value, *args), kwargs)
        if mode is None or not all(mode.is_time(t) for t in (query, key, value)):
            raise ValueError("TDTimeFolded: multi-head attention needs time-varying query, key and value.")
        attn_mask = read_arg((query, key, value, *args), kwargs, 5, "attn_mask", None)
        is_causal = read_arg((query, key, value, *args), kwargs, 7, "is_causal", False)
        with torch._C.DisableTorchFunction():
            out, _ = self.td(
                mode.unfold(query),
                mode.unfold(key),
                mode.unfold(value),
                need_weights=False,
                attn_mask=attn_mask,
                is_causal=is_causal,
            )
            out = out.flatten(0, 1)
        mode.done(nn.MultiheadAttention, "-> TDMultiheadAttention")
        mode.mark(out)
        return out, None


class TDTimeFolded(nn.Module):
    """Run any model as a TD network by folding the time axis into the batch.

    The wrapped model (a deep copy of ``ann``) sees its time inputs as ``[T*B, ...]`` tensors, so its
    own reshapes, transposes, ``x.size(0)`` batch sizes and attention masks stay valid, whatever the
    Python code around them (no torch.fx tracing: Hugging Face models work as they are). During the
    forward, every torch op that touches a time-varying tensor is checked: linear and shape ops run
    unchanged; softmax, GELU, SiLU, tanh/sigmoid/relu, layer/RMS norm, scaled dot-product attention and
    products of two time-varying tensors run as the TD operators of ``ann2snn_ops`` on the unfolded
    ``[T, B, ...]`` view; biases and constants added to a time-varying tensor (positional and token-type
    embeddings, attention masks, ``F.linear``/conv biases) are applied at t = 0 only;
    ``nn.MultiheadAttention`` modules are replaced by ``TDMultiheadAttention`` (seed validation).
    Anything else touching time-varying data is recorded in :attr:`report` (and raises with
    ``strict=True``): ops on the folded batch dim, dropout in training mode, unconverted nonlinearities.
    A cast of time-varying data to a lower precision (Llama's RMSNorm computes in float32) rounds every
    step separately, so the equivalence then holds to that precision.

    Args:
        ann: The model. It is deep-copied; the caller's model is never modified, moved or re-moded.
        device: Device of the copy; default the first parameter's device, else CPU.
        time_inputs: Which forward arguments are time sequences ``[T, B, ...]``: positional indices and/or
            keyword names. Default: every floating-point tensor argument. Other tensor arguments are
            static; one whose leading dim equals ``B`` is repeated over the ``T`` steps (masks, ids).
        strict: Raise :class:`~ann2snn_fx.TDEquivalenceError` at the end of a forward that met ops
            breaking the cumulative equivalence.

    Attributes:
        report: The :class:`~ann2snn_fx.TDConversionReport` of the last forward (ops aggregated by kind).

    Shape:
        - Time inputs: ``[T, B, *ann_input_shape[1:]]``; static inputs as the ANN takes them.
        - Output: every time-varying tensor of the ANN's output (nested in tuples, dicts or
          ``ModelOutput``) as ``[T, B, ...]``; ``out.cumsum(0)[t] == ann(x.cumsum(0)[t])``.

    Examples:
        >>> import torch
        >>> from ann2snn_fx import TDTimeFolded
        >>> _ = torch.manual_seed(0)
        >>> ann = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Flatten(1), torch.nn.Softmax(1)).eval()
        >>> snn = TDTimeFolded(ann, strict=True)
        >>> x_seq = torch.randn(5, 3, 6)
        >>> torch.allclose(snn(x_seq).cumsum(0), ann(x_seq.cumsum(0).flatten(0, 1)).unflatten(0, (5, 3)), atol=1e-6)
        True
    """

    def __init__(
        self,
        ann: nn.Module,
        device: torch.device | str | None = None,
        *,
        time_inputs: Collection[int | str] | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(ann, nn.Module):
            raise TypeError(f"TDTimeFolded expects an nn.Module, but got {type(ann).__name__}.")
        if device is None:
            first = next(ann.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.model = copy.deepcopy(ann).to(device)
        self.time_inputs = None if time_inputs is None else set(time_inputs)
        self.strict = strict
        self.report = TDConversionReport()
        self.training = ann.training
        for name, module in list(self.model.named_modules()):
            if type(module) is nn.MultiheadAttention:
                td = build_td_module(module)
                assert td is not None
                parent_name, _, attr = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                wrapper = _FoldedMultiheadAttention(td)
                wrapper.train(module.training)
                setattr(parent, attr, wrapper)

    def _is_time(self, key: int | str, value: Any) -> bool:
        if not isinstance(value, Tensor):
            return False
        if self.time_inputs is None:
            return value.is_floating_point()
        return key in self.time_inputs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model on time sequences; see the class docstring for shapes."""
        items: list[tuple[int | str, Any]] = [*enumerate(args), *kwargs.items()]
        times = [(key, value) for key, value in items if self._is_time(key, value)]
        if not times:
            raise ValueError(
                "TDTimeFolded expects at least one time-sequence tensor input [T, B, ...], but got none."
            )
        for key, value in times:
            if value.dim() < 2 or value.shape[0] == 0:
                raise ValueError(
                    f"TDTimeFolded expects time input {key!r} with shape [T, B, ...] and a non-empty time "
                    f"dimension, but got shape {tuple(value.shape)}."
                )
        steps, batch = times[0][1].shape[:2]
        for key, value in times:
            if tuple(value.shape[:2]) != (steps, batch):
                raise ValueError(
                    f"TDTimeFolded expects every time input to share [T, B] = {[steps, batch]}, but {key!r} has "
                    f"shape {tuple(value.shape)}."
                )
        mode = _FoldMode(steps)
        time_keys = {key for key, _ in times}

        def fold(key: int | str, value: Any) -> Any:
            if key in time_keys:
                return mode.mark(value.flatten(0, 1))
            if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == batch:
                return value.unsqueeze(0).expand(steps, *value.shape).flatten(0, 1)
            return value

        folded_args = [fold(i, v) for i, v in enumerate(args)]
        folded_kwargs = {k: fold(k, v) for k, v in kwargs.items()}
        token = _CURRENT_MODE.set(mode)
        try:
            with mode:
                out = self.model(*folded_args, **folded_kwargs)
        finally:
            _CURRENT_MODE.reset(token)

        def unfold(value: Any) -> Any:
            if not isinstance(value, Tensor):
                return value
            if mode.batch_dim(value) == 0 and value.dim() >= 1 and value.shape[0] % steps == 0:
                return mode.unfold(value)
            if mode.is_time(value):
                mode.issue(type(self.model), "output without the time-folded batch as its leading dim")
                return value
            if value.dim() >= 1 and value.shape[0] == steps * batch:
                return mode.unfold(mode.impulse(value, value))
            mode.issue(type(self.model), f"constant output of shape {tuple(value.shape)} has no time axis")
            return value

        result = pytree.tree_map(unfold, out)
        self.report = TDConversionReport(
            converted=[
                TDNodeRecord(op, op, f"{detail} (x{n})") for (op, detail), n in mode.converted.items()
            ],
            issues=[TDNodeRecord(op, op, f"{detail} (x{n})") for (op, detail), n in mode.issues.items()],
        )
        if self.strict:
            self.report.raise_if_not_equivalent("TDTimeFolded")
        return result

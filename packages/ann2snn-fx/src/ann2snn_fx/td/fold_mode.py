"""The ``TorchFunctionMode`` behind :class:`~ann2snn_fx.td.fold.TDTimeFolded`: tracks time tensors, dispatches ops."""

from __future__ import annotations

import contextvars
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ann2snn_fx.td.build import read_arg
from ann2snn_fx.td.fold_fuse import ACTIVE, _Watch
from ann2snn_fx.td.fold_handlers import Tensor, _leaves, _name, _permutation, _Unsupported
from ann2snn_fx.td.fold_table import _FACTORIES, _HANDLERS, _META, _NONLINEAR, _SELF_ONLY


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target`` (cheaper than ``torch.broadcast_shapes``)."""
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target), strict=False))


def _fits(step: Any, x: Tensor, steps: int) -> bool:
    """Whether adding ``step`` (one time step's constant) to a step of ``x`` keeps that step's shape and dtype
    (a float number, or a tensor of ``x``'s dtype and device broadcasting to the step), so it can be added in
    place."""
    if isinstance(step, Tensor):
        return (
            step.dtype == x.dtype
            and step.device == x.device
            and _broadcasts_to(tuple(step.shape), (x.shape[0] // steps, *x.shape[1:]))
        )
    return type(step) in (int, float) and x.is_floating_point()


def _time_dims(time: Mapping[int, tuple[Any, int]], values: Iterable[Any], dims: list[int]) -> None:
    """Append to ``dims`` the folded-batch dim of every time-varying tensor among ``values`` (tensors, or
    tuples/lists/dicts of them). A flat walk first: most calls take tensors and numbers."""
    for value in values:
        if isinstance(value, Tensor):
            entry = time.get(id(value))
            if entry is not None and entry[0]() is value:
                dims.append(entry[1])
        elif isinstance(value, (tuple, list, dict)):
            for leaf in _leaves(value, []):
                entry = time.get(id(leaf))
                if entry is not None and entry[0]() is leaf:
                    dims.append(entry[1])


class _FoldMode(TorchFunctionMode):
    """Runs a model's forward on time-folded ``[T*B, ...]`` tensors with TD semantics.

    Tensors derived from the time inputs are tracked (by identity); an op that touches one is
    routed through the TD operator or identity that keeps ``sum_t y == f(sum_t x)``.
    """

    # whether leaf modules checked once run fused (fold_fuse); the shape probe's recording runs keep every op
    fuse_leaves = True

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps
        # id -> (weak ref, dim holding the time-folded batch; 0 except after a permute that moved it)
        self._time: dict[int, tuple[weakref.ReferenceType[Tensor], int]] = {}
        self.converted: Counter[tuple[str, str]] = Counter()
        self.issues: Counter[tuple[str, str]] = Counter()
        self.watch: _Watch | None = None  # a leaf module's checked call (fold_fuse) watches the ops
        self._active: list[contextvars.Token[_FoldMode | None]] = []

    def __enter__(self) -> _FoldMode:
        self._active.append(ACTIVE.set(self))
        return super().__enter__()  # type: ignore[no-any-return]

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        ACTIVE.reset(self._active.pop())

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
        if not isinstance(value, Tensor):
            return False
        entry = self._time.get(id(value))
        return entry is not None and entry[0]() is value

    def mark(self, value: Any, batch_dim: int = 0) -> Any:
        time = self._time
        if isinstance(value, Tensor):  # the usual single result
            entry = time.get(id(value))
            if entry is None or entry[0]() is not value:
                time[id(value)] = (weakref.ref(value), batch_dim)
            return value
        for leaf in _leaves(value, []):
            entry = time.get(id(leaf))
            if entry is None or entry[0]() is not leaf:
                time[id(leaf)] = (weakref.ref(leaf), batch_dim)
        return value

    def issue(self, func: Any, detail: str) -> None:
        self.issues[(_name(func), detail)] += 1

    def done(self, func: Any, detail: str) -> None:
        self.converted[(_name(func), detail)] += 1

    # ---- time axis helpers -------------------------------------------------------------------
    def unfold(self, x: Tensor) -> Tensor:
        return torch._C.TensorBase.unflatten(x, 0, (self.steps, -1))  # without Tensor's named-dims wrapper

    def step_constant(self, constant: Any, reference: Tensor) -> Any:
        """One time step's worth of a constant: a per-sample constant of the folded batch loses it."""
        if isinstance(constant, Tensor) and constant.dim() >= reference.dim() and constant.shape[0] != 1:
            if constant.dim() > reference.dim() or constant.shape[0] != reference.shape[0]:
                raise _Unsupported("a constant whose leading dim is not the time-folded batch")
            return self.unfold(constant)[0]
        return constant

    def add_at_t0(self, x: Tensor, constant: Any) -> Tensor:
        """``x`` plus ``constant`` at t = 0 only (the differential form of adding a constant)."""
        step = self.step_constant(constant, x)
        if _fits(
            step, x, self.steps
        ):  # the sum keeps x's shape and dtype: a copy of x, the constant added to step 0
            out = x.clone()
            out[: x.shape[0] // self.steps].add_(step)
            return out
        steps = self.unfold(x)
        head = steps[0] + step
        tail = steps[1:].expand(self.steps - 1, *head.shape)
        return torch.cat([head.unsqueeze(0), tail], dim=0).flatten(0, 1)

    def add_at_t0_(self, fresh: Tensor, constant: Any) -> Tensor:
        """:meth:`add_at_t0` in place, for a tensor this mode just created (no other user sees it)."""
        head = fresh[: fresh.shape[0] // self.steps]
        step = self.step_constant(constant, fresh)
        if not _broadcasts_to(tuple(getattr(step, "shape", ())), tuple(head.shape)):
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
        if func in _META:  # shape, dtype, device, size(): nothing to track (the most frequent calls)
            return func(*args, **kwargs)
        dims: list[int] = []
        _time_dims(self._time, args, dims)
        if kwargs:  # mostly flags and dims
            _time_dims(self._time, kwargs.values(), dims)
        if not dims:
            return func(*args, **kwargs)
        if self.watch is not None:
            self.watch.saw(func, args, kwargs, func in _HANDLERS or func in _SELF_ONLY or func in _FACTORIES)
        if func in _SELF_ONLY and not self.is_time(args[0] if args else None):
            return func(*args, **kwargs)  # uses only the shape/dtype of its time-varying argument
        if func in _FACTORIES:
            return func(*args, **kwargs)  # new tensors that take only shape/dtype/device from the input
        if any(dims):
            return self.displaced(func, args, kwargs)
        handler = _HANDLERS.get(func)
        if handler is None:
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
        except TypeError as error:
            # Tensor's operators (``a * b``, ``a @ b``) turn a TypeError into NotImplemented, and Python then
            # says only "unsupported operand type(s)": raise the plain op's own error where it has one (what
            # the ANN raises), else this one under a type the operators pass on
            func(*args, **kwargs)
            raise RuntimeError(
                f"TDTimeFolded: {_name(func)} on time-varying tensors failed: {error}"
            ) from error

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

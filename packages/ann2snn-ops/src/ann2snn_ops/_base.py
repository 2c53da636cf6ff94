"""``TDModule``, the base class of the TD operators, and the shared machinery re-exported in one place.

Every TD operator computes ``Y_cum[t] = f(X_cum[t])`` with ``X_cum = X.cumsum(0)`` and returns the temporal
difference of ``Y_cum``. The checks live in ``_checks``, the running sums and differences in ``_cumsum``, the
one-input autograd node in ``_unary``; this module keeps their historical import path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from ann2snn_ops._checks import (
    as_shape_tuple,
    check_step,
    check_time_sequence,
    copy_module_state,
    needs_grad,
    reject_lazy,
    shares_memory,
)
from ann2snn_ops._cumsum import (
    accumulation_dtype,
    cumsum_time,
    cumulative,
    cumulative_exact,
    difference,
    difference_,
    difference_adjoint,
    difference_into,
    reverse_cumulative_,
    td_chunked,
)
from ann2snn_ops._unary import CumFn, ElementwiseBackward, RowsOut, output_dtype, td_unary

__all__ = [
    "TDModule",
    "accumulation_dtype",
    "as_shape_tuple",
    "check_step",
    "check_time_sequence",
    "copy_module_state",
    "cumsum_time",
    "cumulative",
    "cumulative_exact",
    "difference",
    "difference_",
    "difference_adjoint",
    "difference_into",
    "needs_grad",
    "reject_lazy",
    "reverse_cumulative_",
    "shares_memory",
    "td_chunked",
    "td_unary",
]

_Self = TypeVar("_Self", bound="TDModule")


class TDModule(nn.Module):
    """Base class of the TD operators: the stateless full-sequence default and an opt-in streaming mode.

    By default an operator takes complete sequences ``[T, ...]`` and keeps no state between calls. After
    ``set_streaming(True)`` it takes **one time step at a time** (the tensor without its time axis), keeps
    the cumulative input and output of the steps seen so far, and returns the current difference; feeding
    the ``T`` steps of a sequence one by one gives exactly the full-sequence result. ``reset()`` starts a
    new sequence; a step whose shape differs from the steps before it (a new batch size) without
    ``reset()`` raises. The state is held as plain attributes (not buffers) and is not part of
    ``state_dict``; it stays attached to the autograd graph, so call ``reset()`` between sequences.
    """

    streaming: bool

    def __init__(self) -> None:
        super().__init__()
        self.streaming = False
        self._state: dict[str, Any] = {}

    def set_streaming(self: _Self, mode: bool = True) -> _Self:
        """Switch the streaming mode on or off for this module (not its children); resets the state.

        Returns:
            ``self``, like ``nn.Module.train``.
        """
        if not isinstance(mode, bool):
            raise TypeError(f"set_streaming expects a bool, but got {type(mode).__name__}.")
        self.streaming = mode
        self.reset()
        return self

    def reset(self) -> None:
        """Forget the streaming state (the cumulative input/output of the steps seen so far)."""
        self._state = {}

    def _check_stream_shapes(self, **shapes: torch.Size) -> None:
        """Raise if a streaming step's shape (without the time axis) differs from the earlier steps' shapes.

        Call before updating the state; records the shapes on the first step of a sequence.
        """
        seen = self._state.get("shapes")
        if seen is None:
            self._state["shapes"] = shapes
            return
        for name, shape in shapes.items():
            if seen[name] != shape:
                raise RuntimeError(
                    f"{self._op_name()} in streaming mode got {name} of shape {tuple(shape)}, but the earlier "
                    f"steps of this sequence had shape {tuple(seen[name])}; call reset() (or reset_streaming(model)) "
                    "before feeding a sequence of another shape or batch size."
                )

    def _stream_unary(self, x_t: torch.Tensor, fn: CumFn, *params: torch.Tensor | None) -> torch.Tensor:
        """One streaming step of ``diff(fn(cumsum(x)))``: ``x_t`` is the current step with a time axis of 1."""
        self._check_stream_shapes(input=x_t.shape[1:])
        acc = accumulation_dtype(x_t.dtype)
        prev_x = self._state.get("x_cum")
        x_cum = x_t.to(acc, copy=True) if prev_x is None else prev_x + x_t  # never alias the caller's tensor
        y_cum = fn(x_cum, *params)
        prev_y = self._state.get("y_cum")
        out = y_cum if prev_y is None else y_cum - prev_y
        self._state.update(x_cum=x_cum, y_cum=y_cum)
        return out.to(output_dtype(x_t.dtype, acc, y_cum.dtype))

    def _op_name(self) -> str:
        """The name quoted in error messages (the class name)."""
        return type(self).__name__

    def _check_sequence(self, x_seq: torch.Tensor) -> None:
        """Operator-specific checks of a ``[T, ...]`` input (after the common ones); override as needed."""

    def _unary_forward(
        self,
        x: torch.Tensor,
        fn: CumFn,
        *params: torch.Tensor | None,
        elementwise_backward: ElementwiseBackward | None = None,
        grad_path: Callable[[torch.Tensor], torch.Tensor] | None = None,
        inplace_fn: Callable[[torch.Tensor], object] | None = None,
        row: tuple[int, ...] | None = None,
        row_out: RowsOut | None = None,
        step_out: RowsOut | None = None,
        row_fn: CumFn | None = None,
        row_tile: int | None = None,
    ) -> torch.Tensor:
        """Full-sequence or streaming forward of a one-input operator.

        ``grad_path(x_seq)``, when given, replaces :func:`td_unary` when autograd records (an operator's own
        autograd node with a cheaper backward).
        """
        name = self._op_name()
        if self.streaming:
            check_step(x, name)
            x_seq = x.unsqueeze(0)
            self._check_sequence(x_seq)
            return self._stream_unary(x_seq, fn, *params)[0]
        check_time_sequence(x, name)
        self._check_sequence(x)
        if grad_path is not None and needs_grad(x, *params):
            return grad_path(x)
        return td_unary(
            x,
            fn,
            *params,
            elementwise_backward=elementwise_backward,
            inplace_fn=inplace_fn,
            row=row,
            row_out=row_out,
            step_out=step_out,
            row_fn=row_fn,
            row_tile=row_tile,
        )

"""Shared machinery of the TD operators: input checks, time accumulation, differencing, streaming state.

Every TD operator computes ``Y_cum[t] = f(X_cum[t])`` with ``X_cum = X.cumsum(0)`` and returns the temporal
difference of ``Y_cum``. The helpers here do the accumulation and the differencing with as few temporary
tensors as possible: on CPU a fresh large tensor costs about as much as a pass over it (page faults), and
``torch.cumsum`` along a leading dimension is several times slower than one ``add`` per time step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = [
    "TDModule",
    "accumulation_dtype",
    "check_step",
    "check_time_sequence",
    "cumsum_time",
    "cumulative",
    "difference",
    "needs_grad",
    "td_chunked",
    "td_unary",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)

_Self = TypeVar("_Self", bound="TDModule")


def check_time_sequence(x: torch.Tensor, module_name: str) -> None:
    """Check that ``x`` is a time sequence ``[T, ...]`` with ``T >= 1`` and at least two dimensions.

    Args:
        x: The input sequence.
        module_name: The operator's class name, quoted in the error message.

    Raises:
        TypeError: If ``x`` is not a tensor.
        ValueError: If ``x`` has fewer than two dimensions or an empty time dimension.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{module_name} expects a torch.Tensor input, but got {type(x).__name__}.")
    if x.dim() < 2:
        raise ValueError(
            f"{module_name} expects an input sequence with shape [T, ...] and at least 2 dimensions, "
            f"but got shape {tuple(x.shape)}."
        )
    if x.shape[0] == 0:
        raise ValueError(f"{module_name} expects a non-empty time dimension, but got shape {tuple(x.shape)}.")


def check_step(x: torch.Tensor, module_name: str) -> None:
    """Check one time step fed in streaming mode (a tensor without the time axis, at least 1-D).

    Raises:
        TypeError: If ``x`` is not a tensor.
        ValueError: If ``x`` is 0-dimensional.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{module_name} expects a torch.Tensor input, but got {type(x).__name__}.")
    if x.dim() < 1:
        raise ValueError(
            f"{module_name} in streaming mode expects one time step without the time axis and at least "
            f"1 dimension, but got shape {tuple(x.shape)}."
        )


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which cumulative sums are kept: float32 for float16/bfloat16, else ``dtype`` itself."""
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def cumulative(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x.cumsum(0)`` computed in ``dtype`` (default ``x.dtype``); not differentiable (use inside no_grad).

    One ``add`` per time step into a preallocated buffer: on CPU this is several times faster than
    ``torch.cumsum`` along dimension 0, and it accumulates half inputs in float32 when ``dtype=torch.float32``.
    """
    dtype = x.dtype if dtype is None else dtype
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    out[0].copy_(x[0])
    for t in range(1, x.shape[0]):
        torch.add(out[t - 1], x[t], out=out[t])
    return out


def _cumulative_from(x: torch.Tensor, start: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Like :func:`cumulative`, continuing from ``start`` (the running sum before ``x[0]``), same arithmetic."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if start is None:
        out[0].copy_(x[0])
    else:
        torch.add(start, x[0], out=out[0])
    for t in range(1, x.shape[0]):
        torch.add(out[t - 1], x[t], out=out[t])
    return out


def td_chunked(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    out_dtype: torch.dtype,
    chunks: int = 4,
    time_sliced: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """``diff(fn(*cumsums))`` without autograd, a few time steps at a time (inference memory).

    Only one chunk of each cumulative input is alive at a time, so several-input ops (attention, products)
    do not hold ``len(inputs)`` full-size cumulative copies. The running sums carry across chunks with the
    same additions as :func:`cumulative`, so the result equals the one-shot computation. Each chunk calls
    ``fn`` once on its ``[k, ...]`` block (``k = ceil(T / chunks)``); tensors in ``time_sliced`` are passed
    after the cumulative blocks, cut to the same time steps. A result that aliases a cumulative buffer
    (which the next chunk reuses) is copied.
    """
    t_len = inputs[0].shape[0]
    acc = accumulation_dtype(inputs[0].dtype)
    k = -(-t_len // chunks)
    # One [k, ...] buffer per distinct input, reused by every chunk.
    distinct: list[int] = [next(j for j in range(i + 1) if inputs[j] is x) for i, x in enumerate(inputs)]
    buffers: dict[int, torch.Tensor] = {
        i: torch.empty((k, *inputs[i].shape[1:]), dtype=acc, device=inputs[i].device) for i in set(distinct)
    }
    carry: dict[int, torch.Tensor] = {}  # running sum after the previous chunk (fn may write into buffers)
    prev_y: torch.Tensor | None = None
    out: torch.Tensor | None = None
    for t0 in range(0, t_len, k):
        t1 = min(t_len, t0 + k)
        n = t1 - t0
        for i, buf in buffers.items():
            x = inputs[i]
            if t0 == 0:
                buf[0].copy_(x[0])
            else:
                torch.add(carry[i], x[t0], out=buf[0])
            for t in range(1, n):
                torch.add(buf[t - 1], x[t0 + t], out=buf[t])
            if t1 < t_len:
                carry[i] = buf[n - 1].clone()
        y = fn(*(buffers[j][:n] for j in distinct), *(a[t0:t1] for a in time_sliced))
        if any(_shares_memory(y, buf) for buf in buffers.values()):  # a view of (or written into) a buffer
            y = y.clone()
        if out is None:
            out = torch.empty((t_len, *y.shape[1:]), dtype=out_dtype, device=y.device)
        if prev_y is None:
            out[t0].copy_(y[0])
        else:
            torch.sub(y[0], prev_y, out=out[t0])
        if n > 1:
            torch.sub(y[1:], y[:-1], out=out[t0 + 1 : t1])
        prev_y = y[-1]
    if out is None:
        raise ValueError(f"td_chunked expects a non-empty time dimension, but got {t_len} steps.")
    return out


def reverse_cumulative_(g: torch.Tensor) -> torch.Tensor:
    """In place: ``g[t] = sum(g[t:])`` (the adjoint of the cumulative sum)."""
    for t in range(g.shape[0] - 2, -1, -1):
        g[t].add_(g[t + 1])
    return g


def difference_into(y_cum: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[0] = y_cum[0]``, ``out[t] = y_cum[t] - y_cum[t-1]``; ``out`` must not overlap ``y_cum``."""
    out[0].copy_(y_cum[0])
    if y_cum.shape[0] > 1:
        torch.sub(y_cum[1:], y_cum[:-1], out=out[1:])
    return out


def difference_(y_cum: torch.Tensor) -> torch.Tensor:
    """In place, from the last step backwards (so each step still sees its unmodified predecessor)."""
    for t in range(y_cum.shape[0] - 1, 0, -1):
        y_cum[t].sub_(y_cum[t - 1])
    return y_cum


def difference_adjoint(g: torch.Tensor) -> torch.Tensor:
    """The adjoint of differencing: ``out[t] = g[t] - g[t+1]``, ``out[T-1] = g[T-1]`` (a new tensor)."""
    out = torch.empty_like(g)
    out[-1].copy_(g[-1])
    if g.shape[0] > 1:
        torch.sub(g[:-1], g[1:], out=out[:-1])
    return out


class _Difference(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y_cum: torch.Tensor) -> torch.Tensor:
        return difference_into(y_cum, torch.empty_like(y_cum))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # double backward: stay differentiable
            return torch.cat([g[:-1] - g[1:], g[-1:]], dim=0)
        return difference_adjoint(g)


def difference(y_cum: torch.Tensor) -> torch.Tensor:
    """Temporal difference of a cumulative sequence: ``Y[0] = Y_cum[0]``, ``Y[t] = Y_cum[t] - Y_cum[t-1]``.

    Differentiable; equal in values and gradients to
    ``torch.diff(y_cum, dim=0, prepend=torch.zeros_like(y_cum[:1]))`` with one temporary less.
    """
    if y_cum.requires_grad and torch.is_grad_enabled():
        out: torch.Tensor = _Difference.apply(y_cum)
        return out
    return difference_into(y_cum, torch.empty_like(y_cum))


class _Cumulative(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        ctx.in_dtype = x.dtype
        return cumulative(x, dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return reverse_cumulative_(g.clone()).to(ctx.in_dtype), None


def cumsum_time(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Differentiable ``x.cumsum(0)`` in ``dtype`` (default: float32 for half inputs, else ``x.dtype``)."""
    dtype = accumulation_dtype(x.dtype) if dtype is None else dtype
    if x.requires_grad and torch.is_grad_enabled():
        out: torch.Tensor = _Cumulative.apply(x, dtype)
        return out
    return cumulative(x, dtype)


# ---------------------------------------------------------------------------------------------------------
# Unary TD operators: y = diff(f(cumsum(x))) with one custom autograd node.
# ---------------------------------------------------------------------------------------------------------

CumFn = Callable[..., torch.Tensor]
"""``f(x_cum, *params) -> y_cum``: the ANN op applied to the whole ``[T, ...]`` cumulative tensor."""

ElementwiseBackward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``g(grad_y_cum, x_cum) -> grad_x_cum``; may write into ``grad_y_cum``."""


class _TDUnary(torch.autograd.Function):
    """Forward keeps only ``x_cum`` alive for backward, and differences ``y_cum`` in place.

    Backward recomputes ``f(x_cum)`` under autograd to get the vector-Jacobian product (or calls an
    elementwise backward kernel when one is given), then applies the adjoints of differencing and of the
    cumulative sum in place. Peak memory is that of the plain op plus one tensor of the input's size.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        fn: CumFn,
        elementwise_backward: ElementwiseBackward | None,
        *params: torch.Tensor | None,
    ) -> torch.Tensor:
        acc = accumulation_dtype(x.dtype)
        x_cum = cumulative(x, acc)
        y_cum = fn(x_cum, *params)
        if _shares_memory(y_cum, x_cum):  # fn returned a view of (or wrote into) x_cum, which backward needs
            y_cum = y_cum.clone()
        out = difference_(y_cum)
        ctx.save_for_backward(x_cum, *[p for p in params if p is not None])
        ctx.fn = fn
        ctx.elementwise_backward = elementwise_backward
        ctx.param_mask = [p is not None for p in params]
        ctx.in_dtype = x.dtype
        return out.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_cum, *present = ctx.saved_tensors
        grad_y_cum = difference_adjoint(grad_out.to(x_cum.dtype))
        it = iter(present)
        params = [next(it) if m else None for m in ctx.param_mask]
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        if ctx.elementwise_backward is not None:
            grad_x_cum = ctx.elementwise_backward(grad_y_cum, x_cum)
        else:
            leaf = x_cum.detach().requires_grad_(True)
            wanted = [i for i, p in enumerate(params) if p is not None and ctx.needs_input_grad[3 + i]]
            with torch.enable_grad():
                leaves = [p.detach().requires_grad_(True) if p is not None else None for p in params]
                y_cum = ctx.fn(leaf, *leaves)
                grads = torch.autograd.grad(
                    y_cum, [leaf, *[leaves[i] for i in wanted]], grad_y_cum, allow_unused=True
                )
            grad_x_cum = grads[0]
            for i, g in zip(wanted, grads[1:]):
                param_grads[i] = g
        grad_x = None
        if ctx.needs_input_grad[0] and grad_x_cum is not None:
            grad_x = reverse_cumulative_(grad_x_cum).to(ctx.in_dtype)
        return (grad_x, None, None, *param_grads)


def td_unary(
    x: torch.Tensor,
    fn: CumFn,
    *params: torch.Tensor | None,
    elementwise_backward: ElementwiseBackward | None = None,
    inplace_fn: Callable[[torch.Tensor], object] | None = None,
) -> torch.Tensor:
    """Apply ``f`` the TD way: ``diff(fn(cumsum(x), *params))``, accumulating half inputs in float32.

    Args:
        x: Input sequence ``[T, ...]`` (already checked).
        fn: ``fn(x_cum, *params)``, the op on the cumulative ``[T, ...]`` tensor. It receives float32 for
            float16/bfloat16 inputs and must cast ``params`` itself if they need to match.
        *params: Tensors (or None) passed to ``fn`` that may need gradients (weights, biases).
        elementwise_backward: Optional ``(grad_y_cum, x_cum) -> grad_x_cum`` for pointwise ``fn`` without
            params; it saves recomputing ``fn`` in backward.
        inplace_fn: Optional in-place version of a pointwise ``fn`` without params, used without autograd:
            one buffer instead of two (a fresh CPU buffer costs about a pass over it).

    Returns:
        The differential output, in ``x.dtype``.
    """
    if needs_grad(x, *params):
        out: torch.Tensor = _TDUnary.apply(x, fn, elementwise_backward, *params)
        return out
    with torch.no_grad():
        # One call on the whole sequence: for one-input ops chunking saves little memory (1.5x -> 1.4x of
        # the plain op) and costs time; x_cum is dead after fn, so the differences go into its memory.
        x_cum = cumulative(x, accumulation_dtype(x.dtype))
        if inplace_fn is not None:
            inplace_fn(x_cum)
            return difference_(x_cum).to(x.dtype)
        y_cum = fn(x_cum, *params)
        if y_cum.shape == x_cum.shape and y_cum.dtype == x_cum.dtype and not _shares_memory(y_cum, x_cum):
            out = difference_into(y_cum, x_cum)
        else:
            out = difference_(y_cum)
        return out.to(x.dtype)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record an op on ``tensors`` (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# ---------------------------------------------------------------------------------------------------------
# Module base with the opt-in streaming mode
# ---------------------------------------------------------------------------------------------------------


class TDModule(nn.Module):
    """Base class of the TD operators: the stateless full-sequence default and an opt-in streaming mode.

    By default an operator takes complete sequences ``[T, ...]`` and keeps no state between calls. After
    ``set_streaming(True)`` it takes **one time step at a time** (the tensor without its time axis), keeps
    the cumulative input and output of the steps seen so far, and returns the current difference; feeding
    the ``T`` steps of a sequence one by one gives exactly the full-sequence result. ``reset()`` starts a
    new sequence. The state is held as plain attributes (not buffers) and is not part of ``state_dict``;
    it stays attached to the autograd graph, so call ``reset()`` between sequences.
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

    def _stream_unary(
        self,
        x_t: torch.Tensor,
        fn: CumFn,
        *params: torch.Tensor | None,
    ) -> torch.Tensor:
        """One streaming step of ``diff(fn(cumsum(x)))``: ``x_t`` is the current step with a time axis of 1."""
        acc = accumulation_dtype(x_t.dtype)
        prev_x = self._state.get("x_cum")
        x_cum = x_t.to(acc, copy=True) if prev_x is None else prev_x + x_t  # never alias the caller's tensor
        y_cum = fn(x_cum, *params)
        prev_y = self._state.get("y_cum")
        out = y_cum if prev_y is None else y_cum - prev_y
        self._state = {"x_cum": x_cum, "y_cum": y_cum}
        return out.to(x_t.dtype)

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
        return td_unary(x, fn, *params, elementwise_backward=elementwise_backward, inplace_fn=inplace_fn)


def as_shape_tuple(shape: int | Sequence[int] | torch.Size, name: str) -> tuple[int, ...]:
    """Normalise an int / sequence / ``torch.Size`` to a tuple of positive ints."""
    if isinstance(shape, bool | str):
        raise TypeError(f"{name} must be an int or a sequence of ints, but got {shape!r}.")
    if isinstance(shape, int):
        dims: tuple[Any, ...] = (shape,)
    elif isinstance(shape, Sequence | torch.Size):
        dims = tuple(shape)
    else:
        raise TypeError(f"{name} must be an int or a sequence of ints, but got {type(shape).__name__}.")
    if any(isinstance(d, bool) or not isinstance(d, int) for d in dims):
        raise TypeError(f"{name} must contain only ints, but got {shape!r}.")
    if any(d <= 0 for d in dims):
        raise ValueError(f"{name} must contain only positive sizes, but got {dims}.")
    return tuple(int(d) for d in dims)


def copy_module_state(src: nn.Module, dst: nn.Module, names: Sequence[str]) -> None:
    """Copy the named parameters (values, ``requires_grad``) and the training flag from ``src`` to ``dst``."""
    with torch.no_grad():
        for name in names:
            sp = getattr(src, name, None)
            dp = getattr(dst, name, None)
            if sp is None or dp is None:
                continue
            dp.copy_(sp)
            dp.requires_grad_(sp.requires_grad)
    dst.train(src.training)


def reject_lazy(module: nn.Module, op_name: str) -> None:
    """Raise ValueError if ``module`` still has uninitialised (lazy) parameters."""
    for p in module.parameters(recurse=False):
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"{op_name}.from_module needs initialised parameters; run the lazy module once first."
            )

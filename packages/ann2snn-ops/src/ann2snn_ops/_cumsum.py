"""Running sums over time and temporal differences, with and without autograd.

Two running sums are kept, for two needs:

- :func:`cumulative_exact` equals ``torch.cumsum(x, 0, dtype=dtype)`` bit for bit (torch's CPU kernel adds in
  float64 and rounds every step; on large CPU tensors we do the same, one step slice at a time, which is several
  times faster than ``torch.cumsum`` along a leading dimension; small ones take ``torch.cumsum`` itself). Attention and the products use it: their outputs amplify
  the last-bit differences of a float32 running sum (softmax of growing scores, sums of many products), and
  users check them against references built with ``torch.cumsum``.
- :func:`cumulative` adds in the working dtype, one ``add`` per step: it agrees with ``torch.cumsum`` to float32
  rounding (a few ulps of the running sum) and is the fast path of the pointwise operators and norms, whose
  outputs do not amplify those differences.

The differentiable versions (:func:`cumsum_time`, :func:`difference`) are twice differentiable: their backward
passes are built from differentiable torch ops whenever autograd records (``create_graph=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "accumulation_dtype",
    "cumsum_shared",
    "cumsum_time",
    "cumulative",
    "cumulative_exact",
    "difference",
    "difference_",
    "difference_adjoint",
    "difference_into",
    "reverse_cumulative_",
    "reverse_cumulative_exact",
    "running_sum",
    "td_chunked",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which cumulative sums are kept: float32 for float16/bfloat16, else ``dtype`` itself."""
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch's CPU cumsum kernel adds in (``at::acc_type<T, false>``)."""
    if dtype.is_complex:
        return torch.complex128
    return torch.float64 if dtype.is_floating_point else torch.int64


# Up to this many elements on CPU (and on any other device), :func:`cumulative` is one ``torch.cumsum`` call,
# which beats the per-step loop 3-5x at the sizes of small transformers (about even at the worst strides);
# above it, torch's CPU cumsum along a leading dim is several times slower than the loop.
_ONE_CALL_FAST = 40_000


def cumulative(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x.cumsum(0)`` in ``dtype`` (default ``x.dtype``); not differentiable.

    Small tensors (and any non-CPU tensor) take ``torch.cumsum`` itself; large CPU tensors one ``add`` per time
    step into a preallocated buffer, added in ``dtype``, which agrees with ``torch.cumsum`` to the rounding of
    ``dtype`` (use :func:`cumulative_exact` for bitwise agreement at every size).
    """
    dtype = x.dtype if dtype is None else dtype
    if x.device.type != "cpu" or x.numel() <= _ONE_CALL_FAST:
        return torch.cumsum(x, 0, dtype=dtype)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    outs = out.unbind(0)  # views made in one call each: the loop is dispatch-bound on small steps
    steps = x.unbind(0)
    outs[0].copy_(steps[0])
    for t in range(1, len(steps)):
        torch.add(outs[t - 1], steps[t], out=outs[t])
    return out


def _accumulate(
    x: torch.Tensor, run: torch.Tensor, wide: torch.Tensor, out: torch.Tensor, reverse: bool = False
) -> None:
    """``out[t] = round(run += x[t])`` step by step (last step first if ``reverse``): torch.cumsum's float64
    running sum, carried in ``run``. ``wide`` is a kept buffer of ``run``'s shape that each step is widened
    into: ``add_`` of mixed dtypes would allocate a fresh float64 temporary per step.
    """
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in steps:
        wide.copy_(x[t])
        run.add_(wide)
        out[t].copy_(run)


# Up to this many elements on CPU, :func:`cumulative_exact` is one ``torch.cumsum`` call: the step loop costs a
# few small ops per step, which outweighs torch's slower leading-dim kernel on small tensors.
_ONE_CALL = 100_000


def cumulative_exact(
    x: torch.Tensor, dtype: torch.dtype | None = None, carry: torch.Tensor | None = None
) -> torch.Tensor:
    """``torch.cumsum(x, 0, dtype=dtype)`` bit for bit (not differentiable).

    Args:
        x: ``[T, ...]``.
        dtype: Output dtype (default ``x.dtype``).
        carry: Optional running sum of earlier steps in torch's wide accumulation dtype (float64 for floating
            dtypes), shape ``x.shape[1:]``; updated in place, so consecutive chunks continue the same sum.
    """
    dtype = x.dtype if dtype is None else dtype
    if carry is None and x.device.type == "cpu" and x.numel() <= _ONE_CALL:
        return torch.cumsum(x, 0, dtype=dtype)  # the reference itself: one call beats the loop when small
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    acc = torch.zeros(x.shape[1:], dtype=_wide(dtype), device=x.device) if carry is None else carry
    _accumulate(x, acc, torch.empty_like(acc), out)
    return out


def reverse_cumulative_(g: torch.Tensor) -> torch.Tensor:
    """In place: ``g[t] = sum(g[t:])`` (the adjoint of the cumulative sum), added in ``g``'s dtype."""
    gs = g.unbind(0)
    for t in range(len(gs) - 2, -1, -1):
        gs[t].add_(gs[t + 1])
    return g


def reverse_cumulative_exact(g: torch.Tensor) -> torch.Tensor:
    """``g.flip(0).cumsum(0).flip(0)`` bit for bit (the gradient torch's cumsum gives), as a new tensor."""
    out = torch.empty_like(g)
    acc = torch.zeros(g.shape[1:], dtype=_wide(g.dtype), device=g.device)
    _accumulate(g, acc, torch.empty_like(acc), out, reverse=True)
    return out


def difference_into(y_cum: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[0] = y_cum[0]``, ``out[t] = y_cum[t] - y_cum[t-1]``; ``out`` must not overlap ``y_cum``."""
    out[0].copy_(y_cum[0])
    if y_cum.shape[0] > 1:
        torch.sub(y_cum[1:], y_cum[:-1], out=out[1:])
    return out


def difference_(y_cum: torch.Tensor) -> torch.Tensor:
    """In place, from the last step backwards (so each step still sees its unmodified predecessor)."""
    ys = y_cum.unbind(0)
    for t in range(len(ys) - 1, 0, -1):
        ys[t].sub_(ys[t - 1])
    return y_cum


def difference_adjoint(g: torch.Tensor) -> torch.Tensor:
    """The adjoint of differencing: ``out[t] = g[t] - g[t+1]``, ``out[T-1] = g[T-1]`` (a new tensor)."""
    out = torch.empty_like(g)
    out[-1].copy_(g[-1])
    if g.shape[0] > 1:
        torch.sub(g[:-1], g[1:], out=out[:-1])
    return out


def difference_adjoint_differentiable(g: torch.Tensor) -> torch.Tensor:
    """:func:`difference_adjoint` from differentiable ops (for backward passes that autograd records)."""
    return torch.cat([g[:-1] - g[1:], g[-1:]], dim=0)


class _Difference(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y_cum: torch.Tensor) -> torch.Tensor:
        return difference_into(y_cum, torch.empty_like(y_cum))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # create_graph=True: stay differentiable
            return difference_adjoint_differentiable(g)
        return difference_adjoint(g)


def difference(y_cum: torch.Tensor) -> torch.Tensor:
    """Temporal difference of a cumulative sequence: ``Y[0] = Y_cum[0]``, ``Y[t] = Y_cum[t] - Y_cum[t-1]``.

    Differentiable (twice and more); equal in values and gradients to
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
        return cumulative_exact(x, dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        if torch.is_grad_enabled():  # create_graph=True: torch's own (differentiable) cumsum backward
            return g.flip(0).cumsum(0).flip(0).to(ctx.in_dtype), None
        return reverse_cumulative_exact(g).to(ctx.in_dtype), None


def cumsum_time(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.cumsum(x, 0, dtype=dtype)`` bit for bit, differentiable with torch's cumsum gradients.

    ``dtype`` defaults to float32 for half inputs, else ``x.dtype``.
    """
    dtype = accumulation_dtype(x.dtype) if dtype is None else dtype
    if x.requires_grad and torch.is_grad_enabled():
        out: torch.Tensor = _Cumulative.apply(x, dtype)
        return out
    return cumulative_exact(x, dtype)


def cumsum_shared(inputs: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """:func:`cumsum_time` of each input, computed once for an input passed several times (self-attention)."""
    out: list[torch.Tensor] = []
    for i, x in enumerate(inputs):
        same = next((j for j in range(i) if inputs[j] is x), None)
        out.append(out[same] if same is not None else cumsum_time(x, dtype))
    return out


_SHORT = 8  # td_chunked's one-shot torch.cumsum path up to this many steps


def td_chunked(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    out_dtype: torch.dtype,
    chunks: int = 4,
    time_sliced: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """``diff(fn(*cumsums))`` without autograd, a few time steps at a time (inference memory).

    Only one block of each cumulative input is alive at a time, so several-input ops (attention, products)
    do not hold ``len(inputs)`` full-size cumulative copies. The running sums are those of
    :func:`cumulative_exact` (``torch.cumsum`` bit for bit), carried across blocks, so the result equals the
    one-shot computation on ``torch.cumsum`` inputs. Each block calls ``fn`` once on its ``[k, ...]`` block
    (``k = ceil(T / chunks)``, one buffer per distinct input, reused); tensors in ``time_sliced`` are passed
    after the cumulative blocks, cut to the same time steps. ``fn`` may return a view of a block buffer or write its result into
    the first one (``a.mul_(b)``): each block is differenced before the next one is accumulated.
    """
    t_len = inputs[0].shape[0]
    if t_len == 0:
        raise ValueError(f"td_chunked expects a non-empty time dimension, but got {t_len} steps.")
    acc = accumulation_dtype(inputs[0].dtype)
    # One buffer and running sum per distinct input (an input passed twice is accumulated once).
    distinct: list[int] = [next(j for j in range(i + 1) if inputs[j] is x) for i, x in enumerate(inputs)]
    if t_len <= _SHORT:
        # A few steps: torch.cumsum itself in one shot (bit for bit the reference by construction; at T <= 8
        # it beats the step loop, and a block of k = ceil(T / chunks) <= 2 steps would save little memory).
        cums = {i: torch.cumsum(inputs[i], 0, dtype=acc) for i in set(distinct)}
        y = fn(*(cums[j] for j in distinct), *time_sliced)
        out = torch.empty((t_len, *y.shape[1:]), dtype=out_dtype, device=y.device)
        out[0].copy_(y[0])
        if t_len > 1:
            torch.sub(y[1:], y[:-1], out=out[1:])
        return out
    k = -(-t_len // chunks)
    buffers = {
        i: torch.empty((k, *inputs[i].shape[1:]), dtype=acc, device=inputs[i].device) for i in set(distinct)
    }
    carry = {i: torch.zeros(inputs[i].shape[1:], dtype=_wide(acc), device=inputs[i].device) for i in buffers}
    widest = max(c.numel() for c in carry.values())
    out = prev_y = kept = torch.empty(0)
    for t0 in range(0, t_len, k):
        t1 = min(t_len, t0 + k)
        # One widening buffer for all inputs, per block (the transient of a mixed-dtype add_, made once per
        # block instead of per step), freed before ``fn`` allocates its result.
        wide = torch.empty(widest, dtype=_wide(acc), device=inputs[0].device)
        for i, buf in buffers.items():
            _accumulate(inputs[i][t0:t1], carry[i], wide[: carry[i].numel()].view(carry[i].shape), buf)
        del wide
        y = fn(*(buffers[j][: t1 - t0] for j in distinct), *(a[t0:t1] for a in time_sliced))
        if t0 == 0:
            out = torch.empty((t_len, *y.shape[1:]), dtype=out_dtype, device=y.device)
            out[0].copy_(y[0])
        else:
            torch.sub(y[0], prev_y, out=out[t0])
        if t1 - t0 > 1:
            torch.sub(y[1:], y[:-1], out=out[t0 + 1 : t1])
        if t1 < t_len:
            if any(_shares(y, b) for b in buffers.values()):  # the next block overwrites it: keep a copy
                if kept.numel() == 0:
                    kept = torch.empty(y.shape[1:], dtype=y.dtype, device=y.device)
                prev_y = kept.copy_(y[-1])
            else:
                prev_y = y[-1]
    return out


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def running_sum(x: torch.Tensor, dtype: torch.dtype | None = None, *, exact: bool = False) -> torch.Tensor:
    """The running sum over time of a sequence ``x`` ``[T, ...]``: ``x.cumsum(0)`` in ``dtype`` (default
    ``x.dtype``), the fastest way torch offers on the tensor's size and device.

    The TD operators' own running sum, public for code that builds TD computations around them (ann2snn-fx's
    folded path). With ``exact=False`` it agrees with ``torch.cumsum`` to the rounding of ``dtype`` (bit for bit
    on small tensors); with ``exact=True`` it equals ``torch.cumsum(x, 0, dtype=dtype)`` bit for bit at every
    size (float64 accumulation, as torch's CPU kernel). Where autograd records (``x.requires_grad``), it is
    ``torch.cumsum`` itself, which is differentiable.

    Raises:
        TypeError: ``x`` is not a tensor, or ``dtype`` is not a ``torch.dtype``.
        ValueError: ``x`` has no time dimension (0-d).

    Examples:
        >>> import torch
        >>> from ann2snn_ops import running_sum
        >>> running_sum(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
        tensor([[ 1.,  2.],
                [ 4.,  6.],
                [ 9., 12.]])
        >>> x = torch.randn(4, 300, 200)  # large: one add per step, float32 rounding
        >>> torch.equal(running_sum(x, exact=True), torch.cumsum(x, 0))
        True
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"running_sum expects a tensor [T, ...], got {type(x).__name__}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"running_sum's dtype must be a torch.dtype or None, got {dtype!r}")
    if x.dim() == 0:
        raise ValueError("running_sum expects a sequence [T, ...] with time at dim 0, got a 0-d tensor")
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.cumsum(x, 0, dtype=dtype)
    return cumulative_exact(x, dtype) if exact else cumulative(x, dtype)

"""One-input TD operators, ``y = diff(f(cumsum(x)))``: the generic autograd node and the inference path.

Every custom autograd function of the package follows one pattern for higher derivatives: its backward
runs fast kernels when autograd does not record (the usual ``loss.backward()``), and, when it does
(``create_graph=True``), recomputes the operator from differentiable torch ops on the saved inputs
(:func:`composite_grads`), so second and higher derivatives equal those of the plain op on the cumulative
input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ann2snn_ops._checks import needs_grad, shares_memory
from ann2snn_ops._cumsum import (
    accumulation_dtype,
    cumulative,
    difference_,
    difference_adjoint,
    difference_into,
    reverse_cumulative_,
)

__all__ = [
    "CumFn",
    "ElementwiseBackward",
    "RowsOut",
    "composite_grads",
    "output_dtype",
    "td_rows",
    "td_steps",
    "td_unary",
]

CumFn = Callable[..., torch.Tensor]
"""``f(x_cum, *params) -> y_cum``: the ANN op applied to the whole ``[T, ...]`` cumulative tensor."""

ElementwiseBackward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``g(grad_y_cum, x_cum) -> grad_x_cum``; may write into ``grad_y_cum``."""


def output_dtype(in_dtype: torch.dtype, acc_dtype: torch.dtype, y_dtype: torch.dtype) -> torch.dtype:
    """Torch's type promotion for ``f(x)``: the input dtype when ``f`` keeps the (accumulation) dtype, else
    ``f``'s own result dtype (an integer input of a floating function gives the default float dtype)."""
    return in_dtype if y_dtype == acc_dtype else y_dtype


def composite_grads(
    fn: CumFn,
    x: torch.Tensor,
    params: Sequence[torch.Tensor | None],
    grad_out: torch.Tensor,
    wanted: Sequence[bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``diff(fn(torch.cumsum(x), *params))`` for ``(x, *params)``, recorded by autograd.

    The double-backward path: built only from differentiable torch ops on the saved inputs, so the returned
    gradients can be differentiated again. ``wanted[i]`` says whether input ``i`` needs a gradient.
    """
    with torch.enable_grad():
        x_cum = torch.cumsum(x, 0, dtype=accumulation_dtype(x.dtype))
        y_cum = fn(x_cum, *params)
        y = torch.diff(y_cum, dim=0, prepend=torch.zeros_like(y_cum[:1])).to(grad_out.dtype)
        targets = [t for t, w in zip((x, *params), wanted) if w and t is not None]
        grads = iter(torch.autograd.grad(y, targets, grad_out, create_graph=True, allow_unused=True))
    return tuple(next(grads) if w and t is not None else None for t, w in zip((x, *params), wanted))


class _TDUnary(torch.autograd.Function):
    """Forward keeps ``x_cum`` (and the input, for double backward) and differences ``y_cum`` in place.

    Backward either calls an elementwise backward kernel or
    recomputes ``f(x_cum)`` under autograd for the vector-Jacobian product, and applies the adjoints of
    differencing and of the cumulative sum in place. Under ``create_graph=True`` it takes
    :func:`composite_grads` instead.
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
        if shares_memory(y_cum, x_cum):
            y_cum = y_cum.clone()
        ctx.save_for_backward(x, x_cum, *params)  # x for the double-backward path only
        ctx.fn = fn
        ctx.elementwise_backward = elementwise_backward
        return difference_(y_cum).to(output_dtype(x.dtype, acc, y_cum.dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, x_cum, *params = ctx.saved_tensors
        wanted = [ctx.needs_input_grad[0], *ctx.needs_input_grad[3:]]
        if torch.is_grad_enabled():
            grad_x, *composite = composite_grads(ctx.fn, x, params, grad_out, wanted)
            return (grad_x, None, None, *composite)
        grad_y_cum = difference_adjoint(grad_out.to(x_cum.dtype))
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        if ctx.elementwise_backward is not None:
            grad_x_cum = ctx.elementwise_backward(grad_y_cum, x_cum)
        else:
            leaf = x_cum.detach().requires_grad_(True)
            picked = [i for i, p in enumerate(params) if p is not None and wanted[1 + i]]
            with torch.enable_grad():
                leaves = [p.detach().requires_grad_(True) if p is not None else None for p in params]
                y_cum = ctx.fn(leaf, *leaves)
                targets = [leaf, *[t for i, t in enumerate(leaves) if i in picked and t is not None]]
                grads = torch.autograd.grad(y_cum, targets, grad_y_cum, allow_unused=True)
            grad_x_cum = grads[0]
            for i, g in zip(picked, grads[1:]):
                param_grads[i] = g
        grad_x = None
        if wanted[0] and grad_x_cum is not None:
            grad_x = reverse_cumulative_(grad_x_cum).to(x.dtype)
        return (grad_x, None, None, *param_grads)


_BLOCK_ELEMENTS = 1 << 16
"""Elements of one block in :func:`td_rows` (256 KiB in float32): the block's running sums, its result and
the previous block's result stay in a core's L2 cache between the passes. Measured on ViT shapes, larger
blocks (fewer calls) lose more to cache misses than they save."""


RowsOut = Callable[[torch.Tensor, torch.Tensor], object]
"""``fn_out(x_cum_block, out)``: the op written into ``out`` (an ``out=`` variant, no allocation); in
:func:`td_rows` both are contiguous."""


def _block_layout(
    t_len: int, n_rows: int, width: int, block_elements: int, step_blocks: bool = True
) -> tuple[int, int]:
    """``(steps, rows)`` of one block: whole steps, several per block, when a step is at most half a block
    (and ``step_blocks``); else one step at a time, cut into near-equal tiles of rows of at most
    ``block_elements`` elements."""
    step = n_rows * width
    if step_blocks and 2 * step <= block_elements:
        return max(1, min(t_len, block_elements // max(step, 1))), n_rows
    tiles = -(-step // block_elements)
    return 1, max(1, -(-n_rows // tiles))


def td_rows(
    x: torch.Tensor,
    fn: CumFn,
    row: tuple[int, ...],
    *params: torch.Tensor | None,
    fn_out: RowsOut | None = None,
    block_elements: int = _BLOCK_ELEMENTS,
    step_blocks: bool = True,
) -> torch.Tensor:
    """``diff(fn(cumsum(x)))`` without autograd, for ``fn`` acting independently on rows of shape ``row``
    (the trailing dims; ``fn`` gets contiguous ``[k, n, *row]`` blocks of ``k >= 2`` whole steps of ``n``
    rows, or ``[n, *row]`` tiles of one step).

    Fused for memory traffic, one cache-sized block at a time (``block_elements``): several whole steps
    when steps are small, else one step at a time in tiles of rows. The running sums are added step by step
    into the block (the same float sum as :func:`cumulative`'s, carried from block to block), ``fn`` runs
    once per block, and the block is differenced straight into the output against the previous block's
    last result, so ``x`` is read once and the output written once, as the plain op does, with no
    temporary of the full sequence and few calls (the loop is dispatch-bound on small steps). ``fn_out``,
    when given, writes the op into two reused result buffers instead of allocating per block.
    """
    t_len = x.shape[0]
    acc = accumulation_dtype(x.dtype)
    xv = x.reshape(t_len, -1, *row)
    n_rows = xv.shape[1]
    out = torch.empty(xv.shape, dtype=x.dtype, device=x.device)
    k_steps, k_rows = _block_layout(t_len, n_rows, math.prod(row), block_elements, step_blocks)
    if k_steps > 1:
        _td_step_blocks(xv, out, fn, params, fn_out, k_steps, acc)
    else:
        _td_row_tiles(xv, out, fn, params, fn_out, k_rows, acc)
    return out.view(x.shape)


def _block_result(
    block: torch.Tensor,
    fn: CumFn,
    params: tuple[torch.Tensor | None, ...],
    fn_out: RowsOut | None,
    slot: torch.Tensor | None,
    buffer: torch.Tensor,
) -> torch.Tensor:
    """``fn`` of one block of running sums: written into ``slot`` by ``fn_out`` where both are given, else a
    new tensor (a copy where it is a view of ``buffer``, which the next block overwrites)."""
    if slot is None or fn_out is None:
        y = fn(block, *params)
        return y.clone() if shares_memory(y, buffer) else y
    fn_out(block, slot)
    return slot


def _td_step_blocks(
    xv: torch.Tensor,
    out: torch.Tensor,
    fn: CumFn,
    params: tuple[torch.Tensor | None, ...],
    fn_out: RowsOut | None,
    k: int,
    acc: torch.dtype,
) -> None:
    """:func:`td_rows` in blocks of ``k >= 2`` whole steps."""
    t_len = xv.shape[0]
    cum = torch.empty((k, *xv.shape[1:]), dtype=acc, device=xv.device)
    results = None if fn_out is None else torch.empty((2, *cum.shape), dtype=acc, device=xv.device)
    sums = cum.unbind(0)  # views made in one call each: the loop is dispatch-bound
    steps = xv.unbind(0)
    outs = out.unbind(0)
    prev: torch.Tensor | None = None  # fn of the running sum of the step before the block
    for b, t0 in enumerate(range(0, t_len, k)):
        n = min(k, t_len - t0)
        if t0 == 0:
            sums[0].copy_(steps[0])
        else:  # sums[k - 1] is the previous block's last running sum
            torch.add(sums[k - 1], steps[t0], out=sums[0])
        for i in range(1, n):
            torch.add(sums[i - 1], steps[t0 + i], out=sums[i])
        block = cum if n == k else cum[:n]
        slot = None if results is None else results[b % 2] if n == k else results[b % 2, :n]
        y = _block_result(block, fn, params, fn_out, slot, cum)
        ys = y.unbind(0)
        if prev is None:
            outs[0].copy_(ys[0])
        else:
            torch.sub(ys[0], prev, out=outs[t0])
        if n > 1:
            torch.sub(y[1:], y[:-1], out=out[t0 + 1 : t0 + n])
        prev = ys[-1]


def _td_row_tiles(
    xv: torch.Tensor,
    out: torch.Tensor,
    fn: CumFn,
    params: tuple[torch.Tensor | None, ...],
    fn_out: RowsOut | None,
    k: int,
    acc: torch.dtype,
) -> None:
    """:func:`td_rows` one step at a time, in tiles of ``k`` rows (one tile: whole steps)."""
    t_len, n_rows = xv.shape[:2]
    running = torch.empty((k, *xv.shape[2:]), dtype=acc, device=xv.device)
    results = None if fn_out is None else torch.empty((2, *running.shape), dtype=acc, device=xv.device)
    for r0 in range(0, n_rows, k):
        r1 = min(n_rows, r0 + k)
        whole = r1 - r0 == k
        run = running if whole else running[: r1 - r0]
        slots = None if results is None else (results if whole else results[:, : r1 - r0]).unbind(0)
        steps = (xv if r1 - r0 == n_rows else xv[:, r0:r1]).unbind(0)
        outs = (out if r1 - r0 == n_rows else out[:, r0:r1]).unbind(0)
        run.copy_(steps[0])
        prev: torch.Tensor | None = None
        for t in range(t_len):
            if t:
                run.add_(steps[t])
            y = _block_result(run, fn, params, fn_out, None if slots is None else slots[t % 2], running)
            if prev is None:
                outs[0].copy_(y)
            else:
                torch.sub(y, prev, out=outs[t])
            prev = y


def td_steps(x: torch.Tensor, fn_out: RowsOut) -> torch.Tensor:
    """``diff(fn(cumsum(x)))`` without autograd for a float32/float64 ``x`` and an op with an ``out=`` form.

    Three passes over the sequence, each one kernel per step, and no temporary of the full sequence: the
    running sum is kept in one step-sized buffer (the same float sum as :func:`cumulative`'s), the op
    writes ``f(x_cum[t])`` straight into the output, and the output is differenced in place from the last
    step back. ``fn_out(a, out)`` must accept any strides of ``a`` and write nothing else.
    """
    t_len = x.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    outs = out.unbind(0)  # views made in one call: the loop is dispatch-bound
    steps = x.unbind(0)
    fn_out(steps[0], outs[0])
    if t_len > 1:
        run = torch.add(steps[0], steps[1])
        fn_out(run, outs[1])
        for t in range(2, t_len):
            run.add_(steps[t])
            fn_out(run, outs[t])
    for t in range(t_len - 1, 0, -1):
        outs[t].sub_(outs[t - 1])
    return out


def td_unary(
    x: torch.Tensor,
    fn: CumFn,
    *params: torch.Tensor | None,
    elementwise_backward: ElementwiseBackward | None = None,
    inplace_fn: Callable[[torch.Tensor], object] | None = None,
    row: tuple[int, ...] | None = None,
    row_out: RowsOut | None = None,
    step_out: RowsOut | None = None,
    row_fn: CumFn | None = None,
    row_tile: int | None = None,
) -> torch.Tensor:
    """Apply ``f`` the TD way: ``diff(fn(cumsum(x), *params))``, accumulating half inputs in float32.

    Args:
        x: Input sequence ``[T, ...]`` (already checked).
        fn: ``fn(x_cum, *params)``, the op on the cumulative ``[T, ...]`` tensor. It receives float32 for
            float16/bfloat16 inputs and must cast ``params`` itself if they need to match.
        *params: Tensors (or None) passed to ``fn`` that may need gradients (weights, biases).
        elementwise_backward: Optional ``(grad_y_cum, x_cum) -> grad_x_cum`` for pointwise ``fn`` without
            params; it saves recomputing ``fn`` in backward.
        inplace_fn: Optional in-place version of ``fn`` (params bound), used without autograd: one buffer
            instead of two (a fresh CPU buffer costs about a pass over it).
        row: When ``fn`` acts independently on rows of this trailing shape (pointwise ops, norms, a
            last-dim softmax), the no-autograd path runs fused with :func:`td_rows` (``row_out``: its
            ``fn_out``; ``row_fn``: a leaner ``fn`` for it, e.g. the aten op without the functional
            wrapper's checks). ``row_tile``: run :func:`td_rows` one step at a time in tiles of at most this
            many elements (for ops whose per-call cost outweighs the cache misses of larger blocks).
        step_out: ``fn_out(x_cum_step, out)``, the op written into ``out``: for float32/float64 inputs the
            no-autograd path runs :func:`td_steps`.

    Returns:
        The differential output, in ``x.dtype`` (or ``fn``'s result dtype when ``fn`` changes the dtype,
        following torch's type promotion: e.g. ``torch.tanh`` of an integer input gives float).
    """
    if needs_grad(x, *params):
        out: torch.Tensor = _TDUnary.apply(x, fn, elementwise_backward, *params)
        return out
    with torch.no_grad():
        if step_out is not None and x.dtype in (torch.float32, torch.float64):
            return td_steps(x, step_out)
        if row is not None and x.is_floating_point():
            return td_rows(
                x,
                fn if row_fn is None else row_fn,
                row,
                *params,
                fn_out=row_out,
                block_elements=_BLOCK_ELEMENTS if row_tile is None else row_tile,
                step_blocks=row_tile is None,
            )
        acc = accumulation_dtype(x.dtype)
        x_cum = cumulative(x, acc)
        if inplace_fn is not None and x_cum.is_floating_point():
            inplace_fn(x_cum)
            return difference_(x_cum).to(x.dtype)
        y_cum = fn(x_cum, *params)
        if y_cum.shape == x_cum.shape and y_cum.dtype == x_cum.dtype and not shares_memory(y_cum, x_cum):
            out = difference_into(y_cum, x_cum)  # x_cum is dead: the differences go into its memory
        else:
            out = difference_(y_cum)
        return out.to(output_dtype(x.dtype, acc, y_cum.dtype))

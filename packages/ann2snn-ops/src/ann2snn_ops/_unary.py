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
"""Elements of one block of rows in :func:`td_rows`: its running sum and two results (768 KiB in float32)
stay in a core's L2 cache while the time steps go by."""


RowsOut = Callable[[torch.Tensor, torch.Tensor], object]
"""``fn_out(x_cum_block, out)``: the op written into ``out`` (an ``out=`` variant, no allocation)."""


def _apply(
    fn: CumFn,
    fn_out: RowsOut | None,
    run: torch.Tensor,
    slot: torch.Tensor | None,
    params: tuple[torch.Tensor | None, ...],
) -> torch.Tensor:
    if fn_out is None or slot is None:
        return fn(run, *params)
    fn_out(run, slot)
    return slot


def td_rows(
    x: torch.Tensor,
    fn: CumFn,
    row: tuple[int, ...],
    *params: torch.Tensor | None,
    fn_out: RowsOut | None = None,
) -> torch.Tensor:
    """``diff(fn(cumsum(x)))`` without autograd, for ``fn`` acting independently on rows of shape ``row``
    (the trailing dims; ``fn`` gets ``[n, *row]`` blocks).

    Fused for memory traffic: a block of rows at a time, one time step after the other, the running sum,
    ``fn``'s result and the previous step's result stay in cache, so ``x`` is read once and the output
    written once, as the plain op does; the running sum is the same float sum as :func:`cumulative`'s.
    ``fn_out``, when given, writes the op into two reused result buffers instead of allocating per step.
    """
    t_len = x.shape[0]
    acc = accumulation_dtype(x.dtype)
    xv = x.reshape(t_len, -1, *row)
    n_rows = xv.shape[1]
    out = torch.empty(xv.shape, dtype=x.dtype, device=x.device)
    per_block = max(1, _BLOCK_ELEMENTS // max(math.prod(row), 1))
    block = (min(per_block, n_rows), *row)
    running = torch.empty(block, dtype=acc, device=x.device)
    results = torch.empty((2, *block), dtype=acc, device=x.device) if fn_out is not None else None

    for r0 in range(0, n_rows, per_block):
        r1 = min(n_rows, r0 + per_block)
        run = running[: r1 - r0]
        steps = xv[:, r0:r1].unbind(0)  # views made in one call each: the loop is dispatch-bound
        outs = out[:, r0:r1].unbind(0)
        slots = (None, None) if results is None else results[:, : r1 - r0].unbind(0)
        run.copy_(steps[0])
        prev = _apply(fn, fn_out, run, slots[0], params)
        outs[0].copy_(prev)
        for t in range(1, t_len):
            run.add_(steps[t])
            cur = _apply(fn, fn_out, run, slots[t % 2], params)
            torch.sub(cur, prev, out=outs[t])
            prev = cur
    return out.view(x.shape)


def td_steps(x: torch.Tensor, fn_out: RowsOut, min_elements: int = 0) -> torch.Tensor:
    """``diff(fn(cumsum(x)))`` without autograd for a float32/float64 ``x`` and an op with an ``out=`` form.

    Three passes over the sequence, each one kernel per step, and no temporary of the full sequence: the
    running sum is kept in one step-sized buffer (the same float sum as :func:`cumulative`'s), the op
    writes ``f(x_cum[t])`` straight into the output, and the output is differenced in place from the last
    step back. ``fn_out(a, out)`` must accept any strides of ``a`` and write nothing else.

    ``min_elements``: for an op with a high fixed cost per call (GELU's is several microseconds) and
    ``fn_out(a, a)`` allowed (elementwise ops), the running sums of several steps are written into the
    output and the op runs once in place on each group of at least ``min_elements`` elements.
    """
    t_len = x.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    outs = out.unbind(0)  # views made in one call: the loop is dispatch-bound
    steps = x.unbind(0)
    step_size = max(outs[0].numel(), 1)
    group = 1 if min_elements <= 0 else max(1, -(-min_elements // step_size))
    if group == 1:
        fn_out(steps[0], outs[0])
        if t_len > 1:
            run = torch.add(steps[0], steps[1])
            fn_out(run, outs[1])
            for t in range(2, t_len):
                run.add_(steps[t])
                fn_out(run, outs[t])
    else:
        outs[0].copy_(steps[0])
        last = outs[0]  # the running sum of the step before the current one
        kept: torch.Tensor | None = None
        for t0 in range(0, t_len, group):
            t1 = min(t_len, t0 + group)
            for t in range(max(t0, 1), t1):
                torch.add(last, steps[t], out=outs[t])
                last = outs[t]
            if t1 < t_len:  # keep the group's last running sum before the op overwrites it
                kept = last.clone() if kept is None else kept.copy_(last)
                last = kept
            block = out[t0:t1]
            fn_out(block, block)
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
    step_min_elements: int = 0,
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
            ``fn_out``).
        step_out: ``fn_out(x_cum_step, out)``, the op written into ``out``: for float32/float64 inputs the
            no-autograd path runs :func:`td_steps` (``step_min_elements``: its ``min_elements``).

    Returns:
        The differential output, in ``x.dtype`` (or ``fn``'s result dtype when ``fn`` changes the dtype,
        following torch's type promotion: e.g. ``torch.tanh`` of an integer input gives float).
    """
    if needs_grad(x, *params):
        out: torch.Tensor = _TDUnary.apply(x, fn, elementwise_backward, *params)
        return out
    with torch.no_grad():
        if step_out is not None and x.dtype in (torch.float32, torch.float64):
            return td_steps(x, step_out, step_min_elements)
        if row is not None and x.is_floating_point():
            return td_rows(x, fn, row, *params, fn_out=row_out)
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

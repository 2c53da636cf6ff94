"""TD products of two time-varying tensors: ``TDMatMul`` and ``TDMul``.

``a @ b`` is bilinear, not linear: with both operands differential, the product of the steps is not the
difference of the cumulative products. These operators compute ``diff(cumsum(a) @ cumsum(b))`` (resp. ``*``),
which attention written with ``matmul`` needs (``q @ k.transpose(-2, -1)``, ``attn @ v``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ann2snn_ops._base import TDModule
from ann2snn_ops._checks import check_step, check_time_sequence, needs_grad
from ann2snn_ops._cumsum import accumulation_dtype, cumsum_time, difference, td_chunked

__all__ = ["TDMatMul", "TDMul"]


def _align(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Insert singleton dims right after the time axis so that ``x`` has ``rank`` dims (per-step broadcasting)."""
    missing = rank - x.dim()
    if missing <= 0:
        return x
    return x.reshape(x.shape[0], *([1] * missing), *x.shape[1:])


BinaryOp = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _TDBinary(TDModule):
    def _check_pair(self, a: torch.Tensor, b: torch.Tensor) -> None:
        name = type(self).__name__
        check_time_sequence(a, name)
        check_time_sequence(b, name)
        if a.shape[0] != b.shape[0]:
            raise ValueError(
                f"{name} expects a_seq and b_seq to have the same time length, but got {a.shape[0]} and {b.shape[0]}."
            )
        if a.dtype != b.dtype:
            raise TypeError(
                f"{name} expects a_seq and b_seq of the same dtype, but got {a.dtype} and {b.dtype}."
            )

    def _run(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        op: BinaryOp,
        in_place: BinaryOp | None = None,
    ) -> torch.Tensor:
        """``diff(op(cumsum(a), cumsum(b)))``; ``in_place`` (writing into its first argument) without autograd."""
        name = type(self).__name__
        if self.streaming:
            check_step(a, name)
            check_step(b, name)
            a, b = a.unsqueeze(0), b.unsqueeze(0)
            self._check_pair(a, b)
            self._check_stream_shapes(a_seq=a.shape[1:], b_seq=b.shape[1:])
            acc = accumulation_dtype(a.dtype)
            st = self._state
            first = "y" not in st
            a_cum = a.to(acc, copy=True) if first else st["a"] + a
            b_cum = b.to(acc, copy=True) if first else st["b"] + b
            y_cum = op(a_cum, b_cum)
            out = y_cum if first else y_cum - st["y"]
            st.update(a=a_cum, b=b_cum, y=y_cum)
            return out[0].to(a.dtype)
        self._check_pair(a, b)
        if not needs_grad(a, b):
            with torch.no_grad():
                return td_chunked(op if in_place is None else in_place, (a, b), a.dtype)
        acc = accumulation_dtype(a.dtype)
        a_cum = cumsum_time(a, acc)
        b_cum = a_cum if b is a else cumsum_time(b, acc)
        return difference(op(a_cum, b_cum)).to(a.dtype)


def _matmul_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(a[t], b[t])`` for every ``t`` in one call (1-D steps follow matmul's vector rules)."""
    vec_a = a.dim() == 2
    vec_b = b.dim() == 2
    if vec_a:
        a = a.unsqueeze(-2)
    if vec_b:
        b = b.unsqueeze(-1)
    rank = max(a.dim(), b.dim())
    y = torch.matmul(_align(a, rank), _align(b, rank))
    if vec_a:
        y = y.squeeze(-2)
    if vec_b:
        y = y.squeeze(-1)
    return y


class TDMatMul(_TDBinary):
    """Temporal-difference matrix product: ``Y.cumsum(0)[t] == A.cumsum(0)[t] @ B.cumsum(0)[t]``.

    Each step follows ``torch.matmul``'s rules (1-D steps are vectors; batch dims broadcast, ranks are
    aligned after the time axis). Half inputs are accumulated and multiplied in float32.

    Shape:
        - a_seq: ``[T, *, n, k]`` (or ``[T, k]``); b_seq: ``[T, *, k, m]`` (or ``[T, k]``); one step each
          in streaming mode.
        - Output: ``[T, *, n, m]`` (vector dims removed as in ``torch.matmul``).

    Examples:
        >>> op = TDMatMul()
        >>> a, b = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 5, 6)
        >>> torch.allclose(op(a, b).cumsum(0), a.cumsum(0) @ b.cumsum(0), atol=1e-4)
        True
    """

    def forward(self, a_seq: torch.Tensor, b_seq: torch.Tensor) -> torch.Tensor:
        """Apply the TD product to two complete sequences (or one step of each in streaming mode)."""
        return self._run(a_seq, b_seq, _matmul_steps)


class TDMul(_TDBinary):
    """Temporal-difference elementwise product: ``Y.cumsum(0)[t] == A.cumsum(0)[t] * B.cumsum(0)[t]``.

    Each step broadcasts like ``a[t] * b[t]`` (ranks aligned after the time axis). Half inputs are
    accumulated and multiplied in float32.

    Shape:
        - a_seq, b_seq: ``[T, *]`` whose steps broadcast; one step each in streaming mode.
        - Output: ``[T, *broadcast]``.

    Examples:
        >>> op = TDMul()
        >>> a, b = torch.randn(3, 2, 4), torch.randn(3, 4)
        >>> torch.allclose(op(a, b).cumsum(0), a.cumsum(0) * b.cumsum(0)[:, None], atol=1e-5)
        True
    """

    def forward(self, a_seq: torch.Tensor, b_seq: torch.Tensor) -> torch.Tensor:
        """Apply the TD product to two complete sequences (or one step of each in streaming mode)."""
        return self._run(a_seq, b_seq, self._op, _mul_in_place(a_seq, b_seq))

    @staticmethod
    def _op(a_cum: torch.Tensor, b_cum: torch.Tensor) -> torch.Tensor:
        rank = max(a_cum.dim(), b_cum.dim())
        return _align(a_cum, rank) * _align(b_cum, rank)


def _mul_in_place(a: torch.Tensor, b: torch.Tensor) -> BinaryOp | None:
    """``a_cum *= b_cum`` when ``a``'s steps have the product's shape (no fresh result per block), else None."""
    if a.dim() == 0 or b.dim() == 0 or a.dtype != b.dtype:  # refused by the checks of _run, with our message
        return None
    rank = max(a.dim(), b.dim())
    try:
        fits = a.dim() == rank and torch.broadcast_shapes(a.shape, _align(b, rank).shape) == a.shape
    except RuntimeError:  # shapes that do not broadcast: the plain product raises torch's own error
        return None
    return (lambda a_cum, b_cum: a_cum.mul_(_align(b_cum, rank))) if fits else None

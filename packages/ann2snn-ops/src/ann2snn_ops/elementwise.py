"""TD versions of pointwise activations and softmax: ``TDGELU``, ``TDSiLU``, ``TDSoftmax``."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ann2snn_ops._base import TDModule
from ann2snn_ops._checks import needs_grad
from ann2snn_ops._cumsum import (
    accumulation_dtype,
    cumulative,
    difference_adjoint,
    difference_into,
    reverse_cumulative_,
)
from ann2snn_ops._unary import composite_grads

__all__ = ["TDGELU", "TDSiLU", "TDSoftmax"]


def _check_dim_arg(dim: object, owner: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{owner}: dim must be an int, but got {dim!r} ({type(dim).__name__}).")
    return dim


class _TDSoftmaxFn(torch.autograd.Function):
    """Softmax's backward needs its output: keep ``y_cum`` and difference into ``x_cum``.

    The input is kept too, for the differentiable recomputation under ``create_graph=True``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int) -> torch.Tensor:  # type: ignore[override]
        x_cum = cumulative(x, accumulation_dtype(x.dtype))
        y_cum = torch.softmax(x_cum, dim)
        out = difference_into(y_cum, x_cum)
        ctx.save_for_backward(x, y_cum)
        ctx.dim = dim
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        x, y_cum = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            dim = ctx.dim
            (grad_x,) = composite_grads(lambda xc: torch.softmax(xc, dim), x, (), grad_out, (True,))
            return grad_x, None
        grad_y_cum = difference_adjoint(grad_out.to(y_cum.dtype))
        grad_x_cum = torch._softmax_backward_data(grad_y_cum, y_cum, ctx.dim, y_cum.dtype)
        return reverse_cumulative_(grad_x_cum).to(x.dtype), None


def _softmax_last(x_cum: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x_cum, -1)


def _softmax_last_out(x_cum: torch.Tensor, out: torch.Tensor) -> None:
    torch._softmax(x_cum, -1, False, out=out)


class TDSoftmax(TDModule):
    """Temporal-difference softmax: ``Y.cumsum(0)[t] == softmax(X.cumsum(0)[t], dim)``.

    The input is a complete time sequence with the time axis at dimension 0. ``dim`` indexes the whole
    ``[T, ...]`` tensor (so ``-1`` is the feature axis) and must not resolve to the time axis.

    Args:
        dim: The softmax dimension of the ``[T, ...]`` input. Must be an int.

    Shape:
        - Input: ``[T, *]``, at least 2-D (one step ``[*]`` in streaming mode).
        - Output: the same shape as the input.

    Examples:
        >>> op = TDSoftmax(dim=-1)
        >>> x = torch.randn(4, 2, 5)
        >>> y = op(x)
        >>> torch.allclose(y.cumsum(0), torch.softmax(x.cumsum(0), dim=-1), atol=1e-6)
        True
    """

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = _check_dim_arg(dim, "TDSoftmax")

    @classmethod
    def from_module(cls, module: nn.Softmax) -> TDSoftmax:
        """Build from an ``nn.Softmax`` of the ANN.

        The ANN module sees ``[B, ...]``; the TD module sees ``[T, B, ...]``. A non-negative ``dim`` is
        therefore shifted by one; a negative ``dim`` is kept.

        Raises:
            TypeError: If ``module`` is not an ``nn.Softmax``.
            ValueError: If ``module.dim`` is None (the implicit-dim legacy behaviour).
        """
        if not isinstance(module, nn.Softmax):
            raise TypeError(f"TDSoftmax.from_module expects an nn.Softmax, but got {type(module).__name__}.")
        if module.dim is None:
            raise ValueError(
                "TDSoftmax.from_module requires an nn.Softmax with an explicit dim, but got None."
            )
        dim = module.dim + 1 if module.dim >= 0 else module.dim
        td = cls(dim=dim)
        td.train(module.training)
        return td

    def _check_sequence(self, x_seq: torch.Tensor) -> None:
        nd = x_seq.dim()
        dim = self.dim + nd if self.dim < 0 else self.dim
        if not 0 <= dim < nd:
            raise ValueError(
                f"dim must be in the range [{-nd}, {nd - 1}], but got {self.dim} for an input with {nd} dimensions."
            )
        if dim == 0:
            raise ValueError(
                "TDSoftmax reserves dimension 0 as the time dimension; softmax dim must not resolve to 0."
            )

    def _fn(self, x_cum: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x_cum, self.dim)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Apply TD softmax to ``x_seq`` ``[T, ...]`` (or one step in streaming mode)."""
        last = isinstance(x_seq, torch.Tensor) and x_seq.dim() > 0 and self.dim in (-1, x_seq.dim() - 1)
        if last and not self.streaming and not needs_grad(x_seq):  # a last-dim softmax acts on rows
            return self._unary_forward(
                x_seq,
                _softmax_last,
                row=(x_seq.shape[-1],),
                row_out=_softmax_last_out,
                step_out=_softmax_last_out,
            )
        return self._unary_forward(x_seq, self._fn, grad_path=self._grad_path, step_out=self._step_out)

    def _step_out(self, x_cum_step: torch.Tensor, out: torch.Tensor) -> None:
        # One time step (no time axis) of the [T, ...] input, whose dims were checked: shift dim by one.
        dim = self.dim if self.dim < 0 else self.dim - 1
        torch._softmax(x_cum_step, dim, False, out=out)

    def _grad_path(self, x_seq: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _TDSoftmaxFn.apply(x_seq, self.dim)
        return out

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class TDGELU(TDModule):
    """Temporal-difference GELU: ``Y.cumsum(0)[t] == gelu(X.cumsum(0)[t])``.

    Args:
        approximate: ``"none"`` (exact erf form) or ``"tanh"``, as in ``nn.GELU``.

    Shape:
        - Input: ``[T, *]``, at least 2-D (one step ``[*]`` in streaming mode).
        - Output: the same shape as the input.

    Examples:
        >>> op = TDGELU(approximate="tanh")
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(op(x).cumsum(0), F.gelu(x.cumsum(0), approximate="tanh"), atol=1e-6)
        True
    """

    def __init__(self, approximate: Literal["none", "tanh"] = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"TDGELU: approximate must be 'none' or 'tanh', but got {approximate!r}.")
        self.approximate = approximate

    @classmethod
    def from_module(cls, module: nn.GELU) -> TDGELU:
        """Build from an ``nn.GELU`` (copies ``approximate`` and the training flag).

        Raises:
            TypeError: If ``module`` is not an ``nn.GELU``.
        """
        if not isinstance(module, nn.GELU):
            raise TypeError(f"TDGELU.from_module expects an nn.GELU, but got {type(module).__name__}.")
        td = cls(approximate=module.approximate)  # type: ignore[arg-type]
        td.train(module.training)
        return td

    def _fn(self, x_cum: torch.Tensor) -> torch.Tensor:
        return F.gelu(x_cum, approximate=self.approximate)

    def _backward(self, grad: torch.Tensor, x_cum: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.gelu_backward.grad_input(
            grad, x_cum, approximate=self.approximate, grad_input=grad
        )

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Apply TD GELU to ``x_seq`` ``[T, ...]`` (or one step in streaming mode)."""
        # Without autograd: the running sums are added into the output, GELU runs once in place on the
        # whole sequence and the output is differenced in place. torch's CPU GELU (oneDNN) costs about
        # 9 us per call whatever the size, and one call over the sequence beat per-step and cache-sized
        # groups of steps at every T measured (ViT shapes, T = 4..32).
        return self._unary_forward(
            x_seq,
            self._fn,
            elementwise_backward=self._backward,
            inplace_fn=self._inplace,
        )

    def _inplace(self, x_cum: torch.Tensor) -> None:
        torch.ops.aten.gelu_(x_cum, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class TDSiLU(TDModule):
    """Temporal-difference SiLU (swish): ``Y.cumsum(0)[t] == silu(X.cumsum(0)[t])``.

    Shape:
        - Input: ``[T, *]``, at least 2-D (one step ``[*]`` in streaming mode).
        - Output: the same shape as the input.

    Examples:
        >>> op = TDSiLU()
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(op(x).cumsum(0), F.silu(x.cumsum(0)), atol=1e-6)
        True
    """

    @classmethod
    def from_module(cls, module: nn.SiLU) -> TDSiLU:
        """Build from an ``nn.SiLU`` (its ``inplace`` flag is irrelevant here); copies the training flag.

        Raises:
            TypeError: If ``module`` is not an ``nn.SiLU``.
        """
        if not isinstance(module, nn.SiLU):
            raise TypeError(f"TDSiLU.from_module expects an nn.SiLU, but got {type(module).__name__}.")
        td = cls()
        td.train(module.training)
        return td

    @staticmethod
    def _fn(x_cum: torch.Tensor) -> torch.Tensor:
        return F.silu(x_cum)

    @staticmethod
    def _backward(grad: torch.Tensor, x_cum: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.silu_backward.grad_input(grad, x_cum, grad_input=grad)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Apply TD SiLU to ``x_seq`` ``[T, ...]`` (or one step in streaming mode)."""
        return self._unary_forward(
            x_seq,
            self._fn,
            elementwise_backward=self._backward,
            inplace_fn=self._inplace,
            step_out=self._out,
        )

    @staticmethod
    def _out(x_cum: torch.Tensor, out: torch.Tensor) -> None:
        torch.ops.aten.silu.out(x_cum, out=out)

    @staticmethod
    def _inplace(x_cum: torch.Tensor) -> None:
        F.silu(x_cum, inplace=True)

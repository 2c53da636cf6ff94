"""TD normalisation layers: ``TDLayerNorm`` and ``TDRMSNorm``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ann2snn_ops._base import TDModule
from ann2snn_ops._checks import as_shape_tuple, copy_module_state, reject_lazy
from ann2snn_ops._cumsum import (
    accumulation_dtype,
    cumulative,
    difference_,
    difference_adjoint,
    reverse_cumulative_,
)
from ann2snn_ops._unary import composite_grads

__all__ = ["TDLayerNorm", "TDRMSNorm"]

_ShapeArg = int | Sequence[int] | torch.Size

_NORM_TILE = 1 << 19
"""Elements per ``td_rows`` call of the norms without autograd (2 MiB in float32), one step at a time: a
norm kernel costs more per call than a pointwise op, so fewer, larger calls beat the L2-sized blocks of
the pointwise ops (measured at ViT shapes, 1 thread: 2.1-2.5x the plain op with 256 KiB blocks of several
steps, 1.65-2.1x with these)."""


def _check_trailing(op: str, x_seq: torch.Tensor, normalized_shape: tuple[int, ...]) -> None:
    n = len(normalized_shape)
    trailing = tuple(x_seq.shape[1:]) if n > x_seq.dim() - 1 else tuple(x_seq.shape[-n:])
    if trailing != normalized_shape:
        raise ValueError(
            f"{op} expects the trailing shape of x_seq to match normalized_shape={normalized_shape}, "
            f"but got {trailing}."
        )


def _dtype_of(x: object) -> torch.dtype:
    # The checks in _unary_forward reject non-tensors with a clear message; this only must not fail first.
    return x.dtype if isinstance(x, torch.Tensor) else torch.float32


def _param_for(p: torch.Tensor | None, x_cum: torch.Tensor, in_dtype: torch.dtype) -> torch.Tensor | None:
    # Half inputs are accumulated in float32; their (half or float) params follow. Other dtypes are left
    # alone so that mismatches raise exactly like the torch op.
    if p is None or x_cum.dtype == in_dtype:
        return p
    return p.to(x_cum.dtype)


class _TDLayerNormFn(torch.autograd.Function):
    """Keeps ``x_cum``, the input and the per-row statistics; backward calls torch's layer-norm
    backward kernel directly (or, under ``create_graph=True``, differentiates the composite op)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        normalized_shape: tuple[int, ...],
        eps: float,
    ) -> torch.Tensor:
        x_cum = cumulative(x, accumulation_dtype(x.dtype))
        w = _param_for(weight, x_cum, x.dtype)
        b = _param_for(bias, x_cum, x.dtype)
        y_cum, mean, rstd = torch.native_layer_norm(x_cum, list(normalized_shape), w, b, eps)
        out = difference_(y_cum)
        ctx.save_for_backward(x, weight, bias, x_cum, mean, rstd)
        ctx.normalized_shape = normalized_shape
        ctx.eps = eps
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, x_cum, mean, rstd = ctx.saved_tensors
        shape, eps = ctx.normalized_shape, ctx.eps
        if torch.is_grad_enabled():  # create_graph=True

            def fn(xc: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
                return F.layer_norm(xc, shape, _param_for(w, xc, x.dtype), _param_for(b, xc, x.dtype), eps)

            grads = composite_grads(fn, x, (weight, bias), grad_out, ctx.needs_input_grad[:3])
            return (*grads, None, None)
        w = _param_for(weight, x_cum, x.dtype)
        b = _param_for(bias, x_cum, x.dtype)
        grad_y_cum = difference_adjoint(grad_out.to(x_cum.dtype))
        mask = [
            ctx.needs_input_grad[0],
            w is not None and ctx.needs_input_grad[1],
            b is not None and ctx.needs_input_grad[2],
        ]
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
            grad_y_cum, x_cum, list(shape), mean, rstd, w, b, mask
        )
        grad_x = None if gx is None else reverse_cumulative_(gx).to(x.dtype)
        grad_w = None if gw is None or weight is None else gw.to(weight.dtype)
        grad_b = None if gb is None or bias is None else gb.to(bias.dtype)
        return grad_x, grad_w, grad_b, None, None


_HAS_FUSED_RMS_NORM = hasattr(torch.ops.aten, "_fused_rms_norm")  # returns (output, rstd); recent torch


class _TDRMSNormFn(torch.autograd.Function):
    """Keeps ``x_cum``, the input and the per-row ``rstd``; the backward is written out in a few
    in-place passes (or, under ``create_graph=True``, differentiates the composite op)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        normalized_shape: tuple[int, ...],
        eps: float | None,
    ) -> torch.Tensor:
        x_cum = cumulative(x, accumulation_dtype(x.dtype))
        w = _param_for(weight, x_cum, x.dtype)
        y_cum, rstd = torch.ops.aten._fused_rms_norm(x_cum, list(normalized_shape), w, eps)
        out = difference_(y_cum)
        ctx.save_for_backward(x, weight, x_cum, rstd)
        ctx.normalized_shape = normalized_shape
        ctx.eps = eps
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, x_cum, rstd = ctx.saved_tensors
        shape, eps = ctx.normalized_shape, ctx.eps
        if torch.is_grad_enabled():  # create_graph=True

            def fn(xc: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
                return F.rms_norm(xc, shape, _param_for(w, xc, x.dtype), eps)

            grads = composite_grads(fn, x, (weight,), grad_out, ctx.needs_input_grad[:2])
            return (*grads, None, None)
        w = _param_for(weight, x_cum, x.dtype)
        d = math.prod(shape)
        g = difference_adjoint(grad_out.to(x_cum.dtype)).view(-1, d)
        r = rstd.reshape(-1, 1)
        n = x_cum.view(-1, d) * r  # the normalised input
        grad_w = None
        if w is not None and weight is not None:
            if ctx.needs_input_grad[1]:
                grad_w = (g * n).sum(0).view(w.shape).to(weight.dtype)
            g.mul_(w.reshape(1, d))
        grad_x = None
        if ctx.needs_input_grad[0]:
            # d/dx [x * rstd] applied to g: rstd * (g - n * mean(g * n))
            dot = torch.linalg.vecdot(g, n).unsqueeze(1).div_(d)
            g.sub_(n.mul_(dot)).mul_(r)
            grad_x = reverse_cumulative_(g.view(x_cum.shape)).to(x.dtype)
        return grad_x, grad_w, None, None


class TDLayerNorm(TDModule):
    """Temporal-difference LayerNorm: ``Y.cumsum(0)[t] == layer_norm(X.cumsum(0)[t])``.

    Same arguments, parameters (``weight``, ``bias``) and initialisation as ``nn.LayerNorm``. The
    normalised shape covers trailing dimensions only, never the time axis.

    Args:
        normalized_shape: Trailing shape to normalise over (int, sequence or ``torch.Size``); stored as a tuple.
        eps: Added to the variance.
        elementwise_affine: Whether to learn ``weight`` (ones) and ``bias`` (zeros).
        bias: Whether to learn ``bias`` when ``elementwise_affine`` is True.
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Shape:
        - Input: ``[T, *, *normalized_shape]`` (one step ``[*, *normalized_shape]`` in streaming mode).
        - Output: the same shape as the input.

    Examples:
        >>> op = TDLayerNorm(4)
        >>> x = torch.randn(3, 2, 4)
        >>> torch.allclose(op(x).cumsum(0), F.layer_norm(x.cumsum(0), (4,)), atol=1e-5)
        True
    """

    def __init__(
        self,
        normalized_shape: _ShapeArg,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = as_shape_tuple(normalized_shape, "TDLayerNorm: normalized_shape")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set ``weight`` to ones and ``bias`` to zeros (when present)."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @classmethod
    def from_module(cls, module: nn.LayerNorm) -> TDLayerNorm:
        """Build from an ``nn.LayerNorm``: copies the configuration, parameters (values, dtype, device,
        ``requires_grad``) and the training flag.

        Raises:
            TypeError: If ``module`` is not an ``nn.LayerNorm``.
        """
        if not isinstance(module, nn.LayerNorm):
            raise TypeError(
                f"TDLayerNorm.from_module expects an nn.LayerNorm, but got {type(module).__name__}."
            )
        reject_lazy(module, "TDLayerNorm")
        ref = module.weight
        td = cls(
            module.normalized_shape,
            eps=module.eps,
            elementwise_affine=module.elementwise_affine,
            bias=module.bias is not None,
            device=None if ref is None else ref.device,
            dtype=None if ref is None else ref.dtype,
        )
        copy_module_state(module, td, ("weight", "bias"))
        return td

    def _check_sequence(self, x_seq: torch.Tensor) -> None:
        _check_trailing("TDLayerNorm", x_seq, self.normalized_shape)

    def _fn(
        self,
        in_dtype: torch.dtype,
        x_cum: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        return F.layer_norm(
            x_cum,
            self.normalized_shape,
            _param_for(weight, x_cum, in_dtype),
            _param_for(bias, x_cum, in_dtype),
            self.eps,
        )

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Apply TD LayerNorm to ``x_seq`` ``[T, ..., *normalized_shape]`` (or one step in streaming mode)."""
        return self._unary_forward(
            x_seq,
            partial(self._fn, _dtype_of(x_seq)),
            self.weight,
            self.bias,
            grad_path=self._grad_path,
            row=self.normalized_shape,
            row_fn=self._row_fn(x_seq),
            row_tile=_NORM_TILE,
        )

    def _row_fn(self, x_seq: object) -> Callable[..., torch.Tensor] | None:
        """``td_rows``'s op on a block of rows: ``torch.native_layer_norm`` itself (``F.layer_norm``'s
        wrapper costs a microsecond per block; ``native_layer_norm.out`` computes into a temporary and
        copies), or None where a parameter's dtype is not the accumulation dtype (then ``F.layer_norm``
        casts half parameters or raises like torch)."""
        if not isinstance(x_seq, torch.Tensor):
            return None
        acc = accumulation_dtype(x_seq.dtype)
        if any(p is not None and p.dtype != acc for p in (self.weight, self.bias)):
            return None
        shape, eps = list(self.normalized_shape), self.eps

        def row_fn(
            x_cum: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
        ) -> torch.Tensor:
            return torch.native_layer_norm(x_cum, shape, weight, bias, eps)[0]

        return row_fn

    def _grad_path(self, x_seq: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _TDLayerNormFn.apply(
            x_seq, self.weight, self.bias, self.normalized_shape, self.eps
        )
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )


class TDRMSNorm(TDModule):
    """Temporal-difference RMSNorm: ``Y.cumsum(0)[t] == rms_norm(X.cumsum(0)[t])``.

    Same arguments, parameter (``weight``) and initialisation as ``nn.RMSNorm``. With ``eps=None`` torch's
    default applies (the machine epsilon of the op-math dtype: float32 for half inputs).

    Args:
        normalized_shape: Trailing shape to normalise over (int, sequence or ``torch.Size``); stored as a tuple.
        eps: Added to the mean square; None means torch's default.
        elementwise_affine: Whether to learn ``weight`` (ones).
        device: Device of the parameter.
        dtype: Dtype of the parameter.

    Shape:
        - Input: ``[T, *, *normalized_shape]`` (one step ``[*, *normalized_shape]`` in streaming mode).
        - Output: the same shape as the input.

    Examples:
        >>> op = TDRMSNorm(4)
        >>> x = torch.randn(3, 2, 4)
        >>> torch.allclose(op(x).cumsum(0), F.rms_norm(x.cumsum(0), (4,)), atol=1e-5)
        True
    """

    def __init__(
        self,
        normalized_shape: _ShapeArg,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = as_shape_tuple(normalized_shape, "TDRMSNorm: normalized_shape")
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, int | float) or eps < 0):
            raise ValueError(f"TDRMSNorm: eps must be None or a non-negative number, but got {eps!r}.")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.weight: nn.Parameter | None
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set ``weight`` to ones (when present)."""
        if self.weight is not None:
            nn.init.ones_(self.weight)

    @classmethod
    def from_module(cls, module: nn.RMSNorm) -> TDRMSNorm:
        """Build from an ``nn.RMSNorm``: copies the configuration, the weight (values, dtype, device,
        ``requires_grad``) and the training flag.

        Raises:
            TypeError: If ``module`` is not an ``nn.RMSNorm``.
        """
        if not isinstance(module, nn.RMSNorm):
            raise TypeError(f"TDRMSNorm.from_module expects an nn.RMSNorm, but got {type(module).__name__}.")
        reject_lazy(module, "TDRMSNorm")
        ref = module.weight
        td = cls(
            module.normalized_shape,
            eps=module.eps,
            elementwise_affine=module.elementwise_affine,
            device=None if ref is None else ref.device,
            dtype=None if ref is None else ref.dtype,
        )
        copy_module_state(module, td, ("weight",))
        return td

    def _check_sequence(self, x_seq: torch.Tensor) -> None:
        _check_trailing("TDRMSNorm", x_seq, self.normalized_shape)

    def _fn(self, in_dtype: torch.dtype, x_cum: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        # eps=None: torch uses the epsilon of the op-math dtype (float32 for half inputs), which is x_cum's.
        return F.rms_norm(x_cum, self.normalized_shape, _param_for(weight, x_cum, in_dtype), self.eps)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Apply TD RMSNorm to ``x_seq`` ``[T, ..., *normalized_shape]`` (or one step in streaming mode)."""
        grad_path = None
        if _HAS_FUSED_RMS_NORM and isinstance(x_seq, torch.Tensor):
            acc = accumulation_dtype(x_seq.dtype)
            if self.weight is None or self.weight.dtype in (
                acc,
                x_seq.dtype,
            ):  # else torch's mixed-dtype path
                grad_path = self._grad_path
        return self._unary_forward(
            x_seq,
            partial(self._fn, _dtype_of(x_seq)),
            self.weight,
            grad_path=grad_path,
            row=self.normalized_shape,
            row_tile=_NORM_TILE,
        )

    def _grad_path(self, x_seq: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _TDRMSNormFn.apply(x_seq, self.weight, self.normalized_shape, self.eps)
        return out

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"

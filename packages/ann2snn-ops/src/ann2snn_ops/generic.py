"""``TDFunction``: make any function that acts on trailing dimensions a TD operator."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ann2snn_ops._base import TDModule

__all__ = ["TDFunction"]

# exact pointwise functions with an out= form: fused, one cached block of steps at a time (td_rows);
# transcendental ones stay on the whole tensor (their vector kernels round a block's tail differently)
_POINTWISE_OUT: dict[Callable[..., torch.Tensor], Callable[[torch.Tensor, torch.Tensor], object]] = {
    torch.relu: lambda x, out: torch.clamp_min(x, 0, out=out),
}


class TDFunction(TDModule):
    """Temporal-difference wrapper of a function: ``Y.cumsum(0)[t] == fn(X.cumsum(0)[t])``.

    ``fn`` is called on cumulative ``[k, ...]`` blocks of time steps, so it must act on each time step
    independently (pointwise functions, or reductions/normalisations over trailing dimensions), and it must
    not modify its input in place (the cumulative input is kept for backward and streaming). The same
    input checks, float32 accumulation for half inputs (``fn`` then sees float32; the output is cast back),
    memory-lean autograd and streaming mode as the built-in operators apply. The output dtype follows torch's
    type promotion for ``fn``: ``TDFunction(torch.tanh)`` of an integer input gives the default float dtype
    (the running sum stays exact in int64), an integer-valued ``fn`` of integers stays integer. Second
    derivatives are those of ``fn`` on the cumulative input.

    Args:
        fn: ``Tensor -> Tensor`` preserving the leading time axis, e.g. ``torch.tanh``.
        name: Name used in error messages and the repr; default ``"TDFunction"``.

    Shape:
        - Input: ``[T, *]``, at least 2-D (one step ``[*]`` in streaming mode).
        - Output: ``[T, *out]`` as ``fn`` maps each step.

    Examples:
        >>> op = TDFunction(torch.tanh)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(op(x).cumsum(0), torch.tanh(x.cumsum(0)), atol=1e-6)
        True
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str | None = None) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"TDFunction expects a callable fn, but got {type(fn).__name__}.")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"TDFunction expects name to be a str or None, but got {type(name).__name__}.")
        self.fn = fn
        self.name = name or "TDFunction"

    def _op_name(self) -> str:
        return self.name

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Apply ``fn`` the TD way to ``x_seq`` ``[T, ...]`` (or one step in streaming mode)."""
        fn_out = _POINTWISE_OUT.get(self.fn)
        if fn_out is None:
            return self._unary_forward(x_seq, self.fn)
        return self._unary_forward(x_seq, self.fn, row=(), row_out=fn_out)

    def extra_repr(self) -> str:
        fn_name = getattr(self.fn, "__name__", None) or repr(self.fn)
        return f"fn={fn_name}, name={self.name!r}"

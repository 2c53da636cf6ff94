"""Input checks and small module helpers shared by the TD operators."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "as_shape_tuple",
    "check_step",
    "check_time_sequence",
    "copy_module_state",
    "needs_grad",
    "reject_lazy",
    "shares_memory",
]


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


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record an op on ``tensors`` (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` live in the same storage (a view of, or written into, the other)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


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

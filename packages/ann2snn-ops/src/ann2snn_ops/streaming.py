"""Model-level switches for the streaming mode of every TD operator in a model."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

from ann2snn_ops._base import TDModule

__all__ = ["reset_streaming", "set_streaming"]

_M = TypeVar("_M", bound=nn.Module)


def set_streaming(model: _M, mode: bool = True) -> _M:
    """Switch every ``TDModule`` inside ``model`` (itself included) to streaming mode, or back.

    Each operator's state is reset. Returns ``model``.

    Examples:
        >>> import torch
        >>> from ann2snn_ops import TDGELU, TDLinear
        >>> net = set_streaming(torch.nn.Sequential(TDLinear(4, 4), TDGELU()))
        >>> x = torch.randn(3, 2, 4)
        >>> steps = torch.stack([net(x[t]) for t in range(3)])
        >>> torch.allclose(steps, set_streaming(net, False)(x), atol=1e-6)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_streaming expects an nn.Module, but got {type(model).__name__}.")
    for module in model.modules():
        if isinstance(module, TDModule):
            module.set_streaming(mode)
    return model


def reset_streaming(model: nn.Module) -> None:
    """Clear the streaming state of every ``TDModule`` inside ``model``: the next step starts a new sequence."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"reset_streaming expects an nn.Module, but got {type(model).__name__}.")
    for module in model.modules():
        if isinstance(module, TDModule):
            module.reset()

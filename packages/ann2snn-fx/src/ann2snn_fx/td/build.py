"""Build TD operators from ANN modules, with the seed's validation of attention configurations."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn
from torch import fx

from ann2snn_ops import (
    TDGELU,
    TDConv2d,
    TDFunction,
    TDLayerNorm,
    TDLinear,
    TDModule,
    TDMultiheadAttention,
    TDRMSNorm,
    TDSiLU,
    TDSoftmax,
)

__all__ = [
    "MHA_DEFAULTS",
    "TDStepwise",
    "build_td_module",
    "check_mha_call",
    "read_arg",
    "shift_dim",
]

# name -> (positional index, default) of nn.MultiheadAttention.forward after query/key/value.
MHA_DEFAULTS: dict[str, tuple[int, Any]] = {
    "key_padding_mask": (3, None),
    "need_weights": (4, True),
    "attn_mask": (5, None),
    "average_attn_weights": (6, True),
    "is_causal": (7, False),
}


def read_arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    """The keyword if given, else the positional argument at ``index``, else ``default``."""
    if name in kwargs:
        return kwargs[name]
    if len(args) > index:
        return args[index]
    return default


def shift_dim(dim: int) -> int:
    """Move a non-negative dim of the ANN past the leading time axis; negative dims stay."""
    return dim + 1 if dim >= 0 else dim


def check_mha_call(node: fx.Node | None) -> None:
    """Reject call-site arguments of a MultiheadAttention call that TD attention cannot honour."""
    if node is None:
        raise ValueError("TD MHA conversion requires an FX node.")
    check_mha_call_args(node.args, dict(node.kwargs))


def check_mha_call_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Call-site checks of :func:`check_mha_call` on plain argument tuples (seed order and messages).

    ``key_padding_mask`` is accepted (the TD attention merges it into its mask); that it is constant over
    time is checked where the kinds of values are known (the fx analysis, the folded mode)."""
    need_weights = read_arg(args, kwargs, 4, "need_weights", True)
    if need_weights is not False:
        raise ValueError("TD MHA conversion requires need_weights=False.")
    average = read_arg(args, kwargs, 6, "average_attn_weights", True)
    if average is not True:
        raise ValueError("TD MHA conversion does not support average_attn_weights=False.")


_FROM_MODULE: dict[type[nn.Module], Any] = {
    nn.Linear: TDLinear,
    nn.LayerNorm: TDLayerNorm,
    nn.GELU: TDGELU,
    nn.MultiheadAttention: TDMultiheadAttention,
    nn.Softmax: TDSoftmax,
    nn.SiLU: TDSiLU,
    nn.RMSNorm: TDRMSNorm,
    nn.Conv2d: TDConv2d,
}


def build_td_module(module: nn.Module) -> nn.Module | None:
    """The TD operator equivalent to ``module`` (parameters, requires_grad and mode copied), or None.

    Types are matched exactly, as in the seed: a subclass may override ``forward`` and is left alone.
    ``nn.MultiheadAttention`` configurations the TD operator cannot express raise ``ValueError``.
    ``nn.Softmax(dim=None)`` (implicit dim) is left alone.
    """
    kind = type(module)
    if kind is nn.Softmax and getattr(module, "dim", None) is None:
        return None
    td: nn.Module
    if kind is nn.MultiheadAttention and module.dropout != 0.0:
        if module.training:
            raise ValueError(
                f"TD MHA conversion: this nn.MultiheadAttention (dropout={module.dropout}) is in training mode, "
                "where dropout draws a different mask at every time step; call model.eval() first (in eval "
                "mode dropout is inactive and is ignored)."
            )
        module = copy.copy(module)  # shares the parameters; dropout is inactive in eval mode
        vars(module)["dropout"] = 0.0
    if kind in _STEPWISE:
        td = TDStepwise(module)
    elif kind in _FROM_MODULE:
        td = _FROM_MODULE[kind].from_module(module)
    elif kind in _ELEMENTWISE_MODULES:
        td = TDFunction(_ELEMENTWISE_MODULES[kind], name=f"TD{kind.__name__}")
    else:
        return None
    td.train(module.training)
    return td


_ELEMENTWISE_MODULES: dict[type[nn.Module], Any] = {
    nn.Tanh: torch.tanh,
    nn.Sigmoid: torch.sigmoid,
    nn.ReLU: torch.relu,
}


class TDStepwise(TDModule):
    """A linear module without a constant term (average pooling, upsampling) run on every step alone.

    ``[T, B, ...]`` is folded to ``[T*B, ...]`` for the module and unfolded after, so the module sees the
    shapes the ANN gave it; a linear map of the differences is the difference of the linear map.

    Examples:
        >>> op = TDStepwise(nn.AdaptiveAvgPool1d(1))
        >>> x = torch.randn(3, 2, 4, 6)
        >>> torch.allclose(op(x).sum(0), nn.AdaptiveAvgPool1d(1)(x.sum(0)), atol=1e-6)
        True
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.streaming:
            return self.module(x)
        return self.module(x.flatten(0, 1)).unflatten(0, x.shape[:2])


_STEPWISE: tuple[type[nn.Module], ...] = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.Upsample,
)

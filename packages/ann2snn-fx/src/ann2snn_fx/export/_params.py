"""NIR node parameters from torch modules, with a pending input scale folded in (float64 arithmetic; one
rounding to float32 when the NIR node is written, which equals the float32 product)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ann2snn_fx.snn.neurons import IFNode

__all__ = [
    "ExportError",
    "Op",
    "affine_op",
    "channel_scale",
    "is_one",
    "neuron_params",
    "per_sample",
    "pool_window",
]


class ExportError(ValueError):
    """A node of the SNN that NIR cannot express (the message names the node and the way out)."""


@dataclass
class Op:
    """One NIR-to-be node: ``kind`` in input/affine/conv/if/sumpool/flatten/output, float64 parameters."""

    name: str
    kind: str
    shape: tuple[int, ...]  # output shape, per sample
    in_shape: tuple[int, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)


def per_sample(scale: torch.Tensor, ndim: int, channel_dim: int | None) -> torch.Tensor:
    """A VoltageScaler's scale as a float64 tensor broadcastable to one sample of ``ndim - 1`` dims."""
    s = scale.detach().to(torch.float64).cpu()
    if s.numel() == 1:
        return s.reshape(())
    if channel_dim is not None and s.dim() == 1:
        shape = [1] * (ndim - 1)
        shape[channel_dim % ndim - 1] = s.shape[0]
        return s.reshape(shape)
    while s.dim() >= ndim:
        s = s.squeeze(0)
    return s


def is_one(scale: torch.Tensor) -> bool:
    return bool((scale == 1.0).all())


def channel_scale(scale: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """The scale as one value per channel (dim 0 of the sample), or an ExportError if it varies spatially."""
    full = torch.broadcast_to(scale, shape).reshape(shape[0], -1)
    if not bool((full == full[:, :1]).all()):
        raise ExportError(f"{what}: the scale varies inside a channel, which a convolution cannot absorb.")
    return full[:, 0].clone()


def affine_op(
    name: str, module: nn.Module, scale: torch.Tensor, in_shape: tuple[int, ...], shape: tuple[int, ...]
) -> Op:
    """``Affine`` (Linear) or ``conv`` op of ``module`` reading an input multiplied by ``scale``."""
    weight = torch.as_tensor(module.weight).detach().to(torch.float64).cpu().clone()
    bias_param = getattr(module, "bias", None)
    bias = torch.zeros(weight.shape[0], dtype=torch.float64)
    if bias_param is not None:
        bias = bias_param.detach().to(torch.float64).cpu().clone()
    if isinstance(module, nn.Linear):
        if not is_one(scale):
            weight = weight * torch.broadcast_to(scale, in_shape).reshape(1, -1)
        return Op(name, "affine", shape, in_shape, {"weight": weight, "bias": bias})
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise ExportError(
            f"node {name!r} ({type(module).__name__}): padding {module.padding!r} with mode "
            f"{module.padding_mode!r}; NIR consumers read integer zero padding only."
        )
    if not is_one(scale):
        per_in = channel_scale(scale, in_shape, name)
        cout, cin_g = weight.shape[0], weight.shape[1]
        per_w = per_in.reshape(module.groups, cin_g).repeat_interleave(cout // module.groups, dim=0)
        weight = weight * per_w.reshape(cout, cin_g, *([1] * (weight.dim() - 2)))
    params = {
        "weight": weight,
        "bias": bias,
        "stride": tuple(module.stride),
        "padding": tuple(module.padding),  # type: ignore[arg-type]
        "dilation": tuple(module.dilation),
        "groups": module.groups,
    }
    return Op(name, "conv", shape, in_shape, params)


def neuron_params(
    module: IFNode, scale: torch.Tensor, shape: tuple[int, ...]
) -> tuple[dict[str, Any], float]:
    """IF parameters of ``module`` whose input is multiplied by ``scale`` (folded into θ, v_reset, v_init),
    and the neuron's initial potential in its own units."""
    theta = torch.as_tensor(module.v_threshold, dtype=torch.float64)
    while theta.dim() > len(shape):
        theta = theta.squeeze(0)
    if module.v_init is not None:
        v_init = float(module.v_init)
    else:
        v_init = 0.0 if module.v_reset is None else float(module.v_reset)
    params: dict[str, Any] = {
        "v_threshold": torch.broadcast_to(theta / scale, shape).clone(),
        "v_init": torch.broadcast_to(torch.as_tensor(v_init, dtype=torch.float64) / scale, shape).clone(),
        "reset": "subtract" if module.v_reset is None else "value",
        "v_reset": torch.zeros(shape, dtype=torch.float64),
    }
    if module.v_reset is not None:
        value = torch.as_tensor(float(module.v_reset), dtype=torch.float64)
        params["v_reset"] = torch.broadcast_to(value / scale, shape).clone()
    return params, v_init


def pool_window(
    name: str, module: nn.Module, in_hw: tuple[int, ...], out_hw: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """``(kernel, stride, area)`` of an average pool as a sum pool."""
    if isinstance(module, nn.AdaptiveAvgPool2d):
        if any(i % o for i, o in zip(in_hw, out_hw, strict=True)):
            raise ExportError(
                f"node {name!r} (AdaptiveAvgPool2d): windows of {in_hw} -> {out_hw} are uneven; NIR pools "
                "have one kernel. Use an input size divisible by the output size."
            )
        kernel = tuple(i // o for i, o in zip(in_hw, out_hw, strict=True))
        return kernel, kernel, math.prod(kernel)
    assert isinstance(module, nn.AvgPool2d)
    pair = nn.modules.utils._pair
    kernel, stride = pair(module.kernel_size), pair(module.stride or module.kernel_size)
    if any(pair(module.padding)) or module.ceil_mode or module.divisor_override is not None:
        raise ExportError(
            f"node {name!r} (AvgPool2d): padding, ceil_mode or divisor_override (the consumers' sum pools "
            "take no padding); use AvgPool2d(k, stride) without them."
        )
    return kernel, stride, math.prod(kernel)

"""``VoltageScaler``: multiplies currents by a fixed (per-tensor or per-channel) scale."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["VoltageScaler"]


def _as_buffer(value: Any, name: str) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"{name} must be a real number or a real tensor, got {type(value).__name__}.")
    t = torch.as_tensor(value).detach().clone()
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{name} must be a real number or a real tensor, got dtype {t.dtype}.")
    return t


class VoltageScaler(nn.Module):
    """Multiply the input by a fixed scale: ``forward(x) = x * scale``.

    In a converted SNN, scalers around each spiking neuron map currents into the neuron's threshold range
    and back. ``scale`` is a buffer (it moves with ``.to()`` and is saved in the state_dict) made with
    ``torch.as_tensor``: a Python float gives float32, an int gives int64, a tensor keeps its dtype. Normal
    torch promotion applies in ``forward`` (a float16 input times a float32 0-dim scale stays float16).

    A multi-element ``scale`` with ``channel_dim`` set is a per-channel scale of shape ``(C,)`` applied
    along that dimension of the input (e.g. from ``VoltageHook(channel_dim=1)``); without
    ``channel_dim`` a tensor scale broadcasts by the usual torch rules.

    Args:
        scale: A finite number or a tensor of finite values.
        channel_dim: The input dimension a 1-D ``scale`` runs along, or None.

    Shape:
        - Input: any shape; with ``channel_dim``, ``input.shape[channel_dim] == C``.
        - Output: the input's shape.

    Examples:
        >>> import torch
        >>> VoltageScaler(3.14)
        VoltageScaler(3.140000)
        >>> VoltageScaler(2.0)(torch.tensor([1.0, 2.0]))
        tensor([2., 4.])
        >>> VoltageScaler(torch.tensor([1.0, 10.0]), channel_dim=1)(torch.ones(2, 2))
        tensor([[ 1., 10.],
                [ 1., 10.]])
    """

    scale: Tensor

    def __init__(self, scale: float | Tensor = 1.0, *, channel_dim: int | None = None) -> None:
        super().__init__()
        t = _as_buffer(scale, "scale")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"VoltageScaler needs a finite scale, got {scale!r}.")
        if channel_dim is not None:
            if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
                raise TypeError(f"channel_dim must be an int or None, got {type(channel_dim).__name__}.")
            if t.dim() > 1:
                raise ValueError(
                    f"VoltageScaler(channel_dim={channel_dim}) needs a 0-dim or 1-D scale, got shape {tuple(t.shape)}."
                )
        self.channel_dim = channel_dim
        self.register_buffer("scale", t)

    def extra_repr(self) -> str:
        if self.scale.numel() == 1:
            v = float(self.scale.item())
            text = f"{v:f}"
            # "%f" rounds small scales to 0.000000; keep it (the familiar form) only when it is faithful.
            return text if v == 0 or abs(v) >= 1e-3 else f"{v:.6e}"
        dim = "" if self.channel_dim is None else f", channel_dim={self.channel_dim}"
        return f"scale=<tensor of shape {tuple(self.scale.shape)}>{dim}"

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"VoltageScaler expects a torch.Tensor, got {type(x).__name__}.")
        scale = self.scale
        if self.channel_dim is not None and scale.dim() == 1:
            if x.dim() == 0 or not -x.dim() <= self.channel_dim < x.dim():
                raise ValueError(
                    f"VoltageScaler(channel_dim={self.channel_dim}) needs an input with that dimension, "
                    f"got shape {tuple(x.shape)}."
                )
            cd = self.channel_dim % x.dim()
            if x.shape[cd] != scale.shape[0] and scale.shape[0] != 1:
                raise ValueError(
                    f"VoltageScaler has {scale.shape[0]} channel scales but the input of shape {tuple(x.shape)} "
                    f"has {x.shape[cd]} channels along dim {self.channel_dim}."
                )
            shape = [1] * x.dim()
            shape[cd] = scale.shape[0]
            scale = scale.reshape(shape)
        return x * scale

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        saved = state_dict.get(prefix + "scale")
        if isinstance(saved, Tensor) and (saved.shape != self.scale.shape or saved.dtype != self.scale.dtype):
            self._buffers["scale"] = torch.empty(saved.shape, dtype=saved.dtype, device=self.scale.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

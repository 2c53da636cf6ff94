"""Local threshold balancing (Bu et al., CVPR 2025) as a calibration hook: ``ThresholdOptimizer("ltb")``."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ann2snn_calib import VoltageHook

__all__ = ["LTBHook"]


class LTBHook(VoltageHook):
    """Calibration hook that learns one threshold per channel by local threshold balancing.

    Per call (one calibration batch), with ``x⁺ = max(x, 0)`` and ``θ`` starting at 0 (SPEC 14.2):
    ``θ ← max(θ + 2 · mean((x⁺ - θ)₊), eps)``, the mean taken over every dimension but ``channel_dim``; it is
    one gradient step (learning rate 1) on ``E[(min(x⁺, θ) - x⁺)²]``. The hook returns the clipped
    activation ``min(x⁺, θ)``, so later layers calibrate on what the spiking layer will reproduce. The
    thresholds are the ``scale`` buffer, shape ``(C,)``. Works on activations of any rank ``>= 2``
    (``[N, C]``, ``[N, C, L]``, ``[N, C, H, W]``, ``[N, C, D, H, W]``).

    Under an initialised ``torch.distributed`` process group (or with ``process_group``) the sums and counts
    of each update are all-reduced, so every rank learns the thresholds of the concatenated batches.

    Args:
        channel_dim: The channel dimension (1 for ``[N, C, ...]``).
        eps: Floor of the thresholds (a channel that never fired keeps ``eps``).
        process_group: Group to reduce over; default: the default group when one is initialised.
        sync: Whether to reduce over the process group at all.

    Examples:
        >>> hook = LTBHook()
        >>> hook(torch.tensor([[1.0, 2.0, 3.0], [4.0, 1.0, 2.0]]))
        tensor([[1., 2., 3.],
                [4., 1., 2.]])
        >>> hook.scale
        tensor([5., 3., 5.])
    """

    def __init__(
        self,
        channel_dim: int = 1,
        eps: float = 1e-6,
        *,
        process_group: Any = None,
        sync: bool = True,
        **_: Any,
    ) -> None:
        super().__init__(
            scale=torch.zeros(0),
            momentum=None,
            mode="Max",
            channel_dim=channel_dim,
            process_group=process_group,
            sync=sync,
        )
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a positive number, but got {eps!r}.")
        self.eps = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        """Update the thresholds from ``x`` and return ``min(max(x, 0), θ)``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"LTBHook expects a torch.Tensor, got {type(x).__name__}.")
        if x.dim() < 2:
            raise ValueError(
                f"LTBHook needs an activation with at least 2 dimensions [N, C, ...], got shape {tuple(x.shape)}."
            )
        channel_dim = 1 if self.channel_dim is None else self.channel_dim
        if not -x.dim() <= channel_dim < x.dim():
            raise ValueError(
                f"LTBHook(channel_dim={channel_dim}) needs an input with that dimension, got shape {tuple(x.shape)}."
            )
        cd = channel_dim % x.dim()
        shape = [1] * x.dim()
        shape[cd] = x.shape[cd]
        group = self.reduction_group()
        self.check_finite(x.detach())  # the NaN/inf rule of every hook (SPEC 13.4): all ranks raise at once
        positive = x.detach().clamp_min(0)
        with torch.no_grad():
            theta = self.scale
            if theta.numel() != x.shape[cd]:
                theta = torch.zeros(x.shape[cd], dtype=torch.float32, device=x.device)
            theta = theta.to(device=x.device)
            others = [d for d in range(x.dim()) if d != cd]
            excess = (positive.float() - theta.view(shape)).clamp_min_(0)
            total = excess.sum(dim=others)
            count = torch.tensor(float(excess.numel() // max(x.shape[cd], 1)), device=x.device)
            if group is not None:
                dist.all_reduce(total, group=group)
                dist.all_reduce(count, group=group)
            theta = (theta + 2.0 * total / count.clamp_min(1.0)).clamp_min_(self.eps)
            self.scale = theta
            self.num_batches_tracked += 1
            self.num_samples_tracked += x.shape[0]
        return torch.minimum(x.clamp_min(0), theta.view(shape).to(x.dtype))

    def extra_repr(self) -> str:
        return f"channel_dim={self.channel_dim}, eps={self.eps}"

"""The threshold strategies of :class:`~ann2snn_fx.relu.thresholds.ThresholdOptimizer`, one function each.

A strategy is ``strategy(optimizer, hook) -> float | Tensor`` registered in :data:`STRATEGIES` under its
name; :meth:`ThresholdOptimizer.compute_threshold` looks it up and applies ``min_threshold``. A new
strategy: copy :func:`fixed`, register it, and say in ``ThresholdOptimizer.hook_options`` what the hooks
must record for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["STRATEGIES", "expected_error", "fixed", "ltb", "min_error", "per_channel"]


def expected_error(
    values: torch.Tensor,
    weights: torch.Tensor,
    thresholds: torch.Tensor,
    time_steps: int,
    v_init: float = 0.0,
) -> torch.Tensor:
    """Expected squared error of an IF neuron's T-step rate against ReLU, for each candidate threshold.

    For a constant input ``x >= 0`` and threshold ``s``, a soft-reset IF neuron starting at ``v_init``
    (in units of its threshold) fires ``n = clamp(floor(T * x / s + v_init), 0, T)`` times in ``T`` steps,
    so the block outputs ``s * n / T``. The error adds the clipping above ``s`` and the quantisation below.

    Args:
        values: Activation values (e.g. histogram bin centres), shape ``[K]``.
        weights: Their frequencies, shape ``[K]``.
        thresholds: Candidate thresholds, shape ``[M]``.
        time_steps: The number of simulation steps ``T``.
        v_init: Initial membrane potential as a fraction of the threshold.

    Returns:
        Tensor ``[M]``: the weighted mean squared error of each candidate.
    """
    s = thresholds.reshape(-1, 1).double()
    x = values.reshape(1, -1).double()
    n = torch.floor(x / s * time_steps + v_init).clamp(0, time_steps)
    err = (s * n / time_steps - x) ** 2
    w = weights.double().reshape(1, -1)
    return (err * w).sum(dim=1) / w.sum().clamp_min(1e-300)


def fixed(optimizer: Any, hook: Any) -> float | torch.Tensor:
    """``"fixed"`` (the reference): the hook's calibrated scale."""
    scale = hook.scale
    return scale.item() if not isinstance(scale, torch.Tensor) or scale.numel() == 1 else scale.detach()


def min_error(optimizer: Any, hook: Any) -> float:
    """``"min_error"``: the candidate threshold with the least expected error over the hook's histogram."""
    hist = getattr(hook, "hist", None)
    if not isinstance(hist, torch.Tensor) or hist.numel() == 0:
        raise ValueError(
            "strategy 'min_error' needs hooks that record an activation histogram (ActivationStatsHook with "
            "histogram_bins > 0); the Converter builds them when given this optimizer, or pass "
            "HookFactory(histogram_bins=...)."
        )
    if float(hist.sum()) == 0.0:
        return 0.0
    assert optimizer.time_steps is not None
    bins = hist.numel()
    rng = float(hook.hist_range)
    width = rng / bins
    centres = (torch.arange(bins, dtype=torch.float64, device=hist.device) + 0.5) * width
    top = float((torch.nonzero(hist).max() + 1) * width)
    candidates = torch.linspace(top / 512, top, 512, dtype=torch.float64, device=hist.device)
    errors = expected_error(centres, hist, candidates, optimizer.time_steps, optimizer.v_init)
    return float(candidates[int(errors.argmin())])


def per_channel(optimizer: Any, hook: Any) -> torch.Tensor:
    """``"per_channel"``: the hook's per-channel statistic; silent channels get the largest."""
    stat = hook.scale
    if getattr(hook, "channel_dim", None) is None or not isinstance(stat, torch.Tensor) or stat.dim() != 1:
        raise ValueError(
            "strategy 'per_channel' needs hooks with per-channel scales (VoltageHook(channel_dim=...)); the "
            "Converter builds them when given this optimizer, or pass HookFactory(channel_dim=...)."
        )
    stat = stat.detach().float()
    positive = stat > 0
    if bool(positive.any()):
        stat = torch.where(positive, stat, stat.max())
    return stat


def ltb(optimizer: Any, hook: Any) -> torch.Tensor:
    """Local threshold balancing: the per-channel thresholds an :class:`~ann2snn_fx.LTBHook` learnt."""
    from ann2snn_fx.relu.ltb import LTBHook

    if not isinstance(hook, LTBHook):
        raise ValueError(
            f"strategy 'ltb' needs LTBHook calibration hooks, but got {type(hook).__name__}; the Converter "
            "builds them when given this optimizer, or pass HookFactory(hook_class=LTBHook)."
        )
    return hook.scale.detach().float().clone()


STRATEGIES: dict[str, Callable[[Any, Any], float | torch.Tensor]] = {
    "fixed": fixed,
    "min_error": min_error,
    "per_channel": per_channel,
    "ltb": ltb,
}

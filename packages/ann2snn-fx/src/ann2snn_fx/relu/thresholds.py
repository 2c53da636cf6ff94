"""Threshold strategies: how a calibrated hook becomes the scale ``s`` of a spiking block."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ann2snn_fx._numbers import as_integral, as_real
from ann2snn_fx.relu.threshold_strategies import STRATEGIES, expected_error

__all__ = ["ThresholdOptimizer", "expected_error"]


class ThresholdOptimizer:
    """Chooses each converted layer's threshold (the scale ``s`` around the neuron) from its hook.

    Strategies, listed in :attr:`strategies`:

    - ``"fixed"`` (default, the reference behaviour): ``s`` is the hook's calibrated scale.
    - ``"min_error"``: ``s`` minimises the expected clipping plus quantisation error of the block at
      ``time_steps`` steps over the activation histogram recorded during calibration (see
      :func:`expected_error`). Lower than the maximum when few steps are simulated: it trades rare clipped
      outliers for a finer resolution. Give the neurons' initial potential as ``v_init`` (a fraction of the
      threshold: 0.5 for ``NeuronFactory(v_init=0.5)``).
    - ``"per_channel"``: one threshold per channel (``channel_dim``), the per-channel statistic of
      :class:`ann2snn_calib.VoltageHook` in the converter's mode (max, percentile or fraction of the max).
      Channels that never fired get the layer's largest channel threshold.
    - ``"ltb"``: local threshold balancing (Bu et al., CVPR 2025): one threshold per channel learnt during
      calibration by :class:`~ann2snn_fx.LTBHook` (``θ += 2 · mean((x⁺ - θ)₊)`` per batch from 0, the
      clipped activation fed forward). Use it with neurons starting half-way, ``NeuronFactory(v_init=0.5)``.

    An unknown strategy is accepted at construction and raises ``NotImplementedError`` in
    :meth:`compute_threshold` (reference behaviour). Subclasses may override :meth:`compute_threshold`; the
    converter also accepts any object with that method.

    Args:
        strategy: One of :attr:`strategies`.
        time_steps: Target number of steps ``T`` (required by ``"min_error"``).
        v_init: Initial potential of the neurons as a fraction of their threshold (``"min_error"``).
        histogram_bins: Histogram resolution the hooks record for ``"min_error"``.
        channel_dim: Channel dimension of the activations for ``"per_channel"`` (1 for ``[N, C, ...]``).
        min_threshold: When set, thresholds are floored at this value instead of failing on layers
            whose calibrated activations were all zero.

    Examples:
        >>> from ann2snn_calib import VoltageHook
        >>> hook = VoltageHook()
        >>> _ = hook(torch.tensor([0.5, 2.0]))
        >>> ThresholdOptimizer().compute_threshold(hook)
        2.0
        >>> ThresholdOptimizer.strategies
        ('fixed', 'min_error', 'per_channel', 'ltb')
    """

    strategies: ClassVar[tuple[str, ...]] = tuple(STRATEGIES)

    def __init__(
        self,
        strategy: str = "fixed",
        *,
        time_steps: int | None = None,
        v_init: float = 0.0,
        histogram_bins: int = 2048,
        channel_dim: int = 1,
        min_threshold: float | None = None,
    ) -> None:
        self.strategy = strategy
        steps = None if time_steps is None else as_integral(time_steps)
        if strategy == "min_error":
            if steps is None or steps < 1:
                raise ValueError(
                    f"strategy 'min_error' needs time_steps, a positive int (the T you will simulate), "
                    f"but got {time_steps!r}."
                )
        elif time_steps is not None and steps is None:
            raise ValueError(f"time_steps must be a positive int or None, but got {time_steps!r}.")
        v0, bins, dim = as_real(v_init), as_integral(histogram_bins), as_integral(channel_dim)
        if v0 is None or not 0.0 <= v0 < 1.0:
            raise ValueError(f"v_init must be a fraction of the threshold in [0, 1), but got {v_init!r}.")
        if bins is None or bins < 2:
            raise ValueError(f"histogram_bins must be an int >= 2, but got {histogram_bins!r}.")
        if dim is None or dim == 0:
            raise ValueError(
                f"channel_dim must be a non-zero int (dimension 0 is the batch), but got {channel_dim!r}."
            )
        floor = None if min_threshold is None else as_real(min_threshold)
        if min_threshold is not None and (floor is None or not (math.isfinite(floor) and floor > 0)):
            raise ValueError(
                f"min_threshold must be a finite positive number or None, but got {min_threshold!r}."
            )
        self.time_steps = steps
        self.v_init = v0
        self.histogram_bins = bins + bins % 2
        self.channel_dim = dim
        self.min_threshold = floor

    def hook_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~ann2snn_fx.HookFactory` so hooks record what this strategy needs."""
        if self.strategy == "min_error":
            return {"histogram_bins": self.histogram_bins}
        if self.strategy == "per_channel":
            return {"channel_dim": self.channel_dim}
        if self.strategy == "ltb":
            from ann2snn_fx.relu.ltb import LTBHook

            return {"channel_dim": self.channel_dim, "hook_class": LTBHook}
        return {}

    def compute_threshold(self, hook: Any) -> float | torch.Tensor:
        """Return the threshold for the layer observed by ``hook``.

        Args:
            hook: A calibrated :class:`~ann2snn_calib.VoltageHook` (an
                :class:`~ann2snn_fx.ActivationStatsHook` for ``"min_error"``, per-channel hooks for ``"per_channel"``).

        Returns:
            A float, or for ``"per_channel"`` a ``(C,)`` tensor (applied along the hook's ``channel_dim``).

        Raises:
            NotImplementedError: ``"Strategy {strategy!r} is not implemented."`` for an unknown strategy.
            ValueError: when the hook did not record the statistics the strategy needs.
        """
        strategy = STRATEGIES.get(self.strategy)
        if strategy is None:
            raise NotImplementedError(f"Strategy {self.strategy!r} is not implemented.")
        value = strategy(self, hook)
        if self.min_threshold is not None:
            if isinstance(value, torch.Tensor):
                value = value.clamp_min(self.min_threshold)
            elif not math.isnan(value):
                value = max(value, self.min_threshold)
        return value

    def __repr__(self) -> str:
        extra = ""
        if self.strategy == "min_error":
            extra = f", time_steps={self.time_steps}, v_init={self.v_init}"
        elif self.strategy in ("per_channel", "ltb"):
            extra = f", channel_dim={self.channel_dim}"
        return f"ThresholdOptimizer(strategy={self.strategy!r}{extra})"

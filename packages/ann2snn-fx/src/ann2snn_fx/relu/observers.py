"""A calibration hook that also records the activation histogram ``strategy="min_error"`` needs.

:class:`ActivationStatsHook` is a :class:`ann2snn_calib.VoltageHook` (its ``scale``, per tensor or per channel,
is computed by the parent class, unchanged) that additionally records, on the activation's device, a histogram
of the positive activations over a range that doubles (merging bin pairs exactly) whenever a batch exceeds it.
"""

from __future__ import annotations

import torch

from ann2snn_calib import VoltageHook

__all__ = ["ActivationStatsHook"]


class ActivationStatsHook(VoltageHook):
    """VoltageHook that also keeps a histogram of the positive activations.

    Args:
        scale: Initial scale (as :class:`~ann2snn_calib.VoltageHook`).
        momentum: EMA momentum (as :class:`~ann2snn_calib.VoltageHook`).
        mode: ``"Max"``, ``"p%"`` or a fraction in (0, 1] (as :class:`~ann2snn_calib.VoltageHook`).
        histogram_bins: Even number of histogram bins over ``[0, hist_range]``; 0 disables the histogram.
        channel_dim: Per-channel ``scale`` (as :class:`~ann2snn_calib.VoltageHook`); the histogram is per layer.

    Shape:
        - Input: ``[N, *]`` (with ``channel_dim`` inside it when per-channel statistics are on).
        - Output: the input, the same object.

    Examples:
        >>> hook = ActivationStatsHook(histogram_bins=4, channel_dim=1)
        >>> _ = hook(torch.tensor([[0.0, 1.0], [3.0, 2.0]]))
        >>> hook.hist.tolist(), hook.hist_range.item(), hook.scale.tolist()
        ([0.0, 1.0, 1.0, 1.0], 3.0, [3.0, 2.0])
    """

    hist: torch.Tensor
    hist_range: torch.Tensor

    def __init__(
        self,
        scale: float = 1.0,
        momentum: float | None = 0.1,
        mode: str | float = "Max",
        *,
        histogram_bins: int = 0,
        channel_dim: int | None = None,
    ) -> None:
        super().__init__(scale=scale, momentum=momentum, mode=mode, channel_dim=channel_dim)
        if isinstance(histogram_bins, bool) or not isinstance(histogram_bins, int) or histogram_bins < 0:
            raise ValueError(f"histogram_bins must be a non-negative int, but got {histogram_bins!r}.")
        if histogram_bins % 2:
            raise ValueError(
                f"histogram_bins must be even (bins are merged in pairs), but got {histogram_bins}."
            )
        self.histogram_bins = histogram_bins
        self.register_buffer("hist", torch.zeros(histogram_bins, dtype=torch.float64))
        self.register_buffer("hist_range", torch.tensor(0.0))

    def _update_histogram(self, x: torch.Tensor) -> None:
        values = x.detach().reshape(-1).float()
        values = values[values > 0]
        bins = self.histogram_bins
        if self.hist.device != values.device:
            self.hist = self.hist.to(values.device)
            self.hist_range = self.hist_range.to(values.device)
        # Only positive activations are counted: zeros and negatives are reproduced exactly by any threshold.
        if values.numel() == 0:
            return
        top = float(values.max())
        rng = float(self.hist_range)
        if rng <= 0.0:
            rng = top
        while top > rng:
            # Doubling the range merges bin pairs exactly: bin i of the new range = bins 2i, 2i+1 of the old.
            merged = self.hist.view(bins // 2, 2).sum(dim=1)
            self.hist = torch.cat([merged, torch.zeros_like(merged)])
            rng *= 2.0
        self.hist_range = torch.tensor(rng, device=values.device)
        idx = (values * (bins / rng)).long().clamp_(0, bins - 1)
        self.hist += torch.bincount(idx, minlength=bins).to(self.hist.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.histogram_bins and x.numel() > 0:
            with torch.no_grad():
                self._update_histogram(x)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, histogram_bins={self.histogram_bins}"

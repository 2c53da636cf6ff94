"""Max pooling over spike trains, exact in the cumulative sense.

A max over the spikes of one step is not the max of the rates: ``sum_t max(x_t) >= max(sum_t x_t)``.
:class:`SpikingMaxPool` pools the *running accumulated* input and emits the increment of that pooled
accumulation (SpikeZIP-TF's max pooling), so that after ``t`` steps its accumulated output is exactly the max
pool of the accumulated input, and its rate the max pool of the input rates. On non-negative spike trains of
unit spikes the output is itself a train of unit spikes (the max of counts grows by at most one per step).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["POOL_FUNCTIONS", "SpikingMaxPool"]

#: The pooling functions :class:`SpikingMaxPool` wraps, by name.
POOL_FUNCTIONS: dict[str, Any] = {
    "max_pool1d": F.max_pool1d,
    "max_pool2d": F.max_pool2d,
    "max_pool3d": F.max_pool3d,
    "adaptive_max_pool1d": F.adaptive_max_pool1d,
    "adaptive_max_pool2d": F.adaptive_max_pool2d,
    "adaptive_max_pool3d": F.adaptive_max_pool3d,
}


class SpikingMaxPool(nn.Module):
    """A max pool applied to the running sum of its input; each step outputs the growth of the pooled sum.

    ``y_t = pool(x_1 + ... + x_t) - pool(x_1 + ... + x_{t-1})``, so ``y_1 + ... + y_t = pool(x_1 + ... + x_t)``
    exactly. On a constant input it equals the plain pool at every step. It has state: ``reset()`` (called by
    :func:`~ann2snn_fx.reset_net`) clears it; ``multi_step_forward`` runs a ``[T, B, ...]`` sequence.

    Args:
        function: A name of :data:`POOL_FUNCTIONS` (``"max_pool2d"``, ``"adaptive_max_pool1d"``, ...).
        options: The pool's keyword arguments (``kernel_size``, ``stride``, ``padding``, ``dilation``,
            ``ceil_mode`` or ``output_size``); ``return_indices`` is not accepted.

    Examples:
        >>> pool = SpikingMaxPool("max_pool1d", {"kernel_size": 2})
        >>> spikes = [torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[0.0, 1.0]]])]
        >>> [pool(s).item() for s in spikes]  # max of the counts: 1, 1, 2
        [1.0, 0.0, 1.0]
    """

    # No ``spike_unit``: this is no neuron (after a commuted ReLU it pools analog currents), so the analysis
    # does not count its output as spike events.

    def __init__(self, function: str, options: dict[str, Any]) -> None:
        super().__init__()
        if function not in POOL_FUNCTIONS:
            raise ValueError(f"function must be one of {sorted(POOL_FUNCTIONS)}, but got {function!r}.")
        if not isinstance(options, dict):
            raise TypeError(f"options must be a dict, but got {type(options).__name__}.")
        if options.get("return_indices"):
            raise ValueError("SpikingMaxPool does not return indices (return_indices=True is not accepted).")
        self.function = function
        self.options = {k: v for k, v in options.items() if k != "return_indices"}
        self.acc: torch.Tensor | None = None
        self.pooled: torch.Tensor | float = 0.0

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return POOL_FUNCTIONS[self.function](x, **self.options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One step: add ``x`` to the accumulated input, return the growth of its pool."""
        self.acc = x.clone() if self.acc is None else self.acc + x
        pooled = self._pool(self.acc)
        out = pooled - self.pooled
        self.pooled = pooled
        return out

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """``[T, B, ...] -> [T, B, ...]``: the steps of ``x_seq`` in order (state carried over)."""
        acc = x_seq.cumsum(0)
        if self.acc is not None:
            acc = acc + self.acc
        steps = x_seq.shape[0]
        pooled = self._pool(acc.flatten(0, 1))
        pooled = pooled.reshape(steps, x_seq.shape[1], *pooled.shape[1:])
        previous = torch.cat([torch.zeros_like(pooled[:1]) + self.pooled, pooled[:-1]])
        self.acc, self.pooled = acc[-1], pooled[-1]
        return pooled - previous

    def reset(self) -> None:
        """Forget the accumulated input."""
        self.acc, self.pooled = None, 0.0

    def extra_repr(self) -> str:
        return f"{self.function}, {self.options}"

"""Delayed readout: how many initial steps to leave out of an SNN's running mean (SPEC 14.2)."""

from __future__ import annotations

import itertools
import logging
import math
import numbers
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ann2snn_fx.snn.neurons import IFNode, reset_net

__all__ = ["estimate_readout_delay"]

logger = logging.getLogger(__name__)


def _batch_input(data: Any) -> Any:
    from ann2snn_fx.relu.stages import batch_input

    return batch_input(data)


def estimate_readout_delay(
    snn: nn.Module,
    dataloader: Iterable[Any],
    time_steps: int,
    *,
    num_batches: int = 1,
    min_readout: int = 4,
) -> int:
    """Estimate how many initial steps ``D`` to leave out of the running mean (``run_snn(..., skip_steps=D)``).

    The SNN is run once per batch with every :class:`~ann2snn_fx.IFNode` acting as a clipped ReLU
    (``clamp(x, 0, θ)``, an ANN-like probe); each neuron layer adds ``mean(clamp(θ - v_init, 0)) /
    mean(clamp(x, 0, θ))`` steps, the mean time its neurons take to charge up to the threshold, and the delay
    is the ceiling of the sum over layers, averaged over the batches. When ``time_steps`` leaves fewer than
    ``min_readout`` steps after that delay, the estimator returns 0 and says so (a ``UserWarning`` naming
    ``time_steps``): a delayed readout needs steps to read.

    Args:
        snn: The converted SNN (one step per call); left as it was (hooks removed, neurons reset).
        dataloader: Batches (a tensor, or a tuple/list/dict holding the input, as for the ``Converter``).
        time_steps: The ``T`` that will be simulated.
        num_batches: Batches to average over.
        min_readout: Steps that must remain after the delay.

    Returns:
        ``D`` with ``0 <= D < time_steps``.

    Raises:
        ValueError: for a non-positive ``time_steps``, ``num_batches`` or ``min_readout``, or an empty dataloader.

    Examples:
        >>> from ann2snn_fx import trace_model
        >>> snn = trace_model(nn.Sequential(IFNode(v_threshold=4.0, v_reset=None)))
        >>> estimate_readout_delay(snn, [torch.ones(2, 3)], time_steps=16)
        4
    """
    for name, value in (
        ("time_steps", time_steps),
        ("num_batches", num_batches),
        ("min_readout", min_readout),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, but got {value!r}.")
    if not isinstance(snn, nn.Module):
        raise TypeError(f"snn must be an nn.Module, but got {type(snn).__name__}.")
    return delay_for(charge_steps(snn, dataloader, int(num_batches)), int(time_steps), int(min_readout))


def charge_steps(snn: nn.Module, dataloader: Iterable[Any], num_batches: int = 1) -> float:
    """The raw estimate behind :func:`estimate_readout_delay`: the ceiling of the summed per-layer charge times
    (``0`` without neurons, ``inf`` when it is not finite). It does not depend on ``time_steps``, so one
    estimate serves every ``T`` (:func:`delay_for` turns it into the delay for one ``T``)."""
    neurons = [m for m in snn.modules() if isinstance(m, IFNode)]
    if not neurons:
        return 0
    ratios: dict[int, list[float]] = {id(m): [] for m in neurons}

    def probe(module: nn.Module, inputs: tuple[Any, ...], _out: Any) -> torch.Tensor:
        assert isinstance(module, IFNode)
        x = inputs[0]
        theta = module.v_threshold
        clipped = torch.minimum(x.clamp_min(0), torch.as_tensor(theta, dtype=x.dtype, device=x.device))
        v0 = module.v_init if module.v_init is not None else 0.0
        gap = (torch.as_tensor(theta, dtype=x.dtype) - torch.as_tensor(v0, dtype=x.dtype)).clamp_min(0)
        drive = float(clipped.mean())
        ratios[id(module)].append(float(gap.mean()) / drive if drive > 0 else 0.0)
        return clipped

    handles = [m.register_forward_hook(probe) for m in neurons]
    seen = 0
    try:
        with torch.no_grad():
            for data in itertools.islice(dataloader, int(num_batches)):
                reset_net(snn)
                snn(_batch_input(data))
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        reset_net(snn)
    if seen == 0:
        raise ValueError("The dataloader yielded no batch; estimate_readout_delay needs data.")
    delay = sum(sum(r) / len(r) for r in ratios.values() if r)
    return math.ceil(delay) if math.isfinite(delay) else math.inf


def delay_for(raw: float, time_steps: int, min_readout: int = 4, *, warn: bool = True) -> int:
    """The delay :func:`estimate_readout_delay` returns for ``time_steps`` given :func:`charge_steps`'s
    ``raw`` estimate: ``0`` when ``raw`` is 0 or leaves fewer than ``min_readout`` steps (with a
    ``UserWarning`` when ``warn``), else ``min(raw, time_steps - 1)``."""
    if raw == 0:
        return 0
    if not math.isfinite(raw):
        raw = time_steps
    if raw + min_readout > time_steps:
        if warn:
            message = (
                f"estimate_readout_delay: time_steps={time_steps} is too short for the estimated delay of "
                f"{int(raw)} step(s) plus {min_readout} readout steps; returning 0 (no delayed readout)."
            )
            warnings.warn(message, UserWarning, stacklevel=3)
            logger.info(message)
        return 0
    return min(int(raw), time_steps - 1)

"""Factories for the spiking neurons and calibration hooks the converter inserts."""

from __future__ import annotations

from typing import Any

from torch import nn

from ann2snn_calib import VoltageHook
from ann2snn_fx.relu.observers import ActivationStatsHook
from ann2snn_fx.snn.neurons import IFNode

__all__ = ["HookFactory", "NeuronFactory"]


class NeuronFactory:
    """Creates the spiking neuron that replaces each converted activation.

    The default builds ``IFNode(v_threshold=1.0, v_reset=None)`` (soft reset), as the reference converter
    does; the activation scale is carried by the two VoltageScalers around the neuron, so the neuron's own
    threshold only fixes the units.

    Args:
        neuron_type: Neuron class; it must accept ``v_threshold`` and ``v_reset`` keyword arguments.
        v_threshold: Threshold passed to the neuron.
        v_reset: Reset potential; ``None`` is the soft (subtractive) reset.
        v_init: Initial membrane potential passed to the neuron when not ``None`` (e.g. ``0.5`` =
            half the default threshold, which rounds instead of floors the firing rate and makes
            converted SNNs accurate at a few time steps). Needs a ``neuron_type`` that accepts it.
        **kwargs: Further keyword arguments for the neuron constructor, e.g. IFNode's low-latency options
            ``burst=4`` (up to 4 spikes per step) and ``signed=True`` (negative spikes undo overshoots):
            ``NeuronFactory(IFNode, v_init=0.5, burst=4, signed=True)``.

    Examples:
        >>> NeuronFactory(v_init=0.5).create(scale=3.0).extra_repr()
        'v_threshold=1.0, v_reset=None, detach_reset=False, step_mode=s, backend=torch, v_init=0.5'
    """

    def __init__(
        self,
        neuron_type: type[nn.Module] = IFNode,
        v_threshold: float = 1.0,
        v_reset: float | None = None,
        *,
        v_init: float | None = None,
        **kwargs: Any,
    ) -> None:
        if not callable(neuron_type):
            raise TypeError(
                f"neuron_type must be a class (or callable) building an nn.Module, got {neuron_type!r}."
            )
        self.neuron_type = neuron_type
        self.v_threshold = v_threshold
        self.v_reset = v_reset
        self.v_init = v_init
        self.neuron_kwargs = dict(kwargs)

    def create(self, scale: Any = None) -> nn.Module:
        """Build one neuron.

        Args:
            scale: The layer's calibrated threshold (float, or a tensor for per-channel thresholds). Unused
                by the default factory; subclasses may derive neuron parameters from it.

        Returns:
            A new neuron module.
        """
        kwargs = dict(self.neuron_kwargs)
        if self.v_init is not None:
            kwargs["v_init"] = self.v_init
        return self.neuron_type(v_threshold=self.v_threshold, v_reset=self.v_reset, **kwargs)

    def __repr__(self) -> str:
        return (
            f"NeuronFactory(neuron_type={getattr(self.neuron_type, '__name__', self.neuron_type)}, "
            f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, v_init={self.v_init}"
            + "".join(f", {k}={v!r}" for k, v in self.neuron_kwargs.items())
            + ")"
        )


class HookFactory:
    """Creates one independent calibration hook per matched activation.

    Args:
        mode: ``"Max"`` (EMA of batch maxima), ``"p%"`` (EMA of the batch p-th percentile) or a fraction in
            (0, 1] of the batch maximum; forwarded to :class:`ann2snn_calib.VoltageHook`.
        momentum: EMA momentum of the hook.
        histogram_bins: When positive, hooks also record an activation histogram (needed by
            ``ThresholdOptimizer(strategy="min_error")``).
        channel_dim: When not ``None``, hooks keep one scale per channel along this dimension
            (``VoltageHook(channel_dim=...)``; needed by ``ThresholdOptimizer(strategy="per_channel")``).
        hook_class: When set, hooks are ``hook_class(channel_dim=...)`` (e.g.
            :class:`ann2snn_fx.relu.ltb.LTBHook`, which ``ThresholdOptimizer("ltb")`` asks for).

    Examples:
        >>> HookFactory("99.9%", momentum=0.2).create().mode
        '99.9%'
    """

    def __init__(
        self,
        mode: str | float = "Max",
        momentum: float | None = 0.1,
        *,
        histogram_bins: int = 0,
        channel_dim: int | None = None,
        hook_class: Any = None,
    ) -> None:
        if hook_class is not None and not callable(hook_class):
            raise TypeError(f"hook_class must be a VoltageHook subclass or None, but got {hook_class!r}.")
        self.hook_class = hook_class
        self.mode = mode
        self.momentum = momentum
        self.histogram_bins = histogram_bins
        self.channel_dim = channel_dim

    def create(self) -> VoltageHook:
        """Return a new hook (initial scale 1.0)."""
        if self.hook_class is not None:
            return self.hook_class(channel_dim=1 if self.channel_dim is None else self.channel_dim)
        if self.histogram_bins:
            return ActivationStatsHook(
                momentum=self.momentum,
                mode=self.mode,
                histogram_bins=self.histogram_bins,
                channel_dim=self.channel_dim,
            )
        if self.channel_dim is not None:
            return VoltageHook(momentum=self.momentum, mode=self.mode, channel_dim=self.channel_dim)
        return VoltageHook(momentum=self.momentum, mode=self.mode)

    def __repr__(self) -> str:
        return (
            f"HookFactory(mode={self.mode!r}, momentum={self.momentum}, histogram_bins={self.histogram_bins}, "
            f"channel_dim={self.channel_dim})"
        )

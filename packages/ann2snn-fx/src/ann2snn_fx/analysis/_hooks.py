"""Temporary instrumentation: event counters wrapped around every neuron entry point, shape probes on counted
layers. :class:`Instrumentation` is a context manager; everything it installs is removed on exit, errors
included."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ann2snn_fx.analysis._graph import call_macs

__all__: list[str] = []

# The multi-step runners call a neuron's multi_step_forward or its fused _inference_sequence directly, not
# through __call__, so forward hooks would miss them: the counter wraps each entry point on the instance.
_ENTRY_POINTS = ("forward", "multi_step_forward", "_inference_sequence")
_MISSING = object()


class EventCounter:
    """Per-element signed and absolute event counts of one neuron, summed over time, shape ``[B, *]``."""

    def __init__(self, module: nn.Module, sequence: bool) -> None:
        self.module = module
        self.sequence = sequence
        self.signed: torch.Tensor | None = None
        self.absolute: torch.Tensor | None = None
        self.depth = 0
        self.mixed = False

    def _time_leading(self, entry: str) -> bool:
        if entry != "forward":
            return True
        if getattr(self.module, "step_mode", "s") == "m":
            return True
        return self.sequence and not getattr(self.module, "streaming", False)

    @property
    def magnitude(self) -> torch.Tensor | None:
        """Per-element event counts, negative events counted positive (``|events|`` summed over time)."""
        return self.absolute if self.mixed else self.signed

    def _accumulate(self, name: str, value: torch.Tensor, over_time: bool) -> None:
        """Add ``value`` (``[B, *]``, or ``[t, B, *]`` summed over ``t``) into the accumulator ``name``."""
        total = getattr(self, name)
        shape = value.shape[1:] if over_time else value.shape
        if total is None:
            total = torch.zeros(shape, dtype=torch.float32, device=value.device)
            setattr(self, name, total)
        elif total.shape != shape:
            raise ValueError(
                f"neuron {type(self.module).__name__} changed its output shape from {tuple(total.shape)} to "
                f"{tuple(shape)} during one run."
            )
        for step in value if over_time else (value,):  # in-place adds: no [t, B, *] reduction buffer
            total.add_(step)

    def add(self, out: Any, entry: str) -> None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"neuron {type(self.module).__name__} returned {type(out).__name__}; the accounting needs a tensor."
            )
        events = out.detach()
        unit: Any = self.module.spike_unit
        if not (isinstance(unit, (int, float)) and unit == 1):
            events = torch.round(events / unit)
        over_time = self._time_leading(entry)
        # Until a negative event appears, |events| == events and one accumulator serves both. On accelerators
        # the check would synchronise every step, so there both accumulators run from the start.
        if not self.mixed and events.numel() and (events.device.type != "cpu" or bool(events.min() < 0)):
            self.mixed = True
            self.absolute = None if self.signed is None else self.signed.clone()
        self._accumulate("signed", events, over_time)
        if self.mixed:
            self._accumulate("absolute", events.abs(), over_time)

    def wrap(self, entry: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.depth += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                self.depth -= 1
            if self.depth == 0:  # the outermost entry point counts; nested ones (forward -> step) do not
                self.add(out, entry)
            return out

        return counted


class ShapeProbe:
    """MACs per sample and step of a counted layer, from its first call (then the hook removes itself)."""

    def __init__(self, kind: str, sequence: bool, batch: int) -> None:
        self.kind = kind
        self.sequence = sequence
        self.batch = batch
        self.per_step: float | None = None
        self.handle: Any = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        x = args[0] if args else None
        if self.per_step is None and isinstance(x, torch.Tensor) and x.dim() > 0:
            rows = x.shape[0] * self.batch if self.sequence else x.shape[0]
            self.per_step = call_macs(self.kind, module, args, out) / max(rows, 1)
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class Instrumentation:
    """Installs counters on ``neurons`` and probes on ``layers``; removes all of them on exit."""

    def __init__(
        self,
        neurons: dict[str, nn.Module],
        layers: dict[str, tuple[nn.Module, str]],
        sequence: bool,
        batch: int,
    ) -> None:
        self.counters = {name: EventCounter(m, sequence) for name, m in neurons.items()}
        self.probes = {name: ShapeProbe(kind, sequence, batch) for name, (_, kind) in layers.items()}
        self._layers = layers
        self._patched: list[tuple[nn.Module, str, object]] = []

    def __enter__(self) -> Instrumentation:
        try:
            for counter in self.counters.values():
                module = counter.module
                for entry in _ENTRY_POINTS:
                    fn = getattr(module, entry, None)
                    if callable(fn):
                        self._patched.append((module, entry, module.__dict__.get(entry, _MISSING)))
                        module.__dict__[entry] = counter.wrap(entry, fn)
            for name, probe in self.probes.items():
                probe.handle = self._layers[name][0].register_forward_hook(probe)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for module, entry, previous in reversed(self._patched):
            if previous is _MISSING:
                module.__dict__.pop(entry, None)
            else:
                module.__dict__[entry] = previous
        self._patched.clear()
        for probe in self.probes.values():
            if probe.handle is not None:
                probe.handle.remove()
                probe.handle = None

    def __exit__(self, *exc: object) -> None:
        self.remove()

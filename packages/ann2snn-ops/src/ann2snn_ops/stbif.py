"""SpikeZIP-TF building blocks: the activation :class:`Quantizer` of a QANN and its spiking twin :class:`STBIFNeuron`.

A QANN quantises every operand of a product (SPEC 14.1) with
``q(x) = clamp(floor(x / s + 1/2), n_min, n_max) * s`` (round half up, not ``torch.round``'s half-to-even).
The spike-triggered bipolar integrate-and-fire neuron replaces the quantiser in the SNN: fed a sequence whose
sum is ``x`` and then zeros, its summed output equals ``q(x)`` once it has gone quiet, at most
``n_max - n_min + 1`` steps after its last input.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from ann2snn_ops._base import TDModule, accumulation_dtype, check_step, check_time_sequence

__all__ = ["Quantizer", "STBIFNeuron", "quantizer_bounds"]


def _integral(value: Any, name: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an integer, but got {value!r} ({type(value).__name__}).")
    return int(value)


def _positive_scale(value: Any, owner: str) -> torch.Tensor:
    """A positive finite step ``s``: a real number or a float tensor (broadcastable to the activations)."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{owner}: scale must be a floating-point tensor, but got dtype {value.dtype}.")
        tensor = value.detach().clone()
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: scale must be a positive real number or a tensor, but got {value!r}.")
    else:
        tensor = torch.tensor(float(value))
    if not bool(torch.isfinite(tensor).all()) or not bool((tensor > 0).all()):
        raise ValueError(f"{owner}: scale must be finite and > 0, but got {value!r}.")
    return tensor


def quantizer_bounds(levels: int, signed: bool) -> tuple[int, int]:
    """``(n_min, n_max)`` of a ``levels``-level quantiser: ``(0, levels-1)``, signed ``(-(levels//2), levels//2-1)``.

    Examples:
        >>> quantizer_bounds(16, signed=False), quantizer_bounds(16, signed=True)
        ((0, 15), (-8, 7))
    """
    levels = _integral(levels, "levels", "Quantizer")
    if levels < 2:
        raise ValueError(f"Quantizer: levels must be >= 2, but got {levels}.")
    if not isinstance(signed, bool):
        raise TypeError(f"Quantizer: signed must be a bool, but got {signed!r}.")
    return (-(levels // 2), levels // 2 - 1) if signed else (0, levels - 1)


class Quantizer(nn.Module):
    """The QANN activation quantiser ``clamp(floor(x / s + 1/2), n_min, n_max) * s`` with a learnable step ``s``.

    Rounding is half up (``floor(z + 1/2)``), so ``x / s = 0.5`` maps to 1 and ``-0.5`` to 0, exactly what the
    :class:`STBIFNeuron` that replaces it counts. Training uses LSQ: a straight-through estimator for the floor
    (the gradient w.r.t. ``x`` is 1 inside the range, 0 outside) and the step's gradient
    (``floor(x/s + 1/2) - x/s`` inside, the bound outside) scaled by ``1 / sqrt(n_max * x.numel())``
    (``n_max`` taken as at least 1). The forward value is the exact quantised value in every mode. Every
    operation is a plain differentiable torch op, so double backward works.

    Initialisation of ``s`` when ``scale=None``: the first forward (in any mode) sets
    ``s = 2 * mean|x| / sqrt(n_max)`` (LSQ's rule, as in SpikeZIP-TF), or ``calibrate``
    (``ann2snn_fx.calibrate_qann``) sets it from data; an all-zero first batch gives ``s = 1``.

    Args:
        levels: Number of quantisation levels (>= 2).
        signed: Symmetric bounds ``(-(levels//2), levels//2 - 1)`` instead of ``(0, levels - 1)``.
        scale: The step ``s`` (positive real or float tensor), or None to initialise it from the first batch.

    Attributes:
        n_min, n_max: The integer bounds of the count.
        scale: ``nn.Parameter``, the step ``s``.
        initialized: Buffer, whether ``s`` holds a set value.

    Shape:
        - Input: any shape, floating point.
        - Output: the input's shape and dtype.

    Examples:
        >>> import torch
        >>> q = Quantizer(4, scale=0.5)
        >>> q(torch.tensor([-1.0, 0.2, 0.25, 0.75, 9.0])).tolist()
        [0.0, 0.0, 0.5, 1.0, 1.5]
        >>> Quantizer(8, signed=True, scale=1.0)(torch.tensor([-0.5, -1.5, 0.5, 100.0])).tolist()
        [0.0, -1.0, 1.0, 3.0]
    """

    initialized: torch.Tensor

    def __init__(self, levels: int, signed: bool = False, scale: float | torch.Tensor | None = None) -> None:
        super().__init__()
        self.n_min, self.n_max = quantizer_bounds(levels, signed)
        self.levels = int(levels)
        self.signed = signed
        value = torch.tensor(1.0) if scale is None else _positive_scale(scale, "Quantizer")
        self.scale = nn.Parameter(value.to(torch.get_default_dtype()))
        self.register_buffer("initialized", torch.tensor(scale is not None))

    def extra_repr(self) -> str:
        return f"levels={self.levels}, signed={self.signed}, n_min={self.n_min}, n_max={self.n_max}"

    @property
    def step(self) -> torch.Tensor:
        """The step in use: ``scale`` rounded to 12 significant bits (straight-through for its gradient).

        Every multiple ``k * step`` with ``|k| < 4096``, and so every partial sum of ``±step`` spikes, is then
        exact in float32: the SNN's running sums of spikes equal ``count * step`` bit for bit.
        """
        s = self.scale
        mantissa, exponent = torch.frexp(s.detach())
        rounded = torch.ldexp(torch.round(mantissa * 4096) / 4096, exponent)
        return s + (rounded - s.detach())

    @torch.no_grad()
    def set_scale(self, scale: float | torch.Tensor) -> None:
        """Set ``s`` (positive, finite) and mark the quantiser initialised."""
        value = _positive_scale(scale, "Quantizer")
        if value.shape != self.scale.shape:
            self.scale.data = value.to(self.scale.dtype)
        else:
            self.scale.copy_(value)
        self.initialized.fill_(True)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """LSQ's rule: ``s = 2 * mean|x| / sqrt(n_max)``; raises ValueError naming NaN/inf in ``x``."""
        if not bool(torch.isfinite(x).all()):
            raise ValueError("Quantizer: cannot initialise the step from data containing NaN or inf.")
        mean = float(x.detach().abs().float().mean()) if x.numel() else 0.0
        self.set_scale(2.0 * mean / math.sqrt(max(self.n_max, 1)) if mean > 0 else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Quantizer expects a torch.Tensor input, but got {type(x).__name__}.")
        if not x.is_floating_point():
            raise TypeError(f"Quantizer expects a floating-point input, but got dtype {x.dtype}.")
        if not bool(self.initialized):
            self.init_from(x)
        s = self.step.to(x.dtype)
        with torch.no_grad():
            exact = torch.floor(x / s + 0.5).clamp_(self.n_min, self.n_max).mul_(s)
        if not (torch.is_grad_enabled() and (x.requires_grad or self.scale.requires_grad)):
            return exact
        g = 1.0 / math.sqrt(max(self.n_max, 1) * max(x.numel(), 1))
        s_g = (s - s * g).detach() + s * g  # value s, gradient scaled by g
        z = torch.clamp(x / s_g + 0.5, self.n_min, self.n_max)
        surrogate = (z + (torch.floor(z) - z).detach()) * s_g
        return exact + (surrogate - surrogate.detach())  # the exact value, LSQ's gradients


class STBIFNeuron(TDModule):
    """Spike-triggered bipolar integrate-and-fire neuron (SpikeZIP-TF's ST-BIF), SPEC 14.1.

    Per element a potential ``q`` (starts at 1/2) and an integer spike count ``c`` (starts at 0). Each step:
    ``q += x / s``; a positive spike if ``q >= 1`` and ``c < n_max``, a negative one if ``q < 0`` and
    ``c > n_min``; ``q -= spike``; ``c += spike``; the output is ``spike * s``, so ``spike_unit = s``.
    Fed ``[x, 0, 0, ...]`` the summed output equals ``Quantizer(x)`` once ``T >= n_max - n_min + 1``; in
    general it equals the quantised sum of the input once the neuron has gone quiet.

    Full sequences ``[T, ...]`` by default (one call loops over ``T`` on the whole batch); after
    ``set_streaming(True)`` one step per call, with the state kept until ``reset()``. The state lives on
    the input's device, ``q`` in the input's dtype (float32 for half inputs), ``c`` in the smallest integer
    dtype that holds ``n_max - n_min`` (int8 up to 127). Inference only.

    Args:
        scale: The step ``s``: positive real, or a float tensor broadcastable to one time step.
        n_min: Lower integer bound of the count, ``n_min <= 0``.
        n_max: Upper integer bound of the count, ``n_max >= 0`` and ``n_min < n_max``.

    Shape:
        - Input: ``[T, ...]`` (one step ``[...]`` in streaming mode), floating point.
        - Output: the same shape and dtype; values in ``{-s, 0, s}``.

    Attributes:
        activity: After a full-sequence call, a ``[T]`` bool tensor: whether any element received a non-zero
            input or spiked at each step (the settle time is one past its last True). In streaming mode,
            a one-element tensor for the last step.
        record_activity: Whether to record :attr:`activity` (default True; costs two small reductions a
            step).

    Examples:
        >>> import torch
        >>> q = Quantizer(8, signed=True, scale=0.5)
        >>> neuron = STBIFNeuron.from_quantizer(q)
        >>> x = torch.tensor([[1.3, -0.8, 0.25]])
        >>> seq = torch.cat([x.unsqueeze(0), torch.zeros(7, 1, 3)])
        >>> out = neuron(seq)
        >>> torch.equal(out.sum(0), q(x).detach()), sorted(set((out / neuron.spike_unit).flatten().tolist()))
        (True, [-1.0, 0.0, 1.0])
    """

    scale: torch.Tensor

    def __init__(self, scale: float | torch.Tensor, n_min: int, n_max: int) -> None:
        super().__init__()
        n_min = _integral(n_min, "n_min", "STBIFNeuron")
        n_max = _integral(n_max, "n_max", "STBIFNeuron")
        if not n_min <= 0 <= n_max or n_min == n_max:
            raise ValueError(
                f"STBIFNeuron: needs n_min <= 0 <= n_max and n_min < n_max, but got n_min={n_min}, n_max={n_max}."
            )
        self.n_min, self.n_max = n_min, n_max
        self.register_buffer("scale", _positive_scale(scale, "STBIFNeuron").to(torch.get_default_dtype()))
        self.activity: torch.Tensor | None = None
        self.record_activity = True

    @classmethod
    def from_quantizer(cls, quantizer: Quantizer) -> STBIFNeuron:
        """The neuron whose settled count reproduces ``quantizer`` (same step and bounds)."""
        if not isinstance(quantizer, Quantizer):
            raise TypeError(
                f"STBIFNeuron.from_quantizer expects a Quantizer, but got {type(quantizer).__name__}."
            )
        if not bool(quantizer.initialized):
            raise RuntimeError(
                "STBIFNeuron.from_quantizer: the Quantizer's step was never set; calibrate first."
            )
        return cls(quantizer.step.detach().clone(), quantizer.n_min, quantizer.n_max)

    @property
    def spike_unit(self) -> float | torch.Tensor:
        """The value of one spike event (CONTRACTS item 1): ``s`` (a float when scalar)."""
        return float(self.scale) if self.scale.numel() == 1 else self.scale

    def extra_repr(self) -> str:
        return f"n_min={self.n_min}, n_max={self.n_max}"

    def _count_dtype(self) -> torch.dtype:
        span = self.n_max - self.n_min  # counts and their differences to targets lie in [-span, span]
        return torch.int8 if span <= 127 else torch.int16 if span <= 2**15 - 1 else torch.int32

    def _targets(self, u: torch.Tensor) -> torch.Tensor:
        """``clamp(floor(u), n_min, n_max)`` as integers: the count that ``q = u - c`` in ``[0, 1)`` asks for."""
        return torch.floor(u).clamp_(self.n_min, self.n_max).to(self._count_dtype())

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full sequence ``[T, ...]`` in, spikes ``[T, ...]`` out (one step per call in streaming mode).

        The potential is kept as ``q = u - c`` with ``u = 1/2 + sum(x / s)`` accumulated step by step: then
        ``q >= 1`` and ``q < 0`` read ``floor(u) > c`` and ``floor(u) < c`` exactly, and the spike is
        ``sign(d)`` of the integer ``d = clamp(floor(u), n_min, n_max) - c``. A full sequence does each step's
        ops on one step slice with preallocated buffers (the slice stays in cache); streaming does the same
        arithmetic (bit for bit).
        """
        name = type(self).__name__
        if self.streaming:
            check_step(x, name)
        else:
            check_time_sequence(x, name)
        if not x.is_floating_point():
            raise TypeError(f"{name} expects a floating-point input, but got dtype {x.dtype}.")
        acc = accumulation_dtype(x.dtype)
        s = self.scale.to(device=x.device, dtype=acc)
        if self.streaming:
            return self._stream(x, x.to(acc) / s, s)
        return _sequence(self, x.to(acc), s).to(x.dtype)

    def _stream(self, x: torch.Tensor, xs: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(xs.shape, s.shape)
        if "u" not in self._state:
            u = (xs + 0.5).expand(shape).clone()
            c = torch.zeros(shape, dtype=self._count_dtype(), device=x.device)
        else:
            u, c = self._state["u"], self._state["c"]
            if u.shape != shape:
                raise ValueError(
                    f"{type(self).__name__} in streaming mode got a step of shape {tuple(x.shape)}, but its "
                    f"state has shape {tuple(u.shape)}; call reset() before a new sequence."
                )
            u = u + xs
        spike = torch.sign(self._targets(u) - c)
        self._state = {"u": u, "c": c + spike}
        if self.record_activity:
            self.activity = ((x != 0).any() | (spike != 0).any()).reshape(1)
        return torch.mul(spike, s).to(x.dtype)

    @property
    def count(self) -> torch.Tensor | None:
        """The integer spike count ``c`` of the streaming state (None before the first step)."""
        state = self._state.get("c")
        return None if state is None else state.to(torch.int64)


def _sequence(neuron: STBIFNeuron, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """STBIFNeuron's full-sequence loop, one step slice at a time (each slice's ops run while it is in cache)."""
    out = torch.empty(torch.broadcast_shapes(x.shape, (1, *s.shape)), dtype=x.dtype, device=x.device)
    u, buf = torch.empty_like(out[0]), torch.empty_like(out[0])  # u = q + c
    c = torch.zeros(out.shape[1:], dtype=neuron._count_dtype(), device=x.device)
    gap, spike = torch.empty_like(c), torch.empty_like(c)
    active = []
    for t in range(x.shape[0]):
        if t == 0:
            torch.div(x[0], s, out=u).add_(0.5)  # u[t] = 1/2 + x[0]/s + ... + x[t]/s, the stream's order
        else:
            u.add_(torch.div(x[t], s, out=buf))
        floor = torch.floor(u, out=buf) if neuron.n_min < 0 else u  # unsigned: clamped >= 0, the cast floors
        gap.copy_(torch.clamp(floor, neuron.n_min, neuron.n_max, out=buf)).sub_(c)  # target - c, integers
        c.add_(torch.clamp(gap, -1, 1, out=spike))  # the spike: sign of the gap
        out[t].copy_(spike).mul_(s)
        if neuron.record_activity:
            active.append(x[t].any() | spike.any())
    if neuron.record_activity:
        neuron.activity = torch.stack(active)
    return out

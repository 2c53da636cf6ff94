"""The integrate-and-fire dynamics as functions of the membrane potential: no state, no argument checks.

:class:`~ann2snn_fx.snn.neurons.IFNode` holds the state and calls these; a new neuron model adds its
update rule here (copy :func:`integrate_and_fire`) and a module beside ``IFNode`` that holds its state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "burst_signed_sequence",
    "fire_burst_signed",
    "fire_burst_signed_",
    "fire_negated_",
    "integrate_and_fire",
    "integrate_and_fire_sequence",
    "sum_first_dim",
]


def integrate_and_fire(
    v: torch.Tensor,
    x: torch.Tensor,
    threshold: float | torch.Tensor,
    v_reset: float | torch.Tensor | None,
    *,
    surrogate: Callable[[torch.Tensor], torch.Tensor],
    training: bool,
    detach_reset: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step: ``v + x``, fire where ``v >= threshold``, reset (soft if ``v_reset is None``).

    Returns ``(spike, v)``. Outside training and autograd, ``v`` (owned by the caller) is updated in place.
    """
    differentiable = torch.is_grad_enabled() and (x.requires_grad or v.requires_grad)
    if training or differentiable:
        v = v + x
        spike = surrogate(v - threshold) if training else (v >= threshold).to(x.dtype)
        spike_r = spike.detach() if detach_reset else spike
        if v_reset is None:
            v = v - spike_r * threshold
        else:
            v = spike_r * v_reset + (1.0 - spike_r) * v
    else:
        # Inference fast path: update the membrane in place (it is owned by this neuron) with fused kernels.
        v.add_(x)
        if v_reset is None:
            spike = torch.empty_like(v)
            torch.ge(v, threshold, out=spike)
            if isinstance(threshold, torch.Tensor):
                v.sub_(spike * threshold)
            else:
                v.sub_(spike, alpha=threshold)
        else:
            fired = v >= threshold
            spike = fired.to(x.dtype)
            v.masked_fill_(fired, float(v_reset))
    return spike, v


def integrate_and_fire_sequence(
    v: torch.Tensor,
    x_seq: torch.Tensor,
    threshold: float,
    input_scale: float | None = None,
    totals: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-reset inference over ``[T, N, *]`` (``v`` updated in place), integrating ``input_scale * x``
    when given (a fused input scaler). Returns ``(spikes, v)``; spikes are written straight into the output.

    With ``totals`` (a ``[*]`` tensor) the spikes are not kept: each step's are written into one ``[N, *]``
    tensor (returned in place of the spikes) and summed over ``N`` into ``totals``, in place, in its dtype
    (exact for counts below ``2**24`` in float32). ``scratch``: a ``[N, *]`` buffer that step tensor may be
    (reused when its shape, dtype and device fit).
    """
    out = _spike_buffer(x_seq, totals, scratch)
    for t in range(x_seq.shape[0]):
        spikes = out[t] if totals is None else out
        if input_scale is None:
            v.add_(x_seq[t])
        else:
            v.add_(x_seq[t], alpha=input_scale)
        torch.ge(v, threshold, out=spikes)
        v.sub_(spikes, alpha=threshold)
        if totals is not None:
            totals.add_(sum_first_dim(spikes, totals.dtype))
    return out, v


def sum_first_dim(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.sum(0, dtype=dtype)``, reduced in memory order when ``x`` is dense in another order than the
    default (channels-last): torch's reduction of a permuted layout takes a slow path, 14x slower on a
    channels-last ``[512, 16, 8, 8]``. The sum runs over the same elements, in the same order along dim 0."""
    if x.dim() > 2 and not x.is_contiguous():
        order = sorted(range(1, x.dim()), key=lambda d: -x.stride()[d])
        dense = x.permute(0, *order)
        if dense.is_contiguous():
            inverse = [0] * len(order)
            for i, d in enumerate(order):
                inverse[d - 1] = i
            return dense.sum(0, dtype=dtype).permute(*inverse)
    return x.sum(0, dtype=dtype)


def _spike_buffer(
    x_seq: torch.Tensor, totals: torch.Tensor | None, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    # Each step laid out as the input's step when that is dense (channels-last spike maps stay channels-last,
    # also for a static input expanded over time), else contiguous. With totals, a ``scratch`` step buffer of
    # the step's shape, dtype and device is reused (a fresh one of megabytes costs its page faults).
    if (
        totals is not None
        and scratch is not None
        and scratch.shape == x_seq.shape[1:]
        and (scratch.dtype, scratch.device) == (x_seq.dtype, x_seq.device)
    ):
        return scratch
    step = torch.empty_like(x_seq[0], memory_format=torch.preserve_format)
    if totals is not None:
        return step
    strides = (step.numel(), *step.stride())
    return torch.empty_strided((x_seq.shape[0], *step.shape), strides, dtype=step.dtype, device=step.device)


def fire_burst_signed_(
    v: torch.Tensor,
    out: torch.Tensor,
    threshold: float | torch.Tensor,
    burst: int,
    count: torch.Tensor | None,
) -> None:
    """Soft-reset inference step of a burst and/or signed neuron on an integrated ``v`` (SPEC 14.2), in place.

    Writes ``k = clamp(floor(v / θ), 0, burst)`` into ``out`` (``v >= θ`` when ``burst == 1``) and subtracts
    ``k θ``; with a ``count`` (the net spikes so far, signed neurons), emits ``-1`` and adds ``θ`` back where
    ``v < 0`` and ``count > 0``, and adds the step's output to ``count``.
    """
    negative_count = None if count is None else torch.neg(count)
    fire_negated_(v, out, threshold, burst, negative_count)
    if count is not None:
        assert negative_count is not None
        torch.neg(negative_count, out=count)


def fire_negated_(
    v: torch.Tensor,
    out: torch.Tensor,
    threshold: float | torch.Tensor,
    burst: int,
    negative_count: torch.Tensor | None,
) -> None:
    """:func:`fire_burst_signed_` with the count kept negated (``-count <= 0``, updated in place), as
    :class:`~ann2snn_fx.snn.neurons.IFNode` holds it: the kernels need ``-count``, not ``count``.

    With ``θ = 1`` (the converter's neurons) the step is ``k = clamp(floor(v), -1, burst)`` raised to
    ``-count`` (no negative spike while the count is 0), ``v -= k``, ``-count -= k``: ``floor(v) >= 1``
    means ``v - k >= 0`` exactly, so a step fires positively or negatively, never both, and this is the
    two-stage rule bit for bit in five kernels. Other thresholds take the two stages.
    """
    if (
        not isinstance(threshold, torch.Tensor)
        and threshold == 1.0
        and (negative_count is not None or burst > 1)
    ):
        torch.floor(v, out=out)
        if negative_count is None:
            out.clamp_(0, burst)
        else:
            out.clamp_(-1, burst)
            torch.maximum(out, negative_count, out=out)
        v.sub_(out)
        if negative_count is not None:
            negative_count.sub_(out)
        return
    tensor = isinstance(threshold, torch.Tensor)
    if burst == 1:
        torch.ge(v, threshold, out=out)
    else:
        if tensor or threshold != 1.0:
            torch.div(v, threshold, out=out)
            out.floor_()
        else:
            torch.floor(v, out=out)
        out.clamp_(0, burst)
    if tensor:
        v.sub_(out * threshold)
    else:
        v.sub_(out, alpha=threshold)  # type: ignore[arg-type]
    if negative_count is not None:
        # Float comparisons (bool tensors are slow on CPU): max(v, -count) < 0 where v < 0 and count > 0.
        negative = torch.maximum(v, negative_count)
        torch.lt(negative, 0, out=negative)
        out.sub_(negative)
        if tensor:
            v.add_(negative * threshold)
        else:
            v.add_(negative, alpha=threshold)  # type: ignore[arg-type]
        negative_count.sub_(out)


def burst_signed_sequence(
    v: torch.Tensor,
    x_seq: torch.Tensor,
    threshold: float | torch.Tensor,
    burst: int,
    signed: bool,
    negative_count: torch.Tensor | None,
    input_scale: float | None = None,
    totals: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Soft-reset inference of a burst and/or signed neuron over ``[T, N, *]`` (``v`` updated in place),
    integrating ``input_scale * x`` when given: :func:`fire_negated_` at every step.

    ``negative_count`` is a signed neuron's negated net count so far, updated in place (``None``: a fresh
    neuron, whose first step has no negative rule to apply). Returns ``(out, negative_count)``
    (``negative_count`` is ``None`` unless ``signed``); ``totals`` and ``scratch`` as for
    :func:`integrate_and_fire_sequence`.
    """
    out = _spike_buffer(x_seq, totals, scratch)
    for t in range(x_seq.shape[0]):
        spikes = out[t] if totals is None else out
        v.add_(x_seq[t]) if input_scale is None else v.add_(x_seq[t], alpha=input_scale)
        fire_negated_(v, spikes, threshold, burst, negative_count)
        if signed and negative_count is None:
            negative_count = torch.neg(spikes)  # the count of a fresh neuron starts at its first output
        if totals is not None:
            totals.add_(sum_first_dim(spikes, totals.dtype))
    return out, negative_count


def fire_burst_signed(
    v: torch.Tensor, threshold: float | torch.Tensor, burst: int, count: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Out-of-place (autograd-safe) :func:`fire_burst_signed_`; the count carries no gradient.

    Returns ``(k, v, count)``.
    """
    with torch.no_grad():
        k = torch.floor(v / threshold).clamp_(0, burst)
    v = v - k * threshold
    if count is not None:
        negative = ((v.detach() < 0) & (count > 0)).to(v.dtype)
        k = k - negative
        v = v + negative * threshold
        count = count + k
    return k, v, count

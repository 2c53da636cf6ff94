"""The integrate-and-fire dynamics as functions of the membrane potential: no state, no argument checks.

:class:`~ann2snn_fx.snn.neurons.IFNode` holds the state and calls these; a new neuron model adds its
update rule here (copy :func:`integrate_and_fire`) and a module beside ``IFNode`` that holds its state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["integrate_and_fire", "integrate_and_fire_sequence"]


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
    v: torch.Tensor, x_seq: torch.Tensor, threshold: float, input_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-reset inference over ``[T, N, *]`` (``v`` updated in place), integrating ``input_scale * x``
    when given (a fused input scaler). Returns ``(spikes, v)``; spikes are written straight into the output."""
    out = torch.empty_like(x_seq, memory_format=torch.contiguous_format)
    for t in range(x_seq.shape[0]):
        if input_scale is None:
            v.add_(x_seq[t])
        else:
            v.add_(x_seq[t], alpha=input_scale)
        torch.ge(v, threshold, out=out[t])
        v.sub_(out[t], alpha=threshold)
    return out, v

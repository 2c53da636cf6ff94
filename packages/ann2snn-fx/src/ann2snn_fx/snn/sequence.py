"""Multi-step execution of a neuron over ``[T, N, *]``: the step loop, and the fused soft-reset inference loop.

:class:`SequenceSteps` is a mixin of :class:`~ann2snn_fx.snn.neurons.IFNode`: it needs the neuron's
``single_step_forward``, ``_prepare_v`` and its state attributes.
"""

from __future__ import annotations

from typing import Any

import torch

from ann2snn_fx.snn.dynamics import burst_signed_sequence, integrate_and_fire_sequence

__all__ = ["SequenceSteps"]


class SequenceSteps:
    """Mixin: ``multi_step_forward`` and the in-place inference loop over a time sequence."""

    training: bool
    store_v_seq: bool
    v_reset: Any
    v_threshold: Any
    v: Any
    v_seq: torch.Tensor | None
    burst: int
    signed: bool

    def single_step_forward(
        self, x: torch.Tensor
    ) -> torch.Tensor:  # pragma: no cover - provided by the neuron
        raise NotImplementedError

    def _prepare_v(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - provided by the neuron
        raise NotImplementedError

    def _prepare_count(self, x: torch.Tensor) -> torch.Tensor | None:  # pragma: no cover - the neuron's
        raise NotImplementedError

    def _sequence_fast_path_ok(self, x_seq: torch.Tensor) -> bool:
        differentiable = torch.is_grad_enabled() and x_seq.requires_grad
        return (
            not self.training
            and not differentiable
            and not self.store_v_seq
            and self.v_reset is None
            and not isinstance(self.v_threshold, torch.Tensor)
        )

    def _inference_sequence(
        self,
        x_seq: torch.Tensor,
        input_scale: float | None = None,
        totals: torch.Tensor | None = None,
        scratch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Soft-reset inference over ``[T, N, *]``: spikes written straight into the output, optionally
        integrating ``input_scale * x`` (a fused input scaler). With ``totals`` (``[*]``) the output is
        not kept but summed over time and batch into it (see
        :func:`~ann2snn_fx.snn.dynamics.integrate_and_fire_sequence`), and that ``[N, *]`` step buffer
        (returned) may be ``scratch``, an earlier call's."""
        v = self._prepare_v(x_seq[0])
        if v is self.v and isinstance(v, torch.Tensor) and v.requires_grad:
            v = v.detach().clone()
        threshold = float(self.v_threshold)
        if self.burst == 1 and not self.signed:
            out, v = integrate_and_fire_sequence(v, x_seq, threshold, input_scale, totals, scratch)
        else:
            out, negative_count = burst_signed_sequence(
                v,
                x_seq,
                threshold,
                self.burst,
                self.signed,
                self._prepare_count(v) if self.signed else None,
                input_scale,
                totals,
                scratch,
            )
            if negative_count is not None:
                self.__dict__["_negative_count"] = negative_count
        self.v = v
        return out

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Loop :meth:`single_step_forward` over the leading time axis of ``x_seq`` (``[T, N, *]``)."""
        if x_seq.dim() < 1 or x_seq.shape[0] == 0:
            raise ValueError(
                f"multi-step input must have a non-empty leading time dimension, but got shape {tuple(x_seq.shape)}."
            )
        if self._sequence_fast_path_ok(x_seq):
            return self._inference_sequence(x_seq)
        spikes = []
        v_seq = []
        for t in range(x_seq.shape[0]):
            spikes.append(self.single_step_forward(x_seq[t]))
            if self.store_v_seq:
                state = self.v
                v_seq.append(
                    state.clone() if isinstance(state, torch.Tensor) else torch.full_like(x_seq[t], state)
                )
        if self.store_v_seq:
            self.v_seq = torch.stack(v_seq)
        return torch.stack(spikes)

"""The state of IFNode's low-latency options (SPEC 14.2): burst and signed spikes, per-element initial potentials.

:class:`LowLatencyState` is a mixin of :class:`~ann2snn_fx.snn.neurons.IFNode`; the update rules are
:func:`~ann2snn_fx.snn.dynamics.fire_burst_signed` and :func:`~ann2snn_fx.snn.dynamics.fire_burst_signed_`.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

import torch

from ann2snn_fx.snn.dynamics import fire_burst_signed, fire_negated_

__all__ = ["LowLatencyState"]


class LowLatencyState:
    """Mixin: ``burst``/``signed`` options and their net spike count, and a tensor ``v_init`` buffer."""

    training: bool
    v: Any
    v_reset: Any
    v_threshold: Any
    v_init: Any
    burst: int
    signed: bool
    _buffers: dict[str, Any]
    __dict__: dict[str, Any]

    if TYPE_CHECKING:  # provided by the neuron (nn.Module)

        def reset(self) -> None: ...

        def register_buffer(
            self, name: str, tensor: torch.Tensor | None, persistent: bool = True
        ) -> None: ...

    def _set_low_latency_options(self, burst: Any, signed: Any) -> None:
        if isinstance(burst, bool) or not isinstance(burst, numbers.Integral) or int(burst) < 1:
            raise ValueError(f"burst must be a positive int (1: one spike per step), but got {burst!r}.")
        if not isinstance(signed, bool):
            raise TypeError(f"signed must be a bool, but got {signed!r}.")
        if (int(burst) > 1 or signed) and self.v_reset is not None:
            raise ValueError(
                f"burst={burst} and signed={signed} need the soft reset (v_reset=None), but got "
                f"v_reset={self.v_reset!r}."
            )
        self.burst = int(burst)
        self.signed = signed
        self.count = 0.0

    def set_v_init(self, value: torch.Tensor) -> None:
        """Set a per-element initial potential (a finite real tensor broadcastable to one sample).

        It is kept as the buffer ``v_init`` (saved in ``state_dict``; a neuron built with a number or
        ``None`` adopts the buffer when such a state is loaded into it).
        """
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"v_init must be a floating-point tensor here, but got {value!r}.")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"v_init must be finite, but got a tensor of shape {tuple(value.shape)} with non-finite values."
            )
        self.__dict__.pop("v_init", None)
        if "v_init" in self._buffers:
            self._buffers["v_init"] = value.detach().clone()
        else:
            self.register_buffer("v_init", value.detach().clone())
        self.reset()

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "v_init"
        if key in state_dict and "v_init" not in self._buffers:
            self.set_v_init(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]

    @property
    def count(self) -> float | torch.Tensor:
        """The net number of spikes emitted since the last reset (``0.0`` before the first input): a copy.

        The neuron keeps it negated (``-count``, what its kernels take) in ``_negative_count``.
        """
        negative = self.__dict__.get("_negative_count", 0.0)
        return torch.neg(negative) if isinstance(negative, torch.Tensor) else 0.0 - negative

    @count.setter
    def count(self, value: float | torch.Tensor) -> None:
        self.__dict__["_negative_count"] = (
            torch.neg(value) if isinstance(value, torch.Tensor) else 0.0 - value
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A neuron pickled before the count was kept negated holds it as "count" (which the property shadows).
        count = state.pop("count", None)
        super().__setstate__(state)  # type: ignore[misc]
        if count is not None and "_negative_count" not in self.__dict__:
            self.count = count

    def _prepare_count(self, x: torch.Tensor) -> torch.Tensor | None:
        """The negated count for an input like ``x`` (``None``: a fresh neuron, all zero)."""
        negative = self.__dict__.get("_negative_count")
        if not isinstance(negative, torch.Tensor) or negative.shape != x.shape:
            return None
        return negative.to(dtype=x.dtype, device=x.device)

    def _burst_signed_step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        negative_count = self._prepare_count(x) if self.signed else None
        differentiable = torch.is_grad_enabled() and (x.requires_grad or v.requires_grad)
        if self.training or differentiable:
            count = (
                None
                if not self.signed
                else (torch.zeros_like(x) if negative_count is None else torch.neg(negative_count))
            )
            spike, v, count = fire_burst_signed(v + x, self.v_threshold, self.burst, count)
            if count is not None:
                self.count = count
        else:
            v.add_(x)
            spike = torch.empty_like(v)
            fire_negated_(v, spike, self.v_threshold, self.burst, negative_count)
            if self.signed:
                self.__dict__["_negative_count"] = (
                    torch.neg(spike) if negative_count is None else negative_count
                )
        self.v = v
        return spike

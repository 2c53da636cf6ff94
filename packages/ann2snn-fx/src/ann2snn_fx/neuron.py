"""Integrate-and-fire neurons for converted SNNs, and ``reset_net``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["IFNode", "SigmoidSurrogate", "reset_net"]

_STEP_MODES = ("s", "m")


class _HeavisideSigmoid(torch.autograd.Function):
    """Heaviside step (``x >= 0``) forward, sigmoid-derivative backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        sig = torch.sigmoid(ctx.alpha * x)
        return grad_output * ctx.alpha * sig * (1.0 - sig), None


class SigmoidSurrogate(nn.Module):
    """Surrogate spike function: Heaviside forward, ``alpha * sigmoid'(alpha * x)`` backward.

    Args:
        alpha: Steepness of the sigmoid used for the gradient.

    Shape:
        - Input: any shape.
        - Output: same shape as the input, values in {0, 1}.

    Examples:
        >>> SigmoidSurrogate()(torch.tensor([-0.5, 0.0, 0.5]))
        tensor([0., 1., 1.])
    """

    def __init__(self, alpha: float = 4.0) -> None:
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise TypeError(f"alpha must be a finite real number, but got {alpha!r}.")
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _HeavisideSigmoid.apply(x, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


def _check_potential(name: str, value: Any, *, positive: bool) -> float | torch.Tensor:
    """Validate a threshold/reset/initial potential: int, float or a 0-dim real tensor."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, a float or a 0-dim tensor, but got a bool ({value!r}).")
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or (
            not value.is_floating_point() and value.dtype not in (torch.int32, torch.int64)
        ):
            raise TypeError(
                f"{name} must be an int, a float or a 0-dim real tensor, but got a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}."
            )
        number = float(value.item())
    elif isinstance(value, (int, float)):
        number = float(value)
    else:
        raise TypeError(f"{name} must be an int, a float or a 0-dim tensor, but got {type(value).__name__}.")
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, but got {number}.")
    if positive and number <= 0:
        raise ValueError(f"{name} must be positive, but got {number}.")
    return number


class IFNode(nn.Module):
    """Integrate-and-fire neuron with soft (subtractive) or hard reset.

    Each single-step call integrates ``v = v + x``, emits ``spike = (v >= v_threshold)`` and resets the
    spiking elements: ``v = v - spike * v_threshold`` when ``v_reset is None`` (soft reset, what the
    converter uses) or ``v = spike * v_reset + (1 - spike) * v`` otherwise (hard reset).

    The membrane potential starts at ``v_init`` (default: ``v_reset``, or 0.0 for soft reset) and
    ``reset()`` brings it back there. Starting half-way to the threshold (``v_init=0.5`` with the
    converter's threshold 1.0) rounds the firing rate instead of flooring it, which makes converted
    networks accurate at a few time steps.

    In training mode the spike is computed through ``surrogate_function(v - v_threshold)`` so that
    gradients flow; the forward values are the same in both modes.

    Args:
        v_threshold: Firing threshold; int, float or 0-dim tensor, finite and positive. A tensor may also
            be assigned to ``v_threshold`` after construction.
        v_reset: Reset potential (hard reset), or ``None`` for soft reset.
        surrogate_function: Callable used for the spike in training mode. Defaults to
            :class:`SigmoidSurrogate` with ``alpha=4``.
        detach_reset: Detach the spike used in the reset from the autograd graph.
        step_mode: ``"s"`` (one step per call, input ``[N, ...]``) or ``"m"`` (input ``[T, N, ...]``).
        backend: Only ``"torch"``.
        store_v_seq: In multi-step mode, keep the membrane potential of every step in ``v_seq``.
        v_init: Initial membrane potential, in the units of ``v_threshold``. ``None`` means ``v_reset``
            (or 0.0 for soft reset).

    Shape:
        - Single-step input: ``[N, *]``; output: same shape, spikes in {0, 1} of the input's dtype.
        - Multi-step input: ``[T, N, *]``; output: same shape.

    Examples:
        >>> node = IFNode(v_reset=None)
        >>> [node(torch.tensor([0.6])).item() for _ in range(3)]
        [0.0, 1.0, 0.0]
        >>> node.reset()
        >>> IFNode(v_reset=None, v_init=0.5)(torch.tensor([0.6])).item()
        1.0
    """

    v: float | torch.Tensor
    #: Output per spike event (``output / spike_unit`` is the signed event count per element and step).
    spike_unit: float = 1.0

    def __init__(
        self,
        v_threshold: float | torch.Tensor = 1.0,
        v_reset: float | torch.Tensor | None = 0.0,
        surrogate_function: Callable[[torch.Tensor], torch.Tensor] | None = None,
        detach_reset: bool = False,
        step_mode: str = "s",
        backend: str = "torch",
        store_v_seq: bool = False,
        v_init: float | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.v_threshold: float | torch.Tensor = _check_potential("v_threshold", v_threshold, positive=True)
        self.v_reset: float | torch.Tensor | None = (
            None if v_reset is None else _check_potential("v_reset", v_reset, positive=False)
        )
        self.v_init: float | None = (
            None if v_init is None else float(_check_potential("v_init", v_init, positive=False))
        )
        if not isinstance(detach_reset, bool):
            raise TypeError(f"detach_reset must be a bool, but got {detach_reset!r}.")
        if step_mode not in _STEP_MODES:
            raise ValueError(f"step_mode must be 's' or 'm', but got {step_mode!r}.")
        if backend != "torch":
            raise ValueError(f"backend must be 'torch' (the only backend), but got {backend!r}.")
        if not isinstance(store_v_seq, bool):
            raise TypeError(f"store_v_seq must be a bool, but got {store_v_seq!r}.")
        if surrogate_function is None:
            surrogate_function = SigmoidSurrogate(alpha=4.0)
        elif not callable(surrogate_function):
            raise TypeError(
                f"surrogate_function must be callable, but got {type(surrogate_function).__name__}."
            )
        self.surrogate_function = surrogate_function
        self.detach_reset = detach_reset
        self.step_mode = step_mode
        self.backend = backend
        self.store_v_seq = store_v_seq
        self.v = self._initial_v()
        self.v_seq: torch.Tensor | None = None

    def _initial_v(self) -> float:
        if self.v_init is not None:
            return self.v_init
        return 0.0 if self.v_reset is None else float(self.v_reset)

    def reset(self) -> None:
        """Return the membrane potential to its initial value (a Python float)."""
        self.v = self._initial_v()
        self.v_seq = None

    def _prepare_v(self, x: torch.Tensor) -> torch.Tensor:
        v = self.v
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            # A new input shape (first call, or another batch size) starts from the initial potential.
            return torch.full_like(x, self._initial_v())
        if v.dtype != x.dtype or v.device != x.device:
            v = v.to(dtype=x.dtype, device=x.device)
        return v

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        """One time step: integrate ``x``, fire, reset. Input and output ``[N, *]``."""
        v = self._prepare_v(x)
        threshold = self.v_threshold
        differentiable = torch.is_grad_enabled() and (x.requires_grad or v.requires_grad)
        if self.training or differentiable:
            v = v + x
            spike = self.surrogate_function(v - threshold) if self.training else (v >= threshold).to(x.dtype)
            spike_r = spike.detach() if self.detach_reset else spike
            if self.v_reset is None:
                v = v - spike_r * threshold
            else:
                v = spike_r * self.v_reset + (1.0 - spike_r) * v
        else:
            # Inference fast path: update the membrane in place (it is owned by this neuron) with fused kernels.
            v.add_(x)
            if self.v_reset is None:
                spike = torch.empty_like(v)
                torch.ge(v, threshold, out=spike)
                if isinstance(threshold, torch.Tensor):
                    v.sub_(spike * threshold)
                else:
                    v.sub_(spike, alpha=threshold)
            else:
                fired = v >= threshold
                spike = fired.to(x.dtype)
                v.masked_fill_(fired, float(self.v_reset))
        self.v = v
        return spike

    def _sequence_fast_path_ok(self, x_seq: torch.Tensor) -> bool:
        differentiable = torch.is_grad_enabled() and x_seq.requires_grad
        return (
            not self.training
            and not differentiable
            and not self.store_v_seq
            and self.v_reset is None
            and not isinstance(self.v_threshold, torch.Tensor)
        )

    def _inference_sequence(self, x_seq: torch.Tensor, input_scale: float | None = None) -> torch.Tensor:
        """Soft-reset inference over ``[T, N, *]``: spikes written straight into the output, optionally
        integrating ``input_scale * x`` (a fused input scaler)."""
        threshold = float(self.v_threshold)
        out = torch.empty_like(x_seq, memory_format=torch.contiguous_format)
        v = self._prepare_v(x_seq[0])
        if v is self.v and isinstance(v, torch.Tensor) and v.requires_grad:
            v = v.detach().clone()
        for t in range(x_seq.shape[0]):
            if input_scale is None:
                v.add_(x_seq[t])
            else:
                v.add_(x_seq[t], alpha=input_scale)
            torch.ge(v, threshold, out=out[t])
            v.sub_(out[t], alpha=threshold)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"IFNode expects a tensor input, but got {type(x).__name__}.")
        if self.step_mode == "s":
            return self.single_step_forward(x)
        if self.step_mode == "m":
            return self.multi_step_forward(x)
        raise ValueError(f"step_mode must be 's' or 'm', but got {self.step_mode!r}.")

    def extra_repr(self) -> str:
        def fmt(value: Any) -> str:
            return str(value.item()) if isinstance(value, torch.Tensor) and value.numel() == 1 else str(value)

        text = (
            f"v_threshold={fmt(self.v_threshold)}, v_reset={fmt(self.v_reset)}, detach_reset={self.detach_reset}, "
            f"step_mode={self.step_mode}, backend={self.backend}"
        )
        if self.v_init is not None:
            text += f", v_init={self.v_init}"
        return text


def reset_net(net: nn.Module) -> None:
    """Call ``reset()`` on every submodule of ``net`` (``net`` included) that has a callable ``reset``.

    Only modules inside ``net`` are touched, so several networks can be simulated side by side.

    Args:
        net: The network whose state (membrane potentials) is cleared.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), IFNode())
        >>> _ = net(torch.ones(1, 2))
        >>> reset_net(net)
        >>> net[1].v
        0.0
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"reset_net expects an nn.Module, but got {type(net).__name__}.")
    for module in net.modules():
        reset = getattr(module, "reset", None)
        if callable(reset):
            reset()

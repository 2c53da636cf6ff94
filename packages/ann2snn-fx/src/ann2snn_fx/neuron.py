"""Integrate-and-fire neurons for converted SNNs, and ``reset_net``."""

from __future__ import annotations

import math
import numbers
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

    The membrane potential starts at ``v_init`` (default: ``v_reset``, or 0.0 for soft reset; a tensor
    ``v_init`` gives one initial potential per element, broadcast over the batch, as
    :func:`ann2snn_fx.calibrate_snn`'s potential correction sets it) and ``reset()`` brings it back there. Starting half-way to the threshold (``v_init=0.5`` with the
    converter's threshold 1.0) rounds the firing rate instead of flooring it, which makes converted
    networks accurate at a few time steps.

    Two options make a neuron waste fewer time steps (soft reset only, SPEC 14.2):

    - ``burst=B``: up to ``B`` spikes in one step, ``k = clamp(floor(v / v_threshold), 0, B)``,
      ``v -= k * v_threshold``; the output is ``k`` (``burst=1`` is the plain neuron, bit for bit).
    - ``signed=True``: after the positive rule, when ``v < 0`` and the net count of spikes emitted since the
      last reset is positive, the neuron emits ``-1`` and ``v += v_threshold``. The net count never goes
      below 0, so the accumulated output stays in ``[0, max]`` like a ReLU's.

    The output is a signed spike count (``spike_unit = 1.0``: ``output / spike_unit`` is the number of
    events). With ``burst > 1`` or ``signed`` the count carries no surrogate gradient.

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
        v_init: Initial membrane potential, in the units of ``v_threshold``: a number, a tensor
            broadcastable to one sample (``[*]``; kept as the buffer ``v_init``), or ``None`` for ``v_reset``
            (0.0 for soft reset).
        burst: Largest number of spikes per step (a positive int; 1 is the plain neuron).
        signed: Emit negative spikes that undo an overshoot (see above).

    Shape:
        - Single-step input: ``[N, *]``; output: same shape, spike counts of the input's dtype (in {0, 1}
          by default, ``{0..burst}`` with bursts, ``-1`` for a negative spike).
        - Multi-step input: ``[T, N, *]``; output: same shape.

    Examples:
        >>> node = IFNode(v_reset=None)
        >>> [node(torch.tensor([0.6])).item() for _ in range(3)]
        [0.0, 1.0, 0.0]
        >>> node.reset()
        >>> IFNode(v_reset=None, v_init=0.5)(torch.tensor([0.6])).item()
        1.0
        >>> burst = IFNode(v_reset=None, burst=4)
        >>> [burst(torch.tensor([2.7])).item() for _ in range(2)]
        [2.0, 3.0]
        >>> signed = IFNode(v_reset=None, signed=True)
        >>> [signed(torch.tensor([x])).item() for x in (1.0, -0.5, -1.0, -1.0)]
        [1.0, -1.0, 0.0, 0.0]
    """

    v: float | torch.Tensor
    count: float | torch.Tensor
    burst: int
    signed: bool
    store_v_seq: bool
    step_mode: str
    backend: str
    detach_reset: bool
    surrogate_function: Callable[[torch.Tensor], torch.Tensor]
    spike_unit = 1.0

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
        *,
        burst: int = 1,
        signed: bool = False,
    ) -> None:
        super().__init__()
        self.v_threshold: float | torch.Tensor = _check_potential("v_threshold", v_threshold, positive=True)
        self.v_reset: float | torch.Tensor | None = (
            None if v_reset is None else _check_potential("v_reset", v_reset, positive=False)
        )
        self.v_init: float | torch.Tensor | None = None
        if isinstance(v_init, torch.Tensor) and v_init.dim() > 0:
            self.set_v_init(v_init)
        elif v_init is not None:
            self.v_init = float(_check_potential("v_init", v_init, positive=False))
        if isinstance(burst, bool) or not isinstance(burst, numbers.Integral) or burst < 1:
            raise ValueError(f"burst must be a positive int (1: one spike per step), but got {burst!r}.")
        if not isinstance(signed, bool):
            raise TypeError(f"signed must be a bool, but got {signed!r}.")
        if (burst > 1 or signed) and self.v_reset is not None:
            raise ValueError(
                f"burst={burst} and signed={signed} need the soft reset (v_reset=None), but got "
                f"v_reset={self.v_reset!r}."
            )
        self.burst = int(burst)
        self.signed = signed
        self.count = 0.0
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
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _initial_v(self) -> float:
        v_init = self.v_init
        if isinstance(v_init, torch.Tensor):
            return 0.0  # a placeholder: _prepare_v expands the tensor to the input's shape
        if v_init is not None:
            return v_init
        return 0.0 if self.v_reset is None else float(self.v_reset)

    def reset(self) -> None:
        """Return the membrane potential (a Python float until the next input) and the spike count to their
        initial values."""
        self.v = self._initial_v()
        self.count = 0.0
        self.v_seq = None

    def _prepare_v(self, x: torch.Tensor) -> torch.Tensor:
        v = self.v
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            # A new input shape (first call, or another batch size) starts from the initial potential.
            if isinstance(self.v_init, torch.Tensor):
                return self.v_init.to(dtype=x.dtype, device=x.device).expand_as(x).clone()
            return torch.full_like(x, self._initial_v())
        if v.dtype != x.dtype or v.device != x.device:
            v = v.to(dtype=x.dtype, device=x.device)
        return v

    def _prepare_count(self, x: torch.Tensor) -> torch.Tensor:
        count = self.count
        if not isinstance(count, torch.Tensor) or count.shape != x.shape:
            return torch.zeros_like(x)
        return count.to(dtype=x.dtype, device=x.device)

    def _fire_(self, v: torch.Tensor, out: torch.Tensor, threshold: float | torch.Tensor) -> None:
        """Soft-reset inference step on an integrated ``v`` (in place): spike counts into ``out``."""
        tensor = isinstance(threshold, torch.Tensor)
        if self.burst == 1:
            torch.ge(v, threshold, out=out)
        else:
            if tensor or threshold != 1.0:
                torch.div(v, threshold, out=out)
                out.floor_()
            else:
                torch.floor(v, out=out)
            out.clamp_(0, self.burst)
        if tensor:
            v.sub_(out * threshold)
        else:
            v.sub_(out, alpha=threshold)  # type: ignore[arg-type]
        if self.signed:
            count = self._prepare_count(v)
            # Float comparisons (bool tensors are slow on CPU): 1 where v < 0, then min with the integer count
            # keeps it only where the count is positive.
            negative = torch.lt(v, 0, out=torch.empty_like(v))
            torch.minimum(negative, count, out=negative)
            out.sub_(negative)
            if tensor:
                v.add_(negative * threshold)
            else:
                v.add_(negative, alpha=threshold)  # type: ignore[arg-type]
            count.add_(out)
            self.count = count

    def _fire(self, v: torch.Tensor, threshold: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Out-of-place burst/signed step (autograd-safe; the count itself carries no gradient)."""
        with torch.no_grad():
            k = torch.floor(v / threshold).clamp_(0, self.burst)
        v = v - k * threshold
        if self.signed:
            count = self._prepare_count(v)
            negative = ((v.detach() < 0) & (count > 0)).to(v.dtype)
            k = k - negative
            v = v + negative * threshold
            self.count = count + k
        return k, v

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        """One time step: integrate ``x``, fire, reset. Input and output ``[N, *]``."""
        v = self._prepare_v(x)
        threshold = self.v_threshold
        differentiable = torch.is_grad_enabled() and (x.requires_grad or v.requires_grad)
        if (self.training or differentiable) and (self.burst > 1 or self.signed):
            spike, v = self._fire(v + x, threshold)
        elif self.training or differentiable:
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
                self._fire_(v, spike, threshold)
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
            self._fire_(v, out[t], threshold)
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
        if isinstance(self.v_init, torch.Tensor):
            text += f", v_init=<tensor of shape {tuple(self.v_init.shape)}>"
        elif self.v_init is not None:
            text += f", v_init={self.v_init}"
        if self.burst != 1:
            text += f", burst={self.burst}"
        if self.signed:
            text += ", signed=True"
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

"""Integrate-and-fire neurons for converted SNNs, and ``reset_net``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ann2snn_fx._numbers import as_real
from ann2snn_fx.snn._checks import check_neuron_options, check_potential
from ann2snn_fx.snn.dynamics import integrate_and_fire
from ann2snn_fx.snn.low_latency import LowLatencyState
from ann2snn_fx.snn.sequence import SequenceSteps

__all__ = ["IFNode", "SigmoidSurrogate", "reset_net"]


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
        value = as_real(alpha)
        if value is None or not math.isfinite(value):
            raise TypeError(f"alpha must be a finite real number, but got {alpha!r}.")
        self.alpha = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _HeavisideSigmoid.apply(x, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class IFNode(LowLatencyState, SequenceSteps, nn.Module):
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

    The output is a signed spike count (``spike_unit = 1.0``). With ``burst > 1`` or ``signed`` the count
    carries no surrogate gradient.

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
    burst: int
    signed: bool
    step_mode: str
    backend: str
    detach_reset: bool
    surrogate_function: Callable[[torch.Tensor], torch.Tensor]
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
        *,
        burst: int = 1,
        signed: bool = False,
    ) -> None:
        super().__init__()
        self.v_threshold: float | torch.Tensor = check_potential("v_threshold", v_threshold, positive=True)
        self.v_reset: float | torch.Tensor | None = (
            None if v_reset is None else check_potential("v_reset", v_reset, positive=False)
        )
        self.v_init: float | torch.Tensor | None = None
        if isinstance(v_init, torch.Tensor) and v_init.dim() > 0:
            self.set_v_init(v_init)
        elif v_init is not None:
            self.v_init = float(check_potential("v_init", v_init, positive=False))
        self._set_low_latency_options(burst, signed)
        check_neuron_options(
            detach_reset=detach_reset,
            step_mode=step_mode,
            backend=backend,
            store_v_seq=store_v_seq,
            surrogate_function=surrogate_function,
        )
        if surrogate_function is None:
            surrogate_function = SigmoidSurrogate(alpha=4.0)
        self.surrogate_function = surrogate_function
        self.detach_reset = detach_reset
        self.step_mode = step_mode
        self.backend = backend
        self.store_v_seq = store_v_seq
        self.v = self._initial_v()
        self.v_seq: torch.Tensor | None = None

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

    def _reset_into(self, buffer: torch.Tensor) -> None:
        """:meth:`reset`, with the initial potential written into ``buffer`` (a tensor the caller gives up,
        shaped like the next input): the next run integrates into it instead of a new tensor."""
        self.reset()
        if isinstance(self.v_init, torch.Tensor):
            buffer.copy_(self.v_init.expand_as(buffer))
        else:
            buffer.fill_(self._initial_v())
        self.v = buffer

    def _prepare_v(self, x: torch.Tensor) -> torch.Tensor:
        v = self.v
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            # A new input shape (first call, or another batch size) starts from the initial potential.
            if isinstance(self.v_init, torch.Tensor):
                # laid out as the input (a channels-last input gets a channels-last membrane)
                return torch.empty_like(x).copy_(self.v_init.expand_as(x))
            return torch.full_like(x, self._initial_v())
        if v.dtype != x.dtype or v.device != x.device:
            v = v.to(dtype=x.dtype, device=x.device)
        return v

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        """One time step: integrate ``x``, fire, reset. Input and output ``[N, *]``."""
        v = self._prepare_v(x)
        if self.burst > 1 or self.signed:
            return self._burst_signed_step(v, x)
        spike, v = integrate_and_fire(
            v,
            x,
            self.v_threshold,
            self.v_reset,
            surrogate=self.surrogate_function,
            training=self.training,
            detach_reset=self.detach_reset,
        )
        self.v = v
        return spike

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

"""QANN -> spike-driven SNN: :func:`qann_to_snn` and :class:`SpikeZIPSNN`."""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from collections.abc import Collection, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ann2snn_fx.spikezip.qann import QANN, _DecomposedMHA
from ann2snn_fx.td import TDTimeFolded
from ann2snn_fx.td.fold import _CURRENT_MODE  # the running fold mode (package-internal handle)
from ann2snn_ops import STBIFNeuron

__all__ = ["SpikeZIPSNN", "qann_to_snn"]


class _SpikingQANN(nn.Module):
    """The QANN with every quantiser site answered by its ST-BIF neuron on the unfolded ``[T, B, ...]`` view."""

    def __init__(self, qann: QANN) -> None:
        super().__init__()
        self.qann = qann
        self.neurons = nn.ModuleDict(
            {key: STBIFNeuron.from_quantizer(q) for key, q in qann.quantizers.items()}  # type: ignore[arg-type]
        )

    def _site(
        self, key: str, module: str, op: str, operand: str, signed: bool, x: torch.Tensor
    ) -> torch.Tensor:
        neuron = self.neurons[key] if key in self.neurons else None  # noqa: SIM401 - ModuleDict has no get
        if neuron is None:
            raise RuntimeError(
                f"SpikeZIPSNN: the forward reached a product operand the QANN never quantised ({key})."
            )
        mode = _CURRENT_MODE.get()
        if mode is None or not mode.is_time(x):
            raise RuntimeError(
                f"SpikeZIPSNN: the operand at {key} is not time-varying; run through SpikeZIPSNN."
            )
        dim = mode.batch_dim(x) or 0
        with torch._C.DisableTorchFunction():
            out = neuron(mode.unfold(x.movedim(dim, 0))).flatten(0, 1).movedim(0, dim)
        mode.done(STBIFNeuron, "quantiser -> STBIFNeuron")
        mode.mark(out, dim)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.qann._site = self._site  # type: ignore[method-assign]
        return self.qann(*args, **kwargs)


_CHUNK_ELEMENTS = 2**20
"""``batch_chunk="auto"``: the largest batch slice whose first time input holds at most this many elements."""


def _batch_chunk(value: Any) -> int | str | None:
    if value is None or value == "auto":
        return value  # type: ignore[no-any-return]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"SpikeZIPSNN: batch_chunk must be 'auto', None or a positive integer, but got {value!r}."
        )
    return int(value)


def _steps(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"SpikeZIPSNN.run_until_quiet: {name} must be a positive integer, but got {value!r}."
        )
    return int(value)


class SpikeZIPSNN(TDTimeFolded):
    """The spike-driven SNN of a QANN (made by :func:`qann_to_snn`); a :class:`~ann2snn_fx.TDTimeFolded`.

    Every quantiser is an :class:`~ann2snn_ops.STBIFNeuron`; softmax, norms, GELU ... are TD operators;
    biases, constants, position embeddings and the attention mask enter once at t = 0. Inputs and outputs
    follow the TD convention: time inputs ``[T, B, ...]`` (the QANN's input at t = 0 and zeros after, or any
    sequence summing to it), outputs ``[T, B, ...]`` whose cumulative sum equals the QANN's output once
    every neuron is quiet. Weight layers run once on the time-folded ``[T*B, ...]`` batch.

    Samples never interact, so a forward runs the batch in slices of :attr:`batch_chunk` samples, one after
    the other (each slice's ``[T*b, ...]`` activations stay in cache; same arithmetic per sample, so the
    same outputs): time inputs are sliced on their batch dim 1, static tensor inputs whose leading dim is
    the batch on dim 0 (those ``TDTimeFolded`` repeats per sample), and the ``[T, b, ...]`` outputs are
    concatenated on dim 1.

    Attributes:
        settle_steps: After a forward, the number of steps until every neuron was quiet (no input, no
            spike), or None if some neuron was still active at the last step.
        batch_chunk: Samples per slice: ``"auto"`` (default: the most whose first time input holds at most
            2**20 elements, at least one), a positive integer, or None (the whole batch at once). A model
            with a sequence-first ``nn.MultiheadAttention`` (inputs ``[T, L, B, ...]``) always runs whole.
    """

    settle_steps: int | None

    def __init__(
        self,
        qann: QANN,
        *,
        time_inputs: Collection[int | str] | None = None,
        batch_chunk: int | str | None = "auto",
    ) -> None:
        first = next(qann.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        # no shape probe: its extra forward on one step's batch would drive the stateful neurons
        super().__init__(
            _SpikingQANN(copy.deepcopy(qann)), device, time_inputs=time_inputs, shape_check=False
        )
        self.settle_steps = None
        self.batch_chunk = _batch_chunk(batch_chunk)
        # a sequence-first attention takes the sequence on the inputs' dim 1: no batch there to slice
        self._sequence_first = any(
            isinstance(m, _DecomposedMHA) and not m.batch_first for m in self.modules()
        )

    @contextlib.contextmanager
    def whole_batch(self) -> Iterator[None]:
        """Within the block, a forward runs the whole batch at once (for hooks that see one call per forward)."""
        saved, self.batch_chunk = self.batch_chunk, None
        try:
            yield
        finally:
            self.batch_chunk = saved

    def _chunk_size(self, times: list[Any]) -> int | None:
        """Samples per slice for these time inputs, or None to run the whole batch at once."""
        chunk = _batch_chunk(self.batch_chunk)
        if chunk is None or self._sequence_first or not times or times[0].dim() < 2:
            return None  # (no [T, B, ...] time input: TDTimeFolded raises its own error)
        batch = times[0].shape[1]
        if chunk == "auto":
            per_sample = max(math.prod(times[0].shape) // max(batch, 1), 1)
            chunk = max(_CHUNK_ELEMENTS // per_sample, 1)
        return None if chunk >= batch else int(chunk)

    def neurons(self) -> list[STBIFNeuron]:
        """The ST-BIF neurons, one per quantiser site."""
        return [m for m in self.modules() if isinstance(m, STBIFNeuron)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run ``T`` steps at once (the TD convention), in batch slices; sets :attr:`settle_steps`."""
        items: list[tuple[int | str, Any]] = [*enumerate(args), *kwargs.items()]
        times = {k: v for k, v in items if self._is_time(k, v)}
        chunk = self._chunk_size(list(times.values()))
        if chunk is None:
            return self._forward_whole(*args, **kwargs)
        steps, batch = next(iter(times.values())).shape[:2]

        def part(key: int | str, value: Any, start: int) -> Any:
            if key in times:
                return value[:, start : start + chunk]
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
                return value[start : start + chunk]
            return value

        flat, settles = [], []
        for start in range(0, batch, chunk):
            out = self._forward_whole(
                *[part(i, v, start) for i, v in enumerate(args)],
                **{k: part(k, v, start) for k, v in kwargs.items()},
            )
            leaves, spec = pytree.tree_flatten(out)
            if start == 0 and not all(
                isinstance(leaf, torch.Tensor) and leaf.dim() >= 2 and tuple(leaf.shape[:2]) == (steps, chunk)
                for leaf in leaves
            ):  # an output without the [T, B] layout: no safe way to join slices, so run the batch whole
                return self._forward_whole(*args, **kwargs)
            flat.append(leaves)
            settles.append(self.settle_steps)
        joined = [torch.cat(parts, dim=1) for parts in zip(*flat, strict=True)]
        self.settle_steps = None if any(s is None for s in settles) else max(settles)  # type: ignore[type-var]
        return pytree.tree_unflatten(joined, spec)

    def _forward_whole(self, *args: Any, **kwargs: Any) -> Any:
        for neuron in self.neurons():
            neuron.activity = None
        out = super().forward(*args, **kwargs)
        activity = [n.activity for n in self.neurons() if n.activity is not None]
        self.settle_steps = 0
        for act in activity:
            active = torch.nonzero(act)
            last = int(active.max()) + 1 if active.numel() else 0
            if last == act.shape[0]:
                self.settle_steps = None
                break
            self.settle_steps = max(self.settle_steps, last)
        return out

    def run_until_quiet(
        self, *args: Any, max_steps: int = 1024, start_steps: int = 32, **kwargs: Any
    ) -> tuple[Any, int]:
        """Feed the QANN's inputs once at t = 0 and run until every neuron is quiet, at most ``max_steps``.

        The step count doubles from ``start_steps`` until a run ends quiet (each try from scratch).

        Args:
            *args, **kwargs: The QANN's inputs, without a time axis (time inputs as chosen at conversion).
            max_steps: The cap.
            start_steps: The first try.

        Returns:
            ``(output, steps)``: the cumulative output at the step where the network went quiet (equal to
            the QANN's output), and that number of steps (``max_steps`` if it never went quiet).
        """
        cap = _steps(max_steps, "max_steps")
        steps = min(_steps(start_steps, "start_steps"), cap)
        items: list[tuple[int | str, Any]] = [*enumerate(args), *kwargs.items()]
        times = {key for key, value in items if self._is_time(key, value)}
        while True:

            def encode(key: int | str, value: Any, steps: int = steps) -> Any:
                if key not in times:
                    return value
                return torch.cat([value.unsqueeze(0), value.new_zeros(steps - 1, *value.shape)])

            out = self(
                *[encode(i, v) for i, v in enumerate(args)], **{k: encode(k, v) for k, v in kwargs.items()}
            )
            if self.settle_steps is not None or steps >= cap:
                used = steps if self.settle_steps is None else max(self.settle_steps, 1)
                return pytree.tree_map(
                    lambda v, k=used: v.cumsum(0)[k - 1] if isinstance(v, torch.Tensor) else v, out
                ), used
            steps = min(2 * steps, cap)


def qann_to_snn(
    qann: QANN,
    *,
    time_inputs: Collection[int | str] | None = None,
    batch_chunk: int | str | None = "auto",
) -> SpikeZIPSNN:
    """Convert a calibrated or trained :class:`QANN` into its spike-driven SNN.

    Quantisers become :class:`~ann2snn_ops.STBIFNeuron` (same step and bounds), so every weight layer and
    product after the first receives ternary spikes ``{-s, 0, s}``; the rest is the TD path
    (:class:`~ann2snn_fx.TDTimeFolded`): nonlinear ops become TD operators, biases and constants (and the
    attention mask) enter once at t = 0. The QANN is copied, never changed.

    Args:
        qann: From :func:`~ann2snn_fx.prepare_qann`, with every quantiser's step set.
        time_inputs: Which forward arguments are time sequences (as for ``TDTimeFolded``); default every
            floating-point tensor argument.
        batch_chunk: Samples per batch slice of a forward (:attr:`SpikeZIPSNN.batch_chunk`): ``"auto"``
            (slices of about 2**20 input elements, activations in cache), a positive integer, or None.

    Returns:
        The :class:`SpikeZIPSNN`. ``snn(x_seq)`` runs a fixed ``T``; ``snn.run_until_quiet(x)`` runs until
        every neuron is quiet and returns the steps used; ``snn.report`` is the TD report.

    Raises:
        TypeError: ``qann`` is not a :class:`QANN`.
        RuntimeError: A quantiser was never calibrated or trained, or the QANN never ran (no placement).

    Examples:
        >>> import torch
        >>> from ann2snn_fx import calibrate_qann, prepare_qann, qann_to_snn
        >>> _ = torch.manual_seed(0)
        >>> ann = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2)).eval()
        >>> x = torch.randn(16, 4)
        >>> qann = calibrate_qann(prepare_qann(ann, levels=8, example_inputs=x), [x])
        >>> snn = qann_to_snn(qann)
        >>> out, steps = snn.run_until_quiet(x)
        >>> torch.allclose(out, qann(x), rtol=1e-5, atol=1e-6), steps <= 9
        (True, True)
    """
    if not isinstance(qann, QANN):
        raise TypeError(f"qann_to_snn expects a QANN from prepare_qann, but got {type(qann).__name__}.")
    if not qann.placed:
        raise RuntimeError(
            "qann_to_snn: the QANN's quantisers are not placed yet (prepare_qann without example_inputs "
            "places them on the first forward); run calibrate_qann or train the QANN first."
        )
    for key, quantizer in qann.quantizers.items():
        if not bool(quantizer.initialized):
            raise RuntimeError(
                f"qann_to_snn: the quantiser at {key} has no step yet; run calibrate_qann or train the QANN first."
            )
    return SpikeZIPSNN(qann, time_inputs=time_inputs, batch_chunk=batch_chunk)

"""``profile_snn``: spike, operation and energy accounting of one SNN run; ``profile_sweep`` over several T."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from ann2snn_fx.analysis._folded import FoldedAccounting
from ann2snn_fx.analysis._graph import GraphInfo, Opaque, analyse, fanout_map, is_neuron, spike_source
from ann2snn_fx.analysis._hooks import EventCounter, Instrumentation
from ann2snn_fx.analysis.energy import FP32_45NM, INT8_45NM, EnergyModel
from ann2snn_fx.analysis.records import LayerRecord, SNNProfile
from ann2snn_fx.neuron import reset_net
from ann2snn_fx.runner import run_snn
from ann2snn_fx.spikezip import SpikeZIPSNN
from ann2snn_fx.td import TDTimeFolded

__all__ = ["profile_snn", "profile_sweep"]

_MODES = ("step", "multi", "sequence")


def _check(snn: object, inputs: object, time_steps: object, mode: object, labels: object) -> int:
    if not isinstance(snn, fx.GraphModule):
        raise TypeError(
            f"snn must be an fx.GraphModule (a converted SNN, or ann2snn_fx.trace_model(model)), a TDTimeFolded "
            f"or a SpikeZIPSNN, but got {type(snn).__name__}."
        )
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, but got {mode!r}.")
    steps = _positive_steps(time_steps)
    need = 2 if mode == "sequence" else 1
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < need:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        what = "[T, B, *]" if mode == "sequence" else "[B, *]"
        raise ValueError(f"inputs must be a tensor {what} for mode={mode!r}, but got {shape}.")
    if mode == "sequence" and inputs.shape[0] != steps:
        raise ValueError(
            f"mode='sequence' needs inputs [T, B, *] with T == time_steps ({time_steps}), but got shape "
            f"{tuple(inputs.shape)}."
        )
    batch = int(inputs.shape[1] if mode == "sequence" else inputs.shape[0])
    _check_labels(labels, batch)
    return batch


def _positive_steps(time_steps: object) -> int:
    if isinstance(time_steps, bool) or not isinstance(time_steps, numbers.Integral) or int(time_steps) < 1:
        raise ValueError(f"time_steps must be a positive integer, but got {time_steps!r}.")
    return int(time_steps)


def _check_labels(labels: object, batch: int) -> None:
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != (batch,)):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a tensor of shape ({batch},) (one per sample), but got {shape}.")


def _run(snn: fx.GraphModule, inputs: torch.Tensor, t: int, mode: str, chunk: int | None) -> torch.Tensor:
    """The SNN's output after ``t`` steps (running mean, or the cumulative sum for sequences)."""
    if mode == "sequence":
        with torch.no_grad():
            reset_net(snn)
            out = snn(inputs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"profile_snn supports models returning one tensor, but got {type(out).__name__}."
            )
        return out.sum(0)
    return run_snn(snn, inputs, t, multi_step=mode == "multi", chunk_elements=chunk)[-1]


def profile_snn(
    snn: fx.GraphModule | TDTimeFolded,
    inputs: torch.Tensor | tuple[Any, ...] | dict[str, Any],
    time_steps: int,
    *,
    mode: str | None = None,
    labels: torch.Tensor | None = None,
    energy_models: Sequence[EnergyModel] = (FP32_45NM, INT8_45NM),
    chunk_elements: int | None = 2**18,
) -> SNNProfile:
    """Run ``snn`` once under ``torch.no_grad()`` and count its spikes, synaptic operations, MACs and energy.

    Every neuron (any module with a ``spike_unit``: ``output / spike_unit`` is its signed event count)
    gets a temporary event counter, every counted layer a shape probe; all of them are removed when the run
    ends, also when it fails. The network is reset first (``reset_net``), so the profile does not depend on
    earlier runs. Counts are per inference (per sample, summed over the ``T`` steps); see
    :class:`~ann2snn_fx.analysis.LayerRecord` for every column and ``docs/guides/accounting.md`` for the
    conventions and their limits.

    A :class:`~ann2snn_fx.TDTimeFolded` or :class:`~ann2snn_fx.SpikeZIPSNN` (spike-driven transformers,
    Hugging Face models) is not an fx graph: it is profiled per call site instead (every ``F.linear``, conv,
    ``mm``/``addmm``, ``matmul``/``bmm``, norm and TD product the forward makes), an operand counting as spikes
    when it is a view of a neuron's output (see the accounting guide).

    Args:
        snn: The SNN: an ``fx.GraphModule`` (what the converters return), a ``TDTimeFolded`` or a
            ``SpikeZIPSNN``.
        inputs: The batch: ``[B, *]`` fed at every step (``mode="step"`` or ``"multi"``), or the whole
            sequence ``[T, B, *]`` (``mode="sequence"``: TD and spike-driven transformers). For a
            ``TDTimeFolded``/``SpikeZIPSNN`` the forward's arguments: a tensor, a tuple of positional
            arguments or a dict of keyword arguments, with the time inputs ``[T, B, *]``.
        time_steps: ``T``.
        mode: ``"step"`` (one call per step, ``run_snn``), ``"multi"`` (``run_snn(multi_step=True)``) or
            ``"sequence"`` (one call on ``[T, B, *]``). The counts are the same in the first two. Default
            (None): ``"step"`` for fx graphs, ``"sequence"`` (the only one) for time-folded models.
        labels: Class labels ``[B]``; the profile then records the accuracy of the output after ``T`` steps.
        energy_models: The constants of the energy tables (default fp32 and int8, 45 nm, Horowitz 2014).
        chunk_elements: Chunking of the multi-step execution (see :class:`~ann2snn_fx.MultiStepSNN`).

    Returns:
        An :class:`~ann2snn_fx.analysis.SNNProfile` (records, totals, ``energy()``, ``to_markdown()``,
        ``to_csv()``).

    Raises:
        TypeError: ``snn`` is not an ``fx.GraphModule``, ``TDTimeFolded`` or ``SpikeZIPSNN``.
        ValueError: A bad ``mode``, ``time_steps``, input or label shape.

    Examples:
        >>> from ann2snn_fx import IFNode, trace_model
        >>> snn = trace_model(nn.Sequential(IFNode(v_reset=None), nn.Linear(2, 3)))
        >>> profile = profile_snn(snn, torch.tensor([[0.5, 1.0]]), 4)
        >>> [(r.name, r.role, r.events, r.sop) for r in profile.layers]
        [('0', 'neuron', 6.0, 0.0), ('1', 'spikes', 0.0, 18.0)]

        A spike-driven network (the first layer is fed the analog input, the second ST-BIF spikes):

        >>> from ann2snn_fx import calibrate_qann, prepare_qann, qann_to_snn
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(4, 3)
        >>> ann = nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 2)).eval()
        >>> snn = qann_to_snn(calibrate_qann(prepare_qann(ann, 8, example_inputs=x), [x]))
        >>> x_seq = torch.cat([x[None], torch.zeros(9, 4, 3)])  # input at t = 0, zeros after
        >>> [(r.name, r.role) for r in profile_snn(snn, x_seq, 10).layers]
        [('0', 'analog'), ('2:linear0:x', 'neuron'), ('2', 'spikes')]
    """
    models = tuple(energy_models)
    if not models or not all(isinstance(m, EnergyModel) for m in models):
        raise TypeError(
            f"energy_models must be a non-empty sequence of EnergyModel, but got {energy_models!r}."
        )
    if isinstance(snn, TDTimeFolded):
        t = _positive_steps(time_steps)
        batch = _folded_batch(snn, inputs, t, mode)
        _check_labels(labels, batch)
        return _profile_folded(snn, inputs, t, batch, labels, models)
    mode = "step" if mode is None else mode
    batch = _check(snn, inputs, time_steps, mode, labels)
    assert isinstance(inputs, torch.Tensor)  # checked by _check
    t = int(time_steps)
    info = analyse(snn)
    neurons = {str(n.target): info.modules[str(n.target)] for n in info.neurons}
    layers = {str(n.target): (info.modules[str(n.target)], kind) for n, kind in info.layers}
    with Instrumentation(neurons, layers, mode == "sequence", batch) as inst:
        final = _run(snn, inputs, t, mode, chunk_elements)
    profile = SNNProfile(t, batch, mode, energy_models=models)
    if labels is not None:
        profile.accuracy = float((final.argmax(-1) == labels.to(final.device)).float().mean())
    _records(profile, info, inst, mode)
    return profile


def _records(profile: SNNProfile, info: GraphInfo, inst: Instrumentation, mode: str) -> None:
    leading = 2 if mode == "sequence" else 1
    rows: list[tuple[int, LayerRecord]] = []
    for node in info.neurons:
        record = neuron_record(str(node.target), inst.counters[str(node.target)], profile)
        if record is not None:
            rows.append((info.order[node], record))
    for node, kind in info.layers:
        name = str(node.target)
        module = info.modules[name]
        per_step = inst.probes[name].per_step
        if per_step is None:
            profile.notes.append(f"layer {name!r} was never called in this run; it has no row.")
            continue
        record = _layer_record(node, kind, module, per_step, profile, info, inst, leading, mode)
        rows.append((info.order[node], record))
    profile.layers = [record for _, record in sorted(rows, key=lambda item: item[0])]
    profile.notes.append(
        "functional calls (F.linear, torch.matmul, ...) and elementwise ops are not counted on either side."
    )


def neuron_record(name: str, counter: EventCounter, profile: SNNProfile) -> LayerRecord | None:
    """The row of one neuron layer (None, with a note, if it never ran)."""
    t, batch = profile.time_steps, profile.batch_size
    magnitude = counter.magnitude
    if magnitude is None or counter.signed is None:
        profile.notes.append(f"neuron {name!r} was never called in this run; it has no row.")
        return None
    n = magnitude[0].numel()
    total = float(magnitude.sum()) / batch
    signed = float(counter.signed.sum()) / batch
    pos, neg = (total + signed) / 2, (total - signed) / 2
    silent = float((magnitude == 0).float().mean())
    return LayerRecord(
        name, type(counter.module).__name__, "neuron", neurons=n, events_pos=pos, events_neg=neg,
        firing_rate=total / (n * t), silent_fraction=silent, state_adds=n * t + total, state_compares=float(n * t),
    )  # fmt: skip


def _layer_record(
    node: fx.Node, kind: str, module: nn.Module, per_step: float, profile: SNNProfile, info: GraphInfo,
    inst: Instrumentation, leading: int, mode: str,
) -> LayerRecord:  # fmt: skip
    t, batch = profile.time_steps, profile.batch_size
    name, op = str(node.target), type(module).__name__
    reason = "analog operands"
    if kind in ("linear", "conv"):
        source, chain, reason = spike_source(node, info.modules)
        counter = inst.counters.get(str(source.target)) if source is not None else None
        if source is not None and counter is not None and counter.magnitude is None:
            raise RuntimeError(
                f"layer {name!r} ran but its input neuron {source.target!r} emitted nothing the event counter "
                "saw: the runner called the neuron through an entry point the accounting does not wrap "
                "(forward, multi_step_forward, _inference_sequence), so its events cannot be counted."
            )
        if source is not None and counter is not None and counter.magnitude is not None:
            try:
                fan = fanout_map(tuple(counter.magnitude.shape[1:]), leading, chain, node, kind, info.modules)
            except Opaque as error:
                reason = (
                    f"events of {source.target!r} reach it through an op the accounting cannot fold: {error}"
                )
            else:
                sop = float((counter.magnitude.sum(0) * fan.to(counter.magnitude.device)).sum()) / batch
                return LayerRecord(
                    name,
                    op,
                    "spikes",
                    str(source.target),
                    synapses=float(fan.sum()),
                    sop=sop,
                    ann_mac=per_step,
                )
    if node in info.static and mode != "sequence":
        return LayerRecord(name, op, "analog, once", "time-invariant input", mac=per_step, ann_mac=per_step)
    return LayerRecord(name, op, "analog", reason, mac=per_step * t, ann_mac=per_step)


def _call(snn: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return snn(**inputs)
    return snn(*inputs) if isinstance(inputs, tuple) else snn(inputs)


def _folded_batch(snn: TDTimeFolded, inputs: object, time_steps: int, mode: object) -> int:
    if mode not in (None, "sequence"):
        raise ValueError(
            f"a {type(snn).__name__} runs whole sequences: mode must be 'sequence' (or None), but got {mode!r}."
        )
    items: list[tuple[Any, Any]] = (
        list(inputs.items()) if isinstance(inputs, dict)
        else list(enumerate(inputs)) if isinstance(inputs, tuple) else [(0, inputs)]
    )  # fmt: skip
    times: list[torch.Tensor] = [v for k, v in items if snn._is_time(k, v)]
    if not times or times[0].dim() < 2 or times[0].shape[0] != time_steps:
        shape = tuple(times[0].shape) if times else None
        raise ValueError(
            f"inputs of a {type(snn).__name__} must hold a time sequence [T, B, *] with T == time_steps "
            f"({time_steps}) (a tensor, a tuple of args or a dict of kwargs), but got time input shape {shape}."
        )
    return int(times[0].shape[1])


def _profile_folded(
    snn: TDTimeFolded,
    inputs: Any,
    t: int,
    batch: int,
    labels: torch.Tensor | None,
    models: tuple[EnergyModel, ...],
) -> SNNProfile:
    """The accounting of a :class:`~ann2snn_fx.TDTimeFolded` (or spike-driven ``SpikeZIPSNN``) run."""
    wrapped: Any = snn.model
    root: nn.Module = wrapped.qann.model if isinstance(snn, SpikeZIPSNN) else wrapped
    modules = dict(root.named_modules())
    neurons = {id(m): n for n, m in snn.named_modules() if is_neuron(m)}
    if isinstance(snn, SpikeZIPSNN):
        neurons = {id(m): key for key, m in wrapped.neurons.items()}
    acc = FoldedAccounting(modules, neurons, t, batch)
    whole = snn.whole_batch() if isinstance(snn, SpikeZIPSNN) else contextlib.nullcontext()
    with torch.no_grad(), acc, whole:  # one forward of the whole batch, as the accounting expects
        out = _call(snn, inputs)
    profile = SNNProfile(t, batch, "sequence", energy_models=models)
    if labels is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"labels need a model returning one tensor, but got {type(out).__name__}.")
        final = out.sum(0)
        profile.accuracy = float((final.argmax(-1) == labels.to(final.device)).float().mean())
    rows: list[tuple[int, LayerRecord]] = []
    for name, counter in acc.counters.items():
        record = neuron_record(name, counter, profile)
        if record is not None:
            rows.append((acc.neuron_order[name], record))
    for name, row in acc.rows.items():
        ann = row.mac / (t * batch)
        if row.spikes:
            rec = LayerRecord(
                name, row.op, "spikes", row.source, synapses=row.synapses, sop=row.sop / batch, ann_mac=ann
            )
        else:
            rec = LayerRecord(name, row.op, "analog", row.source, mac=row.mac / batch, ann_mac=ann)
        rows.append((row.order, rec))
    profile.layers = [record for _, record in sorted(rows, key=lambda item: item[0])]
    profile.notes.append(
        "time-folded model: counted per call site (F.linear, conv, mm/addmm, matmul/bmm, norms, TD products); "
        "elementwise ops, softmax and other TD operators are not counted on either side."
    )
    return profile


def profile_sweep(
    snn: fx.GraphModule,
    inputs: torch.Tensor,
    time_steps: Iterable[int],
    *,
    labels: torch.Tensor | None = None,
    mode: str = "multi",
    energy_models: Sequence[EnergyModel] = (FP32_45NM, INT8_45NM),
) -> list[SNNProfile]:
    """:func:`profile_snn` at each ``T`` of ``time_steps`` (for accuracy and energy against ``T``).

    Examples:
        >>> from ann2snn_fx import IFNode, trace_model
        >>> snn = trace_model(nn.Sequential(IFNode(v_reset=None), nn.Linear(2, 3)))
        >>> [p.sop for p in profile_sweep(snn, torch.tensor([[0.5, 1.0]]), [2, 4])]
        [9.0, 18.0]
    """
    steps = list(time_steps)
    if not steps:
        raise ValueError("time_steps must name at least one T, but got an empty sequence.")
    if mode == "sequence":
        raise ValueError(
            "profile_sweep feeds a constant input; mode must be 'step' or 'multi', not 'sequence'."
        )
    return [profile_snn(snn, inputs, t, mode=mode, labels=labels, energy_models=energy_models) for t in steps]

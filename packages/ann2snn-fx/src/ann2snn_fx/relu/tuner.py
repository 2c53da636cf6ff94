"""A latency tuner: search the ReLU -> IF options for the best accuracy at each number of time steps."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import numbers
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from ann2snn_fx.relu import stages
from ann2snn_fx.relu.calibrate import calibrate_snn
from ann2snn_fx.relu.converter import Converter
from ann2snn_fx.relu.factories import NeuronFactory
from ann2snn_fx.relu.thresholds import ThresholdOptimizer
from ann2snn_fx.snn.neurons import IFNode, reset_net
from ann2snn_fx.snn.readout import charge_steps, delay_for

__all__ = ["LatencyRecord", "LatencyResult", "pareto_front", "tune_latency"]


@dataclass(frozen=True)
class LatencyRecord:
    """One configuration evaluated at ``time_steps`` steps on the validation data.

    Attributes:
        time_steps: ``T``.
        accuracy: Top-1 accuracy in percent.
        spikes_per_sample: Spike events per validation sample over the ``T`` steps (a burst of ``k`` is ``k``
            events, a negative spike one; counted on the IFNode outputs).
        mode, strategy, v_init, burst, signed: The conversion options (``strategy`` of
            :class:`~ann2snn_fx.ThresholdOptimizer`; ``"min_error"`` targets ``T · burst`` levels).
        calibration: The :func:`~ann2snn_fx.calibrate_snn` method applied for this ``T``, or ``None``.
        skip_steps: The delayed readout (:func:`~ann2snn_fx.estimate_readout_delay`), 0 for none.
        output_error: Mean squared difference between the SNN's output (averaged over the read-out steps) and
            the ANN's output on the validation data: a continuous measure of how faithful the conversion is,
            which :meth:`LatencyResult.best` uses to break ties in accuracy (``nan`` when not measured).
        ann_agreement: Percent of the calibration samples on which the SNN's prediction (over the read-out
            steps) is the ANN's: measured by :func:`tune_latency` for the records within one validation
            sample of the best at their ``T`` (at most ``tie_break`` of them), ``nan`` for the others.
            :meth:`LatencyResult.best` ranks those near-ties by it.
    """

    time_steps: int
    accuracy: float
    spikes_per_sample: float
    mode: str | float
    strategy: str
    v_init: float
    burst: int
    signed: bool
    calibration: str | None = None
    skip_steps: int = 0
    output_error: float = float("nan")
    ann_agreement: float = float("nan")

    @property
    def label(self) -> str:
        """A short description of the configuration."""
        parts = [self.strategy if self.strategy == "ltb" else f"mode={self.mode}, {self.strategy}"]
        parts.append(f"v_init={self.v_init}")
        if self.burst > 1:
            parts.append(f"burst={self.burst}")
        if self.signed:
            parts.append("signed")
        if self.calibration:
            parts.append(f"calibrate_snn({self.calibration})")
        if self.skip_steps:
            parts.append(f"skip_steps={self.skip_steps}")
        return ", ".join(parts)

    def dominates(self, other: LatencyRecord) -> bool:
        """At most as many steps and spikes and at least the accuracy, strictly better in one."""
        no_worse = (
            self.time_steps <= other.time_steps
            and self.accuracy >= other.accuracy
            and self.spikes_per_sample <= other.spikes_per_sample
        )
        better = (
            self.time_steps < other.time_steps
            or self.accuracy > other.accuracy
            or self.spikes_per_sample < other.spikes_per_sample
        )
        return no_worse and better


def _rank(r: LatencyRecord) -> tuple[float, float, float]:
    error = r.output_error if r.output_error == r.output_error else float("inf")
    return (-r.accuracy, error, r.spikes_per_sample)


def pareto_front(records: Iterable[LatencyRecord]) -> list[LatencyRecord]:
    """The records no other record dominates (fewer steps, fewer spikes, higher accuracy), by T then accuracy."""
    items = list(records)
    front = [r for r in items if not any(o.dominates(r) for o in items)]
    unique = {(r.time_steps, r.accuracy, r.spikes_per_sample): r for r in front}
    return sorted(unique.values(), key=lambda r: (r.time_steps, -r.accuracy, r.spikes_per_sample))


@dataclass
class LatencyResult:
    """What :func:`tune_latency` found.

    Attributes:
        ann_accuracy: The ANN's validation accuracy (percent).
        records: Every evaluated configuration.
        front: The Pareto front of accuracy against T and spike count.
        complete: False when the time budget stopped the search early.
        seconds: Wall time of the search.
        validation_samples: Samples in the validation data (``accuracy`` is measured on them).
        agreement_samples: Calibration samples on which ``ann_agreement`` is measured (0: none measured).
    """

    ann_accuracy: float
    records: list[LatencyRecord] = field(default_factory=list)
    front: list[LatencyRecord] = field(default_factory=list)
    complete: bool = True
    seconds: float = 0.0
    validation_samples: int = 0
    agreement_samples: int = 0

    def best(self, time_steps: int) -> LatencyRecord | None:
        """The record to pick at exactly ``time_steps``: the most accurate, near-ties decided as follows.

        On a small validation split one image is a fraction of a point, so accuracies within one sample of
        each other are not told apart reliably. When :func:`tune_latency` re-ran those near-ties on the
        calibration data (records with an ``ann_agreement``), they are ranked by the pooled score: validation
        samples classified correctly plus calibration samples on which the SNN agrees with the ANN, over all
        those samples (``validation_samples`` and ``agreement_samples``). Otherwise, or on equal scores, the
        higher accuracy wins, then the output closest to the ANN's (lowest ``output_error``, unmeasured
        last), then the fewest spikes. The pick may thus be one validation sample below a record of the
        ``front`` (which ranks by validation accuracy alone).
        """
        at = [r for r in self.records if r.time_steps == time_steps]
        if not at:
            return None
        checked = [r for r in at if r.ann_agreement == r.ann_agreement]
        if checked and self.agreement_samples > 0:
            n_val, n_agree = self.validation_samples, self.agreement_samples

            def pooled(r: LatencyRecord) -> tuple[float, ...]:
                score = (r.accuracy * n_val + r.ann_agreement * n_agree) / (n_val + n_agree)
                return (-round(score, 9), *_rank(r))

            return min(checked, key=pooled)
        return min(at, key=_rank)

    def markdown(self) -> str:
        """The front as a markdown table."""
        lines = [
            "| T | accuracy (%) | vs ANN | spikes / sample | configuration |",
            "|---:|---:|---:|---:|:---|",
        ]
        for r in self.front:
            lines.append(
                f"| {r.time_steps} | {r.accuracy:.2f} | {r.accuracy - self.ann_accuracy:+.2f} | "
                f"{r.spikes_per_sample:.0f} | {r.label} |"
            )
        return "\n".join(lines)

    def as_dicts(self) -> list[dict[str, Any]]:
        """The records as plain dictionaries (for JSON)."""
        return [asdict(r) for r in self.records]

    def plot(self, path: str) -> str:
        """Write accuracy against T (every record, the best per T, the ANN) to ``path``; needs matplotlib
        (``pip install ann2snn-fx[plot]``). Returns ``path``."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("LatencyResult.plot needs matplotlib: pip install 'ann2snn-fx[plot]'.") from exc
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter(
            [r.time_steps for r in self.records],
            [r.accuracy for r in self.records],
            s=8,
            alpha=0.3,
            label="configurations",
        )
        steps = sorted({r.time_steps for r in self.records})
        best = [self.best(t) for t in steps]
        ax.plot(steps, [b.accuracy for b in best if b is not None], "o-", label="best per T")
        ax.axhline(self.ann_accuracy, color="k", linestyle="--", label="ANN")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("time steps T")
        ax.set_ylabel("accuracy (%)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path


def _batches(loader: Iterable[Any], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("val_loader must yield (input, label) pairs.")
        out.append((torch.as_tensor(batch[0]).to(device), torch.as_tensor(batch[1]).to(device)))
    if not out:
        raise ValueError("val_loader yielded no batch.")
    return out


def _evaluate(
    snn: nn.Module, val: list[tuple[torch.Tensor, torch.Tensor]], steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-step correct counts ``[T, N]`` of running means, and spike events per step ``[T]`` (totals)."""
    events: list[float] = []
    handles = [
        m.register_forward_hook(lambda _m, _i, out: events.append(float(out.abs().sum())))
        for m in snn.modules()
        if isinstance(m, IFNode)
    ]
    outputs, labels, spikes = [], [], torch.zeros(steps, dtype=torch.float64)
    try:
        with torch.no_grad():
            for x, y in val:
                reset_net(snn)
                seq = []
                for t in range(steps):
                    events.clear()
                    seq.append(snn(x))
                    spikes[t] += sum(events)
                outputs.append(torch.stack(seq))
                labels.append(y)
    finally:
        for h in handles:
            h.remove()
        reset_net(snn)
    return torch.cat(outputs, 1), torch.cat(labels), spikes


def _accuracy(raw: torch.Tensor, labels: torch.Tensor, t: int, skip: int = 0) -> float:
    mean = raw[skip:t].mean(0)
    return float((mean.argmax(-1) == labels).double().mean() * 100.0)


def _output_error(raw: torch.Tensor, reference: torch.Tensor, t: int, skip: int = 0) -> float:
    """Mean squared difference between the SNN's mean output over steps ``[skip, t)`` and the ANN's output."""
    mean = raw[skip:t].mean(0).double()
    return float((mean - reference.double()).pow(2).mean())


def _check_grid(name: str, values: Any, kinds: tuple[type, ...]) -> tuple[Any, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty sequence, but got {values!r}.")
    return tuple(values)


def tune_latency(
    ann: nn.Module,
    calib_loader: Iterable[Any],
    val_loader: Iterable[Any],
    time_steps: Sequence[int] = (1, 2, 4, 8),
    *,
    modes: Sequence[str | float] = ("max", "99.9%"),
    strategies: Sequence[str] = ("fixed", "min_error", "ltb"),
    v_inits: Sequence[float] = (0.0, 0.5),
    bursts: Sequence[int] = (1, 2, 4),
    signed: Sequence[bool] = (False, True),
    calibrations: Sequence[str | None] = (None, "both"),
    readout_delay: bool = True,
    tie_break: int = 8,
    time_budget: float | None = None,
    num_batches: int | None = None,
    progress: bool = True,
) -> LatencyResult:
    """Evaluate conversion configurations on validation data and return the accuracy/latency Pareto front.

    The search crosses the calibration ``modes``, threshold ``strategies`` (``"ltb"`` once, it has no mode),
    neuron initial potentials ``v_inits``, ``bursts``, ``signed`` spikes, post-conversion ``calibrations``
    (:func:`~ann2snn_fx.calibrate_snn`, run for each ``T``) and, when ``readout_delay``, the delayed readout
    :func:`~ann2snn_fx.estimate_readout_delay` finds for each ``T``. Work is shared: one calibration pass per
    mode (histograms serve ``"fixed"`` and ``"min_error"`` for every ``T``) plus one for LTB, one
    simulation of ``max(time_steps)`` steps per SNN gives every ``T``, and one readout-delay probe per SNN
    serves every ``T`` (the estimate does not depend on ``T``). Configurations that build an identical SNN
    (``"min_error"`` finds the same thresholds from either mode; a signed neuron emits no negative spike in
    its first step, so at ``T = 1`` it is a plain one) are simulated and calibrated once and share their
    records. Most promising configurations run first (half-threshold starts, bursts); under a
    ``time_budget`` (seconds) every uncalibrated SNN runs first and then the post-conversion calibrations,
    the costly part, in the order of their uncalibrated record's rank at that ``T``, so a budget that stops
    the search still leaves the useful part.

    Args:
        ann: A classifier (left untouched).
        calib_loader: Calibration batches (as for the :class:`~ann2snn_fx.Converter`).
        val_loader: ``(input, label)`` batches on which accuracy is measured.
        time_steps: The ``T`` values to evaluate.
        modes, strategies, v_inits, bursts, signed, calibrations: The options to cross.
        readout_delay: Also evaluate the estimated delayed readout for each ``T``.
        tie_break: At each ``T``, re-run up to this many of the records within one validation sample of the
            best (most accurate, then lowest ``output_error``, first) on the calibration data and record
            their ``ann_agreement`` with the ANN's predictions, which :meth:`LatencyResult.best` ranks them
            by: a validation split of a few hundred images cannot tell such configurations apart, the
            pooled samples can. Selection stays off the test data. ``0`` turns it off (and keeps no SNN in
            memory; otherwise up to ``tie_break`` SNNs per ``T`` are kept until the end).
        time_budget: Stop starting new configurations, calibrations and tie-break re-runs after this many
            seconds (``None``: no limit).
        num_batches: Calibration batches to use (``None``: all).
        progress: Show a progress bar.

    Returns:
        A :class:`LatencyResult` (``records``, ``front``, ``markdown()``, ``plot(path)``).

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> ann = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
        >>> x = torch.randn(64, 4)
        >>> data = [(x, ann(x).argmax(1))]
        >>> result = tune_latency(ann, data, data, (1, 2), modes=("max",), strategies=("fixed",),
        ...                       v_inits=(0.5,), bursts=(1, 2), signed=(False,), progress=False)
        >>> all(not any(o.dominates(r) for o in result.records) for r in result.front)
        True
    """
    if not isinstance(ann, nn.Module):
        raise TypeError(f"ann must be an nn.Module, but got {type(ann).__name__}.")
    steps_grid = _check_grid("time_steps", time_steps, (int,))
    for t in steps_grid:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 1:
            raise ValueError(f"time_steps must hold positive ints, but got {t!r}.")
    grids = [
        _check_grid(n, v, ())
        for n, v in (
            ("modes", modes),
            ("strategies", strategies),
            ("v_inits", v_inits),
            ("bursts", bursts),
            ("signed", signed),
            ("calibrations", calibrations),
        )
    ]
    for s in grids[1]:
        if s not in ("fixed", "min_error", "ltb", "per_channel"):
            raise ValueError(
                f"strategies must be among 'fixed', 'min_error', 'per_channel', 'ltb', but got {s!r}."
            )
    if isinstance(tie_break, bool) or not isinstance(tie_break, numbers.Integral) or tie_break < 0:
        raise ValueError(f"tie_break must be a non-negative int, but got {tie_break!r}.")
    if time_budget is not None and (
        isinstance(time_budget, bool) or not isinstance(time_budget, numbers.Real) or time_budget <= 0
    ):
        raise ValueError(
            f"time_budget must be a positive number of seconds or None, but got {time_budget!r}."
        )
    start = time.perf_counter()
    first = next(itertools.chain(ann.parameters(), ann.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    val = _batches(val_loader, device)
    calib = list(calib_loader)
    with torch.no_grad():
        reference = torch.cat([ann(x) for x, _ in val])
    labels_all = torch.cat([y for _, y in val])
    ann_acc = float((reference.argmax(-1) == labels_all).double().mean() * 100)
    result = LatencyResult(ann_accuracy=ann_acc, validation_samples=int(labels_all.numel()))
    near = _NearTies(result.records, int(tie_break), 100.0 / max(int(labels_all.numel()), 1))
    t_max = max(steps_grid)
    plan = _plan(grids[0], grids[1], grids[2], grids[3], grids[4], steps_grid)
    disabled = not progress or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    bases: dict[Any, tuple[Converter, fx.GraphModule]] = {}
    methods = [m for m in grids[5] if m is not None]
    seen: dict[str, list[int]] = {}  # SNN fingerprint -> its records
    twins: dict[str, list[dict[str, Any]]] = {}  # fingerprint -> the options of the plan entries it serves
    copies: dict[int, list[int]] = {}  # record -> records of identical SNNs (filled from it)
    jobs: list[tuple[int, int, str, tuple[Any, ...], str]] = []
    bar = tqdm(total=len(plan), desc="tuning latency", disable=disabled, leave=False)
    out_of_time = False

    def calibrated(
        snn: fx.GraphModule, t: int, method: str, entry: tuple[Any, ...], fingerprint: str
    ) -> None:
        fixed = calibrate_snn(snn, ann, calib, t, method, num_batches=num_batches, progress=False)
        raw_c, labels_c, spikes_c = _evaluate(fixed, val, t)
        record = LatencyRecord(
            t,
            _accuracy(raw_c, labels_c, t),
            float(spikes_c.sum()) / len(labels_c),
            calibration=method,
            output_error=_output_error(raw_c, reference, t),
            **_options(entry),
        )
        result.records.append(record)
        near.consider(fixed)
        index = len(result.records) - 1
        seen[fingerprint].append(index)
        for common in twins[fingerprint]:
            result.records.append(dataclasses.replace(record, **common))
            copies.setdefault(index, []).append(len(result.records) - 1)

    for entry in plan:
        if time_budget is not None and time.perf_counter() - start > time_budget:
            out_of_time = True
            break
        bar.update(1)
        target = entry[5]
        wanted = steps_grid if target is None else (target,)
        snn = _build(ann, calib, bases, entry, num_batches)
        common = _options(entry)
        fingerprint = _fingerprint(snn, signed_matters=max(wanted) > 1)
        if fingerprint in seen:  # an identical SNN (e.g. min_error from either mode): same records
            for i in seen[fingerprint]:
                result.records.append(dataclasses.replace(result.records[i], **common))
                copies.setdefault(i, []).append(len(result.records) - 1)
            twins[fingerprint].append(common)
            continue
        raw, labels, spikes = _evaluate(snn, val, t_max if target is None else target)
        per = len(labels)
        # The delay estimate does not depend on T: one probe per SNN serves every T.
        charge = charge_steps(snn, calib) if readout_delay else 0
        own = seen[fingerprint] = []
        twins[fingerprint] = []
        for t in wanted:
            count = float(spikes[:t].sum()) / per
            result.records.append(
                LatencyRecord(
                    t,
                    _accuracy(raw, labels, t),
                    count,
                    output_error=_output_error(raw, reference, t),
                    **common,
                )
            )
            own.append(len(result.records) - 1)
            near.consider(snn)
            jobs += [(own[-1], t, method, entry, fingerprint) for method in methods]
            if readout_delay:
                delay = delay_for(charge, t, warn=False)
                if delay:
                    result.records.append(
                        LatencyRecord(
                            t,
                            _accuracy(raw, labels, t, delay),
                            count,
                            skip_steps=delay,
                            output_error=_output_error(raw, reference, t, delay),
                            **common,
                        )
                    )
                    own.append(len(result.records) - 1)
                    near.consider(snn)
        if time_budget is None:  # no budget to ration: calibrate now, from the SNN at hand
            for _parent, t, method, _entry, _fp in jobs:
                calibrated(snn, t, method, entry, fingerprint)
            jobs.clear()
    # Under a time budget, the post-conversion calibrations (the costly part) run last, most promising first:
    # by the rank of the uncalibrated record at its T, so the budget leaves out those least likely to win.
    place: dict[int, int] = {}
    for t in steps_grid:
        parents = sorted({j[0] for j in jobs if j[1] == t}, key=lambda i: (_rank(result.records[i]), i))
        place.update((i, k) for k, i in enumerate(parents))
    jobs.sort(key=lambda j: (place[j[0]], steps_grid.index(j[1])))
    bar.total = len(plan) + len(jobs)
    bar.refresh()
    built: tuple[str, fx.GraphModule] | None = None
    for _parent, t, method, entry, fingerprint in jobs:
        if out_of_time or (time_budget is not None and time.perf_counter() - start > time_budget):
            out_of_time = True
            break
        bar.update(1)
        if built is None or built[0] != fingerprint:
            built = (fingerprint, _build(ann, calib, bases, entry, num_batches))
        calibrated(built[1], t, method, entry, fingerprint)
    bar.close()
    if out_of_time:
        result.complete = False
    if near.pools:
        inputs = [
            stages.to_model(stages.batch_input(d), device, None)
            for d in (calib if num_batches is None else calib[: int(num_batches)])
        ]
        with torch.no_grad():
            agreement_data = [(x, ann(x).argmax(-1)) for x in inputs]
        result.agreement_samples = sum(int(p.numel()) for _, p in agreement_data)
        # One run per SNN serves its near-ties at every T (the running mean after t steps of a longer run).
        groups: dict[int, tuple[nn.Module, list[int]]] = {}
        for index, snn in near.candidates():
            groups.setdefault(id(snn), (snn, []))[1].append(index)
        for snn, indices in groups.values():
            if time_budget is not None and time.perf_counter() - start > time_budget:
                result.complete = False
                break
            longest = max(result.records[i].time_steps for i in indices)
            raw_a, labels_a, _ = _evaluate(snn, agreement_data, longest)
            for index in indices:
                r = result.records[index]
                agreement = _accuracy(raw_a, labels_a, r.time_steps, r.skip_steps)
                for i in (index, *copies.get(index, ())):
                    result.records[i] = dataclasses.replace(result.records[i], ann_agreement=agreement)
        near.pools.clear()
    result.front = pareto_front(result.records)
    result.seconds = time.perf_counter() - start
    return result


def _options(entry: tuple[Any, ...]) -> dict[str, Any]:
    """The record fields of a plan entry ``(mode, strategy, v_init, burst, signed, T)``."""
    mode, strategy, v_init, burst, sign, _target = entry
    return {
        "mode": mode if strategy != "ltb" else "-",
        "strategy": strategy,
        "v_init": float(v_init),
        "burst": int(burst),
        "signed": bool(sign),
    }


def _build(
    ann: nn.Module,
    calib: list[Any],
    bases: dict[Any, tuple[Converter, fx.GraphModule]],
    entry: tuple[Any, ...],
    num_batches: int | None,
) -> fx.GraphModule:
    """The SNN of a plan entry, from the calibrated graph of its mode (calibrated once, kept in ``bases``)."""
    mode, strategy, v_init, burst, sign, target = entry
    key = ("ltb",) if strategy == "ltb" else (mode, strategy == "per_channel")
    if key not in bases:
        bases[key] = _calibrated(ann, calib, mode, strategy, num_batches)
    converter, base = bases[key]
    optimizer = (
        ThresholdOptimizer("min_error", time_steps=int(target) * int(burst), v_init=float(v_init))
        if strategy == "min_error"
        else ThresholdOptimizer(strategy)
    )
    snn = copy.deepcopy(base)
    stages.replace(
        snn,
        converter.rules,
        NeuronFactory(v_init=float(v_init), burst=int(burst), signed=bool(sign)),
        optimizer,
    )
    stages.remove_leftover_hooks(snn)
    return snn.eval()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return repr((flat.dtype, tuple(tensor.shape))).encode() + flat.view(torch.uint8).numpy().tobytes()


def _fingerprint(snn: fx.GraphModule, *, signed_matters: bool) -> str:
    """A digest of what an SNN computes: its code, parameters and buffers, and each neuron's options
    (``signed`` only when ``signed_matters``: a signed neuron emits no negative spike in its first step)."""
    digest = hashlib.sha256(snn.code.encode())
    for name, tensor in snn.state_dict().items():
        digest.update(name.encode())
        digest.update(_tensor_bytes(tensor))
    for name, module in snn.named_modules():
        if isinstance(module, IFNode):
            options = []
            for attr in ("v_threshold", "v_reset", "v_init", "burst", "step_mode"):
                value = getattr(module, attr, None)
                options.append(
                    _tensor_bytes(value) if isinstance(value, torch.Tensor) else repr(value).encode()
                )
            options.append(repr(bool(getattr(module, "signed", False)) and signed_matters).encode())
            digest.update(name.encode() + b"|" + b"|".join(options))
    return digest.hexdigest()


class _NearTies:
    """Per ``T``, the SNNs of the (at most ``keep``) best records within ``slack`` points of the best."""

    def __init__(self, records: list[LatencyRecord], keep: int, slack: float) -> None:
        self.records, self.keep, self.slack = records, keep, slack * (1 + 1e-9)
        self.pools: dict[int, list[tuple[int, nn.Module]]] = {}

    def consider(self, snn: nn.Module) -> None:
        """Offer the last record (built by ``snn``)."""
        if self.keep == 0:
            return
        index = len(self.records) - 1
        t = self.records[index].time_steps
        pool = self.pools.setdefault(t, [])
        pool.append((index, snn))
        top = max(self.records[i].accuracy for i, _ in pool)
        kept = [p for p in pool if self.records[p[0]].accuracy >= top - self.slack]
        pool[:] = sorted(kept, key=lambda p: _rank(self.records[p[0]]))[: self.keep]

    def candidates(self) -> list[tuple[int, nn.Module]]:
        return [p for t in sorted(self.pools) for p in self.pools[t]]


def _plan(
    modes: tuple,
    strategies: tuple,
    v_inits: tuple,
    bursts: tuple,
    signed: tuple,
    steps: tuple,
) -> list[tuple[Any, ...]]:
    """The SNNs to build: ``(mode, strategy, v_init, burst, signed, T or None)``, most promising first."""
    plan = []
    for strategy in strategies:
        for mode in modes[:1] if strategy == "ltb" else modes:
            for v_init, burst, sign in itertools.product(v_inits, bursts, signed):
                targets = steps if strategy == "min_error" else (None,)
                plan += [(mode, strategy, v_init, burst, sign, t) for t in targets]
    return sorted(plan, key=lambda p: (abs(p[2] - 0.5), -p[3], p[4]))


def _calibrated(
    ann: nn.Module, calib: list[Any], mode: Any, strategy: str, num_batches: int | None
) -> tuple[Converter, fx.GraphModule]:
    """A converter and the ANN graph with its calibrated hooks (to build SNN variants from)."""
    optimizer = (
        ThresholdOptimizer("min_error", time_steps=1)
        if strategy in ("fixed", "min_error")
        else ThresholdOptimizer(strategy)
    )
    converter = Converter(
        calib, mode=mode, threshold_optimizer=optimizer, progress=False, num_batches=num_batches
    )
    first = next(itertools.chain(ann.parameters(), ann.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else None
    gm = stages.fuse(stages.trace(ann, device), True)
    gm = stages.observe(
        gm, mode, converter.momentum, converter.rules, hook_factory=converter._hook_factory()
    ).to(device)
    stages.calibrate(gm, calib, device, dtype, num_batches=num_batches)
    return converter, gm

"""The records :func:`~ann2snn_fx.analysis.profile_snn` returns, their totals, energy and their tables.

Every count is **per inference**: per sample, summed over the ``T`` steps (batch totals divided by the batch
size). The conventions behind each column are in the :class:`LayerRecord` docstring and in
``docs/guides/accounting.md``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field, fields

from ann2snn_fx.analysis.energy import FP32_45NM, INT8_45NM, EnergyModel, bit_matched_bits

__all__ = ["EnergyEstimate", "LayerRecord", "SNNProfile"]

CONVENTIONS = (
    "Conventions: counts per inference (per sample, summed over T steps). A spike event counts once whatever "
    "its amplitude (the threshold scale folds into the next layer's weights); a negative spike is one event; a "
    "burst of k is k events. SOP = sum over input events of the input's fan-out (exact at conv borders); "
    "pooling between a neuron and a weight layer is folded into that layer's fan-out (one SOP per path). "
    "Analog-fed layers count dense MACs as the ANN does: time-invariant ones once per inference (cached), the "
    "others once per step. Neuron updates (one add and one compare per neuron per step, one add per event) are "
    "dense and counted apart."
)


@dataclass(frozen=True)
class LayerRecord:
    """One row of the accounting: a neuron layer (``role == "neuron"``) or an operator layer.

    Attributes:
        name: Module path in the SNN.
        op: Class name of the module.
        role: ``"neuron"``; ``"spikes"`` (a weight layer fed by neuron events through scalers, reshapes and
            pooling: SOPs); ``"analog"`` (fed values that are not events: MACs every step); ``"analog, once"``
            (fed only time-invariant values, e.g. the first layer under constant input: MACs once).
        source: For ``"spikes"``, the neuron layer feeding it; otherwise why it counts MACs.
        neurons: Neurons per sample (elements of the layer's output for one sample).
        events_pos: Positive spike events per inference (a burst of k counts k).
        events_neg: Negative spike events per inference (signed neurons).
        firing_rate: ``(events_pos + events_neg) / (neurons * T)``: events per neuron per step.
        silent_fraction: Share of (sample, neuron) pairs that emitted no event in ``T`` steps.
        state_adds: Neuron adds per inference: one integrate per neuron per step plus one per event.
        state_compares: Neuron threshold compares per inference: one per neuron per step.
        synapses: Sum of the fan-outs of the layer's inputs (the SOPs of one step in which every input
            neuron emits exactly one event); 0 for analog layers.
        sop: Synaptic accumulate operations per inference.
        mac: Multiply-accumulates per inference in the SNN (analog-fed layers).
        ann_mac: Multiply-accumulates of the same layer in the ANN (one forward).
    """

    name: str
    op: str
    role: str
    source: str = ""
    neurons: int = 0
    events_pos: float = 0.0
    events_neg: float = 0.0
    firing_rate: float = 0.0
    silent_fraction: float = 0.0
    state_adds: float = 0.0
    state_compares: float = 0.0
    synapses: float = 0.0
    sop: float = 0.0
    mac: float = 0.0
    ann_mac: float = 0.0

    @property
    def events(self) -> float:
        """Positive plus negative events (amplitudes ignored, never cancelled)."""
        return self.events_pos + self.events_neg


@dataclass(frozen=True)
class EnergyEstimate:
    """Energy per inference, in picojoules, under one :class:`EnergyModel`.

    Attributes:
        model: The constants used.
        snn_compute_pj: SNN, arithmetic only: ``MAC * mac_pj + (SOP + neuron adds + compares) * add_pj``.
        snn_memory_pj: SNN with memory: plus one weight read per SOP and per MAC and one membrane read and
            one write per neuron per step, at ``memory_pj`` each.
        ann_compute_pj: The float ANN, arithmetic only: ``ANN MAC * mac_pj``.
        ann_memory_pj: The ANN with memory: plus one weight read per MAC and one activation write per neuron.
        qann_bits: Activation bits of the bit-matched quantised ANN, ``ceil(log2(T + 1))``.
        qann_compute_pj: That quantised ANN, arithmetic only: analog-fed layers at ``mac_pj`` per MAC, the
            others at ``qann_bits`` adds per MAC (a b-bit activation times a weight is b shifted adds).
        measured_rate: The SNN's events per neuron per step.
        break_even_rate: The uniform firing rate at which the SNN's compute energy equals the bit-matched
            quantised ANN's (0.0 when no rate does: the dense parts alone cost more).
    """

    model: EnergyModel
    snn_compute_pj: float
    snn_memory_pj: float
    ann_compute_pj: float
    ann_memory_pj: float
    qann_bits: int
    qann_compute_pj: float
    measured_rate: float
    break_even_rate: float


def _fmt(value: float | int | str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) or (float(value).is_integer() and abs(value) < 1e6):
        return f"{int(value)}"
    return f"{value:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


_COLUMNS = (
    ("layer", "name"),
    ("op", "op"),
    ("role", "role"),
    ("neurons", "neurons"),
    ("events +", "events_pos"),
    ("events -", "events_neg"),
    ("rate", "firing_rate"),
    ("silent", "silent_fraction"),
    ("neuron adds", "state_adds"),
    ("compares", "state_compares"),
    ("SOP", "sop"),
    ("MAC", "mac"),
    ("ANN MAC", "ann_mac"),
)


@dataclass
class SNNProfile:
    """The accounting of one SNN run: one :class:`LayerRecord` per layer, totals and energy estimates.

    Attributes:
        time_steps: ``T``.
        batch_size: Samples the counts were averaged over.
        mode: ``"step"``, ``"multi"`` or ``"sequence"``.
        layers: The rows, in graph order.
        energy_models: The constants the tables use (default fp32 and int8, 45 nm).
        accuracy: Accuracy of the output after ``T`` steps when labels were given, else None.
        notes: What the accounting could not see (e.g. functional ops not counted), one sentence each.
    """

    time_steps: int
    batch_size: int
    mode: str
    layers: list[LayerRecord] = field(default_factory=list)
    energy_models: tuple[EnergyModel, ...] = (FP32_45NM, INT8_45NM)
    accuracy: float | None = None
    notes: list[str] = field(default_factory=list)

    def _sum(self, attr: str, role: str | None = None) -> float:
        return float(sum(getattr(r, attr) for r in self.layers if role is None or r.role == role))

    @property
    def neurons(self) -> int:
        """Neurons per sample, all neuron layers."""
        return int(self._sum("neurons", "neuron"))

    @property
    def events(self) -> float:
        """Spike events per inference (positive plus negative)."""
        return self._sum("events_pos") + self._sum("events_neg")

    @property
    def firing_rate(self) -> float:
        """Events per neuron per step over the whole network."""
        return self.events / (self.neurons * self.time_steps) if self.neurons else 0.0

    @property
    def sop(self) -> float:
        """Synaptic operations per inference."""
        return self._sum("sop")

    @property
    def mac(self) -> float:
        """SNN multiply-accumulates per inference (analog-fed layers)."""
        return self._sum("mac")

    @property
    def ann_mac(self) -> float:
        """The ANN's multiply-accumulates per forward."""
        return self._sum("ann_mac")

    def energy(self, model: EnergyModel) -> EnergyEstimate:
        """The energy estimate under ``model`` (see :class:`EnergyEstimate` for every formula)."""
        if not isinstance(model, EnergyModel):
            raise TypeError(f"model must be an EnergyModel, but got {type(model).__name__}.")
        t = self.time_steps
        adds, compares = self._sum("state_adds"), self._sum("state_compares")
        snn = model.mac_pj * self.mac + model.add_pj * (self.sop + adds + compares)
        snn_mem = snn + model.memory_pj * (self.sop + self.mac + 2 * self.neurons * t)
        ann = model.mac_pj * self.ann_mac
        ann_mem = ann + model.memory_pj * (self.ann_mac + self.neurons)
        bits = bit_matched_bits(t)
        spike_fed = self._sum("ann_mac", "spikes")
        qann = model.mac_pj * (self.ann_mac - spike_fed) + model.add_pj * bits * spike_fed
        fixed = model.mac_pj * self.mac + model.add_pj * 2 * self.neurons * t  # integrate + compare
        slope = model.add_pj * t * (self.neurons + self._sum("synapses"))
        rate = max(0.0, (qann - fixed) / slope) if slope > 0 else 0.0
        return EnergyEstimate(model, snn, snn_mem, ann, ann_mem, bits, qann, self.firing_rate, rate)

    def to_markdown(self) -> str:
        """The layer table with a totals row, the energy table, the constants and the conventions."""
        rows = [[_fmt(getattr(r, attr)) for _, attr in _COLUMNS] for r in self.layers]
        total = ["**total**", "", "", _fmt(self.neurons), _fmt(self._sum("events_pos")),
                 _fmt(self._sum("events_neg")), _fmt(self.firing_rate), "", _fmt(self._sum("state_adds")),
                 _fmt(self._sum("state_compares")), _fmt(self.sop), _fmt(self.mac), _fmt(self.ann_mac)]  # fmt: skip
        parts = [
            f"SNN accounting, T={self.time_steps}, {self.mode} execution, per inference over "
            f"{self.batch_size} sample(s)"
            + ("" if self.accuracy is None else f"; accuracy {self.accuracy:.4f}"),
            "",
            _table([name for name, _ in _COLUMNS], [*rows, total]),
            "",
        ]
        energy_rows = []
        for model in self.energy_models:
            e = self.energy(model)
            energy_rows.append(
                [
                    model.name,
                    _fmt(e.snn_compute_pj),
                    _fmt(e.snn_memory_pj),
                    _fmt(e.ann_compute_pj),
                    _fmt(e.ann_memory_pj),
                    f"{e.qann_bits}-bit: {_fmt(e.qann_compute_pj)}",
                    f"{e.measured_rate:.4f}",
                    f"{e.break_even_rate:.4f}",
                ]
            )
        header = ["constants", "SNN pJ (compute-only)", "SNN pJ (with memory)", "ANN pJ (compute-only)",
                  "ANN pJ (with memory)", "bit-matched QANN pJ (compute-only)", "measured rate",
                  "break-even rate"]  # fmt: skip
        parts += [_table(header, energy_rows), ""]
        parts += [f"- {model.describe()}" for model in self.energy_models]
        parts += [
            "- compute-only figures are optimistic (45 nm arithmetic, no data movement); the memory variant "
            "charges one access per weight read (per SOP and per MAC), per membrane read and write (per neuron "
            "per step) and per ANN activation write, with no data reuse.",
            f"- {CONVENTIONS}",
        ]
        parts += [f"- note: {note}" for note in self.notes]
        return "\n".join(parts)

    def to_csv(self) -> str:
        """One CSV line per layer (every :class:`LayerRecord` field) and a ``total`` line."""
        buffer = io.StringIO()
        names = [f.name for f in fields(LayerRecord)]
        writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for record in self.layers:
            writer.writerow(asdict(record))
        totals: dict[str, float | str] = {
            name: self._sum(name) for name in names if name not in ("name", "op", "role", "source")
        }
        totals["neurons"] = self.neurons
        totals["firing_rate"] = self.firing_rate
        totals["silent_fraction"] = ""
        writer.writerow({"name": "total", "op": "", "role": "", "source": "", **totals})
        return buffer.getvalue()

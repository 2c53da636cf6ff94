"""Low-latency conversion for the demo: the best training-free configuration and a QCFS fine-tune.

``run_lowlat(data, ...)`` trains the demo's CNN (the same seed as tutorial 1, so the same model), lets
``tune_latency`` pick a training-free configuration for ``T = pick_steps`` on a validation split of the
training images, fine-tunes a QCFS copy of the ANN for a few epochs, and returns one result per SNN with its
accuracy after every step, in the shape ``cnn.format_table`` and ``cnn.plot_accuracy`` take.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import cnn
import torch
from digits import Digits, accuracy, train_classifier
from torch.utils.data import DataLoader, TensorDataset

from ann2snn_fx import Converter, NeuronFactory, ThresholdOptimizer, calibrate_snn, prepare_qcfs, tune_latency


@dataclass(frozen=True)
class LowLatencyConfiguration:
    """A row label (with the ``mode`` and ``v_init`` fields the demo's plot and summary read)."""

    label: str
    mode: str = "low-latency"
    v_init: float | None = 0.5


@dataclass
class LowLatencyResult:
    """Accuracy after every step of one low-latency SNN (the fields of ``cnn.ConversionResult``)."""

    configuration: LowLatencyConfiguration
    calibration_seconds: float
    accuracy_per_step: list[float] = field(default_factory=list)
    report: str = ""

    def accuracy_at(self, t: int) -> float:
        return self.accuracy_per_step[t - 1]


def run_lowlat(
    data: Digits,
    *,
    epochs: int,
    steps: int,
    seed: int = 0,
    pick_steps: int = 2,
    qcfs_epochs: int = 5,
    quick: bool = False,
    progress: bool = True,
) -> list[LowLatencyResult]:
    """The two low-latency rows of the demo (see the module docstring)."""
    ann = cnn.train_cnn(data, epochs=epochs, seed=seed, progress=progress)
    calibration = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=128, shuffle=False)
    split = int(0.8 * len(data.y_train))
    val = [(data.x_train[split:], data.y_train[split:])]
    start = time.perf_counter()
    grid = {"bursts": (1, 2), "signed": (False,), "modes": ("max",)} if quick else {}
    result = tune_latency(ann, calibration, val, (pick_steps,), v_inits=(0.5,), progress=progress, **grid)
    best = result.best(pick_steps)
    assert best is not None
    optimizer = (
        ThresholdOptimizer("min_error", time_steps=pick_steps * best.burst, v_init=best.v_init)
        if best.strategy == "min_error"
        else ThresholdOptimizer(best.strategy)
    )
    neurons = NeuronFactory(v_init=best.v_init, burst=best.burst, signed=best.signed)
    mode = "max" if best.mode == "-" else best.mode
    snn = Converter(
        calibration, mode=mode, neuron_factory=neurons, threshold_optimizer=optimizer, progress=False
    ).convert_to_spiking_neurons(ann)
    if best.calibration:
        snn = calibrate_snn(snn, ann, calibration, pick_steps, best.calibration, progress=False)
    tuned_seconds = time.perf_counter() - start
    print(f"tune_latency's pick for T={pick_steps} ({len(result.records)} records): {best.label}")
    rows = [
        LowLatencyResult(
            LowLatencyConfiguration(f"tune_latency pick for T={pick_steps} (training-free)"),
            tuned_seconds,
            cnn.simulate(snn, data.x_test, data.y_test, steps),
            report=best.label,
        )
    ]
    # QCFS: replace the ReLUs, fine-tune briefly, convert with no calibration data, burst=L neurons (T=1 exact).
    qcfs = prepare_qcfs(ann, levels=8, dataloader=calibration)
    start = time.perf_counter()
    train_classifier(
        qcfs,
        data.x_train,
        data.y_train,
        epochs=qcfs_epochs,
        lr=1e-3,
        seed=seed,
        progress=progress,
        desc="fine-tune QCFS",
    )
    with torch.no_grad():
        qcfs_accuracy = accuracy(qcfs(data.x_test), data.y_test)
    snn = Converter(progress=False, neuron_factory=NeuronFactory(burst=8)).convert_to_spiking_neurons(qcfs)
    rows.append(
        LowLatencyResult(
            LowLatencyConfiguration(f"QCFS L=8 + {qcfs_epochs} epochs, burst=8", mode="qcfs"),
            time.perf_counter() - start,
            cnn.simulate(snn, data.x_test, data.y_test, steps),
            report=f"QCFS ANN test accuracy {100 * qcfs_accuracy:.1f}%",
        )
    )
    return rows

"""Tutorial 1: a CNN trained on scikit-learn's digits, converted ReLU -> IF neurons and simulated over time.

The conversion path:

1. train a small conv/BN/ReLU/avg-pool CNN (an ordinary PyTorch model);
2. ``Converter(loader, mode=...)`` traces it with torch.fx, fuses Conv+BN, calibrates one activation scale per
   ReLU on training batches and replaces each ReLU by ``VoltageScaler -> IFNode -> VoltageScaler``;
3. the SNN is driven with the same image at every time step; the running mean of its outputs approaches the
   ANN's outputs as the number of steps T grows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from digits import Digits, accuracy, markdown_table, train_classifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from ann2snn_fx import Converter, NeuronFactory, run_snn

#: The time steps reported in the table (the plot shows every step).
REPORT_STEPS = (2, 4, 8, 16, 32, 64, 128)


# --8<-- [start:model]
def build_cnn() -> nn.Sequential:
    """A small CNN whose every nonlinearity is an ``nn.ReLU`` module, so the converter can find it."""
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AvgPool2d(2),  # 8x8 -> 4x4; average pooling is linear, so it works on spikes as is
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AvgPool2d(2),  # 4x4 -> 2x2
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


# --8<-- [end:model]


def train_cnn(data: Digits, *, epochs: int, seed: int = 0, progress: bool = True) -> nn.Sequential:
    """Train :func:`build_cnn` on the training split; returns the model in eval mode."""
    torch.manual_seed(seed)
    model = build_cnn()
    train_classifier(
        model,
        data.x_train,
        data.y_train,
        epochs=epochs,
        lr=3e-3,
        weight_decay=1e-4,
        seed=seed,
        progress=progress,
        desc="train CNN",
    )
    return model


@dataclass(frozen=True)
class Configuration:
    """One way of converting: the calibration mode and the neurons' initial membrane potential."""

    mode: str | float
    v_init: float | None = None

    @property
    def label(self) -> str:
        mode = f"mode={self.mode!r}" if isinstance(self.mode, str) else f"mode={self.mode}"
        return mode if self.v_init is None else f"{mode}, v_init={self.v_init}"


#: Three ways of picking each layer's scale, each with default neurons (v = 0 at the start) and with
#: ``v_init=0.5`` (half the threshold: the firing rate rounds instead of flooring).
CONFIGURATIONS = tuple(
    Configuration(mode, v_init) for mode in ("max", "99.9%", 0.5) for v_init in (None, 0.5)
)


@dataclass
class ConversionResult:
    """Accuracy of one converted SNN after every time step 1..T, and how long calibration took."""

    configuration: Configuration
    calibration_seconds: float
    accuracy_per_step: list[float] = field(default_factory=list)
    report: str = ""  # what the converter replaced, and what it left (snn.conversion_report)

    def accuracy_at(self, t: int) -> float:
        return self.accuracy_per_step[t - 1]


# --8<-- [start:convert]
def convert(
    ann: nn.Module,
    loader: DataLoader,
    configuration: Configuration,
    *,
    num_batches: int | None = None,
    progress: bool = True,
) -> tuple[nn.Module, float]:
    """Convert ``ann`` (left untouched) and return the SNN with the calibration time in seconds."""
    neurons = NeuronFactory(v_init=configuration.v_init)
    converter = Converter(
        loader,
        mode=configuration.mode,
        neuron_factory=neurons,
        progress=progress,
        num_batches=num_batches,
    )
    start = time.perf_counter()
    snn = converter.convert_to_spiking_neurons(ann)
    return snn.eval(), time.perf_counter() - start


# --8<-- [end:convert]


# --8<-- [start:simulate]
def simulate(snn: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int) -> list[float]:
    """Drive ``snn`` with the same images at every step; return the accuracy after each of ``steps`` steps.

    The images are presented as a constant input current (direct coding). ``run_snn`` resets the neurons,
    runs all steps and returns the running mean of the outputs after every step: its argmax after t steps is
    the prediction of an SNN that ran for t steps, so one run gives the whole accuracy-against-T curve.
    """
    running_mean = run_snn(snn, images, steps)  # [T, N, classes]
    return [accuracy(out, labels) for out in running_mean]


# --8<-- [end:simulate]


def run_cnn_tutorial(
    data: Digits,
    *,
    epochs: int = 15,
    steps: int = 128,
    num_batches: int | None = None,
    configurations: tuple[Configuration, ...] = CONFIGURATIONS,
    seed: int = 0,
    progress: bool = True,
) -> tuple[float, list[ConversionResult]]:
    """Train the CNN, convert it once per configuration and simulate each SNN for ``steps`` steps.

    Returns:
        The ANN's test accuracy and one :class:`ConversionResult` per configuration.
    """
    ann = train_cnn(data, epochs=epochs, seed=seed, progress=progress)
    with torch.no_grad():
        ann_accuracy = accuracy(ann(data.x_test), data.y_test)

    # Calibration sees training images only; the test images are kept for measuring accuracy.
    calibration = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=128, shuffle=False)
    results = []
    bar = tqdm(configurations, desc="convert and simulate", unit="SNN", disable=not progress)
    for configuration in bar:
        bar.set_postfix_str(configuration.label)
        snn, seconds = convert(ann, calibration, configuration, num_batches=num_batches, progress=False)
        per_step = simulate(snn, data.x_test, data.y_test, steps)
        results.append(ConversionResult(configuration, seconds, per_step, str(snn.conversion_report)))
    return ann_accuracy, results


def format_table(ann_accuracy: float, results: list[ConversionResult], steps: tuple[int, ...]) -> str:
    """A markdown table: one row per configuration, test accuracy (%) after each of ``steps``."""
    header = ["configuration", "calibration (s)", *(f"T={t}" for t in steps)]
    rows = [["ANN (reference)", "-", *(f"{100 * ann_accuracy:.1f}" for _ in steps)]]
    for result in results:
        rows.append(
            [
                f"SNN {result.configuration.label}",
                f"{result.calibration_seconds:.2f}",
                *(f"{100 * result.accuracy_at(t):.1f}" for t in steps),
            ]
        )
    return markdown_table(header, rows)


def plot_accuracy(ann_accuracy: float, results: list[ConversionResult], path: str) -> str:
    """Write a PNG of test accuracy against T (log scale), one line per configuration; return its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    colors: dict[str | float, str] = {}
    for result in results:
        steps = range(1, len(result.accuracy_per_step) + 1)
        mode = result.configuration.mode
        color = colors.setdefault(mode, f"C{len(colors)}")  # one colour per mode, dashed with v_init
        style = "--" if result.configuration.v_init is not None else "-"
        accuracies = [100 * a for a in result.accuracy_per_step]
        ax.plot(steps, accuracies, style, color=color, label=result.configuration.label)
    ax.axhline(100 * ann_accuracy, color="black", linewidth=1, linestyle=":", label="ANN")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_xlabel("time steps T")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Converted CNN on scikit-learn digits: SNN accuracy vs. time steps")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

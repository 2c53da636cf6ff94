"""Demo part: the tiny transformer as a QANN (level 16: post-training calibration, then a short fine-tune) and as
its spike-driven SNN, side by side with the float ANN (accuracy against T).

Run alone: ``python docs/tutorials/demo_spikezip.py [--quick]``; ``demo.py`` calls :func:`run_spikezip_demo`.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from digits import Digits, accuracy, load_digits_split, markdown_table
from transformer import rows_as_tokens, train_transformer

from ann2snn_fx import QANN, calibrate_qann, prepare_qann, qann_to_snn

LEVELS = 16


# --8<-- [start:qat]
def fine_tune_qann(
    qann: QANN,
    teacher: torch.nn.Module,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 3,
    lr: float = 1e-3,
    temperature: float = 2.0,
    distill: float = 0.5,
    seed: int = 0,
) -> QANN:
    """Quantisation-aware fine-tuning: weights and quantiser steps (LSQ), cross-entropy plus distillation."""
    torch.manual_seed(seed)
    qann.train()
    optimizer = torch.optim.Adam(qann.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(labels)).split(64):
            logits = qann(tokens[idx])
            loss = F.cross_entropy(logits, labels[idx])
            if distill > 0:
                with torch.no_grad():
                    soft = F.softmax(teacher(tokens[idx]) / temperature, dim=-1)
                kd = F.kl_div(F.log_softmax(logits / temperature, dim=-1), soft, reduction="batchmean")
                loss = (1 - distill) * loss + distill * temperature**2 * kd
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return qann.eval()


# --8<-- [end:qat]


@dataclass
class SpikeZIPResult:
    ann_accuracy: float
    ptq_accuracy: float
    qat_accuracy: float
    snn_accuracy_per_step: list[float] = field(default_factory=list)
    settle_steps: int | None = None
    quantizers: int = 0


def run_spikezip_demo(
    data: Digits, *, epochs: int, qat_epochs: int, steps: int, seed: int = 0, progress: bool = True
) -> SpikeZIPResult:
    """Train the float transformer, quantise it (PTQ, then QAT), convert the QAT QANN, score all of them."""
    ann = train_transformer(data, epochs=epochs, seed=seed, progress=progress)
    x_train, x_test = rows_as_tokens(data.x_train), rows_as_tokens(data.x_test)
    # --8<-- [start:ptq]
    qann = prepare_qann(ann, LEVELS, example_inputs=x_train[:64])
    calibrate_qann(qann, x_train[:512].split(128))  # post-training: steps from data, no training
    # --8<-- [end:ptq]
    with torch.no_grad():
        ann_acc, ptq_acc = accuracy(ann(x_test), data.y_test), accuracy(qann(x_test), data.y_test)
    qat = fine_tune_qann(copy.deepcopy(qann), ann, x_train, data.y_train, epochs=qat_epochs, seed=seed)
    snn = qann_to_snn(qat)
    sequence = torch.zeros(steps, *x_test.shape)
    sequence[0] = x_test
    with torch.no_grad():
        qat_acc = accuracy(qat(x_test), data.y_test)
        cumulative = snn(sequence).cumsum(0)
    per_step = [accuracy(cumulative[t], data.y_test) for t in range(steps)]
    return SpikeZIPResult(ann_acc, ptq_acc, qat_acc, per_step, snn.settle_steps, len(qann.quantizers))


def format_table(result: SpikeZIPResult, report_steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> str:
    shown = [t for t in report_steps if t <= len(result.snn_accuracy_per_step)]
    header = ["model", *[f"T={t}" for t in shown]]
    rows = [
        ["float ANN", *[f"{100 * result.ann_accuracy:.1f}%"] * len(shown)],
        [f"QANN L{LEVELS}, post-training", *[f"{100 * result.ptq_accuracy:.1f}%"] * len(shown)],
        [f"QANN L{LEVELS}, fine-tuned", *[f"{100 * result.qat_accuracy:.1f}%"] * len(shown)],
        [
            "ST-BIF SNN of the fine-tuned QANN",
            *[f"{100 * result.snn_accuracy_per_step[t - 1]:.1f}%" for t in shown],
        ],
    ]
    return markdown_table(header, rows)


def plot_accuracy(result: SpikeZIPResult, path: str) -> str:
    """A PNG of accuracy against T: the SNN's curve, the ANN and QANNs as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    steps = range(1, len(result.snn_accuracy_per_step) + 1)
    ax.plot(steps, [100 * a for a in result.snn_accuracy_per_step], label="ST-BIF SNN (fine-tuned QANN)")
    for value, label, style in (
        (result.ann_accuracy, "float ANN", ":"),
        (result.ptq_accuracy, f"QANN L{LEVELS} post-training", "--"),
        (result.qat_accuracy, f"QANN L{LEVELS} fine-tuned", "-."),
    ):
        ax.axhline(100 * value, color="black", linestyle=style, linewidth=1, label=label)
    ax.set_xlabel("time steps T")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Tiny transformer on digits: QANN and spike-driven SNN")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    digits = load_digits_split(seed=0)
    res = run_spikezip_demo(
        digits,
        epochs=2 if args.quick else 20,
        qat_epochs=1 if args.quick else 3,
        steps=8 if args.quick else 32,
    )
    print(format_table(res))
    print(f"settle steps: {res.settle_steps}, quantisers: {res.quantizers}")

"""Tutorial 3: a few time steps. QCFS fine-tuning on the digits, for a 2-D and a 1-D CNN, against T.

Usage: ``python docs/tutorials/lowlat.py [--quick]`` (a minute or two on 2 cores) prints the table recorded in
``docs/tutorials/results/lowlat.md``.
"""

from __future__ import annotations

import argparse

import cnn
import torch
from digits import Digits, accuracy, load_digits_split, markdown_table, train_classifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ann2snn_fx import Converter, NeuronFactory, calibrate_snn, prepare_qcfs, run_snn

STEPS = (1, 2, 4, 8)


def build_cnn1d() -> nn.Sequential:
    """A 1-D CNN reading each 8x8 digit as one signal of 64 samples."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 64)),
        nn.Conv1d(1, 16, 5, padding=2),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.AvgPool1d(2),
        nn.Conv1d(16, 32, 5, padding=2),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.AvgPool1d(2),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )


# --8<-- [start:recipe]
def qcfs_recipe(
    ann: nn.Module, data: Digits, x_train: torch.Tensor, x_test: torch.Tensor, epochs: int
) -> dict:
    """Fine-tune a QCFS copy of ``ann`` and convert it with no calibration data; accuracy (%) per T."""
    loader = DataLoader(TensorDataset(x_train, data.y_train), batch_size=128)
    qcfs = prepare_qcfs(ann, levels=8, dataloader=loader)  # each λ starts at its layer's largest activation
    train_classifier(qcfs, x_train, data.y_train, epochs=epochs, lr=1e-3, progress=False)
    with torch.no_grad():
        rows = {"QCFS ANN (L=8)": [100 * accuracy(qcfs(x_test), data.y_test)] * len(STEPS)}
    for label, neurons in (("IF neurons", NeuronFactory()), ("burst=8 neurons", NeuronFactory(burst=8))):
        snn = Converter(neuron_factory=neurons, progress=False).convert_to_spiking_neurons(qcfs)
        out = run_snn(snn, x_test, max(STEPS), multi_step=True)
        rows[f"QCFS SNN, {label}"] = [100 * accuracy(out[t - 1], data.y_test) for t in STEPS]
    return rows


# --8<-- [end:recipe]


def training_free(ann: nn.Module, data: Digits, x_train: torch.Tensor, x_test: torch.Tensor) -> dict:
    """For comparison: v_init=0.5 neurons, with and without calibrate_snn for each T."""
    loader = [(x_train[i : i + 128], data.y_train[i : i + 128]) for i in range(0, len(x_train), 128)]
    snn = Converter(
        loader, neuron_factory=NeuronFactory(v_init=0.5), progress=False
    ).convert_to_spiking_neurons(ann)
    out = run_snn(snn, x_test, max(STEPS), multi_step=True)
    plain = [100 * accuracy(out[t - 1], data.y_test) for t in STEPS]
    fixed = []
    for t in STEPS:
        calibrated = calibrate_snn(snn, ann, loader, t, progress=False)
        fixed.append(100 * accuracy(run_snn(calibrated, x_test, t, multi_step=True)[-1], data.y_test))
    return {"SNN, v_init=0.5": plain, "SNN, v_init=0.5 + calibrate_snn(T)": fixed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_digits_split(seed=0)
    epochs, qcfs_epochs = (2, 1) if args.quick else (15, 5)
    rows = []
    for name, build, flat in (("2-D CNN", cnn.build_cnn, False), ("1-D CNN", build_cnn1d, True)):
        x_train = data.x_train.flatten(1) if flat else data.x_train
        x_test = data.x_test.flatten(1) if flat else data.x_test
        torch.manual_seed(0)
        ann = train_classifier(
            build(), x_train, data.y_train, epochs=epochs, lr=3e-3, weight_decay=1e-4, progress=False
        )
        with torch.no_grad():
            rows.append([f"{name}: ANN", *(f"{100 * accuracy(ann(x_test), data.y_test):.1f}" for _ in STEPS)])
        for label, values in {
            **training_free(ann, data, x_train, x_test),
            **qcfs_recipe(ann, data, x_train, x_test, qcfs_epochs),
        }.items():
            rows.append([f"{name}: {label}", *(f"{v:.1f}" for v in values)])
    print(markdown_table(["model", *(f"T={t}" for t in STEPS)], rows))


if __name__ == "__main__":
    main()

"""Demo part: what the demo's converted CNN spends, spike by spike, and an honest energy estimate against T.

``run_accounting`` trains the demo CNN (the same recipe and seed as the main demo), converts it once
(``mode='99.9%'``, ``v_init=0.5``), prints the accounting table of ``ann2snn_fx.profile_snn`` at T = 4 and
T = 32 on the test images, and plots energy (SNN compute-only and with memory, float ANN, bit-matched
quantised ANN) against T beside the accuracy. See ``docs/guides/accounting.md`` for every column.
"""

from __future__ import annotations

import pathlib

import cnn
from digits import Digits
from torch.utils.data import DataLoader, TensorDataset

from ann2snn_fx import FP32_45NM, diagnose, plot_sweep, profile_snn, profile_sweep

#: The T of the two printed tables.
TABLE_STEPS = (4, 32)


def run_accounting(
    data: Digits, out: pathlib.Path, *, epochs: int, max_steps: int = 64, seed: int = 0, progress: bool = True
) -> str:
    """Print and return the accounting tables at T = 4 and 32 and write ``accounting_energy_vs_T.png``.

    Args:
        data: The digits split of the demo.
        out: Output folder of the demo.
        epochs: Training epochs of the CNN (the demo's setting).
        max_steps: Largest T of the energy/accuracy sweep (powers of two from 1).
        seed: The demo's seed.
        progress: Show the training progress bar.

    Returns:
        The markdown text printed (tables, doctor's summary and the path of the plot).
    """
    ann = cnn.train_cnn(data, epochs=epochs, seed=seed, progress=progress)
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=128, shuffle=False)
    snn, _ = cnn.convert(ann, loader, cnn.Configuration("99.9%", 0.5), progress=False)
    parts = []
    for t in TABLE_STEPS:
        profile = profile_snn(snn, data.x_test, t, mode="multi", labels=data.y_test)
        parts += [f"### Accounting at T={t}", "", profile.to_markdown(), ""]
    doctor = diagnose(ann, snn, data.x_test, TABLE_STEPS[0])
    parts += [f"### Conversion doctor at T={TABLE_STEPS[0]}", "", doctor.to_markdown(), ""]
    steps = [2**k for k in range(max_steps.bit_length()) if 2**k <= max_steps]
    sweep = profile_sweep(snn, data.x_test, steps, labels=data.y_test)
    path = out / "accounting_energy_vs_T.png"
    try:
        plot_sweep(sweep, FP32_45NM, str(path))
        parts.append(f"energy against T beside accuracy written to {path}")
    except ImportError as error:
        parts.append(f"(no plot: {error})")
    text = "\n".join(parts)
    print(text)
    return text

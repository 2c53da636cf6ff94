"""The main job of ann2snn, end to end on real data: ``nox -s demo`` runs this file.

1. Train a small CNN on scikit-learn's digits, convert it ReLU -> IF in several modes, simulate T = 1..128,
   print a table of accuracy against T beside the ANN's, and write a plot. Two low-latency rows join them
   (``demo_lowlat.py``): the training-free configuration ``tune_latency`` picks for T = 2, and a QCFS copy
   of the CNN fine-tuned for a few epochs and converted with burst neurons.
2. Train a tiny transformer on the same digits, convert it with TD operators, and print how closely its
   cumulative output reproduces the ANN.
3. Account for the CNN's spikes, operations and energy at T = 4 and 32, and plot energy against T beside
   accuracy (``demo_accounting.py``).
4. Quantise the tiny transformer (level 16: post-training, then a short fine-tune) and convert it to a
   spike-driven ST-BIF SNN: accuracy against T beside the float ANN (``demo_spikezip.py``).

Usage::

    python docs/tutorials/demo.py --out demo-output          # the full run (a few minutes on 2 cores)
    python docs/tutorials/demo.py --out /tmp/demo --quick    # seconds: few epochs, T up to 8
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import cnn
import demo_accounting
import demo_lowlat
import demo_spikezip
import torch
import transformer
from digits import load_digits_split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("demo-output"), help="output folder")
    parser.add_argument(
        "--quick", action="store_true", help="a seconds-long smoke run (few epochs, T up to 8)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    progress = not args.no_progress
    args.out = args.out.resolve()  # print absolute paths
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # The quick mode only shrinks the work; it runs every step of the full demo.
    if args.quick:
        cnn_epochs, steps, num_batches, tf_epochs, tf_steps = 2, 8, 2, 2, 4
    else:
        cnn_epochs, steps, num_batches, tf_epochs, tf_steps = 15, 128, None, 20, 16
    report_steps = tuple(t for t in cnn.REPORT_STEPS if t <= steps)

    torch.manual_seed(args.seed)
    data = load_digits_split(seed=args.seed)
    print(f"digits: {len(data.y_train)} training and {len(data.y_test)} test images of 8x8 pixels")

    print("\n## 1. CNN: ReLU -> IF neurons\n")
    section = time.perf_counter()
    ann_accuracy, results = cnn.run_cnn_tutorial(
        data, epochs=cnn_epochs, steps=steps, num_batches=num_batches, seed=args.seed, progress=progress
    )
    print(f"ANN test accuracy: {100 * ann_accuracy:.1f}%\n")
    results += demo_lowlat.run_lowlat(  # type: ignore[arg-type]
        data, epochs=cnn_epochs, steps=steps, seed=args.seed, quick=args.quick, progress=progress
    )
    cnn_table = cnn.format_table(ann_accuracy, results, report_steps)
    print(cnn_table)
    plot = cnn.plot_accuracy(ann_accuracy, results, str(args.out / "cnn_accuracy_vs_T.png"))
    print(f"\nplot written to {plot}")
    print(f"(training, 6 conversions and simulations: {time.perf_counter() - section:.0f} s)")

    print("\n## 2. Transformer: TD operators\n")
    section = time.perf_counter()
    td = transformer.run_transformer_tutorial(
        data, epochs=tf_epochs, steps=tf_steps, seed=args.seed, progress=progress
    )
    td_table = transformer.format_table(td)
    print(f"\n{td_table}")
    print(f"(training, conversion and comparison: {time.perf_counter() - section:.0f} s)")

    print("\n## 3. Accounting: spikes, operations and energy of the CNN\n")
    accounting = demo_accounting.run_accounting(
        data,
        args.out,
        epochs=cnn_epochs,
        max_steps=steps if args.quick else 64,
        seed=args.seed,
        progress=progress,
    )
    (args.out / "accounting.md").write_text(accounting + "\n")

    print("\n## 4. Spike-driven transformer: QANN -> ST-BIF SNN (SpikeZIP)\n")
    section = time.perf_counter()
    sz = demo_spikezip.run_spikezip_demo(
        data,
        epochs=tf_epochs,
        qat_epochs=1 if args.quick else 3,
        steps=8 if args.quick else 32,
        seed=args.seed,
        progress=progress,
    )
    sz_table = demo_spikezip.format_table(sz)
    print(f"\n{sz_table}\n\nsettle steps: {sz.settle_steps}")
    print(f"plot written to {demo_spikezip.plot_accuracy(sz, str(args.out / 'spikezip_accuracy_vs_T.png'))}")
    print(f"(training, quantisation, fine-tune, conversion: {time.perf_counter() - section:.0f} s)")
    (args.out / "spikezip_table.md").write_text(sz_table + "\n")

    (args.out / "cnn_table.md").write_text(cnn_table + "\n")
    (args.out / "transformer_table.md").write_text(td_table + "\n")
    summary = {
        "quick": args.quick,
        "cnn": {
            "ann_accuracy": ann_accuracy,
            "steps": steps,
            "configurations": [
                {
                    "label": r.configuration.label,
                    "mode": r.configuration.mode,
                    "v_init": r.configuration.v_init,
                    "calibration_seconds": r.calibration_seconds,
                    "accuracy_per_step": r.accuracy_per_step,
                }
                for r in results
            ],
            "plot": plot,
        },
        "transformer": td.__dict__,
        "spikezip": sz.__dict__,
    }
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nresults written to {args.out / 'results.json'}; total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: NIR export and import (the ``ann2snn-fx[nir]`` extra) against the NIR consumers' importers.

Run: ``python packages/ann2snn-fx/benchmarks/bench_fx_nir.py [--quick] [--markdown PATH]``.

Measured side by side in one run (medians of interleaved repeats) on a converted CNN (3 conv layers with
average pooling, Conv+BN folded, calibrated on random data):

* ``to_nir`` (trace, fold the scalers, one shape-recording step) and ``write_nir`` / ``nir.read`` of the HDF5
  file, against one step-loop ``run_snn`` of the SNN at T steps (a sense of scale);
* importing the same graph: our ``from_nir`` against ``sinabs.from_nir`` and snnTorch's ``import_from_nir``
  (each where it imports; nothing is installed by this script).

Without ``nir`` the section says so and measures nothing.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn as nn
from _timing import bench_parser, emit, median_times
from torch.utils.data import DataLoader, TensorDataset

from ann2snn_fx import Converter, run_snn


def _cnn(width: int) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, width), nn.AvgPool2d(2), *block(width, 2 * width), nn.AvgPool2d(2), *block(2 * width, 2 * width),
        nn.Flatten(), nn.Linear(2 * width * 8 * 8, 10),
    ).eval()  # fmt: skip


def _importers(graph: object, batch: int) -> tuple[dict[str, Callable[[], object]], list[str]]:
    """Our importer and each consumer's that imports here; the others as 'name (why)'."""
    from ann2snn_fx.export import from_nir

    fns: dict[str, Callable[[], object]] = {"ours: from_nir": lambda: from_nir(graph)}
    missing = []
    try:
        import sinabs

        fns["sinabs.from_nir"] = lambda: sinabs.from_nir(graph, batch_size=batch)
    except ImportError as err:
        missing.append(f"sinabs ({err})")
    try:
        from snntorch.import_nir import import_from_nir

        fns["snnTorch import_from_nir"] = lambda: import_from_nir(graph)
    except ImportError as err:
        missing.append(f"snnTorch ({err})")
    return fns, missing


def main() -> None:
    args = bench_parser(__doc__).parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    title = "## ann2snn-fx: NIR export and import\n\n"
    if importlib.util.find_spec("nir") is None:
        emit(
            title + "Skipped: `nir` is not installed (`pip install ann2snn-fx[nir]`).\n",
            args.markdown,
            started,
        )
        return
    import nir

    from ann2snn_fx.export import to_nir, write_nir

    torch.manual_seed(0)
    width, batch, steps, repeats = (4, 2, 4, 1) if args.quick else (16, 8, 32, 7)
    x = torch.rand(batch, 3, 32, 32)
    loader = DataLoader(TensorDataset(torch.rand(64, 3, 32, 32)), batch_size=32)
    snn = Converter(loader, mode="99.9%", progress=False).convert_to_spiking_neurons(_cnn(width))
    graph = to_nir(snn, x[:1])
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "cnn.nir")
    write_nir(graph, path)

    times = median_times(
        {
            f"run_snn, {steps} steps": lambda: run_snn(snn, x, steps),
            "to_nir": lambda: to_nir(snn, x[:1]),
            "write_nir (HDF5)": lambda: write_nir(graph, path),
            "nir.read": lambda: nir.read(path),
        },
        repeats,
    )
    importers, missing = _importers(graph, batch)
    times.update(median_times(importers, repeats))
    os.remove(path)
    os.rmdir(folder)

    base = times[f"run_snn, {steps} steps"]
    ours = times["ours: from_nir"]
    rows = [f"| {name} | {t * 1e3:.1f} | {t / base:.2f}x | {t / ours:.2f}x |" for name, t in times.items()]
    nodes = sum(1 for _ in graph.nodes)
    text = (
        title
        + f"A converted CNN (3 conv layers of width {width}, {2 * width}, {2 * width}, average pooling, 32x32 input; "
        f"{nodes} NIR nodes); median of {repeats} interleaved repeats, {args.threads} torch thread(s), nir "
        f"{getattr(nir, '__version__', '?')}. The importers build a torch module from the same `nir.NIRGraph`.\n\n"
        "| step | time (ms) | vs run_snn | vs our from_nir |\n|---|---:|---:|---:|\n"
        + "\n".join(rows)
        + "\n"
        + (f"\nNot measured (they do not import here): {'; '.join(missing)}.\n" if missing else "")
    )
    emit(text, args.markdown, started)


if __name__ == "__main__":
    main()

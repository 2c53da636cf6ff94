"""The main job (``nox -s demo``) in its quick mode, run as a user would: a subprocess writing to a folder."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest

DEMO = pathlib.Path(__file__).resolve().parents[2] / "docs" / "tutorials" / "demo.py"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, pathlib.Path]:
    out = tmp_path_factory.mktemp("demo")
    result = subprocess.run(
        [sys.executable, str(DEMO), "--quick", "--no-progress", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out,
    )
    assert result.returncode == 0, f"demo failed:\n{result.stdout}\n{result.stderr}"
    return result, out


def test_prints_the_accuracy_table_for_every_configuration(demo_run) -> None:
    result, _ = demo_run
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| configuration"))
    assert re.findall(r"T=(\d+)", header) == ["2", "4", "8"]  # quick mode stops at T=8
    rows = [line for line in lines if line.startswith("| SNN ")]
    labels = [row.split("|")[1].strip() for row in rows]
    *labels, qcfs = labels
    assert labels == [
        "SNN mode='max'",
        "SNN mode='max', v_init=0.5",
        "SNN mode='99.9%'",
        "SNN mode='99.9%', v_init=0.5",
        "SNN mode=0.5",
        "SNN mode=0.5, v_init=0.5",
        "SNN tune_latency pick for T=2 (training-free)",
    ]
    assert re.fullmatch(r"SNN QCFS L=8 \+ \d+ epochs, burst=8", qcfs), qcfs
    for row in [*rows, next(line for line in lines if line.startswith("| ANN (reference)"))]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        accuracies = [float(c) for c in cells[2:]]
        assert len(accuracies) == 3
        assert all(0.0 <= a <= 100.0 for a in accuracies)


def test_writes_the_plot_whose_path_it_prints(demo_run) -> None:
    result, out = demo_run
    match = re.search(r"plot written to (\S+\.png)", result.stdout)
    assert match is not None, result.stdout
    plot = pathlib.Path(match.group(1))
    assert plot.parent == out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.stat().st_size > 10_000  # a real figure with lines and a legend, not an empty canvas


def test_results_are_consistent_with_the_table(demo_run) -> None:
    _, out = demo_run
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True
    configurations = results["cnn"]["configurations"]
    assert len(configurations) == 8  # six calibration settings, the tuner's pick, the QCFS model
    for configuration in configurations:
        assert len(configuration["accuracy_per_step"]) == results["cnn"]["steps"] == 8
        assert configuration["calibration_seconds"] > 0
    table = (out / "cnn_table.md").read_text()
    first = configurations[0]
    row = next(line for line in table.splitlines() if line.startswith(f"| SNN {first['label']} "))
    assert row.rstrip(" |").endswith(f"{100 * first['accuracy_per_step'][7]:.1f}")  # the T=8 column


def test_transformer_td_model_reproduces_the_ann(demo_run) -> None:
    result, out = demo_run
    td = json.loads((out / "results.json").read_text())["transformer"]
    assert td["max_abs_difference"] < 1e-4
    # The same predictions at every step, allowing one of the 540 test samples to flip on a float32 near-tie.
    assert abs(td["td_accuracy"] - td["ann_accuracy"]) <= 1 / 540 + 1e-9
    assert td["naive_max_abs_difference"] > 100 * td["max_abs_difference"]
    assert "largest abs(cumulative output - ANN output)" in result.stdout

"""Benchmark: ReLU -> IF conversion at 1 to 8 time steps (issue 15), against today's best and SpikingJelly 2.0.

Run: ``python packages/ann2snn-fx/benchmarks/bench_fx_lowlat.py [--quick] [--section cost|accuracy] [--markdown PATH]``.

Three tables, measured in one run:

1. Cost: the per-step time of burst/signed IF neurons relative to plain IF neurons (the neuron alone on a
   conv-sized tensor, and the whole converted digits CNN-6 per step), and ``calibrate_snn`` relative to the
   converter's calibration on the same batches (medians of interleaved repeats).
2. Accuracy (%) on scikit-learn's digits test split for CNN-3, CNN-6 and the 10-layer CNN on noisy digits:
   the ANN; today's best training-free configuration (``v_init=0.5`` + ``min_error`` tuned for each T);
   ``tune_latency``'s pick per T (searched on a validation split held out from training, reported on the
   test split); SpikingJelly 2.0.0's ``RateCodingRecipe(half_threshold=True)`` (which SpikingJelly silently
   runs with plain IF neurons unless ``channel_wise=True``), the same with ``channel_wise=True``, and
   ``LocalThresholdBalancingRecipe`` on the same trained model.
3. QCFS: the ANN with ``prepare_qcfs(levels=L)`` (L = 4, 8) fine-tuned for 3 epochs, converted without data,
   with plain and with ``burst=L`` neurons (exact at T = 1: the SNN reproduces the QCFS ANN).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from typing import Any

import torch
import torch.nn as nn
from _timing import emit, median_times
from bench_fx_snn import _digits, _train, digits_cnn3, digits_cnn6, digits_cnn10

from ann2snn_fx import (
    Converter,
    IFNode,
    NeuronFactory,
    ThresholdOptimizer,
    calibrate_snn,
    prepare_qcfs,
    run_snn,
    tune_latency,
)

STEPS = (1, 2, 4, 8)


def _pct(out: torch.Tensor, y: torch.Tensor) -> float:
    return float((out.argmax(-1) == y).double().mean() * 100)


def bench_cost(quick: bool) -> list[str]:
    repeats = 3 if quick else 15
    x = torch.randn(64, 32, 8, 8)
    options = {
        "plain": {},
        "burst=4": {"burst": 4},
        "signed": {"signed": True},
        "burst=4, signed": {"burst": 4, "signed": True},
    }
    steps = 8
    # eval(): the inference kernels (a new IFNode is in training mode, the surrogate-gradient path)
    neurons = {k: IFNode(v_reset=None, v_init=0.5, step_mode="m", **o).eval() for k, o in options.items()}
    seq = x.unsqueeze(0).expand(steps, *x.shape).contiguous() * 0.3

    def neuron_run(n: IFNode) -> Any:
        n.reset()
        with torch.no_grad():
            return n(seq)

    alone = median_times({k: (lambda n=n: neuron_run(n)) for k, n in neurons.items()}, repeats)
    xtr, ytr, _, _ = _digits()
    torch.manual_seed(0)
    ann = _train(digits_cnn6(), xtr, ytr, epochs=1)
    loader = [(xtr[i : i + 128], ytr[i : i + 128]) for i in range(0, 512, 128)]
    snns = {
        k: Converter(
            loader, progress=False, neuron_factory=NeuronFactory(v_init=0.5, **o)
        ).convert_to_spiking_neurons(ann)
        for k, o in options.items()
    }
    batch = xtr[:256]
    whole = median_times(
        {k: (lambda s=s: run_snn(s, batch, steps, multi_step=True)) for k, s in snns.items()}, repeats
    )
    loop = median_times(
        {k: (lambda s=s: run_snn(s, batch, steps)) for k, s in snns.items()}, max(repeats // 3, 2)
    )
    rows = [
        "| neuron | alone, multi-step (8 x [64,32,8,8]) | CNN-6 SNN, multi-step | CNN-6 SNN, step loop |",
        "|---|---:|---:|---:|",
    ]
    for k in options:
        rows.append(
            f"| {k} | {alone[k] * 1e3:.2f} ms ({alone[k] / alone['plain']:.2f}x) | "
            f"{whole[k] * 1e3:.1f} ms ({whole[k] / whole['plain']:.2f}x) | "
            f"{loop[k] * 1e3:.1f} ms ({loop[k] / loop['plain']:.2f}x) |"
        )
    snn = snns["plain"]
    conv = Converter(loader, progress=False, neuron_factory=NeuronFactory(v_init=0.5))
    cal = median_times(
        {
            "converter (calibration + replacement)": lambda: conv.convert_to_spiking_neurons(ann),
            "calibrate_snn(T=2, both)": lambda: calibrate_snn(snn, ann, loader, 2, progress=False),
            "calibrate_snn(T=4, both)": lambda: calibrate_snn(snn, ann, loader, 4, progress=False),
        },
        repeats,
    )
    base = cal["converter (calibration + replacement)"]
    rows += ["", "| calibration on 4 batches of 128 (CNN-6) | time | vs converter |", "|---|---:|---:|"]
    rows += [f"| {k} | {v * 1e3:.0f} ms | {v / base:.2f}x |" for k, v in cal.items()]
    return rows


def _spikingjelly(
    ann: nn.Module, loader: list[Any], x: torch.Tensor, y: torch.Tensor
) -> dict[str, dict[int, float]]:
    try:
        from spikingjelly.activation_based import functional
        from spikingjelly.activation_based.ann2snn import (
            FXConverter,
            LocalThresholdBalancingRecipe,
            RateCodingRecipe,
        )
    except ImportError:  # pragma: no cover
        return {}
    out: dict[str, dict[int, float]] = {}
    recipes = {
        # SpikingJelly 2.0.0 ignores half_threshold=True unless channel_wise=True (plain IF neurons, v = 0).
        "SpikingJelly RateCodingRecipe(max, half_threshold) [plain IF: flag ignored]": RateCodingRecipe(
            loader, half_threshold=True
        ),
        "SpikingJelly RateCodingRecipe(max, channel_wise, half_threshold)": RateCodingRecipe(
            loader, half_threshold=True, channel_wise=True
        ),
        "SpikingJelly LocalThresholdBalancingRecipe": LocalThresholdBalancingRecipe(loader),
    }
    for name, recipe in recipes.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            snn = FXConverter(recipe).convert(copy.deepcopy(ann)).eval()
        functional.reset_net(snn)
        acc, total = {}, torch.zeros(0)
        with torch.no_grad():
            for t in range(1, max(STEPS) + 1):
                y_t = snn(x)
                total = y_t if t == 1 else total + y_t
                if t in STEPS:
                    acc[t] = _pct(total, y)
        out[name] = acc
    return out


def _qcfs(
    ann: nn.Module, xtr: torch.Tensor, ytr: torch.Tensor, x: torch.Tensor, y: torch.Tensor, epochs: int
) -> list[tuple[str, dict[int, float], float]]:
    """QCFS copies (L = 4 and 8) fine-tuned with AdamW + cosine, converted with no data; plain and burst=L IF."""
    loader = [(xtr[i : i + 128], ytr[i : i + 128]) for i in range(0, len(xtr), 128)]
    rows = []
    for levels in (4, 8):
        q = prepare_qcfs(ann, levels=levels, dataloader=loader)
        torch.manual_seed(0)
        opt = torch.optim.AdamW(q.parameters(), 1e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(xtr) + 31) // 32))
        for _ in range(epochs):
            q.train()
            order = torch.randperm(len(xtr))
            for i in range(0, len(xtr), 32):
                idx = order[i : i + 32]
                loss = nn.functional.cross_entropy(q(xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        q.eval()
        with torch.no_grad():
            q_acc = _pct(q(x), y)
        for label, factory in (("IF", NeuronFactory()), (f"burst={levels}", NeuronFactory(burst=levels))):
            snn = Converter(progress=False, neuron_factory=factory).convert_to_spiking_neurons(q)
            out = run_snn(snn, x, max(STEPS), multi_step=True)
            rows.append(
                (f"QCFS L={levels}, {epochs} epochs, {label}", {t: _pct(out[t - 1], y) for t in STEPS}, q_acc)
            )
    return rows


def bench_accuracy(quick: bool) -> list[str]:
    xtr_all, ytr_all, xte, yte = _digits()
    g = torch.Generator().manual_seed(5)
    noisy_tr = (xtr_all + 0.35 * torch.randn(xtr_all.shape, generator=g)).clamp(0, 1)
    noisy_te = (xte + 0.35 * torch.randn(xte.shape, generator=g)).clamp(0, 1)
    cases = [
        ("CNN-3", digits_cnn3, xtr_all, xte),
        ("CNN-6", digits_cnn6, xtr_all, xte),
        ("CNN-10, noisy digits", digits_cnn10, noisy_tr, noisy_te),
    ]
    header = [
        "| model | configuration | ANN | " + " | ".join(f"T={t}" for t in STEPS) + " |",
        "|---|---|---:|" + "---:|" * len(STEPS),
    ]
    rows, notes, qcfs_rows = [], [], []
    for model, build, xtr_full, x in cases[:1] if quick else cases:
        xtr, ytr = xtr_full[:1150], ytr_all[:1150]
        val = [(xtr_full[1150:], ytr_all[1150:])]
        torch.manual_seed(0)
        ann = _train(build(), xtr, ytr, epochs=1 if quick else 8)
        with torch.no_grad():
            ann_acc = _pct(ann(x), yte)
        loader = [(xtr[i : i + 128], ytr[i : i + 128]) for i in range(0, len(xtr), 128)]

        def line(name: str, acc: dict[int, float], ref: float = ann_acc, model: str = model) -> str:
            return (
                f"| {model} | {name} | {ref:.1f} | "
                + " | ".join(f"{acc[t]:.1f}" if t in acc else "-" for t in STEPS)
                + " |"
            )

        today = {}
        for t in STEPS:
            snn = Converter(
                loader,
                progress=False,
                neuron_factory=NeuronFactory(v_init=0.5),
                threshold_optimizer=ThresholdOptimizer("min_error", time_steps=t, v_init=0.5),
            ).convert_to_spiking_neurons(ann)
            today[t] = _pct(run_snn(snn, x, t, multi_step=True)[-1], yte)
        rows.append(line("today's best: v_init=0.5 + min_error(T)", today))
        start = time.perf_counter()
        grid: dict[str, Any] = {"bursts": (1, 2), "signed": (False,), "modes": ("max",)} if quick else {}
        result = tune_latency(ann, loader, val, STEPS, v_inits=(0.5,), progress=False, **grid)
        seconds = time.perf_counter() - start
        tuned, picks = {}, []
        for t in STEPS:
            best = result.best(t)
            if best is None:
                continue
            tuned[t] = _test_accuracy(ann, loader, best, x, yte)
            picks.append(f"T={t}: {best.label} (val {best.accuracy:.1f})")
        rows.append(line("tune_latency pick per T (on validation), test accuracy", tuned))
        notes.append(
            f"- {model}: tune_latency evaluated {len(result.records)} records in {seconds:.0f} s; picks: "
            + "; ".join(picks)
        )
        for name, acc in _spikingjelly(ann, loader, x, yte).items():
            rows.append(line(name, acc))
        if "noisy" not in model:
            for name, acc, q_acc in _qcfs(ann, xtr, ytr, x, yte, epochs=1 if quick else 3):
                qcfs_rows.append(line(name, acc, q_acc))
    return header + rows + ["", *notes, "", *header, *qcfs_rows]


def _test_accuracy(ann: nn.Module, loader: list[Any], record: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    """Rebuild a tuner record's configuration and measure it on the test split."""
    optimizer = (
        ThresholdOptimizer("min_error", time_steps=record.time_steps * record.burst, v_init=record.v_init)
        if record.strategy == "min_error"
        else ThresholdOptimizer(record.strategy)
    )
    mode = "max" if record.mode == "-" else record.mode
    snn = Converter(
        loader,
        mode=mode,
        progress=False,
        threshold_optimizer=optimizer,
        neuron_factory=NeuronFactory(v_init=record.v_init, burst=record.burst, signed=record.signed),
    ).convert_to_spiking_neurons(ann)
    if record.calibration:
        snn = calibrate_snn(snn, ann, loader, record.time_steps, record.calibration, progress=False)
    out = run_snn(snn, x, record.time_steps, multi_step=True, skip_steps=record.skip_steps)
    return _pct(out[-1], y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="one model, small grid, few repeats (a smoke test)"
    )
    parser.add_argument("--markdown", help="write the markdown section to this path")
    parser.add_argument(
        "--section",
        choices=("all", "cost", "accuracy"),
        default="all",
        help="measure only the cost table or only the accuracy tables (default: all)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lines = [
        "## ann2snn-fx: low-latency ReLU -> IF conversion",
        "",
        f"Measured on CPU with {torch.get_num_threads()} torch thread(s), medians of interleaved repeats, on a "
        "machine other sessions may share: read the times as ratios measured side by side.",
        "",
    ]
    if args.section in ("all", "cost"):
        lines += [
            "Cost of the neuron options (8 steps) and of calibrate_snn:",
            "",
            *bench_cost(args.quick),
            "",
        ]
    if args.section in ("all", "accuracy"):
        lines += [
            "Accuracy (%) on the digits test split (360 images); models trained on 1150 training images, the other 287 "
            "are the tuner's validation split; the noisy case adds Gaussian noise (sigma 0.35) and uses 10 conv layers. "
            "The QCFS rows' ANN column is the fine-tuned QCFS ANN.",
            "",
            *bench_accuracy(args.quick),
            "",
        ]
    emit("\n".join(lines), args.markdown, start)


if __name__ == "__main__":
    main()

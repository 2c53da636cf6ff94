"""Benchmark: the ReLU -> IF converter's calibration cost, SNN simulation cost and accuracy against T.

Run: ``python packages/ann2snn-fx/benchmarks/bench_fx_snn.py [--quick] [--markdown PATH]``.

Three tables, each measured side by side in one run (medians of interleaved repeats):

1. Calibration: the calibration pass per mode (the ANN with the converter's hooks) and the whole
   ``Converter.convert_to_spiking_neurons`` call, relative to plain ANN inference over the same N batches.
2. Simulation: T steps of the converted SNN, as the step loop (``run_snn``) and the multi-step execution
   (``run_snn(..., multi_step=True)``), relative to T forwards of the ANN on the same batch.

The ANN baseline has its Conv+BatchNorm pairs folded (as the converter does), so the ratios show the cost of
the hooks and of the spiking blocks, not the saving of the fusion.
3. Accuracy against T on scikit-learn's digits for two small CNNs (3 and 6 conv layers, trained here for a
   few seconds) and a harder case (10 conv layers on noisy digits), for default neurons, ``v_init=0.5``, and
   ``v_init=0.5`` with the threshold strategies.
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from _timing import emit, median_times

from ann2snn_fx import Converter, NeuronFactory, ThresholdOptimizer, run_snn, trace_model


def _block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def digits_cnn3() -> nn.Module:
    return nn.Sequential(
        *_block(1, 16),
        *_block(16, 32),
        nn.AvgPool2d(2),
        *_block(32, 32),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def digits_cnn6() -> nn.Module:
    return nn.Sequential(
        *_block(1, 16),
        *_block(16, 16),
        nn.AvgPool2d(2),
        *_block(16, 32),
        *_block(32, 32),
        nn.AvgPool2d(2),
        *_block(32, 32),
        *_block(32, 32),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def digits_cnn10() -> nn.Module:
    layers: list[nn.Module] = []
    cin = 1
    for i, cout in enumerate([16, 16, 16, 32, 32, 32, 64, 64, 64, 64]):
        layers += _block(cin, cout)
        cin = cout
        if i in (2, 5):
            layers.append(nn.AvgPool2d(2))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.short(x))


class CifarResNet(nn.Module):
    """A CIFAR-style ResNet-10 (widths 32-64-128-256) on 3x32x32 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_block(3, 32))
        widths = [(32, 32, 1), (32, 64, 2), (64, 128, 2), (128, 256, 2)]
        self.layers = nn.Sequential(*[BasicBlock(a, b, s) for a, b, s in widths])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _fused(ann: nn.Module) -> nn.Module:
    """The ANN with Conv+BatchNorm folded: the fair baseline, since the converter folds them too."""
    return Converter.fuse(trace_model(copy.deepcopy(ann)).eval())


def _models(quick: bool) -> list[tuple[str, nn.Module, tuple[int, ...], int]]:
    torch.manual_seed(0)
    cases = [("digits CNN-6 (1x8x8)", _randomise_bn(digits_cnn6()), (1, 8, 8), 64)]
    if not quick:
        cases.append(("digits CNN-6 (1x8x8)", _randomise_bn(digits_cnn6()), (1, 8, 8), 256))
        cases.append(("CIFAR ResNet-10 (3x32x32)", _randomise_bn(CifarResNet()), (3, 32, 32), 16))
    return cases


MODES: list[Any] = ["max", "99.9%", 0.5]


def _ann_inference(model: nn.Module, batches: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for x in batches:
            model(x)


def _hooked(ann: nn.Module, mode: Any) -> nn.Module:
    """The fused ANN with the converter's calibration hooks, as ``convert_to_spiking_neurons`` runs it."""
    return Converter.set_voltagehook(_fused(ann), mode=mode)


def bench_calibration(quick: bool) -> list[str]:
    repeats = 1 if quick else 5
    rows = []
    for name, ann, shape, batch in _models(quick):
        g = torch.Generator().manual_seed(1)
        n = 2 if quick else 4
        loader = [torch.randn(batch, *shape, generator=g) for _ in range(n)]
        fns: dict[str, Callable[[], object]] = {"ann": functools.partial(_ann_inference, _fused(ann), loader)}
        for mode in MODES:
            fns[str(mode)] = functools.partial(_ann_inference, _hooked(ann, mode), loader)
        converter = Converter(loader, progress=False)
        fns["convert"] = functools.partial(converter.convert_to_spiking_neurons, ann)
        times = median_times(fns, repeats)
        ratios = " | ".join(f"{times[str(m)] / times['ann']:.2f}x" for m in MODES)
        rows.append(
            f"| {name} | {n} x {batch} | {times['ann'] * 1e3:.1f} ms | {ratios} | {times['convert'] / times['ann']:.2f}x |"
        )
    header = [
        "| model | batches | ANN inference | max | 99.9% | 0.5 | whole conversion (max) |",
        "|---|---|---|---|---|---|---|",
    ]
    return header + rows


def bench_simulation(quick: bool) -> list[str]:
    repeats = 1 if quick else 5
    steps_list = [4] if quick else [4, 16]
    rows = []
    for name, ann, shape, batch in _models(quick):
        g = torch.Generator().manual_seed(2)
        loader = [torch.randn(batch, *shape, generator=g) for _ in range(2)]
        snn = Converter(loader, progress=False).convert_to_spiking_neurons(ann)
        fused = _fused(ann)
        x = loader[0]
        for steps in steps_list:
            times = median_times(
                {
                    "ann": functools.partial(_ann_inference, fused, [x] * steps),
                    "loop": functools.partial(run_snn, snn, x, steps),
                    "multi": functools.partial(run_snn, snn, x, steps, multi_step=True),
                },
                repeats,
            )
            one = times["ann"] / steps
            rows.append(
                f"| {name} | {batch} | {steps} | {times['ann'] * 1e3:.1f} ms | {times['loop'] / times['ann']:.2f}x "
                f"| {times['multi'] / times['ann']:.2f}x | {times['loop'] / one:.1f}x | {times['multi'] / one:.1f}x |"
            )
    header = [
        "| model | batch | T | T ANN forwards | step loop | multi-step | step loop vs 1 ANN forward "
        "| multi-step vs 1 ANN forward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return header + rows


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1437], y[:1437], x[1437:], y[1437:]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int = 32) -> nn.Module:
    torch.manual_seed(0)
    steps = epochs * ((len(x) + batch - 1) // batch)
    opt = torch.optim.AdamW(model.parameters(), 1e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=steps)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def bench_accuracy(quick: bool) -> list[str]:
    xtr, ytr, xte, yte = _digits()
    steps = [1, 2, 4, 8, 16, 32, 64]
    half = NeuronFactory(v_init=0.5)
    configs: list[tuple[str, dict[str, Any]]] = [
        ("max, default neurons", {}),
        ("max, v_init=0.5", {"neuron_factory": half}),
        ("99.9%, v_init=0.5", {"mode": "99.9%", "neuron_factory": half}),
        (
            "max, v_init=0.5, min_error(T=4)",
            {
                "neuron_factory": half,
                "threshold_optimizer": ThresholdOptimizer("min_error", time_steps=4, v_init=0.5),
            },
        ),
        (
            "max, v_init=0.5, per_channel",
            {"neuron_factory": half, "threshold_optimizer": ThresholdOptimizer("per_channel")},
        ),
        (
            "99.9%, v_init=0.5, per_channel",
            {
                "mode": "99.9%",
                "neuron_factory": half,
                "threshold_optimizer": ThresholdOptimizer("per_channel"),
            },
        ),
    ]
    if quick:
        configs = configs[:2]
    g = torch.Generator().manual_seed(5)
    noisy_train = (xtr + 0.35 * torch.randn(xtr.shape, generator=g)).clamp(0, 1)
    noisy_test = (xte + 0.35 * torch.randn(xte.shape, generator=g)).clamp(0, 1)
    header = ["| model | configuration | ANN | " + " | ".join(f"T={t}" for t in steps) + " |"]
    header.append("|---|---|---|" + "---|" * len(steps))
    rows = []
    cases = [
        ("CNN-3", digits_cnn3, xtr, xte),
        ("CNN-6", digits_cnn6, xtr, xte),
        ("CNN-10, noisy digits", digits_cnn10, noisy_train, noisy_test),
    ]
    for model_name, build, train_x, test_x in cases[:1] if quick else cases:
        torch.manual_seed(0)
        ann = _train(build(), train_x, ytr, epochs=1 if quick else 8)
        with torch.no_grad():
            ann_acc = (ann(test_x).argmax(1) == yte).float().mean().item() * 100
        loader = [(train_x[i : i + 128], ytr[i : i + 128]) for i in range(0, len(train_x), 128)]
        for config_name, options in configs:
            snn = Converter(loader, progress=False, **options).convert_to_spiking_neurons(ann)
            out = run_snn(snn, test_x, max(steps), multi_step=True)
            accs = [(out[t - 1].argmax(1) == yte).float().mean().item() * 100 for t in steps]
            rows.append(
                f"| {model_name} | {config_name} | {ann_acc:.1f} | "
                + " | ".join(f"{a:.1f}" for a in accs)
                + " |"
            )
    return header + rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (a smoke test)")
    parser.add_argument("--markdown", help="write the markdown section to this path")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    lines = [
        "## ann2snn-fx: ReLU -> IF conversion",
        "",
        f"Measured on CPU with {threads} torch threads, medians of interleaved repeats.",
        "",
        "Calibration: the calibration pass (the Conv+BN-folded ANN with the converter's hooks, per mode) and the "
        "whole `convert_to_spiking_neurons` call (copy, trace, fuse, hooks, calibration, replacement), relative to "
        "plain inference of the Conv+BN-folded ANN over the same batches.",
        "",
        *bench_calibration(args.quick),
        "",
        "Simulation: T steps of the converted SNN relative to T forwards of the ANN (Conv+BN folded) on the same "
        "batch; the step loop calls the SNN once per step, the multi-step execution runs stateless layers on "
        "`[t*B, ...]` chunks of steps (layers before the first neuron once per chunk) and loops only the fused "
        "neurons.",
        "",
        *bench_simulation(args.quick),
        "",
        "Accuracy (%) against T on scikit-learn's digits test split (360 images), CNNs trained here for 8 epochs; "
        "the harder case adds Gaussian noise (sigma 0.35, clipped to [0, 1]) to the images and uses 10 conv layers.",
        "",
        *bench_accuracy(args.quick),
        "",
    ]
    emit("\n".join(lines), args.markdown, start)


if __name__ == "__main__":
    main()

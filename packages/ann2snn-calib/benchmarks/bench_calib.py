"""Cost of one VoltageHook call per mode, beside the reference's numpy percentile and a conv forward.

For ReLU activations of a 3x3 convolution (16 -> 64 channels) from 1e5 to 5e7 elements, it times one hook
call per mode and reports it relative to the ``"Max"`` hook and to the conv forward that produced the
activation. The reference column does what the anchor's percentile hook does, ``np.percentile`` on a CPU
copy of the whole activation; ``torch.quantile`` is shown where it accepts the size (at most 2**24).
All candidates of one size run interleaved, repeat after repeat, and each figure is a median.

    python bench_calib.py                  # full run, about a minute (one torch thread, CPU-time clock)
    python bench_calib.py --quick          # seconds, for smoke tests
    python bench_calib.py --markdown out.md
    python bench_calib.py --threads 2 --clock wall   # wall time with two threads, on a quiet machine

By default one torch thread runs and the clock is the process's CPU time: on a shared machine that
measures the work each call does, where wall time mostly measures the other jobs.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn

from ann2snn_calib import VoltageHook

# (label, batch, height = width); 64 output channels.
FULL = [("1e5", 1, 40), ("1e6", 1, 125), ("1e7", 10, 125), ("2.5e7", 25, 125), ("5e7", 50, 125)]
QUICK = [("1e4", 1, 12), ("1e5", 1, 40)]
# (column, mode, momentum, channel_dim)
MODES: list[tuple[str, object, float | None, int | None]] = [
    ("Max", "Max", 0.1, None),
    ("0.5 x max", 0.5, 0.1, None),
    ("99.9%", "99.9%", 0.1, None),
    ("99%", "99%", 0.1, None),
    ("50%", "50%", 0.1, None),
    ("99.9%, momentum=None", "99.9%", None, None),
    ("99.9% per channel", "99.9%", 0.1, 1),
]


def _reference_percentile(x: torch.Tensor, p: float) -> torch.Tensor:
    """What the anchor's hook does per call: a host copy and numpy over all elements."""
    return torch.tensor(np.percentile(x.detach().cpu(), p))


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor | None:
    return torch.quantile(x.reshape(-1), q) if x.numel() <= (1 << 24) else None


def _candidates(conv: nn.Module, inp: torch.Tensor, act: torch.Tensor) -> dict[str, Callable[[], object]]:
    fns: dict[str, Callable[[], object]] = {"conv": partial(conv, inp)}
    for name, mode, momentum, channel_dim in MODES:
        hook = VoltageHook(mode=mode, momentum=momentum, channel_dim=channel_dim)  # type: ignore[arg-type]
        fns[name] = partial(hook, act)
    fns["reference np 99.9%"] = partial(_reference_percentile, act, 99.9)
    if act.numel() <= (1 << 24):
        fns["torch.quantile 99.9%"] = partial(_quantile, act, 0.999)
    return fns


def _time(fns: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float]) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up (allocations, the hook's first-batch path)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)  # no candidate always runs right after the conv (cold caches)
        for name in order:
            fn = fns[name]
            start = clock()
            fn()
            samples[name].append(clock() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def run(quick: bool, clock: Callable[[], float]) -> tuple[list[str], list[list[str]], list[list[str]]]:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 64, 3, padding=1).eval()
    sizes = QUICK if quick else FULL
    columns = [name for name, *_ in MODES] + ["reference np 99.9%", "torch.quantile 99.9%"]
    vs_max: list[list[str]] = []
    vs_conv: list[list[str]] = []
    for label, batch, hw in sizes:
        inp = torch.randn(batch, 16, hw, hw)
        with torch.no_grad():
            act = torch.relu(conv(inp))
        n = act.numel()
        fns = _candidates(conv, inp, act)
        repeats = 3 if quick else (7 if n <= 2_000_000 else 5 if n <= 20_000_000 else 3)
        with torch.no_grad():
            t = _time(fns, repeats, clock)
        base, conv_t = t["Max"], t["conv"]
        vs_max.append(
            [f"{label} ({n:,})", f"{base * 1e3:.2f}"]
            + [f"{t[c] / base:.1f}" if c in t else "fails" for c in columns]
        )
        vs_conv.append(
            [f"{label} ({n:,})", f"{conv_t * 1e3:.1f}"]
            + [f"{t[c] / conv_t:.3f}" if c in t else "fails" for c in columns]
        )
        print(f"measured {label}", file=sys.stderr, flush=True)
    return columns, vs_max, vs_conv


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--markdown", metavar="PATH", help="also write the section as markdown to PATH")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="cpu",
        help="cpu (default): this process's CPU time, the work done, steady on a shared machine with one "
        "thread; wall: perf_counter, for a quiet machine or several threads",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    columns, vs_max, vs_conv = run(args.quick, clock)
    clock_name = "wall" if args.clock == "wall" else "process CPU-time"
    text = "\n\n".join(
        [
            "## ann2snn-calib: VoltageHook cost per call",
            "One hook call on the ReLU output of a 3x3 conv (16 -> 64 channels), per mode, relative to the "
            '`"Max"` hook and to the conv forward that produced the activation, beside the reference\'s '
            "percentile (`np.percentile` on a CPU copy) and `torch.quantile` (which refuses more than 2**24 "
            f"elements). Medians of interleaved repeats, {torch.get_num_threads()} torch thread(s), "
            f"{os.cpu_count()} cores, {clock_name} clock, torch {torch.__version__}. Every percentile here "
            "is exact.",
            "Time relative to the Max hook (lower is better):",
            _table(["activation (elements)", "Max hook (ms)", *columns], vs_max),
            "Time relative to the conv forward producing the activation:",
            _table(["activation (elements)", "conv (ms)", *columns], vs_conv),
        ]
    )
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()

"""Timing shared by this package's benchmark scripts (imported from the scripts' own folder)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable


def median_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Medians of interleaved timings (one warm-up each), so every path sees the same machine state."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark script takes: ``--quick``, ``--markdown PATH``, ``--threads N``."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (a smoke test)")
    parser.add_argument("--markdown", help="write the markdown section to this path")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    return parser


def emit(text: str, markdown: str | None, started: float | None = None) -> None:
    """Print the section (and the time since ``started``, a ``time.perf_counter()``) and write it to
    ``markdown`` when given."""
    print(text)
    if started is not None:
        print(f"(total {time.perf_counter() - started:.1f} s)")
    if markdown:
        with open(markdown, "w", encoding="utf-8") as handle:
            handle.write(text)

"""Timing shared by this package's benchmark scripts (imported from the scripts' own folder)."""

from __future__ import annotations

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

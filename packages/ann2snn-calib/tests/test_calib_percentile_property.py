"""Property test: for any data and any q in [0, 100], percentile equals numpy.percentile exactly."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ann2snn_calib import percentile


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    # Small (sort), medium (direct quickselect) and large (sample bracket) sizes; tails take the block path.
    n = draw(st.one_of(st.integers(1, 64), st.integers(4000, 70_000), st.integers(140_000, 300_000)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["normal", "relu", "ties", "sorted", "reversed", "spikes"]))
    x = torch.randn(n, generator=g)
    if kind == "relu":
        x = torch.relu(x)
    elif kind == "ties":
        x = torch.randint(0, draw(st.integers(1, 5)), (n,), generator=g).float()
    elif kind == "sorted":
        x = torch.sort(x).values
    elif kind == "reversed":
        x = torch.sort(x, descending=True).values
    elif kind == "spikes":
        x = torch.zeros(n)
        x[torch.randint(0, n, (draw(st.integers(1, 50)),), generator=g)] = 1e3
    return x


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    x=tensors(),
    q=st.one_of(
        st.floats(0, 100, allow_nan=False),
        st.sampled_from([0.0, 50.0, 99.0, 99.9, 99.99, 100.0, 0.01, 1.0]),
    ),
)
def test_percentile_is_numpy_percentile(x: torch.Tensor, q: float) -> None:
    assert percentile(x, q).item() == np.percentile(x.numpy(), q)

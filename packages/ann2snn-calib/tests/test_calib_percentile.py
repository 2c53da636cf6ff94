"""``ann2snn_calib.percentile`` equals ``numpy.percentile`` (linear) bit for bit, on every path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ann2snn_calib._select as select
from ann2snn_calib import percentile

PS = [0, 0.1, 1, 3.7, 25, 50, 75, 99, 99.9, 99.99, 100]


def _data(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, generator=g)
    if kind == "relu":  # half zeros: heavy ties at the bottom, as after a ReLU
        return torch.relu(torch.randn(n, generator=g))
    if kind == "ties":
        return torch.randint(0, 7, (n,), generator=g).float()
    if kind == "skewed":  # a few huge outliers
        x = torch.rand(n, generator=g)
        x[torch.randint(0, n, (max(1, n // 500),), generator=g)] *= 1e4
        return x
    if kind == "sorted":
        return torch.sort(torch.randn(n, generator=g)).values
    raise AssertionError(kind)


def _ref(x: torch.Tensor, p: float) -> np.ndarray:
    return np.percentile(x.numpy(), p)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 4097, 10_000, 262_147])
@pytest.mark.parametrize("kind", ["normal", "relu", "ties", "skewed", "sorted"])
def test_equals_numpy_bit_for_bit(n: int, kind: str) -> None:
    x = _data(kind, n, seed=n)
    for p in PS:
        got = percentile(x, p)
        assert got.dtype == torch.float32
        assert got.item() == _ref(x, p), (p, got.item(), _ref(x, p))


@pytest.mark.parametrize("shape", [(), (1,), (4, 3, 5, 5), (2, 1000, 3)])
def test_any_shape_and_non_contiguous(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    if x.dim() >= 2:
        x = x.transpose(0, -1)  # a non-contiguous view
    for p in [0, 50, 99.9, 100]:
        assert percentile(x, p).item() == _ref(x.contiguous(), p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_give_float32_of_upcast_values(dtype: torch.dtype) -> None:
    x = torch.randn(300_001, generator=torch.Generator().manual_seed(1)).to(dtype)
    for p in [0, 12.5, 50, 99.9, 100]:
        got = percentile(x, p)
        assert got.dtype == torch.float32
        assert got.item() == _ref(x.float(), p)


def test_float64_and_integers_give_float64() -> None:
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    i = torch.randint(-50, 50, (50_000,), generator=torch.Generator().manual_seed(3))
    for p in [0, 33.3, 50, 99.9, 100]:
        assert percentile(x, p).dtype == torch.float64
        assert percentile(x, p).item() == _ref(x, p)
        assert percentile(i, p).dtype == torch.float64
        assert percentile(i, p).item() == _ref(i, p)


@pytest.mark.parametrize("n", [10, 100_000])
def test_nan_and_inf_follow_numpy(n: int) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(4))
    x[n // 3] = float("nan")
    for p in [0, 50, 99.9, 100]:
        assert percentile(x, p).isnan()
    y = torch.randn(n, generator=torch.Generator().manual_seed(5))
    y[:3] = float("inf")
    y[3:5] = float("-inf")
    with np.errstate(invalid="ignore"):
        for p in [0, 1, 50, 99.9, 100]:
            np.testing.assert_array_equal(percentile(y, p).numpy(), _ref(y, p))


def test_every_selection_path_is_exercised_and_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    blocks: list[int] = []
    central: list[int] = []
    block_size, pair_central = select._block_size, select.pair_central

    def record_blocks(n: int, k: int) -> int:
        blocks.append(block_size(n, k))
        return blocks[-1]

    def record_central(x: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        central.append(x.numel())
        return pair_central(x, lo, hi)

    monkeypatch.setattr(select, "_block_size", record_blocks)
    monkeypatch.setattr(select, "pair_central", record_central)
    x = _data("normal", 500_000, seed=6)
    for p in [0.05, 0.5, 2, 50, 97, 99.5, 99.95]:
        assert percentile(x, p).item() == _ref(x, p)
    assert {64, 16, 8} <= set(blocks)
    assert 0 in blocks
    assert central


def test_central_selection_survives_a_misleading_sample() -> None:
    # The strided sample sees only the shifted elements; the counts reject its bracket.
    n = 200_000
    x = _data("normal", n, seed=9)
    x[:: n // select._SAMPLE] += 100
    for p in [30, 50, 70]:
        assert percentile(x, p).item() == _ref(x, p)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_tail_bound_survives_a_misleading_sample_of_block_maxima(sign: float) -> None:
    # Only the blocks the strided sample of block maxima looks at are shifted, so the sample's bound
    # is reached by too few blocks; the count rejects it and the exact bound takes over.
    n, block = 2_000_000, 64
    nb = n // block
    stride = nb // select._BOUND_SAMPLE
    assert nb > 4 * select._BOUND_SAMPLE
    x = _data("normal", n, seed=10).view(nb, block)
    x[::stride] += sign * 100
    x = x.reshape(-1)
    for p in [0.1, 99.9]:
        assert percentile(x, p).item() == _ref(x, p)


@pytest.mark.slow
def test_more_than_2_pow_24_elements() -> None:
    n = (1 << 24) + 3
    x = torch.randn(n, generator=torch.Generator().manual_seed(7))
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(x, 0.999)
    for p in [99.9, 50]:
        assert percentile(x, p).item() == _ref(x, p)


@pytest.mark.parametrize(
    ("x", "q", "exc", "match"),
    [
        ([1.0, 2.0], 50, TypeError, "torch.Tensor"),
        (torch.ones(3), "50", TypeError, "real number"),
        (torch.ones(3), True, TypeError, "real number"),
        (torch.ones(3), -0.1, ValueError, r"\[0, 100\]"),
        (torch.ones(3), 100.5, ValueError, r"\[0, 100\]"),
        (torch.ones(3), float("nan"), ValueError, r"\[0, 100\]"),
        (torch.empty(0), 50, ValueError, "empty"),
        (torch.empty(3, 0), 50, ValueError, "empty"),
        (torch.ones(3, dtype=torch.complex64), 50, TypeError, "real tensor"),
    ],
)
def test_validation(x: object, q: object, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        percentile(x, q)  # type: ignore[arg-type]


def test_stays_on_device_and_leaves_input_alone() -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(8), requires_grad=True)
    before = x.detach().clone()
    out = percentile(x, 99.9)
    assert out.device == x.device
    assert not out.requires_grad
    assert torch.equal(x.detach(), before)

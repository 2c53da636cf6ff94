"""``running_sum``: the TD operators' running sum, public (ann2snn-fx's folded path uses it)."""

from __future__ import annotations

import pytest
import torch

from ann2snn_ops import running_sum

# both sides of the one-call size (40k elements) and of cumulative_exact's (100k)
SHAPES = [(1, 5), (4, 3, 7), (8, 50, 100), (4, 300, 200), (16, 100, 100)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_equals_torch_cumsum_bit_for_bit(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    assert torch.equal(running_sum(x, exact=True), torch.cumsum(x, 0))


@pytest.mark.parametrize("shape", SHAPES)
def test_fast_agrees_with_torch_cumsum_to_rounding(shape: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    x = torch.randn(shape)
    got, ref = running_sum(x), torch.cumsum(x.double(), 0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * shape[0])
    if x.numel() <= 40_000:  # small: torch.cumsum itself
        assert torch.equal(got, torch.cumsum(x, 0))


def test_non_contiguous_and_half_into_float32() -> None:
    torch.manual_seed(2)
    x = torch.randn(6, 80, 90).transpose(1, 2)  # 43 200 elements: the step loop, on a strided input
    torch.testing.assert_close(running_sum(x), torch.cumsum(x.double(), 0).float(), rtol=1e-5, atol=1e-5)
    h = torch.randn(5, 10, dtype=torch.bfloat16)
    out = running_sum(h, torch.float32)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.cumsum(h, 0, dtype=torch.float32))
    assert torch.equal(running_sum(h, torch.float32, exact=True), torch.cumsum(h, 0, dtype=torch.float32))


def test_differentiable_where_autograd_records() -> None:
    x = torch.randn(4, 300, 200, dtype=torch.float64, requires_grad=True)
    weights = torch.randn_like(x)
    (running_sum(x) * weights).sum().backward()
    assert x.grad is not None
    # d/dx[t] of sum_s w[s] * cumsum(x)[s] is the sum of w over s >= t
    torch.testing.assert_close(x.grad, weights.flip(0).cumsum(0).flip(0))


def test_does_not_change_its_input() -> None:
    x = torch.randn(4, 300, 200)
    before = x.clone()
    running_sum(x)
    running_sum(x, exact=True)
    assert torch.equal(x, before)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (([1.0, 2.0],), {}, TypeError, "expects a tensor"),
        ((torch.tensor(1.0),), {}, ValueError, "0-d"),
        ((torch.ones(2, 2), "float32"), {}, TypeError, "torch.dtype"),
    ],
)
def test_bad_input_is_refused(args: tuple, kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        running_sum(*args, **kwargs)

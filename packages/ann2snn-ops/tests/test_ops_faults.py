"""Issue 12: second derivatives, type promotion, attention input checks, streaming shapes, running sums.

Each case is checked against torch itself: gradgradcheck (numerical second derivatives), the plain op on the
cumulative input, and what ``F.scaled_dot_product_attention`` / ``nn.MultiheadAttention`` accept or refuse.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ann2snn_ops import (
    TDGELU,
    TDConv2d,
    TDFunction,
    TDLayerNorm,
    TDLinear,
    TDMatMul,
    TDMul,
    TDMultiheadAttention,
    TDRMSNorm,
    TDScaledDotProductAttention,
    TDSiLU,
    TDSoftmax,
)


def _x(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _diff(y_cum: torch.Tensor) -> torch.Tensor:
    return torch.diff(y_cum, dim=0, prepend=torch.zeros_like(y_cum[:1]))


# -- double backward ------------------------------------------------------------------------------------------

UNARY: dict[str, Callable[[], nn.Module]] = {
    "gelu": TDGELU,
    "gelu_tanh": lambda: TDGELU("tanh"),
    "silu": TDSiLU,
    "softmax": lambda: TDSoftmax(-1),
    "layer_norm": lambda: TDLayerNorm(3),
    "rms_norm": lambda: TDRMSNorm(3),
    "tanh": lambda: TDFunction(torch.tanh),
    "linear": lambda: TDLinear(3, 2),
    "conv2d": lambda: TDConv2d(3, 2, 3, padding=1),
}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_second_derivatives(name: str) -> None:
    op = UNARY[name]().double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in op.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    shape = (3, 1, 3, 4, 4) if name == "conv2d" else (3, 2, 3)
    x = _x(shape, 0).requires_grad_(True)
    assert torch.autograd.gradgradcheck(op, (x,))
    names = [n for n, _ in op.named_parameters()]
    if names:  # second derivatives that mix parameters and input
        params = tuple(p.detach().clone().requires_grad_(True) for p in op.parameters())
        assert torch.autograd.gradgradcheck(
            lambda xx, *ps: torch.func.functional_call(op, dict(zip(names, ps)), (xx,)), (x, *params)
        )


def test_second_derivative_equals_the_plain_op_on_the_cumulative_input() -> None:
    """A gradient penalty: d/dx |d(sum w*y)/dx|^2 through the TD op and through the plain op."""
    x = _x((4, 2, 5), 2).requires_grad_(True)
    w = _x((4, 2, 5), 3)
    op = TDLayerNorm(5).double()
    with torch.no_grad():
        op.weight.normal_()
        op.bias.normal_()
    for y, ref in (
        (op(x), _diff(F.layer_norm(x.cumsum(0), (5,), op.weight, op.bias))),
        (TDGELU()(x), _diff(F.gelu(x.cumsum(0)))),
        (TDSoftmax()(x), _diff(torch.softmax(x.cumsum(0), -1))),
    ):
        (gy,) = torch.autograd.grad((w * y).sum(), x, create_graph=True)
        (gr,) = torch.autograd.grad((w * ref).sum(), x, create_graph=True)
        (hy,) = torch.autograd.grad(gy.pow(2).sum(), x)
        (hr,) = torch.autograd.grad(gr.pow(2).sum(), x)
        torch.testing.assert_close(hy, hr)


def test_attention_and_products_second_derivatives() -> None:
    a = _x((2, 2, 3), 0).requires_grad_(True)
    b = _x((2, 3, 2), 1).requires_grad_(True)
    assert torch.autograd.gradgradcheck(TDMatMul(), (a, b))
    assert torch.autograd.gradgradcheck(TDMul(), (a, _x((2, 2, 3), 2).requires_grad_(True)))
    q, k, v = (_x((2, 1, 3, 4), i).requires_grad_(True) for i in range(3))
    mha = TDMultiheadAttention(4, 2).double()
    # torch's default CPU SDPA kernel (flash) has no second derivative, for the plain op as for ours:
    # torch raises "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    # implemented" in both cases; with the math kernel both are twice differentiable.
    with sdpa_kernel(SDPBackend.MATH):
        assert torch.autograd.gradgradcheck(TDScaledDotProductAttention(), (q, k, v))
        assert torch.autograd.gradgradcheck(lambda t: mha(t, t, t)[0], (q,))


# -- type promotion ------------------------------------------------------------------------------------------


def test_function_of_integer_input_follows_torch_type_promotion() -> None:
    x = torch.randint(-3, 4, (4, 2, 3))
    y = TDFunction(torch.tanh)(x)
    expected = _diff(torch.tanh(x.cumsum(0)))
    assert y.dtype == expected.dtype == torch.get_default_dtype()
    torch.testing.assert_close(y, expected)
    assert y.abs().sum() > 0
    steps = TDFunction(torch.tanh).set_streaming(True)
    torch.testing.assert_close(torch.stack([steps(x[t]) for t in range(4)]), expected)
    doubled = TDFunction(lambda t: 2 * t)(x)  # an integer function stays integer, exactly
    assert doubled.dtype == torch.int64
    assert torch.equal(doubled, 2 * x)


# -- attention inputs: do what torch does --------------------------------------------------------------------

_Q, _K, _V = _x((2, 3, 4), 0, torch.float32), _x((2, 5, 4), 1, torch.float32), _x((2, 5, 6), 2, torch.float32)
SDPA_CASES: dict[str, tuple[tuple[torch.Tensor, ...], object, str]] = {
    # name: ((q, k, v), attn_mask, pattern of our message)
    "int64 mask": (
        (_Q, _K, _V),
        torch.zeros(3, 5, dtype=torch.int64),
        r"attn_mask of dtype torch.bool.*int64",
    ),
    "uint8 mask": ((_Q, _K, _V), torch.zeros(3, 5, dtype=torch.uint8), r"attn_mask.*torch.uint8"),
    "float64 mask": ((_Q, _K, _V), torch.zeros(3, 5, dtype=torch.float64), r"attn_mask.*torch.float64"),
    "float32 mask, float64 query": ((_Q.double(), _K.double(), _V.double()), torch.randn(3, 5), ""),
    "bool mask": ((_Q, _K, _V), torch.rand(3, 5) > 0.2, ""),
    "list mask": ((_Q, _K, _V), [[True] * 5] * 3, r"attn_mask to be a torch.Tensor or None, but got list"),
    "mixed key dtype": ((_Q, _K.double(), _V), None, r"same dtype, but got torch.float32, torch.float64"),
    "mixed value dtype": ((_Q, _K, _V.half()), None, r"same dtype.*torch.float16"),
    "E mismatch": ((_Q, _x((2, 5, 3), 3, torch.float32), _V), None, r"same last size E.*key_seq \(2, 5, 3\)"),
    "S mismatch": ((_Q, _K, _x((2, 4, 6), 3, torch.float32)), None, r"same length S.*value_seq \(2, 4, 6\)"),
    "mask shape": ((_Q, _K, _V), torch.zeros(3, 4), r"attn_mask broadcastable to .*\(2, 3, 5\).*\(3, 4\)"),
    "batch mismatch": (
        (
            _x((2, 2, 3, 4), 4, torch.float32),
            _x((2, 3, 5, 4), 5, torch.float32),
            _x((2, 3, 5, 6), 6, torch.float32),
        ),
        None,
        r"batch dimensions that broadcast.*\(2, 2, 3, 4\)",
    ),
}


@pytest.mark.parametrize("case", sorted(SDPA_CASES))
def test_sdpa_inputs_like_torch(case: str) -> None:
    (q, k, v), mask, pattern = SDPA_CASES[case]
    try:
        expected = F.scaled_dot_product_attention(q.cumsum(0), k.cumsum(0), v.cumsum(0), attn_mask=mask)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        with pytest.raises((TypeError, ValueError), match=pattern):
            TDScaledDotProductAttention()(q, k, v, mask)  # type: ignore[arg-type]
        return
    torch.testing.assert_close(TDScaledDotProductAttention()(q, k, v, mask).cumsum(0), expected)  # type: ignore[arg-type]


MHA_CASES: dict[str, tuple[torch.dtype, torch.dtype, object, str]] = {
    # name: (input dtype, key dtype, attn_mask, pattern)
    "int64 mask": (
        torch.float32,
        torch.float32,
        torch.zeros(3, 3, dtype=torch.int64),
        r"bool or floating.*int64",
    ),
    "uint8 mask": (
        torch.float32,
        torch.float32,
        torch.zeros(3, 3, dtype=torch.uint8),
        r"bool or floating.*uint8",
    ),
    "float64 mask": (
        torch.float32,
        torch.float32,
        torch.zeros(3, 3, dtype=torch.float64),
        r"attn_mask.*float64",
    ),
    "bool mask": (torch.float32, torch.float32, torch.tensor([[False, True, False]] * 3), ""),
    "list mask": (torch.float32, torch.float32, [[True] * 3] * 3, r"attn_mask to be a tensor or None"),
    "mixed key dtype": (
        torch.float32,
        torch.float64,
        None,
        r"same dtype, but got torch.float32, torch.float64",
    ),
    "input of another dtype than the parameters": (torch.float64, torch.float64, None, r"parameters' dtype"),
}


@pytest.mark.parametrize("case", sorted(MHA_CASES))
def test_mha_inputs_like_torch(case: str) -> None:
    dtype, key_dtype, mask, pattern = MHA_CASES[case]
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(4, 2, batch_first=True)
    op = TDMultiheadAttention.from_module(ref)
    x = _x((2, 2, 3, 4), 0, dtype)
    k = x.to(key_dtype)
    try:
        expected = torch.stack(
            [
                ref(x.cumsum(0)[t], k.cumsum(0)[t], x.cumsum(0)[t], attn_mask=mask, need_weights=False)[0]
                for t in range(2)
            ]  # type: ignore[arg-type]
        )
    except (RuntimeError, TypeError, AssertionError):
        with pytest.raises((TypeError, ValueError), match=pattern):
            op(x, k, x, attn_mask=mask)  # type: ignore[arg-type]
        return
    torch.testing.assert_close(op(x, k, x, attn_mask=mask)[0].cumsum(0), expected)  # type: ignore[arg-type]


# -- streaming: a new shape needs reset() ---------------------------------------------------------------------

STREAMING: dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple[torch.Tensor, ...]], str]] = {
    "gelu": (TDGELU, lambda b: (torch.randn(b, 4),), "input"),
    "layer_norm": (lambda: TDLayerNorm(4), lambda b: (torch.randn(b, 4),), "input"),
    "linear": (lambda: TDLinear(4, 2), lambda b: (torch.randn(b, 4),), "input"),
    "conv2d": (lambda: TDConv2d(2, 2, 3), lambda b: (torch.randn(b, 2, 5, 5),), "input"),
    "matmul": (TDMatMul, lambda b: (torch.randn(b, 3, 4), torch.randn(b, 4, 2)), "a_seq"),
    "sdpa": (TDScaledDotProductAttention, lambda b: (torch.randn(b, 3, 4),) * 3, "query_seq"),
    "mha": (lambda: TDMultiheadAttention(4, 2), lambda b: (torch.randn(b, 3, 4),) * 3, "query_seq"),
}


@pytest.mark.parametrize("name", sorted(STREAMING))
def test_streaming_new_batch_size_needs_reset(name: str) -> None:
    make, inputs, arg = STREAMING[name]
    op = make().set_streaming(True)
    op(*inputs(2))
    op(*inputs(2))
    new = inputs(3)
    message = re.escape(
        f"got {arg} of shape {tuple(new[0].shape)}, but the earlier steps of this sequence had shape "
    )
    with pytest.raises(RuntimeError, match=message + r".*call reset\(\)"):
        op(*new)
    op.reset()
    first = op(*new)  # after reset() the step starts a new sequence: the plain op on that step
    op.set_streaming(False)
    full = op(*(t.unsqueeze(0) for t in new))
    torch.testing.assert_close(
        first[0] if isinstance(first, tuple) else first, (full[0] if isinstance(full, tuple) else full)[0]
    )


# -- running sums: agree with references built with torch.cumsum ----------------------------------------------


def test_attention_and_products_agree_with_cumsum_references_in_every_seed() -> None:
    failures = []
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(8, 2, 4, 8, generator=g) for _ in range(3))
        y = TDScaledDotProductAttention()(q, k, v)
        ref = _diff(F.scaled_dot_product_attention(q.cumsum(0), k.cumsum(0), v.cumsum(0)))
        if not torch.allclose(y, ref, atol=1e-6, rtol=1e-6):
            failures.append(("sdpa", seed, (y - ref).abs().max().item()))
        a = torch.randn(8, 3, 4, generator=g)
        b = torch.randn(8, 4, 5, generator=g).requires_grad_(True)
        b_ref = b.detach().clone().requires_grad_(True)
        w = torch.randn(8, 3, 5, generator=g)
        (gb,) = torch.autograd.grad((TDMatMul()(a, b) * w).sum(), b)
        (gr,) = torch.autograd.grad((_diff(a.cumsum(0) @ b_ref.cumsum(0)) * w).sum(), b_ref)
        if not torch.allclose(gb, gr, atol=1e-6, rtol=1e-6):
            failures.append(("matmul grad b", seed, (gb - gr).abs().max().item()))
        with torch.no_grad():  # the chunked inference path carries the same running sums
            y_inf = TDMatMul()(a, b)
        if not torch.equal(y_inf, _diff(a.cumsum(0) @ b.detach().cumsum(0))):
            failures.append(("matmul no_grad", seed, 0.0))
    assert not failures, failures[:10]


@pytest.mark.parametrize("name", ["gelu", "silu", "softmax", "layer_norm", "rms_norm"])
def test_elementwise_agree_with_cumsum_references_to_float32_rounding(name: str) -> None:
    op = (
        UNARY[name]()
        if name not in ("layer_norm", "rms_norm")
        else (TDLayerNorm if name == "layer_norm" else TDRMSNorm)(16)
    )
    plain = {
        "gelu": F.gelu,
        "silu": F.silu,
        "softmax": lambda c: torch.softmax(c, -1),
        "layer_norm": lambda c: F.layer_norm(c, (16,)),
        "rms_norm": lambda c: F.rms_norm(c, (16,)),
    }[name]
    worst = 0.0
    for seed in range(200):
        x = _x((8, 2, 16), seed, torch.float32)
        with torch.no_grad():
            y = op(x)
        ref = _diff(plain(x.cumsum(0)))
        worst = max(worst, ((y - ref).abs() / (1 + ref.abs())).max().item())
    # a few float32 ulps of the running sum (|x_cum| <= ~12 here), as the plain op's own rounding
    assert worst < 2e-6, worst


@pytest.mark.parametrize("case", ["same", "b_broadcasts", "a_broadcasts", "a_is_b"])
def test_mul_inference_equals_cumsum_reference_bitwise(case: str) -> None:
    """The no-grad TDMul (which multiplies into its cumulative block when it can) equals the cumsum reference."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(9, 3, 4, generator=g)
    b = {"same": torch.randn(9, 3, 4, generator=g), "b_broadcasts": torch.randn(9, 4, generator=g)}.get(
        case, a
    )
    if case == "a_broadcasts":
        a, b = torch.randn(9, 4, generator=g), a
    a_before, b_before = a.clone(), b.clone()
    with torch.no_grad():
        y = TDMul()(a, b)
    assert torch.equal(a, a_before)  # the inputs are never written
    assert torch.equal(b, b_before)
    a_cum, b_cum = a.cumsum(0), b.cumsum(0)
    rank = max(a.dim(), b.dim())
    a_cum = a_cum[:, None] if a.dim() < rank else a_cum
    b_cum = b_cum[:, None] if b.dim() < rank else b_cum
    assert torch.equal(y, _diff(a_cum * b_cum))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 5), (4, 2, 9, 48), (32, 2, 16, 48), (5, 20_001), (130, 800)])
def test_cumulative_exact_equals_torch_cumsum_small_and_large(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    """cumulative_exact is one torch.cumsum call up to 100k elements and the float64 step loop above (and with
    a carry): both equal torch.cumsum bit for bit, also when a float32 input is summed into float64."""
    from ann2snn_ops._cumsum import _ONE_CALL, cumulative_exact

    g = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, generator=g) * 1e3 + 1).to(dtype)
    assert (x.numel() <= _ONE_CALL) == (shape[-1] < 20_001 and shape[0] < 130)
    assert torch.equal(cumulative_exact(x), torch.cumsum(x, 0))
    assert torch.equal(
        cumulative_exact(x.float(), torch.float64), torch.cumsum(x.float(), 0, dtype=torch.float64)
    )
    carry = torch.zeros(shape[1:], dtype=torch.float64)
    head = cumulative_exact(x[:1], carry=carry)
    assert torch.equal(torch.cat([head, cumulative_exact(x[1:], carry=carry)]), torch.cumsum(x, 0))


@pytest.mark.parametrize("steps", [1, 3, 8, 9, 12, 33])
def test_inference_running_sums_equal_torch_cumsum_on_both_paths(steps: int) -> None:
    """Up to 8 steps the chunked inference path calls torch.cumsum in one shot; longer sequences carry the
    float64 running sum block by block: both equal the torch.cumsum reference bit for bit."""
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(steps, 3, 4, generator=g)
        b = torch.randn(steps, 4, 5, generator=g)
        with torch.no_grad():
            assert torch.equal(TDMatMul()(a, b), _diff(a.cumsum(0) @ b.cumsum(0))), seed
            assert torch.equal(TDMul()(a, a), _diff(a.cumsum(0) * a.cumsum(0))), seed

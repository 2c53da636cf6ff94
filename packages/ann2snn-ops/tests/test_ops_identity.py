"""The TD identity ``Y.cumsum(0)[t] == f(X.cumsum(0)[t])`` and its gradients, against the torch ops."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

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

FAST = settings(max_examples=20, deadline=None)


def td_reference(f: Callable[..., torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
    """The anchor's formula, from plain differentiable torch ops: diff(f(cumsum(x)))."""
    y_cum = f(*(x.cumsum(0) for x in xs))
    return torch.diff(y_cum, dim=0, prepend=torch.zeros_like(y_cum[:1]))


def shapes(min_dims: int = 2, max_dims: int = 4, max_side: int = 5) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(st.integers(1, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


def _x(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


# -- unary operators ----------------------------------------------------------------------------------------


def _p(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(x.dtype)


UNARY: dict[
    str, tuple[Callable[[int], torch.nn.Module], Callable[[torch.Tensor, torch.nn.Module], torch.Tensor]]
] = {
    "gelu": (lambda c: TDGELU(), lambda x, m: F.gelu(x)),
    "gelu_tanh": (lambda c: TDGELU("tanh"), lambda x, m: F.gelu(x, approximate="tanh")),
    "silu": (lambda c: TDSiLU(), lambda x, m: F.silu(x)),
    "softmax": (lambda c: TDSoftmax(-1), lambda x, m: torch.softmax(x, -1)),
    "layer_norm": (
        lambda c: TDLayerNorm(c),
        lambda x, m: F.layer_norm(x, (x.shape[-1],), _p(m.weight, x), _p(m.bias, x)),
    ),
    "rms_norm": (lambda c: TDRMSNorm(c), lambda x, m: F.rms_norm(x, (x.shape[-1],), _p(m.weight, x))),
    "tanh": (lambda c: TDFunction(torch.tanh), lambda x, m: torch.tanh(x)),
    "linear": (lambda c: TDLinear(c, 3), lambda x, m: F.linear(x, _p(m.weight, x), _p(m.bias, x))),
}

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("name", sorted(UNARY))
@FAST
@given(
    shape=shapes(),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
)
def test_unary_cumulative_identity(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> None:
    make, f = UNARY[name]
    op = make(shape[-1])
    _randomise(op, seed)
    op = op.to(dtype)
    x = _x(shape, seed).to(dtype)
    y = op(x)
    assert y.dtype == dtype
    # Ground truth in float64 from the very same (rounded) inputs and parameters.
    expected = f(x.double().cumsum(0), op)
    assert y.shape == expected.shape
    tol = TOLERANCE[dtype]
    scale = max(1.0, expected.abs().max().item())
    # Ill-conditioned inputs (a norm over a near-zero vector) amplify rounding in the plain op as well: the
    # TD op may err as much as the plain op in the same dtype does on the same cumulative input.
    plain_error = (f(x.cumsum(0), op).double() - expected).abs().max().item()
    atol = max(tol * scale, 2 * plain_error)
    torch.testing.assert_close(y.double().cumsum(0), expected, atol=atol, rtol=tol)
    torch.testing.assert_close(y.double().sum(0), f(x.double().sum(0), op), atol=atol, rtol=tol)


@FAST
@given(
    shape=shapes(min_dims=2, max_dims=5),
    dim_seed=st.integers(0, 100),
    negative=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_softmax_any_non_time_dim(shape: tuple[int, ...], dim_seed: int, negative: bool, seed: int) -> None:
    nd = len(shape)
    dim = 1 + dim_seed % (nd - 1)
    if negative:
        dim -= nd
    x = _x(shape, seed)
    y = TDSoftmax(dim)(x)
    torch.testing.assert_close(y.cumsum(0), torch.softmax(x.cumsum(0), dim), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_single_step_is_the_plain_op(name: str) -> None:
    make, f = UNARY[name]
    op = make(4)
    _randomise(op, 0)
    x = _x((1, 2, 4), 0)
    torch.testing.assert_close(op(x)[0], f(x[0], op), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(UNARY))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unary_values_and_gradients_match_reference(name: str, dtype: torch.dtype) -> None:
    make, f = UNARY[name]
    op = make(6).to(dtype)
    _randomise(op, 3)
    x = _x((5, 2, 3, 6), 3, dtype).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref_op = make(6).to(dtype)
    ref_op.load_state_dict(op.state_dict())
    y = op(x)
    y_ref = td_reference(lambda xc: f(xc, ref_op), x_ref)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    g = _x(tuple(y.shape), 4, dtype)
    grads = torch.autograd.grad(y, [x, *op.parameters()], g)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *ref_op.parameters()], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_gradcheck(name: str) -> None:
    make, _ = UNARY[name]
    op = make(3).double()
    _randomise(op, 5)
    x = _x((3, 2, 3), 5, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(op, (x,))
    names = [n for n, _ in op.named_parameters()]
    if names:  # parameter gradients through the custom backward
        assert torch.autograd.gradcheck(
            lambda *ps: torch.func.functional_call(op, dict(zip(names, ps)), (x.detach(),)),
            tuple(p.detach().clone().requires_grad_(True) for p in op.parameters()),
        )


def test_elementwise_without_grad_needs_no_graph() -> None:
    x = _x((4, 3), 0)
    y = TDGELU()(x)
    assert not y.requires_grad
    with torch.no_grad():
        assert not TDGELU()(x.requires_grad_(True)).requires_grad


def test_softmax_positive_dim_and_layer_norm_multi_dim() -> None:
    x = _x((3, 2, 4, 5), 1)
    torch.testing.assert_close(TDSoftmax(2)(x).cumsum(0), torch.softmax(x.cumsum(0), 2), atol=1e-6, rtol=1e-6)
    ln = TDLayerNorm((4, 5), eps=1e-3, bias=False)
    torch.testing.assert_close(
        ln(x).cumsum(0), F.layer_norm(x.cumsum(0), (4, 5), ln.weight, None, 1e-3), atol=1e-5, rtol=1e-5
    )


def test_function_that_returns_its_input_view_keeps_gradients() -> None:
    x = _x((4, 3), 2).requires_grad_(True)
    y = TDFunction(lambda t: t.view(t.shape))(x)
    torch.testing.assert_close(y, x)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.ones_like(x))
    x7 = _x((7, 3), 3)
    with torch.no_grad():  # the chunked inference path reuses its buffers: views must be copied
        torch.testing.assert_close(TDFunction(lambda t: t.view(t.shape))(x7), x7)


def test_function_reducing_trailing_dims() -> None:
    x = _x((4, 3, 5), 2)
    y = TDFunction(lambda t: t.amax(-1))(x)
    torch.testing.assert_close(y.cumsum(0), x.cumsum(0).amax(-1), atol=1e-6, rtol=1e-6)


# -- linear and convolution -----------------------------------------------------------------------------------


def test_linear_bias_counted_once_exactly() -> None:
    op = TDLinear(3, 5)
    with torch.no_grad():
        op.weight.zero_()
        op.bias.copy_(torch.arange(5.0))
    y = op(_x((4, 2, 3), 0))
    assert torch.equal(y[0], torch.arange(5.0).expand(2, 5))
    assert torch.equal(y[1:], torch.zeros(3, 2, 5))


@FAST
@given(
    t=st.integers(1, 4),
    n=st.integers(1, 2),
    cfg=st.sampled_from(
        [
            dict(kernel_size=3, padding=1),
            dict(kernel_size=3, stride=2),
            dict(kernel_size=(3, 1), padding="same", padding_mode="reflect"),
            dict(kernel_size=2, padding="valid", dilation=2),
            dict(kernel_size=3, padding=1, padding_mode="circular", groups=2),
            dict(kernel_size=3, padding=(1, 2), padding_mode="replicate", bias=False),
        ]
    ),
    unbatched=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv2d_identity(t: int, n: int, cfg: dict, unbatched: bool, seed: int) -> None:
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(2, 4, **cfg)
    op = TDConv2d.from_module(conv)
    shape = (t, 2, 6, 7) if unbatched else (t, n, 2, 6, 7)
    x = _x(shape, seed)
    y = op(x)
    if unbatched:
        expected = conv(x.cumsum(0))
    else:
        expected = conv(x.cumsum(0).flatten(0, 1)).unflatten(0, (t, n))
    torch.testing.assert_close(y.cumsum(0), expected, atol=1e-5, rtol=1e-5)


def test_conv2d_gradcheck() -> None:
    torch.manual_seed(0)
    op = TDConv2d(2, 2, 3, padding=1, padding_mode="reflect").double()
    x = _x((2, 1, 2, 4, 4), 0, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(op, (x,))
    assert torch.autograd.gradcheck(
        TDLinear(3, 2).double(), (_x((3, 2, 3), 1, torch.float64).requires_grad_(True),)
    )


# -- attention ------------------------------------------------------------------------------------------------


@FAST
@given(
    t=st.integers(1, 4),
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple),
    lens=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    mask_kind=st.sampled_from(["none", "causal", "bool", "float", "bool_time"]),
    seed=st.integers(0, 2**16),
)
def test_sdpa_identity(
    t: int, batch: tuple[int, ...], lens: tuple[int, int], mask_kind: str, seed: int
) -> None:
    length, s = lens
    q = _x((t, *batch, length, 4), seed)
    k = _x((t, *batch, s, 4), seed + 1)
    v = _x((t, *batch, s, 3), seed + 2)
    mask = None
    g = torch.Generator().manual_seed(seed)
    if mask_kind == "bool":
        mask = torch.rand(length, s, generator=g) > 0.3
        mask[:, 0] = True
    elif mask_kind == "float":
        mask = torch.randn((*batch, length, s), generator=g)
    elif mask_kind == "bool_time":  # a mask that differs per time step and batch
        mask = torch.rand((t, *batch, length, s), generator=g) > 0.3
        mask[..., 0] = True
    causal = mask_kind == "causal"
    op = TDScaledDotProductAttention(is_causal=causal, scale=0.3)
    y = op(q, k, v, mask)
    expected = F.scaled_dot_product_attention(
        q.cumsum(0), k.cumsum(0), v.cumsum(0), attn_mask=mask, is_causal=causal, scale=0.3
    )
    assert y.shape == expected.shape
    torch.testing.assert_close(y.cumsum(0), expected, atol=1e-5, rtol=1e-5)


def test_sdpa_broadcasts_batch_of_key_value() -> None:
    q = _x((3, 2, 2, 4, 8), 0)
    k = _x((3, 1, 2, 5, 8), 1)
    v = _x((3, 2, 1, 5, 8), 2)
    y = TDScaledDotProductAttention()(q, k, v)
    expected = F.scaled_dot_product_attention(q.cumsum(0), k.cumsum(0), v.cumsum(0))
    torch.testing.assert_close(y.cumsum(0), expected, atol=1e-5, rtol=1e-5)


def test_sdpa_gradients_match_reference() -> None:
    qkv = [_x((2, 1, 2, 3, 4), i, torch.float64).requires_grad_(True) for i in range(3)]
    mask = _x((2, 3, 3), 9, torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: TDScaledDotProductAttention()(q, k, v, mask), tuple(qkv))
    y = TDScaledDotProductAttention(is_causal=True)(*qkv)
    ref = td_reference(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), *qkv)
    g = _x(tuple(y.shape), 7, torch.float64)
    for a, b in zip(torch.autograd.grad(y, qkv, g), torch.autograd.grad(ref, qkv, g)):
        torch.testing.assert_close(a, b)


@FAST
@given(
    t=st.integers(1, 4),
    b=st.integers(1, 2),
    lens=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    mask_kind=st.sampled_from(["none", "bool2d", "float2d", "float3d", "bool3d"]),
    self_attention=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_mha_matches_nn_mha_on_cumulative_input(
    t: int, b: int, lens: tuple[int, int], mask_kind: str, self_attention: bool, bias: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    e, h = 8, 2
    length, s = lens
    if self_attention:
        s = length
    mha = torch.nn.MultiheadAttention(e, h, bias=bias, batch_first=True)
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_()
    op = TDMultiheadAttention.from_module(mha)
    q = _x((t, b, length, e), seed)
    k = q if self_attention else _x((t, b, s, e), seed + 1)
    v = q if self_attention else _x((t, b, s, e), seed + 2)
    mask = None
    if mask_kind == "bool2d":
        mask = torch.rand(length, s) > 0.6
        mask[:, 0] = False
    elif mask_kind == "float2d":
        mask = torch.randn(length, s)
    elif mask_kind == "float3d":
        mask = torch.randn(b * h, length, s)
    elif mask_kind == "bool3d":
        mask = torch.rand(b * h, length, s) > 0.6
        mask[..., 0] = False
    y, weights = op(q, k, v, attn_mask=mask)
    assert weights is None
    for step in range(t):
        ref, _ = mha(
            q.cumsum(0)[step], k.cumsum(0)[step], v.cumsum(0)[step], attn_mask=mask, need_weights=False
        )
        torch.testing.assert_close(y.cumsum(0)[step], ref, atol=1e-4, rtol=1e-4)


def test_mha_causal_and_gradients() -> None:
    torch.manual_seed(0)
    op = TDMultiheadAttention(4, 2).double()
    x = _x((3, 2, 3, 4), 0, torch.float64).requires_grad_(True)
    y, _ = op(x, x, x, is_causal=True)
    mask = torch.triu(torch.ones(3, 3, dtype=torch.bool), 1)
    mha = torch.nn.MultiheadAttention(4, 2, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([op.q_proj.weight, op.k_proj.weight, op.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([op.q_proj.bias, op.k_proj.bias, op.v_proj.bias]))
        mha.out_proj.weight.copy_(op.out_proj.weight)
        mha.out_proj.bias.copy_(op.out_proj.bias)
    ref = td_reference(
        lambda xc: mha(
            xc.flatten(0, 1), xc.flatten(0, 1), xc.flatten(0, 1), attn_mask=mask, need_weights=False
        )[0].unflatten(0, (3, 2)),
        x,
    )
    torch.testing.assert_close(y, ref)
    params = [x, *op.parameters()]
    ref_params = [x, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias]
    g = _x(tuple(y.shape), 1, torch.float64)
    gy = torch.autograd.grad(y, params, g)
    gr = torch.autograd.grad(ref, ref_params, g)
    torch.testing.assert_close(gy[0], gr[0])
    torch.testing.assert_close(torch.cat([gy[1], gy[3], gy[5]]), gr[1])  # q/k/v weights
    torch.testing.assert_close(gy[7], gr[3])
    small = x[:2, :1].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: op(a, a, a)[0], (small,))


# -- products ------------------------------------------------------------------------------------------------


@FAST
@given(
    t=st.integers(1, 4),
    case=st.sampled_from(
        [
            ((2, 3, 4), (2, 4, 5)),
            ((3, 4), (4, 2)),
            ((4,), (4,)),
            ((4,), (2, 4, 3)),
            ((2, 1, 3, 4), (5, 4, 2)),
            ((3, 4), (4,)),
        ]
    ),
    seed=st.integers(0, 2**16),
)
def test_matmul_identity(t: int, case: tuple[tuple[int, ...], tuple[int, ...]], seed: int) -> None:
    a = _x((t, *case[0]), seed)
    b = _x((t, *case[1]), seed + 1)
    y = TDMatMul()(a, b)
    expected = torch.stack([torch.matmul(a.cumsum(0)[i], b.cumsum(0)[i]) for i in range(t)])
    torch.testing.assert_close(y.cumsum(0), expected, atol=1e-4, rtol=1e-5)


@FAST
@given(
    t=st.integers(1, 4),
    case=st.sampled_from([((2, 3), (2, 3)), ((2, 3), (3,)), ((4, 1, 3), (2, 1)), ((3,), (2, 3))]),
    seed=st.integers(0, 2**16),
)
def test_mul_identity(t: int, case: tuple[tuple[int, ...], tuple[int, ...]], seed: int) -> None:
    a = _x((t, *case[0]), seed)
    b = _x((t, *case[1]), seed + 1)
    y = TDMul()(a, b)
    expected = torch.stack([a.cumsum(0)[i] * b.cumsum(0)[i] for i in range(t)])
    torch.testing.assert_close(y.cumsum(0), expected, atol=1e-5, rtol=1e-5)


def test_products_gradcheck_and_same_operand() -> None:
    a = _x((3, 2, 3), 0, torch.float64).requires_grad_(True)
    b = _x((3, 3, 2), 1, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(TDMatMul(), (a, b))
    assert torch.autograd.gradcheck(TDMul(), (a, a.detach().clone().requires_grad_(True)))
    torch.testing.assert_close(TDMul()(a, a).cumsum(0), a.cumsum(0) ** 2)


def test_integer_input_raises_from_torch() -> None:
    with pytest.raises((NotImplementedError, RuntimeError)):
        TDGELU()(torch.ones(2, 3, dtype=torch.int64))


@pytest.mark.parametrize("t", [1, 5, 7, 9])
def test_inference_path_equals_autograd_path(t: int) -> None:
    """Without autograd, attention and products run a few steps at a time; the values must not change."""
    q, k, v = _x((t, 2, 3, 4), 0), _x((t, 2, 5, 4), 1), _x((t, 2, 5, 3), 2)
    timed_mask = torch.rand((t, 2, 3, 5), generator=torch.Generator().manual_seed(t)) > 0.3
    timed_mask[..., 0] = True
    cases = [
        (TDScaledDotProductAttention(), (q, k, v, timed_mask)),
        (TDScaledDotProductAttention(is_causal=True), (q, q, q)),
        (TDMatMul(), (q, k.transpose(-1, -2))),
        (TDMul(), (q, q)),
        (TDMul(), (k, v[..., :1])),
    ]
    for op, args in cases:
        with torch.no_grad():
            fast = op(*args)
        leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
        slow = op(*leaves)
        assert slow.requires_grad
        torch.testing.assert_close(fast, slow.detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("cls", [TDLayerNorm, TDRMSNorm])
def test_norm_gradients_multi_dim_shape(cls: type, affine: bool) -> None:
    op = cls((3, 4), elementwise_affine=affine).double()
    _randomise(op, 0)
    x = _x((4, 2, 3, 4), 0, torch.float64).requires_grad_(True)
    if cls is TDLayerNorm:
        ref = td_reference(lambda xc: F.layer_norm(xc, (3, 4), op.weight, op.bias), x)
    else:
        ref = td_reference(lambda xc: F.rms_norm(xc, (3, 4), op.weight), x)
    y = op(x)
    torch.testing.assert_close(y, ref)
    g = _x(tuple(y.shape), 1, torch.float64)
    params = [x, *op.parameters()]
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls", [TDLayerNorm, TDRMSNorm])
def test_norm_half_gradients_match_float32(cls: type) -> None:
    op = cls(8)
    _randomise(op, 2)
    x = _x((6, 3, 8), 2)
    half = cls(8, dtype=torch.bfloat16)
    half.load_state_dict(op.state_dict())
    xh = x.bfloat16().requires_grad_(True)
    xf = xh.detach().float().requires_grad_(True)
    g = _x((6, 3, 8), 3)
    (gh, *gph) = torch.autograd.grad(half(xh), [xh, *half.parameters()], g.bfloat16())
    (gf, *gpf) = torch.autograd.grad(op(xf), [xf, *op.parameters()], g.bfloat16().float())
    assert gh.dtype == torch.bfloat16
    torch.testing.assert_close(gh.float(), gf, atol=2e-2, rtol=2e-2)
    for a, b in zip(gph, gpf):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, atol=5e-2, rtol=2e-2)


# -- the fused no-grad path of the row-wise and pointwise operators ------------------------------------------


def _rows_case(
    name: str, c: int
) -> tuple[torch.nn.Module, Callable[[torch.Tensor, torch.nn.Module], torch.Tensor]]:
    make, f = UNARY[name]
    op = make(c)
    _randomise(op, c)
    return op, f


FUSED = ["gelu", "layer_norm", "rms_norm", "silu", "softmax"]


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize(
    "shape",
    [
        (3, 700, 192),  # steps larger than a block: tiles of rows, the last one shorter
        (40, 20, 96),  # small steps: blocks of whole steps, the last one shorter
        (10, 100, 1000),  # two tiles of rows per step; GELU on the whole sequence at once
        (1, 700, 192),  # one step
        (2, 3, 5),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_inference_path_matches_cumsum_reference(
    name: str, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    """Without autograd the operators run cache-sized blocks of steps or of rows; every layout must give
    the plain op on torch.cumsum of the input, differenced."""
    op, f = _rows_case(name, shape[-1])
    op = op.to(dtype)
    x = _x(shape, 7, dtype)
    with torch.no_grad():
        y = op(x)
        expected = td_reference(lambda xc: f(xc, op), x)
    assert y.dtype == dtype
    assert y.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(y, expected, atol=tol, rtol=tol)
    torch.testing.assert_close(y.double().cumsum(0), f(x.double().cumsum(0), op.double()), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", FUSED)
def test_fused_inference_path_non_contiguous_and_half_input(name: str) -> None:
    op, f = _rows_case(name, 96)
    base = _x((5, 96, 600), 8)
    x = base.transpose(1, 2)  # [5, 600, 96], not contiguous
    with torch.no_grad():
        torch.testing.assert_close(op(x), td_reference(lambda xc: f(xc, op), x), atol=1e-5, rtol=1e-5)
        xh = x[:, :300].bfloat16()
        yh = op.bfloat16()(xh)
        expected = f(xh.double().cumsum(0), op.double())
    assert yh.dtype == torch.bfloat16
    torch.testing.assert_close(
        yh.double().cumsum(0), expected, atol=3e-2 * max(1.0, expected.abs().max().item()), rtol=3e-2
    )


@pytest.mark.parametrize("step_blocks", [True, False])
@pytest.mark.parametrize("block", [1, 7, 96, 500, 1 << 16])
@pytest.mark.parametrize("t", [1, 2, 9])
def test_td_rows_any_block_size(block: int, t: int, step_blocks: bool) -> None:
    """td_rows' layouts (blocks of whole steps, tiles of rows, blocks of a single row; with step_blocks=False
    always one step at a time) against the reference, with an allocating op and with an out= op."""
    from ann2snn_ops._unary import td_rows

    x = _x((t, 13, 4, 6), 9)
    layout = {"block_elements": block, "step_blocks": step_blocks}
    ref = td_reference(lambda xc: F.layer_norm(xc, (6,)), x)
    torch.testing.assert_close(td_rows(x, lambda a: F.layer_norm(a, (6,)), (6,), **layout), ref)

    def softmax_out(a: torch.Tensor, out: torch.Tensor) -> None:
        torch._softmax(a, -1, False, out=out)

    got = td_rows(x, lambda a: torch.softmax(a, -1), (6,), fn_out=softmax_out, **layout)
    torch.testing.assert_close(got, td_reference(lambda xc: torch.softmax(xc, -1), x))
    # an op returning a view of its input: the block buffer is reused, so the result must be copied
    torch.testing.assert_close(td_rows(x, lambda a: a[...], (), **layout), x)


@pytest.mark.parametrize("tile", [6, 30, 1 << 19])
def test_norms_in_tiles_of_any_size(tile: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The norms' no-grad path runs one step at a time in tiles of _NORM_TILE elements: tiles of one row,
    of several rows with a shorter last tile (13 * 4 rows of 6), and whole steps give the reference."""
    from ann2snn_ops import norm

    monkeypatch.setattr(norm, "_NORM_TILE", tile)
    x = _x((5, 13, 4, 6), 11)
    ln, rms = TDLayerNorm(6), TDRMSNorm(6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
        rms.weight.uniform_(0.5, 1.5)
        got_ln, got_rms = ln(x), rms(x)
    torch.testing.assert_close(got_ln, td_reference(lambda xc: F.layer_norm(xc, (6,), ln.weight, ln.bias), x))
    torch.testing.assert_close(got_rms, td_reference(lambda xc: F.rms_norm(xc, (6,), rms.weight), x))

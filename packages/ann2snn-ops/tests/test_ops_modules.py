"""Module API: streaming mode, from_module, parameters, repr, dtype/device behaviour, exports."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import ann2snn_ops
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


def _x(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_exports() -> None:
    expected = {
        "TDSoftmax",
        "TDLayerNorm",
        "TDGELU",
        "TDLinear",
        "TDScaledDotProductAttention",
        "TDMultiheadAttention",
        "TDConv2d",
        "TDRMSNorm",
        "TDSiLU",
        "TDMatMul",
        "TDMul",
        "TDFunction",
        "TDModule",
        "__version__",
        "Quantizer",
        "STBIFNeuron",
        "quantizer_bounds",
        "reset_streaming",
        "running_sum",
        "set_streaming",
    }
    assert set(ann2snn_ops.__all__) == expected
    for name in expected:
        assert hasattr(ann2snn_ops, name)


# -- streaming ------------------------------------------------------------------------------------------------

UNARY_OPS: list[Callable[[], nn.Module]] = [
    lambda: TDGELU(),
    lambda: TDSiLU(),
    lambda: TDSoftmax(-1),
    lambda: TDSoftmax(1),
    lambda: TDLayerNorm(4),
    lambda: TDRMSNorm(4),
    lambda: TDLinear(4, 3),
    lambda: TDFunction(torch.tanh),
]


@pytest.mark.parametrize("make", UNARY_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_equals_full_sequence_unary(make: Callable[[], nn.Module], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    op = make().to(dtype)
    x = _x((5, 2, 4), 1, dtype)
    full = op(x)
    op.set_streaming(True)
    steps = torch.stack([op(x[t]) for t in range(5)])
    torch.testing.assert_close(steps, full, atol=1e-6, rtol=1e-6) if dtype == torch.float32 else (
        torch.testing.assert_close(steps, full)
    )
    op.reset()
    torch.testing.assert_close(op(x[0]), full[0])  # reset starts a new sequence
    op.set_streaming(False)
    torch.testing.assert_close(op(x), full)  # stateless again


def test_streaming_equals_full_sequence_conv() -> None:
    torch.manual_seed(0)
    op = TDConv2d(2, 3, 3, padding=1)
    x = _x((4, 2, 2, 5, 5), 1)
    full = op(x)
    op.set_streaming(True)
    torch.testing.assert_close(torch.stack([op(x[t]) for t in range(4)]), full, atol=1e-6, rtol=1e-6)
    op.reset()
    unbatched = torch.stack([op(x[t, 0]) for t in range(4)])
    torch.testing.assert_close(unbatched, full[:, 0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_streaming_equals_full_sequence_attention(causal: bool) -> None:
    q, k, v = _x((4, 2, 2, 3, 8), 0), _x((4, 2, 2, 5, 8), 1), _x((4, 2, 2, 5, 6), 2)
    mask = None if causal else _x((2, 3, 5), 3)
    op = TDScaledDotProductAttention(is_causal=causal)
    full = op(q, k, v, mask)
    op.set_streaming(True)
    steps = torch.stack([op(q[t], k[t], v[t], mask) for t in range(4)])
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("self_attention", [False, True])
def test_streaming_equals_full_sequence_mha(self_attention: bool) -> None:
    torch.manual_seed(0)
    op = TDMultiheadAttention(8, 2)
    q = _x((4, 2, 3, 8), 0)
    kv = q if self_attention else _x((4, 2, 5, 8), 1)
    mask = torch.rand(3, kv.shape[2]) > 0.7
    mask[:, 0] = False
    full, _ = op(q, kv, kv, attn_mask=mask)
    op.set_streaming(True)
    steps = torch.stack([op(q[t], kv[t], kv[t], attn_mask=mask)[0] for t in range(4)])
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    op.reset()
    torch.testing.assert_close(op(q[0], kv[0], kv[0], attn_mask=mask)[0], full[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [TDMatMul, TDMul])
def test_streaming_equals_full_sequence_products(cls: type) -> None:
    a, b = _x((4, 2, 3, 3), 0), _x((4, 2, 3, 3), 1)
    op = cls()
    full = op(a, b)
    op.set_streaming(True)
    torch.testing.assert_close(torch.stack([op(a[t], b[t]) for t in range(4)]), full, atol=1e-5, rtol=1e-5)


def test_streaming_gradients_flow_through_the_state() -> None:
    x = _x((3, 4), 0, torch.float64).requires_grad_(True)
    op = TDGELU().set_streaming(True)
    total = sum(op(x[t]).sum() * (t + 1) for t in range(3))
    (g_stream,) = torch.autograd.grad(total, x)
    op.set_streaming(False)
    y = op(x)
    (g_full,) = torch.autograd.grad((y * torch.arange(1.0, 4.0, dtype=torch.float64)[:, None]).sum(), x)
    torch.testing.assert_close(g_stream, g_full)


def test_default_is_stateless() -> None:
    op = TDSoftmax()
    x = _x((3, 2, 4), 0)
    torch.testing.assert_close(op(x), op(x), atol=0, rtol=0)
    assert op.streaming is False


# -- from_module ----------------------------------------------------------------------------------------------


def _randomise(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


FROM_MODULE: list[tuple[Callable[[], nn.Module], type, tuple[int, ...]]] = [
    (lambda: nn.Linear(4, 3), TDLinear, (3, 2, 4)),
    (lambda: nn.Linear(4, 3, bias=False), TDLinear, (3, 2, 4)),
    (lambda: nn.LayerNorm(4, eps=1e-3), TDLayerNorm, (3, 2, 4)),
    (lambda: nn.LayerNorm((2, 4), bias=False), TDLayerNorm, (3, 2, 4)),
    (lambda: nn.LayerNorm(4, elementwise_affine=False), TDLayerNorm, (3, 2, 4)),
    (lambda: nn.GELU(approximate="tanh"), TDGELU, (3, 2, 4)),
    (lambda: nn.RMSNorm(4), TDRMSNorm, (3, 2, 4)),
    (lambda: nn.RMSNorm(4, eps=1e-3, elementwise_affine=False), TDRMSNorm, (3, 2, 4)),
    (lambda: nn.SiLU(inplace=True), TDSiLU, (3, 2, 4)),
    (lambda: nn.Softmax(dim=1), TDSoftmax, (3, 2, 5, 4)),
    (lambda: nn.Softmax(dim=-1), TDSoftmax, (3, 2, 4)),
    (
        lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2, padding_mode="reflect"),
        TDConv2d,
        (3, 2, 2, 6, 6),
    ),
]


@pytest.mark.parametrize(("make", "cls", "shape"), FROM_MODULE)
def test_from_module_equals_source_on_cumulative_input(
    make: Callable[[], nn.Module], cls: type, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    src = _randomise(make())
    td = cls.from_module(src)
    assert type(td) is cls
    x = _x(shape, 1)
    with torch.no_grad():
        y = td(x)
        for t in range(shape[0]):
            torch.testing.assert_close(y.cumsum(0)[t], src(x.cumsum(0)[t]), atol=1e-5, rtol=1e-5)


def test_from_module_copies_dtype_requires_grad_training_and_does_not_alias() -> None:
    src = nn.Linear(4, 3).double().eval()
    src.bias.requires_grad_(False)
    td = TDLinear.from_module(src)
    assert td.weight.dtype == torch.float64
    assert td.weight.device == src.weight.device
    assert td.weight.requires_grad
    assert not td.bias.requires_grad
    assert not td.training
    assert td.weight.data_ptr() != src.weight.data_ptr()
    with torch.no_grad():
        td.weight.zero_()
    assert src.weight.abs().sum() > 0
    ln = TDLayerNorm.from_module(nn.LayerNorm(4).train())
    assert ln.training


def test_mha_from_module_equals_source_and_copies_flags() -> None:
    torch.manual_seed(0)
    mha = _randomise(nn.MultiheadAttention(8, 2, batch_first=True)).eval()
    mha.out_proj.bias.requires_grad_(False)
    td = TDMultiheadAttention.from_module(mha)
    assert not td.training
    assert not td.q_proj.training
    assert not td.out_proj.bias.requires_grad
    assert td.q_proj.weight.requires_grad
    x = _x((3, 2, 4, 8), 1)
    y, _ = td(x, x, x)
    for t in range(3):
        xc = x.cumsum(0)[t]
        ref, _ = mha(xc, xc, xc, need_weights=False)
        torch.testing.assert_close(y.cumsum(0)[t], ref, atol=1e-4, rtol=1e-4)
    nobias = TDMultiheadAttention.from_module(nn.MultiheadAttention(8, 2, bias=False, batch_first=True))
    assert "q_proj.bias" not in nobias.state_dict()


# -- parameters, init and repr (SPEC section 2) --------------------------------------------------------------


def test_state_dict_keys() -> None:
    assert set(TDLinear(3, 5, bias=False).state_dict()) == {"weight"}
    assert set(TDLinear(3, 5).state_dict()) == {"weight", "bias"}
    assert set(TDLayerNorm(3, bias=False).state_dict()) == {"weight"}
    assert TDLayerNorm(3, elementwise_affine=False, bias=True).state_dict() == {}
    assert TDLayerNorm(3, elementwise_affine=False).weight is None
    assert set(TDMultiheadAttention(8, 2).state_dict()) == {
        f"{p}_proj.{n}" for p in ("q", "k", "v", "out") for n in ("weight", "bias")
    }
    assert set(TDMultiheadAttention(8, 2, bias=False).state_dict()) == {
        f"{p}_proj.weight" for p in ("q", "k", "v", "out")
    }
    assert set(TDConv2d(2, 4, 3, bias=False).state_dict()) == {"weight"}
    assert set(TDRMSNorm(3, elementwise_affine=False).state_dict()) == set()


def test_init_like_torch_layers() -> None:
    ln = TDLayerNorm([2, 3], device="cpu", dtype=torch.float64)
    assert ln.normalized_shape == (2, 3)
    assert ln.weight.dtype == torch.float64
    torch.testing.assert_close(ln.weight, torch.ones(2, 3, dtype=torch.float64))
    torch.testing.assert_close(ln.bias, torch.zeros(2, 3, dtype=torch.float64))
    assert TDLayerNorm(torch.Size([4])).normalized_shape == (4,)
    lin = TDLinear(3, 5)
    before = (lin.weight.clone(), lin.bias.clone())
    lin.reset_parameters()
    assert lin.weight.shape == (5, 3)
    assert lin.bias.shape == (5,)
    assert not torch.equal(lin.weight, before[0])
    assert not torch.equal(lin.bias, before[1])
    assert lin.weight.abs().max() <= 1 / 3**0.5 + 1e-6  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert lin.bias.abs().max() <= 1 / 3**0.5
    with pytest.warns(UserWarning, match="zero-element"):  # as nn.Linear(0, 2)
        assert TDLinear(0, 2).bias.abs().max() == 0
    mha = TDMultiheadAttention(8, 2)
    assert mha.head_dim == 4
    assert isinstance(mha.q_proj, TDLinear)
    conv = TDConv2d(2, 4, 3)
    assert conv.weight.abs().max() <= 1 / (2 * 9) ** 0.5 + 1e-6


def test_extra_repr() -> None:
    assert TDSoftmax().extra_repr() == "dim=-1"
    assert TDLayerNorm((2, 3), eps=1e-4, bias=False).extra_repr() == (
        "(2, 3), eps=0.0001, elementwise_affine=True, bias=False"
    )
    assert TDGELU("tanh").extra_repr() == "approximate='tanh'"
    assert TDLinear(3, 5, bias=False).extra_repr() == "in_features=3, out_features=5, bias=False"
    assert TDScaledDotProductAttention(True, 0.25).extra_repr() == "is_causal=True, scale=0.25"
    assert (
        TDMultiheadAttention(8, 2).extra_repr() == "embed_dim=8, num_heads=2, dropout=0.0, batch_first=True"
    )
    assert TDRMSNorm(4).extra_repr() == "(4,), eps=None, elementwise_affine=True"
    assert TDConv2d(2, 4, 3, padding="same", bias=False).extra_repr() == (
        "2, 4, kernel_size=(3, 3), stride=(1, 1), padding='same', bias=False"
    )
    assert TDFunction(torch.tanh).extra_repr() == "fn=tanh, name='TDFunction'"


# -- dtype and device follow the torch ops ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "make",
    [
        lambda: TDGELU(),
        lambda: TDSoftmax(),
        lambda: TDSiLU(),
        lambda: TDRMSNorm(4),
        lambda: TDFunction(torch.tanh),
    ],
)
def test_output_dtype_follows_input(make: Callable[[], nn.Module], dtype: torch.dtype) -> None:
    x = _x((3, 2, 4), 0).to(dtype)
    assert make()(x).dtype == dtype


def test_layer_norm_dtypes_follow_torch() -> None:
    op = TDLayerNorm(4)
    assert op(_x((3, 4), 0).half()).dtype == torch.float16
    assert op(_x((3, 4), 0).bfloat16()).dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="mixed dtype"):
        op(_x((3, 4), 0).double())


def test_half_attention_and_products_keep_dtype() -> None:
    q = _x((3, 2, 2, 4, 8), 0).half()
    assert (
        TDScaledDotProductAttention()(q, q, q, torch.zeros(4, 4, dtype=torch.float16)).dtype == torch.float16
    )
    mha = TDMultiheadAttention(8, 2, dtype=torch.bfloat16)
    x = _x((3, 2, 4, 8), 0).bfloat16()
    assert mha(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.bfloat16))[0].dtype == torch.bfloat16
    assert TDMatMul()(q, q.transpose(-1, -2)).dtype == torch.float16
    assert TDMul()(q, q).dtype == torch.float16
    assert TDLinear(8, 2, dtype=torch.float16)(q).dtype == torch.float16


def test_half_gradients_reach_half_parameters() -> None:
    op = TDLayerNorm(4, dtype=torch.bfloat16)
    x = _x((3, 2, 4), 0).bfloat16().requires_grad_(True)
    op(x).sum().backward()
    assert x.grad is not None
    assert x.grad.dtype == torch.bfloat16
    assert op.weight.grad is not None
    assert op.weight.grad.dtype == torch.bfloat16


def test_meta_device() -> None:
    op = TDLinear(4, 3, device="meta")
    assert op(torch.empty(3, 2, 4, device="meta")).device.type == "meta"
    assert TDGELU()(torch.empty(3, 2, 4, device="meta")).shape == (3, 2, 4)


class _Block(nn.Module):
    """A pre-norm ViT block; with TD submodules it is the TD block (the residual sums are linear)."""

    def __init__(self, norm1: nn.Module, attn: nn.Module, norm2: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def test_transformer_block_built_with_from_module_equals_the_ann_block() -> None:
    torch.manual_seed(0)
    ann = _Block(
        nn.LayerNorm(16),
        nn.MultiheadAttention(16, 4, batch_first=True),
        nn.RMSNorm(16),
        nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)),
    ).eval()
    td = _Block(
        TDLayerNorm.from_module(ann.norm1),
        TDMultiheadAttention.from_module(ann.attn),
        TDRMSNorm.from_module(ann.norm2),
        nn.Sequential(*(cls.from_module(m) for cls, m in zip((TDLinear, TDGELU, TDLinear), ann.mlp))),
    )
    x = _x((6, 2, 5, 16), 0)
    with torch.no_grad():
        y = td(x)
        for t in range(6):
            torch.testing.assert_close(y.cumsum(0)[t], ann(x.cumsum(0)[t]), atol=1e-4, rtol=1e-4)
        ann2snn_ops.set_streaming(td)
        assert td.attn.streaming
        assert td.mlp[1].streaming
        steps = torch.stack([td(x[t]) for t in range(6)])
        torch.testing.assert_close(steps, y, atol=1e-5, rtol=1e-5)
        ann2snn_ops.reset_streaming(td)
        torch.testing.assert_close(td(x[0]), y[0], atol=1e-5, rtol=1e-5)
        ann2snn_ops.set_streaming(td, False)
        torch.testing.assert_close(td(x), y, atol=0, rtol=0)


def test_model_level_streaming_switches_reject_non_modules() -> None:
    with pytest.raises(TypeError, match=r"set_streaming expects an nn\.Module, but got int"):
        ann2snn_ops.set_streaming(3)  # type: ignore[type-var]
    with pytest.raises(TypeError, match=r"reset_streaming expects an nn\.Module, but got str"):
        ann2snn_ops.reset_streaming("m")  # type: ignore[arg-type]

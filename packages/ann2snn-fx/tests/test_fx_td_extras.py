"""replace_by_td_operators beyond the seed: more ops, constants at t = 0, the report and strict=True."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ann2snn_fx.td import TDEquivalenceError, replace_by_td_operators, td_impulse
from ann2snn_ops import TDConv2d, TDMatMul, TDMul, TDRMSNorm, TDSiLU, TDSoftmax


def _check(ann: nn.Module, *inputs: torch.Tensor, atol: float = 1e-5) -> torch.fx.GraphModule:
    gm = replace_by_td_operators(ann, strict=True)
    out = gm(*inputs)
    cums = [x.cumsum(0) for x in inputs]
    for t in range(inputs[0].shape[0]):
        torch.testing.assert_close(out.cumsum(0)[t], ann(*[c[t] for c in cums]), atol=atol, rtol=atol)
    return gm


class Fn(nn.Module):
    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class Fn2(Fn):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.fn(a, b)


@pytest.mark.parametrize(
    ("fn", "dim"),
    [
        (lambda x: F.softmax(x, dim=1), 2),
        (lambda x: torch.softmax(x, -1), -1),
        (lambda x: x.softmax(dim=2), 3),
        (lambda x: F.softmax(x, 1, dtype=torch.float64), 2),
    ],
)
def test_functional_softmax_dims_shifted(fn: Callable[[torch.Tensor], torch.Tensor], dim: int) -> None:
    torch.manual_seed(0)
    gm = _check(Fn(fn), torch.randn(4, 2, 3, 5))
    (module,) = [m for m in gm.modules() if isinstance(m, TDSoftmax)]
    assert module.dim == dim


def test_softmax_module_dim_shifted() -> None:
    torch.manual_seed(0)
    gm = _check(nn.Sequential(nn.Softmax(dim=1)), torch.randn(3, 2, 4, 5))
    assert isinstance(getattr(gm, "0"), TDSoftmax)
    assert getattr(gm, "0").dim == 2


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: F.gelu(x, approximate="tanh"),
        lambda x: torch.exp(x) + x.pow(3) + x**2 + F.softplus(x, beta=2.0) + x.clamp(min=-0.5),
        F.silu,
        torch.tanh,
        lambda x: x.sigmoid(),
        F.relu,
    ],
)
def test_functional_nonlinearities(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    torch.manual_seed(0)
    gm = _check(Fn(fn), torch.randn(5, 2, 6))
    assert gm.td_report.converted


def test_more_modules() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.SiLU(), nn.RMSNorm([3, 4, 4]), nn.Tanh()).eval()
    gm = _check(ann, torch.randn(3, 2, 2, 4, 4))
    assert isinstance(getattr(gm, "0"), TDConv2d)
    assert isinstance(getattr(gm, "1"), TDSiLU)
    assert isinstance(getattr(gm, "2"), TDRMSNorm)


class FunctionalLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(F.linear(x, self.w, self.b))


def test_functional_linear_bias_counted_once() -> None:
    torch.manual_seed(0)
    gm = _check(FunctionalLinear(), torch.randn(6, 2, 6))
    assert any("bias added at t = 0" in r.detail for r in gm.td_report.converted)


@pytest.mark.parametrize(
    "fn",
    [
        torch.matmul,
        lambda a, b: a @ b.transpose(-2, -1).transpose(-2, -1),
        torch.bmm,
        lambda a, b: a.matmul(b),
    ],
)
def test_products_of_two_time_sequences(fn: Callable[..., torch.Tensor]) -> None:
    torch.manual_seed(0)
    gm = _check(Fn2(fn), torch.randn(4, 2, 3, 5), torch.randn(4, 2, 5, 3))
    assert any(isinstance(m, TDMatMul) for m in gm.modules())


def test_elementwise_product_and_constant_scaling() -> None:
    torch.manual_seed(0)
    gm = _check(Fn2(lambda a, b: (a * b) * 3.0 - a / 2), torch.randn(4, 2, 5), torch.randn(4, 2, 5))
    assert sum(isinstance(m, TDMul) for m in gm.modules()) == 1


class PosEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 3, 4))
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x) + self.pos
        x = 1.0 - x
        x = torch.cat([x, self.pos.expand(2, 3, 4)], dim=-1)
        return torch.softmax(x + 0.5, dim=-1)


def test_constants_are_added_at_t0_only() -> None:
    torch.manual_seed(0)
    gm = _check(PosEmbed(), torch.randn(5, 2, 3, 4))
    details = [r.detail for r in gm.td_report.converted]
    assert details.count("constant operand added at t = 0 only") == 3
    assert "constant members placed at t = 0 only" in details


def test_td_impulse() -> None:
    ref = torch.zeros(3, 2, 4)
    out = td_impulse(torch.arange(4.0), ref)
    assert out.shape == (3, 1, 4)
    torch.testing.assert_close(out[0, 0], torch.arange(4.0))
    assert not out[1:].any()
    torch.testing.assert_close(td_impulse(2, ref).sum(0), torch.full((1, 1), 2.0))
    with pytest.raises(ValueError, match="more dims than one time step"):
        td_impulse(torch.zeros(3, 2, 4), ref)


class Leaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.fc(x))  # train-mode dropout
        y = y.flatten(1)  # positive-dim shape op
        y = torch.amax(y, dim=-1, keepdim=True) + y  # unconverted nonlinearity
        y = y.transpose(-1, -2).transpose(-1, -2)  # negative dims: fine
        return y[:, 0]  # indexes the time axis first


def test_report_lists_every_breaking_node() -> None:
    gm = replace_by_td_operators(Leaky())
    report = gm.td_report
    assert not report.equivalent
    assert [r.node for r in report.issues] == ["drop", "flatten", "amax", "getitem"]
    details = " | ".join(r.detail for r in report.issues)
    for fragment in ("dropout in training mode", "dim(s) [1]", "unconverted nonlinearity", "time axis first"):
        assert fragment in details
    assert "ISSUE" in str(report)
    assert replace_by_td_operators(Leaky().eval()).td_report.issues[0].node == "flatten"


def test_strict_raises_listing_all_issues() -> None:
    with pytest.raises(TDEquivalenceError, match=r"4 node\(s\)") as info:
        replace_by_td_operators(Leaky(), strict=True)
    assert isinstance(info.value, ValueError)
    assert [r.node for r in info.value.issues] == ["drop", "flatten", "amax", "getitem"]
    assert "drop (call_module Dropout)" in str(info.value)


def test_static_inputs_are_constants() -> None:
    class Masked(nn.Module):
        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x + bias, dim=-1)

    torch.manual_seed(0)
    ann = Masked()
    gm = replace_by_td_operators(ann, static_inputs={"bias"}, strict=True)
    x, bias = torch.randn(4, 2, 5), torch.randn(5)
    torch.testing.assert_close(gm(x, bias).cumsum(0)[-1], ann(x.sum(0), bias), atol=1e-6, rtol=1e-6)


def test_unknown_module_and_softmax_without_dim_are_reported() -> None:
    ann = nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=None), nn.Hardswish())
    issues = replace_by_td_operators(ann).td_report.issues
    assert [r.node for r in issues] == ["_1", "_2"]
    assert "Hardswish" in issues[1].detail


def test_tensor_attributes_and_shape_queries() -> None:
    gm = replace_by_td_operators(
        Fn(lambda x: x.mT.sum(-1) + x.shape[0] + x.ndim + x.size(1) + x.shape[1:][0])
    )
    assert [r.detail for r in gm.td_report.issues] == [
        "attribute 'mT' of a [T, ...] time sequence",
        "shape[0] of a [T, ...] time sequence counts the time axis",
        "the rank/size of a [T, ...] time sequence includes the time axis",
        "size(1) of a [T, ...] time sequence counts the time axis",
        "shape[1:] of a [T, ...] time sequence counts the time axis",
    ]
    ann = Fn(lambda x: x.sum(-1, keepdim=True) * x.size(-1) + x.shape[-1])
    shape_only = replace_by_td_operators(ann, strict=True)
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(shape_only(x).sum(0), ann(x.sum(0)))


def test_norm_subclasses_traced_through_are_converted() -> None:
    class MyLayerNorm(nn.LayerNorm):
        pass

    class MyRMSNorm(nn.RMSNorm):
        pass

    class MyLinear(nn.Linear):
        pass

    torch.manual_seed(0)
    ann = nn.Sequential(MyLinear(6, 6), MyLayerNorm(6), MyRMSNorm(6, eps=1e-6))
    with torch.no_grad():
        for p in ann.parameters():
            p.add_(torch.randn_like(p))
    gm = _check(ann, torch.randn(5, 2, 6))
    assert len(gm.td_report.converted) == 3

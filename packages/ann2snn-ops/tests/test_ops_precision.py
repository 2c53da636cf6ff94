"""Half precision: the TD op's cumulative output is no less accurate than the plain op in the same dtype.

Ground truth is the float64 op on the float64 cumulative input. The plain op gets the correctly rounded
cumulative input in the half dtype (the best it can get); the TD op gets the half-precision differential
input. Errors are max-abs, relative to the largest reference value.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ann2snn_ops import (
    TDGELU,
    TDConv2d,
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

# (TD op factory, plain op f(*inputs) in any dtype, input shapes without T)
Case = tuple[Callable[[torch.dtype], nn.Module], Callable[..., torch.Tensor], list[tuple[int, ...]]]


def _cases() -> dict[str, Case]:
    torch.manual_seed(0)
    ln = TDLayerNorm(16)
    rms = TDRMSNorm(16)
    lin = TDLinear(16, 8)
    conv = TDConv2d(3, 4, 3, padding=1)
    mha = TDMultiheadAttention(16, 2)
    with torch.no_grad():
        for p in (*ln.parameters(), *rms.parameters()):
            p.normal_()
    mha_ref = nn.MultiheadAttention(16, 2, batch_first=True)
    with torch.no_grad():
        mha_ref.in_proj_weight.copy_(torch.cat([mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.weight]))
        mha_ref.in_proj_bias.copy_(torch.cat([mha.q_proj.bias, mha.k_proj.bias, mha.v_proj.bias]))
        mha_ref.out_proj.load_state_dict(mha.out_proj.state_dict())

    def with_dtype(module: nn.Module) -> Callable[[torch.dtype], nn.Module]:
        return lambda dtype: module.to(dtype)

    def mha_plain(x: torch.Tensor) -> torch.Tensor:
        m = mha_ref.to(x.dtype)
        return m(x, x, x, need_weights=False)[0]

    return {
        "gelu": (lambda d: TDGELU(), F.gelu, [(4, 16)]),
        "silu": (lambda d: TDSiLU(), F.silu, [(4, 16)]),
        "softmax": (lambda d: TDSoftmax(), lambda x: torch.softmax(x, -1), [(4, 16)]),
        "layer_norm": (
            with_dtype(ln),
            lambda x: F.layer_norm(x, (16,), ln.weight.to(x.dtype), ln.bias.to(x.dtype)),
            [(4, 16)],
        ),
        "rms_norm": (with_dtype(rms), lambda x: F.rms_norm(x, (16,), rms.weight.to(x.dtype)), [(4, 16)]),
        "linear": (
            with_dtype(lin),
            lambda x: F.linear(x, lin.weight.to(x.dtype), lin.bias.to(x.dtype)),
            [(4, 16)],
        ),
        "conv2d": (
            with_dtype(conv),
            lambda x: F.conv2d(x, conv.weight.to(x.dtype), conv.bias.to(x.dtype), padding=1),
            [(3, 6, 6)],
        ),
        "sdpa": (lambda d: TDScaledDotProductAttention(), F.scaled_dot_product_attention, [(2, 5, 8)] * 3),
        "mha": (with_dtype(mha), mha_plain, [(1, 5, 16)]),
        "matmul": (lambda d: TDMatMul(), torch.matmul, [(4, 8), (8, 3)]),
        "mul": (lambda d: TDMul(), torch.mul, [(4, 8), (4, 8)]),
    }


CASES = _cases()


def _relative_errors(name: str, dtype: torch.dtype, t: int) -> tuple[float, float]:
    make, plain, shapes = CASES[name]
    g = torch.Generator().manual_seed(1)
    # Inputs whose cumulative sum grows (a positive drift plus noise), rounded to the half dtype.
    xs = [(0.05 + 0.05 * torch.randn((t, *s), generator=g, dtype=torch.float64)).to(dtype) for s in shapes]
    op = make(dtype)
    with torch.no_grad():
        if name == "mha":
            y = op(xs[0], xs[0], xs[0])[0]
        else:
            y = op(*xs)
        assert y.dtype == dtype
        cum64 = [x.double().cumsum(0) for x in xs]
        if name == "mha":
            ref = plain(cum64[0].flatten(0, 1)).unflatten(0, (t, -1))
            plain_out = plain(cum64[0].to(dtype).flatten(0, 1)).unflatten(0, (t, -1)).double()
        elif name == "conv2d":
            ref = plain(cum64[0])
            plain_out = plain(cum64[0].to(dtype)).double()
        else:
            ref = plain(*cum64)
            plain_out = plain(*(c.to(dtype) for c in cum64)).double()
    scale = ref.abs().max()
    err_td = ((y.double().cumsum(0) - ref).abs().max() / scale).item()
    err_plain = ((plain_out - ref).abs().max() / scale).item()
    return err_td, err_plain


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("t", [8, 1024])
def test_half_precision_no_worse_than_plain_op(name: str, dtype: torch.dtype, t: int) -> None:
    err_td, err_plain = _relative_errors(name, dtype, t)
    assert err_td <= err_plain, f"TD error {err_td:.3e} > plain {err_plain:.3e}"

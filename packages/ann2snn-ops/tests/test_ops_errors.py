"""Every validation path, with the messages of SPEC section 2."""

from __future__ import annotations

import re

import pytest
import torch

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

UNARY = [
    ("TDSoftmax", TDSoftmax()),
    ("TDLayerNorm", TDLayerNorm(3)),
    ("TDGELU", TDGELU()),
    ("TDLinear", TDLinear(3, 2)),
    ("TDSiLU", TDSiLU()),
    ("TDRMSNorm", TDRMSNorm(3)),
    ("TDConv2d", TDConv2d(3, 2, 1)),
    ("my_op", TDFunction(torch.tanh, name="my_op")),
]


@pytest.mark.parametrize(("name", "op"), UNARY)
def test_common_sequence_checks(name: str, op: torch.nn.Module) -> None:
    msg = (
        f"{name} expects an input sequence with shape [T, ...] and at least 2 dimensions, but got shape (3,)."
    )
    with pytest.raises(ValueError, match=re.escape(msg)):
        op(torch.randn(3))
    with pytest.raises(
        ValueError, match=re.escape(f"{name} expects a non-empty time dimension, but got shape (0, 3).")
    ):
        op(torch.randn(0, 3))
    with pytest.raises(TypeError, match=f"{name} expects a torch.Tensor input, but got list"):
        op([1.0, 2.0])


@pytest.mark.parametrize(("name", "op"), UNARY)
def test_streaming_step_must_have_a_dimension(name: str, op: torch.nn.Module) -> None:
    op.set_streaming(True)
    try:
        with pytest.raises(ValueError, match=f"{name} in streaming mode expects one time step"):
            op(torch.tensor(1.0))
    finally:
        op.set_streaming(False)


def test_set_streaming_rejects_non_bool() -> None:
    with pytest.raises(TypeError, match="set_streaming expects a bool, but got int"):
        TDGELU().set_streaming(1)  # type: ignore[arg-type]


def test_softmax_checks() -> None:
    with pytest.raises(TypeError, match="TDSoftmax: dim must be an int, but got None"):
        TDSoftmax(dim=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dim must be an int"):
        TDSoftmax(dim=True)
    x = torch.randn(2, 3, 4)
    with pytest.raises(
        ValueError,
        match=re.escape("dim must be in the range [-3, 2], but got 3 for an input with 3 dimensions."),
    ):
        TDSoftmax(3)(x)
    with pytest.raises(ValueError, match=re.escape("dim must be in the range [-3, 2], but got -4")):
        TDSoftmax(-4)(x)
    for dim in (0, -3):
        with pytest.raises(ValueError, match="time dimension") as info:
            TDSoftmax(dim)(x)
        assert str(info.value) == (
            "TDSoftmax reserves dimension 0 as the time dimension; softmax dim must not resolve to 0."
        )


@pytest.mark.parametrize(("cls", "name"), [(TDLayerNorm, "TDLayerNorm"), (TDRMSNorm, "TDRMSNorm")])
def test_norm_trailing_shape(cls: type, name: str) -> None:
    op = cls((2, 3))
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{name} expects the trailing shape of x_seq to match normalized_shape=(2, 3), but got (3, 3)."
        ),
    ):
        op(torch.randn(4, 3, 3))
    with pytest.raises(ValueError, match=re.escape("but got (3,).")):  # the time axis is never normalised
        cls((2, 3))(torch.randn(2, 3))
    with pytest.raises(ValueError, match="trailing shape"):
        cls(3)(torch.randn(2, 3, 4))


@pytest.mark.parametrize("cls", [TDLayerNorm, TDRMSNorm])
def test_norm_constructor_checks(cls: type) -> None:
    with pytest.raises(
        ValueError, match="normalized_shape must contain only positive sizes, but got \\(0,\\)"
    ):
        cls(0)
    with pytest.raises(TypeError, match="normalized_shape must be an int or a sequence of ints, but got 'a'"):
        cls("a")
    with pytest.raises(TypeError, match="normalized_shape must contain only ints"):
        cls((2.0,))
    with pytest.raises(
        TypeError, match="normalized_shape must be an int or a sequence of ints, but got True"
    ):
        cls(True)


def test_rms_norm_eps_check() -> None:
    with pytest.raises(ValueError, match="TDRMSNorm: eps must be None or a non-negative number, but got -1"):
        TDRMSNorm(3, eps=-1)


def test_gelu_approximate() -> None:
    with pytest.raises(
        ValueError, match=re.escape("TDGELU: approximate must be 'none' or 'tanh', but got 'fast'.")
    ):
        TDGELU("fast")  # type: ignore[arg-type]


def test_linear_checks() -> None:
    with pytest.raises(RuntimeError):  # a wrong trailing size is torch's own error
        TDLinear(3, 2)(torch.randn(2, 4))
    with pytest.raises(TypeError, match=r"TDLinear: in_features must be an int, but got 3.0"):
        TDLinear(3.0, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="TDLinear: out_features must be non-negative, but got -1"):
        TDLinear(3, -1)
    with pytest.raises(RuntimeError, match="same dtype"):
        TDLinear(3, 2)(torch.randn(2, 3, dtype=torch.float64))


def test_conv2d_checks() -> None:
    with pytest.raises(ValueError, match="TDConv2d: in_channels must be positive, but got 0"):
        TDConv2d(0, 2, 3)
    with pytest.raises(
        ValueError, match="TDConv2d: in_channels must be divisible by groups, but got 3 and 2"
    ):
        TDConv2d(3, 2, 1, groups=2)
    with pytest.raises(
        ValueError, match="TDConv2d: out_channels must be divisible by groups, but got 3 and 2"
    ):
        TDConv2d(2, 3, 1, groups=2)
    with pytest.raises(ValueError, match="TDConv2d: kernel_size must be positive, but got \\(0, 0\\)"):
        TDConv2d(2, 2, 0)
    with pytest.raises(TypeError, match="TDConv2d: stride must be an int or a pair of ints, but got 'x'"):
        TDConv2d(2, 2, 1, stride="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="TDConv2d: padding must be 'same', 'valid' or ints, but got 'full'"):
        TDConv2d(2, 2, 1, padding="full")
    with pytest.raises(ValueError, match="padding='same' is not supported for strided convolutions"):
        TDConv2d(2, 2, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="TDConv2d: padding must be non-negative, but got \\(-1, -1\\)"):
        TDConv2d(2, 2, 3, padding=-1)
    with pytest.raises(
        ValueError,
        match="padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular', but got 'mirror'",
    ):
        TDConv2d(2, 2, 3, padding_mode="mirror")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=re.escape(
            "TDConv2d expects an input sequence with shape [T, N, C, H, W] or [T, C, H, W], but got shape (2, 3, 4)."
        ),
    ):
        TDConv2d(3, 2, 1)(torch.randn(2, 3, 4))
    op = TDConv2d(3, 2, 1).set_streaming(True)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "TDConv2d in streaming mode expects one step with shape [N, C, H, W] or [C, H, W], but got shape (3, 4)."
        ),
    ):
        op(torch.randn(3, 4))


def test_function_checks() -> None:
    with pytest.raises(TypeError, match="TDFunction expects a callable fn, but got int"):
        TDFunction(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="TDFunction expects name to be a str or None, but got int"):
        TDFunction(torch.tanh, name=3)  # type: ignore[arg-type]


# -- scaled dot-product attention ----------------------------------------------------------------------------

SDPA = "TDScaledDotProductAttention"


@pytest.mark.parametrize("which", [0, 1, 2])
def test_sdpa_input_checks(which: int) -> None:
    names = ["query_seq", "key_seq", "value_seq"]
    good = [torch.randn(2, 3, 4) for _ in range(3)]
    bad = list(good)
    bad[which] = torch.randn(2, 4)
    msg = f"{SDPA} expects {names[which]} with shape [T, ..., L, E] and at least 3 dimensions, but got shape (2, 4)."
    with pytest.raises(ValueError, match=re.escape(msg)):
        TDScaledDotProductAttention()(*bad)
    bad[which] = torch.randn(4)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        TDScaledDotProductAttention()(*bad)


def test_sdpa_time_rank_mask_checks() -> None:
    q = torch.randn(2, 3, 4)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{SDPA} expects query_seq, key_seq, and value_seq to have the same time length, but got 2, 3, and 2."
        ),
    ):
        TDScaledDotProductAttention()(q, torch.randn(3, 3, 4), q)
    with pytest.raises(ValueError, match="to have the same number of dimensions"):
        TDScaledDotProductAttention()(torch.randn(2, 1, 3, 4), q, q)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{SDPA} does not allow attn_mask when is_causal=True; use one masking mode at a time."
        ),
    ):
        TDScaledDotProductAttention(is_causal=True)(q, q, q, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must have at most 3 dimensions"):
        TDScaledDotProductAttention()(q, q, q, torch.ones(1, 1, 3, 3))
    with pytest.raises(
        ValueError, match=r"query_seq and key_seq of the same last size E, but got query_seq \(2, 3, 4\)"
    ):
        TDScaledDotProductAttention()(q, torch.randn(2, 3, 5), q)  # torch raises a raw RuntimeError
    with pytest.raises(TypeError, match="is_causal must be a bool, but got 1"):
        TDScaledDotProductAttention(is_causal=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="scale must be None or a number, but got 'a'"):
        TDScaledDotProductAttention(scale="a")  # type: ignore[arg-type]


# -- multi-head attention -----------------------------------------------------------------------------------


def test_mha_constructor_checks_in_order() -> None:
    with pytest.raises(ValueError, match="TDMultiheadAttention: num_heads must be a positive int, but got 0"):
        TDMultiheadAttention(8, 0)
    with pytest.raises(
        ValueError, match="TDMultiheadAttention: embed_dim must be a positive int, but got -8"
    ):
        TDMultiheadAttention(-8, 2)
    with pytest.raises(ValueError, match=r"^embed_dim must be divisible by num_heads.$"):
        TDMultiheadAttention(8, 3, dropout=0.1, batch_first=False)
    with pytest.raises(ValueError, match=r"^TDMultiheadAttention only supports dropout=0.0.$"):
        TDMultiheadAttention(8, 2, dropout=0.1, batch_first=False)
    assert TDMultiheadAttention(8, 2, batch_first=False).batch_first is False  # sequence-first: supported


def test_mha_forward_checks_in_order() -> None:
    op = TDMultiheadAttention(8, 2)
    x = torch.randn(2, 1, 3, 8)
    with pytest.raises(ValueError, match=r"^TDMultiheadAttention only supports need_weights=False.$"):
        op(x, x, x, torch.ones(1, 3, dtype=torch.bool), True)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "TDMultiheadAttention expects key_padding_mask of shape (batch, S) = (1, 3), but got (1, 4)."
        ),
    ):
        op(x, x, x, torch.ones(1, 4, dtype=torch.bool), False)
    with pytest.raises(TypeError, match=r"bool or floating-point key_padding_mask.*mask\.bool\(\)"):
        op(x, x, x, torch.ones(1, 3, dtype=torch.int64), False)
    with pytest.raises(TypeError, match=r"key_padding_mask to be a tensor or None"):
        op(x, x, x, [[True, False, False]], False)
    with pytest.raises(
        ValueError, match=r"^TDMultiheadAttention does not support average_attn_weights=False.$"
    ):
        op(x, x, x, average_attn_weights=False)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "TDMultiheadAttention expects input with shape [T, batch, seq, embed_dim], but got (2, 3, 8)."
        ),
    ):
        op(torch.randn(2, 3, 8), x, x)
    with pytest.raises(
        ValueError,
        match=re.escape("TDMultiheadAttention expects the last dimension to match embed_dim=8, but got 7."),
    ):
        op(x, torch.randn(2, 1, 3, 7), x)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        op(torch.randn(3), x, x)
    with pytest.raises(ValueError, match="the same time length, but got 2, 3, and 2"):
        op(x, torch.randn(3, 1, 3, 8), x)
    with pytest.raises(ValueError, match="the same batch size, but got 1, 2, and 2"):
        op(x, torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8))
    with pytest.raises(
        ValueError, match="key_seq and value_seq to have the same sequence length, but got 3 and 4"
    ):
        op(x, x, torch.randn(2, 1, 4, 8))
    with pytest.raises(ValueError, match="does not allow attn_mask when is_causal=True"):
        op(x, x, x, attn_mask=torch.zeros(3, 3), is_causal=True)


def test_mha_mask_checks() -> None:
    op = TDMultiheadAttention(8, 2)
    x = torch.randn(2, 2, 3, 8)
    with pytest.raises(
        ValueError, match=re.escape("2-D attn_mask of shape (L, S) = (3, 3), but got (3, 4).")
    ):
        op(x, x, x, attn_mask=torch.zeros(3, 4))
    with pytest.raises(
        ValueError,
        match=re.escape("3-D attn_mask of shape (batch * num_heads, L, S) = (4, 3, 3), but got (2, 3, 3)."),
    ):
        op(x, x, x, attn_mask=torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="2-D or 3-D attn_mask, but got shape \\(1, 4, 3, 3\\)"):
        op(x, x, x, attn_mask=torch.zeros(1, 4, 3, 3))
    with pytest.raises(TypeError, match="attn_mask to be a tensor or None"):
        op(x, x, x, attn_mask=[[0.0]])  # type: ignore[arg-type]


# -- products -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "name"), [(TDMatMul, "TDMatMul"), (TDMul, "TDMul")])
def test_product_checks(cls: type, name: str) -> None:
    a = torch.randn(2, 3, 3)
    with pytest.raises(ValueError, match=f"{name} expects an input sequence"):
        cls()(torch.randn(3), a)
    with pytest.raises(ValueError, match=f"{name} expects a non-empty time dimension"):
        cls()(a, torch.randn(0, 3, 3))
    with pytest.raises(
        ValueError, match=f"{name} expects a_seq and b_seq to have the same time length, but got 2 and 3."
    ):
        cls()(a, torch.randn(3, 3, 3))
    with pytest.raises(TypeError, match=f"{name} expects a_seq and b_seq of the same dtype"):
        cls()(a, a.double())
    with pytest.raises(RuntimeError):  # incompatible step shapes: torch's own error
        cls()(a, torch.randn(2, 4, 5))


# -- from_module ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (TDLinear, "nn.Linear"),
        (TDLayerNorm, "nn.LayerNorm"),
        (TDGELU, "nn.GELU"),
        (TDRMSNorm, "nn.RMSNorm"),
        (TDConv2d, "nn.Conv2d"),
        (TDSiLU, "nn.SiLU"),
        (TDSoftmax, "nn.Softmax"),
        (TDMultiheadAttention, "nn.MultiheadAttention"),
    ],
)
def test_from_module_rejects_other_types(cls: type, expected: str) -> None:
    with pytest.raises(TypeError, match=f"{cls.__name__}.from_module expects an {expected}, but got ReLU"):
        cls.from_module(torch.nn.ReLU())


def test_from_module_rejects_lazy_and_implicit_softmax() -> None:
    with pytest.raises(ValueError, match=r"TDLinear.from_module needs initialised parameters"):
        TDLinear.from_module(torch.nn.LazyLinear(3))
    with pytest.raises(
        ValueError, match=r"TDSoftmax.from_module requires an nn.Softmax with an explicit dim"
    ):
        TDSoftmax.from_module(torch.nn.Softmax())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(dropout=0.1, batch_first=False, kdim=4), "TD MHA conversion only supports dropout=0.0."),
        (
            dict(batch_first=False, kdim=4, add_bias_kv=True),  # sequence-first is supported
            "TD MHA conversion only supports kdim == vdim == embed_dim.",
        ),
        (dict(kdim=4, add_bias_kv=True), "TD MHA conversion only supports kdim == vdim == embed_dim."),
        (dict(vdim=4), "TD MHA conversion only supports kdim == vdim == embed_dim."),
        (dict(add_bias_kv=True, add_zero_attn=True), "TD MHA conversion does not support add_bias_kv."),
        (dict(add_zero_attn=True), "TD MHA conversion does not support add_zero_attn."),
    ],
)
def test_mha_from_module_rejections_in_order(kwargs: dict, message: str) -> None:
    kwargs.setdefault("batch_first", True)
    mha = torch.nn.MultiheadAttention(8, 2, **kwargs)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        TDMultiheadAttention.from_module(mha)


def test_mha_from_module_requires_packed_weights() -> None:
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    mha.in_proj_weight = None  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"^TD MHA conversion requires packed in_proj_weight.$"):
        TDMultiheadAttention.from_module(mha)

"""``TDMultiheadAttention`` with key-padding masks (issue 18): against ``nn.MultiheadAttention`` on the
cumulative inputs, ``out.cumsum(0)[t] == mha(x.cumsum(0)[t])`` at every step, to 1e-5 relative."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ann2snn_ops import TDMultiheadAttention

B, L, S, E, H = 3, 4, 6, 8, 2


def _mha(batch_first: bool = True) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first).eval()
    with torch.no_grad():  # torch initialises the biases to zero: make them count
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    return mha


def _padding() -> torch.Tensor:
    """Sample 0 unpadded, sample 1 with two padded keys, sample 2 with one."""
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, 4:] = True
    pad[2, 0] = True
    return pad


def _float(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(mask, float("-inf"))


def _check(op: nn.Module, mha: nn.Module, q: torch.Tensor, kv: torch.Tensor, **masks: object) -> None:
    out, weights = op(q, kv, kv, need_weights=False, **masks)
    assert weights is None
    for t in range(q.shape[0]):
        qc, kc = q.cumsum(0)[t], kv.cumsum(0)[t]
        ref = (
            mha(qc, qc, qc, need_weights=False, **masks)[0]
            if kv is q
            else mha(qc, kc, kc, need_weights=False, **masks)[0]
        )
        assert torch.isfinite(ref).all()
        error = (out.cumsum(0)[t] - ref).abs().max() / ref.abs().max()
        assert error <= 1e-5, (t, error.item())


def _layout(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """``[T, B, N, E]`` as the layout's input (sequence-first: ``[T, N, B, E]``)."""
    return x if batch_first else x.transpose(1, 2).contiguous()


def _masks(kind: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    pad = _padding()
    bool_mask = torch.rand(L, S) > 0.6
    bool_mask[:, 1:3] = False  # every query row keeps a key that no padding removes
    return {
        "bool": {"key_padding_mask": pad},
        "float": {"key_padding_mask": _float(pad) + 0.5 * torch.randn(B, S)},
        "bool+bool 2-D attn_mask": {"key_padding_mask": pad, "attn_mask": bool_mask},
        "float+float 2-D attn_mask": {"key_padding_mask": _float(pad), "attn_mask": torch.randn(L, S)},
        "bool+float 3-D attn_mask": {"key_padding_mask": pad, "attn_mask": torch.randn(B * H, L, S)},
        "3-D attn_mask alone": {"attn_mask": torch.randn(B * H, L, S)},
        "3-D bool attn_mask alone": {"attn_mask": torch.rand(B * H, L, S) > 0.8},
    }[kind]


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize(
    "kind",
    [
        "bool",
        "float",
        "bool+bool 2-D attn_mask",
        "float+float 2-D attn_mask",
        "bool+float 3-D attn_mask",
        "3-D attn_mask alone",
        "3-D bool attn_mask alone",
    ],
)
@pytest.mark.parametrize("grad", [False, True])  # no_grad takes torch's fused inference path
@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_masks_match_nn_mha(kind: str, steps: int, grad: bool, batch_first: bool) -> None:
    mha = _mha(batch_first)
    op = TDMultiheadAttention.from_module(mha)
    assert op.batch_first is batch_first
    torch.manual_seed(steps)
    q = _layout(torch.randn(steps, B, L, E), batch_first)
    kv = _layout(torch.randn(steps, B, S, E), batch_first)
    masks = _masks(kind)
    with torch.set_grad_enabled(grad):
        _check(op, mha, q, kv, **masks)


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("padding_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("batch_first", [True, False])
def test_causal_self_attention_with_padding_matches_nn_mha(
    steps: int, padding_dtype: torch.dtype, batch_first: bool
) -> None:
    mha = _mha(batch_first)
    op = TDMultiheadAttention.from_module(mha)
    torch.manual_seed(steps)
    x = _layout(torch.randn(steps, B, L, E), batch_first)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, 3:] = True
    pad[2, 2:] = True  # left-aligned padding keeps key 0, which every causal row sees
    padding = pad if padding_dtype is torch.bool else _float(pad)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    # torch's semantics: with a key_padding_mask, the given mask is used and is_causal is a hint
    _check(op, mha, x, x, key_padding_mask=padding, attn_mask=causal, is_causal=True)
    # the TD attention also builds the causal mask itself (nn.MultiheadAttention would need attn_mask)
    built, _ = op(x, x, x, key_padding_mask=padding, is_causal=True)
    given, _ = op(x, x, x, key_padding_mask=padding, attn_mask=causal)
    torch.testing.assert_close(built, given, atol=1e-6, rtol=1e-6)


def test_fully_padded_sample_gets_torch_reference_path_output() -> None:
    """A sample whose keys are all padding: torch's reference path (SDPA) gives a zero attention output,
    so the module returns ``out_proj``'s bias; torch's fused inference path (self-attention under
    ``no_grad``) gives NaN there."""
    mha = _mha()
    op = TDMultiheadAttention.from_module(mha)
    torch.manual_seed(1)
    x = torch.randn(4, B, S, E)
    pad = _padding()
    pad[2] = True
    out, _ = op(x, x, x, key_padding_mask=pad)
    xc = x.sum(0)
    ref = mha(xc, xc, xc, key_padding_mask=pad, need_weights=False)[0]  # grad enabled: the reference path
    torch.testing.assert_close(out.sum(0), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.sum(0)[2], mha.out_proj.bias.expand(S, E), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        fused = mha(xc, xc, xc, key_padding_mask=pad, need_weights=False)[0]
    assert torch.isnan(fused[2]).all()  # documented: torch's fast path differs on this sample only
    torch.testing.assert_close(out.sum(0)[:2], fused[:2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_streaming_with_padding_equals_full_sequence(batch_first: bool) -> None:
    op = TDMultiheadAttention.from_module(_mha(batch_first))
    torch.manual_seed(2)
    q = _layout(torch.randn(4, B, L, E), batch_first)
    kv = _layout(torch.randn(4, B, S, E), batch_first)
    pad = _padding()
    full, _ = op(q, kv, kv, key_padding_mask=pad)
    op.set_streaming(True)
    steps = torch.stack([op(q[t], kv[t], kv[t], key_padding_mask=pad)[0] for t in range(4)])
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def test_padding_gradients_match_nn_mha() -> None:
    mha = _mha().double()
    op = TDMultiheadAttention.from_module(mha)
    q = torch.randn(3, B, L, E, dtype=torch.float64, requires_grad=True)
    pad = _padding()
    out, _ = op(q, q, q, key_padding_mask=pad[:, :L])
    (g_td,) = torch.autograd.grad(out.sum(0).square().sum(), q)
    qc = q.detach().sum(0).requires_grad_(True)
    ref = mha(qc, qc, qc, key_padding_mask=pad[:, :L], need_weights=False)[0]
    (g_ref,) = torch.autograd.grad(ref.square().sum(), qc)
    torch.testing.assert_close(g_td, g_ref.expand_as(g_td))


def test_sequence_first_without_masks_matches_nn_mha_and_keeps_the_layout() -> None:
    mha = _mha(batch_first=False)
    op = TDMultiheadAttention.from_module(mha)
    assert "batch_first=False" in op.extra_repr()
    torch.manual_seed(4)
    x = torch.randn(5, L, B, E)
    out, _ = op(x, x, x)
    assert out.shape == x.shape
    assert out.is_contiguous()
    _check(op, mha, x, x)

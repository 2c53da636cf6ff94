"""Issue 18: torch's own nn.TransformerEncoder / nn.TransformerDecoder through both TD paths.

Before: the fx path failed with a raw ``RuntimeError: input to _none_or_dtype()``, the folded path with
``'_FoldedMultiheadAttention' object has no attribute 'batch_first'``, the default ``dropout=0.1`` was refused
in eval mode and ``batch_first=False`` was refused. The TD output must satisfy
``out.cumsum(0)[t] == ann(x.cumsum(0)[t])`` at every step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ann2snn_fx import ModelTraceError, TDTimeFolded, replace_by_td_operators, trace_model

E, HEADS, FF, T, B, S = 16, 2, 32, 4, 2, 5

_CURRENT: dict[str, pytest.Item] = {}


@pytest.fixture(autouse=True)
def _current_test(request: pytest.FixtureRequest) -> None:
    """The running test, so that the checks can record what they measured (docs/models.md)."""
    _CURRENT["item"] = request.node


def _encoder(batch_first: bool, norm_first: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, FF, batch_first=batch_first, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E), enable_nested_tensor=False).eval()


def _decoder(batch_first: bool) -> nn.Module:
    torch.manual_seed(1)
    layer = nn.TransformerDecoderLayer(E, HEADS, FF, batch_first=batch_first, activation="gelu")
    return nn.TransformerDecoder(layer, 2).eval()


def _seq(batch_first: bool, length: int = S) -> torch.Tensor:
    return torch.randn(T, B, length, E) if batch_first else torch.randn(T, length, B, E)


def _check_cumulative(out: torch.Tensor, ann, x: torch.Tensor, *extra, **kwargs) -> None:
    with torch.no_grad():
        error = max(
            (out.cumsum(0)[t] - ann(x.cumsum(0)[t], *[e.cumsum(0)[t] for e in extra], **kwargs))
            .abs()
            .max()
            .item()
            for t in range(T)
        )
        _CURRENT["item"].user_properties.append(("max_abs_error", f"{error:.1e} (float32)"))
        for t in range(T):
            expected = ann(x.cumsum(0)[t], *[e.cumsum(0)[t] for e in extra], **kwargs)
            torch.testing.assert_close(out.cumsum(0)[t], expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_with_default_dropout_converts_exactly_through_fx(
    batch_first: bool, norm_first: bool
) -> None:
    ann = _encoder(batch_first, norm_first)
    assert ann.layers[0].dropout.p == 0.1  # torch's default, inactive in eval mode
    gm = replace_by_td_operators(ann, strict=True)
    x = _seq(batch_first)
    with torch.no_grad():
        _check_cumulative(gm(x), ann, x)
    assert not ann.layers[0].training
    assert type(ann.layers[0]) is nn.TransformerEncoderLayer


def test_encoder_with_causal_mask_through_fx_and_folded() -> None:
    ann = _encoder(True)
    mask = nn.Transformer.generate_square_subsequent_mask(S)
    x = _seq(True)
    gm = replace_by_td_operators(ann, strict=True, static_inputs=("mask",))
    with torch.no_grad():
        _check_cumulative(gm(x, mask), ann, x, mask=mask, is_causal=True)
        folded = TDTimeFolded(ann, time_inputs={0}, strict=True)
        _check_cumulative(folded(x, mask=mask, is_causal=True), ann, x, mask=mask, is_causal=True)


def test_encoder_with_default_dropout_converts_exactly_through_folded() -> None:
    ann = _encoder(True, norm_first=True)
    folded = TDTimeFolded(ann, strict=True)
    x = _seq(True)
    with torch.no_grad():
        _check_cumulative(folded(x), ann, x)
    assert folded.report.equivalent


@pytest.mark.parametrize("batch_first", [True, False])
def test_decoder_with_memory_and_causal_mask_through_fx(batch_first: bool) -> None:
    ann = _decoder(batch_first)
    mask = nn.Transformer.generate_square_subsequent_mask(S)
    x, memory = _seq(batch_first), _seq(batch_first, 7)
    gm = replace_by_td_operators(ann, strict=True, static_inputs=("tgt_mask",))
    with torch.no_grad():
        _check_cumulative(gm(x, memory, mask), ann, x, memory, tgt_mask=mask, tgt_is_causal=True)


def test_decoder_through_folded() -> None:
    ann = _decoder(True)
    mask = nn.Transformer.generate_square_subsequent_mask(S)
    x, memory = _seq(True), _seq(True, 7)
    folded = TDTimeFolded(ann, time_inputs={0, 1}, strict=True)
    with torch.no_grad():
        _check_cumulative(folded(x, memory, tgt_mask=mask), ann, x, memory, tgt_mask=mask)


def test_sequence_first_layers_are_refused_by_the_folded_path_with_the_way_out() -> None:
    with pytest.raises(ValueError, match=r"batch_first=False.*replace_by_td_operators"):
        TDTimeFolded(_encoder(False))


def test_dropout_in_training_mode_is_refused() -> None:
    ann = _encoder(True).train()
    with pytest.raises(ValueError, match="training mode"):
        replace_by_td_operators(ann)
    with pytest.raises(ValueError, match="training mode"):
        TDTimeFolded(ann)


class _ProbesProxy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * int(x.sum())


@pytest.mark.parametrize("convert", [trace_model, replace_by_td_operators])
def test_raw_tracing_errors_become_model_trace_error(convert) -> None:
    with pytest.raises(ModelTraceError, match="concrete_args"):
        convert(_ProbesProxy())


class _Flags(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.Linear(4, 4))

    def forward(self, x: torch.Tensor, double: bool = False) -> torch.Tensor:
        y = self.block(self.fc(x))
        return y * 2 if double else y


def test_replace_by_td_operators_takes_concrete_args_and_leaf_modules() -> None:
    torch.manual_seed(0)
    ann = _Flags().eval()
    gm = replace_by_td_operators(ann, concrete_args={"double": True}, leaf_modules=["block"], strict=False)
    assert "block" in {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert gm.td_report.issues  # the untraced leaf is a plain nn.Sequential on time data: reported
    gm = replace_by_td_operators(ann, concrete_args={"double": True}, strict=True)
    x = torch.randn(T, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(gm(x).cumsum(0), ann(x.cumsum(0), double=True), atol=1e-5, rtol=1e-5)

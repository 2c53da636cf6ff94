"""Issue 18: key-padding masks through both TD paths (``replace_by_td_operators`` and ``TDTimeFolded``).

``nn.MultiheadAttention`` with ``key_padding_mask`` (bool or float, with ``attn_mask`` and ``is_causal``) and
torch's ``nn.TransformerEncoder``/``nn.TransformerDecoder`` with ``src_key_padding_mask``/
``tgt_key_padding_mask``/``memory_key_padding_mask`` were refused ("does not support key_padding_mask"). The
cumulative TD output must equal the ANN (torch's modules in eval mode, random weights) on the cumulative
input at every step, to 1e-5 relative. Where torch's nested-tensor fast path (``enable_nested_tensor=True``)
returns zeros at the padded positions, the comparison is on the positions torch defines (the unpadded ones).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ann2snn_fx import TDEquivalenceError, TDTimeFolded, replace_by_td_operators

E, HEADS, FF, B, L, S = 16, 2, 32, 3, 5, 6

pytestmark = pytest.mark.filterwarnings(
    "ignore:Support for mismatched",
    "ignore:The PyTorch API of nested tensors is in prototype stage",
    "ignore:enable_nested_tensor is True, but self.use_nested_tensor is False",
)


def _padding(length: int) -> torch.Tensor:
    """Right padding (True = padded): sample 0 unpadded, sample 1 two padded keys, sample 2 one."""
    pad = torch.zeros(B, length, dtype=torch.bool)
    pad[1, -2:] = True
    pad[2, -1:] = True
    return pad


def _float(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(mask, float("-inf"))


def _seq(steps: int, length: int, batch_first: bool = True) -> torch.Tensor:
    return torch.randn(steps, B, length, E) if batch_first else torch.randn(steps, length, B, E)


_CURRENT: dict[str, pytest.Item] = {}


@pytest.fixture(autouse=True)
def _current_test(request: pytest.FixtureRequest) -> None:
    """The running test, so that the layer tests can record what they measured (docs/models.md)."""
    _CURRENT["item"] = request.node


def _check(
    out: torch.Tensor, ann, steps: int, times: tuple[torch.Tensor, ...], keep=None, record=False, **static
) -> None:
    """``out.cumsum(0)[t] == ann(*(x.cumsum(0)[t] for x in times), **static)`` on ``keep`` (all if None),
    to 1e-5 relative (to the largest output) at every step; ``record``: the largest error for the models page."""
    assert out.shape[0] == steps
    largest = 0.0
    with torch.no_grad():
        for t in range(steps):
            ref = ann(*[x.cumsum(0)[t] for x in times], **static)
            got = out.cumsum(0)[t]
            if keep is not None:
                got, ref = got[keep], ref[keep]
            assert torch.isfinite(ref).all()
            largest = max(largest, (got - ref).abs().max().item())
            error = ((got - ref).abs().max() / ref.abs().max()).item()
            assert error <= 1e-5, (t, error)
    if record:
        _CURRENT["item"].user_properties.append(("max_abs_error", f"{largest:.1e} (float32)"))


# -- nn.MultiheadAttention called with a key_padding_mask ------------------------------------------------------


class _Attention(nn.Module):
    """Self-attention (``memory is None``) or cross-attention with a padding mask and an optional mask."""

    def __init__(self, causal: bool = False, batch_first: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
        with torch.no_grad():
            self.attn.in_proj_bias.normal_()
            self.attn.out_proj.bias.normal_()
        self.proj = nn.Linear(E, E)
        self.causal = causal

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, pad: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        y = self.proj(x)
        out = self.attn(
            y, memory, memory, key_padding_mask=pad, attn_mask=mask, need_weights=False, is_causal=self.causal
        )[0]
        return out + y


def _attention_case(kind: str, bf: bool) -> tuple[_Attention, torch.Tensor, torch.Tensor | None, bool]:
    """The model, key padding mask, attn_mask, and whether it is self-attention (keys = queries)."""
    torch.manual_seed(5)
    if kind == "bool":
        return _Attention(batch_first=bf), _padding(S), None, False
    if kind == "float":
        return _Attention(batch_first=bf), _float(_padding(S)) + 0.3 * torch.randn(B, S), None, False
    if kind == "bool + 2-D bool attn_mask":
        mask = torch.rand(L, S) > 0.6
        mask[:, :2] = False  # every query row keeps keys that the padding leaves
        return _Attention(batch_first=bf), _padding(S), mask, False
    if kind == "float + 3-D float attn_mask":
        return _Attention(batch_first=bf), _float(_padding(S)), torch.randn(B * HEADS, L, S), False
    if kind == "bool + causal attn_mask + is_causal":
        causal = nn.Transformer.generate_square_subsequent_mask(L)
        return _Attention(causal=True, batch_first=bf), _padding(L), causal, True
    raise AssertionError(kind)


_KINDS = [
    "bool",
    "float",
    "bool + 2-D bool attn_mask",
    "float + 3-D float attn_mask",
    "bool + causal attn_mask + is_causal",
]


def _attention_inputs(kind: str, steps: int, batch_first: bool = True):
    ann, pad, mask, self_attention = _attention_case(kind, batch_first)
    x = _seq(steps, L, batch_first)
    memory = x if self_attention else _seq(steps, S, batch_first)
    return ann.eval(), pad, mask, x, memory


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_key_padding_mask_through_fx(batch_first: bool, kind: str, steps: int) -> None:
    ann, pad, mask, x, memory = _attention_inputs(kind, steps, batch_first)
    gm = replace_by_td_operators(ann, strict=True, static_inputs=("pad", "mask"))
    assert gm.td_report.equivalent
    with torch.no_grad():
        out = gm(x, memory, pad, mask)
    _check(out, ann, steps, (x, memory), pad=pad, mask=mask)


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("kind", _KINDS)
def test_mha_key_padding_mask_through_folded(kind: str, steps: int) -> None:
    ann, pad, mask, x, memory = _attention_inputs(kind, steps)
    folded = TDTimeFolded(ann, time_inputs={0, 1}, strict=True)
    with torch.no_grad():
        out = folded(x, memory, pad, mask)
    assert folded.report.equivalent
    _check(out, ann, steps, (x, memory), pad=pad, mask=mask)


def test_sequence_first_mha_is_refused_by_the_folded_path_with_the_way_out() -> None:
    with pytest.raises(
        ValueError, match=r"'attn' is sequence-first \(batch_first=False\).*replace_by_td_operators"
    ):
        TDTimeFolded(_Attention(batch_first=False).eval())


class _PaddingFromInput(nn.Module):
    """A padding mask computed from the time-varying input: not constant over time."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, key_padding_mask=x[..., 0] > 0, need_weights=False)[0]


def test_padding_mask_computed_from_the_time_input_is_reported() -> None:
    ann = _PaddingFromInput().eval()
    gm = replace_by_td_operators(ann)
    issues = {(r.op, r.detail) for r in gm.td_report.issues}
    assert (
        "call_module TDMultiheadAttention",
        "key_padding_mask is computed from the time-sequence inputs; the TD attention needs a mask that is "
        "constant over time (pass it as an input named in static_inputs)",
    ) in issues
    with pytest.raises(TDEquivalenceError, match="key_padding_mask is computed from the time-sequence"):
        replace_by_td_operators(ann, strict=True)
    folded = TDTimeFolded(ann)
    x = torch.randn(4, 2, 3, 8)
    x[..., 0] = x[..., 0].abs()  # a key every sample keeps
    folded(x)
    assert any("key_padding_mask computed from the time inputs" in r.detail for r in folded.report.issues)
    with pytest.raises(TDEquivalenceError, match="key_padding_mask computed from the time inputs"):
        TDTimeFolded(ann, strict=True)(x)


# -- torch's transformer layers ---------------------------------------------------------------------------------


def _encoder(batch_first: bool, nested: bool = False, norm_first: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, FF, batch_first=batch_first, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E), enable_nested_tensor=nested).eval()


def _decoder(batch_first: bool) -> nn.Module:
    torch.manual_seed(1)
    layer = nn.TransformerDecoderLayer(E, HEADS, FF, batch_first=batch_first, activation="gelu")
    return nn.TransformerDecoder(layer, 2, norm=nn.LayerNorm(E)).eval()


def _positions(pad: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """The unpadded positions of an output [B, L, E] (or [L, B, E])."""
    return ~pad if batch_first else ~pad.T


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("padding_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_src_key_padding_mask_through_fx(
    batch_first: bool, padding_dtype: torch.dtype, steps: int
) -> None:
    ann = _encoder(batch_first, norm_first=steps == 8)
    pad = _padding(L) if padding_dtype is torch.bool else _float(_padding(L))
    x = _seq(steps, L, batch_first)
    gm = replace_by_td_operators(ann, strict=True, static_inputs=("src_key_padding_mask",))
    with torch.no_grad():
        out = gm(x, src_key_padding_mask=pad)
    _check(out, ann, steps, (x,), record=steps == 8, src_key_padding_mask=pad)


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_padding_with_causal_mask_and_is_causal_through_fx(batch_first: bool, steps: int) -> None:
    ann = _encoder(batch_first)
    pad = _padding(L)
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    x = _seq(steps, L, batch_first)
    static = ("mask", "src_key_padding_mask", "is_causal")
    gm = replace_by_td_operators(ann, strict=True, static_inputs=static)
    with torch.no_grad():
        out = gm(x, mask, pad, True)
    _check(out, ann, steps, (x,), record=steps == 8, mask=mask, src_key_padding_mask=pad, is_causal=True)


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("padding_dtype", [torch.bool, torch.float32])
def test_encoder_src_key_padding_mask_through_folded(padding_dtype: torch.dtype, steps: int) -> None:
    ann = _encoder(True, norm_first=steps == 8)
    pad = _padding(L) if padding_dtype is torch.bool else _float(_padding(L))
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    x = _seq(steps, L)
    folded = TDTimeFolded(ann, time_inputs={0}, strict=True)
    with torch.no_grad():
        out = folded(x, src_key_padding_mask=pad)
        _check(out, ann, steps, (x,), record=steps == 8, src_key_padding_mask=pad)
        out = folded(x, mask=mask, src_key_padding_mask=pad, is_causal=True)
        _check(out, ann, steps, (x,), record=steps == 8, mask=mask, src_key_padding_mask=pad, is_causal=True)


@pytest.mark.parametrize("steps", [4, 8])
def test_encoder_nested_tensor_fast_path_agrees_on_unpadded_positions(steps: int) -> None:
    """With ``enable_nested_tensor=True`` (torch's default) and a padding mask, torch's eval fast path runs
    on nested tensors and returns zeros at the padded positions; the TD paths compute torch's reference
    path, which defines them otherwise: they agree on every unpadded position, and the reference path
    (``enable_nested_tensor=False``) agrees everywhere."""
    ann = _encoder(True, nested=True)
    reference = _encoder(True, nested=False)
    pad = _padding(L)
    x = _seq(steps, L)
    gm = replace_by_td_operators(ann, strict=True, static_inputs=("src_key_padding_mask",))
    folded = TDTimeFolded(ann, time_inputs={0}, strict=True)
    with torch.no_grad():
        for out in (gm(x, src_key_padding_mask=pad), folded(x, src_key_padding_mask=pad)):
            _check(out, ann, steps, (x,), _positions(pad, True), steps == 8, src_key_padding_mask=pad)
            _check(out, reference, steps, (x,), src_key_padding_mask=pad)
        assert ann(x.sum(0), src_key_padding_mask=pad)[pad].abs().max() == 0  # the fast path's zeros


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("batch_first", [True, False])
def test_decoder_padding_masks_through_fx(batch_first: bool, steps: int) -> None:
    ann = _decoder(batch_first)
    tgt_pad, memory_pad = _padding(L), _float(_padding(S))
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    x, memory = _seq(steps, L, batch_first), _seq(steps, S, batch_first)
    static = ("tgt_mask", "tgt_key_padding_mask", "memory_key_padding_mask", "tgt_is_causal")
    gm = replace_by_td_operators(ann, strict=True, static_inputs=static)
    kwargs = {
        "tgt_mask": mask,
        "tgt_key_padding_mask": tgt_pad,
        "memory_key_padding_mask": memory_pad,
        "tgt_is_causal": True,
    }
    with torch.no_grad():
        out = gm(x, memory, **kwargs)
    _check(out, ann, steps, (x, memory), record=steps == 8, **kwargs)


@pytest.mark.parametrize("steps", [4, 8])
def test_decoder_padding_masks_through_folded(steps: int) -> None:
    ann = _decoder(True)
    tgt_pad, memory_pad = _float(_padding(L)), _padding(S)
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    x, memory = _seq(steps, L), _seq(steps, S)
    folded = TDTimeFolded(ann, time_inputs={0, 1}, strict=True)
    kwargs = {"tgt_mask": mask, "tgt_key_padding_mask": tgt_pad, "memory_key_padding_mask": memory_pad}
    with torch.no_grad():
        out = folded(x, memory, **kwargs)
    assert folded.report.equivalent
    _check(out, ann, steps, (x, memory), record=steps == 8, **kwargs)


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("batch_first", [True, False])
def test_bare_encoder_and_decoder_layers_with_padding(batch_first: bool, steps: int) -> None:
    """The layers alone (torch's eval fast path ``torch._transformer_encoder_layer_fwd`` for the encoder
    layer): both paths (the folded one batch-first only)."""
    torch.manual_seed(2)
    encoder = nn.TransformerEncoderLayer(E, HEADS, FF, batch_first=batch_first).eval()
    decoder = nn.TransformerDecoderLayer(E, HEADS, FF, batch_first=batch_first, norm_first=True).eval()
    pad, memory_pad = _padding(L), _padding(S)
    x, memory = _seq(steps, L, batch_first), _seq(steps, S, batch_first)
    gm = replace_by_td_operators(encoder, strict=True, static_inputs=("src_key_padding_mask",))
    with torch.no_grad():
        _check(gm(x, src_key_padding_mask=pad), encoder, steps, (x,), src_key_padding_mask=pad)
    static = ("tgt_key_padding_mask", "memory_key_padding_mask")
    gm = replace_by_td_operators(decoder, strict=True, static_inputs=static)
    kwargs = {"tgt_key_padding_mask": pad, "memory_key_padding_mask": memory_pad}
    with torch.no_grad():
        _check(gm(x, memory, **kwargs), decoder, steps, (x, memory), **kwargs)
    if batch_first:
        with torch.no_grad():
            folded = TDTimeFolded(encoder, time_inputs={0}, strict=True)
            _check(folded(x, src_key_padding_mask=pad), encoder, steps, (x,), src_key_padding_mask=pad)
            folded = TDTimeFolded(decoder, time_inputs={0, 1}, strict=True)
            _check(folded(x, memory, **kwargs), decoder, steps, (x, memory), **kwargs)

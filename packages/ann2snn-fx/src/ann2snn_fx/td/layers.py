"""torch's own transformer layers, re-expressed for the TD path (both the fx pass and :class:`TDTimeFolded`).

``nn.TransformerEncoder``/``Decoder`` and their layers pick a fused fast path by inspecting their inputs
(mask dtypes, nested tensors, ``self_attn.batch_first``), which torch.fx cannot trace and the time folding
cannot see through. :func:`make_traceable` swaps them, in a model the caller no longer owns (a deep copy),
for modules that share their submodules and compute torch's reference ("slow") path: the same numbers, in
plain calls. Sequence-first layers (``batch_first=False``) transpose around a batch-first view of their
attention (same parameters), which the TD attention needs.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Collection
from typing import Any

import torch
from torch import nn

__all__ = ["make_traceable", "sequence_first_layers", "torch_layer_defaults"]

Tensor = torch.Tensor


def _batch_first_attention(mha: nn.MultiheadAttention) -> nn.MultiheadAttention:
    if mha.batch_first:
        return mha
    view = copy.copy(mha)  # shares the parameters
    view.batch_first = True
    return view


class _Layer(nn.Module):
    """What the encoder and decoder layers share: their submodules, norm placement, activation and layout."""

    # the submodules taken over from torch's layer
    self_attn: nn.Module
    multihead_attn: nn.Module
    linear1: nn.Module
    linear2: nn.Module
    dropout: nn.Module
    dropout1: nn.Module
    dropout2: nn.Module
    dropout3: nn.Module
    norm1: nn.Module
    norm2: nn.Module
    norm3: nn.Module
    activation: Any

    def __init__(self, layer: nn.Module, attentions: tuple[str, ...]) -> None:
        super().__init__()
        for name, child in layer.named_children():
            setattr(self, name, child)
        self.norm_first = bool(layer.norm_first)
        if not isinstance(layer.activation, nn.Module):
            self.activation = layer.activation  # a function, e.g. F.relu
        first: Any = getattr(layer, attentions[0])
        self.seq_first = not first.batch_first
        for name in attentions:
            setattr(self, name, _batch_first_attention(getattr(layer, name)))

    def _attend(
        self, attention: nn.Module, x: Tensor, mem: Tensor, mask: Any, padding: Any, causal: Any
    ) -> Tensor:
        # A given mask is the exact mask; ``is_causal`` is only a hint about it (torch's docs).
        is_causal = False if mask is not None else bool(causal)
        return attention(
            x, mem, mem, attn_mask=mask, key_padding_mask=padding, need_weights=False, is_causal=is_causal
        )[0]

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def _layout(self, x: Tensor) -> Tensor:
        # [S, B, E] <-> [B, S, E]; negative dims, which stay valid past the TD path's leading time axis
        return x.transpose(-3, -2) if self.seq_first else x


class _EncoderLayer(_Layer):
    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__(layer, ("self_attn",))

    def forward(
        self, src: Tensor, src_mask: Any = None, src_key_padding_mask: Any = None, is_causal: Any = False
    ) -> Tensor:
        x = self._layout(src)

        def sa(y: Tensor) -> Tensor:
            return self.dropout1(
                self._attend(self.self_attn, y, y, src_mask, src_key_padding_mask, is_causal)
            )

        if self.norm_first:
            x = x + sa(self.norm1(x))
            x = x + self.dropout2(self._feed_forward(self.norm2(x)))
        else:
            x = self.norm1(x + sa(x))
            x = self.norm2(x + self.dropout2(self._feed_forward(x)))
        return self._layout(x)


class _DecoderLayer(_Layer):
    def __init__(self, layer: nn.TransformerDecoderLayer) -> None:
        super().__init__(layer, ("self_attn", "multihead_attn"))

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Any = None,
        memory_mask: Any = None,
        tgt_key_padding_mask: Any = None,
        memory_key_padding_mask: Any = None,
        tgt_is_causal: Any = False,
        memory_is_causal: Any = False,
    ) -> Tensor:
        x, mem = self._layout(tgt), self._layout(memory)

        def sa(y: Tensor) -> Tensor:
            out = self._attend(self.self_attn, y, y, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            return self.dropout1(out)

        def ca(y: Tensor) -> Tensor:
            out = self._attend(
                self.multihead_attn, y, mem, memory_mask, memory_key_padding_mask, memory_is_causal
            )
            return self.dropout2(out)

        if self.norm_first:
            x = x + sa(self.norm1(x))
            x = x + ca(self.norm2(x))
            x = x + self.dropout3(self._feed_forward(self.norm3(x)))
        else:
            x = self.norm1(x + sa(x))
            x = self.norm2(x + ca(x))
            x = self.norm3(x + self.dropout3(self._feed_forward(x)))
        return self._layout(x)


class _Encoder(nn.Module):
    def __init__(self, encoder: nn.TransformerEncoder) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_EncoderLayer(layer) for layer in encoder.layers)
        self.norm = encoder.norm

    def forward(
        self, src: Tensor, mask: Any = None, src_key_padding_mask: Any = None, is_causal: Any = None
    ) -> Tensor:
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
        return self.norm(x) if self.norm is not None else x


class _Decoder(nn.Module):
    def __init__(self, decoder: nn.TransformerDecoder) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_DecoderLayer(layer) for layer in decoder.layers)
        self.norm = decoder.norm

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Any = None,
        memory_mask: Any = None,
        tgt_key_padding_mask: Any = None,
        memory_key_padding_mask: Any = None,
        tgt_is_causal: Any = None,
        memory_is_causal: Any = False,
    ) -> Tensor:
        x = tgt
        for layer in self.layers:
            x = layer(
                x,
                memory,
                tgt_mask,
                memory_mask,
                tgt_key_padding_mask,
                memory_key_padding_mask,
                tgt_is_causal,
                memory_is_causal,
            )
        return self.norm(x) if self.norm is not None else x


_SWAPS: dict[type[nn.Module], Any] = {
    nn.TransformerEncoder: _Encoder,
    nn.TransformerDecoder: _Decoder,
    nn.TransformerEncoderLayer: _EncoderLayer,
    nn.TransformerDecoderLayer: _DecoderLayer,
}


def make_traceable(model: nn.Module) -> nn.Module:
    """Swap torch's transformer encoder/decoder (layers) in ``model`` (mutated) for plain-path equivalents.

    Returns the model (a new module when ``model`` itself is one of them). Exact types only.

    Examples:
        >>> enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 1, enable_nested_tensor=False)
        >>> x = torch.randn(5, 2, 8)
        >>> plain = make_traceable(copy.deepcopy(enc).eval())
        >>> torch.allclose(plain(x), enc.eval()(x), atol=1e-6)
        True
    """
    swap = _SWAPS.get(type(model))
    if swap is not None:
        new = swap(model)
        new.train(model.training)
        return new
    for name, child in list(model.named_children()):
        new_child = make_traceable(child)
        if new_child is not child:
            setattr(model, name, new_child)
    return model


def sequence_first_layers(model: nn.Module) -> list[str]:
    """Paths of the swapped layers of ``model`` that are sequence-first (``batch_first=False``).

    Examples:
        >>> sequence_first_layers(make_traceable(nn.TransformerEncoderLayer(8, 2, 16)))
        ['']
    """
    return [name for name, m in model.named_modules() if isinstance(m, _Layer) and m.seq_first]


def torch_layer_defaults(model: nn.Module, static_inputs: Collection[str]) -> dict[str, Any] | None:
    """For a root swapped by :func:`make_traceable`: its optional inputs (masks, ``is_causal``) fixed to
    their defaults for tracing, except those named in ``static_inputs`` (then given at run time); for any
    other root its ``bool``-default inputs (flags such as ``is_causal``); None if there is nothing to fix.

    Tracing a ``None`` default as an input would make a mask a time sequence; fx checks at run time that a
    specialised input is still ``None``.

    Examples:
        >>> layer = make_traceable(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
        >>> sorted(torch_layer_defaults(layer, static_inputs=("src_mask",)))
        ['is_causal', 'src_key_padding_mask']
    """
    parameters = list(inspect.signature(model.forward).parameters.values())
    if not isinstance(model, tuple(_SWAPS.values())):
        # any root: literal bool flags (timm's ``is_causal=False``) are constants, not time sequences
        flags = {
            p.name: p.default
            for p in parameters
            if isinstance(p.default, bool) and p.name not in static_inputs
        }
        return flags or None
    return {
        p.name: p.default
        for p in parameters
        if p.default is not inspect.Parameter.empty and p.name not in static_inputs
    }

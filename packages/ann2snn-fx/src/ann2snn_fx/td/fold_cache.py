"""Hugging Face key/value caches in :class:`~ann2snn_fx.td.fold.TDTimeFolded`: which are known, their tensors.

A decoder (Llama, GPT-2, Mistral, Qwen2) with ``use_cache=True`` builds a ``transformers`` ``DynamicCache``
in its forward, appends every layer's keys and values to it and returns it. In the folded path those keys
and values are time-varying ``[T*B, heads, tokens, head_dim]`` tensors in TD form (their running sum over
the steps is the ANN's keys and values on the cumulative input). A cache of the known classes
(``DynamicCache`` whose layers are ``DynamicLayer`` or ``DynamicSlidingWindowLayer``, exact types: their
state is the ``keys``/``values`` tensors and plain numbers) can therefore take part in a fused call: its
tensors summed before the forward, differenced after. Any other cache class stays op by op. Nothing here
imports ``transformers``: an object can only be a cache if the model's code has imported it already.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

Tensor = torch.Tensor


class _NoCache:
    """Stands in for the cache classes where transformers has none of the known names (no object is one)."""


_Known = tuple[type, type, tuple[type, ...]]  # (Cache, DynamicCache, the known layer classes)
_KNOWN: _Known | None = None


def _classes() -> _Known | None:
    """The transformers cache classes, once ``transformers.cache_utils`` is imported (by the model)."""
    global _KNOWN
    if _KNOWN is None:
        utils = sys.modules.get("transformers.cache_utils")
        if utils is None:
            return None
        try:
            _KNOWN = (utils.Cache, utils.DynamicCache, (utils.DynamicLayer, utils.DynamicSlidingWindowLayer))
        except AttributeError:  # another transformers version: no cache is known
            _KNOWN = (_NoCache, _NoCache, ())
    return _KNOWN


def is_cache(value: Any) -> bool:
    """Whether ``value`` is a transformers ``Cache`` (of any class)."""
    known = _classes()
    return known is not None and isinstance(value, known[0])


def cache_layers(value: Any) -> list[Any] | None:
    """The layers of a cache of the known classes (see the module doc), else None."""
    known = _classes()
    if known is None or type(value) is not known[1]:
        return None
    layers = getattr(value, "layers", None)
    if type(layers) is not list or any(type(layer) not in known[2] for layer in layers):
        return None
    if getattr(value, "offloading", False):  # offloaded layers move between devices behind the forward
        return None
    return layers


def layer_tensors(layer: Any) -> tuple[Tensor, Tensor] | None:
    """A cache layer's keys and values, or None while it holds none (not initialised yet)."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if isinstance(keys, Tensor) and isinstance(values, Tensor):
        return keys, values
    return None

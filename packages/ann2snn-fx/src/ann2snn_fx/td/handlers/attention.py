"""Attention: ``F.scaled_dot_product_attention`` calls -> TDScaledDotProductAttention (a whole-graph step)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import fx

from ann2snn_fx.td.build import read_arg
from ann2snn_fx.td.state import Kind, PassState
from ann2snn_ops import TDScaledDotProductAttention

__all__ = ["positional_qkv", "replace_sdpa"]

_QKV = ("query", "key", "value")


def _sdpa_module(node: fx.Node) -> tuple[list[Any], Any, TDScaledDotProductAttention]:
    """q/k/v, the mask and the TD module of one SDPA call, after checking its literal arguments."""
    args, kwargs = node.args, dict(node.kwargs)
    qkv = [read_arg(args, kwargs, i, name, None) for i, name in enumerate(_QKV)]
    if any(v is None for v in qkv):
        raise ValueError("SDPA node must have query, key, and value arguments.")
    dropout_p = read_arg(args, kwargs, 4, "dropout_p", 0.0)
    if not isinstance(dropout_p, (int, float)) or dropout_p != 0.0:
        raise ValueError(f"TD SDPA conversion only supports literal dropout_p=0.0, but got {dropout_p!r}.")
    enable_gqa = read_arg(args, kwargs, 7, "enable_gqa", False)
    if isinstance(enable_gqa, fx.Node) or enable_gqa:
        raise ValueError("TD SDPA conversion does not support enable_gqa=True.")
    is_causal = read_arg(args, kwargs, 5, "is_causal", False)
    if not isinstance(is_causal, bool):
        raise ValueError(f"TD SDPA conversion only supports literal bool is_causal, but got {is_causal!r}.")
    scale = read_arg(args, kwargs, 6, "scale", None)
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(
            f"TD SDPA conversion only supports literal numeric scale or None, but got {scale!r}."
        )
    attn_mask = read_arg(args, kwargs, 3, "attn_mask", None)
    module = TDScaledDotProductAttention(is_causal=is_causal, scale=None if scale is None else float(scale))
    return qkv, attn_mask, module


def replace_sdpa(state: PassState) -> None:
    """Every SDPA call (q/k/v by position or keyword) -> ``td_scaled_dot_product_attention_<i>``."""
    graph = state.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            continue
        qkv, attn_mask, module = _sdpa_module(node)
        name = state.add_root_module("td_scaled_dot_product_attention", module)
        with graph.inserting_after(node):
            new = graph.call_module(name, args=(*qkv, attn_mask))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        state.td_targets[name] = Kind.TIME
        state.converted(new, "call_function F.scaled_dot_product_attention", f"-> {name}")


def positional_qkv(node: fx.Node) -> None:
    """nn.MultiheadAttention names its inputs query/key/value, TDMultiheadAttention query_seq/...: pass them
    by position so keyword calls keep working."""
    kwargs = dict(node.kwargs)
    if not any(name in kwargs for name in _QKV):
        return
    qkv = [read_arg(node.args, kwargs, i, name, None) for i, name in enumerate(_QKV)]
    for name in _QKV:
        kwargs.pop(name, None)
    node.args = (*qkv, *node.args[3:])
    node.kwargs = kwargs

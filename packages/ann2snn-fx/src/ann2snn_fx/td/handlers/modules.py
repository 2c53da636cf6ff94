"""``call_module`` nodes: the seed's module replacement (a whole-graph step) and the check of the rest."""

from __future__ import annotations

import torch.nn as nn
from torch import fx

from ann2snn_fx.td.build import build_td_module, check_mha_call, read_arg
from ann2snn_fx.td.handlers.attention import positional_qkv
from ann2snn_fx.td.impulse import TDImpulse
from ann2snn_fx.td.state import Kind, PassState
from ann2snn_ops import TDModule, TDMultiheadAttention

__all__ = ["check_constant_masks", "replace_modules", "visit_module"]


def replace_modules(state: PassState) -> None:
    """Swap every module with a TD counterpart (``build_td_module``), validating each MHA call site."""
    gm = state.gm
    built: dict[str, nn.Module | None] = {}
    mha_targets: set[str] = set()
    for node in list(state.graph.nodes):
        if node.op != "call_module" or not isinstance(node.target, str):
            continue
        target = node.target
        if target in built:
            # The seed validated only the first call site of a shared attention module.
            if target in mha_targets:
                check_mha_call(node)
                positional_qkv(node)
            continue
        module = gm.get_submodule(target)
        # Building validates the module's configuration (TDMultiheadAttention.from_module, seed order),
        # before the call-site checks, as the seed does.
        replacement = build_td_module(module)
        if type(module) is nn.MultiheadAttention:
            mha_targets.add(target)
            check_mha_call(node)
            positional_qkv(node)
        built[target] = replacement
        if replacement is None:
            continue
        parent_name, _, attr = target.rpartition(".")
        parent = gm.get_submodule(parent_name) if parent_name else gm
        setattr(parent, attr, replacement)
        is_mha = type(module) is nn.MultiheadAttention
        state.td_targets[target] = Kind.TIME_SEQ if is_mha else Kind.TIME
    for node in state.graph.nodes:
        if node.op == "call_module" and node.target in state.td_targets:
            replacement = gm.get_submodule(str(node.target))
            state.converted(node, f"call_module {node.target}", f"-> {type(replacement).__name__}")


def check_constant_masks(state: PassState, node: fx.Node) -> None:
    """The masks of a TD attention call must be constant over time (static inputs, parameters, literals):
    a mask computed from the time-sequence inputs would be computed from each step's increment, not from
    the cumulative input the ANN sees."""
    for index, name in ((3, "key_padding_mask"), (5, "attn_mask")):
        mask = read_arg(node.args, dict(node.kwargs), index, name, None)
        if state.kind(mask) in (Kind.TIME, Kind.TIME_SEQ):
            state.issue(
                node,
                f"{name} is computed from the time-sequence inputs; the TD attention needs a mask that is "
                "constant over time (pass it as an input named in static_inputs)",
            )


def visit_module(state: PassState, node: fx.Node) -> None:
    """Classify a ``call_module`` node; an unconverted module that is not time-transparent is an issue."""
    target = str(node.target)
    if target in state.td_targets:
        state.kinds[node] = state.td_targets[target]
        if isinstance(state.gm.get_submodule(target), TDMultiheadAttention):
            check_constant_masks(state, node)
        return
    if state.kind((node.args, node.kwargs)) is Kind.CONST:
        state.kinds[node] = Kind.CONST
        return
    state.kinds[node] = Kind.TIME
    module = state.gm.get_submodule(target)
    if isinstance(module, nn.Identity | TDModule | TDImpulse):  # already converted (converting twice)
        if isinstance(module, TDMultiheadAttention):
            state.kinds[node] = Kind.TIME_SEQ
        return
    if isinstance(module, nn.modules.dropout._DropoutNd):
        if module.training and module.p > 0:
            state.issue(node, "dropout in training mode draws a different mask at every time step")
        return
    if isinstance(module, nn.Flatten):
        state.check_dims(node, [module.start_dim, module.end_dim])
        return
    if isinstance(module, nn.Unflatten):
        state.check_dims(node, [module.dim])
        return
    if isinstance(module, nn.MultiheadAttention | nn.Softmax):
        state.kinds[node] = Kind.TIME_SEQ if isinstance(module, nn.MultiheadAttention) else Kind.TIME
    state.issue(node, f"unconverted module {type(module).__name__} is not known to be time-transparent")

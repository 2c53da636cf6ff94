""":func:`~ann2snn_fx.analysis.diagnose_td` on time-folded models (``TDTimeFolded``, ``SpikeZIPSNN``).

Every module path present in the reference (the ANN, or the QANN of a ``SpikeZIPSNN``) and in the folded copy
is hooked in both. A ``TDTimeFolded`` is compared at every step: its module outputs, ``[T*B, ...]``, summed
over time against the ANN's on the cumulative inputs (the time axis folded into the batch the same way). A
``SpikeZIPSNN`` only equals its QANN once settled, so it is compared at the last step: the summed output
against the QANN's on the summed input.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ann2snn_fx.analysis.doctor import TDNodeDeviation
from ann2snn_fx.spikezip import QANN, SpikeZIPSNN
from ann2snn_fx.td import TDTimeFolded

__all__: list[str] = []


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def folded_deviations(ann: nn.Module, td_model: TDTimeFolded, inputs: torch.Tensor) -> list[TDNodeDeviation]:
    """Per module, in the order the folded model called them: the relative deviation from the reference."""
    spiking = isinstance(td_model, SpikeZIPSNN)
    if spiking and not isinstance(ann, QANN):
        raise TypeError(
            f"diagnose_td compares a SpikeZIPSNN with its QANN (settled outputs), but got {type(ann).__name__}."
        )
    wrapped: Any = td_model.model
    td_root: nn.Module = wrapped.qann.model if spiking else wrapped
    ann_root: nn.Module = ann.model if spiking else ann  # type: ignore[assignment]
    ann_modules = dict(ann_root.named_modules())
    td_modules = {name: m for name, m in td_root.named_modules() if name and name in ann_modules}
    outputs: dict[tuple[str, str], torch.Tensor] = {}
    order: list[str] = []

    def keep(side: str, name: str) -> Any:
        def hook(_m: nn.Module, _a: Any, out: Any) -> None:
            tensor = _first_tensor(out)
            if tensor is not None and (side, name) not in outputs:
                outputs[(side, name)] = tensor.detach().clone()
                if side == "td":
                    order.append(name)

        return hook

    handles = []
    steps = inputs.shape[0]
    try:
        for name, module in td_modules.items():
            handles.append(module.register_forward_hook(keep("td", name)))
            handles.append(ann_modules[name].register_forward_hook(keep("ann", name)))
        whole = td_model.whole_batch() if isinstance(td_model, SpikeZIPSNN) else contextlib.nullcontext()
        with torch.no_grad(), whole:  # the hooks keep each module's first call: the whole batch at once
            td_model(inputs)
            ann(inputs.sum(0)) if spiking else ann(inputs.cumsum(0).flatten(0, 1))
    finally:
        for handle in handles:
            handle.remove()
    nodes = []
    for name in order:
        td_out, ann_out = outputs[("td", name)], outputs.get(("ann", name))
        if ann_out is None or td_out.dim() == 0 or td_out.shape[0] % steps:
            continue
        cumulative = td_out.unflatten(0, (steps, -1))
        got = cumulative.sum(0) if spiking else cumulative.cumsum(0)
        want = (
            ann_out
            if spiking
            else ann_out.unflatten(0, (steps, -1))
            if ann_out.shape[0] % steps == 0
            else None
        )
        if want is None or got.shape != want.shape:
            continue
        diff = (got - want).double()
        norm = float(torch.linalg.vector_norm(want.double()))
        nodes.append(
            TDNodeDeviation(
                name, type(td_modules[name]).__name__, float(torch.linalg.vector_norm(diff)) / max(norm, 1e-12),
                float(diff.abs().max()) if diff.numel() else 0.0,
            )
        )  # fmt: skip
    return nodes

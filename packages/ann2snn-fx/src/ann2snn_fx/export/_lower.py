"""Lowering a converted SNN (fx graph) to a NIR-shaped graph of plain arrays, with the scalers folded away.

Every value is carried as ``scale * (sum of its sources)``: a ``VoltageScaler`` only multiplies the pending
scale, and the scale is folded where the arithmetic allows it: into the input side of the next
``Affine``/``Conv`` (an exact product of a spike 0/1 with a weight), into the output side of the producing
``Affine``/``Conv`` when nothing else reads it, or into the threshold of the neuron it feeds. A pending scale
that none of these can absorb becomes an explicit diagonal ``Affine`` / depthwise 1x1 ``Conv``.
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ann2snn_calib import VoltageScaler
from ann2snn_fx.export._params import (
    ExportError,
    Op,
    affine_op,
    channel_scale,
    is_one,
    neuron_params,
    per_sample,
    pool_window,
)
from ann2snn_fx.snn.neurons import IFNode

__all__ = ["ExportError", "LoweredGraph", "Op", "lower"]

_ADDS = {operator.add, operator.iadd, torch.add}
_FLATTENS = {torch.flatten}


@dataclass
class _Val:
    sources: list[str]
    scale: torch.Tensor  # float64, broadcastable to ``shape``
    shape: tuple[int, ...]
    exclusive: bool  # every source is an affine/conv op read only through this value


@dataclass
class LoweredGraph:
    ops: dict[str, Op]
    warnings: list[str]


class _Values:
    """The lowering's state: ops so far, and the value (sources, pending scale) of each fx node."""

    def __init__(self, gm: fx.GraphModule, shapes: dict[str, tuple[int, ...]], strict: bool) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.shapes = shapes
        self.strict = strict
        self.ops: dict[str, Op] = {}
        self.vals: dict[str, _Val] = {}
        self.warnings: list[str] = []

    # ------------------------------------------------------------------ helpers
    def refuse(self, node: fx.Node, why: str, way_out: str) -> None:
        message = f"node {node.name!r} ({self._describe(node)}): {why}; {way_out}"
        if self.strict:
            raise ExportError(message + " (strict=False exports it anyway, with a warning).")
        self.warnings.append(message)
        warnings.warn("to_nir: " + message, UserWarning, stacklevel=4)

    def _describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{type(self.modules[str(node.target)]).__name__} {node.target!r}"
        return f"{node.op} {getattr(node.target, '__name__', node.target)}"

    def add_op(self, op: Op) -> Op:
        self.ops[op.name] = op
        return op

    def fold_output_side(self, val: _Val, factor: torch.Tensor) -> None:
        """Multiply the outputs of the (exclusive affine/conv) sources of ``val`` by ``factor``."""
        for name in val.sources:
            op = self.ops[name]
            f = factor if op.kind == "affine" else channel_scale(factor, op.shape, name)
            f = torch.broadcast_to(f, (op.shape[0],)) if op.kind == "affine" else f
            view = (-1,) + (1,) * (op.params["weight"].dim() - 1)
            op.params["weight"] = op.params["weight"] * f.reshape(view)
            op.params["bias"] = op.params["bias"] * f
        val.scale = val.scale / factor

    def materialize(self, val: _Val, base: str) -> _Val:
        """An explicit scaling op (diagonal Affine / depthwise 1x1 conv) applying ``val.scale``."""
        shape = val.shape
        name = f"{base}_scale"
        if len(shape) == 1:
            diag = torch.broadcast_to(val.scale, shape)
            op = Op(name, "affine", shape, shape, {"weight": torch.diag(diag), "bias": torch.zeros(shape[0])})
        else:
            per_channel = channel_scale(val.scale, shape, name)
            conv = {
                "weight": per_channel.reshape(-1, 1, *([1] * (len(shape) - 1))),
                "bias": torch.zeros(shape[0]),
                "stride": (1,) * (len(shape) - 1),
                "padding": (0,) * (len(shape) - 1),
                "dilation": (1,) * (len(shape) - 1),
                "groups": shape[0],
            }
            op = Op(name, "conv", shape, shape, conv)
        op.inputs = list(val.sources)
        self.add_op(op)
        return _Val([name], torch.tensor(1.0, dtype=torch.float64), shape, True)

    def value(self, arg: Any, node: fx.Node) -> _Val:
        if not isinstance(arg, fx.Node) or arg.name not in self.vals:
            raise ExportError(
                f"node {node.name!r} ({self._describe(node)}) reads {arg!r}, which is not a tensor of the "
                "graph; NIR graphs connect nodes only (no constants or attributes)."
            )
        return self.vals[arg.name]

    # ------------------------------------------------------------------ nodes


class _Lowering(_Values):
    """One handler per fx node kind, in graph order."""

    def run(self) -> LoweredGraph:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ExportError(
                f"to_nir exports SNNs with one input tensor, but the graph has {len(placeholders)} inputs."
            )
        for node in self.gm.graph.nodes:
            handler = getattr(self, f"_{node.op}")
            handler(node)
        return LoweredGraph(self.ops, self.warnings)

    def _placeholder(self, node: fx.Node) -> None:
        shape = self.shapes[node.name]
        self.add_op(Op("input", "input", shape))
        self.vals[node.name] = _Val(["input"], torch.tensor(1.0, dtype=torch.float64), shape, False)

    def _get_attr(self, node: fx.Node) -> None:
        raise ExportError(
            f"node {node.name!r} reads the attribute {node.target!r}: NIR graphs have no constants; "
            "keep parameters inside nn.Linear / nn.Conv modules."
        )

    def _output(self, node: fx.Node) -> None:
        val = self.value(node.args[0], node)
        if not is_one(val.scale):
            if val.exclusive:
                self.fold_output_side(val, val.scale)
            else:
                val = self.materialize(val, "output")
        self.add_op(Op("output", "output", val.shape, val.shape, inputs=list(val.sources)))

    def _call_module(self, node: fx.Node) -> None:
        module = self.modules[str(node.target)]
        shape = self.shapes[node.name]
        if isinstance(module, (nn.Identity, nn.Dropout)):
            self.vals[node.name] = self.value(node.args[0], node)
            return
        val = self.value(node.args[0], node)
        if isinstance(module, VoltageScaler):
            ndim = len(val.shape) + 1
            scale = per_sample(module.scale, ndim, module.channel_dim)
            exclusive = val.exclusive and len(node.users) == 1
            self.vals[node.name] = _Val(val.sources, val.scale * scale, shape, exclusive)
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            self._affine(node, module, val, shape)
        elif isinstance(module, IFNode):
            self._neuron(node, module, val, shape)
        elif isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            self._pool(node, module, val, shape)
        elif isinstance(module, nn.Flatten):
            self._flatten(node, val, shape, module.start_dim, module.end_dim)
        elif isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
            raise ExportError(
                f"node {node.name!r} ({self._describe(node)}): a max-pool on spike trains is not the max of "
                "their rates and NIR has no max-pool; use nn.AvgPool2d in the ANN before converting."
            )
        else:
            td = type(module).__name__.startswith("TD") or ".td" in type(module).__module__
            extra = (
                "temporal-difference operators (the TD path) run on value differences, not on spikes, and "
                "have no NIR primitive; export only ReLU -> IF conversions"
                if td
                else "supported: Linear, Conv1d, Conv2d, IFNode, VoltageScaler, AvgPool2d, "
                "AdaptiveAvgPool2d (even windows), Flatten, Identity, Dropout, additions"
            )
            raise ExportError(f"node {node.name!r} ({self._describe(node)}) has no NIR form; {extra}.")

    def _affine(self, node: fx.Node, module: nn.Module, val: _Val, shape: tuple[int, ...]) -> None:
        op = affine_op(node.name, module, val.scale, val.shape, shape)
        op.inputs = list(val.sources)
        self.add_op(op)
        one = torch.tensor(1.0, dtype=torch.float64)
        self.vals[node.name] = _Val([node.name], one, shape, len(node.users) == 1)

    def _neuron(self, node: fx.Node, module: IFNode, val: _Val, shape: tuple[int, ...]) -> None:
        burst = getattr(module, "burst", 1)
        if int(burst) > 1:
            self.refuse(node, f"burst={burst} emits several spikes per step", "NIR IF emits one; use burst=1")
        if bool(getattr(module, "signed", False)):
            self.refuse(
                node, "signed=True emits negative spikes", "NIR IF has no negative spikes; use signed=False"
            )
        foldable = all(self.ops[s].kind in ("affine", "conv") for s in val.sources)
        if not is_one(val.scale) and val.exclusive and foldable:
            with contextlib.suppress(ExportError):
                self.fold_output_side(val, val.scale.clone())
        if bool((val.scale <= 0).any()):
            raise ExportError(
                f"node {node.name!r} ({self._describe(node)}): its input is scaled by a non-positive factor, "
                "which cannot be folded into a threshold."
            )
        params, v_init = neuron_params(module, val.scale, shape)
        if bool((params["v_init"] != 0).any()):
            self.refuse(
                node,
                f"the membrane starts at v_init={v_init} (NIR has no initial potential, every consumer starts at 0)",
                "convert with v_init=None (NeuronFactory default)",
            )
        params["source"] = str(node.target)
        self.add_op(Op(node.name, "if", shape, val.shape, params, list(val.sources)))
        self.vals[node.name] = _Val([node.name], torch.tensor(1.0, dtype=torch.float64), shape, False)

    def _pool(self, node: fx.Node, module: nn.Module, val: _Val, shape: tuple[int, ...]) -> None:
        kernel, stride, area = pool_window(node.name, module, val.shape[1:], shape[1:])
        per_channel = channel_scale(val.scale, val.shape, node.name).reshape(-1, 1, 1)
        params = {"kernel_size": kernel, "stride": stride}
        self.add_op(Op(node.name, "sumpool", shape, val.shape, params, list(val.sources)))
        self.vals[node.name] = _Val([node.name], per_channel / area, shape, False)

    def _flatten(self, node: fx.Node, val: _Val, shape: tuple[int, ...], start: int, end: int) -> None:
        ndim = len(val.shape) + 1
        if start % ndim != 1 or end % ndim != ndim - 1:
            raise ExportError(
                f"node {node.name!r} ({self._describe(node)}): flatten({start}, {end}) touches the batch or "
                "keeps dimensions; NIR Flatten is exported for flatten(1, -1) only."
            )
        scale = torch.broadcast_to(val.scale, val.shape).reshape(-1) if val.scale.dim() else val.scale
        self.add_op(Op(node.name, "flatten", shape, val.shape, {}, list(val.sources)))
        self.vals[node.name] = _Val([node.name], scale, shape, False)

    def _call_function(self, node: fx.Node) -> None:
        target = node.target
        if target in _ADDS and len(node.args) == 2 and not node.kwargs:
            self._add(node)
        elif target in _FLATTENS:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            self._flatten(node, self.value(node.args[0], node), self.shapes[node.name], int(start), int(end))  # type: ignore[arg-type]
        else:
            raise ExportError(
                f"node {node.name!r} ({self._describe(node)}) has no NIR form; the graph may use additions "
                "of two tensors and flatten(x, 1) besides modules."
            )

    def _call_method(self, node: fx.Node) -> None:
        if node.target == "add" and len(node.args) == 2 and not node.kwargs:
            self._add(node)
        elif node.target == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            self._flatten(node, self.value(node.args[0], node), self.shapes[node.name], int(start), -1)  # type: ignore[arg-type]
        else:
            self._call_function(node)

    def _add(self, node: fx.Node) -> None:
        a, b = (self.value(arg, node) for arg in node.args)
        if not torch.equal(torch.broadcast_to(a.scale, a.shape), torch.broadcast_to(b.scale, b.shape)):
            # Bring the foldable operand to the other's scale; otherwise scale one operand explicitly.
            if b.exclusive:
                a, b = b, a
            if a.exclusive:
                self.fold_output_side(a, a.scale / b.scale)
                a.scale = b.scale
            else:
                a.scale = a.scale / b.scale
                a = self.materialize(a, node.name + "_lhs")
                a.scale = b.scale
        exclusive = a.exclusive and b.exclusive and len(node.users) == 1
        self.vals[node.name] = _Val(a.sources + b.sources, b.scale, self.shapes[node.name], exclusive)


def lower(gm: fx.GraphModule, shapes: dict[str, tuple[int, ...]], strict: bool) -> LoweredGraph:
    """Lower ``gm`` (per-sample output shape of each node in ``shapes``) to :class:`Op` s."""
    return _Lowering(gm, shapes, strict).run()

"""Lowering a converted SNN (fx graph) to a NIR-shaped graph of plain arrays, with the scalers folded away.

Every value is carried as ``scale * (sum of its sources)``: a ``VoltageScaler`` only multiplies the pending
scale, and the scale is folded where the arithmetic allows it: into the input side of the next
``Affine``/``Conv`` (an exact product of a spike 0/1 with a weight), into the output side of the producing
``Affine``/``Conv`` when nothing else reads it, or into the threshold of the neuron it feeds. A pending scale
that none of these can absorb becomes an explicit diagonal ``Affine`` / depthwise 1x1 ``Conv``.
"""

from __future__ import annotations

import contextlib
import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ann2snn_calib import VoltageScaler
from ann2snn_fx.neuron import IFNode

__all__ = ["ExportError", "LoweredGraph", "Op", "lower"]

_ADDS = {operator.add, operator.iadd, torch.add}
_FLATTENS = {torch.flatten}


class ExportError(ValueError):
    """A node of the SNN that NIR cannot express (the message names the node and the way out)."""


@dataclass
class Op:
    """One NIR-to-be node: ``kind`` in input/affine/conv/if/sumpool/flatten/output, float64 parameters."""

    name: str
    kind: str
    shape: tuple[int, ...]  # output shape, per sample
    in_shape: tuple[int, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)


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


def _per_sample(scale: torch.Tensor, ndim: int, channel_dim: int | None) -> torch.Tensor:
    """A VoltageScaler's scale as a float64 tensor broadcastable to one sample of ``ndim - 1`` dims."""
    s = scale.detach().to(torch.float64).cpu()
    if s.numel() == 1:
        return s.reshape(())
    if channel_dim is not None and s.dim() == 1:
        cd = channel_dim % ndim
        shape = [1] * (ndim - 1)
        shape[cd - 1] = s.shape[0]
        return s.reshape(shape)
    while s.dim() >= ndim:
        s = s.squeeze(0)
    return s


def _is_one(scale: torch.Tensor) -> bool:
    return bool((scale == 1.0).all())


def _channel_scale(scale: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """The scale as one value per channel (dim 0 of the sample), or an ExportError if it varies spatially."""
    full = torch.broadcast_to(scale, shape).reshape(shape[0], -1)
    if not bool((full == full[:, :1]).all()):
        raise ExportError(f"{what}: the scale varies inside a channel, which a convolution cannot absorb.")
    return full[:, 0].clone()


class _Lowering:
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
            f = factor if op.kind == "affine" else _channel_scale(factor, op.shape, name)
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
            per_channel = _channel_scale(val.scale, shape, name)
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
        if not _is_one(val.scale):
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
            scale = _per_sample(module.scale, ndim, module.channel_dim)
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
        weight = torch.as_tensor(module.weight).detach().to(torch.float64).cpu().clone()
        bias_param = getattr(module, "bias", None)
        bias = (
            torch.zeros(weight.shape[0], dtype=torch.float64)
            if bias_param is None
            else bias_param.detach().to(torch.float64).cpu().clone()
        )
        if isinstance(module, nn.Linear):
            if not _is_one(val.scale):
                weight = weight * torch.broadcast_to(val.scale, val.shape).reshape(1, -1)
            op = Op(node.name, "affine", shape, val.shape, {"weight": weight, "bias": bias})
        else:
            assert isinstance(module, (nn.Conv1d, nn.Conv2d))
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise ExportError(
                    f"node {node.name!r} ({self._describe(node)}): padding {module.padding!r} with mode "
                    f"{module.padding_mode!r}; NIR consumers read integer zero padding only."
                )
            if not _is_one(val.scale):
                per_in = _channel_scale(val.scale, val.shape, node.name)
                groups = module.groups
                cout, cin_g = weight.shape[0], weight.shape[1]
                per_w = per_in.reshape(groups, cin_g).repeat_interleave(cout // groups, dim=0)
                weight = weight * per_w.reshape(cout, cin_g, *([1] * (weight.dim() - 2)))
            params = {
                "weight": weight,
                "bias": bias,
                "stride": tuple(module.stride),
                "padding": tuple(module.padding),  # type: ignore[arg-type]
                "dilation": tuple(module.dilation),
                "groups": module.groups,
            }
            op = Op(node.name, "conv", shape, val.shape, params)
        op.inputs = list(val.sources)
        self.add_op(op)
        self.vals[node.name] = _Val(
            [node.name], torch.tensor(1.0, dtype=torch.float64), shape, len(node.users) == 1
        )

    def _neuron(self, node: fx.Node, module: IFNode, val: _Val, shape: tuple[int, ...]) -> None:
        if int(getattr(module, "burst", 1)) > 1:
            self.refuse(
                node, f"burst={module.burst} emits several spikes per step", "NIR IF emits one; use burst=1"
            )  # type: ignore[attr-defined]
        if bool(getattr(module, "signed", False)):
            self.refuse(
                node, "signed=True emits negative spikes", "NIR IF has no negative spikes; use signed=False"
            )
        scale = val.scale
        if (
            not _is_one(scale)
            and val.exclusive
            and all(self.ops[s].kind in ("affine", "conv") for s in val.sources)
        ):
            with contextlib.suppress(ExportError):
                self.fold_output_side(val, scale.clone())
            scale = val.scale
        if bool((scale <= 0).any()):
            raise ExportError(
                f"node {node.name!r} ({self._describe(node)}): its input is scaled by a non-positive factor, "
                "which cannot be folded into a threshold."
            )
        theta = torch.as_tensor(module.v_threshold, dtype=torch.float64)
        while theta.dim() > len(shape):
            theta = theta.squeeze(0)
        threshold = torch.broadcast_to(theta / scale, shape).clone()
        v_init = (
            module.v_init
            if module.v_init is not None
            else (0.0 if module.v_reset is None else float(module.v_reset))
        )
        init = torch.broadcast_to(torch.as_tensor(v_init, dtype=torch.float64) / scale, shape).clone()
        if module.v_reset is None:
            reset = "subtract"
            v_reset = torch.zeros(shape, dtype=torch.float64)
        else:
            reset = "value"
            v_reset = torch.broadcast_to(
                torch.as_tensor(float(module.v_reset), dtype=torch.float64) / scale, shape
            ).clone()
        if bool((init != 0).any()):
            self.refuse(
                node,
                f"the membrane starts at v_init={v_init} (NIR has no initial potential, every consumer starts at 0)",
                "convert with v_init=None (NeuronFactory default)",
            )
        params = {
            "v_threshold": threshold,
            "v_reset": v_reset,
            "v_init": init,
            "reset": reset,
            "source": str(node.target),
        }
        self.add_op(Op(node.name, "if", shape, val.shape, params, list(val.sources)))
        self.vals[node.name] = _Val([node.name], torch.tensor(1.0, dtype=torch.float64), shape, False)

    def _pool(self, node: fx.Node, module: nn.Module, val: _Val, shape: tuple[int, ...]) -> None:
        in_hw = val.shape[1:]
        if isinstance(module, nn.AdaptiveAvgPool2d):
            out_hw = shape[1:]
            if any(i % o for i, o in zip(in_hw, out_hw, strict=True)):
                raise ExportError(
                    f"node {node.name!r} ({self._describe(node)}): windows of {in_hw} -> {out_hw} are uneven; "
                    "NIR pools have one kernel. Use an input size divisible by the output size."
                )
            kernel = tuple(i // o for i, o in zip(in_hw, out_hw, strict=True))
            stride = kernel
        else:
            assert isinstance(module, nn.AvgPool2d)
            pair = nn.modules.utils._pair
            kernel, stride, padding = (
                pair(module.kernel_size),
                pair(module.stride or module.kernel_size),
                pair(module.padding),
            )
            if any(padding) or module.ceil_mode or module.divisor_override is not None:
                raise ExportError(
                    f"node {node.name!r} ({self._describe(node)}): padding, ceil_mode or divisor_override "
                    "(the consumers' sum pools take no padding); use AvgPool2d(k, stride) without them."
                )
        per_channel = _channel_scale(val.scale, val.shape, node.name).reshape(-1, 1, 1)
        params = {"kernel_size": kernel, "stride": stride}
        self.add_op(Op(node.name, "sumpool", shape, val.shape, params, list(val.sources)))
        area = math.prod(kernel)
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

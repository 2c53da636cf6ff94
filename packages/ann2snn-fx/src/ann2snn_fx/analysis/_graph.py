"""What the accounting reads from the SNN's graph: neurons, counted layers, the path from a neuron's events to
the weight layer they feed, and the exact fan-out of every event (a structural transposed pass of ones).

Modules are recognised by duck typing, so nothing here imports a neuron class: a module with a non-None
``spike_unit`` is a neuron (CONTRACTS item 1); a module with ``in_features``/``out_features`` is linear-like
(``nn.Linear``, ``TDLinear``); one with ``in_channels``/``kernel_size``/``groups`` is conv-like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__: list[str] = []

_SHAPE_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
}
_SHAPE_METHODS = {"flatten", "reshape", "view", "permute", "transpose", "contiguous", "squeeze", "unsqueeze"}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class Opaque(Exception):
    """A node the structural pass cannot follow (the layer then counts MACs, with this reason)."""


def is_neuron(module: object) -> bool:
    """A spiking neuron: any module exposing a non-None ``spike_unit``."""
    return isinstance(module, nn.Module) and getattr(module, "spike_unit", None) is not None


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv"``, ``"matmul"``, ``"attention"``, ``"mha"``, ``"norm"``, ``"affine"`` or None."""
    name = type(module).__name__
    if is_neuron(module):
        return None
    if hasattr(module, "in_features") and hasattr(module, "out_features") and hasattr(module, "weight"):
        return "linear"
    if all(hasattr(module, a) for a in ("in_channels", "out_channels", "kernel_size", "groups", "weight")):
        return "conv"
    if "MultiheadAttention" in name:
        return "mha"
    if "ScaledDotProductAttention" in name:
        return "attention"
    if "MatMul" in name:
        return "matmul"
    if any(n in name for n in ("LayerNorm", "RMSNorm", "GroupNorm")):
        return "norm"
    if "BatchNorm" in name:
        return "affine"
    return None


def call_macs(kind: str, module: Any, args: tuple[Any, ...], out: Any) -> float:
    """Multiply-accumulates of one call, counted as the ANN op would (see the accounting guide)."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor):
        return 0.0
    y = out[0] if isinstance(out, tuple) else out
    if kind == "linear":
        return float(x.numel() * int(module.out_features))
    if kind == "conv" and isinstance(y, torch.Tensor):
        kernel = math.prod(tuple(module.kernel_size))
        return float(y.numel() * (int(module.in_channels) // int(module.groups)) * kernel)
    if kind == "matmul" and isinstance(y, torch.Tensor):
        return float(y.numel() * x.shape[-1])
    if kind == "attention" and len(args) >= 3 and all(isinstance(a, torch.Tensor) for a in args[:3]):
        q, k, v = args[:3]
        return float(q.numel() // q.shape[-1] * k.shape[-2] * (q.shape[-1] + v.shape[-1]))
    if kind == "mha" and len(args) >= 2 and isinstance(args[1], torch.Tensor):
        e = int(getattr(module, "embed_dim", x.shape[-1]))
        key = args[1]
        seq = key.shape[-2] if getattr(module, "batch_first", False) else key.shape[0]
        return float(2 * x.numel() * e + 2 * key.numel() * e + 2 * x.numel() * seq)
    if kind == "norm":
        return 4.0 * x.numel()
    if kind == "affine":
        return float(x.numel())
    return 0.0


@dataclass
class GraphInfo:
    """Neuron nodes, counted layer nodes, and which layers see only time-invariant values."""

    neurons: list[fx.Node]
    layers: list[tuple[fx.Node, str]]
    static: set[fx.Node]
    modules: dict[str, nn.Module]
    order: dict[fx.Node, int]


def analyse(gm: fx.GraphModule) -> GraphInfo:
    modules = dict(gm.named_modules())
    neurons, layers, static = [], [], set()
    dynamic: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        dynamic[node] = any(dynamic[a] or _is_neuron_node(a, modules) for a in node.all_input_nodes)
        if module is None:
            continue
        if is_neuron(module):
            neurons.append(node)
            continue
        kind = layer_kind(module)
        if kind is not None:
            layers.append((node, kind))
            if not dynamic[node]:
                static.add(node)
    return GraphInfo(neurons, layers, static, modules, {n: i for i, n in enumerate(gm.graph.nodes)})


def _is_neuron_node(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and is_neuron(modules.get(str(node.target)))


def _transparent_module(module: nn.Module) -> bool:
    name = type(module).__name__
    return name == "VoltageScaler" or isinstance(
        module,
        (nn.Flatten, nn.Unflatten, nn.Dropout, nn.Identity, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
         nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
    )  # fmt: skip


def _shape_node(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _SHAPE_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target in _SHAPE_METHODS


def spike_source(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node | None, list[fx.Node], str]:
    """Walk back from a layer's input through scalers, reshapes and pooling to the neuron that feeds it.

    Returns ``(neuron node, chain from the neuron to the layer, "")`` or ``(None, [], why it is analog)``.
    """
    chain: list[fx.Node] = []
    current = node.args[0] if node.args else None
    while isinstance(current, fx.Node):
        extra_nodes = [
            a for a in current.all_input_nodes if a is not (current.args[0] if current.args else None)
        ]
        if current.op == "call_module":
            module = modules.get(str(current.target))
            if is_neuron(module):
                return current, chain[::-1], ""
            if module is None or not _transparent_module(module) or extra_nodes:
                return None, [], f"fed by {type(module).__name__} {current.target!r} (not spike events)"
        elif not _shape_node(current) or extra_nodes:
            what = "the input" if current.op == "placeholder" else f"{current.op} {current.name!r}"
            return None, [], f"fed by {what} (not spike events)"
        chain.append(current)
        current = current.args[0] if current.args else None
    return None, [], "fed by a constant"


def _sum_pool(y: torch.Tensor, nd: int, kernel: Any, stride: Any, padding: Any) -> torch.Tensor:
    """The pooling's structure: every input adds into every window that contains it (a conv with ones)."""
    lead, tail = y.shape[: -(nd + 1)], y.shape[-(nd + 1) :]
    channels = tail[0]
    k = tuple(kernel) if isinstance(kernel, (tuple, list)) else (kernel,) * nd
    ones = torch.ones((channels, 1, *k), dtype=y.dtype)
    s = stride if stride is not None else k
    out = _CONV[nd](y.reshape(-1, *tail), ones, stride=s, padding=padding, groups=channels)
    return out.reshape(*lead, *out.shape[1:])


def _structural(node: fx.Node, y: torch.Tensor, modules: dict[str, nn.Module]) -> torch.Tensor:
    if node.op != "call_module":
        rest = node.args[1:]
        if node.op == "call_method":
            return getattr(y, str(node.target))(*rest, **node.kwargs)
        return node.target(y, *rest, **node.kwargs)  # type: ignore[operator]
    module = modules[str(node.target)]
    if isinstance(module, (nn.Flatten, nn.Unflatten)):
        return module(y)
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        if module.ceil_mode:
            raise Opaque(f"{node.target!r} uses ceil_mode=True")
        nd = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(module)]
        return _sum_pool(y, nd, module.kernel_size, module.stride, module.padding)
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        nd = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}[type(module)]
        size = module.output_size if isinstance(module.output_size, tuple) else (module.output_size,) * nd
        spatial = y.shape[-nd:]
        target = [s if o is None else o for s, o in zip(spatial, size, strict=True)]
        if any(s % o for s, o in zip(spatial, target, strict=True)):
            raise Opaque(f"{node.target!r} has uneven adaptive windows")
        k = tuple(s // o for s, o in zip(spatial, target, strict=True))
        return _sum_pool(y, nd, k, k, 0)
    return y  # scalers, dropout (eval), identity: no structure


def _structural_layer(module: Any, kind: str, y: torch.Tensor) -> torch.Tensor:
    if kind == "linear":
        return y * float(module.out_features)
    nd = len(module.kernel_size)
    lead, tail = y.shape[: -(nd + 1)], y.shape[-(nd + 1) :]
    groups = int(module.groups)
    weight = torch.ones((int(module.out_channels), tail[0] // groups, *module.kernel_size), dtype=y.dtype)
    x = y.reshape(-1, *tail)
    padding: Any = module.padding
    if getattr(module, "padding_mode", "zeros") != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    out = _CONV[nd](x, weight, None, module.stride, padding, module.dilation, groups)
    return out.reshape(*lead, *out.shape[1:])


def fanout_map(
    neuron_shape: tuple[int, ...],
    leading: int,
    chain: list[fx.Node],
    layer: fx.Node,
    kind: str,
    modules: dict[str, nn.Module],
) -> torch.Tensor:
    """Fan-out of every neuron output (per sample) into ``layer``: the transposed structural pass of ones,
    i.e. ``d/dx sum(layer_ones(chain_ones(x)))``; exact at borders, with stride, padding, dilation, groups."""
    x = torch.zeros((1,) * leading + tuple(neuron_shape), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        y: torch.Tensor = x
        try:
            for node in chain:
                y = _structural(node, y, modules)
            z = _structural_layer(modules[str(layer.target)], kind, y)
        except (RuntimeError, TypeError, ValueError) as error:
            raise Opaque(f"structural pass failed ({error})") from error
        (grad,) = torch.autograd.grad(z.sum(), x)
    return grad.reshape(neuron_shape).float()

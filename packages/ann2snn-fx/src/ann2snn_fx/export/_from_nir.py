"""``from_nir``: a NIR graph (ours or another tool's) as an fx SNN that runs with :func:`ann2snn_fx.run_snn`."""

from __future__ import annotations

import keyword
import operator
import os
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ann2snn_calib import VoltageScaler
from ann2snn_fx.export._nir import import_nir
from ann2snn_fx.snn.neurons import IFNode

__all__ = ["NIRIFNode", "SumPool2d", "from_nir"]

_RESETS = ("subtract", "value")
_CONDITIONS = (">=", ">")


class SumPool2d(nn.Module):
    """NIR ``SumPool2d``: the sum over each window (an exact sum, not an average times the area).

    Examples:
        >>> SumPool2d(2, 2)(torch.ones(1, 1, 2, 2)).item()
        4.0
    """

    def __init__(self, kernel_size: Any, stride: Any, padding: Any = 0) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, divisor_override=1)


class NIRIFNode(IFNode):
    """An :class:`~ann2snn_fx.IFNode` with per-neuron threshold, reset value and initial potential, and a
    choice of spike condition (``">="``, this project's, or ``">"``, NIR's and snnTorch's).

    Args:
        v_threshold: Threshold tensor, shaped like one sample of the neuron tensor (or broadcastable).
        v_reset: Reset value tensor, or ``None`` for the subtractive reset.
        v_init: Initial potential tensor (zeros in NIR semantics).
        spike_condition: ``">="`` or ``">"``.

    Examples:
        >>> node = NIRIFNode(torch.tensor([1.0, 1.0]), None, torch.zeros(2), ">")
        >>> [node(torch.tensor([[0.5, 0.6]])).tolist() for _ in range(2)]
        [[[0.0, 0.0]], [[0.0, 1.0]]]
    """

    v_reset_value: torch.Tensor | None

    def __init__(
        self,
        v_threshold: torch.Tensor,
        v_reset: torch.Tensor | None,
        v_init: torch.Tensor,
        spike_condition: str = ">=",
    ) -> None:
        super().__init__(v_threshold=1.0, v_reset=None if v_reset is None else 0.0)
        if spike_condition not in _CONDITIONS:
            raise ValueError(f"spike_condition must be '>=' or '>', but got {spike_condition!r}.")
        del self.v_threshold
        self.register_buffer("v_threshold", torch.as_tensor(v_threshold, dtype=torch.float32))
        self.register_buffer("v_start", torch.as_tensor(v_init, dtype=torch.float32))
        reset_value = None if v_reset is None else torch.as_tensor(v_reset, dtype=torch.float32)
        self.register_buffer("v_reset_value", reset_value)
        self.spike_condition = spike_condition

    def _prepare_v(self, x: torch.Tensor) -> torch.Tensor:
        v = self.v
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            start: torch.Tensor = self.v_start  # type: ignore[assignment]
            return torch.broadcast_to(start.to(dtype=x.dtype, device=x.device), x.shape).clone()
        return v

    def _sequence_fast_path_ok(self, x_seq: torch.Tensor) -> bool:
        return False

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self._prepare_v(x) + x
        threshold = self.v_threshold.to(x.dtype)  # type: ignore[union-attr]
        fired = v > threshold if self.spike_condition == ">" else v >= threshold
        spike = fired.to(x.dtype)
        if self.v_reset_value is None:
            v = v - spike * threshold
        else:
            v = torch.where(fired, self.v_reset_value.to(x.dtype), v)
        self.v = v
        return spike

    def extra_repr(self) -> str:
        reset = "subtract" if self.v_reset_value is None else "to v_reset"
        return (
            f"shape={tuple(self.v_threshold.shape)}, reset={reset}, spike_condition='{self.spike_condition}'"  # type: ignore[union-attr]
        )


def _arr(x: Any) -> np.ndarray:
    return np.asarray(x)


def _ints(x: Any) -> Any:
    if isinstance(x, str):
        return x
    a = np.asarray(x).astype(int).reshape(-1)
    return int(a[0]) if a.size == 1 else tuple(int(v) for v in a)


def _meta(node: Any, graph: Any, key: str) -> Any:
    for source in (getattr(node, "metadata", None) or {}, getattr(graph, "metadata", None) or {}):
        if key in source:
            value = source[key]
            return value.decode() if isinstance(value, bytes) else value
    return None


def _neuron(name: str, node: Any, graph: Any, reset: str | None, spike_condition: str | None) -> nn.Module:
    theta = torch.as_tensor(_arr(node.v_threshold), dtype=torch.float32)
    r = _arr(node.r)
    if not np.all(r == 1):
        raise NotImplementedError(
            f"IF node {name!r} has r != 1; from_nir reads IF with r = 1 (one step per dt) only."
        )
    mode = reset or _meta(node, graph, "reset") or "value"
    mode = "value" if mode in ("zero", "to_value") else mode
    if mode not in _RESETS:
        raise ValueError(f"IF node {name!r}: unknown reset {mode!r}; accepted: {_RESETS}.")
    condition = spike_condition or _meta(node, graph, "spike_condition") or ">"
    v_init = _meta(node, graph, "v_init") if reset is None and spike_condition is None else None
    init = torch.zeros_like(theta)
    if v_init is not None and not isinstance(v_init, str):
        init = torch.as_tensor(np.broadcast_to(_arr(v_init), theta.shape).copy(), dtype=torch.float32)
    v_reset = getattr(node, "v_reset", None)
    value = (
        torch.zeros_like(theta) if v_reset is None else torch.as_tensor(_arr(v_reset), dtype=torch.float32)
    )
    return NIRIFNode(theta, None if mode == "subtract" else value, init, condition)


def _module(
    name: str, node: Any, graph: Any, nir: Any, reset: str | None, condition: str | None
) -> nn.Module:
    if isinstance(node, (nir.Affine, nir.Linear)):
        weight = torch.as_tensor(_arr(node.weight), dtype=torch.float32)
        bias = getattr(node, "bias", None)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        linear.weight.data = weight.clone()
        if bias is not None:
            linear.bias.data = torch.as_tensor(_arr(bias), dtype=torch.float32).clone()
        return linear
    if isinstance(node, (nir.Conv1d, nir.Conv2d)):
        weight = torch.as_tensor(_arr(node.weight), dtype=torch.float32)
        cls = nn.Conv1d if isinstance(node, nir.Conv1d) else nn.Conv2d
        groups = int(_arr(node.groups))
        conv = cls(
            weight.shape[1] * groups,
            weight.shape[0],
            tuple(weight.shape[2:]),  # type: ignore[arg-type]
            stride=_ints(node.stride),
            padding=_ints(node.padding),
            dilation=_ints(node.dilation),
            groups=groups,
        )
        conv.weight.data = weight.clone()
        conv.bias.data = torch.as_tensor(_arr(node.bias), dtype=torch.float32).reshape(-1).clone()  # type: ignore[union-attr]
        return conv
    if isinstance(node, nir.SumPool2d):
        return SumPool2d(_ints(node.kernel_size), _ints(node.stride), _ints(node.padding))
    if isinstance(node, nir.AvgPool2d):
        return nn.AvgPool2d(_ints(node.kernel_size), _ints(node.stride), _ints(node.padding))
    if isinstance(node, nir.Flatten):
        start, end = int(node.start_dim), int(node.end_dim)
        return nn.Flatten(start + 1 if start >= 0 else start, end + 1 if end >= 0 else end)
    if isinstance(node, nir.Scale):
        return VoltageScaler(torch.as_tensor(_arr(node.scale), dtype=torch.float32))
    if isinstance(node, nir.IF):
        return _neuron(name, node, graph, reset, condition)
    raise NotImplementedError(
        f"NIR node {name!r} of type {type(node).__name__} has no counterpart in ann2snn-fx; from_nir reads "
        "Input, Output, Affine, Linear, Conv1d, Conv2d, SumPool2d, AvgPool2d, Flatten, Scale and IF."
    )


def _order(graph: Any) -> list[str]:
    pending = {name: [s for s, d in graph.edges if d == name] for name in graph.nodes}
    order: list[str] = []
    done: set[str] = set()
    while pending:
        ready = [n for n, srcs in pending.items() if all(s in done for s in srcs)]
        if not ready:
            raise NotImplementedError(
                f"the NIR graph has a cycle through {sorted(pending)}; from_nir reads feed-forward graphs."
            )
        for name in ready:
            order.append(name)
            done.add(name)
            del pending[name]
    return order


def from_nir(graph: Any, *, reset: str | None = None, spike_condition: str | None = None) -> fx.GraphModule:
    """Build an SNN of this project's modules from a NIR graph (or a path to a ``.nir`` file).

    ``Affine`` / ``Linear`` become ``nn.Linear``, ``Conv1d`` / ``Conv2d`` the torch convolutions,
    ``SumPool2d`` :class:`SumPool2d`, ``Flatten`` ``nn.Flatten`` (its ``start_dim`` counted without the batch
    dimension, as NIR defines it), ``Scale`` a ``VoltageScaler``, ``IF`` (``r = 1``) a :class:`NIRIFNode`;
    several edges into one node are summed. Neuron semantics come from, in order: the ``reset`` /
    ``spike_condition`` arguments, the node's then the graph's metadata (as :func:`to_nir` writes it:
    subtractive reset, ``>=``, ``v_init``), and otherwise NIR's own: reset to ``v_reset``, fire on ``v > θ``,
    start at 0. The result takes one input step ``[B, *]`` per call, like a converted SNN.

    Args:
        graph: A ``nir.NIRGraph`` or a path to a file written by ``nir.write``.
        reset: ``"subtract"`` or ``"value"`` (reset to ``v_reset``) for every IF node, ignoring metadata.
        spike_condition: ``">="`` or ``">"`` for every IF node, ignoring metadata.
            Giving either override also ignores a ``v_init`` in the metadata (NIR starts at 0).

    Returns:
        An ``fx.GraphModule`` in eval mode; its ``nir_names`` attribute maps module names to NIR node names.

    Raises:
        ImportError: when ``nir`` is not installed.
        NotImplementedError: for NIR nodes with no counterpart here (LIF, CubaLIF, Delay, nested graphs, cycles).

    Examples:
        >>> import nir, numpy as np
        >>> g = nir.NIRGraph.from_list(nir.Affine(np.eye(2, dtype=np.float32), np.zeros(2, dtype=np.float32)),
        ...                           nir.IF(r=np.ones(2), v_threshold=np.ones(2)))
        >>> from ann2snn_fx import run_snn
        >>> run_snn(from_nir(g), torch.tensor([[0.5, 1.0]]), 2, running_mean=False).squeeze(1).tolist()
        [[0.0, 0.0], [0.0, 1.0]]
    """
    nir = import_nir()
    if isinstance(graph, (str, os.PathLike)):
        graph = nir.read(graph)
    if not isinstance(graph, nir.NIRGraph):
        raise TypeError(f"graph must be a nir.NIRGraph or a path, but got {type(graph).__name__}.")
    if reset is not None and reset not in _RESETS:
        raise ValueError(f"reset must be 'subtract', 'value' or None, but got {reset!r}.")
    if spike_condition is not None and spike_condition not in _CONDITIONS:
        raise ValueError(f"spike_condition must be '>=', '>' or None, but got {spike_condition!r}.")
    root = nn.Module()
    fx_graph = fx.Graph()
    values: dict[str, fx.Node] = {}
    names: dict[str, str] = {}
    placeholder = None
    result = None
    for name in _order(graph):
        node = graph.nodes[name]
        sources = [values[s] for s, d in graph.edges if d == name]
        if isinstance(node, nir.Input):
            if placeholder is not None:
                raise NotImplementedError("from_nir reads graphs with one Input node.")
            placeholder = values[name] = fx_graph.placeholder("x")
            continue
        if not sources:
            raise ValueError(f"NIR node {name!r} has no input edge.")
        value = sources[0]
        for other in sources[1:]:
            value = fx_graph.call_function(operator.add, (value, other))
        if isinstance(node, nir.Output):
            result = value
            continue
        if isinstance(node, nir.NIRGraph):
            raise NotImplementedError(f"NIR node {name!r} is a nested graph; flatten it before from_nir.")
        target = re.sub(r"\W", "_", name)
        while target in names or not target.isidentifier() or keyword.iskeyword(target):
            target = "n_" + target
        names[target] = name
        root.add_module(target, _module(name, node, graph, nir, reset, spike_condition))
        values[name] = fx_graph.call_module(target, (value,))
    if placeholder is None or result is None:
        raise ValueError("the NIR graph needs one Input and one Output node.")
    fx_graph.output(result)
    gm = fx.GraphModule(root, fx_graph, class_name="NIRSNN")
    gm.__dict__["nir_names"] = names
    return gm.eval()

"""The multi-step execution behind :class:`~ann2snn_fx.snn.runner.MultiStepSNN`: graph rewrite and interpreter.

The SNN graph is rewritten so that stateless layers see ``[t*B, ...]`` batches and neurons loop over
time (fused ``VoltageScaler -> IFNode -> VoltageScaler`` blocks); the compiled graph is cached per SNN.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_arg

from ann2snn_calib import VoltageScaler
from ann2snn_fx.snn.neurons import IFNode

__all__: list[str] = []


def _is_stateful(module: nn.Module) -> bool:
    return callable(getattr(module, "multi_step_forward", None))


def _scalar_scaler(module: Any) -> float | None:
    if isinstance(module, VoltageScaler) and module.scale.numel() == 1 and module.scale.is_floating_point():
        return float(module.scale)
    return None


def _fusable_blocks(gm: fx.GraphModule) -> dict[fx.Node, tuple[fx.Node, fx.Node]]:
    """``neuron node -> (scaler0 node, scaler1 node)`` for chains ``VoltageScaler -> IFNode -> VoltageScaler``
    with scalar scales and single users, which the multi-step execution runs as one fused loop."""
    modules = dict(gm.named_modules())
    blocks = {}
    for node in gm.graph.nodes:
        if (
            node.op != "call_module"
            or not isinstance(modules.get(node.target), IFNode)
            or len(node.args) != 1
        ):
            continue
        first = node.args[0]
        users = list(node.users)
        if (
            not isinstance(first, fx.Node)
            or first.op != "call_module"
            or len(first.users) != 1
            or len(users) != 1
        ):
            continue
        last = users[0]
        if (
            last.op != "call_module"
            or not isinstance(first.args[0] if first.args else None, fx.Node)
            or len(last.args) != 1
            or last.kwargs
            or first.kwargs
            or len(first.args) != 1
        ):
            continue
        if (
            _scalar_scaler(modules.get(first.target)) is None
            or _scalar_scaler(modules.get(last.target)) is None
        ):
            continue
        blocks[node] = (first, last)
    return blocks


class _TimeContext:
    """The number of steps of the chunk being run, shared by the modules of a compiled multi-step graph."""

    steps = 1


class _ExpandTime(nn.Module):
    """``[B, *] -> [t*B, *]``: a time-invariant value entering the time-dependent part of the graph."""

    def __init__(self, ctx: _TimeContext) -> None:
        super().__init__()
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.ctx.steps
        return x.unsqueeze(0).expand(t, *x.shape).reshape(t * x.shape[0], *x.shape[1:])


class _NeuronOverTime(nn.Module):
    """Runs a neuron (optionally between its two scalers, fused) over ``[t, B, *]`` inside a ``[t*B, *]`` graph."""

    def __init__(
        self,
        neuron: nn.Module,
        ctx: _TimeContext,
        temporal_input: bool,
        scaler_in: nn.Module | None = None,
        scaler_out: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.neuron = neuron
        self.scaler_in = scaler_in
        self.scaler_out = scaler_out
        self.ctx = ctx
        self.temporal_input = temporal_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.ctx.steps
        x_seq = (
            x.reshape(t, x.shape[0] // t, *x.shape[1:])
            if self.temporal_input
            else x.unsqueeze(0).expand(t, *x.shape)
        )
        neuron = self.neuron
        fused = self.scaler_in is not None and self.scaler_out is not None
        if fused and isinstance(neuron, IFNode) and neuron._sequence_fast_path_ok(x_seq):
            scale_in = _scalar_scaler(self.scaler_in)
            out = neuron._inference_sequence(x_seq, input_scale=scale_in).flatten(0, 1)
            scale_out = _scalar_scaler(self.scaler_out)
            assert scale_out is not None
            return out.mul_(scale_out)
        if self.scaler_in is not None:
            x_seq = self.scaler_in(x_seq)
        out = neuron.multi_step_forward(x_seq).flatten(0, 1)  # type: ignore[operator]
        return self.scaler_out(out) if self.scaler_out is not None else out


def _build_multi_step_graph(snn: fx.GraphModule) -> tuple[fx.GraphModule, _TimeContext, bool]:
    """Rewrite the SNN graph (sharing its modules) to run ``t`` steps on ``[t*B, *]`` per call."""
    ctx = _TimeContext()
    modules = dict(snn.named_modules())
    blocks = _fusable_blocks(snn)
    folded_in = {first: neuron for neuron, (first, _) in blocks.items()}
    folded_out = {last: neuron for neuron, (_, last) in blocks.items()}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    temporal: dict[fx.Node, bool] = {}
    batch: dict[fx.Node, bool] = {}
    expanded: dict[fx.Node, fx.Node] = {}
    root: dict[str, Any] = {"_ms_expand": _ExpandTime(ctx)}
    count = 0
    output_temporal = False
    for node in snn.graph.nodes:
        inputs = node.all_input_nodes
        temporal_in = any(temporal[a] for a in inputs)
        batch[node] = node.op == "placeholder" or any(batch[a] for a in inputs)
        if node in folded_in:
            env[node] = env[node.args[0]]
            temporal[node] = temporal[node.args[0]]
            continue
        if node in folded_out:
            env[node] = env[folded_out[node]]
            temporal[node] = True
            continue
        if node.op == "call_module" and _is_stateful(modules[node.target]):
            if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
                raise TypeError(f"neuron {node.target!r} must be called with one tensor node.")
            block = blocks.get(node)
            source = block[0].args[0] if block is not None else node.args[0]
            if not isinstance(source, fx.Node):
                raise TypeError(f"neuron {node.target!r} must be fed by a tensor node.")
            name = f"_ms_neuron_{count}"
            count += 1
            root[name] = _NeuronOverTime(
                modules[node.target],
                ctx,
                temporal_input=temporal[source],
                scaler_in=modules[block[0].target] if block is not None else None,
                scaler_out=modules[block[1].target] if block is not None else None,
            )
            env[node] = graph.call_module(name, (env[source],))
            temporal[node] = True
            continue

        def lookup(a: fx.Node, expand: bool = temporal_in) -> fx.Node:
            if expand and not temporal[a] and batch[a] and a.op != "get_attr":
                if a not in expanded:
                    expanded[a] = graph.call_module("_ms_expand", (env[a],))
                return expanded[a]
            return env[a]

        env[node] = graph.node_copy(node, lookup)
        temporal[node] = temporal_in
        if node.op == "output":
            output_temporal = temporal_in
        if node.op in ("call_module", "get_attr"):
            root[node.target] = (
                snn.get_submodule(node.target) if node.op == "call_module" else _get_path(snn, node.target)
            )
    return fx.GraphModule(root, graph), ctx, output_temporal


def _get_path(module: nn.Module, path: str) -> Any:
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class _MultiStepInterpreter(fx.Interpreter):
    """Runs stateless nodes once on ``[T*B, ...]`` (or once on ``[B, ...]`` while nothing upstream depends on
    time) and neurons over ``[T, B, ...]`` with their ``multi_step_forward``."""

    def __init__(self, gm: fx.GraphModule, time_steps: int, static_cache: dict[fx.Node, Any]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.time_steps = time_steps
        self.static_cache = static_cache
        self.peak_per_step = 0
        blocks = _fusable_blocks(gm) if not torch.is_grad_enabled() else {}
        self.fused_in = {first: neuron for neuron, (first, _) in blocks.items()}
        self.fused_neurons = {neuron: first for neuron, (first, _) in blocks.items()}
        self.fused_out = {last: neuron for neuron, (_, last) in blocks.items()}
        self.temporal: dict[fx.Node, bool] = {}
        self.batch: dict[fx.Node, bool] = {}
        self.expanded: dict[fx.Node, Any] = {}
        #: Accumulators ``[*]`` for the next run of fused neuron nodes: such a run keeps no output (its
        #: value is ``None``) but sums it over time and batch into the tensor, taken out of this dict.
        self.totals: dict[fx.Node, torch.Tensor] = {}
        #: Per fused neuron node, the ``[N, *]`` step buffer of its last such run: the next one reuses it.
        self.scratch: dict[fx.Node, torch.Tensor] = {}

    def _expand(self, value: torch.Tensor) -> torch.Tensor:
        t = self.time_steps
        return value.unsqueeze(0).expand(t, *value.shape).reshape(t * value.shape[0], *value.shape[1:])

    def _fetch(self, node: fx.Node, expand: bool) -> Any:
        value = self.env[node]
        if (
            expand
            and not self.temporal.get(node, False)
            and self.batch.get(node, False)
            and isinstance(value, torch.Tensor)
            and value.dim() > 0
        ):
            if node not in self.expanded:
                self.expanded[node] = self._expand(value)
            return self.expanded[node]
        return value

    def run_node(self, n: fx.Node) -> Any:
        inputs = n.all_input_nodes
        temporal_in = any(self.temporal.get(a, False) for a in inputs)
        self.batch[n] = n.op == "placeholder" or any(self.batch.get(a, False) for a in inputs)
        if n.op in ("placeholder", "get_attr", "output"):
            self.temporal[n] = temporal_in
            return super().run_node(n)
        if not temporal_in and n in self.static_cache:
            # Time-invariant values (the layers before the first neuron) are computed once per input.
            self.temporal[n] = False
            return self.static_cache[n]
        result = self._run_node(n, temporal_in)
        if self.temporal[n]:
            if isinstance(result, torch.Tensor):
                self.peak_per_step = max(self.peak_per_step, result.numel() // self.time_steps)
        elif not (n.op == "call_module" and _is_stateful(self.fetch_attr(str(n.target)))):
            self.static_cache[n] = result
        return result

    def _run_node(self, n: fx.Node, temporal_in: bool) -> Any:
        args = map_arg(n.args, lambda a: self._fetch(a, temporal_in))
        kwargs = map_arg(n.kwargs, lambda a: self._fetch(a, temporal_in))
        assert isinstance(args, tuple)
        assert isinstance(kwargs, dict)
        if n in self.fused_in:
            # Fused input scaler: its scale is applied inside the neuron's loop.
            self.temporal[n] = temporal_in
            return args[0]
        if n in self.fused_out and isinstance(args[0], torch.Tensor):
            self.temporal[n] = temporal_in
            scale = _scalar_scaler(self.fetch_attr(str(n.target)))
            assert scale is not None
            return args[0].mul_(scale)  # the neuron's spike buffer has no other reader
        if n.op == "call_module":
            module = self.fetch_attr(str(n.target))
            if _is_stateful(module):
                if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
                    raise TypeError(
                        f"neuron {n.target!r} must be called with one tensor, got {args!r}, {kwargs!r}."
                    )
                x = args[0]
                t = self.time_steps
                if temporal_in:
                    x_seq = x.reshape(t, x.shape[0] // t, *x.shape[1:])
                else:
                    x_seq = x.unsqueeze(0).expand(t, *x.shape)
                self.temporal[n] = True
                first = self.fused_neurons.get(n)
                if first is not None and isinstance(module, IFNode) and module._sequence_fast_path_ok(x_seq):
                    scale = _scalar_scaler(self.fetch_attr(str(first.target)))
                    totals = self.totals.pop(n, None)
                    if totals is None:
                        return module._inference_sequence(x_seq, input_scale=scale).flatten(0, 1)
                    self.scratch[n] = module._inference_sequence(
                        x_seq, input_scale=scale, totals=totals, scratch=self.scratch.get(n)
                    )
                    return None
                if first is not None:
                    x_seq = x_seq * _scalar_scaler(self.fetch_attr(str(first.target)))  # type: ignore[operator]
                return module.multi_step_forward(x_seq).flatten(0, 1)
        self.temporal[n] = temporal_in
        return getattr(self, n.op)(n.target, args, kwargs)


class _CompiledState:
    """Per-SNN cache: the compiled multi-step graph and the measured activation size per input shape.

    It holds no strong reference to the SNN (the compiled graph shares only its leaf modules), so the
    weak-keyed cache entry goes away with the SNN.
    """

    def __init__(self, snn: fx.GraphModule) -> None:
        self.snn_ref = weakref.ref(snn)
        self.code = snn.code
        self.peaks: dict[Any, int] = {}
        self._compiled: tuple[fx.GraphModule, _TimeContext, bool] | None = None

    def compiled(self) -> tuple[fx.GraphModule, _TimeContext, bool]:
        if self._compiled is None:
            snn = self.snn_ref()
            assert snn is not None
            self._compiled = _build_multi_step_graph(snn)
        return self._compiled


_STATES: weakref.WeakKeyDictionary[fx.GraphModule, _CompiledState] = weakref.WeakKeyDictionary()


def _compiled_state(snn: fx.GraphModule) -> _CompiledState:
    state = _STATES.get(snn)
    if state is None or state.code != snn.code:
        state = _CompiledState(snn)
        _STATES[snn] = state
    return state

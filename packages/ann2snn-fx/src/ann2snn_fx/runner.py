"""Running a converted SNN for T steps: the step loop, and a multi-step execution of the same graph."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_arg

from ann2snn_calib import VoltageScaler
from ann2snn_fx.neuron import IFNode, reset_net

__all__ = ["MultiStepSNN", "run_snn"]


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
                    return module._inference_sequence(x_seq, input_scale=scale).flatten(0, 1)
                if first is not None:
                    x_seq = x_seq * _scalar_scaler(self.fetch_attr(str(first.target)))  # type: ignore[operator]
                return module.multi_step_forward(x_seq).flatten(0, 1)
        self.temporal[n] = temporal_in
        return getattr(self, n.op)(n.target, args, kwargs)


class MultiStepSNN(nn.Module):
    """Multi-step execution of a converted SNN: one call runs all ``T`` steps.

    Stateless layers see one ``[t*B, ...]`` batch per chunk of ``t`` steps (layers before the first neuron,
    which see the same input at every step, run once per chunk on ``[B, ...]``), and only the neurons (modules with a ``multi_step_forward``,
    such as :class:`~ann2snn_fx.IFNode`) loop over time; each ``VoltageScaler -> IFNode -> VoltageScaler``
    block runs as one fused in-place loop. To stay cache-friendly on CPUs the steps are processed in chunks
    of ``t`` steps whose largest activation ``[t*B, ...]`` holds about ``chunk_elements`` elements (measured
    on a first, interpreted one-step chunk, then remembered per input shape together with the compiled
    multi-step graph); ``chunk_elements=None`` runs all ``T`` steps as one batch (best on GPUs). The outputs equal those of calling the SNN once per
    step, up to floating-point reassociation in the batched layers. The wrapped SNN's modules are shared,
    not copied. Layers must treat samples independently (no batch statistics, no hard-coded batch size).

    Args:
        snn: A converted SNN (``fx.GraphModule``) taking one input tensor and returning one tensor.
        chunk_elements: Target size of the largest activation of a chunk, or ``None`` for one chunk.

    Shape:
        - Input: ``[B, *]`` (the same input is fed at every step).
        - Output: ``[T, B, *]``, the output of every step.

    Examples:
        >>> from ann2snn_fx import IFNode, trace_model
        >>> snn = trace_model(nn.Sequential(nn.Linear(2, 2), IFNode(v_reset=None)))
        >>> MultiStepSNN(snn)(torch.ones(1, 2), time_steps=3).shape
        torch.Size([3, 1, 2])
    """

    def __init__(self, snn: fx.GraphModule, *, chunk_elements: int | None = 2**18) -> None:
        super().__init__()
        if not isinstance(snn, fx.GraphModule):
            raise TypeError(
                f"MultiStepSNN needs an fx.GraphModule (a converted SNN), but got {type(snn).__name__}."
            )
        if chunk_elements is not None and (
            isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1
        ):
            raise ValueError(f"chunk_elements must be a positive int or None, but got {chunk_elements!r}.")
        self.snn = snn
        self.chunk_elements = chunk_elements

    def forward(self, x: torch.Tensor, time_steps: int) -> torch.Tensor:
        _check_steps(time_steps)
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise TypeError(f"MultiStepSNN expects a batched input tensor [B, *], but got {_shape(x)}.")
        state = _compiled_state(self.snn)
        key = (tuple(x.shape[1:]), x.dtype, x.device, x.shape[0])
        known_peak = state.peaks.get(key)
        outputs = []
        done = 0
        if self.chunk_elements is None:
            chunk = time_steps
        elif known_peak is not None:
            chunk = max(1, self.chunk_elements // max(known_peak, 1))
        else:
            chunk = 1
        while done < time_steps:
            steps = min(chunk, time_steps - done)
            if done == 0 and (known_peak is None or self.chunk_elements is None):
                # An interpreted first chunk measures the activation sizes that set the chunk length (once per
                # input shape; remembered with the compiled graph).
                interpreter = _MultiStepInterpreter(self.snn, steps, {})
                out = interpreter.run(x)
                output_node = next(n for n in reversed(self.snn.graph.nodes) if n.op == "output")
                output_temporal = interpreter.temporal.get(output_node, False)
                state.peaks[key] = interpreter.peak_per_step
                if self.chunk_elements is not None:
                    chunk = max(1, self.chunk_elements // max(interpreter.peak_per_step, 1))
            else:
                compiled, ctx, output_temporal = state.compiled()
                ctx.steps = steps
                out = compiled(x)
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"MultiStepSNN supports models returning one tensor, but got {type(out).__name__}."
                )
            if output_temporal:
                outputs.append(out.reshape(steps, out.shape[0] // steps, *out.shape[1:]))
            else:
                outputs.append(out.unsqueeze(0).expand(steps, *out.shape))
            done += steps
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0].clone()


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


def _check_steps(time_steps: Any) -> None:
    if isinstance(time_steps, bool) or not isinstance(time_steps, int) or time_steps < 1:
        raise ValueError(f"time_steps must be a positive int, but got {time_steps!r}.")


def _shape(x: Any) -> str:
    return f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def run_snn(
    snn: nn.Module,
    x: torch.Tensor,
    time_steps: int,
    *,
    multi_step: bool = False,
    reset: bool = True,
    running_mean: bool = True,
    chunk_elements: int | None = 2**18,
    skip_steps: int = 0,
) -> torch.Tensor:
    """Run ``snn`` for ``time_steps`` steps on the constant input ``x``, under ``torch.no_grad()``.

    Resets the network first (``reset_net``), feeds ``x`` at every step, and returns the output of every
    step, by default as the running mean ``out[t] = mean(y_0 .. y_t)``, which approximates the ANN's output
    and is what accuracy-against-T curves are computed from (``out[t].argmax(-1)`` is the prediction after
    ``t + 1`` steps).

    Args:
        snn: The converted SNN (one step per call).
        x: The input batch ``[B, *]``.
        time_steps: Number of steps ``T``.
        multi_step: Use :class:`MultiStepSNN` (batched layers, neurons loop over time) instead of calling
            ``snn`` once per step; same outputs. Needs an ``fx.GraphModule``.
        reset: Reset the neurons before running.
        running_mean: Return running means (default) instead of the raw per-step outputs.
        chunk_elements: Chunking of the multi-step execution (see :class:`MultiStepSNN`); ``None`` runs all
            steps as one ``[T*B, ...]`` batch (GPUs).
        skip_steps: Delayed readout ``D`` (``0 <= D < time_steps``, see
            :func:`ann2snn_fx.estimate_readout_delay`): the running mean leaves out the first ``D`` steps,
            ``out[t] = mean(y_D .. y_t)`` for ``t >= D`` (earlier entries are the plain running mean). Only
            with ``running_mean=True``.

    Returns:
        Tensor ``[T, B, *]``.

    Examples:
        >>> from ann2snn_fx import IFNode, trace_model
        >>> snn = trace_model(nn.Sequential(IFNode(v_reset=None)))
        >>> run_snn(snn, torch.tensor([[0.5]]), 4).flatten().tolist()
        [0.0, 0.5, 0.3333333432674408, 0.5]
    """
    if not isinstance(snn, nn.Module):
        raise TypeError(f"snn must be an nn.Module, but got {type(snn).__name__}.")
    _check_steps(time_steps)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, but got {type(x).__name__}.")
    if isinstance(skip_steps, bool) or not isinstance(skip_steps, int) or not 0 <= skip_steps < time_steps:
        raise ValueError(
            f"skip_steps must be an int in [0, time_steps={time_steps}), but got {skip_steps!r}."
        )
    with torch.no_grad():
        if reset:
            reset_net(snn)
        if multi_step:
            if not isinstance(snn, fx.GraphModule):
                raise TypeError(f"multi_step=True needs an fx.GraphModule, but got {type(snn).__name__}.")
            outputs = MultiStepSNN(snn, chunk_elements=chunk_elements)(x, time_steps)
        else:
            steps = []
            for _ in range(time_steps):
                y = snn(x)
                if not isinstance(y, torch.Tensor):
                    raise TypeError(
                        f"run_snn supports models returning one tensor, but got {type(y).__name__}."
                    )
                steps.append(y)
            outputs = torch.stack(steps)
        if not running_mean:
            return outputs
        counts = torch.arange(1, time_steps + 1, device=outputs.device, dtype=outputs.dtype)
        shape = (-1, *([1] * (outputs.dim() - 1)))
        means = outputs.cumsum(0) / counts.view(shape)
        if skip_steps:
            late = outputs[skip_steps:].cumsum(0) / counts[: time_steps - skip_steps].view(shape)
            means = torch.cat([means[:skip_steps], late])
        return means

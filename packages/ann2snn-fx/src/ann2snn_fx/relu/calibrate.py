"""Training-free calibration of a converted SNN against its ANN (Li et al., ICML 2021; SPEC 14.2).

Layer by layer in topological order, each spiking block's mean output over ``time_steps`` is compared with
the ANN's activation on calibration data, and the mean error is corrected by the bias feeding the block
("bias") and/or the neurons' initial potential ("potential"); later layers see the corrected earlier ones.
All calibration batches advance through the graph together (one multi-step SNN pass, plus re-running the few
nodes of each corrected block), so the cost is about one ANN pass plus one ``time_steps``-step SNN pass.
"""

from __future__ import annotations

import copy
import itertools
import numbers
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn
from tqdm.auto import tqdm

from ann2snn_calib import VoltageScaler
from ann2snn_fx.relu import stages
from ann2snn_fx.snn.dynamics import sum_first_dim
from ann2snn_fx.snn.multistep import _MultiStepInterpreter
from ann2snn_fx.snn.neurons import IFNode, reset_net
from ann2snn_fx.tracing import trace_model

__all__ = ["CalibratedLayer", "calibrate_snn"]

_METHODS = ("bias", "potential", "both")
# Modules and functions that shift every channel by a bias added before them (so a bias upstream corrects).
_SHIFT_MODULES = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Identity,
    nn.Dropout,
)
_BIAS_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Consecutive calibration batches are concatenated up to this many elements (see _merged).
_MERGE_ELEMENTS = 2**22


@dataclass(frozen=True)
class CalibratedLayer:
    """What :func:`calibrate_snn` did to one spiking block.

    Attributes:
        block: Module path of the block.
        activation: The ANN activation node it reproduces.
        bias_of: Module whose bias was corrected (``None``: no bias correction for this block).
        error_before: Mean absolute per-element error of the block's rate before its correction.
        error_after: The same after it.
    """

    block: str
    activation: str
    bias_of: str | None
    error_before: float
    error_after: float


@dataclass
class _Block:
    prefix: str
    scaler0: fx.Node
    neuron: fx.Node
    scaler1: fx.Node
    activation: str
    bias_node: fx.Node | None = None


def _find_blocks(gm: fx.GraphModule) -> list[_Block]:
    modules = dict(gm.named_modules())
    blocks = []
    for node in gm.graph.nodes:
        if (
            node.op != "call_module"
            or not isinstance(modules.get(node.target), IFNode)
            or len(node.args) != 1
        ):
            continue
        first, users = node.args[0], list(node.users)
        if not (isinstance(first, fx.Node) and first.op == "call_module" and len(users) == 1):
            continue
        last = users[0]
        if isinstance(modules.get(first.target), VoltageScaler) and isinstance(
            modules.get(last.target),
            VoltageScaler,  # type: ignore[arg-type]
        ):
            blocks.append(_Block(str(node.target).rpartition(".")[0], first, node, last, ""))
    return blocks


def _bias_source(gm: fx.GraphModule, node: Any) -> fx.Node | None:
    """The Conv/Linear node whose bias shifts ``node`` channel-wise, walking back through pools and adds."""
    modules = dict(gm.named_modules())
    while isinstance(node, fx.Node):
        module = modules.get(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]
        if isinstance(module, _BIAS_MODULES):
            return node
        if isinstance(module, _SHIFT_MODULES) or (
            node.op == "call_function" and getattr(node.target, "__name__", "") in ("add", "iadd")
        ):
            node = node.args[0]
            continue
        return None
    return None


def _match_activations(snn: fx.GraphModule, blocks: list[_Block], ann_gm: fx.GraphModule) -> None:
    report = getattr(snn, "conversion_report", None)
    names = {n.name for n in ann_gm.graph.nodes}
    by_block = {c.block: c.node for c in getattr(report, "converted", ())}
    if blocks and all(by_block.get(b.prefix) in names for b in blocks):
        for b in blocks:
            b.activation = by_block[b.prefix]
        return
    from ann2snn_fx.relu.qcfs import QCFSRule
    from ann2snn_fx.relu.rules import all_rules

    modules = dict(ann_gm.named_modules())
    rules = [*all_rules(), QCFSRule()]
    found = [
        n.name
        for n in ann_gm.graph.nodes
        if n.op != "placeholder" and any(r.match(n, modules) for r in rules)
    ]
    if len(found) != len(blocks):
        raise ValueError(
            f"calibrate_snn cannot pair the SNN's {len(blocks)} spiking block(s) with the ANN's {len(found)} "
            "activation(s): pass the ANN the SNN was converted from (its conversion_report names the activations)."
        )
    for b, name in zip(blocks, found):
        b.activation = name


def _ann_graph(ann: nn.Module) -> fx.GraphModule:
    """``ann`` traced, in eval mode, without touching ``ann``. Its BatchNorms are not fused: the targets are
    the ANN's own activations (fusing, as the converter does, changes only their rounding and took 40% of
    this step). An ANN wholly in eval mode is traced as it is: the GraphModule shares its leaf modules, and
    only its own new graph is rewritten. A GraphModule (returned by the tracer as it is) or an ANN in
    training mode is deep-copied first."""
    if not isinstance(ann, fx.GraphModule) and not any(m.training for m in ann.modules()):
        return trace_model(ann)
    return trace_model(copy.deepcopy(ann).eval()).eval()


def _activation_sums(
    ann_gm: fx.GraphModule, wanted: set[str], inputs: list[Any], channels_last: bool = False
) -> dict[str, torch.Tensor]:
    """Each wanted activation of ``ann_gm`` (a graph of its own: its output is rewritten) summed over the
    samples of all ``inputs``, in float64. The graph returns the activations, so the ANN runs as compiled
    code, not node by node. With ``channels_last``, 2-D convolutions' outputs are put in channels-last
    order (a 1-channel input is in both orders, and torch would keep the default one)."""
    names = sorted(wanted)
    nodes = {n.name: n for n in ann_gm.graph.nodes}
    if channels_last:
        for node in [n for n in ann_gm.graph.nodes if _is_conv2d(ann_gm, n)]:
            with ann_gm.graph.inserting_after(node):
                moved = ann_gm.graph.call_function(_to_channels_last, (node,))
            node.replace_all_uses_with(moved, delete_user_cb=lambda user, moved=moved: user is not moved)
    output = next(n for n in ann_gm.graph.nodes if n.op == "output")
    output.args = (tuple(nodes[name] for name in names),)  # every node still runs, as before
    ann_gm.recompile()
    sums: dict[str, torch.Tensor] = {}
    for x in inputs:
        for name, result in zip(names, ann_gm(x)):
            total = sum_first_dim(result.detach(), torch.float64)
            previous = sums.get(name)
            if previous is not None and previous.shape != total.shape:
                raise ValueError(
                    f"calibrate_snn needs calibration batches of one sample shape; activation {name!r} had "
                    f"{tuple(previous.shape)} and then {tuple(total.shape)} per sample."
                )
            sums[name] = total if previous is None else previous + total
    return sums


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """``copy.deepcopy(gm)``, with each module's empty containers (its hook dicts, mostly) copied as new
    empty ones up front: the same result, a third faster on the digits CNNs."""
    memo: dict[int, Any] = {}
    for module in gm.modules():
        for value in module.__dict__.values():
            if type(value) in (dict, OrderedDict, set, list) and not value:
                memo[id(value)] = type(value)()
    return copy.deepcopy(gm, memo)


def _merged(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive batches of one sample shape, dtype and device concatenated, up to ``_MERGE_ELEMENTS``
    elements a chunk (a larger batch stays alone). Every statistic is a sum over samples of per-sample
    results, so only float rounding can change, and small batches run as fewer, larger kernels: on 4
    batches of 128 digits the T=2 calibration runs 1.2x faster."""
    chunks: list[list[torch.Tensor]] = []
    size = 0
    for x in inputs:
        last = chunks[-1][-1] if chunks else None
        if (
            last is not None
            and x.dim() > 0
            and last.shape[1:] == x.shape[1:]
            and (last.dtype, last.device) == (x.dtype, x.device)
            and size + x.numel() <= _MERGE_ELEMENTS
        ):
            chunks[-1].append(x)
            size += x.numel()
        else:
            chunks.append([x])
            size = x.numel()
    return [chunk[0] if len(chunk) == 1 else torch.cat(chunk) for chunk in chunks]


def _channels_last(gm: fx.GraphModule) -> bool:
    """Whether to run in channels-last order: the model has 2-D convolutions. oneDNN's channels-last kernels
    are up to 3.3x faster on the digits CNNs' ``[T*N, 16, 8, 8]`` spike maps; values agree to float
    rounding (tests compare with a reference run in the default order)."""
    return any(isinstance(m, nn.Conv2d) for m in gm.modules())


def _to_channels_last(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() == 4:
        return value.contiguous(memory_format=torch.channels_last)
    return value


def _is_conv2d(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Conv2d)


def _group() -> Any:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _reduce(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, group=group)
    return tensor


def _check(method: Any, time_steps: Any, num_batches: Any, progress: Any) -> None:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, but got {method!r}.")
    if isinstance(time_steps, bool) or not isinstance(time_steps, numbers.Integral) or time_steps < 1:
        raise ValueError(f"time_steps must be a positive int, but got {time_steps!r}.")
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral) or num_batches < 1
    ):
        raise ValueError(f"num_batches must be a positive int or None, but got {num_batches!r}.")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, but got {progress!r}.")


def calibrate_snn(
    snn: fx.GraphModule,
    ann: nn.Module,
    dataloader: Iterable[Any],
    time_steps: int,
    method: str = "both",
    *,
    num_batches: int | None = None,
    progress: bool = True,
) -> fx.GraphModule:
    """Correct a converted SNN layer by layer so that its ``time_steps``-step rates match the ANN.

    For each spiking block in topological order (earlier blocks already corrected), with ``r`` its output
    summed over ``time_steps`` steps divided by ``time_steps`` and ``a`` the ANN's activation:

    - ``"bias"``: the Conv/Linear feeding the block (through average pools and residual adds) gets
      ``b_c -= mean_{N, spatial}(r_c - a_c)``; blocks with no such layer are left to the potential correction.
    - ``"potential"``: the neurons start at ``v_init += time_steps · mean_N(a - r) / s`` per element (``s``
      the block's threshold), in threshold units.
    - ``"both"``: bias first, then the potential on the error that remains.

    Works with every neuron option (``burst``, ``signed``, per-channel thresholds). Under an initialised
    ``torch.distributed`` process group the error statistics are all-reduced (every rank must call it
    with its shard of the data). The layers report is in ``result.meta["ann2snn_fx.calibrate_snn"]``.

    Args:
        snn: A converted SNN (left untouched).
        ann: The ANN it was converted from (left untouched).
        dataloader: Calibration batches, as for the :class:`~ann2snn_fx.Converter` (all of one sample shape).
        time_steps: The ``T`` the SNN will be run for.
        method: ``"bias"``, ``"potential"`` or ``"both"``.
        num_batches: Use only the first batches (``None``: all; they are held in memory together).
        progress: Show a progress bar (also hidden by ``TQDM_DISABLE=1``).

    Returns:
        A new, corrected SNN (a copy of ``snn``).

    Raises:
        ValueError: for a bad option, an empty dataloader, or an ANN whose activations do not pair with the
            SNN's blocks.

    Examples:
        >>> from ann2snn_fx import Converter
        >>> _ = torch.manual_seed(0)
        >>> ann = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
        >>> loader = [torch.randn(64, 4) for _ in range(2)]
        >>> snn = Converter(loader, progress=False).convert_to_spiking_neurons(ann)
        >>> fixed = calibrate_snn(snn, ann, loader, time_steps=2, progress=False)
        >>> [round(layer.error_after, 3) <= round(layer.error_before, 3)
        ...  for layer in fixed.meta["ann2snn_fx.calibrate_snn"]]
        [True]
    """
    if not isinstance(snn, fx.GraphModule):
        raise TypeError(f"snn must be a converted SNN (an fx.GraphModule), but got {type(snn).__name__}.")
    if not isinstance(ann, nn.Module):
        raise TypeError(f"ann must be an nn.Module, but got {type(ann).__name__}.")
    _check(method, time_steps, num_batches, progress)
    steps = int(time_steps)
    new = _copy(snn).eval()
    if hasattr(snn, "conversion_report"):
        new.__dict__["conversion_report"] = snn.conversion_report
    blocks = _find_blocks(new)
    ann_gm = _ann_graph(ann)
    _match_activations(snn, blocks, ann_gm)
    first = next(itertools.chain(new.parameters(), new.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    ann_gm = ann_gm.to(device)
    source = dataloader if num_batches is None else itertools.islice(dataloader, int(num_batches))
    inputs = [stages.to_model(stages.batch_input(d), device, None) for d in source]
    if not inputs:
        raise ValueError("The calibration dataloader yielded no batch; calibrate_snn needs data.")
    inputs = _merged(inputs)
    channels_last = _channels_last(new)
    if channels_last:
        inputs = [_to_channels_last(x) for x in inputs]
    disabled = not progress or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    bar = tqdm(total=len(blocks) + 1, desc="calibrating SNN", disable=disabled, leave=False)
    group = _group()
    count = _reduce(
        torch.tensor(float(sum(x.shape[0] for x in inputs)), dtype=torch.float64, device=device), group
    )
    with torch.no_grad():
        ann_sums = _activation_sums(ann_gm, {b.activation for b in blocks}, inputs, channels_last)
        ann_means = {k: _reduce(v, group) / count for k, v in ann_sums.items()}
        bar.update(1)
        layers = _LockStep(new, inputs, steps, blocks, method, group, count, channels_last).run(
            ann_means, bar
        )
    bar.close()
    reset_net(new)  # no membrane of the calibration run (one per calibration sample) stays in the result
    new.meta["ann2snn_fx.calibrate_snn"] = layers
    return new


class _LockStep:
    """All calibration batches advance node by node; each block is corrected when its output is ready."""

    def __init__(
        self,
        gm: fx.GraphModule,
        inputs: list[torch.Tensor],
        steps: int,
        blocks: list[_Block],
        method: str,
        group: Any,
        count: torch.Tensor,
        channels_last: bool = False,
    ) -> None:
        # 2-D convolutions whose output is put in channels-last order (see _channels_last).
        self.to_channels_last = {n for n in gm.graph.nodes if channels_last and _is_conv2d(gm, n)}
        self.gm, self.steps, self.blocks, self.method, self.group, self.count = (
            gm,
            steps,
            blocks,
            method,
            group,
            count,
        )
        self.order = [n for n in gm.graph.nodes if n.op != "output"]
        self.index = {n: i for i, n in enumerate(self.order)}
        self.runs = []
        for x in inputs:
            interpreter = _MultiStepInterpreter(gm, steps, {})
            interpreter.args_iter = iter([x])
            self.runs.append(interpreter)
        self.last_use = {
            n: max((self.index.get(u, len(self.order)) for u in n.users), default=-1) for n in self.order
        }
        for b in blocks:
            b.bias_node = _bias_source(gm, b.scaler0.args[0]) if method != "potential" else None
        modules = dict(gm.named_modules())
        self.resets = {
            n: modules[str(n.target)]
            for n in self.order
            if n.op == "call_module" and callable(getattr(modules[str(n.target)], "reset", None))
        }
        self.neurons = {b.neuron: b for b in blocks}
        self.burst = {
            b.neuron: max(int(getattr(modules[str(b.neuron.target)], "burst", 1)), 1) for b in blocks
        }
        self.scalers = {b.scaler1: modules[str(b.scaler1.target)] for b in blocks}
        self.counts: list[dict[fx.Node, torch.Tensor]] = [{} for _ in inputs]
        # Per batch, each block neuron's final membrane: its next run on that batch starts in it.
        self.spare_v: list[dict[fx.Node, torch.Tensor]] = [{} for _ in inputs]

    def _start(self, b: _Block) -> int:
        return self.index[b.bias_node] if b.bias_node is not None else self.index[b.neuron]

    def _run(self, nodes: list[fx.Node], keep: bool) -> None:
        """Run ``nodes`` on every batch; block neurons record their spike counts summed over time and
        samples, and keep their output only with ``keep`` (the block's last run: later nodes read it)."""
        for it, counts, spares in zip(self.runs, self.counts, self.spare_v):
            for node in nodes:
                it.static_cache.pop(node, None)
                it.expanded.pop(node, None)
                block = self.neurons.get(node)
                module = self.resets.get(node)
                spare = spares.pop(node, None)
                if isinstance(module, IFNode) and spare is not None:
                    module._reset_into(spare)  # the membrane of this node's previous run on this batch
                elif module is not None:
                    module.reset()
                totals = None
                if block is not None and not keep:
                    # The neuron emits integer spike counts, summed exactly in float32 (below 2**24): a fused
                    # neuron sums each step's into the accumulator and keeps no [T*B, ...] output.
                    x = it.env[block.scaler0]
                    rows = x.shape[0] * (1 if it.temporal.get(block.scaler0, False) else self.steps)
                    exact = rows * self.burst[node] < 2**24 and x.dtype != torch.float64
                    totals = torch.zeros(
                        x.shape[1:], dtype=torch.float32 if exact else torch.float64, device=x.device
                    )
                    it.totals[node] = totals
                value = it.run_node(node)
                if node in self.to_channels_last:
                    value = _to_channels_last(value)
                it.env[node] = value
                if block is not None:
                    state = getattr(module, "v", None)
                    if isinstance(state, torch.Tensor):
                        spares[node] = state
                    it.totals.pop(node, None)
                    if value is not None:  # kept, or a neuron with no fused loop (its totals were not used)
                        exact = value.shape[0] * self.burst[node] < 2**24 and value.dtype != torch.float64
                        totals = sum_first_dim(value, torch.float32 if exact else torch.float64)
                    assert totals is not None
                    counts[block.scaler1] = totals

    def _rate_mean(self, b: _Block) -> torch.Tensor:
        """The block's output summed over time and samples, divided by ``time_steps`` and the sample count:
        the exact sum of the spike counts times the output scale (one float64 rounding)."""
        total: torch.Tensor | None = None
        for counts in self.counts:
            summed = counts[b.scaler1].double()
            total = summed if total is None else total + summed
        assert total is not None
        total = self.scalers[b.scaler1](total.unsqueeze(0))[0]
        return _reduce(total, self.group) / (self.count * self.steps)

    def run(self, ann_means: dict[str, torch.Tensor], bar: Any) -> list[CalibratedLayer]:
        ends = {b.scaler1: b for b in self.blocks}
        starts = sorted((self.index[b.scaler1], self._start(b)) for b in self.blocks)
        layers = []
        for i, node in enumerate(self.order):
            block = ends.get(node)
            if block is not None:
                # The block's output scaler runs once, after the corrections (they read the spike counts).
                last = block is self.blocks[-1]
                layers.append(self._correct(block, ann_means[block.activation], i, last))
                bar.update(1)
                if last:
                    break
            self._run([node], keep=False)
            keep_from = min((p for s, p in starts if s > i), default=len(self.order))
            for n in self.order[: i + 1]:
                if self.last_use[n] <= i and self.last_use[n] < keep_from:
                    for it in self.runs:
                        it.env.pop(n, None)
        return layers

    def _correct(self, b: _Block, target: torch.Tensor, i: int, last: bool) -> CalibratedLayer:
        """Correct block ``b`` (its output node is ``self.order[i]``); the re-runs keep the block's output
        only where later nodes read it (not after the ``last`` block: only its spike counts are needed)."""
        error = self._rate_mean(b) - target
        before = float(error.abs().mean())
        bias_of = None
        if b.bias_node is not None:
            module: Any = self.gm.get_submodule(str(b.bias_node.target))
            shift = error.mean(dim=tuple(range(1, error.dim()))) if error.dim() > 1 else error
            weight = module.weight
            if shift.numel() == weight.shape[0]:
                if module.bias is None:
                    module.bias = nn.Parameter(
                        torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
                    )
                with torch.no_grad():
                    module.bias -= shift.to(module.bias.dtype)
                bias_of = str(b.bias_node.target)
                for it in self.runs:  # the layer's output moves by the same shift: no need to recompute it
                    value = it.env[b.bias_node]
                    value.sub_(shift.to(value.dtype).view(1, -1, *([1] * (value.dim() - 2))))
                    it.expanded.pop(b.bias_node, None)
                self._run(self.order[self._start(b) + 1 : i], keep=self.method == "bias" and not last)
                error = self._rate_mean(b) - target
        if self.method in ("potential", "both") or bias_of is None:
            neuron = self.gm.get_submodule(str(b.neuron.target))
            assert isinstance(neuron, IFNode)
            scaler: Any = self.gm.get_submodule(str(b.scaler1.target))
            scale = scaler.scale.double()
            if scale.dim() == 1 and error.dim() >= 1:
                scale = scale.view(-1, *([1] * (error.dim() - 1)))
            theta = (
                float(neuron.v_threshold)
                if not isinstance(neuron.v_threshold, torch.Tensor)
                else neuron.v_threshold
            )
            delta = -self.steps * error / scale * theta
            old = neuron.v_init if neuron.v_init is not None else 0.0
            neuron.set_v_init(
                (torch.as_tensor(old, dtype=torch.float64, device=delta.device) + delta).float()
            )
            self._run(self.order[self.index[b.neuron] : i], keep=not last)
            error = self._rate_mean(b) - target
        return CalibratedLayer(b.prefix, b.activation, bias_of, before, float(error.abs().mean()))

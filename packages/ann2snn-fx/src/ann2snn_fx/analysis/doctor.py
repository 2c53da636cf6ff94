"""The conversion doctor: where a converted SNN departs from its ANN, why, and what to try.

:func:`diagnose` (ReLU -> IF conversions) splits each converted layer's error into clipping, quantisation and
the rest; :func:`diagnose_td` (TD conversions) finds the first node whose cumulative output leaves the ANN's.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ann2snn_fx.analysis.records import _table
from ann2snn_fx.neuron import reset_net
from ann2snn_fx.report import ConversionReport, LeftActivation
from ann2snn_fx.runner import run_snn
from ann2snn_fx.tracing import trace_model

__all__ = ["Diagnosis", "LayerDiagnosis", "TDDiagnosis", "TDNodeDeviation", "diagnose", "diagnose_td"]


@dataclass(frozen=True)
class LayerDiagnosis:
    """One converted activation: the ANN's ``a`` against the SNN's mean output ``m`` after ``T`` steps.

    With ``c = clamp(a, 0, s)`` (``s`` the layer threshold) and ``q`` the value ``T`` spikes can carry
    (``clamp(floor(T c / s + v_init / theta), 0, T) * s / T``, exact for a soft-reset IF neuron under a constant
    input), each error is a norm over the inputs, as a share of ``||a||``:

    Attributes:
        node: The activation's node name (as in the conversion report).
        block: The spiking block's module path.
        threshold: ``s`` (the largest value when per channel).
        clipped_fraction: Share of activations above the threshold.
        clipping: ``||a - c|| / ||a||``: what the threshold cuts off.
        quantisation: ``||c - q|| / ||a||``: the ``s / T`` resolution.
        remainder: ``||q - m|| / ||a||``: uneven spike timing and errors propagated from earlier layers.
        total: ``||a - m|| / ||a||`` (at most the sum of the three).
    """

    node: str
    block: str
    threshold: float
    clipped_fraction: float
    clipping: float
    quantisation: float
    remainder: float
    total: float


@dataclass
class Diagnosis:
    """What :func:`diagnose` found: per-layer errors, unconverted activations and ranked suggestions."""

    time_steps: int
    layers: list[LayerDiagnosis] = field(default_factory=list)
    left: list[LeftActivation] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    shares: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        """The layer table, the unconverted activations and the suggestions, as markdown."""
        header = ["layer", "block", "threshold", "clipped", "clipping", "quantisation", "remainder", "total"]
        rows = [
            [
                d.node,
                d.block,
                f"{d.threshold:.4g}",
                f"{d.clipped_fraction:.2%}",
                f"{d.clipping:.2%}",
                f"{d.quantisation:.2%}",
                f"{d.remainder:.2%}",
                f"{d.total:.2%}",
            ]
            for d in self.layers
        ]
        parts = [f"Conversion diagnosis at T={self.time_steps} (errors as shares of the activation norm)", ""]
        parts += [_table(header, rows), ""]
        parts += [f"- left unconverted: {a.node} ({a.kind}): {a.reason}" for a in self.left]
        parts += [f"- not diagnosed: {why}" for why in self.skipped]
        parts += [f"{i}. {s}" for i, s in enumerate(self.suggestions, 1)]
        return "\n".join(parts)


def _norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.double()))


def _capture(gm: fx.GraphModule, x: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}

    class Capture(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if n.name in names and isinstance(result, torch.Tensor):
                captured[n.name] = result.detach()
            return result

    with torch.no_grad():
        Capture(gm).run(x)
    return captured


def _broadcast_scale(scale: torch.Tensor, channel_dim: int | None, like: torch.Tensor) -> torch.Tensor:
    if scale.numel() == 1:
        return scale.reshape(())
    dim = channel_dim if channel_dim is not None else 1
    shape = [1] * like.dim()
    shape[dim] = scale.numel()
    return scale.reshape(shape)


def _layer(
    node: str, block: str, a: torch.Tensor, m: torch.Tensor, s: torch.Tensor, phase: float, t: int
) -> LayerDiagnosis:
    c = torch.minimum(a.clamp_min(0), s)
    q = torch.clamp(torch.floor(t * c / s + phase + 1e-6), 0, t) * s / t
    norm = max(_norm(a), 1e-12)
    return LayerDiagnosis(
        node, block, float(s.max()), float((a > s).float().mean()), _norm(a - c) / norm, _norm(c - q) / norm,
        _norm(q - m) / norm, _norm(a - m) / norm,
    )  # fmt: skip


def diagnose(ann: nn.Module, snn: fx.GraphModule, inputs: torch.Tensor, time_steps: int) -> Diagnosis:
    """Explain a ReLU -> IF conversion's error, layer by layer, on ``inputs``; rank what to try.

    The ANN (traced with :func:`~ann2snn_fx.trace_model`, so its node names are the conversion report's) runs
    once; the SNN runs ``time_steps`` steps (``run_snn``) with temporary hooks on each block's output scaler,
    always removed. For each converted activation the error of the SNN's mean output is split into clipping,
    quantisation and the remainder (see :class:`LayerDiagnosis`); ``snn.conversion_report`` supplies the
    unconverted activations and their reasons. Suggestions follow from the numbers, largest first.

    Args:
        ann: The ANN the SNN was converted from (in eval mode; it is not changed).
        snn: The converted SNN (``Converter.convert_to_spiking_neurons``'s result, with ``conversion_report``).
        inputs: A batch ``[B, *]``, fed at every step.
        time_steps: ``T``.

    Returns:
        A :class:`Diagnosis`.

    Raises:
        TypeError: ``snn`` has no ``conversion_report`` or ``ann`` is not a module.
        ValueError: Bad ``time_steps`` or ``inputs``.

    Examples:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from ann2snn_fx import Converter
        >>> _ = torch.manual_seed(0)
        >>> ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
        >>> x = torch.rand(32, 4)
        >>> snn = Converter(DataLoader(TensorDataset(x), batch_size=16), progress=False).convert_to_spiking_neurons(ann)
        >>> d = diagnose(ann, snn, x, 2)
        >>> max(d.shares, key=d.shares.get)
        'quantisation'
    """
    if not isinstance(ann, nn.Module):
        raise TypeError(f"ann must be an nn.Module, but got {type(ann).__name__}.")
    training = [name or "<root>" for name, m in ann.named_modules() if m.training]
    if training:
        raise ValueError(
            f"ann must be in eval mode (its activations are the reference), but {training[0]!r} is training; "
            "call ann.eval() first."
        )
    report = getattr(snn, "conversion_report", None)
    if not isinstance(snn, fx.GraphModule) or not isinstance(report, ConversionReport):
        raise TypeError(
            "snn must be a converted SNN (an fx.GraphModule with a conversion_report attribute, as "
            f"Converter.convert_to_spiking_neurons returns), but got {type(snn).__name__}."
        )
    if isinstance(time_steps, bool) or not isinstance(time_steps, numbers.Integral) or int(time_steps) < 1:
        raise ValueError(f"time_steps must be a positive integer, but got {time_steps!r}.")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1:
        raise ValueError(f"inputs must be a batched tensor [B, *], but got {type(inputs).__name__}.")
    t = int(time_steps)
    items = [c for c in report.converted if c.block]
    activations = _capture(trace_model(ann), inputs, {c.node for c in items})
    sums: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for item in items:
            scaler = snn.get_submodule(f"{item.block}.scaler1")

            def hook(_m: nn.Module, _a: Any, out: torch.Tensor, key: str = item.node) -> None:
                sums[key] = out.detach().clone() if key not in sums else sums[key].add_(out)

            handles.append(scaler.register_forward_hook(hook))
        run_snn(snn, inputs, t)
    finally:
        for handle in handles:
            handle.remove()
    result = Diagnosis(t, left=list(report.left))
    for item in items:
        if item.node not in activations or item.node not in sums:
            where = (
                "the traced ANN has no node of that name" if item.node not in activations else "it never ran"
            )
            result.skipped.append(f"{item.node} ({item.block}): {where}")
            continue
        a = activations[item.node]
        scaler = snn.get_submodule(f"{item.block}.scaler1")
        s = _broadcast_scale(scaler.scale.detach().to(a.dtype), getattr(scaler, "channel_dim", None), a)
        neuron = snn.get_submodule(f"{item.block}.if_node")
        theta = float(getattr(neuron, "v_threshold", 1.0))
        phase = float(getattr(neuron, "v_init", None) or 0.0) / theta
        result.layers.append(_layer(item.node, item.block or "", a, sums[item.node] / t, s, phase, t))
    reset_net(snn)
    _suggest(result, items, snn)
    return result


def _suggest(d: Diagnosis, items: list[Any], snn: fx.GraphModule) -> None:
    if not d.layers:
        return
    shares = {
        part: math.sqrt(sum(getattr(layer, part) ** 2 for layer in d.layers) / len(d.layers))
        for part in ("clipping", "quantisation", "remainder")
    }
    d.shares = shares
    worst = {part: max(d.layers, key=lambda layer: float(getattr(layer, part))).node for part in shares}
    flooring = any(
        getattr(snn.get_submodule(f"{c.block}.if_node"), "v_init", None) in (None, 0.0)
        for c in items
        if c.block
    )
    text = {
        "clipping": (
            f"Thresholds clip {shares['clipping']:.1%} of the activation norm (worst at {worst['clipping']}): "
            "raise the threshold there or use a percentile mode (e.g. mode='99.9%') instead of a low one; "
            "per-channel thresholds help when channels differ in range, and burst neurons (burst > 1) let a "
            "neuron carry more than one spike per step."
        ),
        "quantisation": (
            f"The threshold/T resolution costs {shares['quantisation']:.1%} (worst at {worst['quantisation']}): "
            f"raise T (the error shrinks like 1/T; T={2 * d.time_steps} about halves it)"
            + ("; start neurons at v_init=0.5 to round instead of floor." if flooring else ".")
        ),
        "remainder": (
            f"Uneven spike timing and errors propagated from earlier layers cost {shares['remainder']:.1%} "
            f"(worst at {worst['remainder']}): post-conversion calibration (bias or potential correction), "
            "signed neurons (signed=True) to take back early excess spikes, or more steps."
        ),
    }
    d.suggestions = [text[part] for part in sorted(shares, key=lambda p: -shares[p]) if shares[part] > 1e-3]
    if d.left:
        names = ", ".join(a.node for a in d.left)
        d.suggestions.insert(
            0, f"{len(d.left)} activation(s) stayed ANN operations ({names}); see their reasons above: add a rule "
            "or rewrite them as nn.ReLU modules to convert them."
        )  # fmt: skip


@dataclass(frozen=True)
class TDNodeDeviation:
    """One module of a TD-converted model: the relative deviation of its cumulative output from the ANN's."""

    name: str
    op: str
    deviation: float
    max_abs: float


@dataclass
class TDDiagnosis:
    """Per-module deviations in graph order; ``first_broken`` is where the equivalence first breaks."""

    nodes: list[TDNodeDeviation]
    tolerance: float
    first_broken: str | None

    def to_markdown(self) -> str:
        rows = [[n.name, n.op, f"{n.deviation:.3g}", f"{n.max_abs:.3g}"] for n in self.nodes]
        verdict = f"first broken at {self.first_broken!r}" if self.first_broken else "equivalent everywhere"
        return _table(["module", "op", "relative deviation", "max abs"], rows) + f"\n\n{verdict}"


def diagnose_td(
    ann: nn.Module, td_model: nn.Module, inputs: torch.Tensor, *, tolerance: float = 1e-4
) -> TDDiagnosis:
    """Find where a TD conversion (:func:`~ann2snn_fx.replace_by_td_operators`) stops matching its ANN.

    A :class:`~ann2snn_fx.TDTimeFolded` ``td_model`` (inputs ``[T, B, *]``) is compared module by module with
    the ANN on the cumulative inputs, the time axis folded into the batch; a
    :class:`~ann2snn_fx.SpikeZIPSNN` (with its QANN as ``ann``) only at the last step, where a settled SNN
    equals its QANN: run enough steps for it to settle (``run_until_quiet`` tells how many).

    ``td_model`` runs on the sequence ``inputs`` ``[T, *]`` and the ANN on ``inputs.cumsum(0)`` (the time
    axis as a batch axis); every module path present in both is compared: ``||cumsum(td_out) - ann_out|| /
    ||ann_out||``. The first module over ``tolerance``, in graph order, is where the equivalence breaks
    (later ones inherit the error).

    Examples:
        >>> from ann2snn_fx import replace_by_td_operators
        >>> ann = nn.Sequential(nn.Linear(4, 4), nn.GELU()).eval()
        >>> td = replace_by_td_operators(ann)
        >>> diagnose_td(ann, td, torch.randn(3, 2, 4)).first_broken is None
        True
    """
    from ann2snn_fx.td import TDTimeFolded

    if not isinstance(td_model, (fx.GraphModule, TDTimeFolded)) or not isinstance(ann, nn.Module):
        raise TypeError(
            f"diagnose_td needs an nn.Module ann and an fx.GraphModule, TDTimeFolded or SpikeZIPSNN td_model, "
            f"but got {type(ann).__name__} and {type(td_model).__name__}."
        )
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        raise ValueError(f"inputs must be a time sequence [T, *], but got {type(inputs).__name__}.")
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not tolerance > 0:
        raise ValueError(f"tolerance must be a positive real number, but got {tolerance!r}.")
    if isinstance(td_model, TDTimeFolded):
        from ann2snn_fx.analysis._doctor_folded import folded_deviations

        found = folded_deviations(ann, td_model, inputs)
        broken = next((n.name for n in found if n.deviation > tolerance), None)
        return TDDiagnosis(found, float(tolerance), broken)
    ann_modules = dict(ann.named_modules())
    names = [str(n.target) for n in td_model.graph.nodes if n.op == "call_module" and n.target in ann_modules]
    outputs: dict[tuple[str, str], torch.Tensor] = {}
    handles = []

    def keep(side: str, name: str) -> Any:
        def hook(_m: nn.Module, _a: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and (side, name) not in outputs:
                outputs[(side, name)] = out.detach()

        return hook

    try:
        for name in names:
            handles.append(td_model.get_submodule(name).register_forward_hook(keep("td", name)))
            handles.append(ann_modules[name].register_forward_hook(keep("ann", name)))
        with torch.no_grad():
            td_model(inputs)
            ann(inputs.cumsum(0))
    finally:
        for handle in handles:
            handle.remove()
    nodes = []
    for name in names:
        td_out, ann_out = outputs.get(("td", name)), outputs.get(("ann", name))
        if td_out is None or ann_out is None or td_out.shape != ann_out.shape:
            continue
        diff = td_out.cumsum(0) - ann_out
        nodes.append(
            TDNodeDeviation(
                name,
                type(td_model.get_submodule(name)).__name__,
                _norm(diff) / max(_norm(ann_out), 1e-12),
                float(diff.abs().max()),
            )
        )
    broken = next((n.name for n in nodes if n.deviation > tolerance), None)
    return TDDiagnosis(nodes, float(tolerance), broken)

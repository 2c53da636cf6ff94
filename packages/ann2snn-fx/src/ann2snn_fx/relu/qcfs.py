"""QCFS activations (Bu et al., ICLR 2022): fine-tune an ANN so that it converts to IF neurons with no data.

``QCFS(levels, threshold)`` computes ``h(x) = λ · clamp(floor(x L / λ + 1/2), 0, L) / L`` with a trainable
``λ`` and a straight-through gradient for the floor; :func:`prepare_qcfs` swaps a model's ``nn.ReLU`` modules
for it; :class:`QCFSRule` (one of the converter's default rules) turns each QCFS activation into a spiking
block with threshold ``λ`` and neurons starting at ``v_init = 0.5``: for a constant input, the block's mean
output after ``T = L`` steps equals ``h(x)`` (SPEC 14.2), so no calibration data is needed.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from ann2snn_fx.relu.rule_base import _SpikingBlockRule

__all__ = ["QCFS", "QCFSRule", "prepare_qcfs"]


class QCFS(nn.Module):
    """Quantisation-clip-floor-shift activation with a trainable clip ``λ`` (the parameter ``threshold``).

    Forward ``h(x) = λ · clamp(floor(x L / λ + 1/2), 0, L) / L``; backward: the floor passes gradients
    straight through, so ``λ`` and the layers below train as for a clipped ReLU.

    Args:
        levels: Number of quantisation levels ``L`` (a positive int; convert and simulate ``T ≈ L`` steps).
        threshold: Initial ``λ``, a positive number (default 8.0, the value of the QCFS reference code;
            :func:`prepare_qcfs` can start it from the activations' maximum instead).

    Shape:
        - Input: any shape; output: same shape.

    Examples:
        >>> QCFS(levels=4, threshold=2.0)(torch.tensor([-1.0, 0.2, 0.3, 1.0, 5.0]))
        tensor([0.0000, 0.0000, 0.5000, 1.0000, 2.0000], grad_fn=<MulBackward0>)
    """

    #: Traced as one opaque module by :func:`ann2snn_fx.trace_model` (the converter's QCFSRule matches it).
    fx_leaf = True
    levels: int
    threshold: nn.Parameter

    def __init__(self, levels: int = 8, threshold: float = 8.0) -> None:
        super().__init__()
        if isinstance(levels, bool) or not isinstance(levels, numbers.Integral) or levels < 1:
            raise ValueError(f"levels must be a positive int, but got {levels!r}.")
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, numbers.Real)
            or not 0 < float(threshold) < float("inf")
        ):
            raise ValueError(f"threshold must be a finite positive number, but got {threshold!r}.")
        self.levels = int(levels)
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = self.threshold
        y = x / lam * self.levels + 0.5
        y = y + (torch.floor(y) - y).detach()  # straight-through floor
        return torch.clamp(y / self.levels, 0, 1) * lam

    def extra_repr(self) -> str:
        return f"levels={self.levels}, threshold={float(self.threshold.detach()):.4g}"


def prepare_qcfs(
    ann: nn.Module,
    levels: int = 8,
    threshold: float = 8.0,
    *,
    dataloader: Iterable[Any] | None = None,
    num_batches: int = 4,
) -> nn.Module:
    """A copy of ``ann`` with every ``nn.ReLU`` module (exact type) replaced by ``QCFS(levels, λ)``.

    Args:
        ann: The ANN (left untouched).
        levels: QCFS levels ``L``.
        threshold: Initial ``λ`` of every layer.
        dataloader: When given, each layer's ``λ`` starts at the largest activation its ReLU produced on the
            first ``num_batches`` batches (a tensor, or the first element of a tuple/list) instead.
        num_batches: Batches used for that initialisation.

    Returns:
        The new model, in the training mode of ``ann``, ready to fine-tune.

    Raises:
        ValueError: when ``ann`` has no ``nn.ReLU`` module (functional ReLUs are not replaced).

    Examples:
        >>> ann = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> prepare_qcfs(ann, levels=4)[1]
        QCFS(levels=4, threshold=8)
    """
    if not isinstance(ann, nn.Module):
        raise TypeError(f"ann must be an nn.Module, but got {type(ann).__name__}.")
    if isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive int, but got {num_batches!r}.")
    QCFS(levels, threshold)  # validates both before any work
    model = copy.deepcopy(ann)
    names = [name for name, m in model.named_modules() if type(m) is nn.ReLU]
    if not names:
        raise ValueError(
            f"ann has no nn.ReLU module to replace ({type(ann).__name__}); prepare_qcfs replaces nn.ReLU modules "
            "only (use modules instead of F.relu)."
        )
    peaks = _activation_peaks(model, names, dataloader, int(num_batches)) if dataloader is not None else {}
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        peak = peaks.get(name, 0.0)
        setattr(parent, leaf, QCFS(levels, peak if peak > 0 else threshold))
    return model


def _activation_peaks(
    model: nn.Module, names: list[str], dataloader: Iterable[Any], num_batches: int
) -> dict[str, float]:
    peaks = dict.fromkeys(names, 0.0)
    handles = []
    for name in names:

        def record(_m: nn.Module, _i: Any, out: torch.Tensor, name: str = name) -> None:
            peaks[name] = max(peaks[name], float(out.detach().max()))

        handles.append(model.get_submodule(name).register_forward_hook(record))
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(dataloader):
                if i >= num_batches:
                    break
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in training.items():
            m.train(flag)
    return peaks


class _FixedThreshold:
    def __init__(self, value: float) -> None:
        self.value = value

    def compute_threshold(self, hook: Any) -> float:
        return self.value


class _HalfStart:
    """Wraps a neuron factory: neurons built without an initial potential start at ``v_init``."""

    def __init__(self, factory: Any, v_init: float) -> None:
        self.factory = factory
        self.v_init = v_init

    def create(self, scale: Any = None) -> nn.Module:
        neuron = self.factory.create(scale=scale)
        if getattr(neuron, "v_init", 0.0) is None:
            neuron.v_init = self.v_init
            neuron.reset()  # type: ignore[operator]
        return neuron


class QCFSRule(_SpikingBlockRule):
    """Converts :class:`QCFS` modules: threshold ``λ``, neurons at ``v_init`` (default 0.5) unless the
    neuron factory sets one; no calibration data is used (the ``Converter`` may have no dataloader when
    every converted activation is a QCFS).

    Examples:
        >>> from types import SimpleNamespace
        >>> QCFSRule().match(SimpleNamespace(op="call_module", target="a"), {"a": QCFS(4)})
        True
    """

    needs_data = False

    def __init__(self, v_init: float = 0.5) -> None:
        self.v_init = float(v_init)

    def match(self, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
        """True for a ``call_module`` node whose module is a :class:`QCFS`."""
        return node.op == "call_module" and isinstance(modules.get(node.target), QCFS)  # type: ignore[arg-type]

    def replace_with_neurons(
        self,
        fx_model: fx.GraphModule,
        activation_node: fx.Node,
        hook_node: fx.Node,
        neuron_factory: Any,
        threshold_optimizer: Any,
    ) -> None:
        """Replace the QCFS and its hook by ``scaler0 -> neuron -> scaler1`` with threshold ``λ``."""
        module = fx_model.get_submodule(str(activation_node.target))
        assert isinstance(module, QCFS)
        lam = float(module.threshold.detach().abs())
        super().replace_with_neurons(
            fx_model,
            activation_node,
            hook_node,
            _HalfStart(neuron_factory, self.v_init),
            _FixedThreshold(lam),
        )


def data_free(fx_model: fx.GraphModule) -> bool:
    """True when every activation node in ``fx_model`` is a QCFS (conversion needs no calibration data)."""
    from ann2snn_fx.relu.rules import is_activation

    modules = dict(fx_model.named_modules())
    qcfs = QCFSRule()
    found = False
    for node in fx_model.graph.nodes:
        if qcfs.match(node, modules):
            found = True
        elif is_activation(node, modules):
            return False
    return found

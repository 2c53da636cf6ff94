"""The seed's per-pass methods of :class:`~ann2snn_fx.relu.converter.Converter` (fuse, hooks, replacement, TD).

They predate the pipeline and stay for compatibility: each runs one stage of :mod:`ann2snn_fx.relu.stages`
on a graph module the caller holds. The Converter inherits them from :class:`SeedPasses`.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import fx, nn

from ann2snn_fx.relu import stages
from ann2snn_fx.relu.factories import NeuronFactory
from ann2snn_fx.relu.rules import ReLURule
from ann2snn_fx.relu.thresholds import ThresholdOptimizer

__all__ = ["SeedPasses"]


class SeedPasses:
    """Mixin: the graph passes as methods (the Converter's ``rules``, ``neuron_factory``, ... where needed)."""

    rules: list[Any]
    neuron_factory: Any
    threshold_optimizer: Any
    device: Any

    _extract_batch_input = staticmethod(stages.batch_input)
    fuse = staticmethod(stages.fuse)
    set_voltagehook = staticmethod(stages.observe)

    def replace_by_neurons(self, fx_model: fx.GraphModule) -> fx.GraphModule:
        """Replace every hooked activation matched by ``self.rules`` by a spiking block.

        Each pair becomes ``VoltageScaler(theta / s) -> neuron -> VoltageScaler(s)`` with ``s`` from
        ``self.threshold_optimizer`` and the neuron from ``self.neuron_factory``.

        Args:
            fx_model: A GraphModule with calibrated hooks; mutated and returned.

        Returns:
            ``fx_model`` with spiking blocks.
        """
        stages.replace(fx_model, self.rules, self.neuron_factory, self.threshold_optimizer)
        return fx_model

    @staticmethod
    def replace_by_ifnode(fx_model: fx.GraphModule) -> fx.GraphModule:
        """Deprecated: :meth:`replace_by_neurons` with the default rule, neuron factory and optimizer."""
        warnings.warn(
            "replace_by_ifnode is deprecated, use replace_by_neurons instead.",
            DeprecationWarning,
            stacklevel=2,
        )
        stages.replace(fx_model, [ReLURule()], NeuronFactory(), ThresholdOptimizer())
        return fx_model

    def replace_by_td_operators(self, ann: nn.Module, **options: Any) -> fx.GraphModule:
        """Replace Linear/LayerNorm/GELU/SDPA/MHA by their temporal-difference operators (no calibration).

        Delegates to :func:`ann2snn_fx.td.replace_by_td_operators` with this converter's ``device``;
        keyword ``options`` (e.g. ``strict=True``) are passed through.
        """
        from ann2snn_fx.td import replace_by_td_operators

        return replace_by_td_operators(ann, device=self.device, **options)

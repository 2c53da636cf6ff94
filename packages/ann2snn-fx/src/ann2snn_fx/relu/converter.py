"""The ReLU -> IF converter: a short pipeline of the stages in :mod:`ann2snn_fx.relu.stages`.

``trace -> fuse -> observe (hooks) -> calibrate -> choose thresholds -> replace -> report``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from ann2snn_fx._numbers import as_integral, as_real
from ann2snn_fx.relu import pools, stages
from ann2snn_fx.relu.factories import HookFactory, NeuronFactory
from ann2snn_fx.relu.options import check_converter_options, check_mode
from ann2snn_fx.relu.passes import SeedPasses
from ann2snn_fx.relu.report import ConversionReport, build_report
from ann2snn_fx.relu.rules import ReLURule, describe, is_activation
from ann2snn_fx.relu.thresholds import ThresholdOptimizer
from ann2snn_fx.snn.inputs import check_input_fn

__all__ = ["Converter"]

logger = logging.getLogger(__name__)


class Converter(SeedPasses):
    """Converts a ReLU ANN into an SNN of integrate-and-fire neurons (the classic ANN2SNN path).

    ``convert_to_spiking_neurons`` deep-copies the model, traces it with torch.fx, fuses Conv+BatchNorm,
    puts a calibration hook (an :class:`ann2snn_calib.VoltageHook`) behind each activation matched by
    ``rules``, runs the calibration batches, and replaces each activation call site by a spiking block
    ``<parent>.spiking_<k>`` made of ``scaler0`` (``VoltageScaler(theta / s)``), ``if_node`` (the neuron from
    ``neuron_factory``, threshold ``theta``) and ``scaler1`` (``VoltageScaler(s)``), where ``s`` is the threshold
    ``threshold_optimizer`` derives from the hook. The caller's model is never changed, moved or re-moded.

    The SNN runs one time step per call on the same input; the mean output over ``T`` steps approximates the
    ANN (see :func:`ann2snn_fx.run_snn`). Prefer average pooling to max pooling in the ANN.

    Args:
        dataloader: Iterable of calibration batches: a tensor, a tuple/list whose first element is the input,
            or a dict with one of the keys ``"input"``, ``"image"``, ``"img"``, ``"x"``, ``"data"``,
            ``"pixel_values"`` (or a single entry). May be ``None`` when every activation of the model is a
            :class:`~ann2snn_fx.QCFS` (converted by :class:`~ann2snn_fx.QCFSRule` without data).
        device: Device for the converted model; ``None`` uses the model's own device (never remembered
            between conversions).
        mode: Calibration statistic: ``"Max"`` (EMA of batch maxima; case-insensitive), ``"p%"`` (EMA of the
            p-th percentile, e.g. ``"99.9%"``), or a fraction ``0 < x <= 1`` of the batch maximum.
        momentum: EMA momentum of the hooks, in [0, 1], or ``None`` for dataset-level statistics (running
            maximum, exact percentile over all calibration data; see :class:`ann2snn_calib.VoltageHook`).
        fuse_flag: Fuse Conv+BatchNorm pairs before calibration.
        rules: Activation rules (default ``[ReLURule(), QCFSRule()]``; :func:`ann2snn_fx.all_rules` adds functional and
            clipped ReLUs). Any object with the four :class:`ActivationRule` methods works.
        neuron_factory: Builds the neurons (default ``NeuronFactory()``: ``IFNode(1.0, v_reset=None)``).
        threshold_optimizer: Chooses each layer's threshold (default ``ThresholdOptimizer("fixed")``).
        progress: Show a tqdm progress bar over the calibration batches; ``None`` (the default) shows it
            unless the environment sets ``TQDM_DISABLE`` (an explicit ``True``/``False`` overrides it).
        num_batches: Stop calibration after this many batches (``None``: the whole dataloader).
        hook_factory: Builds the calibration hooks (default: ``HookFactory(mode, momentum)`` plus what the
            threshold optimizer's ``hook_options()`` asks for).
        input_fn: ``None`` for the batch rules above, or a callable ``batch -> model input`` returning a
            tensor, or an ``(args tuple, kwargs dict)`` pair for several or keyword inputs (nested dicts,
            ``{"images": ...}``, ``(image, mask, label)`` tuples); see :func:`ann2snn_fx.snn.inputs.call_with_batch`.

    Raises:
        NotImplementedError: ``"You have used a non-defined VoltageScale Method."`` for an invalid ``mode``.
        ValueError, TypeError: for other invalid options.

    Examples:
        >>> ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> loader = [torch.randn(16, 4) for _ in range(2)]
        >>> snn = Converter(loader, progress=False).convert_to_spiking_neurons(ann)
        >>> [name for name, _ in snn.named_children()]
        ['0', '2', 'spiking_0']
        >>> print(snn.conversion_report)
        converted 1 activation(s), left 0
          converted _1 (nn.ReLU '1') by ReLURule -> spiking_0
    """

    def __init__(
        self,
        dataloader: Iterable[Any] | None = None,
        device: torch.device | str | None = None,
        mode: str | float = "Max",
        momentum: float | None = 0.1,
        fuse_flag: bool = True,
        rules: list[Any] | None = None,
        neuron_factory: Any = None,
        threshold_optimizer: Any = None,
        *,
        progress: bool | None = None,
        num_batches: int | None = None,
        hook_factory: Any = None,
        input_fn: Callable[[Any], Any] | None = None,
    ) -> None:
        check_mode(mode)
        self.mode, self.fuse_flag, self.dataloader, self.device = mode, fuse_flag, dataloader, device
        self.rules: list[Any] = _default_rules() if rules is None else list(rules)
        self.neuron_factory = NeuronFactory() if neuron_factory is None else neuron_factory
        self.threshold_optimizer = (
            ThresholdOptimizer() if threshold_optimizer is None else threshold_optimizer
        )
        check_converter_options(
            momentum=momentum,
            rules=self.rules,
            neuron_factory=self.neuron_factory,
            threshold_optimizer=self.threshold_optimizer,
            hook_factory=hook_factory,
            progress=progress,
            num_batches=num_batches,
        )
        # numpy / 0-dim torch numbers become Python ones (SPEC 13.3), so they print and compare plainly
        self.momentum = None if momentum is None else as_real(momentum)
        self.num_batches = None if num_batches is None else as_integral(num_batches)
        self.hook_factory, self.progress = hook_factory, progress
        self.input_fn = check_input_fn(input_fn)
        self.last_report: ConversionReport | None = None

    def convert_to_spiking_neurons(
        self,
        ann: nn.Module,
        *,
        calibrate: bool = True,
        tracer: fx.Tracer | type[fx.Tracer] | None = None,
        concrete_args: dict[str, Any] | None = None,
        leaf_modules: Iterable[Any] | None = None,
    ) -> fx.GraphModule:
        """Convert ``ann`` (left untouched) into an SNN GraphModule in eval mode.

        Args:
            ann: The ANN; an ``nn.Module`` or an already traced ``fx.GraphModule``.
            calibrate: ``False`` builds the SNN skeleton without data (every threshold 1.0), to load a saved
                ``state_dict`` into.
            tracer: A custom ``torch.fx.Tracer`` (instance or class).
            concrete_args: Inputs to specialise on while tracing.
            leaf_modules: Module classes or paths kept untraced (activations inside them are not converted).

        Returns:
            The SNN. Its ``conversion_report`` attribute (also ``self.last_report``) lists what was converted
            and what was left.

        Raises:
            ValueError: when the dataloader yields no batch, a hook saw no data, or a threshold is not finite
                and positive (the message names the layer); under torch.distributed, on every rank at once
                when the ranks have different numbers of batches.
            ann2snn_calib.NonFiniteError: (a ValueError) when an activation holds NaN/inf, naming the batch
                and the layer.
            TypeError: for a batch that is not a tensor/array, tuple/list or dict (naming its index and type)
                and ``input_fn`` is not given, or for an ``input_fn`` result of another type.
            ann2snn_fx.ModelTraceError: when the model cannot be traced (the message says what to do).
        """
        if not isinstance(ann, nn.Module):
            raise TypeError(f"ann must be an nn.Module, but got {type(ann).__name__}.")
        if not isinstance(calibrate, bool):
            raise TypeError(f"calibrate must be a bool, but got {calibrate!r}.")
        start = time.perf_counter()
        device = stages.resolve_device(self.device, ann)
        reference = stages.first_tensor(ann, floating=True)
        dtype = reference.dtype if reference is not None else None
        gm = stages.trace(ann, device, tracer=tracer, concrete_args=concrete_args, leaf_modules=leaf_modules)
        gm = stages.fuse(gm, self.fuse_flag)
        pools.commute_max_pools(gm, self.rules)
        modules = dict(gm.named_modules())
        activations = {n.name: describe(n, modules) for n in gm.graph.nodes if is_activation(n, modules)}
        if calibrate and self.dataloader is None and not _qcfs_only(gm):
            raise ValueError(
                "dataloader is None, but the model has activations other than QCFS "
                f"({', '.join(activations) or 'none converted'}): only a model whose every activation is a QCFS "
                "(ann2snn_fx.prepare_qcfs) converts without calibration data; pass calibration batches."
            )
        gm = stages.observe(gm, self.mode, self.momentum, self.rules, hook_factory=self._hook_factory()).to(
            device
        )
        if calibrate and self.dataloader is not None:
            batches, bar = self.num_batches, self.progress
            stages.calibrate(
                gm, self.dataloader, device, dtype, num_batches=batches, progress=bar, input_fn=self.input_fn
            )
        thresholds = stages.choose_thresholds(self.threshold_optimizer, calibrate)
        replaced = stages.replace(gm, self.rules, self.neuron_factory, thresholds)
        stages.remove_leftover_hooks(gm)
        inexact = pools.spiking_max_pools(gm)
        stages.cast_scales(gm, dtype)
        gm = gm.to(device)
        gm.eval()
        report = build_report(gm, activations, replaced, self.rules, inexact)
        gm.__dict__["conversion_report"] = report
        self.last_report = report
        logger.info(
            "converted %d activation(s) in %.2f s", len(report.converted), time.perf_counter() - start
        )
        return gm

    def _hook_factory(self) -> Any:
        if self.hook_factory is not None:
            return self.hook_factory
        options = getattr(self.threshold_optimizer, "hook_options", None)
        extra = options() if callable(options) else {}
        return HookFactory(self.mode, self.momentum, **extra)

    def __repr__(self) -> str:
        return (
            f"Converter(mode={self.mode!r}, momentum={self.momentum}, fuse_flag={self.fuse_flag}, "
            f"rules={[type(r).__name__ for r in self.rules]}, neuron_factory={self.neuron_factory!r}, "
            f"threshold_optimizer={self.threshold_optimizer!r})"
        )


def _default_rules() -> list[Any]:
    from ann2snn_fx.relu.qcfs import QCFSRule

    return [ReLURule(), QCFSRule()]


def _qcfs_only(gm: Any) -> bool:
    from ann2snn_fx.relu.qcfs import data_free

    return bool(data_free(gm))

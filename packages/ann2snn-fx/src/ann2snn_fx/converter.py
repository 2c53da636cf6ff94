"""The ReLU -> IF converter: trace, fuse Conv+BN, calibrate, replace activations by spiking blocks."""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from tqdm.auto import tqdm

from ann2snn_calib import VoltageHook, VoltageScaler
from ann2snn_fx.factories import HookFactory, NeuronFactory
from ann2snn_fx.report import ConversionReport, ConvertedActivation, LeftActivation
from ann2snn_fx.rules import (
    BLOCKS_META_KEY,
    ActivationRule,
    ReLURule,
    all_rules,
    clip_rejection,
    describe,
    is_activation,
)
from ann2snn_fx.threshold import ThresholdOptimizer
from ann2snn_fx.tracing import _resolve_string_annotations, trace_model

__all__ = ["Converter"]

logger = logging.getLogger(__name__)

_MODE_ERROR = "You have used a non-defined VoltageScale Method."
_INPUT_KEYS = ("input", "image", "img", "x", "data", "pixel_values")
_RULE_METHODS = ("match", "insert_hooks", "find_replacements", "replace_with_neurons")
_FUSE_PATTERNS = (
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv3d, nn.BatchNorm3d),
)


def _mode_is_valid(mode: Any) -> bool:
    if isinstance(mode, str):
        if mode.endswith("%"):
            try:
                p = float(mode[:-1])
            except ValueError:
                return False
            return math.isfinite(p) and 0.0 <= p <= 100.0
        return mode.lower() == "max"
    if isinstance(mode, bool) or not isinstance(mode, (int, float)):
        return False
    return math.isfinite(mode) and 0 < mode <= 1


class _UnitThreshold:
    """Threshold placeholder for a skeleton conversion (``calibrate=False``): every layer gets 1.0."""

    def compute_threshold(self, hook: Any) -> float:
        return 1.0


def _first_tensor(model: nn.Module, floating: bool = False) -> torch.Tensor | None:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if not floating or tensor.is_floating_point():
            return tensor
    return None


class Converter:
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
            :class:`~ann2snn_fx.relu.qcfs.QCFS` (converted by :class:`~ann2snn_fx.relu.qcfs.QCFSRule` without data).
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
        progress: Show a tqdm progress bar over the calibration batches.
        num_batches: Stop calibration after this many batches (``None``: the whole dataloader).
        hook_factory: Builds the calibration hooks (default: ``HookFactory(mode, momentum)`` plus what the
            threshold optimizer's ``hook_options()`` asks for).

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
        progress: bool = True,
        num_batches: int | None = None,
        hook_factory: Any = None,
    ) -> None:
        self.mode = mode
        self.fuse_flag = fuse_flag
        self.dataloader = dataloader
        self._check_mode()
        self.device = device
        if momentum is not None and (
            isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0
        ):
            raise ValueError(f"momentum must be a number in [0, 1] or None, but got {momentum!r}.")
        self.momentum = momentum
        self.rules: list[Any] = _default_rules() if rules is None else list(rules)
        for rule in self.rules:
            missing = [name for name in _RULE_METHODS if not callable(getattr(rule, name, None))]
            if missing:
                raise TypeError(
                    f"rule {rule!r} does not implement the ActivationRule protocol: missing {', '.join(missing)}."
                )
        self.neuron_factory = NeuronFactory() if neuron_factory is None else neuron_factory
        if not callable(getattr(self.neuron_factory, "create", None)):
            raise TypeError(f"neuron_factory must have a create(scale) method, but got {neuron_factory!r}.")
        self.threshold_optimizer = (
            ThresholdOptimizer() if threshold_optimizer is None else threshold_optimizer
        )
        if not callable(getattr(self.threshold_optimizer, "compute_threshold", None)):
            raise TypeError(
                f"threshold_optimizer must have a compute_threshold(hook) method, but got {threshold_optimizer!r}."
            )
        if hook_factory is not None and not callable(getattr(hook_factory, "create", None)):
            raise TypeError(f"hook_factory must have a create() method, but got {hook_factory!r}.")
        self.hook_factory = hook_factory
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool, but got {progress!r}.")
        self.progress = progress
        if num_batches is not None and (
            isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
        ):
            raise ValueError(f"num_batches must be a positive int or None, but got {num_batches!r}.")
        self.num_batches = num_batches
        self.last_report: ConversionReport | None = None

    def _check_mode(self) -> None:
        """Raise ``NotImplementedError`` unless ``self.mode`` is ``"max"`` (any case), ``"p%"`` with p in
        [0, 100], or a number in (0, 1]."""
        if not _mode_is_valid(self.mode):
            raise NotImplementedError(_MODE_ERROR)

    # ------------------------------------------------------------------ batches
    @staticmethod
    def _extract_batch_input(data: Any) -> Any:
        """The model input of one batch: a tensor as is, element 0 of a tuple/list, a known key of a dict."""
        if isinstance(data, torch.Tensor):
            return data
        if isinstance(data, (list, tuple)):
            if len(data) == 0:
                raise ValueError("Batch data is an empty list or tuple.")
            first = data[0]
            return Converter._extract_batch_input(first) if isinstance(first, (list, tuple, dict)) else first
        if isinstance(data, dict):
            if len(data) == 0:
                raise ValueError("Batch data is an empty dictionary.")
            for key in _INPUT_KEYS:
                if key in data:
                    return data[key]
            if len(data) == 1:
                return next(iter(data.values()))
            raise ValueError(
                f"Batch data is a dictionary with keys {sorted(map(str, data))} and none of the input keys "
                f"{_INPUT_KEYS}; cannot tell which entry is the model input. Yield the input tensor, an "
                "(input, label) tuple, or a dict with one of those keys."
            )
        return data

    @staticmethod
    def _to_model(x: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        if x.is_floating_point() and dtype is not None:
            return x.to(device=device, dtype=dtype)
        return x.to(device=device)

    def _resolve_device(self, model: nn.Module) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        tensor = _first_tensor(model)
        return tensor.device if tensor is not None else torch.device("cpu")

    # ------------------------------------------------------------------ conversion
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
                and positive (the message names the layer).
            ann2snn_fx.ModelTraceError: when the model cannot be traced (the message says what to do).
        """
        if not isinstance(ann, nn.Module):
            raise TypeError(f"ann must be an nn.Module, but got {type(ann).__name__}.")
        if not isinstance(calibrate, bool):
            raise TypeError(f"calibrate must be a bool, but got {calibrate!r}.")
        start = time.perf_counter()
        device = self._resolve_device(ann)
        reference = _first_tensor(ann, floating=True)
        dtype = reference.dtype if reference is not None else None
        model = copy.deepcopy(ann).eval()
        gm = trace_model(model, tracer=tracer, concrete_args=concrete_args, leaf_modules=leaf_modules)
        # String (PEP 563) annotations in the generated code would make torch.save fail (also for a
        # GraphModule input, traced from such a model).
        _resolve_string_annotations(gm, type(model).forward)
        gm = gm.to(device).eval()
        gm = Converter.fuse(gm, self.fuse_flag)
        modules = dict(gm.named_modules())
        activations = {n.name: describe(n, modules) for n in gm.graph.nodes if is_activation(n, modules)}
        if calibrate and self.dataloader is None and not _qcfs_only(gm):
            raise ValueError(
                "dataloader is None, but the model has activations other than QCFS "
                f"({', '.join(activations) or 'none converted'}): only a model whose every activation is a QCFS "
                "(ann2snn_fx.prepare_qcfs) converts without calibration data; pass calibration batches."
            )
        gm = Converter.set_voltagehook(
            gm, mode=self.mode, momentum=self.momentum, rules=self.rules, hook_factory=self._hook_factory()
        )
        gm = gm.to(device)
        if calibrate and self.dataloader is not None:
            self._calibrate(gm, device, dtype)
            optimizer = self.threshold_optimizer
        else:
            optimizer = _UnitThreshold()
        replaced = _replace(gm, self.rules, self.neuron_factory, optimizer)
        _remove_leftover_hooks(gm)
        if dtype is not None:
            for module in gm.modules():
                if (
                    isinstance(module, VoltageScaler)
                    and module.scale.dim() > 0
                    and module.scale.is_floating_point()
                ):
                    module.scale = module.scale.to(dtype)
        gm = gm.to(device)
        gm.eval()
        report = self._report(gm, activations, replaced)
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

    def _calibrate(self, gm: fx.GraphModule, device: torch.device, dtype: torch.dtype | None) -> None:
        hooks = [m for m in gm.modules() if isinstance(m, VoltageHook)]
        for hook in hooks:
            hook.train()  # observers record in training mode; the rest of the model stays in eval
        assert self.dataloader is not None
        batches: Iterable[Any] = self.dataloader
        total = None
        if self.num_batches is not None:
            batches = itertools.islice(batches, self.num_batches)
        try:
            total = len(self.dataloader)  # type: ignore[arg-type]
            if self.num_batches is not None:
                total = min(total, self.num_batches)
        except TypeError:
            total = self.num_batches
        seen = 0
        bar = tqdm(batches, total=total, desc="calibrating", disable=not self.progress, leave=False)
        try:
            with torch.no_grad():
                for data in bar:
                    gm(self._to_model(self._extract_batch_input(data), device, dtype))
                    seen += 1
        finally:
            bar.close()
            for hook in hooks:
                hook.eval()
        if seen == 0:
            raise ValueError(
                "The calibration dataloader yielded no batch; calibration needs data (for a conversion "
                "without data, to load a saved state_dict into, use convert_to_spiking_neurons(ann, "
                "calibrate=False))."
            )
        consumers = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
        for name, module in gm.named_modules():
            if isinstance(module, VoltageHook) and _hook_count(module) == 0:
                node = consumers.get(name)
                source = node.args[0].name if node is not None and node.args else "?"
                raise ValueError(
                    f"The calibration hook {name!r} (after activation {source!r}) saw no data: that activation "
                    "was never executed on the calibration batches (a branch that the inputs do not take?)."
                )

    def _report(
        self, gm: fx.GraphModule, activations: dict[str, str], replaced: list[tuple[str, str, str, str]]
    ) -> ConversionReport:
        blocks = gm.meta.get(BLOCKS_META_KEY, {})
        converted = []
        for node_name, kind, rule_name, hook_target in replaced:
            block, threshold = blocks.get(hook_target, (None, None))
            if isinstance(threshold, torch.Tensor):
                threshold = tuple(float(v) for v in threshold.flatten())
            converted.append(
                ConvertedActivation(node_name, activations.get(node_name, kind), rule_name, block, threshold)
            )
        modules = dict(gm.named_modules())
        rule_types = {type(rule) for rule in self.rules}
        left = []
        for node in gm.graph.nodes:
            if not is_activation(node, modules):
                continue
            left.append(
                LeftActivation(node.name, describe(node, modules), self._why_left(node, modules, rule_types))
            )
        for node in gm.graph.nodes:
            if node.op != "call_module" or is_activation(node, modules):
                continue
            module = modules.get(node.target)
            hidden = [
                f"{node.target}.{name}"
                for name, sub in (module.named_modules() if module is not None else [])
                if name
                if isinstance(sub, (nn.ReLU, nn.ReLU6, nn.Hardtanh))
            ]
            if hidden:
                left.append(
                    LeftActivation(
                        str(node.target),
                        f"untraced module {type(module).__name__} {node.target!r}",
                        f"it is a leaf module (not traced), so the activations inside it ({', '.join(hidden)}) "
                        "stay ANN operations",
                    )
                )
        report = ConversionReport(converted=converted, left=left)
        if not converted:
            warnings.warn(
                "No activation was converted to spiking neurons: the result is still an ANN. "
                + (f"Left: {_summary(left)}." if left else "The model has no ReLU-type activation.")
                + " Rules in use: "
                + ", ".join(type(rule).__name__ for rule in self.rules)
                + "; ann2snn_fx.all_rules() also converts F.relu, torch.relu, Tensor.relu, ReLU6, Hardtanh(0, c) "
                "and clamp(x, 0, c).",
                UserWarning,
                stacklevel=3,
            )
        elif left:
            warnings.warn(
                f"{len(left)} activation(s) stayed ANN operations: {_summary(left)}. See the model's "
                "conversion_report for details.",
                UserWarning,
                stacklevel=3,
            )
        return report

    @staticmethod
    def _why_left(node: fx.Node, modules: dict[str, nn.Module], rule_types: set[type]) -> str:
        for rule in all_rules():
            ops = ("call_module", *getattr(rule, "node_ops", ()))
            if node.op in ops and rule.match(node, modules) and type(rule) not in rule_types:
                return (
                    f"no rule in Converter.rules matches it; add {type(rule).__name__}() to rules= "
                    "(ann2snn_fx.all_rules() gives every built-in rule)"
                )
        rejection = clip_rejection(node, modules)
        if rejection is not None:
            return f"not a clipped ReLU: {rejection}"
        module = modules.get(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]
        if isinstance(module, nn.ReLU) and type(module) is not nn.ReLU:
            return "a subclass of nn.ReLU; the built-in rules match exact types (write a rule for it)"
        return "not a ReLU-type activation: an integrate-and-fire neuron only represents max(0, x) (clipped)"

    # ------------------------------------------------------------------ graph passes
    @staticmethod
    def fuse(fx_model: fx.GraphModule, fuse_flag: bool = True) -> fx.GraphModule:
        """Fuse each ``ConvNd -> BatchNormNd`` pair (exact types, conv with one user) into one conv.

        Args:
            fx_model: The traced model; mutated and returned.
            fuse_flag: ``False`` returns ``fx_model`` untouched.

        Returns:
            ``fx_model`` with the BatchNorms folded into the convolutions.

        Raises:
            ValueError: if a BatchNorm to fuse is in training mode or has no running statistics.
        """
        if not fuse_flag:
            return fx_model
        modules = dict(fx_model.named_modules())
        for conv_type, bn_type in _FUSE_PATTERNS:
            for node in list(fx_model.graph.nodes):
                if node.op != "call_module" or not isinstance(node.target, str):
                    continue
                bn = modules.get(node.target)
                if type(bn) is not bn_type or not node.args or not isinstance(node.args[0], fx.Node):
                    continue
                conv_node = node.args[0]
                if conv_node.op != "call_module" or not isinstance(conv_node.target, str):
                    continue
                conv = modules.get(conv_node.target)
                if type(conv) is not conv_type or len(conv_node.users) > 1:
                    continue
                assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
                assert isinstance(conv, nn.modules.conv._ConvNd)
                if bn.training or conv.training:
                    raise ValueError(
                        f"Conv+BatchNorm fusion uses the BatchNorm's running statistics, valid in eval mode only, "
                        f"but {node.target!r} or {conv_node.target!r} is in training mode; call fx_model.eval() first."
                    )
                if bn.running_mean is None or bn.running_var is None:
                    raise ValueError(
                        f"Cannot fuse {node.target!r}: the BatchNorm has no running statistics "
                        "(track_running_stats=False); convert with fuse_flag=False."
                    )
                fused = fuse_conv_bn_eval(conv, bn)
                parent_name, _, leaf = conv_node.target.rpartition(".")
                parent = fx_model.get_submodule(parent_name) if parent_name else fx_model
                setattr(parent, leaf, fused)
                modules[conv_node.target] = fused
                node.replace_all_uses_with(conv_node)
                fx_model.graph.erase_node(node)
        fx_model.graph.lint()
        fx_model.delete_all_unused_submodules()
        fx_model.recompile()
        return fx_model

    @staticmethod
    def set_voltagehook(
        fx_model: fx.GraphModule,
        mode: str | float = "Max",
        momentum: float | None = 0.1,
        rules: list[Any] | None = None,
        *,
        hook_factory: Any = None,
    ) -> fx.GraphModule:
        """Insert a calibration hook behind every activation matched by ``rules`` (default ``[ReLURule()]``).

        Each ``call_module`` node is offered to the rules in order (rules that list ``"call_function"`` /
        ``"call_method"`` in their ``node_ops`` are also offered those nodes); the first match inserts
        ``<parent>.voltage_hook_<k>``.

        Args:
            fx_model: The traced model; mutated and returned.
            mode: Calibration mode of the hooks.
            momentum: EMA momentum of the hooks.
            rules: The activation rules.
            hook_factory: Builds the hooks (default ``HookFactory(mode, momentum)``).

        Returns:
            ``fx_model`` with hooks.
        """
        factory = HookFactory(mode, momentum) if hook_factory is None else hook_factory
        counts: dict[str, int] = {}
        modules = dict(fx_model.named_modules())
        active_rules = [ReLURule()] if rules is None else rules
        for node in list(fx_model.graph.nodes):
            is_module = node.op == "call_module" and isinstance(node.target, str) and node.target in modules
            for rule in active_rules:
                offered = is_module or node.op in getattr(rule, "node_ops", ())
                if (
                    offered
                    and node.op in ("call_module", "call_function", "call_method")
                    and rule.match(node, modules)
                ):
                    rule.insert_hooks(fx_model, node, factory, counts)
                    modules = dict(fx_model.named_modules())
                    break
        fx_model.graph.lint()
        fx_model.recompile()
        return fx_model

    def replace_by_neurons(self, fx_model: fx.GraphModule) -> fx.GraphModule:
        """Replace every hooked activation matched by ``self.rules`` by a spiking block.

        Each pair becomes ``VoltageScaler(theta / s) -> neuron -> VoltageScaler(s)`` with ``s`` from
        ``self.threshold_optimizer`` and the neuron from ``self.neuron_factory``.

        Args:
            fx_model: A GraphModule with calibrated hooks; mutated and returned.

        Returns:
            ``fx_model`` with spiking blocks.
        """
        _replace(fx_model, self.rules, self.neuron_factory, self.threshold_optimizer)
        return fx_model

    @staticmethod
    def replace_by_ifnode(fx_model: fx.GraphModule) -> fx.GraphModule:
        """Deprecated: :meth:`replace_by_neurons` with the default rule, neuron factory and optimizer."""
        warnings.warn(
            "replace_by_ifnode is deprecated, use replace_by_neurons instead.",
            DeprecationWarning,
            stacklevel=2,
        )
        _replace(fx_model, [ReLURule()], NeuronFactory(), ThresholdOptimizer())
        return fx_model

    def replace_by_td_operators(self, ann: nn.Module, **options: Any) -> fx.GraphModule:
        """Replace Linear/LayerNorm/GELU/SDPA/MHA by their temporal-difference operators (no calibration).

        Delegates to :func:`ann2snn_fx.td.replace_by_td_operators` with this converter's ``device``;
        keyword ``options`` (e.g. ``strict=True``) are passed through.
        """
        from ann2snn_fx.td import replace_by_td_operators

        return replace_by_td_operators(ann, device=self.device, **options)

    def __repr__(self) -> str:
        return (
            f"Converter(mode={self.mode!r}, momentum={self.momentum}, fuse_flag={self.fuse_flag}, "
            f"rules={[type(r).__name__ for r in self.rules]}, neuron_factory={self.neuron_factory!r}, "
            f"threshold_optimizer={self.threshold_optimizer!r})"
        )


def _default_rules() -> list[Any]:
    from ann2snn_fx.relu.qcfs import QCFSRule

    return [ReLURule(), QCFSRule()]


def _qcfs_only(gm: fx.GraphModule) -> bool:
    from ann2snn_fx.relu.qcfs import data_free

    return data_free(gm)


def _hook_count(hook: nn.Module) -> int:
    count = getattr(hook, "num_batches_tracked", 1)
    return int(count.item() if isinstance(count, torch.Tensor) else count)


def _summary(left: list[LeftActivation], limit: int = 6) -> str:
    text = "; ".join(f"{item.node} ({item.kind}: {item.reason})" for item in left[:limit])
    return text + (f"; and {len(left) - limit} more" if len(left) > limit else "")


def _replace(
    fx_model: fx.GraphModule, rules: list[ActivationRule], neuron_factory: Any, threshold_optimizer: Any
) -> list[tuple[str, str, str, str]]:
    """The replacement pass; returns ``(activation node, kind, rule class, hook target)`` per replaced pair."""
    replaced_hooks: set[Any] = set()
    replaced_activations: set[Any] = set()
    done: list[tuple[str, str, str, str]] = []
    for rule in rules:
        modules = dict(fx_model.named_modules())
        for activation, hook in list(rule.find_replacements(fx_model, modules)):
            if hook in replaced_hooks or activation in replaced_activations:
                continue
            replaced_hooks.add(hook)
            replaced_activations.add(activation)
            kind = describe(activation, modules) if isinstance(activation, fx.Node) else repr(activation)
            name = getattr(activation, "name", repr(activation))
            target = str(getattr(hook, "target", ""))
            rule.replace_with_neurons(fx_model, activation, hook, neuron_factory, threshold_optimizer)
            done.append((name, kind, type(rule).__name__, target))
    fx_model.graph.lint()
    fx_model.delete_all_unused_submodules()
    fx_model.recompile()
    return done


def _remove_leftover_hooks(fx_model: fx.GraphModule) -> None:
    """Drop hooks no rule replaced (they are identities): the SNN must not keep calibrating."""
    modules = dict(fx_model.named_modules())
    changed = False
    for node in list(fx_model.graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(node.target), VoltageHook) and node.args:
            node.replace_all_uses_with(node.args[0])
            fx_model.graph.erase_node(node)
            changed = True
    if changed:
        fx_model.graph.lint()
        fx_model.delete_all_unused_submodules()
        fx_model.recompile()

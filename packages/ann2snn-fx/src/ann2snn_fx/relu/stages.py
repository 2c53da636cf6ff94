"""The stages of the ReLU -> IF conversion, in the order :class:`~ann2snn_fx.relu.converter.Converter` runs them.

``trace -> fuse -> observe -> calibrate -> choose_thresholds -> replace -> (remove_leftover_hooks,
cast_scales) -> report`` (the last in :mod:`ann2snn_fx.relu.report`). Each is a function of the graph
module and plain arguments, usable and testable alone.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from tqdm.auto import tqdm

from ann2snn_calib import VoltageHook, VoltageScaler
from ann2snn_fx.relu.factories import HookFactory
from ann2snn_fx.relu.rules import ActivationRule, ReLURule, describe
from ann2snn_fx.tracing import _resolve_string_annotations, trace_model

__all__ = [
    "UnitThreshold",
    "batch_input",
    "calibrate",
    "cast_scales",
    "choose_thresholds",
    "first_tensor",
    "fuse",
    "observe",
    "remove_leftover_hooks",
    "replace",
    "resolve_device",
    "to_model",
    "trace",
]

INPUT_KEYS = ("input", "image", "img", "x", "data", "pixel_values")
_FUSE_PATTERNS = (
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv3d, nn.BatchNorm3d),
)


def first_tensor(model: nn.Module, floating: bool = False) -> torch.Tensor | None:
    """The first parameter or buffer of ``model`` (a floating one if ``floating``)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if not floating or tensor.is_floating_point():
            return tensor
    return None


def resolve_device(device: torch.device | str | None, model: nn.Module) -> torch.device:
    """``device``, else the model's own device, else CPU."""
    if device is not None:
        return torch.device(device)
    tensor = first_tensor(model)
    return tensor.device if tensor is not None else torch.device("cpu")


# ---- 1. trace ------------------------------------------------------------------------------
def trace(
    ann: nn.Module,
    device: torch.device,
    *,
    tracer: fx.Tracer | type[fx.Tracer] | None = None,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Iterable[Any] | None = None,
) -> fx.GraphModule:
    """A traced deep copy of ``ann`` in eval mode on ``device`` (``ann`` itself is not touched)."""
    model = copy.deepcopy(ann).eval()
    gm = trace_model(model, tracer=tracer, concrete_args=concrete_args, leaf_modules=leaf_modules)
    # String (PEP 563) annotations in the generated code would make torch.save fail (also for a
    # GraphModule input, traced from such a model).
    _resolve_string_annotations(gm, type(model).forward)
    return gm.to(device).eval()


# ---- 2. fuse -------------------------------------------------------------------------------
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


# ---- 3. observe ----------------------------------------------------------------------------
def observe(
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


# ---- 4. calibrate --------------------------------------------------------------------------
def batch_input(data: Any) -> Any:
    """The model input of one batch: a tensor as is, element 0 of a tuple/list, a known key of a dict."""
    if isinstance(data, torch.Tensor):
        return data
    if isinstance(data, (list, tuple)):
        if len(data) == 0:
            raise ValueError("Batch data is an empty list or tuple.")
        first = data[0]
        return batch_input(first) if isinstance(first, (list, tuple, dict)) else first
    if isinstance(data, dict):
        if len(data) == 0:
            raise ValueError("Batch data is an empty dictionary.")
        for key in INPUT_KEYS:
            if key in data:
                return data[key]
        if len(data) == 1:
            return next(iter(data.values()))
        raise ValueError(
            f"Batch data is a dictionary with keys {sorted(map(str, data))} and none of the input keys "
            f"{INPUT_KEYS}; cannot tell which entry is the model input. Yield the input tensor, an "
            "(input, label) tuple, or a dict with one of those keys."
        )
    return data


def to_model(x: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """``x`` as a tensor on ``device`` (floating tensors cast to ``dtype``)."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.is_floating_point() and dtype is not None:
        return x.to(device=device, dtype=dtype)
    return x.to(device=device)


def hook_count(hook: nn.Module) -> int:
    """How many batches a hook has seen."""
    count = getattr(hook, "num_batches_tracked", 1)
    return int(count.item() if isinstance(count, torch.Tensor) else count)


def calibrate(
    gm: fx.GraphModule,
    dataloader: Iterable[Any],
    device: torch.device,
    dtype: torch.dtype | None,
    *,
    num_batches: int | None = None,
    progress: bool = False,
) -> None:
    """Run the calibration batches through ``gm``'s hooks; raise ``ValueError`` if a hook saw nothing."""
    hooks = [m for m in gm.modules() if isinstance(m, VoltageHook)]
    for hook in hooks:
        hook.train()  # observers record in training mode; the rest of the model stays in eval
    batches: Iterable[Any] = dataloader
    total = None
    if num_batches is not None:
        batches = itertools.islice(batches, num_batches)
    try:
        total = len(dataloader)  # type: ignore[arg-type]
        if num_batches is not None:
            total = min(total, num_batches)
    except TypeError:
        total = num_batches
    seen = 0
    bar = tqdm(batches, total=total, desc="calibrating", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for data in bar:
                gm(to_model(batch_input(data), device, dtype))
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
        if isinstance(module, VoltageHook) and hook_count(module) == 0:
            node = consumers.get(name)
            source = node.args[0].name if node is not None and node.args else "?"
            raise ValueError(
                f"The calibration hook {name!r} (after activation {source!r}) saw no data: that activation "
                "was never executed on the calibration batches (a branch that the inputs do not take?)."
            )


# ---- 5. choose thresholds ------------------------------------------------------------------
class UnitThreshold:
    """Threshold placeholder for a skeleton conversion (``calibrate=False``): every layer gets 1.0."""

    def compute_threshold(self, hook: Any) -> float:
        return 1.0


def choose_thresholds(threshold_optimizer: Any, calibrated: bool) -> Any:
    """The object that gives each layer its threshold: the optimizer, or 1.0 everywhere without data."""
    return threshold_optimizer if calibrated else UnitThreshold()


# ---- 6. replace ----------------------------------------------------------------------------
def replace(
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


def remove_leftover_hooks(fx_model: fx.GraphModule) -> None:
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


def cast_scales(gm: fx.GraphModule, dtype: torch.dtype | None) -> None:
    """Per-channel scaler tensors in the model's floating dtype."""
    if dtype is None:
        return
    for module in gm.modules():
        if isinstance(module, VoltageScaler) and module.scale.dim() > 0 and module.scale.is_floating_point():
            module.scale = module.scale.to(dtype)

"""Argument checks of :class:`~ann2snn_fx.relu.converter.Converter`, raised before any work starts."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_callable", "check_converter_options", "check_mode", "mode_is_valid"]

MODE_ERROR = "You have used a non-defined VoltageScale Method."
RULE_METHODS = ("match", "insert_hooks", "find_replacements", "replace_with_neurons")


def mode_is_valid(mode: Any) -> bool:
    """``"max"`` (any case), ``"p%"`` with p in [0, 100], or a number in (0, 1]."""
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


def check_mode(mode: Any) -> None:
    """Raise ``NotImplementedError`` (the seed's message) unless :func:`mode_is_valid`."""
    if not mode_is_valid(mode):
        raise NotImplementedError(MODE_ERROR)


def check_callable(name: str, value: Any, method: str, signature: str) -> None:
    """Raise ``TypeError`` unless ``value`` has a callable ``method``."""
    if not callable(getattr(value, method, None)):
        raise TypeError(f"{name} must have a {signature} method, but got {value!r}.")


def check_converter_options(
    *,
    momentum: Any,
    rules: list[Any],
    neuron_factory: Any,
    threshold_optimizer: Any,
    hook_factory: Any,
    progress: Any,
    num_batches: Any,
) -> None:
    """Every check of ``Converter.__init__`` but the mode's, in the order the seed raised them."""
    if momentum is not None and (
        isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0
    ):
        raise ValueError(f"momentum must be a number in [0, 1] or None, but got {momentum!r}.")
    for rule in rules:
        missing = [name for name in RULE_METHODS if not callable(getattr(rule, name, None))]
        if missing:
            raise TypeError(
                f"rule {rule!r} does not implement the ActivationRule protocol: missing {', '.join(missing)}."
            )
    check_callable("neuron_factory", neuron_factory, "create", "create(scale)")
    check_callable("threshold_optimizer", threshold_optimizer, "compute_threshold", "compute_threshold(hook)")
    if hook_factory is not None:
        check_callable("hook_factory", hook_factory, "create", "create()")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, but got {progress!r}.")
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"num_batches must be a positive int or None, but got {num_batches!r}.")

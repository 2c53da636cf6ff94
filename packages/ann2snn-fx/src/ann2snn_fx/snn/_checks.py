"""Argument checks of the IF neuron, separate from its dynamics (:mod:`ann2snn_fx.snn.dynamics`)."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["STEP_MODES", "check_neuron_options", "check_potential"]

STEP_MODES = ("s", "m")


def check_potential(name: str, value: Any, *, positive: bool) -> float | torch.Tensor:
    """Validate a threshold/reset/initial potential: int, float or a 0-dim real tensor."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, a float or a 0-dim tensor, but got a bool ({value!r}).")
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or (
            not value.is_floating_point() and value.dtype not in (torch.int32, torch.int64)
        ):
            raise TypeError(
                f"{name} must be an int, a float or a 0-dim real tensor, but got a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}."
            )
        number = float(value.item())
    elif isinstance(value, (int, float)):
        number = float(value)
    else:
        raise TypeError(f"{name} must be an int, a float or a 0-dim tensor, but got {type(value).__name__}.")
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, but got {number}.")
    if positive and number <= 0:
        raise ValueError(f"{name} must be positive, but got {number}.")
    return number


def check_neuron_options(
    *,
    detach_reset: Any,
    step_mode: Any,
    backend: Any,
    store_v_seq: Any,
    surrogate_function: Any,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument for an invalid IFNode option."""
    if not isinstance(detach_reset, bool):
        raise TypeError(f"detach_reset must be a bool, but got {detach_reset!r}.")
    if step_mode not in STEP_MODES:
        raise ValueError(f"step_mode must be 's' or 'm', but got {step_mode!r}.")
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' (the only backend), but got {backend!r}.")
    if not isinstance(store_v_seq, bool):
        raise TypeError(f"store_v_seq must be a bool, but got {store_v_seq!r}.")
    if surrogate_function is not None and not callable(surrogate_function):
        raise TypeError(f"surrogate_function must be callable, but got {type(surrogate_function).__name__}.")

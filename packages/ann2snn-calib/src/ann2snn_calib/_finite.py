"""NaN/inf in calibration data (SPEC 13.4): one error, raised at once, on every rank of a process group.

The max statistics detect non-finite values inside their own reduction (``torch.aminmax``: one pass);
the percentile statistics run one ``torch.aminmax`` first (NaN propagates through it; it costs about a
third of ``x.max()`` and much less than ``torch.isfinite(x).all()``, which builds a bool copy).
In a process group the verdict is reduced with the statistic (or with one small all-reduce), so every
rank raises together instead of one rank raising while the others wait in a collective.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["NonFiniteError", "check_all_finite", "describe_nonfinite", "flag_nonfinite"]


class NonFiniteError(ValueError):
    """Calibration data holds NaN or inf. ``hook`` is the observer that saw it (None if unknown).

    Examples:
        >>> import torch
        >>> from ann2snn_calib import VoltageHook
        >>> VoltageHook()(torch.tensor([1.0, float("nan")]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ann2snn_calib.NonFiniteError: VoltageHook(mode='Max') received NaN/inf activations: ...
    """

    __module__ = "ann2snn_calib"

    def __init__(self, message: str, hook: Any = None) -> None:
        super().__init__(message)
        self.hook = hook


def describe_nonfinite(hook: Any, x: Tensor) -> NonFiniteError:
    """The error for ``x`` (counts of NaN, +inf and -inf on this rank; none where another rank had them)."""
    nan = int(torch.isnan(x).sum()) if x.is_floating_point() else 0
    pos = int(torch.isposinf(x).sum()) if x.is_floating_point() else 0
    neg = int(torch.isneginf(x).sum()) if x.is_floating_point() else 0
    where = (
        f"{nan} NaN, {pos} +inf, {neg} -inf among {x.numel()} values of shape {tuple(x.shape)}, dtype {x.dtype}"
        if nan + pos + neg
        else "on another rank of the process group (none in this rank's input)"
    )
    return NonFiniteError(
        f"VoltageHook(mode={hook.mode!r}) received NaN/inf activations: {where}. A calibration statistic "
        "of non-finite data has no meaning; check the inputs (normalisation, missing values) and the model "
        "(overflow in float16) before calibrating.",
        hook,
    )


def check_all_finite(hook: Any, x: Tensor, group: Any) -> None:
    """Raise :func:`describe_nonfinite`'s error unless every element of ``x`` (on every rank) is finite."""
    if not x.is_floating_point() or (x.numel() == 0 and group is None):
        return
    if x.numel():
        low, high = torch.aminmax(x)  # NaN propagates: one pass, no (N,) bool temporary as isfinite(x) makes
        if group is None and x.device.type == "cpu":
            if not (math.isfinite(low.item()) and math.isfinite(high.item())):
                raise describe_nonfinite(hook, x)
            return
        bad = ~(torch.isfinite(low) & torch.isfinite(high))
    else:
        bad = torch.tensor(False, device=x.device)
    if group is not None:
        flag = bad.to(torch.int64).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        bad = flag[0] > 0
    if bool(bad):
        raise describe_nonfinite(hook, x)


def flag_nonfinite(hook: Any, x: Tensor, local: Tensor, low: Tensor, high: Tensor, group: Any) -> Tensor:
    """``local``, or raise at once on the CPU without a group; else NaN/-inf marked as +inf (checked later).

    Marked, the verdict travels with the MAX all-reduce to every rank, and an accelerator checks it with
    the single host sync after the reduction.
    """
    if group is None and x.device.type == "cpu":
        # Python floats: a few torch.isfinite calls on 0-dim tensors would cost more than the maximum
        if not all(math.isfinite(v) for t in (low, high) for v in t.reshape(-1).tolist()):
            raise describe_nonfinite(hook, x)
        return local
    finite = torch.isfinite(low).all() & torch.isfinite(high).all()
    return torch.where(finite, local, float("inf"))


# NonFiniteError says it lives in ann2snn_calib, so doctest.testmod of this module finds it only here.
__test__ = {"NonFiniteError": NonFiniteError}

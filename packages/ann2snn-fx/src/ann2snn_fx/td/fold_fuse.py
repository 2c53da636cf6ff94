"""Per-module dispatch cache of :class:`~ann2snn_fx.td.fold.TDTimeFolded`: a leaf module run as one TD function.

A leaf module (no submodules: an RMS norm, a composed GELU) costs the fold mode one dispatch per op and one
running sum and difference per nonlinearity inside it. Its first call with given input metadata runs op by
op under the mode, which checks every op; if that call was clean (only ops the mode converts exactly or
passes through, at least one TD nonlinearity, one time-varying input and output, nothing reported, no
in-place op, no attribute of the module rebound), later calls with the same metadata run the module's own
forward once on the running sum of the input and difference the result: ``diff(forward(cumsum(x)))``, the
TD form of any per-sample function, without the mode (the report counts the ops of the checked call
again, so it reads the same). The metadata key: shape, dtype, device and ``requires_grad`` of the input,
whether autograd records, the number of steps, the module's training flag.
"""

from __future__ import annotations

import contextvars
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ann2snn_fx.td.fold_handlers import Tensor
from ann2snn_ops import running_sum

if TYPE_CHECKING:
    from ann2snn_fx.td.fold_mode import _FoldMode

# The fold mode running the current forward (set by the mode itself on entry).
ACTIVE: contextvars.ContextVar[_FoldMode | None] = contextvars.ContextVar("td_fold_active", default=None)

# Verdicts kept per module (one per input metadata key), the oldest dropped first.
_PLANS = 64

# Functions that take an ``inplace`` flag (positional or keyword): in place they write back into the input,
# which the fused call (on a running sum) would not do.
_INPLACE_FLAG = {
    F.relu,
    F.relu6,
    F.elu,
    F.selu,
    F.celu,
    F.leaky_relu,
    F.hardtanh,
    F.hardswish,
    F.hardsigmoid,
    F.silu,
    F.mish,
    F.threshold,
    F.dropout,
}


_IN_PLACE_DUNDERS = {
    f"__i{op}__"
    for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor")
} | {"__ilshift__", "__irshift__", "__setitem__"}


def _in_place(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call writes into an argument (``add_``, ``x += y``, ``F.relu(x, inplace=True)``, ``out=``)."""
    name = getattr(func, "__name__", "")
    if (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS:
        return True
    if "out" in kwargs or kwargs.get("inplace") is True:
        return True
    return func in _INPLACE_FLAG and any(a is True for a in args[1:])


class _Watch:
    """What the fold mode saw during a module's checked call."""

    def __init__(self) -> None:
        self.ops = 0
        self.clean = True

    def saw(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], handled: bool) -> None:
        self.ops += 1
        if not handled or _in_place(func, args, kwargs):
            self.clean = False


class _FusedForward:
    """Installed as a leaf module's ``forward``: the checked call, then the fused one (see the module doc)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.plans: dict[tuple[Any, ...], Counter[tuple[str, str]] | None] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        forward = type(module).forward
        mode = ACTIVE.get()
        if mode is None or not mode.fuse_leaves or len(args) != 1 or kwargs or mode.watch is not None:
            return forward(module, *args, **kwargs)
        x = args[0]
        if not mode.is_time(x) or mode.batch_dim(x) != 0 or x.dtype not in (torch.float32, torch.float64):
            return forward(module, x)
        if torch._C._len_torch_function_stack() != 1:
            return forward(module, x)  # another mode watches the ops (an op count): keep them visible
        key = (
            tuple(x.shape),
            x.dtype,
            x.device,
            x.requires_grad,
            torch.is_grad_enabled(),
            mode.steps,
            module.training,
        )
        if key not in self.plans:
            return self._checked(mode, key, forward, x)
        plan = self.plans[key]
        if plan is None:
            return forward(module, x)
        with torch._C.DisableTorchFunction():
            out = _fused(mode.steps, forward, module, x)
        mode.converted.update(plan)
        return mode.mark(out)

    def _checked(self, mode: _FoldMode, key: tuple[Any, ...], forward: Any, x: Tensor) -> Any:
        """The first call with ``key``: op by op under the mode, watched; decides whether later calls fuse."""
        module = self.module
        issues, converted = sum(mode.issues.values()), Counter(mode.converted)
        attributes = {name: id(value) for name, value in vars(module).items()}
        watch = mode.watch = _Watch()
        try:
            out = forward(module, x)
        finally:
            mode.watch = None
        delta = mode.converted - converted
        if watch.ops < 2 or not any(detail.startswith("-> TD") for _, detail in delta):
            # nothing to fuse (a linear layer, a single activation): back to the module's own forward
            if vars(module).get("forward") is self:
                del module.forward
            return out
        fusable = (
            watch.clean
            and sum(mode.issues.values()) == issues
            and not any("explicit leading size" in detail for _, detail in delta)
            and isinstance(out, Tensor)
            and mode.batch_dim(out) == 0
            and out.shape[0] == x.shape[0]
            and out.dtype == x.dtype
            and {name: id(value) for name, value in vars(module).items()} == attributes
        )
        if len(self.plans) >= _PLANS:  # inputs of ever new shapes: forget the oldest verdict
            del self.plans[next(iter(self.plans))]
        self.plans[key] = delta if fusable else None
        return out


def _fused(steps: int, forward: Any, module: nn.Module, x: Tensor) -> Tensor:
    """``diff(forward(cumsum(x)))`` on the unfolded steps (torch function disabled)."""
    seq = x.unflatten(0, (steps, -1))
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))
    cum = torch.cumsum(seq, 0) if grad else running_sum(seq)
    y = forward(module, cum.flatten(0, 1)).unflatten(0, (steps, -1))
    if steps == 1:
        return y.flatten(0, 1)
    if grad:
        return torch.cat([y[:1], y[1:] - y[:-1]]).flatten(0, 1)
    out = y.clone()
    out[1:].sub_(y[:-1])
    return out.flatten(0, 1)


def install_fused_forwards(model: nn.Module, skip: tuple[type, ...] = ()) -> None:
    """Give every leaf module of ``model`` the fused forward, except inside modules of the types in ``skip``
    (the folded attention, which runs its TD operator without the mode)."""
    skipped = {id(m) for outer in model.modules() if isinstance(outer, skip) for m in outer.modules()}
    for module in model.modules():
        # (a forward the user set on the instance stays theirs)
        leaf = next(module.children(), None) is None
        if leaf and id(module) not in skipped and "forward" not in vars(module):
            module.forward = _FusedForward(module)  # type: ignore[method-assign]

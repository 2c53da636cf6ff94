"""The shape probe of :class:`~ann2snn_fx.td.fold.TDTimeFolded`: literal batch sizes that fold silently.

The folded forward sees ``[T*B, ...]`` tensors where the model's code expects ``[B, ...]``. A reshape sized
from the tensor (``x.view(x.shape[0], -1)``) follows; one with a literal batch size beside ``-1``
(``x.view(2, -1)`` with ``B = 2``) does not, and where ``T`` divides the literal its result still has a
leading dim the time steps divide, so nothing at dispatch time tells it from a legal reshape: the steps
mix silently. The probe tells them apart by comparison: the same forward on one step's batch (``T = 1``,
the ANN itself) and on the folded batch, recorded op by op; a folded output must be the reference's with
its batch dim scaled by ``T`` (or unchanged: parameters, constants). The first op whose inputs agree and
whose output does not is reported (unless the fold mode reported it already). It runs on a forward's first call per input signature only.
"""

from __future__ import annotations

from typing import Any

from ann2snn_fx.td.fold_handlers import Tensor, _leaves, _name
from ann2snn_fx.td.fold_mode import _FoldMode
from ann2snn_fx.td.fold_table import _META

_Shapes = list[tuple[tuple[int, ...], int | None]]


class _RecordingMode(_FoldMode):
    """A :class:`_FoldMode` that also records, per dispatched op, the shapes of its tensor inputs and outputs
    (with the dim holding the time-folded batch of the time-varying ones)."""

    fuse_leaves = False  # both runs record every op (no leaf module run fused, fold_fuse)

    def __init__(self, steps: int) -> None:
        super().__init__(steps)
        # per op: the function, its input and output shapes, whether the op itself was reported
        self.records: list[tuple[Any, _Shapes, _Shapes, bool]] = []

    def _shapes(self, value: Any) -> _Shapes:
        return [(tuple(t.shape), self.batch_dim(t)) for t in _leaves(value, []) if not t.is_nested]

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if func in _META:
            return super().__torch_function__(func, types, args, kwargs)
        inputs, reported = self._shapes((args, kwargs or {})), self.issues.total()
        out = super().__torch_function__(func, types, args, kwargs)
        self.records.append((func, inputs, self._shapes(out), self.issues.total() != reported))
        return out


def _fits(reference: tuple[int, ...], shape: tuple[int, ...], dim: int | None, steps: int) -> bool:
    """Whether ``shape`` (folded run) is ``reference`` (one step's batch) unchanged, or with its batch dim
    (``dim``: the tracked one of a time-varying tensor, else 0) scaled by ``steps``."""
    if shape == reference:
        return True
    d = 0 if dim is None else dim
    if len(shape) != len(reference) or d >= len(shape):
        return False
    return shape[d] == steps * reference[d] and all(
        a == b for i, (a, b) in enumerate(zip(shape, reference, strict=True)) if i != d
    )


def _all_fit(reference: _Shapes, folded: _Shapes, steps: int) -> bool:
    return len(reference) == len(folded) and all(
        _fits(ref, shape, dim, steps) for (ref, _), (shape, dim) in zip(reference, folded, strict=True)
    )


def shape_mismatches(
    reference: _RecordingMode, folded: _RecordingMode, reported: bool = False
) -> list[tuple[str, str]]:
    """The ``(op name, detail)`` issues of the ops whose inputs fit between the two runs and whose outputs do
    not (unless the fold mode reported the op already; with ``reported``, those too). The comparison stops
    where the op sequences part (control flow that depends on the batch size)."""
    steps = folded.steps
    issues: list[tuple[str, str]] = []
    for index, (ref, got) in enumerate(zip(reference.records, folded.records, strict=False)):
        if ref[0] != got[0] or len(ref[2]) != len(got[2]):
            break
        if (
            (got[3] and not reported)
            or not _all_fit(ref[1], got[1], steps)
            or _all_fit(ref[2], got[2], steps)
        ):
            continue  # reported already, a consequence of an earlier mismatch, or consistent
        for (ref_shape, _), (shape, dim) in zip(ref[2], got[2], strict=True):
            if _fits(ref_shape, shape, dim, steps):
                continue
            d = 0 if dim is None else dim
            expected = tuple(n * steps if i == d else n for i, n in enumerate(ref_shape))
            issues.append(
                (
                    _name(got[0]),
                    f"output of shape {shape} (op #{index} of the forward), but the ANN on one step's batch "
                    f"gives {ref_shape}, so {expected} with the T={steps} steps folded into the batch: a "
                    "literal batch size in the model's code (x.view(2, -1) with B = 2) takes the T*B folded "
                    "samples for B and mixes the time steps; read the batch size from the tensor "
                    "(x.shape[0]) instead of a literal",
                )
            )
            break
    return issues


def is_plain(value: Any) -> bool:
    """Whether a forward argument can be passed to both probe runs as it is (tensors, numbers, strings and
    containers of them); anything else (a key/value cache the forward appends to) is copied."""
    if value is None or isinstance(value, (Tensor, bool, int, float, complex, str, bytes)):
        return True
    if isinstance(value, (tuple, list)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(is_plain(v) for v in value.values())
    return False


def signature(items: list[tuple[int | str, Any]], training: bool) -> tuple[Any, ...]:
    """What the probe's verdict depends on: every argument's key and shape/dtype/device (tensors) or type
    and value (numbers, strings, None), the type of any other argument, and the training flag."""
    parts: list[Any] = [training]
    for key, value in items:
        if isinstance(value, Tensor):
            parts.append((key, tuple(value.shape), value.dtype, value.device))
        elif value is None or isinstance(value, (bool, int, float, str)):
            parts.append((key, type(value), value))
        else:
            parts.append((key, type(value)))
    return tuple(parts)

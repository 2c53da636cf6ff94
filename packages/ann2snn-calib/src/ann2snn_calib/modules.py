"""``VoltageHook`` (a calibration observer) and ``VoltageScaler`` (a current scaler)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ann2snn_calib._finite import NonFiniteError, check_all_finite, describe_nonfinite, flag_nonfinite
from ann2snn_calib._numbers import as_integral, as_real
from ann2snn_calib._select import lerp, positions, stat_dtype
from ann2snn_calib._stats import channel_pair, gather_counts, global_max, rows_percentile, rows_top
from ann2snn_calib.scaler import VoltageScaler, _as_buffer

__all__ = ["NonFiniteError", "VoltageHook", "VoltageScaler"]

# doctest.testmod(ann2snn_calib.modules) also runs the Examples of VoltageScaler (now in scaler.py).
__test__ = {"VoltageScaler": VoltageScaler}

_MODE_ERROR = "You have used a non-defined VoltageScale Method."


def _parse_mode(mode: Any) -> tuple[str, float]:
    """``("max", 1.0)``, ``("percentile", p/100)`` or ``("fraction", f)``; NotImplementedError otherwise."""
    if isinstance(mode, str):
        if mode.lower() == "max":
            return "max", 1.0
        if len(mode) > 1 and mode.endswith("%"):
            try:
                p = float(mode[:-1])
            except ValueError:
                raise NotImplementedError(_MODE_ERROR) from None
            if math.isfinite(p) and 0.0 <= p <= 100.0:
                return "percentile", p / 100
        raise NotImplementedError(_MODE_ERROR)
    f = as_real(mode)
    if f is not None and math.isfinite(f) and 0.0 < f <= 1.0:
        return "fraction", f
    raise NotImplementedError(_MODE_ERROR)


def _check_momentum(momentum: Any) -> float | None:
    if momentum is None:
        return None
    m = as_real(momentum)
    if m is None:
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {type(momentum).__name__}.")
    if not (math.isfinite(m) and 0.0 <= m <= 1.0):
        raise ValueError(f"momentum must be a float in [0, 1] or None, got {momentum!r}.")
    return m


def _writable(t: Tensor) -> bool:
    """Whether ``t`` may be updated in place here (an inference tensor only inside inference mode)."""
    return not t.is_inference() or torch.is_inference_mode_enabled()


class VoltageHook(nn.Module):
    """Observe activations during calibration and keep a scale statistic of them.

    The hook returns its input untouched (the *same* tensor object) and updates ``scale`` from the
    detached activation. Per call it computes a statistic ``s_t`` according to ``mode``:

    * ``"Max"`` (any case): the maximum of the activation;
    * ``"p%"`` with ``0 <= p <= 100`` (e.g. ``"99.9%"``): the p-th percentile of all its elements, exactly
      equal to ``numpy.percentile(x, p)`` (linear interpolation), computed on the activation's device
      without a host copy, a full sort or a size limit (see `ann2snn_calib.percentile`);
    * a number ``f`` with ``0 < f <= 1`` (``1`` included): ``f`` times the maximum.

    With ``momentum`` a float ``m`` in [0, 1], ``scale`` is an exponential moving average of the
    per-call statistics: the first call *replaces* the initial value, later calls set
    ``scale = (1 - m) * scale + m * s_t``. "Max" therefore means the EMA of batch maxima, which depends on
    the order of the batches. With ``momentum=None`` the scale is a dataset-level statistic instead: the
    running maximum (times ``f`` for a fraction mode), or the exact percentile of *all* elements seen so
    far. For that percentile the hook keeps, per channel and per rank, the most extreme values seen on
    the side of the percentile (the largest for ``p >= 50``, the smallest otherwise), at most
    ``max_candidates`` of them: memory is ``max_candidates`` values of the statistic dtype per channel,
    and the result is exact as long as the percentile needs no more than that many order statistics, i.e.
    while ``min(p, 100 - p) / 100 * N + 2 <= max_candidates`` for ``N`` elements seen per channel over all
    ranks. Past that bound the hook raises RuntimeError rather than return an approximation.

    A NaN, +inf or -inf in the activation raises :class:`ann2snn_calib.NonFiniteError` (a ValueError) in
    every mode, before the state changes (in a process group on every rank at once).

    With ``channel_dim`` set, every statistic is taken per channel (over all other dimensions) and
    ``scale`` has shape ``(C,)``; use it with ``VoltageScaler(scale, channel_dim=...)``.

    **Distributed calibration.** When ``torch.distributed`` is initialised with more than one process (or
    a ``process_group`` is passed), each call reduces the statistic over the ranks before the update,
    as if the batches of all ranks were concatenated: maxima by an all-reduce, percentiles exactly by
    gathering each rank's extreme candidates (or, past a few million candidates, an exact radix selection
    with all-reduced histograms). Every rank therefore ends with identical scales however the data is
    sharded. All ranks of the group must call the hook the same number of times: when only some ranks
    calibrate (say rank 0 of a training job), pass ``sync=False`` or the calling ranks wait for the others
    forever.

    State lives in buffers, on the device of the last activation: ``scale`` (float32 for float16,
    bfloat16 and float32 activations, float64 for float64; the initial value keeps ``torch.as_tensor``'s
    dtype until the first call), ``num_batches_tracked`` (calls that recorded data) and
    ``num_samples_tracked`` (the length of dimension 0 summed over calls, a 0-dim activation counting
    as one sample). The counters describe this rank's data only. The hook records in training and in
    eval mode alike.

    Args:
        scale: The initial scale, kept until the first call.
        momentum: EMA momentum in [0, 1], or None for dataset-level statistics.
        mode: ``"Max"``, ``"p%"`` or a fraction in (0, 1]. Anything else raises
            NotImplementedError("You have used a non-defined VoltageScale Method.").
        channel_dim: Dimension of the channels for per-channel statistics, or None for one scale.
        max_candidates: Memory bound of the dataset-level percentile, in values per channel.
        process_group: The group to reduce over; by default the default group when one is initialised.
        sync: Whether to reduce over the process group at all.

    Shape:
        - Input: any shape (a 0-dim tensor is one sample); with ``channel_dim``, at least 1-D.
        - Output: the input itself.
        - ``scale``: ``()``, or ``(C,)`` with ``channel_dim`` where ``C = input.shape[channel_dim]``.

    Examples:
        >>> import torch
        >>> hook = VoltageHook(momentum=0.5, mode="Max")
        >>> x = torch.tensor([1.0, 4.0])
        >>> hook(x) is x
        True
        >>> _ = hook(torch.tensor([2.0]))
        >>> hook.scale
        tensor(3.)
        >>> median = VoltageHook(mode="50%", momentum=None)
        >>> _ = median(torch.arange(5.0))
        >>> _ = median(torch.arange(5.0, 10.0))
        >>> median.scale  # over all 10 values seen, as numpy.percentile(range(10), 50)
        tensor(4.5000)
        >>> VoltageHook(mode="120%")
        Traceback (most recent call last):
        ...
        NotImplementedError: You have used a non-defined VoltageScale Method.
    """

    scale: Tensor
    num_batches_tracked: Tensor
    num_samples_tracked: Tensor
    candidates: Tensor  # only with momentum=None and a percentile mode
    elements_seen: Tensor  # idem

    def __init__(
        self,
        scale: float | Tensor = 1.0,
        momentum: float | None = 0.1,
        mode: str | float = "Max",
        *,
        channel_dim: int | None = None,
        max_candidates: int = 1 << 20,
        process_group: Any = None,
        sync: bool = True,
    ) -> None:
        super().__init__()
        self._kind, self._value = _parse_mode(mode)
        # a numpy or 0-dim torch fraction is kept as the Python float it stands for
        self.mode = mode if isinstance(mode, (str, int, float)) else self._value
        self.momentum = _check_momentum(momentum)
        dim = None if channel_dim is None else as_integral(channel_dim)
        if channel_dim is not None and dim is None:
            raise TypeError(f"channel_dim must be an int or None, got {type(channel_dim).__name__}.")
        self.channel_dim = dim
        cap = as_integral(max_candidates)
        if cap is None:
            raise TypeError(f"max_candidates must be a positive int, got {type(max_candidates).__name__}.")
        if cap < 1:
            raise ValueError(f"max_candidates must be a positive int, got {max_candidates}.")
        self.max_candidates = cap
        self.process_group = process_group
        self.sync = bool(sync)
        self.register_buffer("scale", _as_buffer(scale, "scale"))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("num_samples_tracked", torch.tensor(0, dtype=torch.int64))
        if self._dataset_percentile:
            # The kept extreme values per channel, (C, m), and the number of elements seen per channel.
            self.register_buffer("candidates", torch.empty(0, 0))
            self.register_buffer("elements_seen", torch.tensor(0, dtype=torch.int64))

    @property
    def _dataset_percentile(self) -> bool:
        return self.momentum is None and self._kind == "percentile"

    def extra_repr(self) -> str:
        parts = [f"mode={self.mode!r}", f"momentum={self.momentum}"]
        if self.channel_dim is not None:
            parts.append(f"channel_dim={self.channel_dim}")
        return ", ".join(parts)

    def reduction_group(self) -> Any:
        """The process group this hook's statistics are reduced over, or None (no sync, or one rank).

        Examples:
            >>> from ann2snn_calib import VoltageHook
            >>> VoltageHook().reduction_group() is None  # no process group initialised
            True
        """
        if not self.sync:
            return None
        if self.process_group is not None:
            return self.process_group if dist.get_world_size(self.process_group) > 1 else None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None

    def check_finite(self, x: Tensor) -> None:
        """Raise :class:`NonFiniteError` unless every element of ``x`` is finite on every rank of
        :meth:`reduction_group` (all ranks raise together). For subclasses with their own statistic.

        Examples:
            >>> import torch
            >>> from ann2snn_calib import VoltageHook
            >>> VoltageHook().check_finite(torch.tensor([1.0, float("inf")]))  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ann2snn_calib.NonFiniteError: VoltageHook(mode='Max') received NaN/inf activations: ...
        """
        check_all_finite(self, x, self.reduction_group())

    def forward(self, x: Tensor) -> Tensor:
        """Record the statistic of ``x`` and return ``x`` itself."""
        if not isinstance(x, Tensor):
            raise TypeError(f"VoltageHook expects a torch.Tensor, got {type(x).__name__}.")
        with torch.no_grad():
            _observe(self, x.detach())
        return x

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        _adopt_saved_buffers(self, state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


# ---- the statistics VoltageHook records (functions of the hook, one per kind) ----------------------
def _rows(hook: VoltageHook, x: Tensor) -> Tensor:
    """The ``(C, M)`` view (a copy where needed) whose rows the statistic runs over."""
    if hook.channel_dim is None:
        return x.reshape(1, -1)
    cd = _channel_dim(hook, x)
    return x.movedim(cd, 0).reshape(x.shape[cd], -1)


def _channel_dim(hook: VoltageHook, x: Tensor) -> int:
    assert hook.channel_dim is not None
    if x.dim() == 0 or not -x.dim() <= hook.channel_dim < x.dim():
        raise ValueError(
            f"VoltageHook(channel_dim={hook.channel_dim}) needs an input with that dimension, "
            f"got shape {tuple(x.shape)}."
        )
    return hook.channel_dim % x.dim()


def _batch_stat(hook: VoltageHook, x: Tensor, dtype: torch.dtype, group: Any) -> Tensor:
    if hook._kind == "percentile":
        if hook.channel_dim is not None and group is None and x.is_contiguous():
            s = _channel_percentile_in_place(hook, x, dtype)
            if s is not None:
                return s
        return rows_percentile(_rows(hook, x), hook._value, dtype, group)
    if x.numel() == 0:
        # Only reachable in a process group: this rank contributes nothing to the maximum.
        rows = 1 if hook.channel_dim is None else x.shape[_channel_dim(hook, x)]
        local = torch.full((rows,), float("-inf"), dtype=dtype, device=x.device)
    elif hook.channel_dim is None:
        if x.is_floating_point():
            low, high = torch.aminmax(x)  # NaN/inf are found by the pass that finds the maximum
            local = flag_nonfinite(hook, x, high.to(dtype).reshape(1), low, high, group)
        else:
            local = x.max().to(dtype).reshape(1)
    else:
        cd = _channel_dim(hook, x)
        others = [d for d in range(x.dim()) if d != cd]
        local = (x.amax(dim=others) if others else x).to(dtype)
        if x.is_floating_point():  # the maxima hold NaN and +inf; -inf needs the minimum
            local = flag_nonfinite(hook, x, local, x.min(), local, group)
    s = global_max(local, group)
    if (
        x.is_floating_point()
        and (group is not None or x.device.type != "cpu")
        and bool(torch.isposinf(s).any())
    ):
        raise describe_nonfinite(hook, x)
    if group is not None and bool(torch.isneginf(s).any().item()) and x.numel() == 0:
        raise ValueError("VoltageHook received only empty tensors across the process group.")
    return s * hook._value if hook._kind == "fraction" else s


def _channel_percentile_in_place(hook: VoltageHook, x: Tensor, dtype: torch.dtype) -> Tensor | None:
    """Per-channel tail percentiles straight from ``x``'s memory, or None to use a ``(C, M)`` copy."""
    cd = _channel_dim(hook, x)
    channels = x.shape[cd]
    outer = math.prod(x.shape[:cd])
    inner = math.prod(x.shape[cd + 1 :])
    if channels == 0 or outer * inner == 0:
        return None
    lo, hi, gamma = positions(outer * inner, hook._value)
    found = channel_pair(x.view(outer, channels, inner), lo, hi, dtype)
    if found is None:
        return None
    a, b, nan = found
    out = lerp(a, b, gamma)
    return torch.where(nan, torch.full_like(out, float("nan")), out)


def _dataset_percentile_stat(hook: VoltageHook, x: Tensor, dtype: torch.dtype, group: Any) -> Tensor:
    rows = _rows(hook, x).to(dtype)
    largest = hook._value >= 0.5
    kept = hook.candidates.to(device=x.device, dtype=dtype)
    if kept.numel() == 0 or kept.shape[0] != rows.shape[0]:
        kept = rows.new_empty(rows.shape[0], 0)
    cap = hook.max_candidates
    if kept.shape[1] == cap and rows.shape[0] == 1:
        # The buffer is full: only values beyond its least extreme one can enter (equal ones would
        # replace an equal value), and after the first batches those are few.
        row = rows[0]
        fresh = row[row > kept.min()] if largest else row[row < kept.max()]
        merged = torch.cat([kept, fresh.unsqueeze(0)], dim=1)
    else:
        merged = torch.cat([kept, rows_top(rows, cap, largest)], dim=1)
    if merged.shape[1] > cap:
        merged = rows_top(merged, cap, largest)
    hook.candidates = merged
    hook.elements_seen = hook.elements_seen.to(x.device) + rows.shape[1]
    seen = int(hook.elements_seen.item())
    counts = gather_counts(seen, rows.shape[0], x.device, group)
    total = sum(n for n, _ in counts)
    if total == 0:
        raise ValueError("VoltageHook received only empty tensors: a percentile needs at least one element.")
    lo, hi, _ = positions(total, hook._value)
    needed = total - lo if largest else hi + 1
    if needed > hook.max_candidates and any(n > hook.max_candidates for n, _ in counts):
        raise RuntimeError(
            f"VoltageHook(mode={hook.mode!r}, momentum=None) needs the {needed} most extreme values of the "
            f"{total} elements seen per channel, more than max_candidates={hook.max_candidates}; raise "
            "max_candidates or use an EMA (momentum=0.1)."
        )
    return rows_percentile(
        merged, hook._value, dtype, group, counts=counts, side="top" if largest else "bottom"
    )


def _observe(hook: VoltageHook, x: Tensor) -> None:
    """Fold the statistic of ``x`` into the hook's state (EMA, running max or dataset percentile)."""
    group = hook.reduction_group()
    if x.numel() == 0 and group is None:
        raise ValueError(
            f"VoltageHook received an empty tensor of shape {tuple(x.shape)}; it needs at least one element."
        )
    if hook.channel_dim is not None:
        channels = x.shape[_channel_dim(hook, x)]
        if hook.scale.dim() == 1 and hook.scale.shape[0] != channels and int(hook.num_batches_tracked) > 0:
            raise ValueError(
                f"VoltageHook(channel_dim={hook.channel_dim}) has calibrated {hook.scale.shape[0]} channels, "
                f"got an input of shape {tuple(x.shape)} with {channels}."
            )
    dtype = stat_dtype(x.dtype)
    if hook._kind == "percentile":
        check_all_finite(hook, x, group)
    if hook._dataset_percentile:
        s = _dataset_percentile_stat(hook, x, dtype, group)
    else:
        s = _batch_stat(hook, x, dtype, group)
    if hook.channel_dim is None:
        s = s.reshape(())
    device = x.device
    if hook.num_batches_tracked.device != device or not _writable(hook.num_batches_tracked):
        hook.num_batches_tracked = hook.num_batches_tracked.to(device).clone()
        hook.num_samples_tracked = hook.num_samples_tracked.to(device).clone()
    first = hook.num_batches_tracked == 0  # a tensor: no host sync on accelerators
    old = hook.scale.to(device)
    if hook.momentum is None:
        new = s if hook._dataset_percentile else torch.maximum(old.to(dtype), s)
    else:
        new = (1 - hook.momentum) * old + hook.momentum * s
    new = torch.where(first, s, new.to(dtype))
    if (
        new.shape == hook.scale.shape
        and new.dtype == hook.scale.dtype
        and hook.scale.device == device
        and _writable(hook.scale)
    ):
        hook.scale.copy_(new)
    else:
        # The first statistic fixes the state's dtype, device and (per channel) shape.
        hook.scale = new
    hook.num_batches_tracked.add_(1)
    hook.num_samples_tracked.add_(x.shape[0] if x.dim() else 1)


def _adopt_saved_buffers(hook: VoltageHook, state_dict: dict[str, Any], prefix: str) -> None:
    # The buffers change shape and dtype while calibrating (a per-channel scale, the kept candidates):
    # adopt the saved ones so a fresh hook loads a calibrated state.
    for name, buf in list(hook._buffers.items()):
        saved = state_dict.get(prefix + name)
        if (
            isinstance(saved, Tensor)
            and buf is not None
            and (saved.shape != buf.shape or saved.dtype != buf.dtype)
        ):
            hook._buffers[name] = torch.empty(saved.shape, dtype=saved.dtype, device=buf.device)

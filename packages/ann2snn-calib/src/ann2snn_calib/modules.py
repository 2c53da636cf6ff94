"""``VoltageHook`` (a calibration observer) and ``VoltageScaler`` (a current scaler)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ann2snn_calib._select import lerp, positions, stat_dtype
from ann2snn_calib._stats import channel_pair, gather_counts, global_max, rows_percentile, rows_top

__all__ = ["VoltageHook", "VoltageScaler"]

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
    if isinstance(mode, numbers.Real) and not isinstance(mode, bool):
        f = float(mode)
        if math.isfinite(f) and 0.0 < f <= 1.0:
            return "fraction", f
    raise NotImplementedError(_MODE_ERROR)


def _check_momentum(momentum: Any) -> float | None:
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {type(momentum).__name__}.")
    m = float(momentum)
    if not (math.isfinite(m) and 0.0 <= m <= 1.0):
        raise ValueError(f"momentum must be a float in [0, 1] or None, got {momentum!r}.")
    return m


def _writable(t: Tensor) -> bool:
    """Whether ``t`` may be updated in place here (an inference tensor only inside inference mode)."""
    return not t.is_inference() or torch.is_inference_mode_enabled()


def _as_buffer(value: Any, name: str) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"{name} must be a real number or a real tensor, got {type(value).__name__}.")
    t = torch.as_tensor(value).detach().clone()
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{name} must be a real number or a real tensor, got dtype {t.dtype}.")
    return t


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
        self.mode = mode
        self.momentum = _check_momentum(momentum)
        if channel_dim is not None and (isinstance(channel_dim, bool) or not isinstance(channel_dim, int)):
            raise TypeError(f"channel_dim must be an int or None, got {type(channel_dim).__name__}.")
        self.channel_dim = channel_dim
        if isinstance(max_candidates, bool) or not isinstance(max_candidates, int):
            raise TypeError(f"max_candidates must be a positive int, got {type(max_candidates).__name__}.")
        if max_candidates < 1:
            raise ValueError(f"max_candidates must be a positive int, got {max_candidates}.")
        self.max_candidates = max_candidates
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

    def _group(self) -> Any:
        if not self.sync:
            return None
        if self.process_group is not None:
            return self.process_group if dist.get_world_size(self.process_group) > 1 else None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None

    def forward(self, x: Tensor) -> Tensor:
        """Record the statistic of ``x`` and return ``x`` itself."""
        if not isinstance(x, Tensor):
            raise TypeError(f"VoltageHook expects a torch.Tensor, got {type(x).__name__}.")
        with torch.no_grad():
            self._observe(x.detach())
        return x

    def _rows(self, x: Tensor) -> Tensor:
        """The ``(C, M)`` view (a copy where needed) whose rows the statistic runs over."""
        if self.channel_dim is None:
            return x.reshape(1, -1)
        cd = self._channel_dim(x)
        return x.movedim(cd, 0).reshape(x.shape[cd], -1)

    def _channel_dim(self, x: Tensor) -> int:
        assert self.channel_dim is not None
        if x.dim() == 0 or not -x.dim() <= self.channel_dim < x.dim():
            raise ValueError(
                f"VoltageHook(channel_dim={self.channel_dim}) needs an input with that dimension, "
                f"got shape {tuple(x.shape)}."
            )
        return self.channel_dim % x.dim()

    def _batch_stat(self, x: Tensor, dtype: torch.dtype, group: Any) -> Tensor:
        if self._kind == "percentile":
            if self.channel_dim is not None and group is None and x.is_contiguous():
                s = self._channel_percentile_in_place(x, dtype)
                if s is not None:
                    return s
            return rows_percentile(self._rows(x), self._value, dtype, group)
        if x.numel() == 0:
            # Only reachable in a process group: this rank contributes nothing to the maximum.
            rows = 1 if self.channel_dim is None else x.shape[self._channel_dim(x)]
            local = torch.full((rows,), float("-inf"), dtype=dtype, device=x.device)
        elif self.channel_dim is None:
            local = x.max().to(dtype).reshape(1)
        else:
            cd = self._channel_dim(x)
            others = [d for d in range(x.dim()) if d != cd]
            local = (x.amax(dim=others) if others else x).to(dtype)
        s = global_max(local, group)
        if group is not None and bool(torch.isinf(s).any().item()) and x.numel() == 0:
            raise ValueError("VoltageHook received only empty tensors across the process group.")
        return s * self._value if self._kind == "fraction" else s

    def _channel_percentile_in_place(self, x: Tensor, dtype: torch.dtype) -> Tensor | None:
        """Per-channel tail percentiles straight from ``x``'s memory, or None to use a ``(C, M)`` copy."""
        cd = self._channel_dim(x)
        channels = x.shape[cd]
        outer = math.prod(x.shape[:cd])
        inner = math.prod(x.shape[cd + 1 :])
        if channels == 0 or outer * inner == 0:
            return None
        lo, hi, gamma = positions(outer * inner, self._value)
        found = channel_pair(x.view(outer, channels, inner), lo, hi, dtype)
        if found is None:
            return None
        a, b, nan = found
        out = lerp(a, b, gamma)
        return torch.where(nan, torch.full_like(out, float("nan")), out)

    def _observe(self, x: Tensor) -> None:
        group = self._group()
        if x.numel() == 0 and group is None:
            raise ValueError(
                f"VoltageHook received an empty tensor of shape {tuple(x.shape)}; it needs at least one element."
            )
        if self.channel_dim is not None:
            channels = x.shape[self._channel_dim(x)]
            if (
                self.scale.dim() == 1
                and self.scale.shape[0] != channels
                and int(self.num_batches_tracked) > 0
            ):
                raise ValueError(
                    f"VoltageHook(channel_dim={self.channel_dim}) has calibrated {self.scale.shape[0]} channels, "
                    f"got an input of shape {tuple(x.shape)} with {channels}."
                )
        dtype = stat_dtype(x.dtype)
        if self._dataset_percentile:
            s = self._dataset_percentile_stat(x, dtype, group)
        else:
            s = self._batch_stat(x, dtype, group)
        if self.channel_dim is None:
            s = s.reshape(())
        device = x.device
        if self.num_batches_tracked.device != device or not _writable(self.num_batches_tracked):
            self.num_batches_tracked = self.num_batches_tracked.to(device).clone()
            self.num_samples_tracked = self.num_samples_tracked.to(device).clone()
        first = self.num_batches_tracked == 0  # a tensor: no host sync on accelerators
        old = self.scale.to(device)
        if self.momentum is None:
            new = s if self._dataset_percentile else torch.maximum(old.to(dtype), s)
        else:
            new = (1 - self.momentum) * old + self.momentum * s
        new = torch.where(first, s, new.to(dtype))
        if (
            new.shape == self.scale.shape
            and new.dtype == self.scale.dtype
            and self.scale.device == device
            and _writable(self.scale)
        ):
            self.scale.copy_(new)
        else:
            # The first statistic fixes the state's dtype, device and (per channel) shape.
            self.scale = new
        self.num_batches_tracked.add_(1)
        self.num_samples_tracked.add_(x.shape[0] if x.dim() else 1)

    def _dataset_percentile_stat(self, x: Tensor, dtype: torch.dtype, group: Any) -> Tensor:
        rows = self._rows(x).to(dtype)
        largest = self._value >= 0.5
        kept = self.candidates.to(device=x.device, dtype=dtype)
        if kept.numel() == 0 or kept.shape[0] != rows.shape[0]:
            kept = rows.new_empty(rows.shape[0], 0)
        cap = self.max_candidates
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
        self.candidates = merged
        self.elements_seen = self.elements_seen.to(x.device) + rows.shape[1]
        seen = int(self.elements_seen.item())
        counts = gather_counts(seen, rows.shape[0], x.device, group)
        total = sum(n for n, _ in counts)
        if total == 0:
            raise ValueError(
                "VoltageHook received only empty tensors: a percentile needs at least one element."
            )
        lo, hi, _ = positions(total, self._value)
        needed = total - lo if largest else hi + 1
        if needed > self.max_candidates and any(n > self.max_candidates for n, _ in counts):
            raise RuntimeError(
                f"VoltageHook(mode={self.mode!r}, momentum=None) needs the {needed} most extreme values of the "
                f"{total} elements seen per channel, more than max_candidates={self.max_candidates}; raise "
                "max_candidates or use an EMA (momentum=0.1)."
            )
        return rows_percentile(
            merged, self._value, dtype, group, counts=counts, side="top" if largest else "bottom"
        )

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
        # The buffers change shape and dtype while calibrating (a per-channel scale, the kept candidates):
        # adopt the saved ones so a fresh hook loads a calibrated state.
        for name, buf in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if (
                isinstance(saved, Tensor)
                and buf is not None
                and (saved.shape != buf.shape or saved.dtype != buf.dtype)
            ):
                self._buffers[name] = torch.empty(saved.shape, dtype=saved.dtype, device=buf.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class VoltageScaler(nn.Module):
    """Multiply the input by a fixed scale: ``forward(x) = x * scale``.

    In a converted SNN, scalers around each spiking neuron map currents into the neuron's threshold range
    and back. ``scale`` is a buffer (it moves with ``.to()`` and is saved in the state_dict) made with
    ``torch.as_tensor``: a Python float gives float32, an int gives int64, a tensor keeps its dtype. Normal
    torch promotion applies in ``forward`` (a float16 input times a float32 0-dim scale stays float16).

    A multi-element ``scale`` with ``channel_dim`` set is a per-channel scale of shape ``(C,)`` applied
    along that dimension of the input (e.g. from ``VoltageHook(channel_dim=1)``); without
    ``channel_dim`` a tensor scale broadcasts by the usual torch rules.

    Args:
        scale: A finite number or a tensor of finite values.
        channel_dim: The input dimension a 1-D ``scale`` runs along, or None.

    Shape:
        - Input: any shape; with ``channel_dim``, ``input.shape[channel_dim] == C``.
        - Output: the input's shape.

    Examples:
        >>> import torch
        >>> VoltageScaler(3.14)
        VoltageScaler(3.140000)
        >>> VoltageScaler(2.0)(torch.tensor([1.0, 2.0]))
        tensor([2., 4.])
        >>> VoltageScaler(torch.tensor([1.0, 10.0]), channel_dim=1)(torch.ones(2, 2))
        tensor([[ 1., 10.],
                [ 1., 10.]])
    """

    scale: Tensor

    def __init__(self, scale: float | Tensor = 1.0, *, channel_dim: int | None = None) -> None:
        super().__init__()
        t = _as_buffer(scale, "scale")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"VoltageScaler needs a finite scale, got {scale!r}.")
        if channel_dim is not None:
            if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
                raise TypeError(f"channel_dim must be an int or None, got {type(channel_dim).__name__}.")
            if t.dim() > 1:
                raise ValueError(
                    f"VoltageScaler(channel_dim={channel_dim}) needs a 0-dim or 1-D scale, got shape {tuple(t.shape)}."
                )
        self.channel_dim = channel_dim
        self.register_buffer("scale", t)

    def extra_repr(self) -> str:
        if self.scale.numel() == 1:
            v = float(self.scale.item())
            text = f"{v:f}"
            # "%f" rounds small scales to 0.000000; keep it (the familiar form) only when it is faithful.
            return text if v == 0 or abs(v) >= 1e-3 else f"{v:.6e}"
        dim = "" if self.channel_dim is None else f", channel_dim={self.channel_dim}"
        return f"scale=<tensor of shape {tuple(self.scale.shape)}>{dim}"

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"VoltageScaler expects a torch.Tensor, got {type(x).__name__}.")
        scale = self.scale
        if self.channel_dim is not None and scale.dim() == 1:
            if x.dim() == 0 or not -x.dim() <= self.channel_dim < x.dim():
                raise ValueError(
                    f"VoltageScaler(channel_dim={self.channel_dim}) needs an input with that dimension, "
                    f"got shape {tuple(x.shape)}."
                )
            cd = self.channel_dim % x.dim()
            if x.shape[cd] != scale.shape[0] and scale.shape[0] != 1:
                raise ValueError(
                    f"VoltageScaler has {scale.shape[0]} channel scales but the input of shape {tuple(x.shape)} "
                    f"has {x.shape[cd]} channels along dim {self.channel_dim}."
                )
            shape = [1] * x.dim()
            shape[cd] = scale.shape[0]
            scale = scale.reshape(shape)
        return x * scale

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
        saved = state_dict.get(prefix + "scale")
        if isinstance(saved, Tensor) and (saved.shape != self.scale.shape or saved.dtype != self.scale.dtype):
            self._buffers["scale"] = torch.empty(saved.shape, dtype=saved.dtype, device=self.scale.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

"""Exact order statistics on the tensor's own device, without a full sort.

Everything here reproduces ``numpy.percentile(x, p)`` (the default ``method="linear"``) to the bit:
the virtual index ``(n - 1) * p / 100`` is computed in float64 as numpy does, the two neighbouring order
statistics are found exactly, and they are blended with numpy's two-sided ``_lerp`` in the statistic's
dtype (float32 for float16/bfloat16/float32 input, float64 for float64 and integer input).

How the two order statistics are found (no sort of the whole tensor, no host copy):

* **Tail ranks** (the ``k`` wanted elements are a small share of ``n``, e.g. the 99.9th percentile):
  the tensor is viewed as blocks of ``_BLOCK`` elements and reduced to its block maxima, one pass as cheap
  as ``x.max()``. The k-th largest block maximum ``t`` is a guaranteed lower bound of the k-th largest
  element (k blocks hold at least one element >= t each), and every element above ``t`` lives in a block
  whose maximum is at least ``t``. So gathering those blocks and keeping the elements ``>= t`` leaves a few
  more than ``k`` candidates that provably contain the k largest values; an exact selection on that small
  set finishes the job. The k-th largest block maximum is found by the same method, recursively.
* **Central ranks** (e.g. the median), where no bound can discard much: an exact radix selection over the
  order-preserving integer image of the floats, four (float32) or eight (float64) passes of 256-bin
  histograms over a shrinking candidate set. The histograms are plain sums, so the same code selects over
  the union of the data of every rank of a process group by all-reducing them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["percentile"]

# Elements per block of the tail method; 64 float32 values are one or two cache lines.
_BLOCK = 64
# Below this size a plain sort is the cheapest exact method.
_SMALL = 4096


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which statistics of a tensor of ``dtype`` are computed and stored."""
    if dtype == torch.float64:
        return torch.float64
    if dtype.is_floating_point:
        return torch.float32
    if dtype.is_complex:
        raise TypeError(f"A percentile or scale statistic needs a real tensor, got dtype {dtype}.")
    return torch.float64


def positions(n: int, q: float) -> tuple[int, int, float]:
    """numpy's linear-method neighbours ``(lo, hi)`` and weight ``gamma`` for quantile ``q`` of ``n`` values."""
    vi = (n - 1) * q
    lo = math.floor(vi)
    hi = lo + 1
    if vi >= n - 1:
        # numpy clips both indexes to the last element and computes gamma from the clipped index (-1).
        return n - 1, n - 1, vi + 1.0
    return lo, hi, vi - lo


def lerp(a: Tensor, b: Tensor, gamma: float) -> Tensor:
    """numpy's ``_lerp(a, b, gamma)`` with a Python-float weight, evaluated in ``a``'s dtype."""
    diff = b - a
    if gamma >= 0.5:
        return b - diff * torch.tensor(1.0 - gamma, dtype=a.dtype, device=a.device)
    return a + diff * torch.tensor(gamma, dtype=a.dtype, device=a.device)


# ----------------------------------------------------------------------------------------------------------
# local exact selection


def kth_largest(x: Tensor, k: int) -> Tensor:
    """The k-th largest value (1-based) of the 1-D tensor ``x``, exactly, as a 0-dim tensor of x's dtype."""
    n = x.numel()
    if n <= _SMALL:
        return torch.topk(x, k).values[k - 1]
    if k * _BLOCK * 4 > n:
        return _radix_kth_smallest(x, n - k)
    nb = n // _BLOCK
    blocks = x[: nb * _BLOCK].view(nb, _BLOCK)
    bmax = blocks.amax(dim=1)
    t = kth_largest(bmax, k)
    cand = _gather_candidates(x, blocks, bmax, t)
    return torch.topk(cand, k, sorted=False).values.min()


def top_values(x: Tensor, k: int) -> Tensor:
    """The ``k`` largest values of the 1-D tensor ``x`` (exact multiset, unordered); ``k <= x.numel()``."""
    return _top_values(x, k)[0]


def _top_values(x: Tensor, k: int) -> tuple[Tensor, bool]:
    """:func:`top_values` and whether ``x`` holds a NaN (found at little cost from the block maxima)."""
    n = x.numel()
    if k >= n:
        return x, has_nan(x)
    if n <= _SMALL or k * _BLOCK * 4 > n:
        if has_nan(x):
            return x[:k], True
        t = kth_largest(x, k)
        above = x[x > t]
        return torch.cat([above, t.to(x.dtype).expand(k - above.numel())]), False
    nb = n // _BLOCK
    blocks = x[: nb * _BLOCK].view(nb, _BLOCK)
    bmax = blocks.amax(dim=1)
    if has_nan(bmax) or has_nan(x[nb * _BLOCK :]):
        return x[:k], True
    tb = kth_largest(bmax, k)
    cand = _gather_candidates(x, blocks, bmax, tb)
    return torch.topk(cand, k, sorted=False).values, False


def _gather_candidates(x: Tensor, blocks: Tensor, bmax: Tensor, t: Tensor) -> Tensor:
    """Every element ``>= t`` of the blocks whose maximum is ``>= t``, plus the ragged tail's."""
    idx = (bmax >= t).nonzero().squeeze(1)
    cand = blocks.index_select(0, idx).reshape(-1)
    tail = x[blocks.numel() :]
    if tail.numel():
        cand = torch.cat([cand, tail])
    return cand[cand >= t]


def _order_keys(x: Tensor) -> tuple[Tensor, int]:
    """Signed integers with the same order as the float values of ``x`` (float32 or float64)."""
    if x.dtype == torch.float64:
        bits, width, magnitude = x.view(torch.int64), 64, (1 << 63) - 1
    else:
        bits, width, magnitude = x.view(torch.int32), 32, (1 << 31) - 1
    # Negative floats order backwards by magnitude: flip their magnitude bits.
    return bits ^ ((bits >> (width - 1)) & magnitude), width


def _key_to_value(key: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    magnitude = (1 << (width - 1)) - 1
    bits = key ^ magnitude if key < 0 else key
    int_dtype = torch.int64 if width == 64 else torch.int32
    return torch.tensor(bits, dtype=int_dtype, device=device).view(dtype)


def _radix_kth_smallest(x: Tensor, rank: int, group: Any = None) -> Tensor:
    """The element of 0-based ascending ``rank``, exact, by 8-bit radix selection over order keys.

    ``x`` is float32 or float64 (other float dtypes are upcast). With a process ``group`` the rank is
    global over the union of every member's ``x``: the histograms are all-reduced.
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    keys, width = _order_keys(x.reshape(-1))
    prefix: int | None = None
    for shift in range(width - 8, -1, -8):
        shifted = keys >> shift
        digits = shifted + 128 if prefix is None else shifted & 255
        hist = torch.bincount(digits.long(), minlength=256)
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(hist, op=dist.ReduceOp.SUM, group=group)
        cum = hist.cumsum(0)
        digit = int(torch.searchsorted(cum, torch.tensor([rank], device=cum.device), right=True).item())
        if digit:
            rank -= int(cum[digit - 1].item())
        prefix = digit - 128 if prefix is None else prefix * 256 + digit
        keys = keys[digits == digit]
    assert prefix is not None
    return _key_to_value(prefix, width, x.dtype, x.device)


def pair_local(x: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor, bool]:
    """Ascending order statistics ``x[lo]``, ``x[hi]`` (``hi`` is ``lo`` or ``lo + 1``) of the 1-D ``x``.

    The third item says whether ``x`` holds a NaN; the two values are meaningless then.
    """
    n = x.numel()
    if n <= _SMALL:
        s = torch.sort(x).values
        return s[lo], s[hi], has_nan(s[-1:])
    k_up = n - lo
    k_down = hi + 1
    if min(k_up, k_down) * _BLOCK * 4 > n:
        if has_nan(x):
            return x[0], x[0], True
        v_lo = _radix_kth_smallest(x, lo).to(x.dtype)
        if hi == lo:
            return v_lo, v_lo, False
        # x[hi] is v_lo again when more than `hi` elements are <= v_lo, else the smallest element above it.
        if int((x <= v_lo).sum().item()) > hi:
            return v_lo, v_lo, False
        return v_lo, x[x > v_lo].min(), False
    if k_up <= k_down:
        vals, nan = _top_values(x, k_up)
        top = torch.topk(vals, k_up).values  # descending; x[lo] is the last
        return top[k_up - 1], top[k_up - 1 - (hi - lo)], nan
    vals, nan = _top_values(-x, k_down)
    bottom = -torch.topk(vals, k_down).values  # ascending
    return bottom[lo], bottom[hi], nan


def has_nan(x: Tensor) -> bool:
    return bool(torch.isnan(x).any().item()) if x.dtype.is_floating_point else False


def percentile(x: Tensor, q: float) -> Tensor:
    """Exact ``q``-th percentile of all elements of ``x``, equal to ``numpy.percentile(x, q)``.

    numpy's default linear interpolation is reproduced bit for bit; the computation stays on ``x``'s
    device, never copies to the host, has no size limit (``torch.quantile`` refuses more than 2**24
    elements) and selects the two needed order statistics without sorting the tensor.

    Args:
        x: A non-empty real tensor of any shape, device and dtype (float16 and bfloat16 included).
        q: The percentile, a finite number in [0, 100].

    Returns:
        A 0-dim tensor on ``x``'s device: float32 for float16/bfloat16/float32 input, float64 for float64
        and integer input. It is NaN when ``x`` holds a NaN, as in numpy.

    Raises:
        TypeError: ``x`` is not a tensor, is complex, or ``q`` is not a real number.
        ValueError: ``x`` is empty, or ``q`` is not finite or outside [0, 100].

    Example:
        >>> import torch
        >>> from ann2snn_calib import percentile
        >>> percentile(torch.arange(11.0), 95)
        tensor(9.5000)
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"percentile expects a torch.Tensor, got {type(x).__name__}.")
    if isinstance(q, bool) or not isinstance(q, (int, float)):
        raise TypeError(f"percentile expects q as a real number in [0, 100], got {type(q).__name__}.")
    if not math.isfinite(q) or not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile expects q in [0, 100], got {q!r}.")
    if x.numel() == 0:
        raise ValueError("percentile of an empty tensor is undefined (got a tensor with 0 elements).")
    dtype = stat_dtype(x.dtype)
    flat = x.detach().reshape(-1)
    if not flat.dtype.is_floating_point:
        flat = flat.to(dtype)
    return percentile_flat(flat, q / 100, dtype)


def percentile_flat(flat: Tensor, quantile: float, dtype: torch.dtype) -> Tensor:
    """:func:`percentile` on a 1-D floating tensor; ``quantile`` in [0, 1]; result in ``dtype``."""
    lo, hi, gamma = positions(flat.numel(), quantile)
    a, b, nan = pair_local(flat, lo, hi)
    if nan:
        return torch.tensor(float("nan"), dtype=dtype, device=flat.device)
    return lerp(a.to(dtype), b.to(dtype), gamma)

"""Exact order statistics on the tensor's own device, without a full sort.

Everything here reproduces ``numpy.percentile(x, p)`` (the default ``method="linear"``) to the bit:
the virtual index ``(n - 1) * p / 100`` is computed in float64 as numpy does, the two neighbouring order
statistics are found exactly, and they are blended with numpy's two-sided ``_lerp`` in the statistic's
dtype (float32 for float16/bfloat16/float32 input, float64 for float64 and integer input).

How the two order statistics are found (no sort of the whole tensor, no host copy):

* **Tail ranks** (the ``k`` wanted elements are at most ``n / 16`` of ``n``, e.g. the 99.9th or the 1st
  percentile): the tensor is viewed as blocks of ``B`` elements (64 down to 8, the largest that keeps
  ``2 k B <= n``) and reduced to its block maxima, one pass close to the cost of ``x.max()``. The k-th
  largest block maximum ``t`` is a guaranteed lower bound of the k-th largest element (k blocks hold at
  least one element ``>= t`` each), and every element ``>= t`` lives in a block whose maximum is ``>= t``.
  Gathering those blocks and keeping their elements ``>= t`` leaves a few more than ``k`` candidates that
  provably contain the k largest values; an exact selection on that small set finishes. Any ``t`` that
  at least k block maxima reach works the same way, so ``t`` is read from a strided sample of the block
  maxima, a little below the estimated k-th largest, and one count confirms it (the exact k-th largest
  block maximum is the fallback). Candidates equal to ``t`` are compacted, so heavy ties (a ReLU's zeros)
  stay cheap. Low ranks run the same method on ``-x``.
* **Central ranks** (e.g. the median): a strided sample brackets the ranks, one pass counts and keeps the
  elements inside the bracket, and the counts verify it (an exact ``kthvalue`` over everything is the
  fallback when they do not); see :func:`pair_central`.
* **Across ranks of a process group** with very many candidates: an exact radix selection over the
  order-preserving integer image of the floats, 256-bin histograms all-reduced per byte
  (:func:`_radix_kth_smallest`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ann2snn_calib._numbers import as_real

__all__ = ["percentile"]

# Elements per block of the tail method: at most 64 float32 values (one or two cache lines), at least 8.
_MAX_BLOCK = 64
_MIN_BLOCK = 8
# Below this size a plain sort is the cheapest exact method.
_SMALL = 4096
# Up to this size a plain topk finds a k-th largest element faster than bracketing does.
_TOPK_MAX = 1 << 18
# Size of the strided sample that brackets central ranks.
_SAMPLE = 1 << 16
# Size of the strided sample of block maxima that bounds tail ranks.
_BOUND_SAMPLE = 1 << 12


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


def _block_size(n: int, k: int) -> int:
    """Block length for pruning to the ``k`` largest of ``n`` values, or 0 when blocks cannot prune.

    ``k`` blocks of ``B`` elements are gathered, so ``k * B`` must stay well below ``n``; 64 elements
    (one or two cache lines) per block is the most worth it, 8 the least.
    """
    if n <= _SMALL:
        return 0
    b = _MAX_BLOCK
    while b >= _MIN_BLOCK:
        if 2 * k * b <= n:
            return b
        b //= 2
    return 0


def kth_largest(x: Tensor, k: int) -> Tensor:
    """The k-th largest value (1-based) of the NaN-free 1-D tensor ``x``, exactly, in x's dtype."""
    n = x.numel()
    if k >= n:
        return x.min()
    if _block_size(n, k) == 0:
        # One quickselect; this is the path of the block maxima, a small share of the data.
        return torch.kthvalue(_wide(x), n - k + 1).values.to(x.dtype)
    return torch.topk(_top_values(x, k)[0], k, sorted=False).values.min()


def top_values(x: Tensor, k: int) -> Tensor:
    """The ``k`` largest values of the 1-D tensor ``x`` (exact multiset, unordered); ``k <= x.numel()``."""
    vals = _top_values(x, k)[0]
    return vals if vals.numel() == k else torch.topk(vals, k, sorted=False).values


def _top_values(x: Tensor, k: int) -> tuple[Tensor, bool]:
    """Candidates for :func:`top_values` and whether ``x`` holds a NaN.

    The first item holds at least ``k`` values and always contains the ``k`` largest; callers finish with a
    ``topk`` of it. The NaN check is nearly free on the block path (the block maxima propagate NaN).
    """
    n = x.numel()
    if k >= n:
        return x, has_nan(x)
    b = _block_size(n, k)
    if b == 0:
        if has_nan(x):
            return x[:k], True
        if n <= _TOPK_MAX:
            return torch.topk(x, k, sorted=False).values, False
        t = pair_central(_wide(x), n - k, n - k)[0].to(x.dtype)
        above = x[x > t]
        return torch.cat([above, t.to(x.dtype).expand(k - above.numel())]), False
    nb = n // b
    blocks = x[: nb * b].view(nb, b)
    bmax = blocks.amax(dim=1)
    if has_nan(bmax) or (n > nb * b and has_nan(x[nb * b :])):
        return x[:k], True
    # If at least k blocks have a maximum >= t, the k-th largest element is >= t, and every element >= t
    # lies in a block whose maximum is >= t: those blocks' elements >= t contain the k largest.
    t, chosen = _block_bound(bmax, k)
    idx = chosen.nonzero().squeeze(1)
    cand = blocks.index_select(0, idx).reshape(-1)
    tail = x[blocks.numel() :]
    if tail.numel():
        cand = torch.cat([cand, tail])
    # Keep the candidates above t and stand in for those equal to t with copies: under heavy ties at t
    # (the zeros of a ReLU) this keeps the set small.
    above = cand[cand > t]
    if above.numel() >= k:
        return above, False
    return torch.cat([above, t.expand(k - above.numel())]), False


def _block_bound(bmax: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """A value ``t`` reached by at least ``k`` of the block maxima, and the mask of the blocks reaching it.

    The exact k-th largest block maximum is the tightest such ``t`` but costs a selection over all block
    maxima; a value a little below it, read from a strided sample, serves as well (a few more blocks are
    gathered) once one comparison confirms that at least ``k`` blocks reach it.
    """
    nb = bmax.numel()
    if nb > 4 * _BOUND_SAMPLE:
        sample = bmax[:: nb // _BOUND_SAMPLE]
        m = sample.numel()
        expected = k * m / nb  # rank of the k-th largest block maximum within the sample
        j = min(m, math.ceil(expected + 4.0 * math.sqrt(expected) + 8))
        t = torch.kthvalue(_wide(sample), m - j + 1).values.to(bmax.dtype)
        chosen = bmax >= t
        if int(torch.count_nonzero(chosen).item()) >= k:
            return t, chosen
    t = kth_largest(bmax, k)
    return t, bmax >= t


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
        s = torch.sort(_wide(x)).values
        return s[lo], s[hi], has_nan(s[-1:])
    k_up = n - lo
    k_down = hi + 1
    if _block_size(n, min(k_up, k_down)) == 0:
        if has_nan(x):
            return x[0], x[0], True
        a, b = pair_central(_wide(x), lo, hi)
        return a, b, False
    if k_up <= k_down:
        # The candidates' k_up largest are x's k_up largest: x[lo] has ascending rank c - k_up among them.
        vals, nan = _top_values(x, k_up)
        r = vals.numel() - k_up
    else:
        # Mirrored: the candidates of -x hold x's k_down smallest as their smallest; x[lo] has rank lo.
        vals, nan = _top_values(-x, k_down)
        vals = -vals
        r = lo
    if nan:
        return vals[0], vals[0], True
    a, b = _two_ranks(_wide(vals), r, r + (hi - lo))
    return a, b, False


def _two_ranks(x: Tensor, r_lo: int, r_hi: int) -> tuple[Tensor, Tensor]:
    """Ascending order statistics ``r_lo`` and ``r_hi`` of a small candidate set."""
    if x.numel() <= _SMALL:
        s = torch.sort(x).values
        return s[r_lo], s[r_hi]
    a = torch.kthvalue(x, r_lo + 1).values
    return a, a if r_hi == r_lo else torch.kthvalue(x, r_hi + 1).values


def pair_central(x: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """Ascending order statistics ``x[lo]``, ``x[hi]`` of a NaN-free 1-D ``x``, for any ranks.

    A strided sample brackets the wanted ranks between two values ``t_lo <= t_hi`` with a wide safety
    margin. Counting the elements below ``t_lo``, equal to either bound and strictly inside places every
    rank: a rank that falls on a bound is that bound (heavy ties, such as the zeros after a ReLU, cost
    nothing more), one inside is found by an exact selection among the few inside elements. A sample that
    misses only costs the fallback, an exact ``kthvalue`` over the whole tensor.
    """
    n = x.numel()
    if n <= _SMALL:
        s = torch.sort(x).values
        return s[lo], s[hi]
    if n <= 2 * _SAMPLE:
        # A sample would be the whole tensor: select directly.
        v_lo = torch.kthvalue(x, lo + 1).values
        return v_lo, v_lo if hi == lo else torch.kthvalue(x, hi + 1).values
    stride = max(1, n // _SAMPLE)
    sample = x[::stride]
    m = sample.numel()
    r_lo, r_hi = lo * (m - 1) / (n - 1), hi * (m - 1) / (n - 1)
    q = min(max(r_lo / max(m - 1, 1), 0.0), 1.0)
    margin = 5.0 * math.sqrt(m * q * (1.0 - q)) + 16
    a, b = max(math.floor(r_lo - margin), 0), min(math.ceil(r_hi + margin), m - 1)
    # Two quickselects on the sample: sorting it would cost more than the pass over x.
    t_lo = torch.kthvalue(sample, a + 1).values
    t_hi = torch.kthvalue(sample, b + 1).values
    below = int(torch.count_nonzero(x < t_lo).item())
    at_lo = int(torch.count_nonzero(x == t_lo).item())
    inside = x[(x > t_lo) & (x < t_hi)] if bool(t_hi > t_lo) else x[:0]
    at_hi = int(torch.count_nonzero(x == t_hi).item()) if bool(t_hi > t_lo) else 0

    def lookup(r: int) -> Tensor | None:
        if r < below:
            return None
        r -= below
        if r < at_lo:
            return t_lo
        r -= at_lo
        if r < inside.numel():
            return (
                torch.kthvalue(inside, r + 1).values
                if inside.numel() > _SMALL
                else torch.sort(inside).values[r]
            )
        r -= inside.numel()
        return t_hi if r < at_hi else None

    found_lo, found_hi = lookup(lo), lookup(hi)
    if found_lo is not None and found_hi is not None:
        return found_lo, found_hi
    # The sample misled us (an adversarial order): exact selection over everything.
    v_lo = torch.kthvalue(x, lo + 1).values
    return v_lo, v_lo if hi == lo else torch.kthvalue(x, hi + 1).values


def _wide(x: Tensor) -> Tensor:
    """float16/bfloat16 upcast to float32 for ``kthvalue``/``sort`` (not every backend selects in them)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def has_nan(x: Tensor) -> bool:
    # max() propagates NaN and is one cheap reduction (isnan(x).any() is two passes and an allocation).
    return bool(torch.isnan(x.max()).item()) if x.dtype.is_floating_point and x.numel() else False


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

    Examples:
        >>> import torch
        >>> from ann2snn_calib import percentile
        >>> percentile(torch.arange(11.0), 95)
        tensor(9.5000)
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"percentile expects a torch.Tensor, got {type(x).__name__}.")
    value = as_real(q)
    if value is None:
        raise TypeError(f"percentile expects q as a real number in [0, 100], got {type(q).__name__}.")
    q = value
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

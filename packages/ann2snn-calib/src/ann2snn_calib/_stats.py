"""Per-batch and dataset-level statistics over rows, locally or across a torch.distributed process group.

A statistic is computed per *row* of a 2-D ``(C, M)`` view of the activation: ``C == 1`` for one
per-tensor scale, ``C`` channels for per-channel scales. Across ranks the rows are concatenated along ``M``
(the data of every rank is one big batch), so every rank obtains the statistic of the union:

* maxima by an all-reduce with ``MAX``;
* percentiles by gathering, from every rank, its ``k`` largest (or smallest) values per row, where ``k`` is
  the number of order statistics above (below) the wanted one in the *global* row; the top ``k`` of the
  union is in the union of the per-rank top ``k``. Above ``_GATHER_LIMIT`` values per rank the exact
  radix selection of :mod:`ann2snn_calib._select` runs instead, all-reducing 256-bin histograms.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ann2snn_calib._select import (
    _block_size,
    _radix_kth_smallest,
    lerp,
    percentile_flat,
    positions,
    top_values,
)

# Largest number of candidate values (rows x k) one rank sends in a percentile all-gather.
_GATHER_LIMIT = 1 << 22


def world_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def global_max(rows_max: Tensor, group: Any) -> Tensor:
    """All-reduce of per-row maxima with MAX (identity without a group)."""
    if group is not None:
        rows_max = rows_max.clone()
        dist.all_reduce(rows_max, op=dist.ReduceOp.MAX, group=group)
    return rows_max


def gather_counts(count: int, rows: int, device: torch.device, group: Any) -> list[tuple[int, int]]:
    """Every rank's ``(elements per row, number of rows)``; checks that the row counts agree."""
    if group is None:
        return [(count, rows)]
    mine = torch.tensor([count, rows], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    pairs = [(int(t[0].item()), int(t[1].item())) for t in everyone]
    if len({r for _, r in pairs}) != 1:
        raise ValueError(
            f"VoltageHook: the ranks of the process group observed different numbers of channels: "
            f"{[r for _, r in pairs]}."
        )
    return pairs


def rows_top(rows: Tensor, k: int, largest: bool) -> Tensor:
    """The ``min(k, M)`` largest (smallest) values of each row of ``rows`` (C, M), unordered."""
    c, m = rows.shape
    k = min(k, m)
    if k == m:
        return rows
    if c == 1:
        flat = rows[0]
        vals = top_values(flat, k) if largest else -top_values(-flat, k)
        return vals.unsqueeze(0)
    return torch.topk(rows, k, dim=1, largest=largest, sorted=False).values


def rows_pair(rows: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """Ascending order statistics ``lo`` and ``hi`` of every row of the NaN-free ``rows`` (C, M).

    Tail ranks use the block-maxima pruning of :mod:`ann2snn_calib._select` row-wise: the ``k`` blocks
    with the largest maxima of a row hold its ``k`` largest values (ties included), so a gather of
    ``k`` blocks per row and one quickselect per row finish. Other ranks use ``kthvalue`` per row.
    """
    c, m = rows.shape
    k_up, k_down = m - lo, hi + 1
    top = k_up <= k_down
    k = k_up if top else k_down
    b = _block_size(m, k)
    if b == 0:
        a = torch.kthvalue(rows, lo + 1, dim=1).values
        return a, a if hi == lo else torch.kthvalue(rows, hi + 1, dim=1).values
    src = rows if top else -rows
    nb = m // b
    blocks = src[:, : nb * b].reshape(c, nb, b)
    idx = torch.topk(blocks.amax(dim=2), k, dim=1, sorted=False).indices
    cand = torch.gather(blocks, 1, idx.unsqueeze(2).expand(c, k, b)).reshape(c, k * b)
    if m > nb * b:
        cand = torch.cat([cand, src[:, nb * b :]], dim=1)
    width = cand.shape[1]
    if top:
        # The k_up largest of a row are the k_up largest of its candidates: x[lo] has rank width - k_up.
        a = torch.kthvalue(cand, width - k_up + 1, dim=1).values
        return a, a if hi == lo else torch.kthvalue(cand, width - k_up + 2, dim=1).values
    # Mirrored on -x: x[r] is the (r + 1)-th largest candidate, rank width - 1 - r ascending.
    a = -torch.kthvalue(cand, width - lo, dim=1).values
    return a, a if hi == lo else -torch.kthvalue(cand, width - hi, dim=1).values


def channel_pair(x3: Tensor, lo: int, hi: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor] | None:
    """Per-channel order statistics ``lo``, ``hi`` of a ``(G, C, L)`` view, read in place (no copy of it).

    Channel ``c``'s values are ``x3[:, c, :]``. Blocks of ``B`` elements run along ``L`` (the last
    ``L % B`` of each row are kept as candidates), so the block extremes come from the view itself and
    only the ``k`` chosen blocks per channel are gathered, as in :func:`rows_pair`. Returns
    ``(a, b, nan)`` with ``nan`` flagging channels holding a NaN, or None when the ranks are not tail
    ranks (the caller then selects on a ``(C, G*L)`` copy).
    """
    g, c, length = x3.shape
    m = g * length
    k_up, k_down = m - lo, hi + 1
    top = k_up <= k_down
    k = k_up if top else k_down
    b = _block_size(m, k)
    nbl = length // b if b else 0
    if b == 0 or g * nbl < 2 * k:
        return None
    blocks = x3.unfold(2, b, b)  # (G, C, nbl, B), a view; the last length % B of each row stay out
    ext = blocks.amax(dim=3) if top else blocks.amin(dim=3)  # NaN propagates
    tail = x3[:, :, nbl * b :]
    nan = torch.isnan(ext).any(dim=2).any(dim=0) if ext.dtype.is_floating_point else ext.new_zeros(c).bool()
    if tail.numel() and tail.dtype.is_floating_point:
        nan = nan | torch.isnan(tail).any(dim=2).any(dim=0)
    per_channel = ext.permute(1, 0, 2).reshape(c, g * nbl)
    # The k blocks with the most extreme ends hold the channel's k most extreme values (ties included);
    # the ragged tails are candidates as they are.
    idx = torch.topk(per_channel, k, dim=1, largest=top, sorted=False).indices
    rows = torch.arange(c, device=x3.device).unsqueeze(1).expand(c, k)
    cand = blocks[idx // nbl, rows, idx % nbl].reshape(c, k * b)
    if tail.numel():
        cand = torch.cat([cand, tail.permute(1, 0, 2).reshape(c, -1)], dim=1)
    cand = cand.to(dtype)
    width = cand.shape[1]
    if top:
        a = torch.kthvalue(cand, width - k_up + 1, dim=1).values
        return a, a if hi == lo else torch.kthvalue(cand, width - k_up + 2, dim=1).values, nan
    a = torch.kthvalue(cand, lo + 1, dim=1).values
    return a, a if hi == lo else torch.kthvalue(cand, hi + 1, dim=1).values, nan


def rows_percentile(
    rows: Tensor,
    quantile: float,
    dtype: torch.dtype,
    group: Any,
    *,
    counts: list[tuple[int, int]] | None = None,
    side: str | None = None,
) -> Tensor:
    """Exact linear-method quantile of each row of ``rows`` over every rank's rows, shape ``(C,)``.

    ``rows`` is ``(C, m)`` and, with ``counts`` given, holds only the extreme values of a larger local row
    (the dataset-level mode): ``counts[r][0]`` is the true element count of rank ``r``'s rows and ``side``
    says which end (``"top"`` or ``"bottom"``) ``rows`` keeps. The caller guarantees that every rank keeps
    at least as many values as are needed.
    """
    c, m = rows.shape
    complete = counts is None  # rows hold all of this rank's data (not the kept extremes)
    if counts is None:
        counts = gather_counts(m, c, rows.device, group)
    total = sum(n for n, _ in counts)
    if total == 0:
        raise ValueError("VoltageHook received only empty tensors: a percentile needs at least one element.")
    if group is None and c == 1 and m == total:
        # The common case, with its NaN check folded into the selection.
        return percentile_flat(rows[0], quantile, dtype).reshape(1)
    nan_rows = (
        torch.isnan(rows).any(dim=1) if rows.dtype.is_floating_point else rows.new_zeros(c, dtype=torch.bool)
    )
    if group is not None:
        flags = nan_rows.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        nan_rows = flags.bool()
    lo, hi, gamma = positions(total, quantile)
    k_up, k_down = total - lo, hi + 1
    if side is None:
        side = "top" if k_up <= k_down else "bottom"

    if group is None and m == total:
        # Every value is here: per-row selection.
        a, b = rows_pair(rows.to(dtype), lo, hi)
        out = lerp(a, b, gamma)
    else:
        k = k_up if side == "top" else k_down
        # The same decision on every rank: k, c and `complete` agree across the group.
        if k * c > _GATHER_LIMIT and complete:
            out = _radix_rows(rows, lo, hi, gamma, dtype, group)
        else:
            out = _gathered_rows(rows, k, lo, hi, total, gamma, dtype, side, group)
    if bool(nan_rows.any().item()):
        out = torch.where(nan_rows, torch.full_like(out, float("nan")), out)
    return out


def _gathered_rows(
    rows: Tensor,
    k: int,
    lo: int,
    hi: int,
    total: int,
    gamma: float,
    dtype: torch.dtype,
    side: str,
    group: Any,
) -> Tensor:
    largest = side == "top"
    c = rows.shape[0]
    local = rows_top(rows, k, largest).to(dtype)
    pad = float("-inf") if largest else float("inf")
    if local.shape[1] < k:
        local = torch.cat([local, local.new_full((c, k - local.shape[1]), pad)], dim=1)
    if group is not None:
        everyone = [torch.empty_like(local) for _ in range(world_size(group))]
        dist.all_gather(everyone, local.contiguous(), group=group)
        local = torch.cat(everyone, dim=1)
    ordered = torch.topk(local, k, dim=1, largest=largest, sorted=True).values
    if largest:
        # ordered[:, j] is the element of ascending index total - 1 - j.
        a, b = ordered[:, total - 1 - lo], ordered[:, total - 1 - hi]
    else:
        a, b = ordered[:, lo], ordered[:, hi]
    return lerp(a, b, gamma)


def _radix_rows(rows: Tensor, lo: int, hi: int, gamma: float, dtype: torch.dtype, group: Any) -> Tensor:
    out = []
    for row in rows:
        a = _radix_kth_smallest(row, lo, group).to(dtype)
        b = a
        if hi != lo:
            below = (row.to(dtype) <= a).sum().reshape(1)
            above_min = row[row.to(dtype) > a]
            nxt = above_min.min().to(dtype) if above_min.numel() else torch.tensor(float("inf"), dtype=dtype)
            nxt = nxt.reshape(1).to(rows.device)
            if group is not None:
                dist.all_reduce(below, op=dist.ReduceOp.SUM, group=group)
                dist.all_reduce(nxt, op=dist.ReduceOp.MIN, group=group)
            b = a if int(below.item()) > hi else nxt[0]
        out.append(lerp(a, b, gamma))
    return torch.stack(out)


__all__ = ["channel_pair", "gather_counts", "global_max", "rows_percentile", "rows_top", "world_size"]

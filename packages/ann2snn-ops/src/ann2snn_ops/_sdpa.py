"""Checks and the folded kernel call shared by ``TDScaledDotProductAttention`` and ``TDMultiheadAttention``.

Scaled dot-product attention on a 5-D tensor falls off torch's fast kernels, so the time axis is folded into
the batch and the kernel runs once on a 4-D ``[T*B, H, L, E]`` tensor. The checks mirror what
``F.scaled_dot_product_attention`` accepts (and raise where it raises), before any work starts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ann2snn_ops._checks import check_time_sequence

__all__ = ["check_mask_dtype", "check_qkv", "check_sdpa_shapes", "sdpa_on_cumulative"]

_NAMES = ("query_seq", "key_seq", "value_seq")


def check_qkv(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Rank, time length and dtype checks of the three sequences (SDPA wants one floating dtype)."""
    for tensor, tensor_name in zip((q, k, v), _NAMES):
        check_time_sequence(tensor, name)
        if tensor.dim() < 3:
            raise ValueError(
                f"{name} expects {tensor_name} with shape [T, ..., L, E] and at least 3 dimensions, "
                f"but got shape {tuple(tensor.shape)}."
            )
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(
            f"{name} expects query_seq, key_seq, and value_seq to have the same time length, "
            f"but got {q.shape[0]}, {k.shape[0]}, and {v.shape[0]}."
        )
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(
            f"{name} expects query_seq, key_seq, and value_seq of the same dtype, but got {q.dtype}, "
            f"{k.dtype}, and {v.dtype}."
        )
    if not q.is_floating_point():
        raise TypeError(
            f"{name} expects floating-point query_seq, key_seq, and value_seq, but got {q.dtype}."
        )


def check_mask_dtype(name: str, attn_mask: object, query_dtype: torch.dtype, arg: str = "attn_mask") -> None:
    """A mask (the argument ``arg``) is None or a tensor that is bool, float32 or of the query's dtype (what SDPA
    accepts)."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(
            f"{name} expects {arg} to be a torch.Tensor or None, but got {type(attn_mask).__name__}."
        )
    if attn_mask.dtype not in (torch.bool, torch.float32, query_dtype):
        raise TypeError(
            f"{name} expects {arg} of dtype torch.bool (a boolean mask) or a float mask of the query's dtype "
            f"{query_dtype} (or torch.float32), but got {attn_mask.dtype}; convert an int/uint8 mask with "
            "mask.bool() or to an additive float mask."
        )


def check_sdpa_shapes(
    name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
) -> None:
    """Feature sizes, key/value lengths, broadcastable batch dims and a broadcastable mask."""
    shapes = f"query_seq {tuple(q.shape)}, key_seq {tuple(k.shape)}, value_seq {tuple(v.shape)}"
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{name} expects query_seq and key_seq of the same last size E, but got {shapes}.")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{name} expects key_seq and value_seq of the same length S, but got {shapes}.")
    try:
        batch = torch.broadcast_shapes(q.shape[1:-2], k.shape[1:-2], v.shape[1:-2])
    except RuntimeError:
        raise ValueError(f"{name} expects batch dimensions that broadcast, but got {shapes}.") from None
    if attn_mask is not None:
        full = (q.shape[0], *batch, q.shape[-2], k.shape[-2])
        if attn_mask.dim() > len(full):
            raise ValueError(
                f"attn_mask must have at most {len(full)} dimensions for inputs of rank {len(full)}, "
                f"but got shape {tuple(attn_mask.shape)}."
            )
        try:
            ok = torch.broadcast_shapes(attn_mask.shape, full) == full
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} expects attn_mask broadcastable to [T, ..., L, S] = {full}, but got shape "
                f"{tuple(attn_mask.shape)} (for {shapes})."
            )


def _fold_mask(mask: torch.Tensor, batch: tuple[int, ...]) -> torch.Tensor:
    """Reshape a mask that broadcasts against ``[*batch, L, S]`` to the folded 4-D layout of ``_fold``."""
    rank = len(batch) + 2
    if mask.dim() <= 2:
        return mask  # broadcasts over any batch layout
    mask = mask.reshape((1,) * (rank - mask.dim()) + tuple(mask.shape))
    if rank == 3:
        return mask.unsqueeze(1)
    if rank == 4:
        return mask
    folded = rank - 3  # dims 0 .. rank-4 are merged into one
    if all(s == 1 for s in mask.shape[:folded]):
        return mask.flatten(0, folded - 1)
    mask = mask.expand(*batch[:folded], *mask.shape[folded:])
    return mask.flatten(0, folded - 1)


def _fold(x: torch.Tensor) -> torch.Tensor:
    """``[T, *batch, L, E]`` -> 4-D (the layout torch's fast SDPA kernels take), as a view."""
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() == 4:
        return x
    return x.flatten(0, x.dim() - 4)


def sdpa_on_cumulative(
    q_cum: torch.Tensor,
    k_cum: torch.Tensor,
    v_cum: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """SDPA of cumulative ``[T, *batch, L, E]`` tensors with the time axis folded into the batch.

    A float mask is cast to the working dtype (float32 for half inputs), as SDPA does internally.
    """
    batch = tuple(torch.broadcast_shapes(q_cum.shape[:-2], k_cum.shape[:-2], v_cum.shape[:-2]))
    if q_cum.shape[:-2] != batch or k_cum.shape[:-2] != batch or v_cum.shape[:-2] != batch:
        # Broadcast batch dims before folding (the rare case; it copies).
        q_cum = q_cum.expand(*batch, *q_cum.shape[-2:])
        k_cum = k_cum.expand(*batch, *k_cum.shape[-2:])
        v_cum = v_cum.expand(*batch, *v_cum.shape[-2:])
    mask = attn_mask
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q_cum.dtype:
        mask = mask.to(q_cum.dtype)
    y = F.scaled_dot_product_attention(
        _fold(q_cum),
        _fold(k_cum),
        _fold(v_cum),
        attn_mask=None if mask is None else _fold_mask(mask, batch),
        dropout_p=0.0,
        is_causal=is_causal,
        scale=scale,
    )
    return y.reshape(*batch, *y.shape[-2:])

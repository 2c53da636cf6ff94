"""TD attention: ``TDScaledDotProductAttention`` (here) and ``TDMultiheadAttention`` (``multihead``).

Both fold the time axis into the batch and run torch's SDPA kernel once on a 4-D ``[T*B, H, L, E]`` tensor;
``TDMultiheadAttention`` runs fused (one accumulation, projections of the cumulative inputs, one differencing).
"""

from __future__ import annotations

import torch

from ann2snn_ops._base import TDModule
from ann2snn_ops._checks import check_step, needs_grad
from ann2snn_ops._cumsum import accumulation_dtype, cumsum_shared, difference, td_chunked
from ann2snn_ops._sdpa import check_mask_dtype, check_qkv, check_sdpa_shapes, sdpa_on_cumulative
from ann2snn_ops.multihead import TDMultiheadAttention

__all__ = ["TDMultiheadAttention", "TDScaledDotProductAttention"]


class TDScaledDotProductAttention(TDModule):
    """Temporal-difference scaled dot-product attention.

    ``Y.cumsum(0)[t] == F.scaled_dot_product_attention(Q.cumsum(0)[t], K.cumsum(0)[t], V.cumsum(0)[t])``.
    ``dropout_p`` is fixed at 0 and GQA is not exposed. The kernel runs once on the time axis folded into
    the batch. ``attn_mask`` broadcasts over ``[T, ...]`` like in SDPA: bool masks mark allowed positions,
    float masks are added to the scores. Half inputs are accumulated and attended in float32.

    Args:
        is_causal: Apply SDPA's (top-left aligned) causal mask; excludes ``attn_mask``.
        scale: Score scale; None means ``1/sqrt(E)``.

    Shape:
        - query_seq: ``[T, *, L, E]``; key_seq: ``[T, *, S, E]``; value_seq: ``[T, *, S, Ev]``, all of the
          same rank (the leading ``*`` broadcast); one step without ``T`` in streaming mode.
        - attn_mask: broadcastable to ``[T, *, L, S]``.
        - Output: ``[T, *, L, Ev]``.

    Examples:
        >>> import torch.nn.functional as F
        >>> op = TDScaledDotProductAttention()
        >>> q, k, v = torch.randn(3, 2, 4, 8), torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 6)
        >>> ref = F.scaled_dot_product_attention(q.cumsum(0), k.cumsum(0), v.cumsum(0))
        >>> torch.allclose(op(q, k, v).cumsum(0), ref, atol=1e-5)
        True
    """

    def __init__(self, is_causal: bool = False, scale: float | None = None) -> None:
        super().__init__()
        if not isinstance(is_causal, bool):
            raise TypeError(f"TDScaledDotProductAttention: is_causal must be a bool, but got {is_causal!r}.")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)):
            raise TypeError(
                f"TDScaledDotProductAttention: scale must be None or a number, but got {scale!r}."
            )
        self.is_causal = is_causal
        self.scale = scale

    def forward(
        self,
        query_seq: torch.Tensor,
        key_seq: torch.Tensor,
        value_seq: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply TD attention to complete sequences (or to one step of each in streaming mode)."""
        name = "TDScaledDotProductAttention"
        if self.streaming:
            for tensor in (query_seq, key_seq, value_seq):
                check_step(tensor, name)
            query_seq, key_seq, value_seq = (t.unsqueeze(0) for t in (query_seq, key_seq, value_seq))
        check_qkv(name, query_seq, key_seq, value_seq)
        if not query_seq.dim() == key_seq.dim() == value_seq.dim():
            raise ValueError(
                f"{name} expects query_seq, key_seq, and value_seq to have the same number of dimensions "
                "(the leading time axis stops rank broadcasting), but got shapes "
                f"{tuple(query_seq.shape)}, {tuple(key_seq.shape)}, and {tuple(value_seq.shape)}."
            )
        if self.is_causal and attn_mask is not None:
            raise ValueError(
                f"{name} does not allow attn_mask when is_causal=True; use one masking mode at a time."
            )
        check_mask_dtype(name, attn_mask, query_seq.dtype)
        check_sdpa_shapes(name, query_seq, key_seq, value_seq, attn_mask)
        if self.streaming:
            return self._stream(query_seq, key_seq, value_seq, attn_mask)[0]
        if not needs_grad(query_seq, key_seq, value_seq):
            return self._inference(query_seq, key_seq, value_seq, attn_mask)
        acc = accumulation_dtype(query_seq.dtype)
        q_cum, k_cum, v_cum = cumsum_shared((query_seq, key_seq, value_seq), acc)
        y_cum = sdpa_on_cumulative(q_cum, k_cum, v_cum, attn_mask, self.is_causal, self.scale)
        return difference(y_cum).to(query_seq.dtype)

    def _inference(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """No-autograd path: a few time steps at a time, so the three cumulative inputs are never all alive."""
        timed_mask = (
            attn_mask is not None and attn_mask.dim() == q.dim() and attn_mask.shape[0] != 1
        )  # the mask has its own time axis: cut it with the chunks

        def attend(
            q_cum: torch.Tensor, k_cum: torch.Tensor, v_cum: torch.Tensor, *mask: torch.Tensor
        ) -> torch.Tensor:
            m = mask[0] if timed_mask else attn_mask
            return sdpa_on_cumulative(q_cum, k_cum, v_cum, m, self.is_causal, self.scale)

        with torch.no_grad():
            sliced = (attn_mask,) if timed_mask and attn_mask is not None else ()
            return td_chunked(attend, (q, k, v), q.dtype, time_sliced=sliced)

    def _stream(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        self._check_stream_shapes(query_seq=q.shape[1:], key_seq=k.shape[1:], value_seq=v.shape[1:])
        acc = accumulation_dtype(q.dtype)
        st = self._state
        first = "y" not in st
        q_cum = q.to(acc, copy=True) if first else st["q"] + q
        k_cum = k.to(acc, copy=True) if first else st["k"] + k
        v_cum = v.to(acc, copy=True) if first else st["v"] + v
        y_cum = sdpa_on_cumulative(q_cum, k_cum, v_cum, attn_mask, self.is_causal, self.scale)
        out = y_cum if first else y_cum - st["y"]
        st.update(q=q_cum, k=k_cum, v=v_cum, y=y_cum)
        return out.to(q.dtype)

    def extra_repr(self) -> str:
        return f"is_causal={self.is_causal}, scale={self.scale}"

"""TD attention: ``TDScaledDotProductAttention`` and ``TDMultiheadAttention``.

Scaled dot-product attention on a 5-D tensor falls off torch's fast kernels, so the time axis is folded into
the batch and the kernel runs once on a 4-D ``[T*B, H, L, E]`` tensor. ``TDMultiheadAttention`` runs fused:
it accumulates its inputs once, projects the cumulative inputs (the projections are affine, so that is the
cumulative of the TD projections), attends, differences once, and applies the output projection to the
differences with its bias at step 0 only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ann2snn_ops._base import (
    TDModule,
    accumulation_dtype,
    check_step,
    check_time_sequence,
    cumsum_time,
    difference,
    needs_grad,
    td_chunked,
)
from ann2snn_ops.linear import TDLinear

__all__ = ["TDMultiheadAttention", "TDScaledDotProductAttention"]

_NAMES = ("query_seq", "key_seq", "value_seq")


def _check_qkv(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
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


def _fold_mask(mask: torch.Tensor, batch: tuple[int, ...]) -> torch.Tensor:
    """Reshape a mask that broadcasts against ``[*batch, L, S]`` to the folded 4-D layout of ``_fold``."""
    rank = len(batch) + 2
    if mask.dim() > rank:
        raise ValueError(
            f"attn_mask must have at most {rank} dimensions for inputs of rank {rank}, "
            f"but got shape {tuple(mask.shape)}."
        )
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


def _cast_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype == torch.bool or mask.dtype == dtype:
        return mask
    return mask.to(dtype) if mask.is_floating_point() else mask


def _sdpa_on_cumulative(
    q_cum: torch.Tensor,
    k_cum: torch.Tensor,
    v_cum: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """SDPA of cumulative ``[T, *batch, L, E]`` tensors with the time axis folded into the batch."""
    batch = tuple(torch.broadcast_shapes(q_cum.shape[:-2], k_cum.shape[:-2], v_cum.shape[:-2]))
    if q_cum.shape[:-2] != batch or k_cum.shape[:-2] != batch or v_cum.shape[:-2] != batch:
        # Broadcast batch dims before folding (the rare case; it copies).
        q_cum = q_cum.expand(*batch, *q_cum.shape[-2:])
        k_cum = k_cum.expand(*batch, *k_cum.shape[-2:])
        v_cum = v_cum.expand(*batch, *v_cum.shape[-2:])
    mask = _cast_mask(attn_mask, q_cum.dtype)
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
        _check_qkv(name, query_seq, key_seq, value_seq)
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
        if self.streaming:
            return self._stream(query_seq, key_seq, value_seq, attn_mask)[0]
        if not needs_grad(query_seq, key_seq, value_seq):
            return self._inference(query_seq, key_seq, value_seq, attn_mask)
        acc = accumulation_dtype(query_seq.dtype)
        q_cum = cumsum_time(query_seq, acc)
        k_cum = q_cum if key_seq is query_seq else cumsum_time(key_seq, acc)
        v_cum = (
            k_cum
            if value_seq is key_seq
            else (q_cum if value_seq is query_seq else cumsum_time(value_seq, acc))
        )
        y_cum = _sdpa_on_cumulative(q_cum, k_cum, v_cum, attn_mask, self.is_causal, self.scale)
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
            return _sdpa_on_cumulative(q_cum, k_cum, v_cum, m, self.is_causal, self.scale)

        with torch.no_grad():
            sliced = (attn_mask,) if timed_mask and attn_mask is not None else ()
            return td_chunked(attend, (q, k, v), q.dtype, time_sliced=sliced)

    def _stream(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        acc = accumulation_dtype(q.dtype)
        st = self._state
        q_cum = q.to(acc, copy=True) if not st else st["q"] + q
        k_cum = k.to(acc, copy=True) if not st else st["k"] + k
        v_cum = v.to(acc, copy=True) if not st else st["v"] + v
        y_cum = _sdpa_on_cumulative(q_cum, k_cum, v_cum, attn_mask, self.is_causal, self.scale)
        out = y_cum if not st else y_cum - st["y"]
        self._state = {"q": q_cum, "k": k_cum, "v": v_cum, "y": y_cum}
        return out.to(q.dtype)

    def extra_repr(self) -> str:
        return f"is_causal={self.is_causal}, scale={self.scale}"


def _check_positive(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"TDMultiheadAttention: {name} must be a positive int, but got {value!r}.")
    return value


class TDMultiheadAttention(TDModule):
    """Temporal-difference multi-head attention, the ``batch_first`` packed subset of ``nn.MultiheadAttention``.

    ``out.cumsum(0)[t]`` equals ``nn.MultiheadAttention`` (same weights, ``need_weights=False``) applied to
    the cumulative inputs at step ``t``. The projections are ``TDLinear`` submodules (``q_proj``, ``k_proj``,
    ``v_proj``, ``out_proj``) whose parameters are used directly: the forward pass accumulates each input
    once, projects, attends with the time axis folded into the batch, differences once, and applies
    ``out_proj`` to the differences (bias at step 0). Masks follow ``nn.MultiheadAttention``: a bool mask
    marks **disallowed** positions, a float mask is added, and a 3-D mask has shape ``[B*H, L, S]``.
    Unlike ``nn.MultiheadAttention``, ``is_causal=True`` is used alone (it builds the causal mask) and is
    rejected together with ``attn_mask``.

    Args:
        embed_dim: Model width ``E``.
        num_heads: Number of heads ``H``; must divide ``E``.
        dropout: Must be 0.0.
        bias: Whether the projections have biases.
        batch_first: Must be True.
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Shape:
        - query_seq: ``[T, B, L, E]``; key_seq, value_seq: ``[T, B, S, E]`` (one step ``[B, *, E]`` in
          streaming mode).
        - attn_mask: ``[L, S]`` or ``[B*H, L, S]``.
        - Output: ``([T, B, L, E], None)``.

    Examples:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
        >>> op = TDMultiheadAttention.from_module(mha)
        >>> x = torch.randn(3, 2, 5, 8)
        >>> y, _ = op(x, x, x)
        >>> ref, _ = mha(x.cumsum(0)[-1], x.cumsum(0)[-1], x.cumsum(0)[-1], need_weights=False)
        >>> torch.allclose(y.sum(0), ref, atol=1e-5)
        True
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_positive(embed_dim, "embed_dim")
        _check_positive(num_heads, "num_heads")
        if embed_dim % num_heads != 0:
            raise ValueError("embed_dim must be divisible by num_heads.")
        if dropout != 0.0:
            raise ValueError("TDMultiheadAttention only supports dropout=0.0.")
        if not batch_first:
            raise ValueError("TDMultiheadAttention only supports batch_first=True.")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.q_proj = TDLinear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)
        self.k_proj = TDLinear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)
        self.v_proj = TDLinear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)
        self.out_proj = TDLinear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention) -> TDMultiheadAttention:
        """Build from an ``nn.MultiheadAttention``: splits the packed ``in_proj_weight``/``in_proj_bias``
        into ``q_proj``/``k_proj``/``v_proj``, copies ``out_proj``, dtype, device, ``requires_grad`` and
        the training flag.

        Raises:
            TypeError: If ``module`` is not an ``nn.MultiheadAttention``.
            ValueError: For the unsupported configurations, checked in this order: ``dropout != 0``,
                ``batch_first=False``, ``kdim``/``vdim`` different from ``embed_dim``, ``add_bias_kv``,
                ``add_zero_attn``, no packed ``in_proj_weight``.
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(
                f"TDMultiheadAttention.from_module expects an nn.MultiheadAttention, but got {type(module).__name__}."
            )
        e = module.embed_dim
        if module.dropout != 0.0:
            raise ValueError("TD MHA conversion only supports dropout=0.0.")
        if not module.batch_first:
            raise ValueError("TD MHA conversion only supports batch_first=True.")
        if module.kdim != e or module.vdim != e:
            raise ValueError("TD MHA conversion only supports kdim == vdim == embed_dim.")
        if module.bias_k is not None or module.bias_v is not None:
            raise ValueError("TD MHA conversion does not support add_bias_kv.")
        if module.add_zero_attn:
            raise ValueError("TD MHA conversion does not support add_zero_attn.")
        if module.in_proj_weight is None:
            raise ValueError("TD MHA conversion requires packed in_proj_weight.")
        w = module.in_proj_weight
        b = module.in_proj_bias
        td = cls(e, module.num_heads, bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for i, proj in enumerate((td.q_proj, td.k_proj, td.v_proj)):
                proj.weight.copy_(w[i * e : (i + 1) * e])
                proj.weight.requires_grad_(w.requires_grad)
                if b is not None and proj.bias is not None:
                    proj.bias.copy_(b[i * e : (i + 1) * e])
                    proj.bias.requires_grad_(b.requires_grad)
            td.out_proj.weight.copy_(module.out_proj.weight)
            td.out_proj.weight.requires_grad_(module.out_proj.weight.requires_grad)
            if module.out_proj.bias is not None and td.out_proj.bias is not None:
                td.out_proj.bias.copy_(module.out_proj.bias)
                td.out_proj.bias.requires_grad_(module.out_proj.bias.requires_grad)
        td.train(module.training)
        for proj in (td.q_proj, td.k_proj, td.v_proj, td.out_proj):
            proj.train(module.training)
        return td

    # -- checks -------------------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        check_time_sequence(x, "TDMultiheadAttention")
        if x.dim() != 4:
            raise ValueError(
                f"TDMultiheadAttention expects input with shape [T, batch, seq, embed_dim], but got {tuple(x.shape)}."
            )
        if x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"TDMultiheadAttention expects the last dimension to match embed_dim={self.embed_dim}, "
                f"but got {x.shape[-1]}."
            )

    def _canonical_mask(
        self, attn_mask: torch.Tensor | None, b: int, length: int, s: int
    ) -> torch.Tensor | None:
        """nn.MultiheadAttention mask -> SDPA mask broadcastable to ``[B, H, L, S]`` (bool: True = allowed)."""
        if attn_mask is None:
            return None
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(
                f"TDMultiheadAttention expects attn_mask to be a tensor or None, but got {attn_mask!r}."
            )
        h = self.num_heads
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (length, s):
                raise ValueError(
                    f"TDMultiheadAttention expects a 2-D attn_mask of shape (L, S) = {(length, s)}, "
                    f"but got {tuple(attn_mask.shape)}."
                )
        elif attn_mask.dim() == 3:
            if tuple(attn_mask.shape) != (b * h, length, s):
                raise ValueError(
                    "TDMultiheadAttention expects a 3-D attn_mask of shape (batch * num_heads, L, S) = "
                    f"{(b * h, length, s)}, but got {tuple(attn_mask.shape)}."
                )
            attn_mask = attn_mask.view(b, h, length, s)
        else:
            raise ValueError(
                f"TDMultiheadAttention expects a 2-D or 3-D attn_mask, but got shape {tuple(attn_mask.shape)}."
            )
        if attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask
        return attn_mask

    # -- computation --------------------------------------------------------------------------------------

    def _params(self, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """The projections' (weight, bias), cast (differentiably) to the accumulation dtype of half inputs."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            proj: TDLinear = getattr(self, name)
            bias = None if proj.bias is None else proj.bias.to(dtype)
            out[name] = (proj.weight.to(dtype), bias)
        return out

    def _attend_cumulative(
        self,
        q_cum: torch.Tensor,
        k_cum: torch.Tensor,
        v_cum: torch.Tensor,
        params: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
        mask: torch.Tensor | None,
        is_causal: bool,
        self_attention: bool,
    ) -> torch.Tensor:
        """Project cumulative inputs ``[T, B, L, E]``, attend per head, merge: the cumulative attention output."""
        t, b, length, e = q_cum.shape
        s = k_cum.shape[2]
        h, d = self.num_heads, self.head_dim
        (wq, bq), (wk, bk), (wv, bv) = params["q_proj"], params["k_proj"], params["v_proj"]
        if self_attention:
            packed_b = None if bq is None or bk is None or bv is None else torch.cat([bq, bk, bv])
            q, k, v = F.linear(q_cum, torch.cat([wq, wk, wv]), packed_b).chunk(3, dim=-1)
        else:
            q = F.linear(q_cum, wq, bq)
            k = F.linear(k_cum, wk, bk)
            v = F.linear(v_cum, wv, bv)
        # [T, B, L, E] -> [T*B, H, L, D] (views), the layout of torch's fast kernels
        q = q.reshape(t * b, length, h, d).transpose(1, 2)
        k = k.reshape(t * b, s, h, d).transpose(1, 2)
        v = v.reshape(t * b, s, h, d).transpose(1, 2)
        if mask is not None:
            if mask.dtype != torch.bool and mask.dtype != q.dtype:
                mask = mask.to(q.dtype)
            if mask.dim() == 4 and t > 1:
                mask = mask.unsqueeze(0).expand(t, *mask.shape).reshape(t * b, h, length, s)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=is_causal)
        return y.transpose(1, 2).reshape(t, b, length, e)

    def forward(
        self,
        query_seq: torch.Tensor,
        key_seq: torch.Tensor,
        value_seq: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """Apply TD multi-head attention (positional order as ``nn.MultiheadAttention.forward``).

        Returns:
            ``(attn_output_seq, None)``; attention weights are not supported.
        """
        if need_weights:
            raise ValueError("TDMultiheadAttention only supports need_weights=False.")
        if key_padding_mask is not None:
            raise ValueError("TDMultiheadAttention does not support key_padding_mask.")
        if not average_attn_weights:
            raise ValueError("TDMultiheadAttention does not support average_attn_weights=False.")
        name = "TDMultiheadAttention"
        if self.streaming:
            for tensor in (query_seq, key_seq, value_seq):
                check_step(tensor, name)
            query_seq, key_seq, value_seq = (t.unsqueeze(0) for t in (query_seq, key_seq, value_seq))
        for tensor in (query_seq, key_seq, value_seq):
            self._check_input(tensor)
        _check_qkv(name, query_seq, key_seq, value_seq)
        b = query_seq.shape[1]
        if key_seq.shape[1] != b or value_seq.shape[1] != b:
            raise ValueError(
                f"{name} expects query_seq, key_seq, and value_seq to have the same batch size, "
                f"but got {b}, {key_seq.shape[1]}, and {value_seq.shape[1]}."
            )
        if key_seq.shape[2] != value_seq.shape[2]:
            raise ValueError(
                f"{name} expects key_seq and value_seq to have the same sequence length, "
                f"but got {key_seq.shape[2]} and {value_seq.shape[2]}."
            )
        if is_causal and attn_mask is not None:
            raise ValueError(
                f"{name} does not allow attn_mask when is_causal=True; use one masking mode at a time."
            )
        mask = self._canonical_mask(attn_mask, b, query_seq.shape[2], key_seq.shape[2])
        acc = accumulation_dtype(query_seq.dtype)
        params = self._params(acc)
        self_attention = key_seq is query_seq and value_seq is query_seq
        first = not self._state
        if self.streaming:
            st = self._state
            q_cum = query_seq.to(acc, copy=True) if not st else st["q"] + query_seq
            k_cum = key_seq.to(acc, copy=True) if not st else st["k"] + key_seq
            v_cum = value_seq.to(acc, copy=True) if not st else st["v"] + value_seq
            a_cum = self._attend_cumulative(q_cum, k_cum, v_cum, params, mask, is_causal, self_attention)
            diff = a_cum if not st else a_cum - st["a"]
            self._state = {"q": q_cum, "k": k_cum, "v": v_cum, "a": a_cum}
        else:
            q_cum = cumsum_time(query_seq, acc)
            k_cum = q_cum if key_seq is query_seq else cumsum_time(key_seq, acc)
            v_cum = (
                k_cum
                if value_seq is key_seq
                else (q_cum if value_seq is query_seq else cumsum_time(value_seq, acc))
            )
            diff = difference(
                self._attend_cumulative(q_cum, k_cum, v_cum, params, mask, is_causal, self_attention)
            )
        wo, bo = params["out_proj"]
        out = F.linear(diff, wo)
        if bo is not None and (first or not self.streaming):
            out[0].add_(bo)  # the bias is counted once, at step 0
        if self.streaming:
            out = out[0]
        return out.to(query_seq.dtype), None

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"batch_first={self.batch_first}"
        )

"""``TDMultiheadAttention``: the fused TD form of ``nn.MultiheadAttention`` (packed, either layout).

It accumulates its inputs once, projects the cumulative inputs (the projections are affine, so that is the
cumulative of the TD projections), attends with the time axis folded into the batch, differences once, and
applies the output projection to the differences with its bias at step 0 only.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ann2snn_ops._base import TDModule
from ann2snn_ops._checks import check_step, check_time_sequence
from ann2snn_ops._cumsum import accumulation_dtype, cumsum_shared, difference
from ann2snn_ops._sdpa import check_mask_dtype, check_qkv
from ann2snn_ops.linear import TDLinear

__all__ = ["TDMultiheadAttention"]

_MHA = TypeVar("_MHA", bound="TDMultiheadAttention")


def _check_positive(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"TDMultiheadAttention: {name} must be a positive int, but got {value!r}.")
    return value


class TDMultiheadAttention(TDModule):
    """Temporal-difference multi-head attention, the packed subset of ``nn.MultiheadAttention``.

    ``out.cumsum(0)[t]`` equals ``nn.MultiheadAttention`` (same weights, ``need_weights=False``) applied to
    the cumulative inputs at step ``t``. The projections are ``TDLinear`` submodules (``q_proj``, ``k_proj``,
    ``v_proj``, ``out_proj``) whose parameters are used directly: the forward pass accumulates each input
    once, projects, attends with the time axis folded into the batch, differences once, and applies
    ``out_proj`` to the differences (bias at step 0). Masks follow ``nn.MultiheadAttention``: a bool mask
    marks **disallowed** positions, a float mask is added, and a 3-D mask has shape ``[B*H, L, S]``.
    A ``key_padding_mask`` ``[B, S]`` (bool: True = padding, or float: added) is constant over time: as in
    ``nn.MultiheadAttention``, it is turned into an additive float mask and added to ``attn_mask`` (the
    causal mask with ``is_causal=True`` and no ``attn_mask``). A query row whose keys are all masked gets a
    zero attention output (``out_proj``'s bias after the projection), as torch's reference path gives;
    torch's fused inference path (``torch._native_multi_head_attention``, taken under ``no_grad``) gives NaN
    there. Unlike ``nn.MultiheadAttention``, without a ``key_padding_mask`` ``is_causal=True`` is used alone
    (it builds the causal mask) and is rejected together with ``attn_mask``; with one, a given ``attn_mask``
    is the mask and ``is_causal`` only a hint about it (torch's semantics).

    Args:
        embed_dim: Model width ``E``.
        num_heads: Number of heads ``H``; must divide ``E``.
        dropout: Must be 0.0.
        bias: Whether the projections have biases.
        batch_first: ``[T, B, L, E]`` inputs (True) or sequence-first ``[T, L, B, E]`` (False, attended
            through batch-first views, the output transposed back).
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Shape:
        - query_seq: ``[T, B, L, E]``; key_seq, value_seq: ``[T, B, S, E]`` (one step ``[B, *, E]`` in
          streaming mode); with ``batch_first=False`` ``[T, L, B, E]`` and ``[T, S, B, E]``.
        - key_padding_mask: ``[B, S]``, bool or float.
        - attn_mask: ``[L, S]`` or ``[B*H, L, S]``.
        - Output: ``([T, B, L, E], None)`` (``[T, L, B, E]`` with ``batch_first=False``).

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
        >>> pad = torch.tensor([[False] * 5, [False, False, False, True, True]])  # sample 1: 3 tokens
        >>> y, _ = op(x, x, x, key_padding_mask=pad)
        >>> ref, _ = mha(x.sum(0), x.sum(0), x.sum(0), key_padding_mask=pad, need_weights=False)
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
                ``kdim``/``vdim`` different from ``embed_dim``, ``add_bias_kv``,
                ``add_zero_attn``, no packed ``in_proj_weight``.
        """
        return _from_nn_mha(cls, module)

    # -- computation --------------------------------------------------------------------------------------

    def _params(self, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """The projections' (weight, bias), cast (differentiably) to the accumulation dtype of half inputs."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        modules = self._modules
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            proj: TDLinear = modules[name]  # type: ignore[assignment]
            # the usual float32/float64 parameters are used as they are (a .to per tensor costs a call)
            weight: torch.Tensor = proj.weight if proj.weight.dtype == dtype else proj.weight.to(dtype)
            bias: torch.Tensor | None = proj.bias
            if bias is not None and bias.dtype != dtype:
                bias = bias.to(dtype)
            out[name] = (weight, bias)
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
            if mask.dim() == 4 and mask.shape[0] != 1 and t > 1:
                # a per-sample mask [B, H', L', S] (H', L' may be 1) for every step: [T*B, H', L', S]
                mask = mask.unsqueeze(0).expand(t, *mask.shape).flatten(0, 1)
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
        if not average_attn_weights:
            raise ValueError("TDMultiheadAttention does not support average_attn_weights=False.")
        name = "TDMultiheadAttention"
        if self.streaming:
            for tensor in (query_seq, key_seq, value_seq):
                check_step(tensor, name)
            query_seq, key_seq, value_seq = (t.unsqueeze(0) for t in (query_seq, key_seq, value_seq))
        self_attention = key_seq is query_seq and value_seq is query_seq
        if not self.batch_first:  # [T, L, B, E] -> batch-first views [T, B, L, E] (one per distinct input)
            views = {id(t): t.transpose(-3, -2) for t in (query_seq, key_seq, value_seq)}
            query_seq, key_seq, value_seq = (views[id(t)] for t in (query_seq, key_seq, value_seq))
        _check_inputs(
            self, query_seq, key_seq, value_seq, is_causal, attn_mask if key_padding_mask is None else None
        )
        b, length, s = query_seq.shape[1], query_seq.shape[2], key_seq.shape[2]
        mask = _canonical_mask(attn_mask, query_seq.dtype, b, self.num_heads, length, s)
        if key_padding_mask is not None:
            mask = _merge_key_padding(key_padding_mask, mask, is_causal, query_seq, b, length, s)
            is_causal = False  # the merged mask holds the causal mask, if any
        acc = accumulation_dtype(query_seq.dtype)
        params = self._params(acc)
        first = "a" not in self._state
        if self.streaming:
            self._check_stream_shapes(
                query_seq=query_seq.shape[1:], key_seq=key_seq.shape[1:], value_seq=value_seq.shape[1:]
            )
            st = self._state
            q_cum = query_seq.to(acc, copy=True) if first else st["q"] + query_seq
            k_cum = key_seq.to(acc, copy=True) if first else st["k"] + key_seq
            v_cum = value_seq.to(acc, copy=True) if first else st["v"] + value_seq
            a_cum = self._attend_cumulative(q_cum, k_cum, v_cum, params, mask, is_causal, self_attention)
            diff = a_cum if first else a_cum - st["a"]
            st.update(q=q_cum, k=k_cum, v=v_cum, a=a_cum)
        else:
            q_cum, k_cum, v_cum = cumsum_shared((query_seq, key_seq, value_seq), acc)
            diff = difference(
                self._attend_cumulative(q_cum, k_cum, v_cum, params, mask, is_causal, self_attention)
            )
        wo, bo = params["out_proj"]
        out = F.linear(diff, wo)
        if bo is not None and (first or not self.streaming):
            out[0].add_(bo)  # the bias is counted once, at step 0
        if not self.batch_first:
            out = out.transpose(-3, -2).contiguous()
        if self.streaming:
            out = out[0]
        return out.to(query_seq.dtype), None

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"batch_first={self.batch_first}"
        )


def _from_nn_mha(cls: type[_MHA], module: nn.MultiheadAttention) -> _MHA:
    """``TDMultiheadAttention.from_module``: checks, then splits the packed projections."""
    if not isinstance(module, nn.MultiheadAttention):
        raise TypeError(
            f"TDMultiheadAttention.from_module expects an nn.MultiheadAttention, but got {type(module).__name__}."
        )
    e = module.embed_dim
    if module.dropout != 0.0:
        raise ValueError("TD MHA conversion only supports dropout=0.0.")
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
    td = cls(
        e,
        module.num_heads,
        bias=b is not None,
        batch_first=module.batch_first,
        device=w.device,
        dtype=w.dtype,
    )
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


def _canonical_mask(
    attn_mask: torch.Tensor | None, query_dtype: torch.dtype, b: int, h: int, length: int, s: int
) -> torch.Tensor | None:
    """nn.MultiheadAttention mask -> SDPA mask broadcastable to ``[B, H, L, S]`` (bool: True = allowed)."""
    name = "TDMultiheadAttention"
    if attn_mask is None:
        return None
    attn_mask = _check_mask(attn_mask, "attn_mask", query_dtype)
    if attn_mask.dim() == 2:
        if tuple(attn_mask.shape) != (length, s):
            raise ValueError(
                f"{name} expects a 2-D attn_mask of shape (L, S) = {(length, s)}, "
                f"but got {tuple(attn_mask.shape)}."
            )
    elif attn_mask.dim() == 3:
        if tuple(attn_mask.shape) != (b * h, length, s):
            raise ValueError(
                f"{name} expects a 3-D attn_mask of shape (batch * num_heads, L, S) = "
                f"{(b * h, length, s)}, but got {tuple(attn_mask.shape)}."
            )
        attn_mask = attn_mask.view(b, h, length, s)
    else:
        raise ValueError(f"{name} expects a 2-D or 3-D attn_mask, but got shape {tuple(attn_mask.shape)}.")
    return ~attn_mask if attn_mask.dtype == torch.bool else attn_mask


def _check_mask(mask: object, arg: str, query_dtype: torch.dtype) -> torch.Tensor:
    """A mask argument of nn.MultiheadAttention (``attn_mask``, ``key_padding_mask``): a tensor, bool or
    floating point, and of a dtype SDPA accepts beside a query of ``query_dtype``."""
    name = "TDMultiheadAttention"
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} expects {arg} to be a tensor or None, but got {mask!r}.")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"{name} expects a bool or floating-point {arg} (as nn.MultiheadAttention), but got "
            f"{mask.dtype}; convert an int/uint8 mask with mask.bool()."
        )
    check_mask_dtype(name, mask, query_dtype, arg)
    return mask


def _merge_key_padding(
    key_padding_mask: object,
    mask: torch.Tensor | None,
    is_causal: bool,
    query: torch.Tensor,
    b: int,
    length: int,
    s: int,
) -> torch.Tensor:
    """``attn_mask`` (canonical, from :func:`_canonical_mask`) plus ``key_padding_mask`` ``[B, S]``, as one
    additive float mask broadcastable to ``[B, H, L, S]``, as ``F.multi_head_attention_forward`` merges them
    (bool masks become 0 / -inf in the query's dtype, then the two are added)."""
    name = "TDMultiheadAttention"
    key_padding_mask = _check_mask(key_padding_mask, "key_padding_mask", query.dtype)
    if tuple(key_padding_mask.shape) != (b, s):
        raise ValueError(
            f"{name} expects key_padding_mask of shape (batch, S) = {(b, s)}, "
            f"but got {tuple(key_padding_mask.shape)}."
        )
    dtype, device = query.dtype, query.device
    padding = _additive(key_padding_mask, dtype).view(b, 1, 1, s)
    if mask is None and is_causal:
        allowed = torch.ones(length, s, dtype=torch.bool, device=device).tril()
        mask = allowed  # canonical bool: True = allowed
    if mask is None:
        return padding
    if mask.dtype == torch.bool:
        mask = _additive(~mask, dtype)  # canonical bool masks mark the allowed positions
    return mask + padding


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = disallowed) as 0 / -inf in ``dtype`` (``F._canonical_mask``); a float mask as is."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def _check_inputs(
    op: TDMultiheadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, mask: object
) -> None:
    """Shapes [T, B, L, E] of matching batch, key/value length, dtypes (one, the parameters'), masking mode."""
    name = "TDMultiheadAttention"
    for x in (q, k, v):
        check_time_sequence(x, name)
        if x.dim() != 4:
            raise ValueError(
                f"{name} expects input with shape [T, batch, seq, embed_dim], but got {tuple(x.shape)}."
            )
        if x.shape[-1] != op.embed_dim:
            raise ValueError(
                f"{name} expects the last dimension to match embed_dim={op.embed_dim}, but got {x.shape[-1]}."
            )
    check_qkv(name, q, k, v)
    b = q.shape[1]
    if k.shape[1] != b or v.shape[1] != b:
        raise ValueError(
            f"{name} expects query_seq, key_seq, and value_seq to have the same batch size, "
            f"but got {b}, {k.shape[1]}, and {v.shape[1]}."
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(
            f"{name} expects key_seq and value_seq to have the same sequence length, "
            f"but got {k.shape[2]} and {v.shape[2]}."
        )
    w = op.q_proj.weight
    if q.dtype != w.dtype:
        raise TypeError(
            f"{name} expects query_seq, key_seq, and value_seq of the parameters' dtype {w.dtype} "
            f"(as nn.MultiheadAttention), but got {q.dtype}; convert the module with .to(dtype)."
        )
    if is_causal and mask is not None:
        raise ValueError(
            f"{name} does not allow attn_mask when is_causal=True; use one masking mode at a time."
        )

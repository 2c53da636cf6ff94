"""The handlers of :class:`~ann2snn_fx.td.fold.TDTimeFolded`'s fold mode, one function per op kind.

Each ``handler(mode, func, args, kwargs)`` computes ``func`` on time-folded tensors so that the cumulative
equivalence holds, or raises :class:`_Unsupported` (the op then runs unchanged and is reported).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ann2snn_fx.td.build import read_arg, shift_dim
from ann2snn_ops import (
    TDGELU,
    TDFunction,
    TDMatMul,
    TDMul,
    TDScaledDotProductAttention,
    TDSiLU,
    TDSoftmax,
    running_sum,
)

if TYPE_CHECKING:
    from ann2snn_fx.td.fold_mode import _FoldMode

Tensor = torch.Tensor
_Handler = Callable[["_FoldMode", Any, tuple[Any, ...], dict[str, Any]], Any]


def _leaves(value: Any, out: list[Tensor]) -> list[Tensor]:
    """The tensors in ``value`` (nested tuples, lists and dicts): a direct walk, cheaper than pytree's."""
    if isinstance(value, Tensor):
        out.append(value)
    elif isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, Tensor):
                out.append(item)
            elif isinstance(item, (tuple, list, dict)):
                _leaves(item, out)
    elif isinstance(value, dict):
        for item in value.values():
            _leaves(item, out)
    return out


_NAMES: dict[Any, str] = {}


def _name(func: Any) -> str:
    """A readable name of a torch function (``Tensor.view``, ``F.gelu``), cached per function."""
    try:
        return _NAMES[func]
    except (KeyError, TypeError):
        pass
    name = _name_of(func)
    with contextlib.suppress(TypeError):
        _NAMES[func] = name
    return name


def _name_of(func: Any) -> str:
    if isinstance(func, type):
        return func.__name__
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    qualname = qualname.replace("_TensorBase.", "Tensor.").replace("TensorBase.", "Tensor.")
    qualname = qualname.replace("_VariableFunctionsClass.", "")
    module = getattr(func, "__module__", None)
    if module and module.startswith("torch.nn.functional"):
        return f"F.{qualname}"
    if module == "torch._C._nn":
        return f"F.{qualname}"
    if qualname.startswith("Tensor."):
        return qualname
    return f"torch.{qualname}"


def _permutation(args: tuple[Any, ...]) -> list[int]:
    dims = args[1:]
    flat = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else list(dims)
    return [d % args[0].dim() for d in flat]


_SHARED: dict[Any, nn.Module] = {}


def _shared(key: Any, make: Callable[[], nn.Module]) -> nn.Module:
    """One TD operator instance per configuration, shared by every call (they keep no state outside
    streaming mode, which the fold mode never uses): building an ``nn.Module`` per op call costs more than
    the op on small tensors."""
    module = _SHARED.get(key)
    if module is None:
        module = _SHARED[key] = make()
    return module


def _plain_ok(*tensors: Any) -> bool:
    """Whether :func:`_td_nograd` may run: autograd does not record and the data is float32/float64
    (half inputs keep the TD operators' float32 running sums)."""
    return not _needs_grad(*tensors) and tensors[0].dtype in (torch.float32, torch.float64)


def _needs_grad(*tensors: Any) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


# Up to this many elements, ``torch.cumsum`` along the leading dim (one call) beats a per-step loop on CPU
# (3-5x at the sizes of small transformers; ann2snn-ops' ``running_sum`` switches at the same size) ...
_ONE_CALL_CUMSUM = 40_000
# ... and up to this many, the float64 step loop of the TD products and attention (``cumulative_exact``).
_ONE_CALL_CUMSUM_EXACT = 100_000


def _small(x: Tensor, limit: int = _ONE_CALL_CUMSUM) -> bool:
    """Whether ``torch.cumsum`` runs the running sum of ``x`` in one call (any non-CPU device, or at most
    ``limit`` elements)."""
    return x.numel() <= limit or not x.is_cpu


def _td_nograd(mode: _FoldMode, fn: Callable[..., Tensor], *xs: Tensor) -> Tensor:
    """``diff(fn(*cumsums))`` on the unfolded steps without autograd: one pass each (an input passed twice is
    summed once). Small results are differenced into a copy (two calls); large ones into the first running
    sum's buffer (dead once ``fn`` ran), which saves the memory of a copy."""
    cums: list[Tensor] = []
    for i, x in enumerate(xs):
        for j in range(i):
            if xs[j] is x:
                cums.append(cums[j])
                break
        else:
            cums.append(running_sum(mode.unfold(x)))  # torch.cumsum itself where it is fast
    y = fn(*cums)
    if _small(y):
        out = y.clone()
        if y.shape[0] > 1:
            out[1:].sub_(y[:-1])
        return out.flatten(0, 1)
    cum = cums[0]
    if y.shape != cum.shape or y.dtype != cum.dtype or any(y.data_ptr() == c.data_ptr() for c in cums):
        out = torch.empty_like(y)
    else:
        out = cum
    out[0].copy_(y[0])
    if y.shape[0] > 1:
        torch.sub(y[1:], y[:-1], out=out[1:])
    return out.flatten(0, 1)


def _direct_ok(*tensors: Tensor) -> bool:
    """Whether a product or attention may run as :func:`_td_nograd` on ``torch.cumsum`` running sums (bit for
    bit the running sums of the TD operators, which use ``torch.cumsum``'s float64 sum), instead of the
    operator's chunked step loop: no autograd, float32/float64, few elements per input, and no other
    ``TorchFunctionMode`` below the fold's (one that counts the TD operator modules' calls)."""
    dtype = tensors[0].dtype
    if torch._C._len_torch_function_stack():
        return False  # another mode sees the calls (the folded accounting): keep the TD operators as units
    return _plain_ok(*tensors) and all(
        t.dtype == dtype and _small(t, _ONE_CALL_CUMSUM_EXACT) for t in tensors
    )


def _product(
    mode: _FoldMode, module: type[nn.Module], op: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor
) -> Tensor:
    """``diff(op(cumsum(a), cumsum(b)))`` of two time-varying tensors of one rank: :func:`_td_nograd` where
    :func:`_direct_ok`, else the TD operator ``module`` (TDMul/TDMatMul)."""
    if _direct_ok(a, b):
        return _td_nograd(mode, op, a, b)
    return mode.td(_shared(module, module), a, b)


class _Unsupported(Exception):
    """An op the fold mode cannot make time-equivalent; it runs unchanged and is reported."""


# ---- handlers ---------------------------------------------------------------------------------
def _passthrough(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return func(*args, **kwargs)


def _sizes(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any] | None:
    """The target sizes of ``view``/``reshape`` (``x.view(2, 3)``, ``x.view((2, 3))``, ``shape=``), or None
    for the other forms (``x.view(dtype)``, ``view_as``, ``expand``)."""
    if func not in (Tensor.view, Tensor.reshape, torch.reshape):
        return None
    given = kwargs.get("shape", kwargs.get("size", args[1:]))
    if len(given) == 1 and isinstance(given[0], (tuple, list)):
        given = given[0]
    sizes = list(given)
    return sizes if sizes and all(isinstance(n, int) for n in sizes) else None


def _reshape(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        out = func(*args, **kwargs)
    except RuntimeError as error:
        # ``x.view(B, N, H, D)`` with a literal batch size B: the folded batch holds T * B samples
        sizes = _sizes(func, args, kwargs)
        x = args[0]
        advice = (
            f"TDTimeFolded: {_name(func)}{tuple(sizes) if sizes else ''} of a time-varying tensor of shape "
            f"{tuple(x.shape)} (T={mode.steps} time steps folded into its leading batch dim) failed: {error} "
            "Size the leading (batch) dim with -1 or from the tensor itself (x.size(0), x.shape[0]) "
            "rather than with a literal batch size."
        )
        if sizes is None or sizes[0] <= 0:
            raise ValueError(advice) from error
        try:
            out = func(x, (sizes[0] * mode.steps, *sizes[1:]))
        except RuntimeError:
            raise ValueError(advice) from error
        mode.done(func, "explicit leading size scaled by the T steps folded into the batch")
    for leaf in _leaves(out, []):
        if leaf.dim() == 0 or leaf.shape[0] % mode.steps != 0:
            raise _Unsupported("reshape that does not keep the time-folded batch as the leading dim")
    return out


def _no_dim0(*positions: tuple[int, str, Any], new_dim: bool = False) -> _Handler:
    """Linear ops whose dim arguments must not touch the time-folded batch dim 0 (``new_dim``: the dim
    indexes the output, one dim longer, as ``unsqueeze``'s does)."""

    def handler(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        rank = max(args[0].dim() + (1 if new_dim else 0), 1)
        for index, name, default in positions:
            value = kwargs[name] if name in kwargs else args[index] if len(args) > index else default
            if type(value) is int:  # the usual single dim
                if value % rank == 0:
                    raise _Unsupported(f"dim={value!r} mixes the time-folded batch")
                continue
            for dim in value if isinstance(value, (tuple, list)) else [value]:
                if dim is None or (isinstance(dim, int) and dim % rank == 0):
                    raise _Unsupported(f"dim={value!r} mixes the time-folded batch")
        return func(*args, **kwargs)

    return handler


def _pool_last(dims: int) -> _Handler:
    """Adaptive average pooling over the last ``dims`` dims: linear, time-transparent unless it pools dim 0."""

    def handler(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args[0].dim() <= dims:
            raise _Unsupported("pooling over the time-folded batch dim")
        return func(*args, **kwargs)

    return handler


def _getitem(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    index = args[1]
    first = index[0] if isinstance(index, tuple) and index else index
    if not (first is Ellipsis or first == slice(None)):
        raise _Unsupported("indexing the time-folded batch dim")
    return func(*args, **kwargs)


def _permute(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    order = _permutation(args)
    return mode.mark(func(*args, **kwargs), order.index(0))


def _cat(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    tensors = list(read_arg(args, kwargs, 0, "tensors", []))
    dim = read_arg(args, kwargs, 1, "dim", 0)
    reference = next(t for t in tensors if mode.is_time(t))
    if func is not torch.stack and dim % reference.dim() == 0:
        raise _Unsupported("concatenation along the time-folded batch dim")
    if func is torch.stack and dim % (reference.dim() + 1) == 0:
        raise _Unsupported("stacking along the time-folded batch dim")
    # an empty constant (a fresh cache, the legacy 1-D [0] tensor) contributes nothing
    fixed = [
        t if mode.is_time(t) else mode.impulse(t, reference) for t in tensors if mode.is_time(t) or t.numel()
    ]
    if len(fixed) != len(tensors) or any(a is not b for a, b in zip(fixed, tensors, strict=True)):
        mode.done(func, "constant members placed at t = 0 only")
    rest = {k: v for k, v in kwargs.items() if k != "tensors"}
    return func(fixed, *args[1:], **rest)


def _add(sign: int, reverse: bool = False) -> _Handler:
    """add/sub (``reverse`` for ``c - x`` written as ``x.__rsub__(c)``); constants go to t = 0."""

    def handler(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        a, b = args[0], read_arg(args, kwargs, 1, "other", None)
        if mode.is_time(a) and mode.is_time(b):
            return func(*args, **kwargs)
        scale = sign * kwargs.get("alpha", 1)
        if reverse:  # b - a
            time, constant = (-a, b) if mode.is_time(a) else (b, -a)
        elif mode.is_time(a):
            time, constant = a, b * scale
        else:
            time, constant = b * scale, a
        if isinstance(constant, Tensor) and not constant.is_floating_point() and constant.dim() > 0:
            raise _Unsupported("adding an integer tensor to a time sequence")
        mode.done(func, "constant added at t = 0 only")
        return mode.add_at_t0(time, constant)

    return handler


def _inplace(kind: str) -> _Handler:
    """In-place add/sub/mul/div on a time-varying tensor (``x += residual``, ``x *= scale``)."""

    def handler(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x, other = args[0], read_arg(args, kwargs, 1, "other", None)
        if not mode.is_time(x):
            raise _Unsupported("an in-place op that makes a constant tensor time-varying")
        if kind in ("add", "sub"):
            if mode.is_time(other):
                return func(*args, **kwargs)
            scale = kwargs.get("alpha", 1) * (1 if kind == "add" else -1)
            mode.done(func, "constant added at t = 0 only")
            return mode.add_at_t0_(x, other * scale)
        if mode.is_time(other):
            if kind == "div":
                raise _Unsupported("division by a time-varying tensor is a nonlinearity")
            mode.done(func, "-> TDMul")
            return x.copy_(_product(mode, TDMul, torch.mul, *torch.broadcast_tensors(x, other)))
        return func(*args, **kwargs)

    return handler


def _mul(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    a, b = args[0], read_arg(args, kwargs, 1, "other", None)
    if mode.is_time(a) and mode.is_time(b):
        mode.done(func, "-> TDMul")
        if a.shape != b.shape:
            if a.dim() == b.dim() and a.shape[0] == b.shape[0] and _direct_ok(a, b):
                return _td_nograd(mode, torch.mul, a, b)  # the running sums broadcast in the product
            a, b = torch.broadcast_tensors(a, b)
        if a.dtype != b.dtype:  # as torch.mul promotes (T5's float64 states times a float32 rsqrt)
            dtype = torch.result_type(a, b)
            a, b = a.to(dtype), b.to(dtype)
        return _product(mode, TDMul, torch.mul, a, b)
    return func(*args, **kwargs)


def _div(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    b = read_arg(args, kwargs, 1, "other", None)
    if mode.is_time(b):
        raise _Unsupported("division by a time-varying tensor is a nonlinearity")
    return func(*args, **kwargs)


def _matmul(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    a, b = args[0], args[1] if len(args) > 1 else next(iter(kwargs.values()))
    if mode.is_time(a) and mode.is_time(b):
        if a.dim() != b.dim():
            raise _Unsupported("matmul of two time sequences of different ranks")
        mode.done(func, "-> TDMatMul")
        if a.dim() < 3:
            return mode.td(_shared(TDMatMul, TDMatMul), a, b)
        return _product(mode, TDMatMul, torch.matmul, a, b)
    if (not mode.is_time(a) and a.dim() >= 3) or (not mode.is_time(b) and b.dim() >= 3):
        # a batched constant factor must not be mistaken for per-sample data of the folded batch
        raise _Unsupported("matmul with a batched constant factor")
    return func(*args, **kwargs)


def _unary(
    make: Callable[[tuple[Any, ...], dict[str, Any]], nn.Module],
    plain: Callable[[tuple[Any, ...], dict[str, Any]], Callable[[Tensor], Tensor]] | None = None,
) -> _Handler:
    """A TD operator of one time-varying tensor; ``plain(args, kwargs)``, when given, is the op on one
    cumulative tensor, run by :func:`_td_nograd` when autograd does not record (the TD operator's own
    fused path costs more dispatch on small tensors)."""

    def handler(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        module = make(args, kwargs)
        mode.done(func, f"-> {type(module).__name__}")
        x = args[0]
        if plain is not None and _plain_ok(x):
            return _td_nograd(mode, plain(args, kwargs), x)
        return mode.td(module, x)

    return handler


def _softmax(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    dim = read_arg(args, kwargs, 1, "dim", None)
    dtype = kwargs.get("dtype", read_arg(args, kwargs, 3 if func is F.softmax else 2, "dtype", None))
    if not isinstance(dim, int) or dim % x.dim() == 0:
        raise _Unsupported(f"softmax over dim={dim!r} mixes the time-folded batch")
    if dtype is not None:
        x = x.to(dtype)
    mode.done(func, "-> TDSoftmax")
    dim = shift_dim(dim)
    if _plain_ok(x):
        return _td_nograd(mode, lambda z: torch.softmax(z, dim), x)
    return mode.td(_shared((TDSoftmax, dim), lambda: TDSoftmax(dim=dim)), x)


def _gelu(args: tuple[Any, ...], kwargs: dict[str, Any]) -> nn.Module:
    approximate = read_arg(args, kwargs, 1, "approximate", "none")
    return _shared((TDGELU, approximate), lambda: TDGELU(approximate=approximate))


def _gelu_plain(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    approximate = read_arg(args, kwargs, 1, "approximate", "none")
    return lambda z: F.gelu(z, approximate=approximate)


def _silu(args: tuple[Any, ...], kwargs: dict[str, Any]) -> nn.Module:
    return _shared(TDSiLU, TDSiLU)


def _norm(kind: str) -> _Handler:
    """layer_norm/rms_norm: the normalisation as a TD op, then the affine part on the folded steps.

    The affine part is linear (weight on every step, bias at t = 0), and keeping it outside the TD
    op lets gradients reach the model's own weight and bias.
    """

    def handler(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        shape = read_arg(args, kwargs, 1, "normalized_shape", None)
        weight = read_arg(args, kwargs, 2, "weight", None)
        bias = read_arg(args, kwargs, 3, "bias", None) if kind == "layer" else None
        eps = read_arg(args, kwargs, 4 if kind == "layer" else 3, "eps", 1e-5 if kind == "layer" else None)
        if mode.is_time(weight) or mode.is_time(bias):
            raise _Unsupported("a time-varying weight or bias")
        x = args[0]
        if _plain_ok(x, weight, bias):
            # no autograd: the whole norm, affine part included, on the cumulative steps in one pass
            mode.done(func, "-> TDLayerNorm" if kind == "layer" else "-> TDRMSNorm")
            if kind == "layer":
                return _td_nograd(mode, lambda z: F.layer_norm(z, shape, weight, bias, eps), x)
            return _td_nograd(mode, lambda z: F.rms_norm(z, shape, weight, eps), x)
        if kind == "layer":
            td = TDFunction(lambda z: F.layer_norm(z, shape, None, None, eps), name="TDLayerNorm")
        else:
            td = TDFunction(lambda z: F.rms_norm(z, shape, None, eps), name="TDRMSNorm")
        mode.done(func, f"-> {td.name}")
        out = mode.td(td, args[0])
        if weight is not None:
            out = out * weight
        return out if bias is None else mode.add_at_t0_(out, bias)

    return handler


def _affine(bias_index: int, channel_dims: int | None) -> _Handler:
    """linear/conv: apply the weight to every step, the bias at t = 0 only (as TDLinear/TDConv2d)."""

    def handler(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        for a in (*args[1:], *kwargs.values()):  # weight, bias, stride, ...: tensors are never nested here
            if isinstance(a, Tensor) and mode.is_time(a):
                raise _Unsupported("a time-varying weight or bias")
        bias = read_arg(args, kwargs, bias_index, "bias", None)
        if bias is None:
            return func(*args, **kwargs)
        if "bias" in kwargs:
            out = func(*args, **{k: v for k, v in kwargs.items() if k != "bias"})
        else:
            out = func(*args[:bias_index], None, *args[bias_index + 1 :], **kwargs)
        mode.done(func, "bias added at t = 0 only")
        if channel_dims is not None:
            bias = bias.reshape(-1, *([1] * (out.dim() - 2)))
        elif (
            isinstance(bias, Tensor) and bias.dim() == 1 and out.dim() >= 1 and bias.shape[0] == out.shape[-1]
        ):
            out[: out.shape[0] // mode.steps].add_(bias)  # a linear layer's bias, on step 0
            return out
        return mode.add_at_t0_(out, bias)

    return handler


def time_mask_issue(name: str) -> str:
    """How an attention mask computed from the time inputs is reported (SDPA and multi-head attention)."""
    return f"{name} computed from the time inputs (the TD attention needs a mask constant over time)"


def step_mask(mode: _FoldMode, mask: Any, rows: int) -> Any:
    """One step of an attention mask met on the folded batch (SDPA and multi-head attention). ``rows`` is the
    leading size the TD attention expects (``B`` of a ``[B, S]`` padding mask or a ``[B, H, L, S]`` mask,
    ``B*H`` of a ``[B*H, L, S]`` mask); a mask with ``T*rows`` there was repeated over the steps (a static
    input with the batch as its leading dim, or a mask built from one) and loses the repeat. Other masks
    (``[L, S]``, broadcast) are returned as they are. Callers report a mask computed from the time inputs
    (:func:`time_mask_issue`) first."""
    if not isinstance(mask, Tensor) or mask.dim() == 0:
        return mask
    if mode.steps > 1 and mask.shape[0] == mode.steps * rows:
        with torch._C.DisableTorchFunction():
            return mode.unfold(mask)[0]
    return mask


def _sdpa(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    q, k, v = (read_arg(args, kwargs, i, n, None) for i, n in enumerate(("query", "key", "value")))
    if not (mode.is_time(q) and mode.is_time(k) and mode.is_time(v)):
        raise _Unsupported("attention whose query, key and value are not all time-varying")
    mask = read_arg(args, kwargs, 3, "attn_mask", None)
    dropout_p = read_arg(args, kwargs, 4, "dropout_p", 0.0)
    is_causal = read_arg(args, kwargs, 5, "is_causal", False)
    scale = read_arg(args, kwargs, 6, "scale", None)
    groups = 1
    if read_arg(args, kwargs, 7, "enable_gqa", False) and k.shape[-3] != q.shape[-3]:
        # grouped-query attention: each key/value head serves q_heads / kv_heads query heads
        if q.shape[-3] % k.shape[-3]:
            raise _Unsupported("enable_gqa=True with query heads not a multiple of key/value heads")
        groups = q.shape[-3] // k.shape[-3]
    if dropout_p != 0.0:
        raise _Unsupported("attention dropout draws a different mask at every time step")
    if mode.is_time(mask):
        raise _Unsupported(time_mask_issue("attn_mask"))
    folded_mask = mask  # as the plain call takes it: per sample of the folded batch, or broadcast
    if isinstance(mask, Tensor) and mask.dim() == q.dim():
        mask = step_mask(mode, mask, q.shape[0] // mode.steps)
    if is_causal and mask is not None:
        # SDPA ignores neither; keep the plain call's semantics by folding causality into the mask
        raise _Unsupported("is_causal=True together with attn_mask")
    mode.done(func, "-> TDScaledDotProductAttention")
    causal = bool(is_causal)
    if q.dim() >= 3 and q.dim() == k.dim() == v.dim() and _direct_ok(q, k, v):
        if isinstance(folded_mask, Tensor) and folded_mask.is_floating_point():
            folded_mask = folded_mask.to(q.dtype)  # as SDPA on the cumulative steps (ops' TD attention) does

        def attend(q_cum: Tensor, k_cum: Tensor, v_cum: Tensor) -> Tensor:
            y = F.scaled_dot_product_attention(
                q_cum.flatten(0, 1),
                k_cum.flatten(0, 1),
                v_cum.flatten(0, 1),
                attn_mask=folded_mask,
                is_causal=causal,
                scale=scale,
                enable_gqa=groups
                > 1,  # SDPA repeats the running sums' heads (as repeat_interleave, bit for bit)
            )
            return y.unflatten(0, (mode.steps, -1))

        return _td_nograd(mode, attend, q, k, v)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    module = _shared(
        (TDScaledDotProductAttention, causal, scale),
        lambda: TDScaledDotProductAttention(is_causal=causal, scale=scale),
    )
    return module(mode.unfold(q), mode.unfold(k), mode.unfold(v), mask).flatten(0, 1)


def _dropout(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    p = read_arg(args, kwargs, 1, "p", 0.5)
    training = read_arg(args, kwargs, 2, "training", True)
    if training and p != 0:
        raise _Unsupported("dropout in training mode draws a different mask at every time step")
    return func(*args, **kwargs)


def _masked_fill(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x, mask, value = (
        args[0],
        read_arg(args, kwargs, 1, "mask", None),
        read_arg(args, kwargs, 2, "value", None),
    )
    if mode.is_time(mask) or mode.is_time(value):
        raise _Unsupported("a time-varying mask or fill value")
    if isinstance(value, (int, float)) and value == 0:
        return func(*args, **kwargs)
    zeroed = func(x, mask, 0)
    filled = torch.zeros_like(x).masked_fill(mask, value)
    mode.done(func, "fill value placed at t = 0 only")
    return mode.add_at_t0(zeroed, filled)


def _pointwise(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A pointwise function of its first argument; the others must be constants that need no gradient."""
    x, rest = args[0], args[1:]
    extra = _leaves((rest, kwargs), []) if rest or kwargs else ()
    if not mode.is_time(x) or any(mode.is_time(a) or a.requires_grad for a in extra):
        raise _Unsupported("a pointwise op whose extra arguments are time-varying or trainable")
    mode.done(func, "-> TDFunction")
    if _plain_ok(x):
        return _td_nograd(mode, lambda z: func(z, *rest, **kwargs), x)
    return mode.td(TDFunction(lambda z: func(z, *rest, **kwargs), name=f"TD({_name(func)})"), x)


def _addmm(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``addmm``/``baddbmm(input, a, b, beta=, alpha=)`` = ``beta * input + alpha * (a @ b)`` (GPT-2's Conv1D,
    Bloom's alibi scores): the product as a TD matmul (or linear, with a constant side), a constant
    ``beta * input`` at t = 0 only."""
    names = (
        ("input", "batch1", "batch2")
        if func in (torch.baddbmm, Tensor.baddbmm)
        else ("input", "mat1", "mat2")
    )
    inp, a, b = (read_arg(args, kwargs, i, name, None) for i, name in enumerate(names))
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if args[3:] or any(isinstance(v, Tensor) for v in (beta, alpha)):
        raise _Unsupported(f"{_name(func)} with tensor or positional beta/alpha")
    if mode.is_time(a) and mode.is_time(b):
        product = (
            mode.td(_shared(TDMatMul, TDMatMul), a, b)
            if a.dim() < 3 or a.dim() != b.dim()
            else _product(mode, TDMatMul, torch.matmul, a, b)
        )
    elif mode.is_time(a) or mode.is_time(b):
        constant = b if mode.is_time(a) else a
        if (
            func in (torch.baddbmm, Tensor.baddbmm)
            and constant.shape[0] != (a if constant is b else b).shape[0]
        ):
            raise _Unsupported("baddbmm with a batched constant factor")
        product = torch.matmul(a, b)
    else:
        raise _Unsupported(f"{_name(func)} with a time-varying input but constant factors")
    if alpha != 1:
        product = product.mul_(alpha)
    mode.done(func, "beta * input at t = 0 only, alpha * (a @ b) every step")
    if beta == 0:
        return product
    term = inp if beta == 1 else inp * beta
    if mode.is_time(inp):
        return product.add_(term)
    return mode.add_at_t0_(product, term)


def _elementwise(fn: Callable[[Tensor], Tensor], inplace: bool = False) -> _Handler:
    """A TDFunction of ``fn``; in place (``relu_``, ``F.relu(x, inplace=True)``) the result is written back
    into the input, whose later readers (``F.relu(y, inplace=True); return f(y)``) rely on the mutation."""
    td = TDFunction(fn)
    base = _unary(lambda args, kwargs: td, lambda args, kwargs: fn)

    def handler(mode: _FoldMode, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        out = base(mode, func, args, kwargs)
        if inplace or kwargs.get("inplace") is True or (len(args) > 1 and args[1] is True):
            with torch._C.DisableTorchFunction():
                args[0].copy_(out)
            return args[0]
        return out

    return handler

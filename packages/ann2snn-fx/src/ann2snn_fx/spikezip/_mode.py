"""The placement rule, applied while a model runs: a TorchFunctionMode that quantises every operand of a product.

The mode sees every torch call of the model's forward (no fx tracing, so Hugging Face models work as they
are, like :class:`~ann2snn_fx.TDTimeFolded`). Tensors derived from the model's inputs are *activations*
(tracked by identity); an activation that is an operand of a product with a weight (``F.linear``, conv,
``addmm``) or with another activation (``matmul``/``bmm``/``@``, elementwise ``*``) goes through the
quantiser of its *site* first. Scaled dot-product attention is computed in its parts, so the attention
probabilities (unsigned, as every softmax/ReLU/sigmoid output) and ``V`` are quantised before their product.
A site is named by the module that runs it, the op, its occurrence in that module and the operand.
"""

from __future__ import annotations

import contextvars
import functools
import math
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

Tensor = torch.Tensor
SiteFn = Callable[[str, str, str, str, bool, Tensor], Tensor]
"""``site(key, module, op, operand, signed, x) -> x_quantised``."""

_MODULE_STACK: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("qann_modules", default=())
CURRENT_QUANT_MODE: contextvars.ContextVar[QuantMode | None] = contextvars.ContextVar(
    "qann_mode", default=None
)


def _push(name: str, module: nn.Module, args: Any) -> None:
    _MODULE_STACK.set((*_MODULE_STACK.get(), name))


def _pop(name: str, module: nn.Module, args: Any, output: Any) -> None:
    stack = _MODULE_STACK.get()
    if stack and stack[-1] == name:
        _MODULE_STACK.set(stack[:-1])


def install_name_hooks(model: nn.Module) -> None:
    """Forward hooks that keep the path of the running module (partials: they survive deepcopy and pickling)."""
    for name, module in model.named_modules():
        label = name or "<root>"
        module.register_forward_pre_hook(functools.partial(_push, label))
        module.register_forward_hook(functools.partial(_pop, label))


_WEIGHT_OPS: dict[Any, int] = {F.linear: 0, F.conv1d: 0, F.conv2d: 0, F.conv3d: 0, torch.addmm: 1}
_MATMULS = {Tensor.matmul, torch.matmul, Tensor.__matmul__, Tensor.__rmatmul__, Tensor.bmm, torch.bmm}
_MULS = {Tensor.mul, torch.mul, Tensor.__mul__, Tensor.__rmul__}
_NONNEG = {F.softmax, torch.softmax, Tensor.softmax, F.relu, torch.relu, Tensor.relu, torch.sigmoid}
_NONNEG |= {Tensor.sigmoid, F.sigmoid, torch.exp, Tensor.exp}
# ops that keep "non-negative" and "model input" status (views, copies, casts, eval-mode dropout)
_KEEP = {Tensor.view, Tensor.reshape, torch.reshape, Tensor.transpose, torch.transpose, Tensor.permute}
_KEEP |= {Tensor.contiguous, Tensor.flatten, torch.flatten, Tensor.unflatten, Tensor.to, Tensor.float}
_KEEP |= {
    Tensor.double,
    Tensor.half,
    Tensor.type_as,
    F.dropout,
    Tensor.clone,
    Tensor.expand,
    Tensor.unsqueeze,
}
_KEEP |= {Tensor.squeeze, Tensor.__getitem__, Tensor.chunk, Tensor.split, Tensor.unbind}


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    return {"__matmul__": "matmul", "__rmatmul__": "matmul", "__mul__": "mul", "__rmul__": "mul"}.get(
        name, name
    )


class QuantMode(TorchFunctionMode):
    """Routes the operands of products through ``site`` (see the module docstring)."""

    def __init__(self, site: SiteFn) -> None:
        super().__init__()
        self.site = site
        self._tags: dict[int, tuple[weakref.ReferenceType[Tensor], str]] = {}  # "act" | "input" | "nonneg"
        self._counts: Counter[tuple[str, str]] = Counter()
        self.left: Counter[str] = Counter()
        # a tensor quantised once is reused by its other products (q, k and v projections of one input)
        # (the quantised tensor lives as long as its source: the entry goes when the source is freed)
        self._done: dict[tuple[int, bool], tuple[weakref.ReferenceType[Tensor], Tensor]] = {}

    def tag(self, value: Any) -> str | None:
        if not isinstance(value, Tensor):
            return None
        entry = self._tags.get(id(value))
        return entry[1] if entry is not None and entry[0]() is value else None

    def mark(self, value: Any, tag: str) -> Any:
        for leaf in pytree.tree_leaves(value):
            if isinstance(leaf, Tensor) and leaf.is_floating_point():
                self._tags[id(leaf)] = (weakref.ref(leaf), tag)
        return value

    def quantise(self, func: Any, operand: str, x: Any, signed: bool | None = None) -> Any:
        tag = self.tag(x)
        if tag is None:
            return x
        if tag == "input":
            self.left[f"{_op_name(func)}: a model input (analog, enters at t = 0)"] += 1
            return x
        signed = tag != "nonneg" if signed is None else signed
        done = self._done.get((id(x), signed))
        if done is not None and done[0]() is x:
            return done[1]
        module = (_MODULE_STACK.get() or ("<root>",))[-1]
        op = _op_name(func)
        k = self._counts[(module, op + operand)]
        self._counts[(module, op + operand)] += 1
        key = f"{module}:{op}{k}:{operand}".replace(".", "/")
        out = self.mark(self.site(key, module, op, operand, signed, x), "act")
        self._done[(id(x), signed)] = (weakref.ref(x), out)
        weakref.finalize(x, self._done.pop, (id(x), signed), None)
        return out

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        tags = [self.tag(leaf) for leaf in pytree.tree_leaves((args, kwargs))]
        if not any(tags):
            return func(*args, **kwargs)
        if func in _WEIGHT_OPS:
            i = _WEIGHT_OPS[func]
            args = (*args[:i], self.quantise(func, "x", args[i]), *args[i + 1 :])
        elif func in _MATMULS or (func in _MULS and self.tag(args[0]) and self.tag(args[1])):
            args = (self.quantise(func, "a", args[0]), self.quantise(func, "b", args[1]), *args[2:])
        elif func is F.scaled_dot_product_attention:
            return self.mark(self.attention(*args, **kwargs), "act")
        out = func(*args, **kwargs)
        if func in _NONNEG:
            return self.mark(out, "nonneg")
        first = self.tag(args[0]) if args else None
        if func in _KEEP and first in ("input", "nonneg"):
            return self.mark(out, first)
        return self.mark(out, "act")

    def attention(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        """SDPA in its parts (scores, softmax, probabilities @ V), each product's operands quantised."""
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            groups = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        qq = self.quantise(torch.matmul, "q", query)
        kq = self.quantise(torch.matmul, "k", key)
        scores = torch.matmul(qq, kq.transpose(-2, -1)) * scale
        if is_causal:
            n, m = query.shape[-2], key.shape[-2]
            causal = torch.ones(n, m, dtype=torch.bool, device=query.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        probs = torch.softmax(scores, dim=-1)
        if dropout_p != 0.0:  # training (QAT): SDPA's dropout on the probabilities, before their quantiser
            probs = F.dropout(probs, dropout_p, training=True)
        probs = self.mark(probs, "nonneg")  # this mode is off inside its handler
        probs = self.quantise(torch.matmul, "probs", probs, signed=False)
        return torch.matmul(probs, self.quantise(torch.matmul, "v", value))

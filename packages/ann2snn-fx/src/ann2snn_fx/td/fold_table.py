"""The fold mode's dispatch table: torch function -> handler (:mod:`ann2snn_fx.td.fold_handlers`), and the
sets of functions the mode runs as they are (metadata, factories) or reports (nonlinearities).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ann2snn_fx.td.fold_handlers import (
    Tensor,
    _add,
    _addmm,
    _affine,
    _cat,
    _div,
    _dropout,
    _elementwise,
    _gelu,
    _gelu_plain,
    _getitem,
    _Handler,
    _inplace,
    _masked_fill,
    _matmul,
    _mul,
    _no_dim0,
    _norm,
    _passthrough,
    _permute,
    _pointwise,
    _pool_last,
    _reshape,
    _sdpa,
    _silu,
    _softmax,
    _unary,
)

_DIM1 = ((1, "dim", None),)
_HANDLERS: dict[Any, _Handler] = {}
_f: Any
_fn: Any
for _f in (
    Tensor.view,
    Tensor.reshape,
    torch.reshape,
    Tensor.view_as,
    Tensor.reshape_as,
    Tensor.expand,
    Tensor.expand_as,
    Tensor.repeat,
):
    _HANDLERS[_f] = _reshape
for _f in (
    Tensor.contiguous,
    Tensor.clone,
    torch.clone,
    Tensor.to,
    Tensor.float,
    Tensor.double,
    Tensor.half,
    Tensor.bfloat16,
    Tensor.type_as,
    Tensor.type,
    Tensor.detach,
    Tensor.neg,
    Tensor.__neg__,
    torch.neg,
    Tensor.__pos__,
    F.pad,
):
    _HANDLERS[_f] = _passthrough
_HANDLERS.update(
    {
        Tensor.__getitem__: _getitem,
        Tensor.transpose: _no_dim0((1, "dim0", None), (2, "dim1", None)),
        torch.transpose: _no_dim0((1, "dim0", None), (2, "dim1", None)),
        Tensor.swapaxes: _no_dim0((1, "axis0", None), (2, "axis1", None)),
        Tensor.flatten: _passthrough,
        torch.flatten: _passthrough,
        Tensor.unflatten: _no_dim0((1, "dim", None)),
        Tensor.squeeze: _no_dim0((1, "dim", None)),
        Tensor.unsqueeze: _no_dim0((1, "dim", None), new_dim=True),
        torch.unsqueeze: _no_dim0((1, "dim", None), new_dim=True),
        Tensor.sum: _no_dim0((1, "dim", None)),
        torch.sum: _no_dim0((1, "dim", None)),
        Tensor.mean: _no_dim0((1, "dim", None)),
        torch.mean: _no_dim0((1, "dim", None)),
        Tensor.split: _no_dim0((2, "dim", 0)),
        torch.split: _no_dim0((2, "dim", 0)),
        Tensor.chunk: _no_dim0((2, "dim", 0)),
        torch.chunk: _no_dim0((2, "dim", 0)),
        Tensor.unbind: _no_dim0((1, "dim", 0)),
        Tensor.narrow: _no_dim0((1, "dim", None)),
        Tensor.select: _no_dim0((1, "dim", None)),
        Tensor.permute: _permute,
        Tensor.roll: _no_dim0((2, "dims", None)),
        torch.roll: _no_dim0((2, "dims", None)),
        F.adaptive_avg_pool1d: _pool_last(1),
        torch.adaptive_avg_pool1d: _pool_last(1),
        F.adaptive_avg_pool2d: _pool_last(2),
        F.adaptive_avg_pool3d: _pool_last(3),
        torch.permute: _permute,
        torch.cat: _cat,
        torch.concat: _cat,
        torch.stack: _cat,
        Tensor.add: _add(1),
        torch.add: _add(1),
        Tensor.__add__: _add(1),
        Tensor.__radd__: _add(1),
        Tensor.sub: _add(-1),
        torch.sub: _add(-1),
        Tensor.__sub__: _add(-1),
        Tensor.__rsub__: _add(-1, reverse=True),
        Tensor.mul: _mul,
        torch.mul: _mul,
        Tensor.__mul__: _mul,
        Tensor.__rmul__: _mul,
        Tensor.div: _div,
        torch.div: _div,
        Tensor.__truediv__: _div,
        Tensor.matmul: _matmul,
        torch.matmul: _matmul,
        Tensor.__matmul__: _matmul,
        Tensor.bmm: _matmul,
        torch.bmm: _matmul,
        F.linear: _affine(2, None),
        F.conv1d: _affine(2, 1),
        F.conv2d: _affine(2, 2),
        F.conv3d: _affine(2, 3),
        F.softmax: _softmax,
        torch.softmax: _softmax,
        Tensor.softmax: _softmax,
        F.gelu: _unary(_gelu, _gelu_plain),
        F.silu: _unary(_silu, lambda args, kwargs: F.silu),
        F.layer_norm: _norm("layer"),
        F.rms_norm: _norm("rms"),
        F.scaled_dot_product_attention: _sdpa,
        F.dropout: _dropout,
        Tensor.masked_fill: _masked_fill,
        Tensor.add_: _inplace("add"),
        Tensor.__iadd__: _inplace("add"),
        Tensor.sub_: _inplace("sub"),
        Tensor.__isub__: _inplace("sub"),
        Tensor.mul_: _inplace("mul"),
        Tensor.__imul__: _inplace("mul"),
        Tensor.div_: _inplace("div"),
        Tensor.__itruediv__: _inplace("div"),
        torch.addmm: _addmm,
        Tensor.addmm: _addmm,
        torch.baddbmm: _addmm,
        Tensor.baddbmm: _addmm,
        torch.masked_fill: _masked_fill,
    }
)
for _f, _fn in (
    (torch.tanh, torch.tanh),
    (Tensor.tanh, torch.tanh),
    (F.tanh, torch.tanh),
    (torch.sigmoid, torch.sigmoid),
    (Tensor.sigmoid, torch.sigmoid),
    (F.sigmoid, torch.sigmoid),
    (torch.relu, torch.relu),
    (Tensor.relu, torch.relu),
    (F.relu, torch.relu),
):
    _HANDLERS[_f] = _elementwise(_fn)
for _f in (Tensor.relu_, torch.relu_, F.relu_):
    _HANDLERS[_f] = _elementwise(torch.relu, inplace=True)
_META: set[Any] = {
    Tensor.size,
    Tensor.dim,
    Tensor.numel,
    Tensor.shape.__get__,  # type: ignore[attr-defined]
    Tensor.dtype.__get__,  # type: ignore[attr-defined]
    Tensor.device.__get__,  # type: ignore[attr-defined]
    Tensor.ndim.__get__,  # type: ignore[attr-defined]
    Tensor.is_floating_point,
    Tensor.__len__,
    Tensor.requires_grad.__get__,  # type: ignore[attr-defined]
    Tensor.is_nested.__get__,  # type: ignore[attr-defined]
}
_SELF_ONLY: set[Any] = {Tensor.expand_as, Tensor.view_as, Tensor.reshape_as, Tensor.type_as, Tensor.to}
_FACTORIES: set[Any] = {
    Tensor.new_tensor,
    Tensor.new_zeros,
    Tensor.new_ones,
    Tensor.new_full,
    Tensor.new_empty,
    torch.zeros_like,
    torch.ones_like,
    torch.full_like,
    torch.empty_like,
}
# Pointwise functions of one time-varying tensor (further arguments constant): TDFunction makes them exact.
_POINTWISE: set[Any] = {
    torch.exp,
    Tensor.exp,
    torch.log,
    Tensor.log,
    torch.pow,
    Tensor.pow,
    Tensor.__pow__,
    torch.sqrt,
    Tensor.sqrt,
    torch.rsqrt,
    Tensor.rsqrt,
    torch.abs,
    Tensor.abs,
    torch.erf,
    Tensor.erf,
    torch.sin,
    torch.cos,
    torch.clamp,
    Tensor.clamp,
    F.elu,
    F.leaky_relu,
    F.relu6,
    F.hardtanh,
    F.hardswish,
    F.hardsigmoid,
    F.mish,
    F.softplus,
    F.selu,
    F.celu,
}
for _f in _POINTWISE:
    _HANDLERS[_f] = _pointwise
_NONLINEAR: set[Any] = {F.batch_norm, F.group_norm, F.instance_norm}

"""The torch.fx pass of :func:`ann2snn_fx.replace_by_td_operators`."""

from __future__ import annotations

import copy
import enum
import operator
from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx
from torch.fx.proxy import TraceError

from ann2snn_fx.td.build import build_td_module, check_mha_call, read_arg, shift_dim
from ann2snn_fx.td.report import TDConversionReport, TDNodeRecord
from ann2snn_fx.tracing import _resolve_string_annotations
from ann2snn_ops import (
    TDGELU,
    TDFunction,
    TDMatMul,
    TDModule,
    TDMul,
    TDMultiheadAttention,
    TDScaledDotProductAttention,
    TDSiLU,
    TDSoftmax,
)

__all__ = ["TDImpulse", "replace_by_td_operators_fx", "td_impulse"]


class _Kind(enum.Enum):
    CONST = "const"  # does not depend on the time-sequence inputs (parameters, literals, shapes)
    TIME = "time"  # a [T, ...] differential sequence
    TIME_SEQ = "time_seq"  # a tuple/list holding [T, ...] sequences (MHA output, split, chunk)
    SHAPE = "shape"  # the shape of a time sequence: constant, but its leading entries count T
    SHAPE_PREFIX = "shape_prefix"  # x.shape[:-k] (+ literal sizes): keeps [T, B, ...], valid for view/reshape


def td_impulse(constant: Any, reference: torch.Tensor) -> torch.Tensor:
    """A constant as a differential sequence: ``constant`` at t = 0, zeros after.

    Adding a constant ``c`` to a differential sequence must add it once: the cumulative sum then
    carries ``+ c`` at every step, which is what the ANN computes on the cumulative input.

    Args:
        constant: A tensor broadcastable against one step ``reference[0]``, or a Python number.
        reference: The ``[T, ...]`` sequence the constant is combined with.

    Returns:
        A ``[T, *constant.shape]`` tensor (with leading singleton dims added so it aligns with
        ``reference``'s trailing dims).

    Raises:
        ValueError: ``constant`` has more dims than one step of ``reference``.
    """
    if not isinstance(constant, torch.Tensor):
        constant = torch.as_tensor(constant, dtype=reference.dtype, device=reference.device)
    extra = reference.dim() - 1 - constant.dim()
    if extra < 0:
        raise ValueError(
            f"A constant of shape {tuple(constant.shape)} cannot be added at t = 0 to a time sequence of shape "
            f"{tuple(reference.shape)}: it has more dims than one time step."
        )
    step = constant.reshape((1,) * extra + tuple(constant.shape))
    steps = reference.shape[0]
    return torch.cat([step.unsqueeze(0), step.new_zeros((steps - 1, *step.shape))], dim=0)


class TDImpulse(nn.Module):
    """A stateless module calling :func:`td_impulse`: how a converted graph adds a constant at t = 0.

    :func:`replace_by_td_operators` emits a ``call_module`` to this module (registered at the root as
    ``td_impulse_<i>``) rather than a ``call_function`` to :func:`td_impulse`: a ``GraphModule`` loaded
    with ``torch.load`` re-traces its code with every module as a leaf, and would otherwise trace into
    :func:`td_impulse` and fail on its shape check.

    Shape:
        - constant: broadcastable against one step ``[*]`` of ``reference`` (or a Python number).
        - reference: ``[T, *]``.
        - Output: ``[T, *constant.shape]``, with leading singleton dims aligning it with ``reference``.

    Examples:
        >>> import torch
        >>> from ann2snn_fx.td import TDImpulse
        >>> TDImpulse()(torch.tensor([1.0, 2.0]), torch.zeros(3, 4, 2))
        tensor([[[1., 2.]],
        <BLANKLINE>
                [[0., 0.]],
        <BLANKLINE>
                [[0., 0.]]])
    """

    def forward(self, constant: Any, reference: torch.Tensor) -> torch.Tensor:
        """``constant`` at t = 0, zeros after (see :func:`td_impulse`)."""
        return td_impulse(constant, reference)


def _fn_name(target: Any) -> str:
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", repr(target))
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    if module.startswith("torch.nn.functional") or target in _FUNCTIONAL_ALIASES:
        return f"F.{name}"
    if module.startswith("torch"):
        return f"torch.{name}"
    return f"{module}.{name}" if module else name


_FUNCTIONAL_ALIASES: set[Any] = {F.linear, F.gelu, F.silu, F.scaled_dot_product_attention, F.conv2d}


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"call_module {type(gm.get_submodule(str(node.target))).__name__}"
    if node.op == "call_method":
        return f"call_method Tensor.{node.target}"
    return f"{node.op} {_fn_name(node.target)}"


def _key(node: fx.Node) -> Any:
    """The target of a call_function (a callable) or the name of a call_method (a str)."""
    return node.target


# Ops grouped by how they behave on a differential sequence. call_method targets are method names.
_SOFTMAX = {F.softmax, torch.softmax, "softmax"}
_GELU = {F.gelu}
_SILU = {F.silu, "silu"}
_ELEMENTWISE: dict[Any, Callable[[torch.Tensor], torch.Tensor]] = {
    torch.tanh: torch.tanh,
    F.tanh: torch.tanh,
    "tanh": torch.tanh,
    torch.sigmoid: torch.sigmoid,
    F.sigmoid: torch.sigmoid,
    "sigmoid": torch.sigmoid,
    torch.relu: torch.relu,
    F.relu: torch.relu,
    "relu": torch.relu,
}
_MATMUL = {torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm"}
_MUL = {operator.mul, torch.mul, "mul", operator.imul}
_DIV = {operator.truediv, torch.div, "div", torch.true_divide, operator.itruediv}
_ADD = {operator.add, torch.add, "add", operator.iadd}
_SUB = {operator.sub, torch.sub, "sub", operator.isub}
_NEG = {operator.neg, torch.neg, "neg"}
_CAT = {torch.cat, torch.concat, torch.stack}
_PASS = {
    "contiguous",
    "clone",
    "to",
    "float",
    "double",
    "half",
    "bfloat16",
    "type",
    "type_as",
    "detach",
    "view_as",
    "reshape_as",
    "expand_as",
    torch.clone,
    operator.pos,
}
_META = {
    "size",
    "dim",
    "numel",
    "ndimension",
    "nelement",
    getattr,
    len,
    torch.numel,
}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_floating_point"}
# op -> (index, keyword, default) of each dim argument
_DIMS: dict[Any, tuple[tuple[int, str, Any], ...]] = {
    torch.transpose: ((1, "dim0", None), (2, "dim1", None)),
    "transpose": ((0, "dim0", None), (1, "dim1", None)),
    torch.swapaxes: ((1, "axis0", None), (2, "axis1", None)),
    "swapaxes": ((0, "axis0", None), (1, "axis1", None)),
    torch.flatten: ((1, "start_dim", 0), (2, "end_dim", -1)),
    "flatten": ((0, "start_dim", 0), (1, "end_dim", -1)),
    torch.unflatten: ((1, "dim", None),),
    "unflatten": ((0, "dim", None),),
    torch.squeeze: ((1, "dim", None),),
    "squeeze": ((0, "dim", None),),
    torch.unsqueeze: ((1, "dim", None),),
    "unsqueeze": ((0, "dim", None),),
    torch.sum: ((1, "dim", None),),
    "sum": ((0, "dim", None),),
    torch.mean: ((1, "dim", None),),
    "mean": ((0, "dim", None),),
    torch.narrow: ((1, "dim", None),),
    "narrow": ((0, "dim", None),),
    torch.select: ((1, "dim", None),),
    "select": ((0, "dim", None),),
    torch.movedim: ((1, "source", None), (2, "destination", None)),
    "movedim": ((0, "source", None), (1, "destination", None)),
}
_SPLIT: dict[Any, tuple[int, str, Any]] = {
    torch.split: (2, "dim", 0),
    "split": (1, "dim", 0),
    torch.chunk: (2, "dim", 0),
    "chunk": (1, "dim", 0),
    torch.unbind: (1, "dim", 0),
    "unbind": (0, "dim", 0),
    torch.tensor_split: (2, "dim", 0),
    "tensor_split": (1, "dim", 0),
}
_SHAPE_WITH_SIZES = {"view", "reshape", "expand", "permute", "repeat", torch.reshape, torch.permute}
# Pointwise in their first argument: with literal extra arguments, TDFunction makes them exact.
_POINTWISE = {
    torch.exp,
    "exp",
    torch.log,
    "log",
    torch.pow,
    "pow",
    operator.pow,
    torch.sqrt,
    "sqrt",
    torch.rsqrt,
    "rsqrt",
    torch.abs,
    "abs",
    torch.erf,
    "erf",
    torch.clamp,
    "clamp",
    F.elu,
    F.leaky_relu,
    F.relu6,
    F.hardtanh,
    F.mish,
    F.softplus,
    F.hardswish,
    F.hardsigmoid,
    F.selu,
    F.celu,
}
_NONLINEAR = {torch.max, "max", torch.min, "min", torch.amax, "amax", F.layer_norm, F.rms_norm, F.conv2d}
_DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, "dropout"}
_SDPA = F.scaled_dot_product_attention


def _index_repr(index: Any) -> str:
    if isinstance(index, slice):
        parts = ["" if v is None else str(v) for v in (index.start, index.stop)]
        return f"[{parts[0]}:{parts[1]}]"
    return f"[{index!r}]"


def _dims_of(value: Any) -> list[int] | None:
    if isinstance(value, int):
        return [value]
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return list(value)
    return None


class _Pass:
    """State of one conversion: the GraphModule, the report and the kinds of the nodes seen."""

    def __init__(self, gm: fx.GraphModule, static_inputs: Collection[str]) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.static_inputs = set(static_inputs)
        self.report = TDConversionReport()
        self.kinds: dict[fx.Node, _Kind] = {}
        self.td_targets: dict[str, _Kind] = {}
        self.counters: dict[str, int] = {}
        self.impulse_name: str | None = None

    # ---- naming ----------------------------------------------------------------------------
    def add_root_module(self, prefix: str, module: nn.Module) -> str:
        index = self.counters.get(prefix, 0)
        while hasattr(self.gm, f"{prefix}_{index}"):
            index += 1
        self.counters[prefix] = index + 1
        name = f"{prefix}_{index}"
        module.train(self.gm.training)
        self.gm.add_submodule(name, module)
        return name

    def converted(self, node: fx.Node, op: str, detail: str) -> None:
        self.report.converted.append(TDNodeRecord(node.name, op, detail))

    def issue(self, node: fx.Node, detail: str) -> None:
        self.report.issues.append(TDNodeRecord(node.name, _describe(node, self.gm), detail))

    # ---- pass 1: modules (seed) --------------------------------------------------------------
    def replace_modules(self) -> None:
        built: dict[str, nn.Module | None] = {}
        mha_targets: set[str] = set()
        for node in list(self.graph.nodes):
            if node.op != "call_module" or not isinstance(node.target, str):
                continue
            target = node.target
            if target in built:
                # The seed validated only the first call site of a shared attention module.
                if target in mha_targets:
                    check_mha_call(node)
                    _positional_qkv(node)
                continue
            module = self.gm.get_submodule(target)
            # Building validates the module's configuration (TDMultiheadAttention.from_module, seed order),
            # before the call-site checks, as the seed does.
            replacement = build_td_module(module)
            if type(module) is nn.MultiheadAttention:
                mha_targets.add(target)
                check_mha_call(node)
                _positional_qkv(node)
            built[target] = replacement
            if replacement is None:
                continue
            parent_name, _, attr = target.rpartition(".")
            parent = self.gm.get_submodule(parent_name) if parent_name else self.gm
            setattr(parent, attr, replacement)
            is_mha = type(module) is nn.MultiheadAttention
            self.td_targets[target] = _Kind.TIME_SEQ if is_mha else _Kind.TIME
        for node in self.graph.nodes:
            if node.op == "call_module" and node.target in self.td_targets:
                replacement = self.gm.get_submodule(str(node.target))
                self.converted(node, f"call_module {node.target}", f"-> {type(replacement).__name__}")

    # ---- pass 2: scaled dot-product attention calls (seed, with keyword q/k/v) ----------------
    def replace_sdpa(self) -> None:
        for node in list(self.graph.nodes):
            if node.op != "call_function" or node.target is not _SDPA:
                continue
            args, kwargs = node.args, dict(node.kwargs)
            qkv = [read_arg(args, kwargs, i, name, None) for i, name in enumerate(("query", "key", "value"))]
            if any(v is None for v in qkv):
                raise ValueError("SDPA node must have query, key, and value arguments.")
            dropout_p = read_arg(args, kwargs, 4, "dropout_p", 0.0)
            if not isinstance(dropout_p, (int, float)) or dropout_p != 0.0:
                raise ValueError(
                    f"TD SDPA conversion only supports literal dropout_p=0.0, but got {dropout_p!r}."
                )
            enable_gqa = read_arg(args, kwargs, 7, "enable_gqa", False)
            if isinstance(enable_gqa, fx.Node) or enable_gqa:
                raise ValueError("TD SDPA conversion does not support enable_gqa=True.")
            is_causal = read_arg(args, kwargs, 5, "is_causal", False)
            if not isinstance(is_causal, bool):
                raise ValueError(
                    f"TD SDPA conversion only supports literal bool is_causal, but got {is_causal!r}."
                )
            scale = read_arg(args, kwargs, 6, "scale", None)
            if scale is not None and not isinstance(scale, (int, float)):
                raise ValueError(
                    f"TD SDPA conversion only supports literal numeric scale or None, but got {scale!r}."
                )
            attn_mask = read_arg(args, kwargs, 3, "attn_mask", None)
            module = TDScaledDotProductAttention(
                is_causal=is_causal, scale=None if scale is None else float(scale)
            )
            name = self.add_root_module("td_scaled_dot_product_attention", module)
            with self.graph.inserting_after(node):
                new = self.graph.call_module(name, args=(*qkv, attn_mask))
            node.replace_all_uses_with(new)
            self.graph.erase_node(node)
            self.td_targets[name] = _Kind.TIME
            self.converted(new, "call_function F.scaled_dot_product_attention", f"-> {name}")

    # ---- pass 3: kinds, functional conversions, constants, equivalence checks ----------------
    def kind(self, value: Any) -> _Kind:
        if isinstance(value, fx.Node):
            return self.kinds.get(value, _Kind.CONST)
        if isinstance(value, (tuple, list)):
            kinds = [self.kind(v) for v in value]
            return _Kind.TIME_SEQ if any(k in (_Kind.TIME, _Kind.TIME_SEQ) for k in kinds) else _Kind.CONST
        if isinstance(value, dict):
            return self.kind(list(value.values()))
        if isinstance(value, slice):
            return self.kind([value.start, value.stop, value.step])
        return _Kind.CONST

    def is_time(self, value: Any) -> bool:
        return self.kind(value) is _Kind.TIME

    def visit_shape(self, node: fx.Node) -> bool:
        """Shape queries on a time sequence; True when ``node`` was one (and has been classified)."""
        key, args, kwargs = node.target, node.args, dict(node.kwargs)
        x = args[0] if args else None
        if key is operator.getitem and isinstance(x, fx.Node) and self.kinds.get(x) is _Kind.SHAPE:
            index = args[1]
            bounds = [index.start, index.stop] if isinstance(index, slice) else [index]
            if not all(b is None or (isinstance(b, int) and b < 0) for b in bounds):
                self.issue(
                    node, f"shape{_index_repr(index)} of a [T, ...] time sequence counts the time axis"
                )
            prefix = isinstance(index, slice) and index.start is None and index.step is None
            self.kinds[node] = _Kind.SHAPE_PREFIX if prefix else _Kind.CONST
            return True
        if (
            key is operator.add
            and isinstance(x, fx.Node)
            and self.kinds.get(x) is _Kind.SHAPE_PREFIX
            and isinstance(args[1], tuple)
            and self.kind(args[1]) is _Kind.CONST
        ):
            self.kinds[node] = _Kind.SHAPE_PREFIX
            return True
        if not self.is_time(x):
            return False
        if key == "size" or (key is getattr and args[1] == "shape"):
            dim = read_arg(args, kwargs, 1, "dim", None) if key == "size" else None
            if dim is None:
                self.kinds[node] = _Kind.SHAPE
                return True
            if not (isinstance(dim, int) and dim < 0):
                self.issue(node, f"size({dim!r}) of a [T, ...] time sequence counts the time axis")
        elif key in ("dim", "ndimension", "numel", "nelement", len, torch.numel) or (
            key is getattr and args[1] == "ndim"
        ):
            self.issue(node, "the rank/size of a [T, ...] time sequence includes the time axis")
        else:
            return False
        self.kinds[node] = _Kind.CONST
        return True

    def swap(
        self, node: fx.Node, op_name: str, prefix: str, module: nn.Module, inputs: Iterable[Any]
    ) -> None:
        name = self.add_root_module(prefix, module)
        with self.graph.inserting_after(node):
            new = self.graph.call_module(name, args=tuple(inputs))
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        self.kinds[new] = _Kind.TIME
        self.converted(new, op_name, f"-> {name} ({type(module).__name__})")

    def impulse(self, node: fx.Node, value: Any, reference: fx.Node) -> fx.Node:
        """Insert, before ``node``, ``value`` at t = 0 (shaped after ``reference``): one shared TDImpulse."""
        if self.impulse_name is None:
            self.impulse_name = self.add_root_module("td_impulse", TDImpulse())
        with self.graph.inserting_before(node):
            new = self.graph.call_module(self.impulse_name, args=(value, reference))
        self.kinds[new] = _Kind.TIME
        return new

    def analyse(self) -> None:
        for node in list(self.graph.nodes):
            if node.op == "placeholder":
                self.kinds[node] = _Kind.CONST if node.target in self.static_inputs else _Kind.TIME
            elif node.op == "get_attr":
                self.kinds[node] = _Kind.CONST
            elif node.op == "call_module":
                self.visit_module(node)
            elif node.op in ("call_function", "call_method"):
                self.visit_call(node)

    def visit_module(self, node: fx.Node) -> None:
        target = str(node.target)
        if target in self.td_targets:
            self.kinds[node] = self.td_targets[target]
            return
        if self.kind((node.args, node.kwargs)) is _Kind.CONST:
            self.kinds[node] = _Kind.CONST
            return
        self.kinds[node] = _Kind.TIME
        module = self.gm.get_submodule(target)
        if isinstance(module, nn.Identity | TDModule | TDImpulse):  # already converted (converting twice)
            if isinstance(module, TDMultiheadAttention):
                self.kinds[node] = _Kind.TIME_SEQ
            return
        if isinstance(module, nn.modules.dropout._DropoutNd):
            if module.training and module.p > 0:
                self.issue(node, "dropout in training mode draws a different mask at every time step")
            return
        if isinstance(module, nn.Flatten):
            self.check_dims(node, [module.start_dim, module.end_dim])
            return
        if isinstance(module, nn.Unflatten):
            self.check_dims(node, [module.dim])
            return
        if isinstance(module, nn.MultiheadAttention | nn.Softmax):
            self.kinds[node] = _Kind.TIME_SEQ if isinstance(module, nn.MultiheadAttention) else _Kind.TIME
        self.issue(node, f"unconverted module {type(module).__name__} is not known to be time-transparent")

    def check_dims(self, node: fx.Node, dims: Iterable[Any]) -> None:
        bad = [d for d in dims if not (isinstance(d, int) and d < 0)]
        if bad:
            self.issue(
                node,
                f"shape op with dim(s) {bad} on a [T, ...] time sequence: a non-negative dim now counts the "
                "time axis (use negative dims, or TDTimeFolded)",
            )

    def visit_call(self, node: fx.Node) -> None:
        if self.visit_shape(node):
            return
        key = _key(node)
        args, kwargs = node.args, dict(node.kwargs)
        in_kind = self.kind((args, kwargs))
        if in_kind is _Kind.CONST:
            self.kinds[node] = _Kind.CONST
            return
        self.kinds[node] = _Kind.TIME
        op_name = _describe(node, self.gm)
        x = args[0] if args else None
        if key is getattr and args[1] not in _META_ATTRS:
            self.issue(node, f"attribute {args[1]!r} of a [T, ...] time sequence")
        elif key in _META:
            self.kinds[node] = _Kind.CONST
        elif key is operator.getitem:
            if self.kind(x) is _Kind.TIME_SEQ:
                return
            index = args[1]
            ok = index == slice(None) or (
                isinstance(index, tuple) and len(index) > 0 and index[0] is Ellipsis
            )
            if not ok:
                self.issue(
                    node, f"indexing a [T, ...] time sequence with {index!r} indexes the time axis first"
                )
        elif key in _SOFTMAX:
            dim = read_arg(args, kwargs, 1, "dim", None)
            dtype = kwargs.get("dtype", read_arg(args, kwargs, 3 if key is F.softmax else 2, "dtype", None))
            if not isinstance(dim, int) or not self.is_time(x):
                self.issue(node, f"softmax with dim={dim!r} cannot be converted (needs a literal int dim)")
                return
            source: Any = x
            if dtype is not None:
                with self.graph.inserting_before(node):
                    source = self.graph.call_method("to", (x, dtype))
                self.kinds[source] = _Kind.TIME
            self.swap(node, op_name, "td_softmax", TDSoftmax(dim=shift_dim(dim)), [source])
        elif key in _GELU:
            approximate = read_arg(args, kwargs, 1, "approximate", "none")
            if not isinstance(approximate, str) or not self.is_time(x):
                self.issue(node, "F.gelu needs a literal approximate and one time-sequence input")
                return
            self.swap(node, op_name, "td_gelu", TDGELU(approximate=approximate), [x])  # type: ignore[arg-type]
        elif key in _SILU:
            self.swap(node, op_name, "td_silu", TDSiLU(), [x])
        elif key in _ELEMENTWISE:
            self.swap(node, op_name, "td_function", TDFunction(_ELEMENTWISE[key]), [x])
        elif key in _MATMUL:
            other = read_arg(args, kwargs, 1, "mat2" if key in (torch.bmm, "bmm") else "other", None)
            if self.is_time(x) and self.is_time(other):
                self.swap(node, op_name, "td_matmul", TDMatMul(), [x, other])
        elif key in _MUL:
            other = read_arg(args, kwargs, 1, "other", None)
            if self.is_time(x) and self.is_time(other):
                self.swap(node, op_name, "td_mul", TDMul(), [x, other])
        elif key in _DIV:
            other = read_arg(args, kwargs, 1, "other", None)
            if not self.is_time(x) or self.is_time(other):
                self.issue(node, "division by a time-varying tensor is a nonlinearity")
        elif key in _ADD or key in _SUB:
            self.visit_affine(node)
        elif key in _NEG or key in _PASS:
            pass
        elif key is F.linear:
            self.visit_linear(node)
        elif key is F.layer_norm or key is F.rms_norm:
            self.visit_norm(node)
        elif key in _CAT:
            self.visit_cat(node)
        elif key in _DIMS:
            dims = []
            for index, name, default in _DIMS[key]:
                value = read_arg(args, kwargs, index + (1 if isinstance(key, str) else 0), name, default)
                dims += _dims_of(value) or [value]
            if key in ("sum", torch.sum, "mean", torch.mean, "squeeze", torch.squeeze) and dims == [None]:
                self.issue(node, "reduction or squeeze over all dims includes the time axis")
            else:
                self.check_dims(node, dims)
        elif key in _SPLIT:
            index, name, default = _SPLIT[key]
            self.kinds[node] = _Kind.TIME_SEQ
            value = read_arg(args, kwargs, index + (1 if isinstance(key, str) else 0), name, default)
            self.check_dims(node, _dims_of(value) or [value])
        elif key in _SHAPE_WITH_SIZES:
            sizes = args[1:]
            prefix = (
                len(sizes) == 1
                and isinstance(sizes[0], fx.Node)
                and self.kinds.get(sizes[0]) in (_Kind.SHAPE, _Kind.SHAPE_PREFIX)
            )
            if not (prefix and key in ("view", "reshape", torch.reshape)):
                self.issue(
                    node, "reshape/permute/expand with explicit sizes sees the extra leading time axis"
                )
        elif key in _DROPOUT:
            p = read_arg(args, kwargs, 1, "p", 0.5)
            training = read_arg(args, kwargs, 2, "training", True)
            if key == "dropout" or isinstance(training, fx.Node) or (training and p != 0):
                self.issue(node, "dropout in training mode draws a different mask at every time step")
        elif key is F.pad:
            value = read_arg(args, kwargs, 3, "value", None)
            if value not in (None, 0, 0.0):
                self.issue(node, f"padding with the constant {value!r} adds it at every time step")
        elif key in _POINTWISE and self.is_time(x):
            rest = (args[1:], kwargs)
            if self.kind(rest) is not _Kind.CONST or any(isinstance(a, fx.Node) for a in _leaves(rest)):
                self.issue(node, "pointwise op with non-literal extra arguments is not converted")
                return
            function = _BoundPointwise(key, args[1:], kwargs)
            self.swap(node, op_name, "td_function", TDFunction(function, name=f"TD({function})"), [x])
        elif key in _NONLINEAR or key in _POINTWISE:
            self.issue(node, "unconverted nonlinearity")
        else:
            self.issue(node, "op not known to be time-transparent")

    def visit_affine(self, node: fx.Node) -> None:
        args = list(node.args)
        operands = args[:2]
        reference = next((a for a in operands if self.is_time(a)), None)
        if not isinstance(reference, fx.Node):
            self.issue(node, "addition involving a non-tensor time-varying value")
            return
        changed = False
        for i, value in enumerate(operands):
            if self.kind(value) is _Kind.CONST and isinstance(value, (fx.Node, int, float)):
                args[i] = self.impulse(node, value, reference)
                changed = True
        if changed:
            node.args = tuple(args)
            self.converted(node, _describe(node, self.gm), "constant operand added at t = 0 only")

    def visit_norm(self, node: fx.Node) -> None:
        """F.layer_norm/F.rms_norm (norm subclasses traced through): TD normalisation, affine outside."""
        args, kwargs = node.args, dict(node.kwargs)
        layer = node.target is F.layer_norm
        x = args[0]
        shape = read_arg(args, kwargs, 1, "normalized_shape", None)
        weight = read_arg(args, kwargs, 2, "weight", None)
        bias = read_arg(args, kwargs, 3, "bias", None) if layer else None
        eps = read_arg(args, kwargs, 4 if layer else 3, "eps", 1e-5 if layer else None)
        literal = not any(isinstance(v, fx.Node) for v in _leaves([shape, eps]))
        if not self.is_time(x) or not literal or self.kind([weight, bias]) is not _Kind.CONST:
            self.issue(node, "normalisation with non-literal shape/eps or time-varying affine parameters")
            return
        norm = _BoundPointwise(
            F.layer_norm if layer else F.rms_norm,
            (shape, None, None, eps) if layer else (shape, None, eps),
            {},
        )
        name = self.add_root_module(
            "td_function", TDFunction(norm, name="TDLayerNorm" if layer else "TDRMSNorm")
        )
        with self.graph.inserting_before(node):
            out: fx.Node = self.graph.call_module(name, args=(x,))
            self.kinds[out] = _Kind.TIME
            if weight is not None:
                out = self.graph.call_function(operator.mul, args=(out, weight))
                self.kinds[out] = _Kind.TIME
            if bias is not None:
                add = self.graph.call_function(operator.add, args=(out, bias))
                add.args = (out, self.impulse(add, bias, out))
                out = add
                self.kinds[out] = _Kind.TIME
        node.replace_all_uses_with(out)
        self.graph.erase_node(node)
        self.converted(
            out, f"call_function {_fn_name(node.target)}", f"-> {name} (affine part outside, bias at t = 0)"
        )

    def visit_linear(self, node: fx.Node) -> None:
        args, kwargs = node.args, dict(node.kwargs)
        x = args[0]
        weight = read_arg(args, kwargs, 1, "weight", None)
        bias = read_arg(args, kwargs, 2, "bias", None)
        if not self.is_time(x) or self.kind(weight) is not _Kind.CONST or self.kind(bias) is not _Kind.CONST:
            self.issue(node, "F.linear with a time-varying weight or bias is not converted")
            return
        if bias is None:
            return
        with self.graph.inserting_before(node):
            no_bias = self.graph.call_function(F.linear, args=(x, weight))
        self.kinds[no_bias] = _Kind.TIME
        with self.graph.inserting_after(node):
            total = self.graph.call_function(operator.add, args=(no_bias, bias))
        node.replace_all_uses_with(total)
        self.graph.erase_node(node)
        self.kinds[total] = _Kind.TIME
        total.args = (no_bias, self.impulse(total, bias, no_bias))
        self.converted(total, "call_function F.linear", "bias added at t = 0 only (as TDLinear does)")

    def visit_cat(self, node: fx.Node) -> None:
        args, kwargs = node.args, dict(node.kwargs)
        tensors = read_arg(args, kwargs, 0, "tensors", [])
        dim = read_arg(args, kwargs, 1, "dim", 0)
        self.check_dims(node, [dim])
        if not isinstance(tensors, (list, tuple)):
            return
        reference = next((t for t in tensors if self.is_time(t)), None)
        if reference is None:
            return
        new_tensors = [t if self.is_time(t) else self.impulse(node, t, reference) for t in tensors]
        if any(a is not b for a, b in zip(new_tensors, tensors, strict=True)):
            if "tensors" in kwargs:
                node.update_kwarg("tensors", new_tensors)
            else:
                node.update_arg(0, new_tensors)
            self.converted(node, _describe(node, self.gm), "constant members placed at t = 0 only")


def _positional_qkv(node: fx.Node) -> None:
    """nn.MultiheadAttention names its inputs query/key/value, TDMultiheadAttention query_seq/...: pass them
    by position so keyword calls keep working."""
    kwargs = dict(node.kwargs)
    if not any(name in kwargs for name in ("query", "key", "value")):
        return
    qkv = [read_arg(node.args, kwargs, i, name, None) for i, name in enumerate(("query", "key", "value"))]
    for name in ("query", "key", "value"):
        kwargs.pop(name, None)
    node.args = (*qkv, *node.args[3:])
    node.kwargs = kwargs


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, dict):
        return _leaves(list(value.values()))
    return [value]


class _BoundPointwise:
    """``z -> target(z, *args, **kwargs)`` (or the method ``z.target(...)``) with literal extra arguments."""

    def __init__(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.target, self.args, self.kwargs = target, tuple(args), dict(kwargs)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if isinstance(self.target, str):
            return getattr(z, self.target)(*self.args, **self.kwargs)  # type: ignore[no-any-return]
        return self.target(z, *self.args, **self.kwargs)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        name = self.target if isinstance(self.target, str) else _fn_name(self.target)
        extra = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{name}({', '.join(['x', *extra])})"


def _td_leaves(tracer_class: type[fx.Tracer]) -> type[fx.Tracer]:
    """``tracer_class`` that also keeps TD operators (a model converted before) as leaves."""

    class _Tracer(tracer_class):  # type: ignore[valid-type,misc]
        def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
            return isinstance(m, TDModule | TDImpulse) or bool(
                super().is_leaf_module(m, module_qualified_name)
            )

    return _Tracer


def _resolve_device(ann: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(ann.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def replace_by_td_operators_fx(
    ann: nn.Module,
    device: torch.device | str | None = None,
    *,
    strict: bool = False,
    static_inputs: Collection[str] = (),
    tracer_class: type[fx.Tracer] = fx.Tracer,
) -> fx.GraphModule:
    """Implementation of :func:`ann2snn_fx.replace_by_td_operators` (see there)."""
    if not isinstance(ann, nn.Module):
        raise TypeError(f"replace_by_td_operators expects an nn.Module, but got {type(ann).__name__}.")
    target_device = _resolve_device(ann, device)
    training = {name: module.training for name, module in ann.named_modules()}
    model = copy.deepcopy(ann)
    tracer = _td_leaves(tracer_class)()
    try:
        graph = tracer.trace(model)
    except TraceError as error:
        raise TraceError(
            f"replace_by_td_operators could not trace {type(ann).__name__} with torch.fx ({error}). Models with "
            "data-dependent control flow or *args unpacking of shapes (Hugging Face transformers, ...) convert "
            "with TDTimeFolded, which runs the model's own forward instead of tracing it."
        ) from error
    name = type(model).__name__ if isinstance(model, nn.Module) else "GraphModule"
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.to(target_device)
    state = _Pass(gm, static_inputs)
    state.replace_modules()
    state.replace_sdpa()
    state.analyse()
    _resolve_string_annotations(gm, type(tracer.root).forward)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    for qualname, module in gm.named_modules():
        module.training = training.get(qualname, gm.training)
    gm.td_report = state.report  # type: ignore[assignment]
    if strict:
        state.report.raise_if_not_equivalent()
    return gm

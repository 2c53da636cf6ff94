"""Accounting of SNNs that are not fx graphs: :class:`~ann2snn_fx.TDTimeFolded` and
:class:`~ann2snn_fx.SpikeZIPSNN` (spike-driven transformers, Hugging Face models included).

The model's forward runs under a ``TorchFunctionMode`` entered *below* the fold (and QANN) modes, so it sees
the calls those modes hand on: every ``F.linear``/conv/``mm``/``addmm``/``matmul``/``bmm`` and norm call.
Global module hooks keep the running module's path, count every neuron's events (``output / spike_unit``)
and count the TD product modules (``TDMatMul``, ``TDMul``, TD attention) as one unit each, their internal
calls (on cumulative sums) left out. An operand is *spikes* when it is a view of a neuron's output (same
storage base: the fold's reshapes, transposes and time unfolding are views); its events are then read from
the operand itself, so no structural map is needed: ``SOP = sum(|x / u| * fan-out)``, the fan-out uniform
(``MACs / x.numel()``) for linear, matmul and elementwise products and exact per position for convolutions.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ann2snn_fx.analysis._graph import is_neuron, layer_kind
from ann2snn_fx.analysis._hooks import EventCounter
from ann2snn_fx.td.fold import _CURRENT_MODE  # the running fold mode (package-internal handle)

__all__: list[str] = []

Tensor = torch.Tensor
_LINEAR = {F.linear: "linear", torch.mm: "matmul", torch.addmm: "addmm", torch.matmul: "matmul"}
_LINEAR |= {Tensor.matmul: "matmul", Tensor.__matmul__: "matmul", torch.bmm: "matmul", Tensor.bmm: "matmul"}
_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_NORMS = {F.layer_norm, F.rms_norm, F.group_norm}
_TD_PRODUCTS = {"TDMatMul": "matmul", "TDMul": "mul", "TDScaledDotProductAttention": "attention"}
_TD_PRODUCTS["TDMultiheadAttention"] = "mha"
_COUNTED = set(_LINEAR) | set(_CONVS) | _NORMS


@dataclass
class Row:
    """One counted call site (a weight layer, a product or a norm), summed over its calls."""

    order: int
    op: str
    spikes: bool
    source: str
    sop: float = 0.0
    mac: float = 0.0
    synapses: float = 0.0
    sources: list[str] = field(default_factory=list)


def _root(x: Tensor) -> Tensor:
    return x if x._base is None else x._base


def _conv_fanout(x: Tensor, nd: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """Per input position (one sample), how many products of the convolution read it (exact at borders)."""
    weight = args[1]
    rest = list(args[3:])
    names = ("stride", "padding", "dilation", "groups")
    opts = dict(zip(names, rest, strict=False)) | {k: v for k, v in kwargs.items() if k in names}
    x0 = torch.zeros((1, *x.shape[1:]), dtype=torch.float64, requires_grad=True)
    ones = torch.ones(weight.shape, dtype=torch.float64)
    with torch.enable_grad(), torch._C.DisableTorchFunction():
        z = _CONV_FN[nd](x0, ones, None, **opts)
        (grad,) = torch.autograd.grad(z.sum(), x0)
    return grad[0].float()


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _Tracker(TorchFunctionMode):
    """The module side: global hooks that keep the running module's path, count every neuron's events and
    remember its output (by storage base), and bracket the TD product modules."""

    def __init__(self, modules: dict[str, nn.Module], neuron_names: dict[int, str]) -> None:
        super().__init__()
        self.modules, self.neuron_names = modules, neuron_names
        self.names = {id(m): name for name, m in modules.items()}
        self.stack: list[str] = []
        self.inside_td = 0
        self.counters: dict[str, EventCounter] = {}
        self.neuron_order: dict[str, int] = {}
        self._spikes: dict[int, tuple[weakref.ReferenceType[Tensor], str, Any, Tensor | None]] = {}
        self._handles: list[Any] = []
        self._calls = 0

    def _td_product(self, module: nn.Module, kind: str, args: tuple[Any, ...]) -> None:
        raise NotImplementedError

    def __enter__(self) -> _Tracker:
        self._handles = [
            nn.modules.module.register_module_forward_pre_hook(self._pre),
            nn.modules.module.register_module_forward_hook(self._post),
        ]
        try:
            return super().__enter__()  # type: ignore[no-any-return]
        except BaseException:
            self._remove()
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        name = self.names.get(id(module))
        if name is not None:
            self.stack.append(name)
        kind = _TD_PRODUCTS.get(type(module).__name__)
        if kind is not None and self.inside_td == 0:
            self._td_product(module, kind, args)
        if kind is not None:
            self.inside_td += 1

    def _post(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if self.names.get(id(module)) is not None and self.stack:
            self.stack.pop()
        if type(module).__name__ in _TD_PRODUCTS:
            self.inside_td -= 1
        name = self.neuron_names.get(id(module))
        if name is not None and is_neuron(module):
            counter = self.counters.setdefault(name, EventCounter(module, True))
            absolute = _count_events(counter, out)
            self.neuron_order.setdefault(name, self._next())
            if isinstance(out, Tensor):
                root = _root(out)
                whole = absolute if root.numel() == out.numel() else None
                self._spikes[id(root)] = (weakref.ref(root), name, module.spike_unit, whole)

    def _next(self) -> int:
        self._calls += 1
        return self._calls

    def events(self, x: Any) -> tuple[str, Any, Tensor | None] | None:
        """``(neuron, spike_unit, the output's events if x spans it)`` when ``x`` is a view of a neuron's
        output, else None."""
        if not isinstance(x, Tensor):
            return None
        root = _root(x)
        entry = self._spikes.get(id(root))
        if entry is None or entry[0]() is not root:
            return None
        return entry[1], entry[2], (entry[3] if x.numel() == root.numel() else None)

    @staticmethod
    def counts(x: Tensor, unit: Any) -> Tensor | None:
        """``|events|`` per element of the spike operand ``x`` (None: a tensor unit on a strided root)."""
        with torch._C.DisableTorchFunction():
            if isinstance(unit, (int, float)):
                return (x.detach().abs() / unit).round()
            root = _root(x)
            if not root.is_contiguous():
                return None
            full = (root.detach() / unit).round().abs()
            return full.as_strided(x.size(), x.stride(), x.storage_offset() - root.storage_offset())


class FoldedAccounting(_Tracker):
    """Counts events, SOPs and MACs of one forward of a TD-folded model (see the module docstring)."""

    def __init__(
        self, modules: dict[str, nn.Module], neuron_names: dict[int, str], steps: int, batch: int
    ) -> None:
        super().__init__(modules, neuron_names)
        self.steps, self.batch = steps, batch
        self.rows: dict[str, Row] = {}
        self.occurrences: dict[tuple[str, str], int] = {}
        self._conv_cache: dict[Any, Tensor] = {}

    def _site(self, op: str) -> tuple[str, int]:
        path = self.stack[-1] if self.stack else "<root>"
        k = self.occurrences.get((path, op), 0)
        self.occurrences[(path, op)] = k + 1
        return path, k

    def record(
        self,
        kind: str,
        op: str,
        operands: list[tuple[str, Tensor]],
        macs: float,
        conv: Any = None,
        why: str = "",
    ) -> None:
        """One counted call: SOPs if every activation operand is spikes, else the ANN's MACs every step."""
        path, k = self._site(kind)
        module = self.modules.get(path)
        own = module is not None and layer_kind(module) == kind
        name = path if k == 0 and own else f"{path}:{kind}{k}"
        found = [(label, x, self.events(x)) for label, x in operands]
        analog = [label for label, _, ev in found if ev is None]
        if analog or not found:
            if not why:
                why = "analog operand(s): " + ", ".join(analog) if analog else "no activation operand"
            why = "a norm (analog values)" if kind == "norm" else why
            self.rows[name] = Row(self._next(), op, False, why, mac=macs)
            return
        row = Row(self._next(), op, True, "")
        for label, x, ev in found:
            assert ev is not None
            neuron, unit, whole = ev
            if conv is None and whole is not None:  # x spans the neuron's output: its events, counted
                row.sop += float(whole.sum()) * macs / max(x.numel(), 1)
            elif conv is None and isinstance(unit, (int, float)):  # values are exactly 0 or +-unit
                with torch._C.DisableTorchFunction():
                    row.sop += (
                        float(x.detach().abs().sum(dtype=torch.float64)) / unit * macs / max(x.numel(), 1)
                    )
            else:
                counts = self.counts(x, unit)
                if counts is None:
                    why = f"{label}: per-element spike unit on a strided view"
                    self.rows[name] = Row(self._next(), op, False, why, mac=macs)
                    return
                fan = (
                    self._conv_map(x, conv)
                    if conv is not None
                    else torch.full_like(counts[0], macs / x.numel())
                )
                row.sop += float((counts.sum(0) * fan).sum())
            if conv is not None:
                row.synapses += float(self._conv_map(x, conv).sum())
            else:
                row.synapses += macs / (self.steps * self.batch)
            row.sources.append(f"{label} <- {neuron}")
        row.mac = macs  # the ANN's MACs of this call (all T steps): the record keeps mac / T as ann_mac
        row.source = "; ".join(row.sources)
        self.rows[name] = row

    def _conv_map(self, x: Tensor, conv: tuple[int, tuple[Any, ...], dict[str, Any]]) -> Tensor:
        nd, args, kwargs = conv
        key = (tuple(x.shape[1:]), tuple(args[1].shape), repr(args[3:]), repr(sorted(kwargs.items())))
        if key not in self._conv_cache:
            self._conv_cache[key] = _conv_fanout(x, nd, args, kwargs).to(x.device)
        return self._conv_cache[key]

    def _td_product(self, module: nn.Module, kind: str, args: tuple[Any, ...]) -> None:
        tensors = [a for a in args if isinstance(a, Tensor)]
        if len(tensors) < 2:
            return
        with torch._C.DisableTorchFunction():
            macs = _product_macs(module, kind, tensors)
        if kind in ("matmul", "mul"):
            self.record(kind, type(module).__name__, [("a", tensors[0]), ("b", tensors[1])], macs)
        else:
            self.record(kind, type(module).__name__, [], macs, why="TD attention (analog operands)")

    # ---- dispatch ----------------------------------------------------------------------------
    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if func not in _COUNTED:
            return func(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        if self.inside_td == 0:
            out = func(*args, **kwargs)
            site = _call_site(func, args, kwargs, out)
            if site is not None:
                kind, op, candidates, macs, conv = site
                operands = [(label, t) for label, t in candidates if self._activation(t)]
                self.record(kind, op, operands, macs, conv=conv)
            return out
        return func(*args, **kwargs)

    def _activation(self, x: Tensor) -> bool:
        """An operand that carries data (not a weight): time-varying in the fold mode, else no Parameter."""
        mode = _CURRENT_MODE.get()
        if mode is not None:
            return mode.is_time(x) or self.events(x) is not None
        return not isinstance(x, nn.Parameter)


def _count_events(counter: EventCounter, out: Any) -> Tensor | None:
    """Add a neuron's ``[T, B, ...]`` output to its counter (signed and absolute events, summed over time);
    returns this call's absolute events ``[B, ...]``."""
    if not isinstance(out, Tensor) or out.dim() < 2:
        counter.add(out, "forward")  # the counter's own checks and messages
        return None
    with torch._C.DisableTorchFunction():
        unit: Any = counter.module.spike_unit
        signed = out.detach().sum(0, dtype=torch.float32).div_(unit)
        absolute = out.detach().abs().sum(0, dtype=torch.float32).div_(unit)
        if counter.signed is None or counter.absolute is None:
            counter.signed, counter.absolute, counter.mixed = signed, absolute.clone(), True
        else:
            counter.signed.add_(signed)
            counter.absolute.add_(absolute)
    return absolute


def _product_macs(module: nn.Module, kind: str, tensors: list[Tensor]) -> float:
    """MACs of a TD product module's call on ``[T, ...]`` sequences: the ANN's, once per step."""
    a, b = tensors[:2]
    if kind == "matmul":
        out = torch.matmul(torch.empty(a.shape, device="meta"), torch.empty(b.shape, device="meta"))
        return float(out.numel() * a.shape[-1])
    if kind == "mul":
        return float(torch.broadcast_shapes(a.shape, b.shape).numel())
    if kind == "attention" and len(tensors) >= 3:
        q, k, v = tensors[:3]
        return float(q.numel() // q.shape[-1] * k.shape[-2] * (q.shape[-1] + v.shape[-1]))
    e = int(getattr(module, "embed_dim", a.shape[-1]))  # mha on [T, B, L, E] (batch_first) or [T, L, B, E]
    seq = b.shape[-2] if getattr(module, "batch_first", False) else b.shape[1]
    return float(2 * a.numel() * e + 2 * b.numel() * e + 2 * a.numel() * seq)


def _call_site(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
) -> tuple[str, str, list[tuple[str, Tensor]], float, Any] | None:
    """``(kind, op, candidate operands, MACs, conv spec)`` of a counted functional call, or None."""
    if not isinstance(out, Tensor) or not args or not isinstance(args[0], Tensor):
        return None
    name = getattr(func, "__name__", str(func)).strip("_")
    if func in _NORMS:
        return "norm", f"F.{name}", [], 4.0 * args[0].numel(), None
    if func in _CONVS:
        macs = float(out.numel() * args[1][0].numel())
        return "conv", f"F.{name}", [("x", args[0])], macs, (_CONVS[func], args, kwargs)
    kind = _LINEAR[func]
    x, other = (args[1], args[2]) if kind == "addmm" else (args[0], args[1] if len(args) > 1 else None)
    if not isinstance(other, Tensor):
        return None
    macs = float(out.numel() * x.shape[-1])
    if kind == "linear":
        return "linear", "F.linear", [("x", x)], macs, None
    return kind, f"torch.{name}", [("a", x), ("b", other)], macs, None

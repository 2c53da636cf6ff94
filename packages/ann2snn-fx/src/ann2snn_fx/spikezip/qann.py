"""Quantised ANNs (QANNs) by the placement rule: :func:`prepare_qann`, :func:`calibrate_qann`, :class:`QANN`."""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ann2snn_fx.spikezip._mode import CURRENT_QUANT_MODE, QuantMode, install_name_hooks
from ann2snn_fx.td.fold import _CURRENT_MODE as _FOLD_MODE  # the running fold mode (package-internal)
from ann2snn_ops import Quantizer

__all__ = ["QANN", "QANNReport", "QuantSite", "calibrate_qann", "prepare_qann"]


@dataclass(frozen=True)
class QuantSite:
    """One quantiser placed by :func:`prepare_qann`: ``module`` ran ``op``, whose ``operand`` is quantised."""

    key: str
    module: str
    op: str
    operand: str
    signed: bool


@dataclass
class QANNReport:
    """What :func:`prepare_qann` quantised (``sites``) and which product operands it left alone and why."""

    sites: list[QuantSite] = field(default_factory=list)
    left: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"QANN: {len(self.sites)} quantisers"]
        lines += [
            f"  {s.module}: {s.op} operand {s.operand} ({'signed' if s.signed else 'unsigned'})"
            for s in self.sites
        ]
        lines += [f"  left unquantised: {why} (x{n})" for why, n in self.left.items()]
        return "\n".join(lines)


def _swap_batch_and_sequence(x: torch.Tensor) -> torch.Tensor:
    """``x.transpose(0, 1)``; inside the SNN's fold, ``[T*L, B, ...]`` <-> ``[T*B, L, ...]`` (time kept leading).

    A sequence-first input reaches the SNN as ``[T*L, B, E]`` (time folded into the sequence dim): a plain
    transpose would move the time-folded dim off dim 0. The view is rebuilt so that time stays leading, and
    tagged for both the fold and the quantisation modes like ``x``.
    """
    fold = _FOLD_MODE.get()
    if fold is None or fold.batch_dim(x) != 0:
        return x.transpose(0, 1)
    quant = CURRENT_QUANT_MODE.get()
    tag = quant.tag(x) if quant is not None else None
    with torch._C.DisableTorchFunction():
        out = fold.unfold(x).transpose(1, 2).flatten(0, 1)
    fold.mark(out, 0)
    if quant is not None and tag is not None:
        quant.mark(out, tag)
    return out


class _DecomposedMHA(nn.Module):
    """``nn.MultiheadAttention`` (self or cross, packed or separate projections) as linear + SDPA calls."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(
                "prepare_qann: nn.MultiheadAttention with add_bias_kv/add_zero_attn is not supported."
            )
        self.batch_first, self.num_heads, self.head_dim = mha.batch_first, mha.num_heads, mha.head_dim
        self.packed = mha._qkv_same_embed_dim
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
            setattr(self, name, getattr(mha, name))
        self.out_proj = mha.out_proj

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        m = self
        names = ("key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")
        opts = dict(zip(names, args)) | kwargs
        if opts.get("need_weights", True) is not False:
            raise ValueError("prepare_qann: nn.MultiheadAttention must be called with need_weights=False.")
        if not m.batch_first:  # the time-folded batch must stay on dim 0 in the SNN: work batch-first
            query, key, value = (_swap_batch_and_sequence(t) for t in (query, key, value))
        if m.packed:
            w_q, w_k, w_v = m.in_proj_weight.chunk(3)  # type: ignore[operator]
        else:
            w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
        b_q, b_k, b_v = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None, None, None)  # type: ignore[operator]
        b, n, e = query.shape
        h, d = m.num_heads, m.head_dim

        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, L, E] -> [B, H, L, D]
            return x.reshape(b, x.shape[1], h, d).transpose(1, 2)

        q, k, v = (
            heads(F.linear(query, w_q, b_q)),
            heads(F.linear(key, w_k, b_k)),
            heads(F.linear(value, w_v, b_v)),
        )
        mask = opts.get("attn_mask")
        padding = opts.get("key_padding_mask")
        if mask is not None and mask.dtype == torch.bool:
            mask = ~mask  # nn.MultiheadAttention: True = masked; SDPA: True = attend
        if padding is not None and padding.shape[0] != b and _FOLD_MODE.get() is not None:
            padding = padding.repeat(b // padding.shape[0], 1)  # sequence-first in the SNN: one per step
        if padding is not None:
            pad = padding.reshape(b, 1, 1, -1)
            pad = ~pad if pad.dtype == torch.bool else pad
            if mask is None:
                mask = pad
            elif mask.dtype == torch.bool and pad.dtype == torch.bool:
                mask = mask & pad
            else:
                raise ValueError("prepare_qann: mixing a bool and a float mask in nn.MultiheadAttention.")
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=bool(opts.get("is_causal", False))
        )
        out = F.linear(out.transpose(1, 2).reshape(b, n, e), m.out_proj.weight, m.out_proj.bias)
        return (out if m.batch_first else _swap_batch_and_sequence(out)), None


class QANN(nn.Module):
    """A quantised copy of a model: its forward runs the model with the quantisers of :attr:`sites` applied.

    Made by :func:`prepare_qann`; train it like any model (the quantisers' steps are parameters), calibrate
    it with :func:`calibrate_qann`, convert it with :func:`~ann2snn_fx.qann_to_snn`.

    Attributes:
        model: The wrapped copy of the model.
        quantizers: ``nn.ModuleDict`` of :class:`~ann2snn_ops.Quantizer` by site key.
        report: The :class:`QANNReport` of the placement.
    """

    def __init__(self, model: nn.Module, levels: int) -> None:
        super().__init__()
        self.model = model
        self.levels = levels
        self.quantizers = nn.ModuleDict()
        self.report = QANNReport()
        self._phase = "run"  # "discover" | "run" | "observe"
        self._observed: dict[str, list[torch.Tensor]] = {}
        self._pending = False  # placement still to be found (prepare_qann without example_inputs)

    @property
    def placed(self) -> bool:
        """Whether the quantisers are placed (False until the first forward when made without example inputs)."""
        return not self._pending

    def _site(
        self, key: str, module: str, op: str, operand: str, signed: bool, x: torch.Tensor
    ) -> torch.Tensor:
        if (self._phase == "discover" or self._pending) and key not in self.quantizers:
            self.quantizers[key] = Quantizer(self.levels, signed=signed).to(x.device)
            self.report.sites.append(QuantSite(key, module, op, operand, signed))
        if key not in self.quantizers:
            raise RuntimeError(
                f"QANN: the forward reached a product operand not seen by prepare_qann ({key}); pass "
                "example_inputs that take the same path through the model."
            )
        if self._phase == "observe":
            self._observed.setdefault(key, []).append(
                x.detach().flatten()[:: max(1, x.numel() // 20000)].float()
            )
            return x
        return self.quantizers[key](x)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        mode = QuantMode(self._site)
        for value in (*args, *kwargs.values()):
            mode.mark(value, "input")
        token = CURRENT_QUANT_MODE.set(mode)
        try:
            with mode:
                out = self.model(*args, **kwargs)
        finally:
            CURRENT_QUANT_MODE.reset(token)
        if self._phase == "discover" or self._pending:
            self.report.left = dict(mode.left)
            self._pending = False
        return out


def _check_levels(levels: Any) -> int:
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral) or levels < 2:
        raise ValueError(f"prepare_qann: levels must be an integer >= 2, but got {levels!r}.")
    return int(levels)


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def prepare_qann(model: nn.Module, levels: int = 16, *, example_inputs: Any = None) -> QANN:
    """A quantised copy of ``model``: every operand of a product with a weight or another activation is quantised.

    The rule (SPEC 14.1): the input of each ``F.linear``/conv/``addmm`` (so of every ``nn.Linear``,
    ``nn.Conv*`` and GPT-2 ``Conv1D``), both operands of ``matmul``/``bmm``/``@`` and of elementwise products
    of two activations, and in scaled dot-product attention query, key, value and the attention probabilities
    (which SDPA would hide, so it is computed in its parts). ``nn.MultiheadAttention`` modules are rewritten
    into linear + attention calls (``batch_first`` either way: in the SNN a sequence-first model's inputs are
    ``[T, L, B, E]`` and its key padding mask ``[B, S]``). Operands produced by softmax, ReLU, sigmoid or exp (through views) get an
    unsigned quantiser, the rest a signed one. The model's own inputs stay analog (in the SNN they enter
    once at t = 0): the report lists them. No tracing: the placement is found by running ``example_inputs``
    through the model under a ``TorchFunctionMode``, so any model whose forward is plain torch works
    (Hugging Face BERT, ViT, GPT-2 ...); later forwards must take the same path. Without
    ``example_inputs`` the placement is found on the QANN's first forward (the first batch of
    :func:`calibrate_qann`, or of training: then create the optimiser after that first forward, since the
    quantisers' steps are new parameters); until then ``qann.placed`` is False and ``qann.report`` empty.

    The quantisers start uninitialised: call :func:`calibrate_qann` (post-training) or train (the first
    batch sets each step by LSQ's rule).

    Args:
        model: The float model (deep-copied; the caller's model is never changed). Use eval mode for PTQ.
        levels: Quantisation levels of every quantiser (>= 2).
        example_inputs: One batch as the model takes it: a tensor, a tuple of positional args or a dict of
            keyword args; None (default) to place the quantisers on the first forward.

    Returns:
        The :class:`QANN`; ``qann.report`` lists every quantiser placed and every operand left unquantised.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``levels`` is not an integer >= 2; an ``nn.MultiheadAttention`` call or configuration
            it cannot rewrite (``need_weights`` not False, ``add_bias_kv``, mixed bool/float masks).

    Examples:
        >>> import torch
        >>> from ann2snn_fx import calibrate_qann, prepare_qann
        >>> _ = torch.manual_seed(0)
        >>> ann = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2)).eval()
        >>> x = torch.randn(16, 4)
        >>> qann = prepare_qann(ann, levels=8, example_inputs=x)
        >>> [(s.module, s.op) for s in qann.report.sites]
        [('2', 'linear')]
        >>> qann.report.left
        {'linear: a model input (analog, enters at t = 0)': 1}
        >>> calibrate_qann(qann, [x]) is qann
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_qann expects an nn.Module, but got {type(model).__name__}.")
    levels = _check_levels(levels)
    copied = copy.deepcopy(model)
    if type(copied) is nn.MultiheadAttention:
        copied = _DecomposedMHA(copied)
    for name, module in list(copied.named_modules()):
        if type(module) is nn.MultiheadAttention:
            parent_name, _, attr = name.rpartition(".")
            parent = copied.get_submodule(parent_name) if parent_name else copied
            setattr(parent, attr, _DecomposedMHA(module))
    install_name_hooks(copied)
    qann = QANN(copied, levels)
    if example_inputs is None:
        qann._pending = True
        return qann
    qann._phase = "discover"
    try:
        with torch.no_grad():
            _call(qann, example_inputs)
    finally:
        qann._phase = "run"
    for quantizer in qann.quantizers.values():
        quantizer.initialized.fill_(False)  # type: ignore[operator]  # the discovery pass must not count as the first batch
    return qann


def _mse_scale(x: torch.Tensor, quantizer: Quantizer, grid: int = 64) -> float:
    """The step minimising the quantisation MSE of ``x``, searched over ``max|x| * a / n`` for a in (0, 1]."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError("calibrate_qann: the activations contain NaN or inf.")
    top = float(x.abs().max()) if x.numel() else 0.0
    if top == 0.0:
        return 1.0
    n = max(quantizer.n_max, -quantizer.n_min, 1)
    scales = top * torch.linspace(1.0 / grid, 1.0, grid, dtype=torch.float64) / n
    z = x.double().unsqueeze(0) / scales.unsqueeze(1)
    err = (
        ((torch.floor(z + 0.5).clamp(quantizer.n_min, quantizer.n_max) - z) * scales.unsqueeze(1))
        .pow(2)
        .mean(1)
    )
    return float(scales[int(err.argmin())])


def calibrate_qann(
    qann: QANN,
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    input_fn: Callable[[Any], Any] | None = None,
) -> QANN:
    """Post-training calibration: every quantiser's step from data, no training.

    The float activations at every site are observed over the batches (a strided subsample of at most about
    20 000 values per site and batch); each step is then the one minimising the quantisation MSE of its
    site's values, searched over 64 steps ``max|x| * a / n`` (``n`` the larger bound, ``a`` in (0, 1]).

    Args:
        qann: The :class:`QANN` (changed in place and returned).
        data: Batches: tensors, ``(inputs, target)`` pairs (the first item is used), dicts of keyword args.
        max_batches: Use at most this many batches.
        input_fn: Maps a batch to what the model takes (a tensor, a tuple of args or a dict of kwargs).

    Raises:
        TypeError: ``qann`` is not a :class:`QANN`.
        ValueError: ``data`` gave no batch, or the activations contain NaN/inf.
    """
    if not isinstance(qann, QANN):
        raise TypeError(f"calibrate_qann expects a QANN from prepare_qann, but got {type(qann).__name__}.")
    qann._observed = {}
    qann._phase = "observe"
    seen = 0
    try:
        with torch.no_grad():
            for batch in data:
                if max_batches is not None and seen >= max_batches:
                    break
                if input_fn is not None:
                    batch = input_fn(batch)
                elif isinstance(batch, list | tuple) and not isinstance(batch, torch.Tensor):
                    batch = batch[0]
                _call(qann, batch)
                seen += 1
    finally:
        qann._phase = "run"
    if seen == 0:
        raise ValueError("calibrate_qann: data gave no batch.")
    for key, quantizer in qann.quantizers.items():
        values = qann._observed.get(key)
        if values and isinstance(quantizer, Quantizer):
            quantizer.set_scale(_mse_scale(torch.cat(values), quantizer))
    qann._observed = {}
    return qann

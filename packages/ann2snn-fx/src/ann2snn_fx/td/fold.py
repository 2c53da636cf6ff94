"""TD conversion of any model by folding time into the batch: :class:`TDTimeFolded`."""

from __future__ import annotations

import contextvars
import copy
import functools
from collections.abc import Collection
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from ann2snn_fx.td.build import build_td_module, check_mha_call_args, read_arg
from ann2snn_fx.td.fold_cache import cache_layers, layer_tensors
from ann2snn_fx.td.fold_fuse import FUSED, install_fused_forwards
from ann2snn_fx.td.fold_handlers import step_mask, time_mask_issue
from ann2snn_fx.td.fold_mode import _FoldMode
from ann2snn_fx.td.fold_probe import _RecordingMode, is_plain, shape_mismatches, signature
from ann2snn_fx.td.layers import make_traceable, sequence_first_layers
from ann2snn_fx.td.report import TDConversionReport, TDNodeRecord

__all__ = ["TDTimeFolded"]

Tensor = torch.Tensor

_CURRENT_MODE: contextvars.ContextVar[_FoldMode | None] = contextvars.ContextVar("td_fold_mode", default=None)
_PROBED_SIGNATURES = 64
"""The shape probe's verdicts kept per model (one per input signature; the oldest is dropped beyond)."""


class _FoldedMultiheadAttention(nn.Module):
    """Stands in for an ``nn.MultiheadAttention`` inside :class:`TDTimeFolded` (unfolds, runs TD, folds)."""

    def __init__(self, td: nn.Module) -> None:
        super().__init__()
        self.td = td
        # what code around an nn.MultiheadAttention reads of it (torch's own layers read batch_first)
        self.batch_first = True
        self.embed_dim = getattr(td, "embed_dim", None)
        self.num_heads = getattr(td, "num_heads", None)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, None]:
        mode = _CURRENT_MODE.get()
        check_mha_call_args((query, key, value, *args), kwargs)
        # in a fused module's call (fold_fuse): cumulative inputs, the folded batch as one step
        if FUSED.get():
            return self._cumulative(query, key, value, args, kwargs)
        if mode is None or not all(mode.is_time(t) for t in (query, key, value)):
            raise ValueError("TDTimeFolded: multi-head attention needs time-varying query, key and value.")
        attn_mask = read_arg((query, key, value, *args), kwargs, 5, "attn_mask", None)
        is_causal = read_arg((query, key, value, *args), kwargs, 7, "is_causal", False)
        padding = read_arg((query, key, value, *args), kwargs, 3, "key_padding_mask", None)
        batch = query.shape[0] // mode.steps
        for name, mask in (("key_padding_mask", padding), ("attn_mask", attn_mask)):
            if mode.is_time(mask):  # reported; step 0 is used
                mode.issue(nn.MultiheadAttention, time_mask_issue(name))
        if mode.watch is not None:  # a module's checked call (fold_fuse): masks that differ between steps
            mode.watch.constants([padding, attn_mask], per_sample=True)
        padding = step_mask(mode, padding, batch)
        if isinstance(attn_mask, Tensor):
            rows = batch * (self.num_heads or 1) if attn_mask.dim() == 3 else query.shape[1]
            attn_mask = step_mask(mode, attn_mask, rows)
        with torch._C.DisableTorchFunction():
            out = self._attend(mode.unfold, query, key, value, padding, attn_mask, is_causal).flatten(0, 1)
        mode.done(nn.MultiheadAttention, "-> TDMultiheadAttention")
        mode.mark(out)
        return out, None

    def _cumulative(
        self, query: Tensor, key: Tensor, value: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Tensor, None]:
        """The attention on cumulative ``[T*B, ...]`` inputs (the ANN's): the TD operator on one step. Masks
        repeated over the folded batch are used as they are; one step's (``[B, S]``, ``[B*H, L, S]``, which
        the op-by-op call applies at every step) is repeated over the steps."""
        mode = _CURRENT_MODE.get()
        steps = 1 if mode is None else mode.steps
        batch = query.shape[0] // steps
        full = (query, key, value, *args)
        padding = read_arg(full, kwargs, 3, "key_padding_mask", None)
        attn_mask = read_arg(full, kwargs, 5, "attn_mask", None)
        padding = _every_step(padding, batch, steps)
        if isinstance(attn_mask, Tensor) and attn_mask.dim() == 3:
            attn_mask = _every_step(attn_mask, batch * (self.num_heads or 1), steps)
        is_causal = read_arg(full, kwargs, 7, "is_causal", False)
        one_step = functools.partial(torch.unsqueeze, dim=0)
        return self._attend(one_step, query, key, value, padding, attn_mask, is_causal)[0], None

    def _attend(
        self,
        unfold: Any,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        padding: Any,
        attn_mask: Any,
        is_causal: Any,
    ) -> Tensor:
        """The TD attention on ``unfold`` of the inputs ``[T, ...]``: one view per distinct input, so that a
        self-attention (query is key is value) stays recognisable."""
        views = {id(t): unfold(t) for t in (query, key, value)}
        out, _ = self.td(
            views[id(query)],
            views[id(key)],
            views[id(value)],
            key_padding_mask=padding,
            need_weights=False,
            attn_mask=attn_mask,
            is_causal=is_causal,
        )
        return out  # type: ignore[no-any-return]


def _every_step(mask: Any, rows: int, steps: int) -> Any:
    """A mask with one step's ``rows`` as its leading dim, repeated over the ``steps`` of the folded batch;
    any other value as it is."""
    if isinstance(mask, Tensor) and mask.dim() >= 1 and steps > 1 and mask.shape[0] == rows:
        return mask.unsqueeze(0).expand(steps, *mask.shape).flatten(0, 1)
    return mask


def _mark_cache(mode: _FoldMode, key: int | str, layers: list[Any], steps: int, batch: int) -> None:
    """A key/value cache passed in (a known class, fold_cache) holds the TD-form keys and values a previous
    forward with the same ``[T, B]`` returned, ``[T*B, ...]``: they are time-varying (the new keys and
    values are appended to them). Refuses one of another leading size (an ANN's cache, another T or B)."""
    for index, layer in enumerate(layers):
        for tensor in layer_tensors(layer) or ():
            if tensor.dim() < 1 or tensor.shape[0] != steps * batch or not tensor.is_floating_point():
                raise ValueError(
                    f"TDTimeFolded: the key/value cache {key!r} holds, in layer {index}, a "
                    f"{str(tensor.dtype).removeprefix('torch.')} tensor of shape {tuple(tensor.shape)}, but "
                    f"expected the floating-point TD-form keys and values of a TDTimeFolded forward with the same "
                    f"[T, B] = {[steps, batch]} (leading dim T*B = {steps * batch}); pass the cache such a forward "
                    "returned, or none."
                )
            mode.mark(tensor)


class TDTimeFolded(nn.Module):
    """Run any model as a TD network by folding the time axis into the batch.

    The wrapped model (a deep copy of ``ann``) sees its time inputs as ``[T*B, ...]`` tensors, so its
    own reshapes, transposes, ``x.size(0)`` batch sizes and attention masks stay valid, whatever the
    Python code around them (no torch.fx tracing: Hugging Face models work as they are). During the
    forward, every torch op that touches a time-varying tensor is checked: linear and shape ops run
    unchanged; softmax, GELU, SiLU, tanh/sigmoid/relu, layer/RMS norm, scaled dot-product attention and
    products of two time-varying tensors run as the TD operators of ``ann2snn_ops`` on the unfolded
    ``[T, B, ...]`` view; biases and constants added to a time-varying tensor (positional and token-type
    embeddings, attention masks, ``F.linear``/conv biases) are applied at t = 0 only;
    ``nn.MultiheadAttention`` modules are replaced by ``TDMultiheadAttention`` (seed validation; their
    ``key_padding_mask`` and ``attn_mask``, static inputs repeated over the folded batch, are used once per
    step; a sequence-first one, ``batch_first=False``, is refused with ``ValueError``).
    Anything else touching time-varying data is recorded in :attr:`report` (and raises with
    ``strict=True``): ops on the folded batch dim, dropout in training mode, unconverted nonlinearities.
    A cast of time-varying data to a lower precision (Llama's RMSNorm computes in float32) rounds every
    step separately, so the equivalence then holds to that precision.

    A reshape with a literal batch size beside ``-1`` (``x.view(2, -1)`` with ``B = 2``) takes the ``T*B``
    folded samples for ``B``; where ``T`` divides the literal, nothing at dispatch time tells it from a
    legal reshape. The first forward with a new input signature (argument shapes, dtypes, devices, other
    values) therefore also runs the model on one step's batch (the ANN itself, ``T = 1``) and compares the
    shapes op by op: an op whose folded output is not the ANN's with the batch dim scaled by ``T`` is
    reported (and raises with ``strict=True``), with both shapes. Later forwards with that signature repeat
    the verdict without running the probe. It is skipped while hooks or another ``TorchFunctionMode`` watch
    the forward (they would see the extra run), and with ``shape_check=False``.

    Dispatch is cached per module, outermost first (the whole model, a layer, an MLP block, an RMS norm):
    a module's first call with given arguments (shapes, dtypes, devices, which are time-varying, the plain
    values of the others), autograd, ``T`` and training flags runs op by op as above; if every op of that
    call converted exactly (a TD nonlinearity inside, nothing reported, no in-place op, no attribute
    rebound, float32/float64 time-varying inputs and every output tensor time-varying, no hooks on its inner
    modules), later calls with the same key run it as one TD function, ``diff(forward(cumsum(x), static))``,
    with one running sum per input instead of one per nonlinearity, its inner modules not called; the
    report counts its ops as before. A transformers ``DynamicCache`` (Llama, GPT-2, Mistral, Qwen2 with
    ``use_cache=True``) takes part: its TD-form keys and values are summed before and differenced after the
    fused call. A module taking another object (another cache class) stays op by op.

    The key/value cache a decoder returns holds TD-form ``[T*B, ...]`` keys and values (their running sum over
    the steps is the ANN's on the cumulative input); passed back in (the next tokens, same ``[T, B]``), they are
    time-varying inputs. A cache of those classes holding tensors of another leading size (the ANN's own,
    another ``T`` or ``B``) is refused with ``ValueError``.
    Hooks on inner modules or global module hooks keep a module op by op (they would miss its inner calls),
    and nothing fuses while another ``TorchFunctionMode`` watches.

    Args:
        ann: The model. It is deep-copied; the caller's model is never modified, moved or re-moded.
        device: Device of the copy; default the first parameter's device, else CPU.
        time_inputs: Which forward arguments are time sequences ``[T, B, ...]``: positional indices and/or
            keyword names. Default: every floating-point tensor argument. Other tensor arguments are
            static; one whose leading dim equals ``B`` is repeated over the ``T`` steps (masks, ids).
        strict: Raise :class:`~ann2snn_fx.TDEquivalenceError` at the end of a forward that met ops
            breaking the cumulative equivalence.
        shape_check: Run the shape probe on the first forward of each input signature (see above).

    Attributes:
        report: The :class:`~ann2snn_fx.TDConversionReport` of the last forward (ops aggregated by kind).

    Shape:
        - Time inputs: ``[T, B, *ann_input_shape[1:]]``; static inputs as the ANN takes them.
        - Output: every time-varying tensor of the ANN's output (nested in tuples, dicts or
          ``ModelOutput``) as ``[T, B, ...]``; ``out.cumsum(0)[t] == ann(x.cumsum(0)[t])``.

    Examples:
        >>> import torch
        >>> from ann2snn_fx import TDTimeFolded
        >>> _ = torch.manual_seed(0)
        >>> ann = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Flatten(1), torch.nn.Softmax(1)).eval()
        >>> snn = TDTimeFolded(ann, strict=True)
        >>> x_seq = torch.randn(5, 3, 6)
        >>> torch.allclose(snn(x_seq).cumsum(0), ann(x_seq.cumsum(0).flatten(0, 1)).unflatten(0, (5, 3)), atol=1e-6)
        True
    """

    def __init__(
        self,
        ann: nn.Module,
        device: torch.device | str | None = None,
        *,
        time_inputs: Collection[int | str] | None = None,
        strict: bool = False,
        shape_check: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(ann, nn.Module):
            raise TypeError(f"TDTimeFolded expects an nn.Module, but got {type(ann).__name__}.")
        if device is None:
            first = next(ann.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.model = make_traceable(copy.deepcopy(ann)).to(device)
        seq_first = sequence_first_layers(self.model)
        if seq_first:
            raise ValueError(
                "TDTimeFolded folds time into the leading (batch) dim of the inputs, but the transformer "
                f"layer(s) {seq_first} are sequence-first (batch_first=False) and take the sequence there; "
                "convert this model with replace_by_td_operators (which handles both layouts), or build the "
                "layers with batch_first=True."
            )
        self.time_inputs = None if time_inputs is None else set(time_inputs)
        self.strict = strict
        self.shape_check = shape_check
        self._probed: dict[tuple[Any, ...], list[tuple[str, str]]] = {}
        self.report = TDConversionReport()
        self.training = ann.training
        for name, module in list(self.model.named_modules()):
            if type(module) is nn.MultiheadAttention:
                if not module.batch_first:
                    raise ValueError(
                        f"TDTimeFolded folds time into the leading (batch) dim of the inputs, but the "
                        f"nn.MultiheadAttention {name!r} is sequence-first (batch_first=False) and takes the "
                        "sequence there; convert this model with replace_by_td_operators (which handles both "
                        "layouts), or build it with batch_first=True."
                    )
                td = build_td_module(module)
                assert td is not None
                parent_name, _, attr = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                wrapper = _FoldedMultiheadAttention(td)
                wrapper.train(module.training)
                setattr(parent, attr, wrapper)
        install_fused_forwards(
            self.model, (_FoldedMultiheadAttention,)
        )  # leaf modules run as one TD function once checked (fold_fuse)

    def _is_time(self, key: int | str, value: Any) -> bool:
        if not isinstance(value, Tensor):
            return False
        if self.time_inputs is None:
            return value.is_floating_point()
        return key in self.time_inputs

    def _run(
        self,
        mode: _FoldMode,
        args: tuple[Any, ...] | list[Any],
        kwargs: dict[str, Any],
        time_keys: set[int | str],
        steps: int,
        batch: int,
    ) -> Any:
        """The wrapped model's forward under ``mode``, on the inputs with time folded into the batch."""

        def fold(key: int | str, value: Any) -> Any:
            if key in time_keys:
                return mode.mark(value.flatten(0, 1))
            if isinstance(value, Tensor):
                if value.dim() >= 1 and value.shape[0] == batch:
                    return value.unsqueeze(0).expand(steps, *value.shape).flatten(0, 1)
                return value
            layers = cache_layers(value)
            if layers is not None:
                _mark_cache(mode, key, layers, steps, batch)
            return value

        folded_args = [fold(i, v) for i, v in enumerate(args)]
        folded_kwargs = {k: fold(k, v) for k, v in kwargs.items()}
        token = _CURRENT_MODE.set(mode)
        try:
            with mode:
                return self.model(*folded_args, **folded_kwargs)
        finally:
            _CURRENT_MODE.reset(token)

    def _can_probe(self) -> bool:
        """Whether the shape probe's extra forward goes unseen: no other ``TorchFunctionMode`` (the folded
        accounting), no global or module forward hooks (``diagnose_td``, the activity counters)."""
        hooks = nn.modules.module
        if torch._C._len_torch_function_stack() or hooks._global_forward_hooks:
            return False
        if hooks._global_forward_pre_hooks:
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks for m in self.model.modules())

    def _probe_reference(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], time_keys: set[int | str], batch: int
    ) -> _RecordingMode | None:
        """The shape probe's reference: the forward on one step's batch (``T = 1``: the ANN), recorded op by
        op; its random draws and buffer updates (batch-norm statistics in training mode) are undone. None if
        that run fails (the folded forward then reports its own errors)."""

        def one_step(key: int | str, value: Any) -> Any:
            if key in time_keys:
                return value[:1].clone()
            return value if is_plain(value) else copy.deepcopy(value)

        mode = _RecordingMode(1)
        buffers = [(b, b.clone()) for b in self.model.buffers()]
        devices = sorted(
            {
                t.device.index if t.device.index is not None else torch.cuda.current_device()
                for t in [*args, *kwargs.values(), *(b for b, _ in buffers)]
                if isinstance(t, Tensor) and t.device.type == "cuda"
            }
        )
        try:
            step_args = [one_step(i, v) for i, v in enumerate(args)]
            step_kwargs = {k: one_step(k, v) for k, v in kwargs.items()}
            with torch.random.fork_rng(devices=devices):
                self._run(mode, step_args, step_kwargs, time_keys, 1, batch)
        except Exception:  # the folded forward raises its own, clearer error
            return None
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    if not torch.equal(buffer, saved):
                        buffer.copy_(saved)
        return mode

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model on time sequences; see the class docstring for shapes."""
        items: list[tuple[int | str, Any]] = [*enumerate(args), *kwargs.items()]
        times = [(key, value) for key, value in items if self._is_time(key, value)]
        if not times:
            raise ValueError(
                "TDTimeFolded expects at least one time-sequence tensor input [T, B, ...], but got none."
            )
        for key, value in times:
            if value.dim() < 2 or value.shape[0] == 0:
                raise ValueError(
                    f"TDTimeFolded expects time input {key!r} with shape [T, B, ...] and a non-empty time "
                    f"dimension, but got shape {tuple(value.shape)}."
                )
        steps, batch = times[0][1].shape[:2]
        for key, value in times:
            if tuple(value.shape[:2]) != (steps, batch):
                raise ValueError(
                    f"TDTimeFolded expects every time input to share [T, B] = {[steps, batch]}, but {key!r} has "
                    f"shape {tuple(value.shape)}."
                )
        time_keys = {key for key, _ in times}
        sig = signature(items, self.model.training) if self.shape_check and steps > 1 else None
        probe = sig is not None and sig not in self._probed and self._can_probe()
        reference = self._probe_reference(args, kwargs, time_keys, batch) if probe else None
        mode = _RecordingMode(steps) if probe else _FoldMode(steps)
        try:
            out = self._run(mode, args, kwargs, time_keys, steps, batch)
        except Exception as error:
            found = (
                shape_mismatches(reference, mode, reported=True)
                if isinstance(mode, _RecordingMode) and reference is not None
                else []
            )
            if not found:
                raise
            lines = "\n".join(f"  - {name}: {detail}" for name, detail in found)
            raise ValueError(
                f"TDTimeFolded: the forward failed ({type(error).__name__}: {error}) after op(s) whose "
                f"time-folded shape does not follow the ANN's:\n{lines}"
            ) from error
        if sig is not None:
            if probe:
                if len(self._probed) >= _PROBED_SIGNATURES:
                    del self._probed[next(iter(self._probed))]
                assert isinstance(mode, _RecordingMode)
                self._probed[sig] = [] if reference is None else shape_mismatches(reference, mode)
            for issue in self._probed.get(sig, ()):
                mode.issues[issue] += 1

        def unfold(value: Any) -> Any:
            if not isinstance(value, Tensor):
                return value
            if mode.batch_dim(value) == 0 and value.dim() >= 1 and value.shape[0] % steps == 0:
                return mode.unfold(value)
            if mode.is_time(value):
                mode.issue(type(self.model), "output without the time-folded batch as its leading dim")
                return value
            if value.dim() >= 1 and value.shape[0] == steps * batch:
                return mode.unfold(mode.impulse(value, value))
            mode.issue(type(self.model), f"constant output of shape {tuple(value.shape)} has no time axis")
            return value

        result = pytree.tree_map(unfold, out)
        self.report = TDConversionReport(
            converted=[
                TDNodeRecord(op, op, f"{detail} (x{n})") for (op, detail), n in mode.converted.items()
            ],
            issues=[TDNodeRecord(op, op, f"{detail} (x{n})") for (op, detail), n in mode.issues.items()],
        )
        if self.strict:
            self.report.raise_if_not_equivalent("TDTimeFolded")
        return result

"""Convert transformers into temporal-difference (TD) operators, without calibration data.

Two paths, one report:

* :func:`replace_by_td_operators` (the seed's path, fixed and extended) traces the ANN with torch.fx and
  rewrites the graph so that it runs on a time sequence ``[T, ...]``: modules and functions become the
  TD operators of ``ann2snn_ops``, constants added to a time-varying tensor are moved to t = 0, and
  every node left that breaks the cumulative equivalence is listed in ``gm.td_report``
  (``strict=True`` raises :class:`TDEquivalenceError` instead).
* :class:`TDTimeFolded` wraps any model, traceable or not (a Hugging Face BERT, say), folds the time
  axis into the batch so the model's own reshapes and transposes stay valid, and runs the model's
  forward with every op that is not time-transparent routed through a TD operator.

In both, the output ``Y`` of a converted model satisfies ``Y.cumsum(0)[t] == ann(X.cumsum(0)[t])``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

import torch
import torch.nn as nn
from torch import fx

from ann2snn_fx.td.fold import TDTimeFolded
from ann2snn_fx.td.fx_pass import TDImpulse, replace_by_td_operators_fx, td_impulse
from ann2snn_fx.td.report import TDConversionReport, TDEquivalenceError, TDNodeRecord

__all__ = [
    "TDConversionReport",
    "TDEquivalenceError",
    "TDImpulse",
    "TDNodeRecord",
    "TDTimeFolded",
    "replace_by_td_operators",
    "td_impulse",
]


def replace_by_td_operators(
    ann: nn.Module,
    device: torch.device | str | None = None,
    *,
    strict: bool = False,
    static_inputs: Collection[str] = (),
    tracer_class: type[fx.Tracer] = fx.Tracer,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Iterable[Any] | None = None,
) -> fx.GraphModule:
    """Trace ``ann`` with torch.fx and rewrite it into TD operators that run on ``[T, ...]`` sequences.

    ``ann`` itself is never modified, moved or re-moded: a deep copy is traced and converted.

    Replaced (parameters, ``requires_grad`` and training mode copied):

    * ``nn.TransformerEncoder``/``nn.TransformerDecoder`` and their layers (either ``batch_first``; dropout
      inactive in eval mode is ignored) are first re-expressed as torch's reference path, then converted;
      their masks (``mask``, ``src_key_padding_mask``, ``tgt_key_padding_mask``, ``memory_key_padding_mask``
      ...) and ``is_causal`` are inputs named in ``static_inputs`` (constant over time);
    * modules of exact type ``nn.Linear``, ``nn.LayerNorm``, ``nn.GELU``, ``nn.MultiheadAttention``
      (the seed's set), ``nn.Softmax`` (dim shifted past the time axis), ``nn.SiLU``, ``nn.RMSNorm``,
      ``nn.Conv2d``, ``nn.Tanh``, ``nn.Sigmoid`` and ``nn.ReLU``;
    * ``F.scaled_dot_product_attention`` calls with literal arguments (q/k/v by position or keyword),
      registered at the root as ``td_scaled_dot_product_attention_<i>``;
    * ``F.softmax``/``torch.softmax``/``Tensor.softmax``, ``F.gelu``, ``F.silu``, ``tanh``/``sigmoid``/
      ``relu`` calls, pointwise functions with literal extra arguments (``exp``, ``pow``, ``clamp``,
      ``F.softplus`` ...), ``F.layer_norm``/``F.rms_norm`` (norm subclasses traced through), and
      ``matmul``/``@``/``bmm`` and elementwise ``*`` of two time-varying tensors, registered at the root
      as ``td_softmax_<i>``, ``td_gelu_<i>``, ``td_silu_<i>``, ``td_function_<i>``, ``td_matmul_<i>``
      and ``td_mul_<i>`` (first free index, never overwriting);
    * constants (positional embeddings, ``F.linear`` biases, literals) added, subtracted or
      concatenated to a time-varying tensor are applied at t = 0 only (:func:`td_impulse`, called through
      one stateless :class:`TDImpulse` registered at the root as ``td_impulse_<i>``).

    The result can be saved whole with ``torch.save`` and loaded in another process: string annotations
    of ``forward`` (``from __future__ import annotations``) are resolved, or dropped where they cannot be.

    New names never collide with existing attributes; every call site of a shared
    ``nn.MultiheadAttention`` (either ``batch_first``) is validated. Its ``key_padding_mask`` (bool or float,
    with or without ``attn_mask``) is merged into the TD attention's mask; a mask computed from the
    time-sequence inputs is reported (it would differ at every step).

    Args:
        ann: The ANN. It (or ``tracer_class``) must be traceable by torch.fx.
        device: Device of the converted copy; default the first parameter's device, else CPU.
        strict: Raise :class:`TDEquivalenceError`, listing every node left that breaks the cumulative
            equivalence, instead of only recording them in ``gm.td_report``.
        static_inputs: Names of placeholders that are not time sequences (e.g. a mask); everything
            computed only from them, parameters and literals counts as constant.
        tracer_class: The ``fx.Tracer`` subclass to trace with (custom leaf modules).
        concrete_args: Inputs to specialise on while tracing (as ``torch.fx.Tracer.trace``). Default: none,
            except for a bare ``nn.TransformerEncoder``/``Decoder`` (or layer), whose optional inputs (masks,
            ``is_causal``) are fixed to their defaults unless named in ``static_inputs``.
        leaf_modules: Module classes or module paths kept untraced (they run as a whole, not as TD
            operators, and are reported if they touch time-varying data).

    Returns:
        The converted ``fx.GraphModule``. Its inputs and outputs are time sequences ``[T, ...]`` and
        ``gm.td_report`` holds the :class:`TDConversionReport`.

    Raises:
        TypeError: ``ann`` is not an ``nn.Module``.
        ValueError: An ``nn.MultiheadAttention`` or SDPA configuration the TD operators cannot express
            (the seed's messages, e.g. ``"TD MHA conversion requires need_weights=False."``).
        TDEquivalenceError: ``strict=True`` and the graph keeps non-equivalent nodes.
        ann2snn_fx.ModelTraceError: torch.fx cannot trace the model (the message says what to do; a
            ``ValueError`` and ``torch.fx.proxy.TraceError``).

    Shape:
        - Input: every non-static input gains a leading time axis, ``[T, *ann_input_shape]``.
        - Output: ``[T, *ann_output_shape]``; ``output.cumsum(0)[t] == ann(input.cumsum(0)[t])``.

    Examples:
        >>> import torch
        >>> from ann2snn_fx import replace_by_td_operators
        >>> _ = torch.manual_seed(0)
        >>> ann = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Softmax(dim=-1)).eval()
        >>> gm = replace_by_td_operators(ann, strict=True)
        >>> x_seq = torch.randn(4, 2, 8)
        >>> torch.allclose(gm(x_seq).cumsum(0), ann(x_seq.cumsum(0)), atol=1e-6)
        True
        >>> gm.td_report.equivalent
        True
    """
    return replace_by_td_operators_fx(
        ann,
        device,
        strict=strict,
        static_inputs=static_inputs,
        tracer_class=tracer_class,
        concrete_args=concrete_args,
        leaf_modules=leaf_modules,
    )

"""Running a converted SNN for T steps: the step loop, and a multi-step execution of the same graph."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx, nn

from ann2snn_fx._numbers import as_integral
from ann2snn_fx.snn.inputs import check_input_fn, model_input
from ann2snn_fx.snn.multistep import _compiled_state, _MultiStepInterpreter
from ann2snn_fx.snn.neurons import reset_net

__all__ = ["MultiStepSNN", "run_snn"]


class MultiStepSNN(nn.Module):
    """Multi-step execution of a converted SNN: one call runs all ``T`` steps.

    Stateless layers see one ``[t*B, ...]`` batch per chunk of ``t`` steps (layers before the first neuron,
    which see the same input at every step, run once per chunk on ``[B, ...]``), and only the neurons (modules with a ``multi_step_forward``,
    such as :class:`~ann2snn_fx.IFNode`) loop over time; each ``VoltageScaler -> IFNode -> VoltageScaler``
    block runs as one fused in-place loop. To stay cache-friendly on CPUs the steps are processed in chunks
    of ``t`` steps whose largest activation ``[t*B, ...]`` holds about ``chunk_elements`` elements (measured
    on a first, interpreted one-step chunk, then remembered per input shape together with the compiled
    multi-step graph); ``chunk_elements=None`` runs all ``T`` steps as one batch (best on GPUs). The outputs equal those of calling the SNN once per
    step, up to floating-point reassociation in the batched layers. The wrapped SNN's modules are shared,
    not copied. Layers must treat samples independently (no batch statistics, no hard-coded batch size).

    Args:
        snn: A converted SNN (``fx.GraphModule``) taking one input tensor and returning one tensor.
        chunk_elements: Target size of the largest activation of a chunk, or ``None`` for one chunk.

    Shape:
        - Input: ``[B, *]`` (the same input is fed at every step).
        - Output: ``[T, B, *]``, the output of every step.

    Examples:
        >>> from ann2snn_fx import IFNode, trace_model
        >>> snn = trace_model(nn.Sequential(nn.Linear(2, 2), IFNode(v_reset=None)))
        >>> MultiStepSNN(snn)(torch.ones(1, 2), time_steps=3).shape
        torch.Size([3, 1, 2])
    """

    def __init__(self, snn: fx.GraphModule, *, chunk_elements: int | None = 2**18) -> None:
        super().__init__()
        if not isinstance(snn, fx.GraphModule):
            raise TypeError(
                f"MultiStepSNN needs an fx.GraphModule (a converted SNN), but got {type(snn).__name__}."
            )
        chunk = None if chunk_elements is None else as_integral(chunk_elements)
        if chunk_elements is not None and (chunk is None or chunk < 1):
            raise ValueError(f"chunk_elements must be a positive int or None, but got {chunk_elements!r}.")
        self.snn = snn
        self.chunk_elements = chunk

    def forward(self, x: torch.Tensor, time_steps: int) -> torch.Tensor:
        time_steps = _check_steps(time_steps)
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise TypeError(f"MultiStepSNN expects a batched input tensor [B, *], but got {_shape(x)}.")
        state = _compiled_state(self.snn)
        key = (tuple(x.shape[1:]), x.dtype, x.device, x.shape[0])
        known_peak = state.peaks.get(key)
        outputs = []
        done = 0
        if self.chunk_elements is None:
            chunk = time_steps
        elif known_peak is not None:
            chunk = max(1, self.chunk_elements // max(known_peak, 1))
        else:
            chunk = 1
        while done < time_steps:
            steps = min(chunk, time_steps - done)
            if done == 0 and (known_peak is None or self.chunk_elements is None):
                # An interpreted first chunk measures the activation sizes that set the chunk length (once per
                # input shape; remembered with the compiled graph).
                interpreter = _MultiStepInterpreter(self.snn, steps, {})
                out = interpreter.run(x)
                output_node = next(n for n in reversed(self.snn.graph.nodes) if n.op == "output")
                output_temporal = interpreter.temporal.get(output_node, False)
                state.peaks[key] = interpreter.peak_per_step
                if self.chunk_elements is not None:
                    chunk = max(1, self.chunk_elements // max(interpreter.peak_per_step, 1))
            else:
                compiled, ctx, output_temporal = state.compiled()
                ctx.steps = steps
                out = compiled(x)
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"MultiStepSNN supports models returning one tensor, but got {type(out).__name__}."
                )
            if output_temporal:
                outputs.append(out.reshape(steps, out.shape[0] // steps, *out.shape[1:]))
            else:
                outputs.append(out.unsqueeze(0).expand(steps, *out.shape))
            done += steps
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0].clone()


def _check_steps(time_steps: Any) -> int:
    steps = as_integral(time_steps)
    if steps is None or steps < 1:
        raise ValueError(f"time_steps must be a positive int, but got {time_steps!r}.")
    return steps


def _shape(x: Any) -> str:
    return f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def select_output(y: Any, output_key: str | int | Callable[[Any], Any] | None) -> torch.Tensor:
    """The tensor ``run_snn`` averages, out of one step's output ``y``.

    ``output_key``: ``None`` (``y`` must be a tensor), a key/attribute name (``"logits"`` of a dict or a
    Hugging Face ``ModelOutput``), an index (of a tuple/list), or a callable ``output -> tensor``.

    Examples:
        >>> select_output({"logits": torch.ones(1), "aux": 2}, "logits")
        tensor([1.])
        >>> select_output((torch.zeros(1), None), 0)
        tensor([0.])
    """
    if callable(output_key):
        out = output_key(y)
    elif output_key is None:
        out = y
    elif isinstance(output_key, str):
        if isinstance(y, Mapping) and output_key in y:
            out = y[output_key]
        elif hasattr(y, output_key):
            out = getattr(y, output_key)
        else:
            keys = sorted(map(str, y)) if isinstance(y, Mapping) else None
            raise KeyError(
                f"output_key={output_key!r}: the model's output ({type(y).__name__}) has no such field"
                + (f"; its keys are {keys}." if keys is not None else ".")
            )
    elif isinstance(output_key, int) and not isinstance(output_key, bool) and isinstance(y, (tuple, list)):
        out = y[output_key]
    else:
        raise TypeError(
            f"output_key must be None, a str, an int (for tuple outputs) or a callable, but got {output_key!r} "
            f"for an output of type {type(y).__name__}."
        )
    if not isinstance(out, torch.Tensor):
        hint = (
            " Pass output_key= (e.g. output_key='logits' for a dict or a Hugging Face ModelOutput, 0 for a "
            "tuple, or a callable output -> tensor)."
            if output_key is None
            else ""
        )
        raise TypeError(
            f"run_snn averages models returning one tensor per step, but got {type(out).__name__}.{hint}"
        )
    return out


def run_snn(
    snn: nn.Module,
    x: Any,
    time_steps: int,
    *,
    multi_step: bool = False,
    reset: bool = True,
    running_mean: bool = True,
    chunk_elements: int | None = 2**18,
    skip_steps: int = 0,
    input_fn: Callable[[Any], Any] | None = None,
    output_key: str | int | Callable[[Any], Any] | None = None,
) -> torch.Tensor:
    """Run ``snn`` for ``time_steps`` steps on the constant input ``x``, under ``torch.no_grad()``.

    Resets the network first (``reset_net``), feeds ``x`` at every step, and returns the output of every
    step, by default as the running mean ``out[t] = mean(y_0 .. y_t)``, which approximates the ANN's output
    and is what accuracy-against-T curves are computed from (``out[t].argmax(-1)`` is the prediction after
    ``t + 1`` steps).

    Args:
        snn: The converted SNN (one step per call).
        x: The input batch ``[B, *]``; with ``input_fn``, any batch (a tuple or dict of several inputs, as
            the dataloader yields it).
        time_steps: Number of steps ``T``.
        multi_step: Use :class:`MultiStepSNN` (batched layers, neurons loop over time) instead of calling
            ``snn`` once per step; same outputs. Needs an ``fx.GraphModule``.
        reset: Reset the neurons before running.
        running_mean: Return running means (default) instead of the raw per-step outputs.
        chunk_elements: Chunking of the multi-step execution (see :class:`MultiStepSNN`); ``None`` runs all
            steps as one ``[T*B, ...]`` batch (GPUs).
        skip_steps: Delayed readout ``D`` (``0 <= D < time_steps``, see
            :func:`ann2snn_fx.estimate_readout_delay`): the running mean leaves out the first ``D`` steps,
            ``out[t] = mean(y_D .. y_t)`` for ``t >= D`` (earlier entries are the plain running mean). Only
            with ``running_mean=True``.
        input_fn: A callable ``batch -> model input`` (a tensor, or an ``(args tuple, kwargs dict)`` pair),
            as ``Converter(input_fn=...)`` takes: the model is called ``snn(*args, **kwargs)`` at every step.
        output_key: Which part of a structured output to average: a key or attribute name (``"logits"``
            of a dict or ``ModelOutput``), an index of a tuple, or a callable ``output -> tensor``.

    Returns:
        Tensor ``[T, B, *]``.

    Examples:
        >>> from ann2snn_fx import IFNode, trace_model
        >>> snn = trace_model(nn.Sequential(IFNode(v_reset=None)))
        >>> run_snn(snn, torch.tensor([[0.5]]), 4).flatten().tolist()
        [0.0, 0.5, 0.3333333432674408, 0.5]
        >>> two = lambda batch: ((batch["a"],), {})
        >>> run_snn(snn, {"a": torch.tensor([[0.5]]), "label": 1}, 2, input_fn=two).flatten().tolist()
        [0.0, 0.5]
    """
    if not isinstance(snn, nn.Module):
        raise TypeError(f"snn must be an nn.Module, but got {type(snn).__name__}.")
    time_steps = _check_steps(time_steps)
    check_input_fn(input_fn)
    if input_fn is None and not isinstance(x, torch.Tensor):
        raise TypeError(
            f"x must be a tensor, but got {type(x).__name__}; for a batch of several inputs (a tuple or dict) "
            "pass input_fn=, a callable batch -> (args tuple, kwargs dict)."
        )
    args, kwargs = model_input(x, input_fn)
    if isinstance(skip_steps, bool) or not isinstance(skip_steps, int) or not 0 <= skip_steps < time_steps:
        raise ValueError(
            f"skip_steps must be an int in [0, time_steps={time_steps}), but got {skip_steps!r}."
        )
    with torch.no_grad():
        if reset:
            reset_net(snn)
        if multi_step:
            if not isinstance(snn, fx.GraphModule):
                raise TypeError(f"multi_step=True needs an fx.GraphModule, but got {type(snn).__name__}.")
            if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor) or output_key is not None:
                raise TypeError(
                    "multi_step=True runs models of one tensor input and one tensor output; this call has "
                    f"{len(args)} positional and {len(kwargs)} keyword input(s) and output_key={output_key!r}: "
                    "use multi_step=False."
                )
            outputs = MultiStepSNN(snn, chunk_elements=chunk_elements)(args[0], time_steps)
        else:
            steps = [select_output(snn(*args, **kwargs), output_key) for _ in range(time_steps)]
            outputs = torch.stack(steps)
        if not running_mean:
            return outputs
        counts = torch.arange(1, time_steps + 1, device=outputs.device, dtype=outputs.dtype)
        shape = (-1, *([1] * (outputs.dim() - 1)))
        means = outputs.cumsum(0) / counts.view(shape)
        if skip_steps:
            late = outputs[skip_steps:].cumsum(0) / counts[: time_steps - skip_steps].view(shape)
            means = torch.cat([means[:skip_steps], late])
        return means

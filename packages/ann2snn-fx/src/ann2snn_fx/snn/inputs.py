"""From one batch of a dataloader to one call of the model: the default extraction and ``input_fn``.

Every entry point that feeds batches to a model (calibration, :func:`ann2snn_fx.run_snn` and friends)
goes through :func:`call_with_batch`, so they accept the same batches and refuse the same ones:

* without ``input_fn``: a tensor (or numpy array) is the input; of a tuple/list the first element is
  (recursively); of a dict the entry under one of :data:`INPUT_KEYS`, or its only entry (recursively, so
  ``{"batch": {"image": x}}`` works). Anything else raises TypeError naming the batch index and type.
* with ``input_fn`` (a callable ``batch -> input``): it returns the model input, a tensor, or an
  ``(args tuple, kwargs dict)`` pair for models of several inputs or keyword inputs; a plain tuple is
  taken as the positional arguments and a dict as the keyword arguments (the convention of
  :func:`ann2snn_fx.spikezip.calibrate_qann`), the pair form winning where both would fit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map

__all__ = ["INPUT_KEYS", "batch_input", "call_with_batch", "check_input_fn", "model_input", "move_input"]

INPUT_KEYS = ("input", "image", "img", "x", "data", "pixel_values")
ACCEPTED = (
    "a tensor or numpy array, a tuple/list whose first element is the input, or a dict with one of the keys "
    f"{INPUT_KEYS} (or a single entry); for other batches pass input_fn=, a callable batch -> model input "
    "(a tensor, or an (args tuple, kwargs dict) pair)"
)


def _where(index: int | None) -> str:
    return "Batch data" if index is None else f"Batch {index}"


def batch_input(data: Any, index: int | None = None) -> Any:
    """The model input of one batch by the default rules (see the module docstring).

    Args:
        data: One batch of the dataloader.
        index: Its position in the dataloader, for the error messages.

    Returns:
        The input (a tensor or an array-like), not yet moved to a device.

    Raises:
        TypeError: for a batch (or a selected entry) of an unsupported type, e.g. ``None``.
        ValueError: for an empty tuple/list/dict, or a dict none of whose keys is an input key.

    Examples:
        >>> x = torch.ones(2)
        >>> batch_input({"batch": {"image": x, "label": 0}}) is x
        True
        >>> batch_input(None, index=3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: Batch 3 is of type NoneType, not a supported batch: a tensor or numpy array, ...
    """
    if isinstance(data, torch.Tensor) or hasattr(data, "__array__"):
        return data
    where = _where(index)
    if isinstance(data, (list, tuple)):
        if len(data) == 0:
            raise ValueError(f"{where} is an empty list or tuple.")
        return batch_input(data[0], index)
    if isinstance(data, dict):
        if len(data) == 0:
            raise ValueError(f"{where} is an empty dictionary.")
        for key in INPUT_KEYS:
            if key in data:
                return batch_input(data[key], index)
        if len(data) == 1:
            return batch_input(next(iter(data.values())), index)
        raise ValueError(
            f"{where} is a dictionary with keys {sorted(map(str, data))} and none of the input keys "
            f"{INPUT_KEYS}; cannot tell which entry is the model input. Yield the input tensor, an "
            "(input, label) tuple, or a dict with one of those keys, or pass input_fn=lambda batch: ..."
        )
    raise TypeError(f"{where} is of type {type(data).__name__}, not a supported batch: {ACCEPTED}.")


def check_input_fn(input_fn: Any) -> Callable[[Any], Any] | None:
    """``input_fn`` itself if None or callable; TypeError otherwise."""
    if input_fn is not None and not callable(input_fn):
        raise TypeError(
            f"input_fn must be None or a callable batch -> model input, but got {type(input_fn).__name__}."
        )
    return input_fn


def model_input(
    batch: Any, input_fn: Callable[[Any], Any] | None = None, *, index: int | None = None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The ``(args, kwargs)`` of the model call for one batch.

    Examples:
        >>> x = torch.ones(2)
        >>> model_input((x, 0)) == ((x,), {})
        True
        >>> args, kwargs = model_input({"a": x, "b": 2 * x}, lambda b: ((b["a"],), {"scale": b["b"]}))
        >>> len(args), sorted(kwargs)
        (1, ['scale'])
    """
    if input_fn is None:
        return (batch_input(batch, index),), {}
    out = input_fn(batch)
    if isinstance(out, torch.Tensor) or hasattr(out, "__array__"):
        return (out,), {}
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], tuple) and isinstance(out[1], dict):
        return out[0], out[1]
    if isinstance(out, tuple):
        return out, {}
    if isinstance(out, dict):
        return (), out
    raise TypeError(
        f"input_fn returned {type(out).__name__} for {_where(index).lower()}; it must return the model "
        "input: a tensor, an (args tuple, kwargs dict) pair such as ((x, mask), {}), a tuple of positional "
        "arguments or a dict of keyword arguments."
    )


def move_input(value: Any, device: torch.device | None, dtype: torch.dtype | None) -> Any:
    """``value`` (a tensor, array, or nested containers of them) on ``device``, floating ones in ``dtype``."""

    def move(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            if not hasattr(x, "__array__"):
                return x
            x = torch.as_tensor(x)
        if x.is_floating_point() and dtype is not None:
            return x.to(device=device, dtype=dtype)
        return x.to(device=device)

    return tree_map(move, value)


def call_with_batch(
    model: Callable[..., Any],
    batch: Any,
    input_fn: Callable[[Any], Any] | None = None,
    *,
    index: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """Call ``model`` on one batch: extract the input (:func:`model_input`), move it, return the output.

    Args:
        model: The model (any callable).
        batch: One batch of a dataloader.
        input_fn: ``None`` for the default extraction, or a callable ``batch -> model input`` returning a
            tensor or an ``(args tuple, kwargs dict)`` pair.
        index: The batch's position, named in error messages.
        device: Where the tensors of the input go (``None``: where they are).
        dtype: The dtype of floating tensors of the input (``None``: unchanged).

    Returns:
        ``model(*args, **kwargs)``.

    Raises:
        TypeError: for a batch the default extraction does not accept, or an ``input_fn`` result that is
            neither a tensor nor an ``(args, kwargs)`` pair.

    Examples:
        >>> model = torch.nn.Bilinear(2, 3, 1)
        >>> batch = {"left": torch.ones(4, 2), "right": torch.ones(4, 3)}
        >>> call_with_batch(model, batch, lambda b: ((b["left"], b["right"]), {})).shape
        torch.Size([4, 1])
    """
    args, kwargs = model_input(batch, input_fn, index=index)
    dev = None if device is None else torch.device(device)
    return model(*move_input(args, dev, dtype), **move_input(kwargs, dev, dtype))

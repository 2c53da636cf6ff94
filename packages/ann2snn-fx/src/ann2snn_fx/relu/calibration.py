"""The calibration loop of the ReLU -> IF path: batches through the hooks, with the checks around it.

* every batch goes through :func:`ann2snn_fx.snn.inputs.call_with_batch` (the default extraction, or the
  caller's ``input_fn``), so an unsupported batch raises TypeError naming its index and type;
* a NaN/inf activation raises :class:`ann2snn_calib.NonFiniteError` naming the layer (the hook detects it);
* under ``torch.distributed`` (hooks that reduce over a process group) the ranks first agree on the number
  of batches with one all-reduce; a disagreement raises the same ValueError on every rank before any
  collective of the hooks, so no rank returns partial statistics while another waits;
* the progress bar follows ``TQDM_DISABLE`` unless ``progress`` is given.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn
from tqdm.auto import tqdm

from ann2snn_calib import NonFiniteError, VoltageHook
from ann2snn_fx.snn.inputs import call_with_batch

__all__ = ["agree_on_batch_count", "calibrate", "hook_count", "resolve_progress"]


def resolve_progress(progress: bool | None) -> bool:
    """``progress`` as given, or when None: shown unless ``TQDM_DISABLE`` is set (not to 0/false/no).

    The same rule as ``ann2snn_utils.download_url`` (SPEC 13.5: an explicit argument overrides the env).

    Examples:
        >>> resolve_progress(False)
        False
    """
    if progress is None:
        return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("", "0", "false", "no")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool or None, but got {progress!r}.")
    return progress


def hook_count(hook: nn.Module) -> int:
    """How many batches a hook has seen."""
    count = getattr(hook, "num_batches_tracked", 1)
    return int(count.item() if isinstance(count, torch.Tensor) else count)


def _group_of(hooks: list[VoltageHook]) -> Any:
    """The process group the hooks reduce over (None when they do not)."""
    for hook in hooks:
        group = hook.reduction_group()
        if group is not None:
            return group
    return None


def _batch_count(dataloader: Iterable[Any], num_batches: int | None) -> int | None:
    try:
        total = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        return None
    return total if num_batches is None else min(total, num_batches)


def agree_on_batch_count(count: int, group: Any, device: torch.device) -> None:
    """One all-reduce of every rank's batch count; ValueError on every rank when they differ.

    Args:
        count: This rank's number of calibration batches.
        group: The process group of the hooks.
        device: Where the small tensor lives (the calibration device; CPU for gloo).
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    counts = torch.zeros(world, dtype=torch.int64, device=device)
    counts[rank] = count
    dist.all_reduce(counts, group=group)
    per_rank = [int(c) for c in counts.tolist()]
    if len(set(per_rank)) != 1:
        raise ValueError(
            f"Distributed calibration needs the same number of batches on every rank, got {per_rank} "
            "(rank -> batches); every hook reduces over the ranks once per batch. Shard the data evenly "
            "(DistributedSampler(drop_last=True) with equal batch sizes), or set num_batches= to a count "
            "every rank reaches."
        )
    if per_rank[0] == 0:
        raise ValueError("The calibration dataloader yielded no batch on any rank; calibration needs data.")


def _steps(batches: Iterable[Any], group: Any, device: torch.device) -> Iterable[Any]:
    """``batches``; with a group and no ``len()``, the ranks agree before each batch whether one comes."""
    if group is None:
        yield from batches
        return
    it = iter(batches)
    index = 0
    while True:
        batch = next(it, _END)
        flag = torch.tensor([0 if batch is _END else 1, 1 if batch is _END else 0], device=device)
        dist.all_reduce(flag, group=group)  # [ranks with a batch, ranks without]
        have, done = (int(v) for v in flag.tolist())
        if have and done:
            raise ValueError(
                f"Distributed calibration needs the same number of batches on every rank, but at batch "
                f"{index} {have} rank(s) have one and {done} have none; shard the data evenly or set "
                "num_batches= to a count every rank reaches."
            )
        if done:
            return
        yield batch
        index += 1


_END = object()


def _layer_of(gm: fx.GraphModule, hook: Any) -> str:
    consumers = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for name, module in gm.named_modules():
        if module is hook:
            node = consumers.get(name)
            source = node.args[0].name if node is not None and node.args else "?"
            return f"{name!r} (after activation {source!r})"
    return "?"


def calibrate(
    gm: fx.GraphModule,
    dataloader: Iterable[Any],
    device: torch.device,
    dtype: torch.dtype | None,
    *,
    num_batches: int | None = None,
    progress: bool | None = False,
    input_fn: Callable[[Any], Any] | None = None,
) -> None:
    """Run the calibration batches through ``gm``'s hooks; raise ``ValueError`` if a hook saw nothing.

    Args:
        gm: The model with its calibration hooks.
        dataloader: The batches (see :func:`ann2snn_fx.snn.inputs.batch_input`).
        device: Where the inputs go.
        dtype: The floating dtype of the inputs (the model's).
        num_batches: Stop after this many batches.
        progress: Show a progress bar; None follows ``TQDM_DISABLE``.
        input_fn: ``batch -> model input`` (a tensor, or ``(args, kwargs)``), or None for the default rules.

    Raises:
        TypeError: for a batch of an unsupported type (index and type named).
        ann2snn_calib.NonFiniteError: (a ValueError) for NaN/inf activations, naming the layer.
        ValueError: for no batch, a hook that saw nothing, or (distributed) different batch counts per rank.
    """
    hooks = [m for m in gm.modules() if isinstance(m, VoltageHook)]
    group = _group_of(hooks)
    total = _batch_count(dataloader, num_batches)
    if group is not None and total is not None:
        agree_on_batch_count(total, group, device)
    batches: Iterable[Any] = dataloader
    if num_batches is not None:
        batches = itertools.islice(batches, num_batches)
    if group is not None and total is None:
        batches = _steps(batches, group, device)
    for hook in hooks:
        hook.train()  # observers record in training mode; the rest of the model stays in eval
    seen = 0
    bar = tqdm(batches, total=total, desc="calibrating", disable=not resolve_progress(progress), leave=False)
    try:
        with torch.no_grad():
            for index, data in enumerate(bar):
                call_with_batch(gm, data, input_fn, index=index, device=device, dtype=dtype)
                seen += 1
    except NonFiniteError as err:
        raise NonFiniteError(f"Calibration batch {seen}, layer {_layer_of(gm, err.hook)}: {err}") from err
    finally:
        bar.close()
        for hook in hooks:
            hook.eval()
    if seen == 0:
        raise ValueError(
            "The calibration dataloader yielded no batch; calibration needs data (for a conversion "
            "without data, to load a saved state_dict into, use convert_to_spiking_neurons(ann, "
            "calibrate=False))."
        )
    for hook in hooks:
        if hook_count(hook) == 0:
            raise ValueError(
                f"The calibration hook {_layer_of(gm, hook)} saw no data: that activation was never executed "
                "on the calibration batches (a branch that the inputs do not take?)."
            )

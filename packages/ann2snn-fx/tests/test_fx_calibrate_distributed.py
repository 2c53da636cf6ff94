"""Distributed Converter calibration (SPEC 13.7): 2 and 3 gloo processes. Uneven batch counts (with and
without ``len()``, a rank with no batch) raise the same ValueError on every rank at once, none hangs; even
counts give every rank the scales of one process calibrating on the union of the batches."""

from __future__ import annotations

import datetime
import multiprocessing
import pathlib
import re
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ann2snn_fx import Converter

pytestmark = pytest.mark.skipif(
    not dist.is_available()
    or sys.platform == "win32"
    or "fork" not in multiprocessing.get_all_start_methods(),
    reason="needs torch.distributed with gloo and the fork start method",
)


def _ann() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).eval()


def _batch(rank: int, i: int) -> torch.Tensor:
    return torch.rand(4, 3, generator=torch.Generator().manual_seed(100 * rank + i)) * (1 + rank)


def _scenarios(rank: int, world: int) -> dict[str, Any]:
    def gen(n: int) -> Iterator[torch.Tensor]:
        yield from (_batch(rank, i) for i in range(n))

    return {
        "even": [_batch(rank, i) for i in range(2)],
        "uneven_len": [_batch(rank, i) for i in range(rank + 1)],
        "uneven_iter": gen(rank + 1),
        "empty_rank": [] if rank == world - 1 else [_batch(rank, 0)],
        "empty_rank_iter": gen(0 if rank == 0 else 1),
        "nan_on_rank_0": [_batch(rank, 0) * (float("nan") if rank == 0 else 1.0)],
        "nan_on_rank_0_percentile": [_batch(rank, 0) * (float("nan") if rank == 0 else 1.0)],
        "even_after_errors": gen(2),
    }


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    results: dict[str, Any] = {}
    try:
        for name, loader in _scenarios(rank, world).items():
            try:
                mode = "99%" if name.endswith("percentile") else "Max"
                converter = Converter(loader, mode=mode, momentum=None, progress=False)
                snn = converter.convert_to_spiking_neurons(_ann())
                results[name] = snn.spiking_0.scaler1.scale.clone()
            except ValueError as err:
                results[name] = str(err)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_uneven_batch_counts_raise_on_every_rank_and_even_ones_use_the_union(
    world: int, tmp_path: pathlib.Path
) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_worker, args=(r, world, str(tmp_path / "init"), str(tmp_path)))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0] * world, f"worker exit codes {codes} (a rank hung or crashed)"
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    ann = _ann()
    for name, batches in (("even", 2), ("even_after_errors", 2)):
        union = torch.cat([_batch(r, i) for r in range(world) for i in range(batches)])
        want = ann[1](ann[0](union)).max()
        for rank in range(world):
            assert torch.equal(per_rank[rank][name], want), (name, rank)
    counts = list(range(1, world + 1))
    for name, pattern in (
        ("uneven_len", "same number of batches on every rank, got " + re.escape(str(counts))),
        ("uneven_iter", rf"at batch 1 {world - 1} rank\(s\) have one and 1 have none"),
        ("empty_rank", r"same number of batches on every rank, got \[1, (1, )?0\]"),
        ("empty_rank_iter", rf"at batch 0 {world - 1} rank\(s\) have one and 1 have none"),
    ):
        messages = {per_rank[r][name] for r in range(world)}
        assert len(messages) == 1, (name, messages)  # the same error on every rank
        message = messages.pop()
        assert isinstance(message, str), (name, message)
        assert re.search(pattern, message), (name, message)
    for name in ("nan_on_rank_0", "nan_on_rank_0_percentile"):
        for rank in range(world):  # every rank raises, the one with the NaN and the others
            message = per_rank[rank][name]
            assert isinstance(message, str), (name, rank, message)
            assert re.search(r"layer 'voltage_hook_0' .*NaN/inf activations", message), (name, rank, message)
        assert re.search(r"\b20 NaN, 0 \+inf", per_rank[0][name]), per_rank[0][name]
        assert "on another rank" in per_rank[1][name]

"""Distributed calibration for real: 2 and 3 gloo processes on the CPU must end with the scales that one
process computes on the concatenated batches, however the batches are sharded."""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import sys

import pytest
import torch
import torch.distributed as dist

import ann2snn_calib._stats as stats
from ann2snn_calib import VoltageHook

pytestmark = pytest.mark.skipif(
    not dist.is_available()
    or sys.platform == "win32"
    or "fork" not in multiprocessing.get_all_start_methods(),
    reason="needs torch.distributed with gloo and the fork start method",
)

# (kwargs, per-batch data kind); every hook sees the same batches.
CONFIGS: list[dict] = [
    {"mode": "Max"},
    {"mode": "max", "momentum": 0.5},
    {"mode": 0.5},
    {"mode": "99.9%"},
    {"mode": "99%", "momentum": 0.3},
    {"mode": "50%"},
    {"mode": "0%"},
    {"mode": "100%"},
    {"mode": "3.5%"},
    {"mode": "Max", "momentum": None},
    {"mode": "99.9%", "momentum": None},
    {"mode": "20%", "momentum": None},
    {"mode": "99%", "momentum": None, "max_candidates": 300},  # every rank sees more than it keeps
    {"mode": "Max", "channel_dim": 1},
    {"mode": "99%", "channel_dim": 1},
    {"mode": "50%", "channel_dim": 1, "momentum": None},
]


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    shapes = [(8, 3, 20, 20), (5, 3, 20, 20), (2, 3, 20, 20), (7, 3, 20, 20)]
    out = []
    for i, shape in enumerate(shapes):
        x = torch.randn(shape, generator=g) * (1 + i)
        out.append(torch.relu(x) if i % 2 == 0 else x)
    return out


def _calibrate(batches_per_call: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    results = []
    for kwargs in CONFIGS:
        hook = VoltageHook(**kwargs)
        for x in batches_per_call:
            assert hook(x) is x
        results.append({"scale": hook.scale.clone()})
    return results


def _worker(rank: int, world: int, init_file: str, out_dir: str, gather_limit: int) -> None:
    torch.set_num_threads(1)
    stats._GATHER_LIMIT = gather_limit
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Uneven shards along the batch dimension; with 3 ranks the 2-sample batch leaves one rank empty.
        shards = [torch.tensor_split(x, world)[rank] for x in _batches()]
        results = _calibrate(shards)
        # Past the memory bound every rank raises (none waits forever in a collective).
        hook = VoltageHook(mode="99%", momentum=None, max_candidates=100)
        raised = []
        for x in shards:
            try:
                hook(x)
            except RuntimeError as err:
                raised.append("more than max_candidates=100" in str(err))
                break
        results.append({"raised": torch.tensor(raised == [True])})
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(world: int, tmp_path: pathlib.Path, gather_limit: int) -> list[list[dict[str, torch.Tensor]]]:
    ctx = multiprocessing.get_context("fork")
    init_file = str(tmp_path / "init")
    procs = [
        ctx.Process(target=_worker, args=(r, world, init_file, str(tmp_path), gather_limit))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0] * world, f"worker exit codes {codes}"
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize(
    ("world", "gather_limit"),
    [(2, stats._GATHER_LIMIT), (3, stats._GATHER_LIMIT), (3, 16)],
    ids=["2-ranks-gather", "3-ranks-gather", "3-ranks-radix"],
)
def test_ranks_agree_with_one_process_on_concatenated_batches(
    world: int, gather_limit: int, tmp_path: pathlib.Path
) -> None:
    expected = [*_calibrate(_batches()), {"raised": torch.tensor(True)}]
    per_rank = _run(world, tmp_path, gather_limit)
    for rank, results in enumerate(per_rank):
        assert bool(results[-1]["raised"]), rank
        for kwargs, got, want in zip(CONFIGS, results[:-1], expected[:-1], strict=True):
            assert torch.equal(got["scale"], want["scale"]), (rank, kwargs, got["scale"], want["scale"])


def test_sync_false_keeps_local_statistics(tmp_path: pathlib.Path) -> None:
    ctx = multiprocessing.get_context("fork")
    init_file = str(tmp_path / "init")

    def work(rank: int) -> None:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
        try:
            hook = VoltageHook(mode="Max", sync=False)
            hook(torch.tensor([float(rank + 1)]))
            torch.save(hook.scale, tmp_path / f"local{rank}.pt")
            dist.barrier()  # no rank leaves the store before every rank has used it
        finally:
            dist.destroy_process_group()

    procs = [ctx.Process(target=work, args=(r,)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert [torch.load(tmp_path / f"local{r}.pt").item() for r in range(2)] == [1.0, 2.0]


def test_check_finite_raises_on_every_rank_and_reduction_group(tmp_path: pathlib.Path) -> None:
    """The public helpers subclasses build on: NaN on one rank makes every rank raise at once."""
    from ann2snn_calib import NonFiniteError

    ctx = multiprocessing.get_context("fork")
    init_file = str(tmp_path / "init")

    def work(rank: int) -> None:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
        try:
            hook = VoltageHook()
            groups = [
                hook.reduction_group() is dist.group.WORLD,
                VoltageHook(sync=False).reduction_group() is None,
            ]
            hook.check_finite(torch.ones(3))  # finite everywhere: no error on either rank
            x = torch.tensor([1.0, float("nan") if rank == 0 else 2.0])
            try:
                hook.check_finite(x)
                raised = "none"
            except NonFiniteError as err:
                raised = "other rank" if "another rank" in str(err) else "here"
            torch.save({"groups": groups, "raised": raised}, tmp_path / f"r{rank}.pt")
            dist.barrier()
        finally:
            dist.destroy_process_group()

    procs = [ctx.Process(target=work, args=(r,)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    got = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    assert [g["groups"] for g in got] == [[True, True], [True, True]]
    assert [g["raised"] for g in got] == ["here", "other rank"]

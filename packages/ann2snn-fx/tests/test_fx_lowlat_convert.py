"""Low-latency conversion (issue 15): LTB, QCFS, calibrate_snn, delayed readout and the latency tuner."""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import os
import pathlib
import socket
import sys
from typing import Any

import pytest
import torch
from torch import nn

from ann2snn_fx import (
    QCFS,
    Converter,
    IFNode,
    LatencyRecord,
    LatencyResult,
    LTBHook,
    NeuronFactory,
    ThresholdOptimizer,
    calibrate_snn,
    estimate_readout_delay,
    pareto_front,
    prepare_qcfs,
    run_snn,
    trace_model,
    tune_latency,
)

sklearn_datasets = pytest.importorskip("sklearn.datasets")


# ---------------------------------------------------------------- LTB
def _ltb_reference(batches: list[torch.Tensor]) -> torch.Tensor:
    theta = torch.zeros(batches[0].shape[1])
    for x in batches:
        for c in range(x.shape[1]):
            xc = x[:, c].clamp_min(0).flatten()
            theta[c] = max(float(theta[c] + 2 * (xc - theta[c]).clamp_min(0).mean()), 1e-6)
    return theta


def test_ltb_hand_value_and_clipped_output() -> None:
    hook = LTBHook()
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 1.0, 2.0]])
    out = hook(x)
    assert hook.scale.tolist() == [5.0, 3.0, 5.0]
    assert torch.equal(out, x)  # no value above the new thresholds
    out = hook(torch.tensor([[9.0, -1.0, 1.0]]))
    assert hook.scale.tolist() == [13.0, 3.0, 5.0]
    assert out.tolist() == [[9.0, 0.0, 1.0]]
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        hook(torch.ones(3))


@pytest.mark.parametrize("shape", [(6, 3, 5), (6, 3, 4, 4), (6, 3, 2, 3, 3)], ids=["1d", "2d", "3d"])
def test_ltb_matches_a_loop_on_1d_2d_3d_activations(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    batches = [torch.randn(shape) * 2 for _ in range(3)]
    hook = LTBHook()
    for x in batches:
        out = hook(x)
    torch.testing.assert_close(hook.scale, _ltb_reference(batches))
    torch.testing.assert_close(
        out, torch.minimum(batches[-1].clamp_min(0), hook.scale.view(1, 3, *[1] * (len(shape) - 2)))
    )


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_ltb_strategy_converts_with_average_pooling(dims: int) -> None:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    pool = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims]
    torch.manual_seed(dims)
    ann = nn.Sequential(
        conv(2, 4, 3, padding=1),
        nn.ReLU(),
        pool(2),
        conv(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(3),
    )
    x = torch.randn(16, 2, *[4] * dims)
    ann(x)
    ann.eval()
    snn = Converter(
        [x],
        progress=False,
        neuron_factory=NeuronFactory(v_init=0.5),
        threshold_optimizer=ThresholdOptimizer("ltb"),
    ).convert_to_spiking_neurons(ann)
    scale = snn.get_submodule("spiking_0.scaler1").scale
    assert scale.shape == (4,)
    with torch.no_grad():
        first = ann[0](x)
    torch.testing.assert_close(scale, _ltb_reference([first]))
    out = run_snn(snn, x, 64, multi_step=True)[-1]
    with torch.no_grad():
        ref = ann(x)
    assert float((out - ref).abs().mean()) < 0.15 * float(ref.abs().mean()) + 0.02


# ---------------------------------------------------------------- QCFS
@pytest.mark.parametrize("levels", [1, 2, 4, 8])
def test_qcfs_theorem_one_layer_constant_current(levels: int) -> None:
    torch.manual_seed(levels)
    ann = nn.Sequential(nn.Linear(6, 32), nn.ReLU())
    q = prepare_qcfs(ann, levels=levels, threshold=1.7).eval()
    snn = Converter(progress=False).convert_to_spiking_neurons(q)  # no dataloader: every activation is a QCFS
    node = snn.get_submodule("spiking_0.if_node")
    assert isinstance(node, IFNode)
    assert node.v_init == 0.5
    x = torch.randn(64, 6) * 2
    with torch.no_grad():
        expected = q(x)
    for multi_step in (False, True):
        out = run_snn(snn, x, levels, multi_step=multi_step)[-1]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_qcfs_with_burst_neurons_is_exact_at_one_step_through_layers() -> None:
    torch.manual_seed(7)
    ann = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    q = prepare_qcfs(ann, levels=4, dataloader=[torch.randn(16, 2, 6, 6)]).eval()
    snn = Converter(neuron_factory=NeuronFactory(burst=4), progress=False).convert_to_spiking_neurons(q)
    x = torch.randn(10, 2, 6, 6)
    with torch.no_grad():
        expected = q(x)
    torch.testing.assert_close(run_snn(snn, x, 1)[-1], expected, atol=1e-5, rtol=1e-5)


def test_qcfs_forward_backward_and_validation() -> None:
    act = QCFS(levels=4, threshold=2.0)
    x = torch.tensor([-1.0, 0.2, 0.3, 1.0, 5.0], requires_grad=True)
    y = act(x)
    assert y.tolist() == [0.0, 0.0, 0.5, 1.0, 2.0]
    y.sum().backward()
    assert x.grad is not None
    assert x.grad.tolist() == [
        0.0,
        1.0,
        1.0,
        1.0,
        0.0,
    ]
    assert act.threshold.grad is not None
    assert act.threshold.grad.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="levels must be a positive int"):
        QCFS(levels=0)
    with pytest.raises(ValueError, match="threshold must be a finite positive"):
        QCFS(threshold=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"no nn\.ReLU module"):
        prepare_qcfs(nn.Linear(2, 2))


def test_prepare_qcfs_copies_and_starts_from_the_data() -> None:
    ann = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2), nn.ReLU())
    before = copy.deepcopy(ann.state_dict())
    data = [torch.randn(32, 3)]
    q = prepare_qcfs(ann, levels=4, dataloader=data)
    assert all(torch.equal(before[k], v) for k, v in ann.state_dict().items())
    assert type(ann[1]) is nn.ReLU
    with torch.no_grad():
        peak = float(ann[:2](data[0]).max())
    assert q[1].threshold.item() == pytest.approx(peak)


def test_no_dataloader_needs_qcfs_everywhere() -> None:
    mixed = prepare_qcfs(nn.Sequential(nn.Linear(3, 5), nn.ReLU()), levels=2)
    mixed.append(nn.ReLU())
    with pytest.raises(ValueError, match=r"dataloader is None.*other than QCFS"):
        Converter(progress=False).convert_to_spiking_neurons(mixed.eval())


# ---------------------------------------------------------------- calibrate_snn
def test_bias_and_potential_corrections_match_hand_formulas() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval()
    data = [torch.randn(32, 4), torch.randn(32, 4)]
    snn = Converter(
        data, progress=False, neuron_factory=NeuronFactory(v_init=0.5)
    ).convert_to_spiking_neurons(ann)
    x = torch.cat(data)
    with torch.no_grad():
        act = ann(x)
    rate = run_snn(snn, x, 2)[-1]
    state = copy.deepcopy(snn.state_dict())
    fixed = calibrate_snn(snn, ann, data, 2, method="bias", progress=False)
    torch.testing.assert_close(fixed.get_submodule("0").bias, ann[0].bias - (rate - act).mean(0))
    assert all(torch.equal(state[k], v) for k, v in snn.state_dict().items())  # the input SNN is untouched
    moved = calibrate_snn(snn, ann, data, 2, method="potential", progress=False)
    s = snn.get_submodule("spiking_0.scaler1").scale
    torch.testing.assert_close(
        moved.get_submodule("spiking_0.if_node").v_init, 0.5 + 2 * (act - rate).mean(0) / s
    )
    layer = moved.meta["ann2snn_fx.calibrate_snn"][0]
    assert layer.block == "spiking_0"
    assert layer.error_after < layer.error_before
    with pytest.raises(ValueError, match="method must be one of"):
        calibrate_snn(snn, ann, data, 2, method="weights")


def test_calibrate_snn_refuses_batches_of_other_sample_shapes() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).eval()
    data = [torch.randn(4, 1, 6, 6)]
    snn = Converter(data, progress=False).convert_to_spiking_neurons(ann)
    with pytest.raises(
        ValueError, match=r"one sample shape; activation .* had \(4, 6, 6\) and then \(4, 5, 5\)"
    ):
        calibrate_snn(snn, ann, [*data, torch.randn(4, 1, 5, 5)], 2, progress=False)


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = sklearn_datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1437], y[:1437], x[1437:], y[1437:]


@pytest.fixture(scope="module")
def digits_cnn() -> dict[str, Any]:
    xtr, ytr, xte, yte = _digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(128, 10),
        )
        opt = torch.optim.AdamW(model.parameters(), 1e-2, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=6 * 45)
        for _ in range(6):
            model.train()
            order = torch.randperm(len(xtr))
            for i in range(0, len(xtr), 32):
                idx = order[i : i + 32]
                loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    loader = [(xtr[i : i + 256], ytr[i : i + 256]) for i in range(0, len(xtr), 256)]
    return {"model": model, "loader": loader, "x": xte, "y": yte}


def _percent(out: torch.Tensor, y: torch.Tensor) -> float:
    return float((out.argmax(-1) == y).double().mean() * 100)


def test_calibration_improves_digits_accuracy_at_two_steps(digits_cnn: dict[str, Any]) -> None:
    ann, loader, x, y = digits_cnn["model"], digits_cnn["loader"], digits_cnn["x"], digits_cnn["y"]
    with torch.no_grad():
        ann_acc = _percent(ann(x), y)
    assert ann_acc >= 95.0
    before = copy.deepcopy(ann.state_dict())
    snn = Converter(
        loader, progress=False, neuron_factory=NeuronFactory(v_init=0.5)
    ).convert_to_spiking_neurons(ann)
    base = _percent(run_snn(snn, x, 2, multi_step=True)[-1], y)
    for method in ("bias", "potential", "both"):
        fixed = calibrate_snn(snn, ann, loader, 2, method=method, progress=False)
        acc = _percent(run_snn(fixed, x, 2, multi_step=True)[-1], y)
        assert acc > base + 10.0, (method, base, acc)
    assert all(torch.equal(before[k], v) for k, v in ann.state_dict().items())
    burst = Converter(
        loader, progress=False, neuron_factory=NeuronFactory(v_init=0.5, burst=2, signed=True)
    ).convert_to_spiking_neurons(ann)
    fixed = calibrate_snn(burst, ann, loader, 2, progress=False)
    layers = fixed.meta["ann2snn_fx.calibrate_snn"]
    assert len(layers) == 3
    assert sum(c.error_after for c in layers) < sum(c.error_before for c in layers)


@pytest.mark.parametrize(
    ("options", "strategy"),
    [
        ({}, "fixed"),
        ({"burst": 2, "signed": True}, "fixed"),
        ({"signed": True}, "fixed"),
        ({}, "per_channel"),
    ],
    ids=["plain", "burst-signed", "signed", "per-channel"],
)
@pytest.mark.parametrize("method", ["bias", "potential", "both"])
def test_calibrate_snn_reports_the_errors_of_the_snn_it_returns(
    options: dict[str, Any], strategy: str, method: str
) -> None:
    # The runs before a block's last one keep only its spike counts (summed in the neuron's loop; per-channel
    # scalers are not fused and sum the kept output), and re-runs start in earlier membranes: the errors
    # reported must be those of the returned SNN run afresh (step loop, hooks on the output scalers).
    torch.manual_seed(3)
    ann = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 16, 8),
        nn.ReLU(),
    ).eval()
    data = [torch.randn(8, 2, 8, 8) for _ in range(3)]
    snn = Converter(
        data,
        progress=False,
        neuron_factory=NeuronFactory(v_init=0.5, **options),
        threshold_optimizer=ThresholdOptimizer(strategy),
    ).convert_to_spiking_neurons(ann)
    fixed = calibrate_snn(snn, ann, data, 3, method=method, progress=False)
    layers = fixed.meta["ann2snn_fx.calibrate_snn"]
    assert len(layers) == 3
    x = torch.cat(data)
    acts: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda m, i, o: acts.append(o)) for m in ann if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        ann(x)
    for h in handles:
        h.remove()
    outs: dict[str, list[torch.Tensor]] = {layer.block: [] for layer in layers}
    for layer in layers:
        fixed.get_submodule(f"{layer.block}.scaler1").register_forward_hook(
            lambda m, i, o, key=layer.block: outs[key].append(o)
        )
    run_snn(fixed, x, 3)
    for layer, act in zip(layers, acts):
        rate = torch.stack(outs[layer.block]).mean(0)
        error = float((rate.double() - act.double()).mean(0).abs().mean())
        assert error == pytest.approx(layer.error_after, rel=1e-4, abs=1e-6), layer
    assert sum(c.error_after for c in layers) < sum(c.error_before for c in layers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, port: int, path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()).eval()
        data = [torch.randn(32, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        snn = Converter(
            data, progress=False, neuron_factory=NeuronFactory(v_init=0.5)
        ).convert_to_spiking_neurons(ann)
        fixed = calibrate_snn(snn, ann, data[rank::2], 2, progress=False)
        torch.save({k: v for k, v in fixed.state_dict().items()}, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    sys.platform == "win32" or "fork" not in multiprocessing.get_all_start_methods(),
    reason="needs the fork start method (a spawned child cannot import this test module by its pytest name)",
)
def test_two_gloo_ranks_calibrate_like_one_process(tmp_path: pathlib.Path) -> None:
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, str(tmp_path))) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    codes = [proc.exitcode for proc in procs]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    assert codes == [0, 0], f"worker exit codes {codes} (a rank hung or crashed)"
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()).eval()
    data = [torch.randn(32, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    snn = Converter(
        data, progress=False, neuron_factory=NeuronFactory(v_init=0.5)
    ).convert_to_spiking_neurons(ann)
    alone = calibrate_snn(snn, ann, data, 2, progress=False).state_dict()
    for rank in (0, 1):
        shard = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in alone.items():
            torch.testing.assert_close(shard[key], value, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- readout delay
def test_readout_delay_hand_values_and_short_t() -> None:
    snn = trace_model(nn.Sequential(IFNode(v_threshold=4.0, v_reset=None)))
    assert estimate_readout_delay(snn, [torch.ones(2, 3)], 16) == 4
    half = trace_model(nn.Sequential(IFNode(v_threshold=4.0, v_reset=None, v_init=2.0)))
    assert estimate_readout_delay(half, [torch.ones(2, 3)], 16) == 2
    assert estimate_readout_delay(snn, [torch.full((2, 3), 8.0)], 16) == 1
    with pytest.warns(UserWarning, match="time_steps=4 is too short"):
        assert estimate_readout_delay(snn, [torch.ones(2, 3)], 4) == 0
    with pytest.raises(ValueError, match="time_steps must be a positive int"):
        estimate_readout_delay(snn, [torch.ones(2, 3)], 0)


def test_skip_steps_leaves_out_the_first_steps() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    data = [torch.randn(16, 3)]
    snn = Converter(data, progress=False).convert_to_spiking_neurons(ann)
    raw = run_snn(snn, data[0], 8, running_mean=False)
    delayed = run_snn(snn, data[0], 8, skip_steps=3)
    torch.testing.assert_close(delayed[-1], raw[3:].mean(0))
    torch.testing.assert_close(delayed[5], raw[3:6].mean(0))
    torch.testing.assert_close(delayed[1], raw[:2].mean(0))
    with pytest.raises(ValueError, match=r"skip_steps must be an int in \[0, time_steps=8\)"):
        run_snn(snn, data[0], 8, skip_steps=8)


# ---------------------------------------------------------------- tuner
def test_tuner_front_is_non_dominated_and_holds_the_best_per_t(
    digits_cnn: dict[str, Any], tmp_path: pathlib.Path
) -> None:
    ann, loader = digits_cnn["model"], digits_cnn["loader"]
    val = [(digits_cnn["x"], digits_cnn["y"])]
    result = tune_latency(
        ann,
        loader[:2],
        val,
        (1, 2),
        modes=("max",),
        strategies=("fixed", "ltb"),
        v_inits=(0.5,),
        bursts=(1, 2),
        signed=(False, True),
        calibrations=(None, "both"),
        progress=False,
    )
    assert result.complete
    assert len(result.records) >= 16
    front = result.front
    assert front == pareto_front(result.records)
    assert all(not any(o.dominates(r) for o in result.records) for r in front)
    for t in (1, 2):
        best = result.best(t)
        assert best is not None
        assert any(r.time_steps <= t and r.accuracy >= best.accuracy for r in front)
    assert result.markdown().count("\n") == len(front) + 1
    pytest.importorskip("matplotlib")
    assert pathlib.Path(result.plot(str(tmp_path / "front.png"))).stat().st_size > 0
    assert max(r.accuracy for r in result.records if r.time_steps == 1) >= result.ann_accuracy - 3.0
    stopped = tune_latency(
        ann,
        loader[:1],
        val,
        (1,),
        modes=("max",),
        strategies=("fixed",),
        v_inits=(0.5,),
        bursts=(1, 2, 4),
        signed=(False,),
        calibrations=(None,),
        time_budget=1e-9,
        progress=False,
    )
    assert not stopped.complete
    assert stopped.records == []


def test_tuner_spike_count_matches_profile_snn() -> None:
    from ann2snn_fx import profile_snn
    from ann2snn_fx.relu.tuner import _evaluate

    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(32, 4)
    factory = NeuronFactory(v_init=0.5, burst=3, signed=True)
    snn = Converter([x], progress=False, neuron_factory=factory).convert_to_spiking_neurons(ann)
    _, _, spikes = _evaluate(snn, [(x, torch.zeros(32, dtype=torch.long))], 4)
    assert float(spikes.sum()) / 32 == pytest.approx(profile_snn(snn, x, 4).events)


def _record(accuracy: float, error: float, spikes: float, burst: int = 1) -> LatencyRecord:
    return LatencyRecord(2, accuracy, spikes, "max", "fixed", 0.5, burst, False, output_error=error)


def test_tuner_best_breaks_accuracy_ties_by_output_error() -> None:
    far = _record(98.6, 0.40, 100.0, burst=1)
    near = _record(98.6, 0.05, 300.0, burst=2)
    worse = _record(98.2, 0.01, 50.0, burst=4)
    unmeasured = LatencyRecord(2, 98.6, 10.0, "max", "fixed", 0.5, 1, False)
    result = LatencyResult(ann_accuracy=99.0, records=[far, unmeasured, worse, near])
    # Equal accuracy: the lower output error wins over fewer spikes; higher accuracy still comes first.
    assert result.best(2) is near
    result.records.append(_record(98.9, 0.9, 900.0))
    assert result.best(2) == _record(98.9, 0.9, 900.0)
    # Equal accuracy and error: fewest spikes; a record without an error ranks after measured ones.
    tied = LatencyResult(99.0, [_record(98.6, 0.05, 400.0), near, unmeasured])
    assert tied.best(2) is near
    assert LatencyResult(99.0, [unmeasured]).best(2) is unmeasured


def test_tuner_output_error_is_the_mse_of_the_snn_mean_against_the_ann() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(64, 4)
    data = [(x, ann(x).argmax(1))]
    result = tune_latency(
        ann,
        data,
        data,
        (1, 2, 4),
        modes=("max",),
        strategies=("fixed",),
        v_inits=(0.5,),
        bursts=(1,),
        signed=(False,),
        calibrations=(None,),
        readout_delay=False,
        progress=False,
    )
    snn = Converter(
        data,
        progress=False,
        threshold_optimizer=ThresholdOptimizer("fixed"),
        neuron_factory=NeuronFactory(v_init=0.5),
    ).convert_to_spiking_neurons(ann)
    out = run_snn(snn, x, 4)
    with torch.no_grad():
        reference = ann(x)
    assert [r.time_steps for r in result.records] == [1, 2, 4]
    for r in result.records:
        expected = float((out[r.time_steps - 1] - reference).double().pow(2).mean())
        assert r.output_error == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert result.records[0].output_error > 0


def test_tuner_estimates_the_readout_delay_once_per_snn(monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    import ann2snn_fx.relu.tuner as tuner

    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(64, 4)
    data = [(x, ann(x).argmax(1))]
    steps = (2, 8, 16)
    calls: list[dict[int, int]] = []
    real = tuner.charge_steps

    def counting(snn: nn.Module, loader: Any, *args: Any) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calls.append({t: estimate_readout_delay(snn, loader, t) for t in steps})
        return real(snn, loader, *args)

    monkeypatch.setattr(tuner, "charge_steps", counting)
    result = tune_latency(
        ann,
        data,
        data,
        steps,
        modes=("max",),
        strategies=("fixed",),
        v_inits=(0.0, 0.5),
        bursts=(1, 2),
        signed=(False,),
        calibrations=(None,),
        progress=False,
    )
    # One probe per SNN (4 of them), not one per SNN and T.
    assert len(calls) == 4
    expected = sorted((t, d) for c in calls for t, d in c.items() if d)
    assert expected, "the case must take a delay somewhere"
    assert any(d == 0 for c in calls for d in c.values()), "and be too short somewhere"
    assert sorted((r.time_steps, r.skip_steps) for r in result.records if r.skip_steps) == expected


def test_tuner_best_ranks_near_ties_by_pooled_agreement_with_the_ann() -> None:
    # 287 validation and 1150 calibration samples, as in the digits benchmark.
    lucky = LatencyRecord(
        1, 100 * 285 / 287, 10.0, "-", "ltb", 0.5, 2, False, None, 0, 3.1, 100 * 1147 / 1150
    )
    faithful = LatencyRecord(1, 100 * 284 / 287, 20.0, "max", "min_error", 0.5, 4, False, None, 0, 0.3, 100.0)
    result = LatencyResult(99.0, [lucky, faithful], validation_samples=287, agreement_samples=1150)
    # Pooled: (285 + 1147) / 1437 < (284 + 1150) / 1437, so the one validation image is outweighed.
    assert result.best(1) is faithful
    # Without the agreement measurement, the higher validation accuracy wins (the previous rule).
    bare = [dataclasses.replace(r, ann_agreement=float("nan")) for r in (lucky, faithful)]
    assert LatencyResult(99.0, bare).best(1) == bare[0]
    # Equal pooled scores fall back to accuracy, then output error.
    even = dataclasses.replace(faithful, accuracy=lucky.accuracy, ann_agreement=lucky.ann_agreement)
    tied = LatencyResult(99.0, [lucky, even], validation_samples=287, agreement_samples=1150)
    assert tied.best(1) is even


def test_tuner_measures_ann_agreement_of_the_near_ties_on_the_calibration_data() -> None:
    torch.manual_seed(1)
    ann = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    xc, xv = torch.randn(96, 4), torch.randn(50, 4)
    with torch.no_grad():
        yv = ann(xv).argmax(1)
    yv[:3] = (yv[:3] + 1) % 3  # labels the ANN gets wrong: accuracy and agreement differ
    calib, val = [(xc[:48], torch.zeros(48)), (xc[48:], torch.zeros(48))], [(xv, yv)]
    grid: dict[str, Any] = {
        "modes": ("max",),
        "strategies": ("fixed",),
        "v_inits": (0.0, 0.5),
        "bursts": (1, 2),
        "signed": (False,),
        "calibrations": (None,),
        "readout_delay": False,
        "progress": False,
    }
    result = tune_latency(ann, calib, val, (1, 2, 4), tie_break=2, **grid)
    assert (result.validation_samples, result.agreement_samples) == (50, 96)
    with torch.no_grad():
        ann_pred = ann(xc).argmax(1)
    measured = [r for r in result.records if r.ann_agreement == r.ann_agreement]
    assert measured
    for t in (1, 2, 4):
        at = [r for r in result.records if r.time_steps == t]
        top = max(r.accuracy for r in at)
        mine = [r for r in measured if r.time_steps == t]
        assert 1 <= len(mine) <= 2
        # Only records within one validation sample (2 points here) of the best are re-run.
        assert all(r.accuracy >= top - 2.0 - 1e-9 for r in mine)
        assert max(r.accuracy for r in mine) == top
    for r in measured:  # the agreement is the rebuilt SNN's on the calibration inputs, against the ANN
        snn = Converter(
            calib,
            progress=False,
            threshold_optimizer=ThresholdOptimizer("fixed"),
            neuron_factory=NeuronFactory(v_init=r.v_init, burst=r.burst),
        ).convert_to_spiking_neurons(ann)
        out = run_snn(snn, xc, r.time_steps)[-1]
        assert r.ann_agreement == pytest.approx(float((out.argmax(1) == ann_pred).double().mean() * 100))
    assert result.front == pareto_front(result.records)
    assert all(not any(o.dominates(r) for o in result.records) for r in result.front)
    # tie_break=0: nothing is re-run and best() is the plain validation ranking.
    off = tune_latency(ann, calib, val, (1, 2, 4), tie_break=0, **grid)
    assert off.agreement_samples == 0
    assert all(r.ann_agreement != r.ann_agreement for r in off.records)
    plain = [dataclasses.replace(r, ann_agreement=float("nan")) for r in result.records]
    assert [r.accuracy for r in off.records] == [r.accuracy for r in plain]
    for t in (1, 2, 4):
        a, b = off.best(t), LatencyResult(0.0, plain).best(t)
        assert a is not None
        assert b is not None
        assert (a.label, a.accuracy, a.output_error) == (b.label, b.accuracy, b.output_error)
    with pytest.raises(ValueError, match="tie_break must be a non-negative int"):
        tune_latency(ann, calib, val, (1,), tie_break=-1, **grid)


def test_tuner_records_match_each_configuration_rebuilt_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import ann2snn_fx.relu.tuner as tuner

    torch.manual_seed(2)
    ann = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    xc, xv = torch.randn(64, 4), torch.randn(48, 4)
    with torch.no_grad():
        yv, reference = ann(xv).argmax(1), ann(xv)
    yv[:4] = (yv[:4] + 1) % 3
    calib, val = [(xc, torch.zeros(64))], [(xv, yv)]
    calls = []
    real = tuner.calibrate_snn
    monkeypatch.setattr(tuner, "calibrate_snn", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    result = tune_latency(
        ann,
        calib,
        val,
        (1, 2),
        modes=("max", "99.9%"),
        strategies=("fixed", "min_error"),
        v_inits=(0.5,),
        bursts=(1, 2),
        signed=(False, True),
        calibrations=(None, "both"),
        readout_delay=False,
        tie_break=0,
        progress=False,
    )
    # fixed: 2 modes x 2 bursts x 2 signed x 2 T; min_error: the same, one T each -> 32 plain + 32 calibrated.
    assert len(result.records) == 64
    assert sum(r.calibration is not None for r in result.records) == 32
    # Identical SNNs are simulated and calibrated once: min_error gives the same thresholds from either mode,
    # and a signed neuron behaves like a plain one in its first step.
    assert len(calls) < 32
    assert len({(r.time_steps, r.label) for r in result.records}) == 64
    for r in result.records:
        optimizer = (
            ThresholdOptimizer("min_error", time_steps=r.time_steps * r.burst, v_init=r.v_init)
            if r.strategy == "min_error"
            else ThresholdOptimizer(r.strategy)
        )
        snn = Converter(
            calib,
            mode=r.mode,
            progress=False,
            threshold_optimizer=optimizer,
            neuron_factory=NeuronFactory(v_init=r.v_init, burst=r.burst, signed=r.signed),
        ).convert_to_spiking_neurons(ann)
        if r.calibration:
            snn = calibrate_snn(snn, ann, calib, r.time_steps, r.calibration, progress=False)
        out = run_snn(snn, xv, r.time_steps)[-1]
        assert r.accuracy == pytest.approx(float((out.argmax(1) == yv).double().mean() * 100)), r.label
        expected = float((out - reference).double().pow(2).mean())
        assert r.output_error == pytest.approx(expected, rel=1e-5, abs=1e-9), r.label


def test_tuner_time_budget_calibrates_the_most_promising_first(monkeypatch: pytest.MonkeyPatch) -> None:
    import ann2snn_fx.relu.tuner as tuner

    torch.manual_seed(3)
    ann = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(64, 4)
    data = [(x, ann(x).argmax(1))]
    grid: dict[str, Any] = {
        "modes": ("max", "99.9%"),
        "strategies": ("fixed",),
        "v_inits": (0.0, 0.5),
        "bursts": (1, 2),
        "signed": (False,),
        "calibrations": (None, "both"),
        "readout_delay": False,
        "tie_break": 0,
        "progress": False,
    }
    free = tune_latency(ann, data, data, (1, 2), **grid)
    steps: list[int] = []
    real = tuner.calibrate_snn

    def recording(snn: Any, a: Any, loader: Any, t: int, *args: Any, **kwargs: Any) -> Any:
        steps.append(t)
        return real(snn, a, loader, t, *args, **kwargs)

    monkeypatch.setattr(tuner, "calibrate_snn", recording)
    budget = tune_latency(ann, data, data, (1, 2), time_budget=1e6, **grid)
    # The same records (in another order): 8 SNNs x 2 T, each plain and calibrated.
    key = lambda r: (r.time_steps, r.label, r.accuracy, r.output_error, r.spikes_per_sample)  # noqa: E731
    assert sorted(map(key, budget.records)) == sorted(map(key, free.records))
    assert steps == [1, 2] * 8
    # Calibrations ran after every plain record, by the plain record's rank at each T, interleaving the T.
    done = [r for r in budget.records if r.calibration]
    assert all(r.calibration for r in budget.records[len(budget.records) - len(done) :])
    ranked = {
        t: sorted((r for r in free.records if r.time_steps == t and not r.calibration), key=tuner._rank)
        for t in (1, 2)
    }
    expected = [(t, ranked[t][k].label + ", calibrate_snn(both)") for k in range(8) for t in (1, 2)]
    assert [(r.time_steps, r.label) for r in done] == expected

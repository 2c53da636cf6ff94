"""Low-latency neurons (issue 15): burst and signed IFNode options, against hand-computed sequences."""

from __future__ import annotations

import copy
import doctest
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import ann2snn_fx.relu.calibrate
import ann2snn_fx.relu.ltb
import ann2snn_fx.relu.qcfs
import ann2snn_fx.relu.tuner
import ann2snn_fx.snn.readout
from ann2snn_fx import (
    Converter,
    IFNode,
    MultiStepSNN,
    NeuronFactory,
    ThresholdOptimizer,
    reset_net,
    run_snn,
)


def _steps(node: IFNode, xs: list[float]) -> list[float]:
    return [node(torch.tensor([x])).item() for x in xs]


def test_burst_hand_sequence() -> None:
    node = IFNode(v_reset=None, burst=3)
    # v: 2.5 -> k=2 (v .5); 1.2 -> v=1.7 k=1 (.7); 5 -> 5.7 k=3 (2.7, capped); 0 -> 2.7 k=2 (.7); -1 -> -.3 k=0
    assert _steps(node, [2.5, 1.2, 5.0, 0.0, -1.0]) == [2.0, 1.0, 3.0, 2.0, 0.0]
    assert node.v.item() == pytest.approx(-0.3)


def test_burst_threshold_two() -> None:
    node = IFNode(v_threshold=2.0, v_reset=None, burst=4)
    assert _steps(node, [5.0, 0.9, 9.0]) == [2.0, 0.0, 4.0]  # v 1 -> 1.9 -> 10.9 - 8 = 2.9
    assert node.v.item() == pytest.approx(2.9)


def test_signed_hand_sequence_never_below_zero() -> None:
    node = IFNode(v_reset=None, signed=True)
    # 1.2: +1 (v .2, c 1); -1: v -.8 -> -1 (v .2, c 0); -1: v -.8, c 0 -> 0; 2: v 1.2 -> +1 (v .2, c 1)
    assert _steps(node, [1.2, -1.0, -1.0, 2.0]) == [1.0, -1.0, 0.0, 1.0]
    assert node.count.item() == 1.0


def test_signed_burst_random_sequences_keep_relu_range() -> None:
    torch.manual_seed(0)
    node = IFNode(v_reset=None, burst=3, signed=True)
    x = torch.randn(40, 64) * 1.5
    total = torch.zeros(64)
    for t in range(40):
        out = node(x[t])
        total += out
        assert bool((total >= 0).all())
        assert bool(((out >= -1) & (out <= 3)).all())
        torch.testing.assert_close(node.count, total)


def test_signed_brute_force_loop() -> None:
    torch.manual_seed(1)
    x = torch.randn(12, 30)
    node = IFNode(v_reset=None, v_init=0.5, burst=2, signed=True, step_mode="m")
    out = node(x)
    v = torch.full((30,), 0.5)
    c = torch.zeros(30)
    for t in range(12):
        ref = []
        for i in range(30):
            vi = float(v[i]) + float(x[t, i])
            k = min(max(int(vi // 1.0), 0), 2)
            vi -= k
            if vi < 0 and float(c[i]) > 0:
                k -= 1
                vi += 1.0
            c[i] += k
            v[i] = vi
            ref.append(k)
        assert out[t].tolist() == [float(k) for k in ref]


def _two_stage(
    x: torch.Tensor, threshold: float | torch.Tensor, burst: int, signed: bool, v_init: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rule as first written, kernel for kernel: the positive burst stage, then the negative spike where
    ``v < 0`` and the count is positive. Returns ``(out [T, *], v, count)``."""
    v = torch.full_like(x[0], v_init)
    count = torch.zeros_like(x[0])
    outs = []
    tensor = isinstance(threshold, torch.Tensor)
    for t in range(x.shape[0]):
        v.add_(x[t])
        out = torch.empty_like(v)
        if burst == 1:
            torch.ge(v, threshold, out=out)
        else:
            torch.div(v, threshold, out=out) if tensor or threshold != 1.0 else torch.floor(v, out=out)
            out.floor_().clamp_(0, burst)
        v.sub_(out * threshold) if tensor else v.sub_(out, alpha=threshold)  # type: ignore[arg-type]
        if signed:
            negative = torch.minimum((v < 0).to(v.dtype), count)
            out.sub_(negative)
            v.add_(negative * threshold) if tensor else v.add_(negative, alpha=threshold)  # type: ignore[arg-type]
            count.add_(out)
        outs.append(out)
    return torch.stack(outs), v, count


@pytest.mark.parametrize("threshold", [1.0, 0.7, torch.tensor(1.3)], ids=["1", "0.7", "tensor"])
@pytest.mark.parametrize(("burst", "signed"), [(1, True), (2, False), (4, False), (2, True), (4, True)])
def test_fast_kernels_equal_the_two_stage_rule_bit_for_bit(
    threshold: float | torch.Tensor, burst: int, signed: bool
) -> None:
    from ann2snn_fx.snn.dynamics import fire_burst_signed_

    torch.manual_seed(4)
    # Quarters hit the thresholds, the burst cap and v = 0 exactly; the Gaussian part covers the rest.
    x = torch.cat([torch.randint(-8, 9, (24, 2, 40)) / 4.0, torch.randn(24, 2, 40) * 1.3], 1)
    ref, ref_v, ref_count = _two_stage(x, threshold, burst, signed, 0.5)
    node = IFNode(v_threshold=threshold, v_reset=None, v_init=0.5, burst=burst, signed=signed).eval()
    with torch.no_grad():
        loop = torch.stack([node(x[t]) for t in range(24)])  # single steps
        assert torch.equal(loop, ref)
        assert torch.equal(node.v, ref_v)
        if signed:
            assert torch.equal(node.count, ref_count)  # type: ignore[arg-type]
        node.reset()
        node.step_mode = "m"
        chunks = torch.cat([node(x[:1]), node(x[1:7]), node(x[7:])])  # the sequence path, state carried over
        assert torch.equal(chunks, ref)
        assert torch.equal(node.v, ref_v)
        if signed:
            assert torch.equal(node.count, ref_count)  # type: ignore[arg-type]
            assert bool((ref.cumsum(0) >= 0).all())
            assert bool((ref < 0).any())
    v = torch.full_like(x[0], 0.5)
    count = torch.zeros_like(x[0]) if signed else None
    for t in range(24):  # the public in-place step, which takes the count as it is
        v.add_(x[t])
        out = torch.empty_like(v)
        fire_burst_signed_(v, out, threshold, burst, count)
        assert torch.equal(out, ref[t])
    assert torch.equal(v, ref_v)
    assert count is None or torch.equal(count, ref_count)


@pytest.mark.parametrize("v_init", [0.5, torch.linspace(-0.5, 1.0, 6)], ids=["number", "tensor"])
@pytest.mark.parametrize(("burst", "signed"), [(1, False), (3, False), (1, True), (2, True)])
def test_sequence_sums_into_totals_and_restarts_into_a_given_membrane(
    burst: int, signed: bool, v_init: float | torch.Tensor
) -> None:
    torch.manual_seed(5)
    x = torch.randn(5, 4, 6) * 1.5
    node = IFNode(v_reset=None, v_init=v_init, burst=burst, signed=signed).eval()
    with torch.no_grad():
        ref = node._inference_sequence(x, input_scale=0.7)
        ref_v = node.v.clone()  # type: ignore[union-attr]
        ref_count = node.count
        spare = torch.full((4, 6), float("nan"))
        node._reset_into(spare)  # reset, with the initial potential written into the given tensor
        assert node.v is spare
        assert torch.equal(spare, torch.as_tensor(v_init).expand(4, 6))
        totals = torch.full((6,), 100.0)
        last = node._inference_sequence(x, input_scale=0.7, totals=totals)  # no [T, N, *] output kept
        assert last.shape == (4, 6)
        assert torch.equal(last, ref[-1])
        assert torch.equal(totals, 100.0 + ref.sum((0, 1)))  # summed over time and batch, in place
        assert torch.equal(node.v, ref_v)
        if signed:
            assert torch.equal(node.count, ref_count)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "v_init", [0.5, torch.linspace(-0.5, 1.0, 3).view(3, 1, 1)], ids=["number", "tensor"]
)
@pytest.mark.parametrize(("burst", "signed"), [(1, False), (3, True)])
@pytest.mark.parametrize("static", [False, True], ids=["temporal", "static"])
def test_channels_last_input_keeps_its_layout_and_values(
    burst: int, signed: bool, v_init: float | torch.Tensor, static: bool
) -> None:
    # The spike buffers and a new membrane follow the input's layout, also for a static input expanded over
    # time (its steps are one dense channels-last tensor); the spikes equal those of the default layout.
    torch.manual_seed(6)
    if static:
        step = torch.randn(4, 3, 5, 5) * 1.5
        x = step.unsqueeze(0).expand(6, *step.shape)
        xc = step.contiguous(memory_format=torch.channels_last).unsqueeze(0).expand(6, *step.shape)
    else:
        x = torch.randn(6, 4, 3, 5, 5) * 1.5
        xc = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (6, 4))
    cl = torch.channels_last
    for totals in (None, torch.zeros(3, 5, 5)):
        node = IFNode(v_reset=None, v_init=v_init, burst=burst, signed=signed).eval()
        with torch.no_grad():
            ref = node._inference_sequence(
                x, input_scale=0.7, totals=None if totals is None else totals.clone()
            )
            node.reset()
            out = node._inference_sequence(xc, input_scale=0.7, totals=totals)
        assert node.v.is_contiguous(memory_format=cl)
        assert not node.v.is_contiguous()
        if totals is None:
            assert all(out[t].is_contiguous(memory_format=cl) for t in range(6))
            assert torch.equal(out, ref)
        else:
            assert out.is_contiguous(memory_format=cl)
            assert torch.equal(out, ref)  # the last step's spikes


@pytest.mark.parametrize(
    "layout",
    ["contiguous", "channels_last", "channels_last_3d", "permuted", "strided", "expanded"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sum_first_dim_equals_torch_sum_in_every_layout(layout: str, dtype: torch.dtype) -> None:
    from ann2snn_fx.snn.dynamics import sum_first_dim

    torch.manual_seed(7)
    base = torch.randn(37, 6, 5, 4, 3)
    x = {
        "contiguous": base[:, :, :, :, 0],
        "channels_last": base[:, :, :, :, 0].contiguous(memory_format=torch.channels_last),
        "channels_last_3d": base.contiguous(memory_format=torch.channels_last_3d),
        "permuted": base[:, :, :, :, 0].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),  # N, W, C, H
        "strided": base[:, :, ::2, :, 1],
        "expanded": base[:1, :, :, :, 0].expand(37, 6, 5, 4),
    }[layout]
    got = sum_first_dim(x, dtype)
    want = x.contiguous().sum(0, dtype=dtype)
    assert got.shape == want.shape
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    counts = (x > 0).to(torch.float32)  # integer counts: exact in every order
    assert torch.equal(sum_first_dim(counts, dtype), counts.contiguous().sum(0, dtype=dtype))


@pytest.mark.parametrize("threshold", [1.0, 0.7, torch.tensor(1.3)])
@pytest.mark.parametrize("v_reset", [None, 0.0])
def test_default_options_are_bit_identical(threshold: object, v_reset: float | None) -> None:
    torch.manual_seed(2)
    x = torch.randn(16, 3, 5)
    a = IFNode(v_threshold=threshold, v_reset=v_reset, v_init=0.25)  # type: ignore[arg-type]
    b = IFNode(v_threshold=threshold, v_reset=v_reset, v_init=0.25, burst=1, signed=False)  # type: ignore[arg-type]
    assert torch.equal(torch.stack([a(x[t]) for t in range(16)]), torch.stack([b(x[t]) for t in range(16)]))
    a.reset()
    b.reset()
    a.step_mode = b.step_mode = "m"
    assert torch.equal(a(x), b(x))
    a.train()
    b.train()
    a.reset()
    b.reset()
    assert torch.equal(a(x), b(x))


def test_signed_count_survives_pickling_old_and_new() -> None:
    node = IFNode(v_reset=None, signed=True).eval()
    with torch.no_grad():
        for x in (1.2, 2.5, -0.1):
            node(torch.tensor([x, 1.0]))
    assert node.count.tolist() == [3.0, 3.0]  # type: ignore[union-attr]
    loaded = pickle.loads(pickle.dumps(node))
    assert loaded.count.tolist() == [3.0, 3.0]
    old_state = dict(node.__dict__)  # as pickled before the count was kept negated
    old_state["count"] = torch.neg(old_state.pop("_negative_count"))
    old = IFNode.__new__(IFNode)
    old.__setstate__(old_state)
    assert old.count.tolist() == [3.0, 3.0]  # type: ignore[union-attr]
    with torch.no_grad():  # the carried count still allows the negative spikes
        assert old(torch.tensor([-1.5, -1.5])).tolist() == [-1.0, -1.0]
    node.reset()
    assert node.count == 0.0


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="burst must be a positive int"):
        IFNode(v_reset=None, burst=0)
    with pytest.raises(ValueError, match="burst must be a positive int"):
        IFNode(v_reset=None, burst=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="signed must be a bool"):
        IFNode(v_reset=None, signed=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="need the soft reset"):
        IFNode(v_reset=0.0, burst=2)


def test_tensor_v_init_and_state_dict_round_trip() -> None:
    node = IFNode(v_reset=None, v_init=torch.tensor([0.0, 0.9]))
    assert node(torch.tensor([[0.5, 0.5]])).tolist() == [[0.0, 1.0]]
    fresh = IFNode(v_reset=None)
    fresh.load_state_dict(node.state_dict())
    torch.testing.assert_close(fresh.v_init, node.v_init)  # type: ignore[arg-type]
    assert fresh(torch.tensor([[0.5, 0.5]])).tolist() == [[0.0, 1.0]]
    with pytest.raises(ValueError, match="finite"):
        node.set_v_init(torch.tensor([float("nan")]))


def test_gradient_flows_through_the_membrane() -> None:
    node = IFNode(v_reset=None, burst=2, signed=True)
    x = torch.tensor([1.7, -0.3], requires_grad=True)
    out = node(x)
    node.v.sum().backward()  # type: ignore[union-attr]
    assert out.tolist() == [1.0, 0.0]
    assert x.grad is not None
    assert x.grad.tolist() == [1.0, 1.0]


def test_factory_builds_the_options() -> None:
    factory = NeuronFactory(IFNode, v_init=0.5, burst=4, signed=True)
    neuron = factory.create(scale=2.0)
    assert isinstance(neuron, IFNode)
    assert (neuron.burst, neuron.signed, neuron.v_init, neuron.spike_unit) == (4, True, 0.5, 1.0)
    assert "burst=4" in repr(factory)
    assert "burst=4" in neuron.extra_repr()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = nn.functional.avg_pool2d(x, 2)
        return self.fc(torch.relu(self.c2(x) + x).flatten(1))


@pytest.mark.parametrize("strategy", ["fixed", "per_channel"])
def test_converted_options_step_loop_equals_multi_step_and_survive_saving(strategy: str) -> None:
    from ann2snn_fx import all_rules

    torch.manual_seed(3)
    ann = _Net().eval()
    data = [torch.randn(8, 2, 8, 8) for _ in range(2)]
    snn = Converter(
        data,
        progress=False,
        rules=all_rules(),
        neuron_factory=NeuronFactory(v_init=0.5, burst=3, signed=True),
        threshold_optimizer=ThresholdOptimizer(strategy),
    ).convert_to_spiking_neurons(ann)
    x = torch.randn(5, 2, 8, 8)
    loop = run_snn(snn, x, 6)
    multi = run_snn(snn, x, 6, multi_step=True)
    torch.testing.assert_close(loop, multi, atol=1e-5, rtol=1e-5)
    reset_net(snn)
    with torch.no_grad():
        chunked = MultiStepSNN(snn, chunk_elements=64)(
            x, 6
        )  # chunks of steps carry the state (and the count)
    torch.testing.assert_close(chunked.cumsum(0)[-1] / 6, loop[-1], atol=1e-5, rtol=1e-5)
    buffer = io.BytesIO()
    torch.save(snn, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(run_snn(loaded, x, 6), loop)
    skeleton = Converter(
        progress=False,
        rules=all_rules(),
        neuron_factory=NeuronFactory(v_init=0.5, burst=3, signed=True),
        threshold_optimizer=ThresholdOptimizer(strategy),
    ).convert_to_spiking_neurons(ann, calibrate=False)
    skeleton.load_state_dict(snn.state_dict())
    torch.testing.assert_close(run_snn(skeleton, x, 6), loop)
    assert any(isinstance(m, IFNode) and m.burst == 3 and m.signed for m in copy.deepcopy(snn).modules())


@pytest.mark.parametrize(
    "module",
    [
        ann2snn_fx.relu.calibrate,
        ann2snn_fx.relu.ltb,
        ann2snn_fx.relu.qcfs,
        ann2snn_fx.relu.tuner,
        ann2snn_fx.snn.readout,
    ],
    ids=lambda m: m.__name__.rsplit(".", 1)[-1],
)
def test_docstring_examples(module: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)  # type: ignore[arg-type]
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize("signed", [False, True])
def test_a_scratch_step_buffer_is_reused_only_where_it_fits(signed: bool) -> None:
    from ann2snn_fx.snn.dynamics import burst_signed_sequence, integrate_and_fire_sequence

    torch.manual_seed(4)
    x_seq = torch.rand(5, 3, 4, 6) * 0.8

    def run(scratch: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        totals = torch.zeros(4, 6)
        v = torch.full((3, 4, 6), 0.5)
        if signed:
            out, _ = burst_signed_sequence(v, x_seq, 1.0, 2, True, None, None, totals, scratch)
        else:
            out, _ = integrate_and_fire_sequence(v, x_seq, 1.0, None, totals, scratch)
        return out, totals

    fresh_out, fresh_totals = run(None)
    fits = torch.full((3, 4, 6), 7.0)  # stale contents: every step overwrites it
    out, totals = run(fits)
    assert out is fits
    assert torch.equal(totals, fresh_totals)
    assert torch.equal(out, fresh_out)  # the last step's spikes
    for wrong in (torch.zeros(2, 4, 6), torch.zeros(3, 4, 6, dtype=torch.float64)):
        out, totals = run(wrong)
        assert out is not wrong
        assert torch.equal(totals, fresh_totals)

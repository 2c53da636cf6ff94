"""Threshold strategies, the histogram hook and the factories."""

from typing import Any

import pytest
import torch
from torch import nn

from ann2snn_calib import VoltageHook
from ann2snn_fx import (
    ActivationStatsHook,
    Converter,
    HookFactory,
    IFNode,
    NeuronFactory,
    ThresholdOptimizer,
    run_snn,
)
from ann2snn_fx.threshold import expected_error


def _hook(*batches: torch.Tensor, **kwargs: Any) -> VoltageHook:
    hook = ActivationStatsHook(**kwargs) if kwargs.get("histogram_bins") else VoltageHook(**kwargs)
    for batch in batches:
        hook(batch)
    return hook


def test_strategies_listed() -> None:
    assert ThresholdOptimizer.strategies == ("fixed", "min_error", "per_channel", "ltb")


def test_fixed_returns_hook_scale() -> None:
    hook = _hook(torch.tensor([0.5, 2.0]), torch.tensor([4.0]))
    assert ThresholdOptimizer().compute_threshold(hook) == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)


def test_unknown_strategy_fails_at_compute_time() -> None:
    optimizer = ThresholdOptimizer("magic")
    with pytest.raises(NotImplementedError, match=r"Strategy 'magic' is not implemented\."):
        optimizer.compute_threshold(_hook(torch.ones(2)))


def test_hook_without_scale_is_attribute_error() -> None:
    with pytest.raises(AttributeError):
        ThresholdOptimizer().compute_threshold(object())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "min_error"}, "needs time_steps"),
        ({"strategy": "min_error", "time_steps": 0}, "needs time_steps"),
        ({"time_steps": 2.5}, "time_steps must be a positive int"),
        ({"v_init": 1.0}, "v_init must be a fraction"),
        ({"v_init": -0.1}, "v_init must be a fraction"),
        ({"histogram_bins": 1}, "histogram_bins must be an int >= 2"),
        ({"channel_dim": 0}, "channel_dim must be a non-zero int"),
        ({"min_threshold": 0.0}, "min_threshold must be a finite positive number"),
        ({"min_threshold": float("inf")}, "min_threshold must be a finite positive number"),
    ],
)
def test_optimizer_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ThresholdOptimizer(**kwargs)


@pytest.mark.parametrize(("steps", "v_init"), [(1, 0.0), (4, 0.0), (4, 0.5), (16, 0.5)])
def test_expected_error_matches_simulated_if_neuron(steps: int, v_init: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(500, dtype=torch.float64) * 2.0
    thresholds = torch.tensor([0.5, 1.0, 1.7], dtype=torch.float64)
    predicted = expected_error(x, torch.ones_like(x), thresholds, steps, v_init)
    for s, err in zip(thresholds, predicted):
        node = IFNode(v_reset=None, v_init=v_init)
        out = sum(node(x / s) for _ in range(steps)) * s / steps
        torch.testing.assert_close(((out - x) ** 2).mean(), err)


def test_histogram_doubling_is_exact() -> None:
    torch.manual_seed(0)
    first = torch.rand(1000)
    second = torch.rand(1000) * 3.5 - 0.5
    hook = _hook(first, second, histogram_bins=64)
    rng = hook.hist_range.item()
    assert rng == pytest.approx(first.max().item() * 4)
    values = torch.cat([first, second])
    values = values[values > 0]
    idx = (values * (64 / rng)).long().clamp(0, 63)
    expected = torch.bincount(idx, minlength=64).double()
    # Bin edges of the doubled range are edges of the original one, so merging loses nothing; only values
    # within float rounding of an edge may land in the neighbouring bin.
    assert hook.hist.sum().item() == expected.sum().item()
    assert (hook.hist - expected).abs().sum().item() <= 4
    assert hook(first) is first


@pytest.mark.parametrize(("bins", "match"), [(-2, "non-negative"), (3, "even"), (True, "non-negative")])
def test_histogram_bins_validation(bins: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ActivationStatsHook(histogram_bins=bins)


def test_min_error_matches_brute_force_and_adapts_to_steps() -> None:
    torch.manual_seed(0)
    acts = torch.relu(torch.randn(20000)) ** 2  # long tail: the max is far above the bulk
    hook = _hook(acts, histogram_bins=2048)
    top = acts.max().item()
    grid = torch.linspace(top / 512, top, 512, dtype=torch.float64)
    for steps in (2, 8, 64):
        chosen = ThresholdOptimizer("min_error", time_steps=steps, v_init=0.5).compute_threshold(hook)
        brute = expected_error(acts.double(), torch.ones_like(acts, dtype=torch.float64), grid, steps, 0.5)
        best = brute.min().item()
        mine = expected_error(
            acts.double(), torch.ones_like(acts, dtype=torch.float64), torch.tensor([chosen]), steps, 0.5
        )
        assert mine.item() <= best * 1.05
    low = ThresholdOptimizer("min_error", time_steps=2, v_init=0.5).compute_threshold(hook)
    high = ThresholdOptimizer("min_error", time_steps=256, v_init=0.5).compute_threshold(hook)
    assert low < high < top * 1.01


def test_min_error_needs_histogram() -> None:
    with pytest.raises(ValueError, match="needs hooks that record an activation histogram"):
        ThresholdOptimizer("min_error", time_steps=4).compute_threshold(_hook(torch.ones(3)))


def test_per_channel_thresholds_and_dead_channels() -> None:
    x = torch.tensor([[[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]]])  # [N=1, C=3, L=2]
    hook = _hook(x, channel_dim=1)
    thresholds = ThresholdOptimizer("per_channel").compute_threshold(hook)
    assert isinstance(thresholds, torch.Tensor)
    torch.testing.assert_close(thresholds, torch.tensor([2.0, 3.0, 3.0]))
    floored = ThresholdOptimizer("per_channel", min_threshold=2.5).compute_threshold(hook)
    torch.testing.assert_close(floored, torch.tensor([2.5, 3.0, 3.0]))
    with pytest.raises(ValueError, match="needs hooks with per-channel scales"):
        ThresholdOptimizer("per_channel").compute_threshold(_hook(x))


def test_hook_options_drive_the_converter_hooks() -> None:
    assert ThresholdOptimizer().hook_options() == {}
    assert ThresholdOptimizer("min_error", time_steps=4, histogram_bins=128).hook_options() == {
        "histogram_bins": 128
    }
    assert ThresholdOptimizer("per_channel", channel_dim=-1).hook_options() == {"channel_dim": -1}
    assert isinstance(HookFactory(histogram_bins=8).create(), ActivationStatsHook)
    assert HookFactory(channel_dim=1).create().channel_dim == 1
    first, second = HookFactory().create(), HookFactory().create()
    assert first is not second


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 6, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(6 * 16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.mark.parametrize(
    "optimizer",
    [
        ThresholdOptimizer("per_channel"),
        ThresholdOptimizer("min_error", time_steps=8, v_init=0.5),
    ],
)
def test_strategies_convert_end_to_end(optimizer: ThresholdOptimizer) -> None:
    torch.manual_seed(0)
    ann = ConvNet().eval()
    data = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    snn = Converter(
        data, progress=False, threshold_optimizer=optimizer, neuron_factory=NeuronFactory(v_init=0.5)
    ).convert_to_spiking_neurons(ann)
    scale = snn.get_submodule("body.spiking_0.scaler1").scale
    assert scale.shape == ((6,) if optimizer.strategy == "per_channel" else ())
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        err = (run_snn(snn, x, 128)[-1] - ann(x)).abs().mean() / ann(x).abs().mean()
    assert err < 0.1


def test_neuron_factory_defaults_and_v_init() -> None:
    neuron = NeuronFactory().create(scale=2.0)
    assert isinstance(neuron, IFNode)
    assert (neuron.v_threshold, neuron.v_reset, neuron.v_init) == (1.0, None, None)
    assert NeuronFactory(v_init=0.5).create(1.0).v == 0.5
    assert NeuronFactory(v_threshold=2).create(1.0).v_threshold == 2.0
    with pytest.raises(TypeError, match="neuron_type must be a class"):
        NeuronFactory(neuron_type=3)  # type: ignore[arg-type]
    assert "v_init=0.5" in repr(NeuronFactory(v_init=0.5))

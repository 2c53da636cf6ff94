"""diagnose and diagnose_td on constructed cases whose answer is known."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from ann2snn_fx import Converter, NeuronFactory, replace_by_td_operators
from ann2snn_fx.analysis import diagnose, diagnose_td


class _Scaled:
    """A threshold optimizer returning a fixed fraction of the calibrated maximum."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def compute_threshold(self, hook: nn.Module) -> float:
        return float(hook.scale) * self.factor


def _setup(seed: int = 0) -> tuple[nn.Module, torch.Tensor, DataLoader]:
    torch.manual_seed(seed)
    ann = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.rand(64, 4)
    return ann, x, DataLoader(TensorDataset(x), batch_size=32)


def test_low_threshold_clipping_dominates() -> None:
    ann, x, loader = _setup()
    snn = Converter(loader, progress=False, threshold_optimizer=_Scaled(0.3)).convert_to_spiking_neurons(ann)
    d = diagnose(ann, snn, x, 64)
    assert max(d.shares, key=d.shares.__getitem__) == "clipping"
    # The first layer sees the ANN's own input, so its clipping is exactly the share above the threshold.
    first = d.layers[0]
    with torch.no_grad():
        a = torch.relu(ann[0](x))
    s = float(snn.get_submodule("spiking_0.scaler1").scale)
    expected = float(torch.linalg.vector_norm(a - a.clamp(max=s)) / torch.linalg.vector_norm(a))
    assert first.clipping == pytest.approx(expected, rel=1e-5)
    assert "percentile" in d.suggestions[0]
    assert "threshold" in d.suggestions[0]
    assert d.left == []
    assert "clipping" in d.to_markdown()


def test_small_t_quantisation_dominates_and_first_layer_is_exact() -> None:
    ann, x, loader = _setup()
    snn = Converter(loader, progress=False).convert_to_spiking_neurons(ann)
    d = diagnose(ann, snn, x, 2)
    assert max(d.shares, key=d.shares.__getitem__) == "quantisation"
    assert "raise T" in d.suggestions[0]
    assert "v_init=0.5" in d.suggestions[0]
    # Layer 1 gets the exact ANN input at every step: its SNN output is the quantised value, remainder 0.
    assert d.layers[0].remainder < 1e-6
    at_large_t = diagnose(ann, snn, x, 256)
    assert at_large_t.layers[0].quantisation < d.layers[0].quantisation / 50


def test_v_init_half_is_not_suggested_again() -> None:
    ann, x, loader = _setup()
    snn = Converter(
        loader, progress=False, neuron_factory=NeuronFactory(v_init=0.5)
    ).convert_to_spiking_neurons(ann)
    d = diagnose(ann, snn, x, 2)
    assert not any("v_init" in s for s in d.suggestions)
    assert d.layers[0].remainder < 1e-6  # rounding is predicted exactly too


def test_unconverted_activation_is_reported_first() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2)).eval()
    x = torch.rand(32, 4)
    with pytest.warns(UserWarning, match="stayed ANN operations"):
        snn = Converter(
            DataLoader(TensorDataset(x), batch_size=16), progress=False
        ).convert_to_spiking_neurons(ann)
    d = diagnose(ann, snn, x, 8)
    assert [a.kind for a in d.left]
    assert "GELU" in d.left[0].kind
    assert "stayed ANN operations" in d.suggestions[0]


def test_diagnose_rejects_unconverted_model() -> None:
    ann, x, _ = _setup()
    with pytest.raises(TypeError, match="conversion_report"):
        diagnose(ann, ann, x, 4)  # type: ignore[arg-type]
    ann2, _, loader = _setup()
    snn = Converter(loader, progress=False).convert_to_spiking_neurons(ann2)
    with pytest.raises(ValueError, match="time_steps"):
        diagnose(ann2, snn, x, 0)


def test_diagnose_td_locates_a_broken_node() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 3)).eval()
    x = torch.randn(5, 2, 6)
    td = replace_by_td_operators(ann)
    assert diagnose_td(ann, td, x).first_broken is None
    td.add_submodule("3", nn.LayerNorm(6))  # a plain LayerNorm on differential data breaks the equivalence
    td.get_submodule("3").load_state_dict(ann[3].state_dict())
    d = diagnose_td(ann, td, x)
    assert d.first_broken == "3"
    deviations = {n.name: n.deviation for n in d.nodes}
    assert deviations["2"] < 1e-5
    assert deviations["4"] > 1e-3
    assert "first broken at '3'" in d.to_markdown()


def test_per_channel_thresholds_are_broadcast_per_channel() -> None:
    from ann2snn_fx import ThresholdOptimizer

    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 3)).eval()
    x = torch.rand(16, 1, 5, 5)
    ann[0].weight.data[1] *= 5.0  # channels with very different ranges
    converter = Converter(
        DataLoader(TensorDataset(x), batch_size=8),
        progress=False,
        threshold_optimizer=ThresholdOptimizer("per_channel"),
    )
    snn = converter.convert_to_spiking_neurons(ann)
    assert snn.get_submodule("spiking_0.scaler1").scale.numel() == 4
    d = diagnose(ann, snn, x, 3)
    assert d.layers[0].remainder < 1e-6  # the predicted quantised value uses each channel's own threshold


def test_training_mode_ann_is_refused() -> None:
    ann, x, loader = _setup()
    snn = Converter(loader, progress=False).convert_to_spiking_neurons(ann)
    with pytest.raises(ValueError, match=r"ann\.eval\(\)"):
        diagnose(ann.train(), snn, x, 4)

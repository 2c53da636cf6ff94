"""The converter (ann2snn-fx) builds its SNNs out of ann2snn-calib and ann2snn-ops modules, as installed."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ann2snn_calib
import ann2snn_ops
from ann2snn_fx import Converter, IFNode, NeuronFactory, reset_net
from ann2snn_fx.td import replace_by_td_operators


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    ).eval()


def _images(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _loader() -> DataLoader:
    x = _images()
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=16)


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(x)
        return self.head(x.mean(dim=-2))


def _count(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def test_relu_conversion_inserts_calib_scalers_and_fx_neurons() -> None:
    ann = _cnn()
    snn = Converter(_loader(), mode="max", progress=False).convert_to_spiking_neurons(ann)

    scalers = [m for m in snn.modules() if isinstance(m, ann2snn_calib.VoltageScaler)]
    assert len(scalers) == 4  # two per ReLU: theta / s before the neuron, s after it
    assert {type(m).__module__.split(".")[0] for m in scalers} == {"ann2snn_calib"}
    assert _count(snn, IFNode) == 2
    assert _count(snn, nn.ReLU) == 0
    assert _count(snn, nn.BatchNorm2d) == 0  # fused into the convolution
    assert _count(snn, ann2snn_calib.VoltageHook) == 0  # observers are gone after calibration
    assert _count(ann, nn.ReLU) == 2
    assert _count(ann, nn.BatchNorm2d) == 1


def test_converted_snn_approaches_the_ann_as_time_grows() -> None:
    ann = _cnn()
    snn = Converter(_loader(), mode="max", neuron_factory=NeuronFactory(v_init=0.5), progress=False)
    snn = snn.convert_to_spiking_neurons(ann).eval()
    x = _images(32, seed=2)
    with torch.no_grad():
        expected = ann(x)
        reset_net(snn)
        out_sum = torch.zeros_like(expected)
        errors = {}
        for t in range(1, 129):
            out_sum += snn(x)
            if t in (4, 128):
                errors[t] = (out_sum / t - expected).abs().mean().item()
    scale = expected.abs().mean().item()
    assert errors[128] < errors[4]
    assert errors[128] < 0.05 * scale


def test_td_conversion_uses_ann2snn_ops_operators() -> None:
    torch.manual_seed(0)
    ann = _Transformer().eval()
    kinds_before = [type(m) for m in ann.modules()]
    td = replace_by_td_operators(ann, strict=True)

    kinds = {type(m) for m in td.modules()}
    assert {
        ann2snn_ops.TDLinear,
        ann2snn_ops.TDLayerNorm,
        ann2snn_ops.TDGELU,
        ann2snn_ops.TDMultiheadAttention,
    } <= kinds
    assert {type(m).__module__.split(".")[0] for m in td.modules() if type(m).__name__.startswith("TD")} == {
        "ann2snn_ops"
    }
    assert not any(type(m) in (nn.Linear, nn.LayerNorm, nn.GELU, nn.MultiheadAttention) for m in td.modules())
    assert [type(m) for m in ann.modules()] == kinds_before  # the caller's model is untouched

    x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(1))
    x_seq = torch.zeros(6, *x.shape)
    x_seq[0] = x
    with torch.no_grad():
        cumulative = td(x_seq).cumsum(dim=0)
        expected = ann(x)
    for t in range(len(x_seq)):
        torch.testing.assert_close(cumulative[t], expected, atol=1e-5, rtol=1e-5)


def test_converter_method_and_function_build_the_same_td_model() -> None:
    torch.manual_seed(0)
    ann = _Transformer().eval()
    via_method = Converter([torch.zeros(1, 5, 6)], progress=False).replace_by_td_operators(ann)
    via_function = replace_by_td_operators(ann)
    assert [type(m) for m in via_method.modules()][1:] == [type(m) for m in via_function.modules()][1:]
    x_seq = torch.randn(3, 2, 5, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(via_method(x_seq), via_function(x_seq), atol=0, rtol=0)

"""Real model shapes (ResNet, VGG, functional), tracing options and persistence of converted SNNs."""

import copy
import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from ann2snn_calib import VoltageScaler
from ann2snn_fx import (
    Converter,
    IFNode,
    ModelTraceError,
    NeuronFactory,
    ThresholdOptimizer,
    all_rules,
    run_snn,
    trace_model,
)


class BasicBlock(nn.Module):
    """torchvision-style residual block: one ReLU module called twice."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class TinyVGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        cfg = [8, 8, "A", 16, 16, "A"]
        layers: list[nn.Module] = []
        cin = 1
        for v in cfg:
            if v == "A":
                layers.append(nn.AvgPool2d(2))
            else:
                layers += [
                    nn.Conv2d(cin, int(v), 3, padding=1),
                    nn.BatchNorm2d(int(v)),
                    nn.ReLU(inplace=True),
                ]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 2 * 2, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = torch.relu(self.conv2(x) + x)
        return self.fc(x.flatten(1))


def _init(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


def _loader(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.zeros(16)) for _ in range(n)]


def _relative_error(snn: nn.Module, ann: nn.Module, steps: int = 128) -> float:
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        target = ann(x)
    out = run_snn(snn, x, steps, multi_step=True)[-1]
    return ((out - target).norm() / target.norm()).item()


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize(
    ("factory", "rules", "neurons", "names"),
    [
        (TinyResNet, None, 7, ["layer1.0.spiking_0", "layer1.0.spiking_1", "stem.spiking_0"]),
        (TinyVGG, None, 5, ["features.spiking_0", "features.spiking_3", "classifier.spiking_0"]),
        (FunctionalNet, "all", 2, ["spiking_0", "spiking_1"]),
    ],
)
def test_real_model_shapes_convert_and_approximate(
    factory: Any, rules: Any, neurons: int, names: list[str], record_property: Any
) -> None:
    ann = _init(factory())
    state = copy.deepcopy(ann.state_dict())
    converter = Converter(_loader(), progress=False, rules=all_rules() if rules else None)
    snn = converter.convert_to_spiking_neurons(ann)
    assert _count(snn, IFNode) == neurons
    assert _count(snn, nn.ReLU) == 0
    modules = dict(snn.named_modules())
    for name in names:
        assert isinstance(modules[f"{name}.if_node"], IFNode)
    assert not snn.conversion_report.left
    error = _relative_error(snn, ann)
    record_property("relative_error_T128", f"{error:.3f}")  # for docs/models.md
    assert error < 0.15
    for key, value in ann.state_dict().items():
        assert torch.equal(value, state[key])


def test_resnet_shared_relu_blocks_are_independent() -> None:
    snn = Converter(_loader(), progress=False).convert_to_spiking_neurons(_init(TinyResNet()))
    first = snn.get_submodule("layer1.0.spiking_0")
    second = snn.get_submodule("layer1.0.spiking_1")
    assert first.if_node is not second.if_node
    assert first.scaler1.scale.item() != second.scaler1.scale.item()


# ---------------------------------------------------------------- tracing
class ControlFlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.relu = nn.ReLU()
        self.gate = Gate()

    def forward(self, x: torch.Tensor, double: bool = False) -> torch.Tensor:
        x = self.gate(self.relu(self.fc(x)))
        if double:
            x = x * 2
        return x


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: untraceable
            return x
        return -x


def test_trace_error_becomes_helpful_error() -> None:
    converter = Converter([torch.randn(4, 4)], progress=False)
    with pytest.raises(ModelTraceError, match=r"Could not trace ControlFlow.*concrete_args=.*leaf_modules="):
        converter.convert_to_spiking_neurons(ControlFlow().eval())
    with pytest.raises(fx.proxy.TraceError):
        converter.convert_to_spiking_neurons(ControlFlow().eval())


def test_leaf_modules_and_concrete_args() -> None:
    torch.manual_seed(0)
    ann = ControlFlow().eval()
    converter = Converter([torch.randn(8, 4)], progress=False)
    with pytest.raises(ModelTraceError, match="control flow"):
        converter.convert_to_spiking_neurons(
            ann, leaf_modules=[Gate]
        )  # `if double:` still needs concrete_args
    snn = converter.convert_to_spiking_neurons(ann, leaf_modules=[Gate], concrete_args={"double": False})
    assert _count(snn, IFNode) == 1
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(run_snn(snn, x, 512)[-1], ann(x), atol=0.05, rtol=0.05)
    by_name = converter.convert_to_spiking_neurons(
        ann, leaf_modules=["gate"], concrete_args={"double": False}
    )
    assert _count(by_name, IFNode) == 1


def test_custom_tracer_and_graphmodule_input() -> None:
    class GateTracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return isinstance(m, Gate) or super().is_leaf_module(m, name)

    torch.manual_seed(0)
    ann = ControlFlow().eval()
    converter = Converter([torch.randn(8, 4)], progress=False)
    fixed = {"double": False}
    assert (
        _count(converter.convert_to_spiking_neurons(ann, tracer=GateTracer, concrete_args=fixed), IFNode) == 1
    )
    assert (
        _count(converter.convert_to_spiking_neurons(ann, tracer=GateTracer(), concrete_args=fixed), IFNode)
        == 1
    )
    traced = fx.GraphModule(ann, GateTracer().trace(ann, concrete_args=fixed))
    snn = converter.convert_to_spiking_neurons(traced)
    assert _count(snn, IFNode) == 1
    assert _count(traced, IFNode) == 0  # the given GraphModule is untouched
    assert any(isinstance(m, nn.ReLU) for m in traced.modules())


def test_tracing_option_errors() -> None:
    with pytest.raises(TypeError, match="leaf_modules must hold"):
        trace_model(nn.ReLU(), leaf_modules=[3])
    with pytest.raises(TypeError, match="tracer must be a torch"):
        trace_model(nn.ReLU(), tracer="fx")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="only applies to the default tracer"):
        trace_model(nn.ReLU(), tracer=fx.Tracer(), leaf_modules=[nn.ReLU])
    with pytest.raises(TypeError, match="expected an nn"):
        trace_model("model")  # type: ignore[arg-type]


def test_converted_snn_traces_again_with_neurons_as_leaves() -> None:
    snn = Converter(_loader(), progress=False).convert_to_spiking_neurons(_init(TinyVGG()))
    again = trace_model(snn, leaf_modules=[])
    assert _count(again, IFNode) == 5
    assert sum(n.op == "call_module" and "if_node" in str(n.target) for n in again.graph.nodes) == 5


# ---------------------------------------------------------------- persistence
def _snn_outputs(snn: nn.Module) -> torch.Tensor:
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    return run_snn(snn, x, 16)


@pytest.mark.parametrize("v_init", [None, 0.5])
def test_state_dict_round_trip_into_skeleton(v_init: float | None) -> None:
    ann = _init(TinyResNet())
    neurons = NeuronFactory(v_init=v_init)
    snn = Converter(_loader(), progress=False, neuron_factory=neurons).convert_to_spiking_neurons(ann)
    skeleton = Converter([], progress=False, neuron_factory=neurons).convert_to_spiking_neurons(
        _init(TinyResNet(), seed=1), calibrate=False
    )
    assert skeleton.state_dict().keys() == snn.state_dict().keys()
    skeleton.load_state_dict(snn.state_dict())
    torch.testing.assert_close(_snn_outputs(skeleton), _snn_outputs(snn))


def test_per_channel_snn_round_trips_with_torch_save(tmp_path: Any) -> None:
    ann = _init(TinyVGG())
    snn = Converter(
        _loader(), progress=False, threshold_optimizer=ThresholdOptimizer("per_channel")
    ).convert_to_spiking_neurons(ann)
    assert any(isinstance(m, VoltageScaler) and m.scale.dim() == 1 for m in snn.modules())
    expected = _snn_outputs(snn)
    path = tmp_path / "snn.pt"
    torch.save(snn, path)
    loaded = torch.load(path, weights_only=False)
    torch.testing.assert_close(_snn_outputs(loaded), expected)
    assert str(loaded.conversion_report) == str(snn.conversion_report)
    buffer = io.BytesIO()
    torch.save(snn, buffer)
    buffer.seek(0)
    assert _count(torch.load(buffer, weights_only=False), IFNode) == 5


def test_deepcopy_of_snn_runs_independently() -> None:
    snn = Converter(_loader(), progress=False).convert_to_spiking_neurons(_init(TinyVGG()))
    clone = copy.deepcopy(snn)
    torch.testing.assert_close(_snn_outputs(clone), _snn_outputs(snn))

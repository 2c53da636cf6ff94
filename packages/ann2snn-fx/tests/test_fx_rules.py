"""Activation rules (module, functional, clipped ReLUs), in-place semantics and the conversion report."""

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from ann2snn_calib import VoltageHook
from ann2snn_fx import (
    ClippedReLURule,
    ConversionReport,
    Converter,
    FunctionalReLURule,
    HookFactory,
    IFNode,
    ReLURule,
    all_rules,
    run_snn,
)


def _convert(ann: nn.Module, data: torch.Tensor, **kwargs: Any) -> fx.GraphModule:
    return Converter([data], progress=False, **kwargs).convert_to_spiking_neurons(ann)


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def _snn_error(snn: nn.Module, ann: nn.Module, x: torch.Tensor, steps: int = 256) -> float:
    with torch.no_grad():
        return (run_snn(snn, x, steps)[-1] - ann(x)).abs().max().item()


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x))


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 6)
        self.d = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        x = torch.relu(self.a(x))
        x = self.b(x).relu()
        y = self.c(x)
        y.relu_()  # in place: later reads of y see the activation
        return self.d(y)


def _data(seed: int = 0, n: int = 64, features: int = 6) -> torch.Tensor:
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed))


def test_functional_relus_convert_with_all_rules() -> None:
    torch.manual_seed(0)
    ann = Functional().eval()
    snn = _convert(ann, _data(), rules=all_rules())
    assert _count(snn, IFNode) == 4
    assert isinstance(snn.get_submodule("block.spiking_0.if_node"), IFNode)
    ops = {n.target for n in snn.graph.nodes if n.op in ("call_function", "call_method")}
    assert not ops & {F.relu, torch.relu, "relu", "relu_", torch.relu_}
    assert _snn_error(snn, ann, _data(1, 8)) < 0.05
    assert [c.rule for c in snn.conversion_report.converted] == ["FunctionalReLURule"] * 4


def test_functional_relus_left_by_default_rules_warn_with_advice() -> None:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"No activation was converted.*all_rules\(\)"):
        snn = _convert(Functional().eval(), _data())
    report = snn.conversion_report
    assert report.converted == []
    assert len(report.left) == 4
    assert all("add FunctionalReLURule()" in item.reason for item in report.left)
    assert {item.kind for item in report.left} == {"F.relu", "torch.relu", "Tensor.relu", "Tensor.relu_"}


def test_positional_inplace_flags() -> None:
    class Positional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.fc2 = nn.Linear(6, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            F.relu(y, True)  # in place, result unused: y is the activation from here on
            z = self.fc2(y)
            F.hardtanh(z, 0.0, 2.0, True)
            return self.out(z)

    torch.manual_seed(0)
    ann = Positional().eval()
    snn = _convert(ann, _data(), rules=all_rules())
    assert _count(snn, IFNode) == 2
    assert _snn_error(snn, ann, _data(1, 8)) < 0.05


def test_inplace_module_relu_rewires_later_readers() -> None:
    class InplaceReader(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.act = nn.ReLU(inplace=True)
            self.out = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            self.act(y)
            return self.out(y)

    torch.manual_seed(0)
    ann = InplaceReader().eval()
    snn = _convert(ann, _data())
    assert _count(snn, IFNode) == 1
    assert _snn_error(snn, ann, _data(1, 8)) < 0.05


@pytest.mark.parametrize(
    ("activation", "clip"),
    [
        (lambda m, x: m.act6(x), 6.0),
        (lambda m, x: m.tanh02(x), 2.0),
        (lambda m, x: F.relu6(x), 6.0),
        (lambda m, x: F.hardtanh(x, 0.0, 1.5), 1.5),
        (lambda m, x: torch.clamp(x, 0, 1.0), 1.0),
        (lambda m, x: torch.clip(x, min=0.0, max=0.5), 0.5),
        (lambda m, x: x.clamp(0, 3.0), 3.0),
        (lambda m, x: x.clamp(min=0), None),
        (lambda m, x: x.clamp_min(0), None),
    ],
)
def test_clipped_relus_are_converted_with_threshold_at_most_the_clip(
    activation: Any, clip: float | None
) -> None:
    class Clipped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.act6 = nn.ReLU6()
            self.tanh02 = nn.Hardtanh(0.0, 2.0)
            self.out = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(activation(self, self.fc(x)))

    torch.manual_seed(0)
    ann = Clipped().eval()
    with torch.no_grad():
        ann.fc.weight.mul_(8.0)  # activations well above the small clips
    data = _data()
    snn = _convert(ann, data, rules=all_rules())
    assert _count(snn, IFNode) == 1
    (entry,) = snn.conversion_report.converted
    assert entry.rule == "ClippedReLURule"
    peak = ann.fc(data).max().item()
    expected = min(peak, clip) if clip is not None else peak
    assert entry.threshold == pytest.approx(expected, rel=1e-5)
    assert _snn_error(snn, ann, _data(1, 8)) < 0.1 * max(1.0, expected)


@pytest.mark.parametrize(
    ("activation", "reason"),
    [
        (lambda m, x: torch.clamp(x, -1.0, 1.0), "lower bound is -1.0, not 0"),
        (lambda m, x: torch.clamp(x, x.min(), 1.0), "is not a literal number"),
        (lambda m, x: F.hardtanh(x), "lower bound is -1.0"),
        (lambda m, x: torch.clamp(x, 0.0, -1.0), "not a finite positive number"),
        (lambda m, x: F.leaky_relu(x), "not a ReLU-type activation"),
        (lambda m, x: F.gelu(x), "not a ReLU-type activation"),
    ],
)
def test_unconvertible_activations_are_reported(activation: Any, reason: str) -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return activation(self, self.relu(self.fc(x)))

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="stayed ANN operations"):
        snn = _convert(Odd().eval(), _data(), rules=all_rules())
    report = snn.conversion_report
    assert len(report.converted) == 1
    # x.min() of a spike train is reported too (it is not the min of the rates)
    left = [item for item in report.left if "of a spike train" not in item.reason]
    assert len(left) == 1
    assert reason in left[0].reason


def test_user_relu_subclass_is_traced_through_to_a_functional_relu() -> None:
    class MyReLU(nn.ReLU):
        pass

    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(6, 6), MyReLU()).eval()
    snn = _convert(ann, _data(), rules=all_rules())
    assert snn.conversion_report.converted[0].kind == "F.relu"
    assert _count(snn, IFNode) == 1


def test_report_lists_blocks_thresholds_and_prints() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU()).eval()
    data = _data()
    converter = Converter([data], progress=False)
    snn = converter.convert_to_spiking_neurons(ann)
    report = snn.conversion_report
    assert isinstance(report, ConversionReport)
    assert converter.last_report is report
    assert [c.block for c in report.converted] == ["spiking_0", "spiking_1"]
    assert report.converted[0].threshold == pytest.approx(snn.spiking_0.scaler1.scale.item())
    assert report.converted[0].kind == "nn.ReLU '1'"
    text = str(report)
    assert text.startswith("converted 2 activation(s), left 0")
    assert "-> spiking_1" in text


def test_relu_inside_leaf_module_is_reported() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 6), nn.ReLU()), nn.ReLU()).eval()
    converter = Converter([_data()], progress=False)
    with pytest.warns(UserWarning, match="stayed ANN operations"):
        snn = converter.convert_to_spiking_neurons(ann, leaf_modules=["1"])
    (left,) = snn.conversion_report.left
    assert left.node == "1"
    assert "1.1" in left.reason


def test_match_works_with_duck_typed_nodes() -> None:
    modules = {"a": nn.ReLU(), "b": nn.ReLU6(), "c": nn.LeakyReLU()}
    relu = ReLURule()
    assert relu.match(SimpleNamespace(op="call_module", target="a"), modules)  # type: ignore[arg-type]
    assert not relu.match(SimpleNamespace(op="call_module", target="b"), modules)  # type: ignore[arg-type]
    assert not relu.match(SimpleNamespace(op="call_function", target=F.relu), modules)  # type: ignore[arg-type]
    clipped = ClippedReLURule()
    assert clipped.match(SimpleNamespace(op="call_module", target="b"), modules)  # type: ignore[arg-type]
    assert not clipped.match(SimpleNamespace(op="call_module", target="c"), modules)  # type: ignore[arg-type]
    functional = FunctionalReLURule()
    assert functional.match(SimpleNamespace(op="call_method", target="relu_"), modules)  # type: ignore[arg-type]


def test_rule_error_messages() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    bad = SimpleNamespace(op="call_module", target=nn.ReLU())
    with pytest.raises(TypeError, match=r"node\.target must be a module path string"):
        ReLURule().insert_hooks(gm, bad, HookFactory(), {})  # type: ignore[arg-type]

    Converter.set_voltagehook(gm)
    gm(torch.ones(2, 2))
    relu_node = next(n for n in gm.graph.nodes if n.target == "1")
    hook_node = next(n for n in gm.graph.nodes if n.target == "voltage_hook_0")
    two_args = SimpleNamespace(op="call_module", target="1", args=(relu_node, relu_node))
    with pytest.raises(
        ValueError, match=r"The activation node '1' must have exactly 1 argument, but got 2\."
    ):
        ReLURule().replace_with_neurons(gm, two_args, hook_node, None, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"hook_node\.target must be a module path string"):
        ReLURule().replace_with_neurons(gm, relu_node, SimpleNamespace(target=None), None, None)  # type: ignore[arg-type]
    not_hook = next(n for n in gm.graph.nodes if n.target == "0")
    with pytest.raises(TypeError, match="hook_node must target a VoltageHook module"):
        ReLURule().replace_with_neurons(gm, relu_node, not_hook, None, None)


def test_functional_hooks_named_after_calling_module() -> None:
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Functional())
    Converter.set_voltagehook(gm, rules=all_rules())
    hooks = sorted(name for name, m in gm.named_modules() if isinstance(m, VoltageHook))
    assert hooks == ["block.voltage_hook_0", "voltage_hook_0", "voltage_hook_1", "voltage_hook_2"]


def test_all_rules_returns_fresh_instances() -> None:
    first, second = all_rules(), all_rules()
    assert [type(r) for r in first] == [ReLURule, FunctionalReLURule, ClippedReLURule]
    assert all(a is not b for a, b in zip(first, second))

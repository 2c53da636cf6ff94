"""Converter: the reference's names, protocol and messages, and the fixes of SPEC section 9."""

import copy
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import fx, nn

from ann2snn_calib import VoltageHook, VoltageScaler
from ann2snn_fx import (
    Converter,
    HookFactory,
    IFNode,
    NeuronFactory,
    ReLURule,
    ThresholdOptimizer,
)

MODE_MSG = "You have used a non-defined VoltageScale Method."


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 8)
        self.relu = nn.ReLU()
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv_block(x)).flatten(1)
        return self.out(self.relu(self.fc(x)))


def _net(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    net = ConvNet()
    with torch.no_grad():
        bn = net.conv_block[1]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _loader(n: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.zeros(8)) for _ in range(n)]


def _convert(ann: nn.Module, loader: Any = None, **kwargs: Any) -> fx.GraphModule:
    return Converter(
        _loader() if loader is None else loader, progress=False, **kwargs
    ).convert_to_spiking_neurons(ann)


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


# ---------------------------------------------------------------- reference behaviour
def test_module_names_and_structure() -> None:
    snn = _convert(_net())
    names = {name for name, _ in snn.named_modules()}
    for prefix in ("conv_block.spiking_0", "spiking_0"):
        assert {f"{prefix}.scaler0", f"{prefix}.if_node", f"{prefix}.scaler1"} <= names
    assert _count(snn, nn.ReLU) == 0
    assert _count(snn, VoltageHook) == 0
    assert _count(snn, nn.BatchNorm2d) == 0
    assert _count(snn, IFNode) == 2
    node = snn.get_submodule("conv_block.spiking_0.if_node")
    assert node.v_threshold == 1.0
    assert node.v_reset is None


def test_scales_are_ema_of_batch_maxima() -> None:
    ann = _net()
    loader = _loader()
    captured: list[torch.Tensor] = []
    handle = ann.relu.register_forward_hook(lambda m, i, o: captured.append(o.max()))
    with torch.no_grad():
        for x, _ in loader:
            ann(x)
    handle.remove()
    expected = captured[0]
    for s in captured[1:]:
        expected = 0.9 * expected + 0.1 * s
    snn = _convert(ann, loader)
    s1 = snn.get_submodule("spiking_0.scaler1").scale
    s0 = snn.get_submodule("spiking_0.scaler0").scale
    torch.testing.assert_close(s1, expected)
    torch.testing.assert_close(s0, 1.0 / expected)


def test_graph_order_scaler0_neuron_scaler1() -> None:
    snn = _convert(_net())
    targets = [n.target for n in snn.graph.nodes if n.op == "call_module"]
    i = targets.index("spiking_0.scaler0")
    assert targets[i : i + 3] == ["spiking_0.scaler0", "spiking_0.if_node", "spiking_0.scaler1"]


def test_shared_relu_module_gets_one_block_per_call_site() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.act(self.a(self.act(x))))

    torch.manual_seed(0)
    snn = _convert(Shared().eval(), [torch.randn(16, 4) for _ in range(2)])
    assert snn.get_submodule("spiking_0.if_node") is not snn.get_submodule("spiking_1.if_node")
    assert _count(snn, IFNode) == 2


def test_neuron_factory_threshold_sets_scaler_ratio() -> None:
    snn = _convert(_net(), neuron_factory=NeuronFactory(v_threshold=2.0))
    s0 = snn.get_submodule("spiking_0.scaler0").scale
    s1 = snn.get_submodule("spiking_0.scaler1").scale
    torch.testing.assert_close(s0, 2.0 / s1)
    assert snn.get_submodule("spiking_0.if_node").v_threshold == 2.0


def test_duck_typed_threshold_optimizer() -> None:
    class Two:
        def compute_threshold(self, hook: Any) -> float:
            return 2.0

    snn = _convert(_net(), threshold_optimizer=Two())
    assert snn.get_submodule("spiking_0.scaler0").scale.item() == 0.5
    assert snn.get_submodule("spiking_0.scaler1").scale.item() == 2.0


def test_custom_neuron_type_with_extra_kwargs() -> None:
    class LIFStandIn(nn.Module):
        def __init__(self, v_threshold: float, v_reset: float | None, tau: float) -> None:
            super().__init__()
            self.v_threshold, self.v_reset, self.tau = v_threshold, v_reset, tau

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x >= self.v_threshold).to(x.dtype)

    snn = _convert(_net(), neuron_factory=NeuronFactory(neuron_type=LIFStandIn, tau=2.0))
    neuron = snn.get_submodule("spiking_0.if_node")
    assert isinstance(neuron, LIFStandIn)
    assert neuron.tau == 2.0


def test_empty_rules_convert_nothing_and_warn() -> None:
    with pytest.warns(UserWarning, match="No activation was converted"):
        snn = _convert(_net(), rules=[])
    assert _count(snn, nn.ReLU) == 2
    assert _count(snn, IFNode) == 0
    assert _count(snn, VoltageHook) == 0


def test_rule_call_counts() -> None:
    calls = {"match": 0, "insert_hooks": 0, "find_replacements": 0, "replace_with_neurons": 0}

    class Counting(ReLURule):
        def match(self, node: Any, modules: Any) -> bool:
            calls["match"] += 1
            return super().match(node, modules)

        def insert_hooks(self, *args: Any) -> Any:
            calls["insert_hooks"] += 1
            return super().insert_hooks(*args)

        def find_replacements(self, *args: Any) -> Iterator[Any]:
            calls["find_replacements"] += 1
            return super().find_replacements(*args)

        def replace_with_neurons(self, *args: Any) -> None:
            calls["replace_with_neurons"] += 1
            super().replace_with_neurons(*args)

    torch.manual_seed(0)
    _convert(nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval(), [torch.randn(4, 3)], rules=[Counting()])
    assert calls["insert_hooks"] == 1
    assert calls["find_replacements"] == 1
    assert calls["replace_with_neurons"] == 1
    assert calls["match"] >= 2


def test_duplicate_pairs_are_replaced_once() -> None:
    class Duplicating(ReLURule):
        def find_replacements(self, fx_model: Any, modules: Any) -> Iterator[Any]:
            pairs = list(super().find_replacements(fx_model, modules))
            yield from pairs
            yield from pairs
            yield pairs[0][0], object()

    torch.manual_seed(0)
    snn = _convert(
        nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval(), [torch.randn(4, 3)], rules=[Duplicating()]
    )
    assert _count(snn, IFNode) == 1


def test_plain_class_rule_is_accepted_and_incomplete_rule_rejected() -> None:
    class Plain:
        def __init__(self) -> None:
            self.inner = ReLURule()

        def match(self, node: Any, modules: Any) -> bool:
            return self.inner.match(node, modules)

        def insert_hooks(self, *args: Any) -> Any:
            return self.inner.insert_hooks(*args)

        def find_replacements(self, fx_model: Any, modules: Any) -> Iterator[Any]:
            yield from self.inner.find_replacements(fx_model, modules)

        def replace_with_neurons(self, *args: Any) -> None:
            self.inner.replace_with_neurons(*args)

    assert _count(_convert(_net(), rules=[Plain()]), IFNode) == 2

    class Incomplete:
        def match(self, node: Any, modules: Any) -> bool:
            return False

    with pytest.raises(TypeError, match="missing insert_hooks, find_replacements, replace_with_neurons"):
        Converter([], rules=[Incomplete()])


def test_set_voltagehook_static_legacy_use() -> None:
    traced = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    Converter.set_voltagehook(traced, mode="99.9%", momentum=0.2)
    hooks = [m for m in traced.modules() if isinstance(m, VoltageHook)]
    assert len(hooks) == 1
    assert hooks[0].mode == "99.9%"
    assert hooks[0].momentum == 0.2
    assert hasattr(traced, "voltage_hook_0")


def test_hooks_are_not_dead_ends() -> None:
    traced = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))
    Converter.set_voltagehook(traced)
    traced.graph.eliminate_dead_code()
    hook_nodes = [n for n in traced.graph.nodes if n.target == "voltage_hook_0"]
    assert len(hook_nodes) == 1
    assert [u.target for u in hook_nodes[0].users] == ["2"]
    traced.recompile()
    traced(torch.ones(1, 2) * 3)
    assert traced.voltage_hook_0.num_batches_tracked.item() == 1


def test_replace_by_ifnode_is_deprecated() -> None:
    traced = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    Converter.set_voltagehook(traced)
    traced(torch.ones(3, 2))
    with pytest.warns(
        DeprecationWarning, match="replace_by_ifnode is deprecated, use replace_by_neurons instead."
    ):
        Converter.replace_by_ifnode(traced)
    assert _count(traced, IFNode) == 1


def test_replace_by_neurons_uses_instance_configuration() -> None:
    traced = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    Converter.set_voltagehook(traced)
    traced(torch.ones(3, 2))
    converter = Converter([], neuron_factory=NeuronFactory(v_threshold=3.0))
    assert converter.replace_by_neurons(traced) is traced
    assert traced.get_submodule("spiking_0.if_node").v_threshold == 3.0


# ---------------------------------------------------------------- fuse
def test_fuse_matches_unfused_output() -> None:
    ann = _net()
    traced = fx.symbolic_trace(copy.deepcopy(ann)).eval()
    x = torch.randn(4, 1, 8, 8)
    fused = Converter.fuse(traced)
    assert _count(fused, nn.BatchNorm2d) == 0
    torch.testing.assert_close(fused(x), ann(x), atol=1e-5, rtol=1e-5)
    assert ann.conv_block[1].running_mean.abs().sum() > 0  # originals untouched


def test_fuse_flag_false_returns_same_object() -> None:
    traced = fx.symbolic_trace(_net())
    assert Converter.fuse(traced, fuse_flag=False) is traced
    assert _count(traced, nn.BatchNorm2d) == 1


def test_fuse_rejects_training_mode_and_missing_stats() -> None:
    traced = fx.symbolic_trace(_net().train())
    with pytest.raises(ValueError, match="valid in eval mode only"):
        Converter.fuse(traced)
    net = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="no running statistics"):
        Converter.fuse(fx.symbolic_trace(net))


def test_fuse_skips_conv_with_several_users() -> None:
    class TwoUsers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)
            self.bn = nn.BatchNorm2d(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    fused = Converter.fuse(fx.symbolic_trace(TwoUsers().eval()))
    assert _count(fused, nn.BatchNorm2d) == 1


# ---------------------------------------------------------------- options
@pytest.mark.parametrize(
    "mode", ["", "150%", "-1%", "nan%", "abc%", "%", "avg", 0.0, 1.5, True, None, float("nan"), -0.5]
)
def test_invalid_modes_rejected_at_construction(mode: Any) -> None:
    with pytest.raises(NotImplementedError, match=MODE_MSG):
        Converter([], mode=mode)


@pytest.mark.parametrize("mode", ["max", "MAX", "Max", "99.9%", "0%", "100%", 0.5, 1, 1.0])
def test_valid_modes_accepted(mode: Any) -> None:
    assert Converter([], mode=mode).mode == mode


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"momentum": 1.5}, ValueError, "momentum must be a number in"),
        ({"momentum": True}, ValueError, "momentum must be a number in"),
        ({"num_batches": 0}, ValueError, "num_batches must be a positive int"),
        ({"num_batches": 2.0}, ValueError, "num_batches must be a positive int"),
        ({"progress": 1}, TypeError, "progress must be a bool"),
        ({"neuron_factory": object()}, TypeError, "neuron_factory must have a create"),
        ({"threshold_optimizer": object()}, TypeError, "threshold_optimizer must have a compute_threshold"),
        ({"hook_factory": object()}, TypeError, "hook_factory must have a create"),
    ],
)
def test_option_validation(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Converter([], **kwargs)


def test_converter_is_not_a_module() -> None:
    converter = Converter([])
    assert not isinstance(converter, nn.Module)
    with pytest.raises(TypeError):
        converter(nn.ReLU())  # type: ignore[operator]
    with pytest.raises(TypeError, match=r"ann must be an nn\.Module"):
        converter.convert_to_spiking_neurons("model")  # type: ignore[arg-type]


# ---------------------------------------------------------------- batches
def test_extract_batch_input_variants() -> None:
    x = torch.ones(2)
    extract = Converter._extract_batch_input
    assert extract(x) is x
    assert extract((x, 1)) is x
    assert extract([x]) is x
    assert extract(((x, 2), 1)) is x
    assert extract({"label": 1, "image": x}) is x
    assert extract({"pixel_values": x, "labels": 0}) is x
    assert extract({"only": x}) is x
    array = np.ones((3, 2))
    assert extract(array) is array
    with pytest.raises(ValueError, match=r"Batch data is an empty list or tuple\."):
        extract(())
    with pytest.raises(ValueError, match=r"Batch data is an empty dictionary\."):
        extract({})
    with pytest.raises(ValueError, match="cannot tell which entry is the model input"):
        extract({"a": x, "b": x})


def test_dict_and_numpy_batches_calibrate() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval()
    data = torch.randn(4, 3)
    a = _convert(ann, [{"input": data, "label": torch.zeros(4)}])
    b = _convert(ann, [data.numpy()])
    torch.testing.assert_close(a.spiking_0.scaler1.scale, b.spiking_0.scaler1.scale)
    torch.testing.assert_close(a.spiking_0.scaler1.scale, ann(data).max())


def test_num_batches_stops_early() -> None:
    pulled = []

    def gen() -> Iterator[torch.Tensor]:
        for i in range(10):
            pulled.append(i)
            yield torch.randn(4, 3)

    torch.manual_seed(0)
    traced_hooks: list[VoltageHook] = []

    class Spy(HookFactory):
        def create(self) -> VoltageHook:
            hook = super().create()
            traced_hooks.append(hook)
            return hook

    ann = nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval()
    Converter(gen(), progress=False, num_batches=3, hook_factory=Spy()).convert_to_spiking_neurons(ann)
    assert pulled == [0, 1, 2]
    assert traced_hooks[0].num_batches_tracked.item() == 3


def test_progress_bar_switch(capsys: pytest.CaptureFixture[str]) -> None:
    ann = nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval()
    Converter([torch.randn(4, 3)], progress=False).convert_to_spiking_neurons(ann)
    assert "calibrating" not in capsys.readouterr().err
    Converter([torch.randn(4, 3)], progress=True).convert_to_spiking_neurons(ann)
    assert "calibrating" in capsys.readouterr().err


def test_empty_dataloader_is_an_error_but_skeleton_needs_none() -> None:
    with pytest.raises(ValueError, match="yielded no batch"):
        _convert(_net(), [])
    snn = Converter([], progress=False).convert_to_spiking_neurons(_net(), calibrate=False)
    assert snn.get_submodule("spiking_0.scaler1").scale.item() == 1.0
    with pytest.raises(TypeError, match="calibrate must be a bool"):
        Converter([]).convert_to_spiking_neurons(_net(), calibrate=1)  # type: ignore[arg-type]


def test_zero_scale_names_the_layer() -> None:
    dead = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with torch.no_grad():
        dead[0].weight.zero_()
        dead[0].bias.fill_(-1.0)
    with pytest.raises(ValueError, match=r"finite positive.*voltage_hook_0.*activation '_1'.*dead layer"):
        _convert(dead.eval(), [torch.randn(4, 3)])
    snn = _convert(
        dead.eval(), [torch.randn(4, 3)], threshold_optimizer=ThresholdOptimizer(min_threshold=1e-3)
    )
    assert snn.spiking_0.scaler1.scale.item() == pytest.approx(1e-3)


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf"), -1.0])
def test_optimizer_returning_invalid_threshold(bad: float) -> None:
    class Bad:
        def compute_threshold(self, hook: Any) -> float:
            return bad

    with pytest.raises(ValueError, match="finite positive"):
        _convert(_net(), threshold_optimizer=Bad())


# ---------------------------------------------------------------- no mutation, device, dtype, modes
def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "params": {k: (v.detach().clone(), v.device, v.requires_grad) for k, v in model.named_parameters()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "training": {k: m.training for k, m in model.named_modules()},
    }


def _assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["training"] == after["training"]
    assert before["params"].keys() == after["params"].keys()
    for key, (value, device, grad) in before["params"].items():
        new_value, new_device, new_grad = after["params"][key]
        assert torch.equal(value, new_value)
        assert (device, grad) == (new_device, new_grad)
    for key, value in before["buffers"].items():
        assert torch.equal(value, after["buffers"][key])


def test_input_model_is_not_mutated() -> None:
    ann = _net().train()
    ann.conv_block[0].weight.requires_grad_(False)
    before = _snapshot(ann)
    snn = _convert(ann)
    _assert_same(before, _snapshot(ann))
    assert all(not m.training for m in snn.modules())
    # The ANN in train mode still updates its own BN statistics; the SNN does not share them.
    assert snn.get_submodule("conv_block.0") is not ann.conv_block[0]


def test_device_change_does_not_move_input_and_is_not_remembered() -> None:
    ann = _net()
    before = _snapshot(ann)
    converter = Converter([], device="meta", progress=False)
    snn = converter.convert_to_spiking_neurons(ann, calibrate=False)
    assert next(snn.parameters()).device.type == "meta"
    _assert_same(before, _snapshot(ann))
    assert converter.device == "meta"
    auto = Converter(_loader(), progress=False)
    auto.convert_to_spiking_neurons(_net())
    assert auto.device is None


def test_parameterless_model_converts() -> None:
    snn = _convert(nn.Sequential(nn.ReLU()), [torch.randn(4, 3)])
    assert _count(snn, IFNode) == 1
    assert next(snn.buffers()).device.type == "cpu"


def test_float64_model_keeps_dtype() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double().eval()
    snn = _convert(ann, [torch.randn(8, 3)])  # float32 batches are cast to the model's dtype
    out = snn(torch.randn(2, 3, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_integer_inputs_are_left_alone() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Embedding(10, 4), nn.ReLU()).eval()
    snn = _convert(ann, [torch.randint(0, 10, (4, 5))])
    assert _count(snn, IFNode) == 1


def test_no_attribute_is_overwritten() -> None:
    class Crowded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.relu = nn.ReLU()
            self.spiking_0 = nn.Identity()
            self.voltage_hook_0 = 42

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.spiking_0(self.relu(self.fc(x)))

    torch.manual_seed(0)
    snn = _convert(Crowded().eval(), [torch.randn(4, 3)])
    assert isinstance(snn.spiking_0, nn.Identity)
    assert isinstance(snn.get_submodule("spiking_1.if_node"), IFNode)
    x = torch.randn(2, 3)
    snn(x)  # runs


def test_calibrates_under_no_grad_in_eval() -> None:
    seen: list[tuple[bool, bool]] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((torch.is_grad_enabled(), self.training))
            return x

    class WithProbe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.probe = Probe()
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.probe(self.fc(x)))

    converter = Converter([torch.randn(4, 3), torch.randn(4, 3)], progress=False)
    converter.convert_to_spiking_neurons(WithProbe().train(), leaf_modules=[Probe])
    assert seen == [(False, False), (False, False)]


def test_scaler_modules_come_from_calib() -> None:
    snn = _convert(_net())
    assert isinstance(snn.get_submodule("spiking_0.scaler0"), VoltageScaler)


def test_no_warning_when_everything_converted() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _convert(_net())


def test_momentum_none_gives_dataset_maximum() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval()
    batches = [torch.randn(4, 3) * scale for scale in (1.0, 5.0, 2.0)]
    snn = _convert(ann, batches, momentum=None)
    with torch.no_grad():
        expected = max(ann(b).max() for b in batches)
    torch.testing.assert_close(snn.spiking_0.scaler1.scale, expected)

"""Issue 18: Hugging Face CNNs, structured outputs and models of several inputs through ReLU -> IF.

``ResNetForImageClassification`` and ``MobileNetV2ForImageClassification`` (small random configs) did not
trace (a shape check on the input, ``int()`` of a traced size in TF-style padding); ``run_snn`` refused their
``ModelOutput``; a model of two inputs or a dict batch failed calibration. They convert with
``tracer=ExampleInputTracer(example)`` and run with ``run_snn(..., output_key="logits")`` / ``input_fn=``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ann2snn_fx import Converter, ModelTraceError, all_rules, run_snn, trace_model
from ann2snn_fx.tracing_example import ExampleInputTracer

transformers = pytest.importorskip("transformers")

T = 192

_CURRENT: dict[str, pytest.Item] = {}


@pytest.fixture(autouse=True)
def _current_test(request: pytest.FixtureRequest) -> None:
    """The running test, so that the checks can record what they measured (docs/models.md)."""
    _CURRENT["item"] = request.node


def _lively(model: nn.Module) -> nn.Module:
    """Random weights of a trained network's scale (HF's init of std 0.02 makes every output ~1e-27)."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.0)
                module.bias.uniform_(-0.1, 0.2)
    return model.eval()


def _centred_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    out, expected = out - out.mean(0), expected - expected.mean(0)
    return float((out - expected).norm() / expected.norm())


def _relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out - expected).norm() / expected.norm())


def _resnet() -> nn.Module:
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5
    )
    return _lively(transformers.ResNetForImageClassification(config))


def _mobilenet() -> nn.Module:
    config = transformers.MobileNetV2Config(depth_multiplier=0.35, image_size=32, num_labels=5)
    return _lively(transformers.MobileNetV2ForImageClassification(config))


@pytest.mark.parametrize("build", [_resnet, _mobilenet], ids=["ResNetForImageClassification", "MobileNetV2"])
def test_hugging_face_cnn_converts_and_agrees_at_large_t(build) -> None:
    ann = build()
    torch.manual_seed(1)
    x = torch.randn(16, 3, 32, 32)
    with pytest.raises(ModelTraceError):  # plain fx cannot trace them (before: a raw TypeError for MobileNet)
        trace_model(ann)
    loader = [x[:8], x[8:]]
    snn = Converter(loader, mode="99.9%", progress=False, rules=all_rules()).convert_to_spiking_neurons(
        ann, tracer=ExampleInputTracer(x[:2])
    )
    report = snn.conversion_report
    assert report.converted
    assert not report.left, str(report)
    with torch.no_grad():
        expected = ann(x).logits
        out = run_snn(snn, x, T, output_key="logits")
        by_callable = run_snn(snn, x, 4, output_key=lambda y: y["logits"])
    torch.testing.assert_close(by_callable, out[:4])
    # MobileNetV2 is 17 blocks deep: at T=192 its outputs agree, the small differences between inputs not yet
    error = _centred_error if build is _resnet else _relative_error
    name = "centred_error_T192" if build is _resnet else "relative_error_T192"
    _CURRENT["item"].user_properties.append((name, f"{error(out[-1], expected):.3f}"))
    assert error(out[-1], expected) < 0.15
    assert error(out[-1], expected) < 0.5 * error(out[7], expected)  # converges in T


def test_run_snn_names_the_fields_of_a_structured_output() -> None:
    snn = trace_model(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="output_key="):
        run_snn(lambda_module(lambda x: {"logits": x}), torch.ones(1, 2), 2)
    with pytest.raises(KeyError, match=r"keys are \['logits'\]"):
        run_snn(lambda_module(lambda x: {"logits": x}), torch.ones(1, 2), 2, output_key="scores")
    assert run_snn(snn, torch.ones(1, 2), 2, output_key=None).shape == (2, 1, 2)


class lambda_module(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor):
        return self.fn(x)


class TwoInputs(nn.Module):
    """Image and metadata branches, the metadata also given by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.tabular = nn.Sequential(nn.Linear(3, 8), nn.ReLU())
        self.head = nn.Linear(24, 4)

    def forward(self, image: torch.Tensor, meta: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.head(torch.cat([self.image(image), self.tabular(meta)], 1)) * scale


def _multi_input_data() -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(2)
    return [
        {"image": torch.randn(32, 6), "meta": torch.randn(32, 3), "label": torch.zeros(32)} for _ in range(2)
    ]


@pytest.mark.parametrize(
    "input_fn",
    [
        lambda b: ((b["image"], b["meta"]), {}),  # two positional inputs
        lambda b: ((b["image"],), {"meta": b["meta"], "scale": 2.0}),  # keyword inputs from a dict batch
    ],
    ids=["positional", "keyword"],
)
def test_models_of_several_inputs_calibrate_and_run_from_dict_batches(input_fn) -> None:
    torch.manual_seed(3)
    ann = TwoInputs().eval()
    loader = _multi_input_data()
    snn = Converter(loader, progress=False, input_fn=input_fn).convert_to_spiking_neurons(ann)
    assert len(snn.conversion_report.converted) == 2
    batch = loader[0]
    args, kwargs = input_fn(batch)
    with torch.no_grad():
        expected = ann(*args, **kwargs)
    out = run_snn(snn, batch, 256, input_fn=input_fn)[-1]
    assert float((out - expected).norm() / expected.norm()) < 0.05


def test_tuple_batches_of_two_inputs() -> None:
    torch.manual_seed(4)
    ann = TwoInputs().eval()
    loader = [(d["image"], d["meta"], d["label"]) for d in _multi_input_data()]
    input_fn = lambda b: ((b[0], b[1]), {})  # noqa: E731
    snn = Converter(loader, progress=False, input_fn=input_fn).convert_to_spiking_neurons(ann)
    with torch.no_grad():
        expected = ann(loader[1][0], loader[1][1])
    out = run_snn(snn, loader[1], 256, input_fn=input_fn)[-1]
    assert float((out - expected).norm() / expected.norm()) < 0.05


class HiddenStates(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.relu, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, output_hidden_states: bool = True):
        hidden = self.relu(self.fc1(x))
        out = self.fc2(hidden)
        return (out, hidden) if output_hidden_states else out


def test_concrete_args_differing_from_the_defaults_calibrate() -> None:
    """Before: fx's specialisation assert (``output_hidden_states has been specialized ...``) in calibration."""
    torch.manual_seed(5)
    ann = HiddenStates().eval()
    loader = [torch.randn(16, 4) for _ in range(2)]
    snn = Converter(loader, progress=False).convert_to_spiking_neurons(
        ann, concrete_args={"output_hidden_states": False}
    )
    x = loader[0]
    with torch.no_grad():
        expected = ann(x, output_hidden_states=False)
    out = run_snn(snn, x, 256)[-1]
    assert float((out - expected).norm() / expected.norm()) < 0.05

"""Issue 18 on timm's own model code (random weights): ResNet-18 and VGG-11-BN through ReLU -> IF, ViT through
the TD paths.

timm imports torchvision, and PyPI's torchvision does not load beside torch 2.13.0's CPU wheel ("operator
torchvision::nms does not exist"), so the main test sessions skip this module; ``nox -s timm`` runs it in a venv
of its own with torch 2.14.1 and torchvision 0.29.1 (the pair that loads together here).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

try:
    import timm
except Exception as error:  # ImportError, or torchvision's RuntimeError beside a mismatched torch
    pytest.skip(
        f"timm does not import here ({type(error).__name__}: {str(error)[:120]}); nox -s timm runs these tests",
        allow_module_level=True,
    )

from ann2snn_fx import (
    Converter,
    ModelTraceError,
    TDEquivalenceError,
    TDTimeFolded,
    all_rules,
    replace_by_td_operators,
    run_snn,
)
from ann2snn_fx.snn.pooling import SpikingMaxPool
from ann2snn_fx.tracing_example import ExampleInputTracer

T = 256


def _convert(ann: torch.nn.Module, data: torch.Tensor, **kwargs: object) -> torch.nn.Module:
    loader = [data[i : i + 16] for i in range(0, len(data), 16)]
    converter = Converter(loader, mode="99.9%", progress=False, rules=all_rules())
    return converter.convert_to_spiking_neurons(ann, **kwargs)


def _relative_error(out: torch.Tensor, expected: torch.Tensor, centred: bool) -> float:
    """As in test_fx_real_cnns: centred over the batch where random weights give every input nearly the same
    output (what tells inputs apart is the deviation from the mean)."""
    if centred:
        out, expected = out - out.mean(0), expected - expected.mean(0)
    return float((out - expected).norm() / expected.norm())


def _assert_snn_agrees(
    snn: torch.nn.Module,
    ann: torch.nn.Module,
    x: torch.Tensor,
    tol: float,
    centred: bool,
    record_property: Callable[[str, object], None],
) -> None:
    """The SNN's mean output after T steps within ``tol`` of the ANN's, and 80% of the predictions equal; the
    error is recorded for docs/models.md (``nox -s models``)."""
    with torch.no_grad():
        expected = ann(x)
    out = run_snn(snn, x, T, multi_step=True)[-1]
    error = _relative_error(out, expected, centred)
    record_property(f"{'centred' if centred else 'relative'}_error_T{T}", f"{error:.3f}")
    assert error < tol
    assert (out.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8


def test_timm_resnet18_converts_and_its_snn_agrees_with_the_ann(
    record_property: Callable[[str, object], None],
) -> None:
    """Before issue 18: "0 left" in the report, then 0.55 relative error at T=256 (a max over spikes)."""
    torch.manual_seed(0)
    ann = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    data = torch.randn(48, 3, 32, 32)
    snn = _convert(ann, data)
    report = snn.conversion_report
    assert len(report.converted) == 17  # the stem's ReLU and two per basic block
    assert not report.left, str(report)
    # timm's stem is act1 -> maxpool: it became maxpool -> neuron (max commutes with the monotone ReLU).
    calls = [str(n.target) for n in snn.graph.nodes if n.op == "call_module"]
    assert calls.index("maxpool") < calls.index("spiking_0.if_node")
    _assert_snn_agrees(snn, ann, data[:16], 0.15, True, record_property)  # 0.065 measured


def test_timm_vgg11_bn_traces_with_example_inputs_and_agrees_with_the_ann(
    record_property: Callable[[str, object], None],
) -> None:
    """timm's VGG head checks the feature map's size in Python (``if x.shape[-2] < 7``): symbolic tracing
    refuses it with the documented advice, and the example-input tracer resolves it."""
    torch.manual_seed(1)
    # mlp_ratio: a 256-wide head instead of 4096 (its 7x7 conv on 512 channels dominated the run time)
    ann = timm.create_model("vgg11_bn", pretrained=False, num_classes=10, mlp_ratio=1 / 16).eval()
    data = torch.randn(32, 3, 32, 32)
    with pytest.raises(ModelTraceError, match="control flow"):
        _convert(ann, data)
    snn = _convert(ann, data, tracer=ExampleInputTracer(data[:2]))
    assert not snn.conversion_report.left, str(snn.conversion_report)
    assert any(isinstance(m, SpikingMaxPool) for m in snn.modules())  # pools on time-varying currents
    _assert_snn_agrees(snn, ann, data[:8], 0.15, False, record_property)  # 0.073 measured


def _vit() -> torch.nn.Module:
    torch.manual_seed(2)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10, depth=2
    ).eval()


def _per_step_reference(ann: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The TD target: the ANN on the cumulative input, differenced over time."""
    with torch.no_grad():
        cumulative = torch.stack([ann(x[: t + 1].sum(0)) for t in range(x.shape[0])])
    return torch.cat([cumulative[:1], cumulative[1:] - cumulative[:-1]])


def test_timm_vit_is_exact_through_the_folded_path(record_property: Callable[[str, object], None]) -> None:
    ann = _vit()
    x = torch.randn(4, 3, 3, 32, 32)
    folded = TDTimeFolded(ann, strict=True)
    with torch.no_grad():
        out = folded(x)
    expected = _per_step_reference(ann, x)
    error = float((out.cumsum(0) - expected.cumsum(0)).abs().max())
    record_property("max_abs_error", f"{error:.1e} (float32)")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_timm_vit_through_the_fx_path_is_refused_for_its_shape_ops_not_for_is_causal() -> None:
    """Before issue 18 the refusal was "literal bool is_causal" (a constant attribute). What is left is real:
    timm's attention unpacks ``B, N, C = x.shape``, which counts the time axis of a ``[T, ...]`` sequence; the
    error says so and points to the folded path."""
    with pytest.raises(TDEquivalenceError) as caught:
        replace_by_td_operators(_vit(), strict=True)
    message = str(caught.value)
    assert "is_causal" not in message
    assert "counts the time axis" in message
    assert "TDTimeFolded" in message

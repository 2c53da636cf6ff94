"""Issue 12 (SPEC 13): nothing silent in the ReLU -> IF path: NaN/inf data, unsupported batches and
``input_fn``, numpy/torch scalars as options, per-channel state_dicts, ``TQDM_DISABLE``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ann2snn_calib import NonFiniteError
from ann2snn_fx import Converter, ThresholdOptimizer, run_snn
from ann2snn_fx.snn.inputs import call_with_batch

STRATEGIES = {
    "fixed": {},
    "min_error": {"time_steps": 8},
    "per_channel": {"channel_dim": 1},
    "ltb": {"channel_dim": 1},
}
assert set(STRATEGIES) == set(ThresholdOptimizer.strategies), "a new strategy needs its NaN/inf case here"


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()


def _convert(ann: nn.Module, loader: Any, **options: Any) -> torch.fx.GraphModule:
    return Converter(loader, progress=False, **options).convert_to_spiking_neurons(ann)


# ---------------------------------------------------------------- 1. NaN / inf
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize(
    ("mode", "momentum"), [("Max", 0.1), ("Max", None), ("99%", 0.1), ("99%", None), (0.5, 0.1)]
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_data_raises_naming_the_layer(strategy: str, mode: Any, momentum: Any, bad: float) -> None:
    good = torch.rand(8, 3)
    poisoned = torch.rand(8, 3)
    poisoned[3, 1] = bad
    optimizer = ThresholdOptimizer(strategy, **STRATEGIES[strategy])
    converter = Converter(
        [good, poisoned], mode=mode, momentum=momentum, threshold_optimizer=optimizer, progress=False
    )
    with pytest.raises(
        NonFiniteError,
        match=r"Calibration batch 1, layer 'voltage_hook_0' \(after activation '_1'\).*NaN/inf",
    ):
        converter.convert_to_spiking_neurons(_mlp())


def test_nonfinite_error_is_a_value_error_with_counts() -> None:
    x = torch.rand(4, 3)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf activations: [1-4] NaN"):
        _convert(_mlp(), [x])


# ---------------------------------------------------------------- 2. batches and input_fn
@pytest.mark.parametrize("bad", [None, "text", object()])
def test_unsupported_batch_is_a_type_error_naming_index_and_type(bad: Any) -> None:
    loader = [torch.rand(4, 3), bad]
    with pytest.raises(TypeError, match=rf"Batch 1 is of type {type(bad).__name__}, .*tuple/list.*input_fn="):
        _convert(_mlp(), loader)
    with pytest.raises(TypeError, match=rf"Batch 0 is of type {type(bad).__name__}"):
        _convert(_mlp(), [(bad, 0)])


def test_dict_without_input_key_lists_the_keys() -> None:
    with pytest.raises(ValueError, match=r"Batch 0 is a dictionary with keys \['a', 'b'\].*input_fn="):
        _convert(_mlp(), [{"a": torch.rand(2, 3), "b": torch.rand(2, 3)}])


def test_input_fn_nested_dict_gives_the_scales_of_the_plain_tensors() -> None:
    data = [torch.rand(4, 3) for _ in range(3)]
    ann = _mlp()
    plain = _convert(ann, data, momentum=None)
    nested = [{"batch": {"images": x, "labels": torch.zeros(4)}, "meta": "m"} for x in data]
    got = _convert(ann, nested, momentum=None, input_fn=lambda b: b["batch"]["images"])
    want_scale = torch.stack([ann[1](ann[0](x)).max() for x in data]).max()
    assert torch.equal(got.spiking_0.scaler1.scale, want_scale)
    assert torch.equal(got.spiking_0.scaler1.scale, plain.spiking_0.scaler1.scale)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.relu = nn.Linear(3, 4), nn.Linear(2, 4), nn.ReLU()

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.relu(self.a(x) + self.b(y)) * scale


def test_input_fn_several_inputs_and_kwargs() -> None:
    torch.manual_seed(0)
    ann = _TwoInputs().eval()
    batches = [(torch.rand(5, 3), torch.rand(5, 2), torch.zeros(5)) for _ in range(2)]
    want = torch.stack([ann(x, y).max() for x, y, _ in batches]).max()
    by_args = _convert(ann, batches, momentum=None, input_fn=lambda b: ((b[0], b[1]), {}))
    by_kwargs = _convert(ann, batches, momentum=None, input_fn=lambda b: ((), {"x": b[0], "y": b[1]}))
    by_tuple = _convert(ann, batches, momentum=None, input_fn=lambda b: (b[0], b[1]))
    by_dict = _convert(ann, batches, momentum=None, input_fn=lambda b: {"x": b[0], "y": b[1]})
    for snn in (by_args, by_kwargs, by_tuple, by_dict):
        assert torch.equal(snn.spiking_0.scaler1.scale, want)
    # the same function feeds the SNN: call_with_batch is the one place that applies input_fn
    out = call_with_batch(by_args, batches[0], lambda b: ((b[0], b[1]), {}))
    assert out.shape == (5, 4)


def test_input_fn_bad_result_and_bad_type() -> None:
    with pytest.raises(TypeError, match=r"input_fn returned list for batch 0; it must return"):
        _convert(_mlp(), [torch.rand(2, 3)], input_fn=lambda b: [b])
    with pytest.raises(TypeError, match=r"input_fn must be None or a callable"):
        Converter([], input_fn="images")  # type: ignore[arg-type]


# ---------------------------------------------------------------- 3. numpy / torch scalars
def test_numpy_and_torch_scalars_are_accepted_like_python_numbers() -> None:
    data = [torch.rand(6, 3) for _ in range(3)]
    ann = _mlp()
    python = _convert(
        ann,
        data,
        mode=0.9,
        momentum=0.5,
        num_batches=2,
        threshold_optimizer=ThresholdOptimizer(
            "min_error", time_steps=8, v_init=0.5, histogram_bins=64, min_threshold=0.01
        ),
    )
    for number in (np, torch):
        real = np.float32 if number is np else (lambda v: torch.tensor(v))
        integral = np.int64 if number is np else (lambda v: torch.tensor(v))
        other = _convert(
            ann,
            data,
            mode=real(0.9),
            momentum=real(0.5),
            num_batches=integral(2),
            threshold_optimizer=ThresholdOptimizer(
                "min_error",
                time_steps=integral(8),
                v_init=real(0.5),
                histogram_bins=integral(64),
                min_threshold=real(0.01),
            ),
        )
        for key, value in python.state_dict().items():
            torch.testing.assert_close(
                other.state_dict()[key], value, rtol=1e-6, atol=0
            )  # float32(0.9) != 0.9
        x = torch.rand(2, 3)
        assert torch.equal(run_snn(other, x, integral(4)), run_snn(other, x, 4))
    per_channel = ThresholdOptimizer("per_channel", channel_dim=np.int64(1))
    assert per_channel.channel_dim == 1
    assert type(per_channel.channel_dim) is int


@pytest.mark.parametrize(
    "options",
    [{"momentum": True}, {"num_batches": True}, {"num_batches": 2.0}, {"momentum": torch.ones(2)}],
)
def test_bools_floats_for_ints_and_tensors_stay_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        Converter([], **options)


# ---------------------------------------------------------------- 5. per-channel state_dicts
class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # 4 channels on 4 x 4 images: a per-channel scale broadcast along the width has the right shape
        self.conv, self.relu, self.pool = nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.conv(x))).flatten(1)


def _calibrated(strategy: str) -> tuple[torch.fx.GraphModule, Converter]:
    torch.manual_seed(0)
    ann = _Conv().eval()
    data = [torch.rand(8, 2, 4, 4) * torch.tensor([1.0, 5.0]).view(1, 2, 1, 1) for _ in range(2)]
    converter = Converter(data, threshold_optimizer=ThresholdOptimizer(strategy), progress=False)
    return converter.convert_to_spiking_neurons(ann), converter


@pytest.mark.parametrize(
    ("saved", "skeleton"), [("per_channel", "per_channel"), ("fixed", "per_channel"), ("fixed", "fixed")]
)
def test_state_dict_into_skeleton_reproduces_the_saved_model(saved: str, skeleton: str) -> None:
    snn, _ = _calibrated(saved)
    _, conv = _calibrated(skeleton)
    fresh = conv.convert_to_spiking_neurons(_Conv().eval(), calibrate=False)
    fresh.load_state_dict(snn.state_dict())
    x = torch.rand(3, 2, 4, 4) * 3
    assert torch.equal(run_snn(fresh, x, 16), run_snn(snn, x, 16))


def test_per_channel_state_dict_into_per_tensor_skeleton_raises_naming_layer_and_shapes() -> None:
    snn, _ = _calibrated("per_channel")
    _, conv = _calibrated("fixed")
    fresh = conv.convert_to_spiking_neurons(_Conv().eval(), calibrate=False)
    with pytest.raises(
        RuntimeError,
        match=r"'spiking_0.scaler0': the saved scale has shape \(4,\) but this scaler has shape \(\)",
    ):
        fresh.load_state_dict(snn.state_dict())
    calibrated_fixed, _ = _calibrated("fixed")  # a calibrated per-tensor model refuses too
    with pytest.raises(RuntimeError, match=r"channel_dim=None"):
        calibrated_fixed.load_state_dict(snn.state_dict())


# ---------------------------------------------------------------- 6. TQDM_DISABLE
@pytest.mark.parametrize(
    ("env", "progress", "shown"),
    [("1", None, False), ("0", None, True), (None, None, True), ("1", True, True), (None, False, False)],
)
def test_tqdm_disable_is_honoured_and_progress_overrides(
    env: str | None,
    progress: bool | None,
    shown: bool,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    if env is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", env)
    options = {} if progress is None else {"progress": progress}
    Converter([torch.rand(2, 3)] * 3, **options).convert_to_spiking_neurons(_mlp())
    assert ("calibrating" in capfd.readouterr().err) is shown

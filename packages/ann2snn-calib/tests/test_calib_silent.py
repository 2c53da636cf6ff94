"""Issue 12 (SPEC 13.3, 13.4, 13.8) in ann2snn-calib: NaN/inf raise in every mode, numpy and torch
scalars are numbers, a per-channel scale is never applied along the wrong dimension after loading."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from ann2snn_calib import NonFiniteError, VoltageHook, VoltageScaler, percentile

MODES: list[dict[str, Any]] = [
    {"mode": "Max"},
    {"mode": "Max", "momentum": None},
    {"mode": 0.5},
    {"mode": "99%"},
    {"mode": "99%", "momentum": None},
    {"mode": "1%", "momentum": None},
    {"mode": "Max", "channel_dim": 1},
    {"mode": "99%", "channel_dim": 1},
    {"mode": "50%", "channel_dim": 1, "momentum": None},
]


@pytest.mark.parametrize("kwargs", MODES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_nonfinite_input_raises_in_every_mode_and_keeps_the_state(
    kwargs: dict[str, Any], bad: float, dtype: torch.dtype
) -> None:
    hook = VoltageHook(**kwargs)
    hook(torch.rand(4, 3, 5).to(dtype))
    before = hook.scale.clone()
    x = torch.rand(4, 3, 5).to(dtype)
    x[2, 1, 3] = bad
    name = "NaN" if bad != bad else ("+inf" if bad > 0 else "-inf")
    with pytest.raises(NonFiniteError, match=rf"NaN/inf activations: .*\b1 {re_escape(name)}") as info:
        hook(x)
    assert isinstance(info.value, ValueError)
    assert info.value.hook is hook
    assert torch.equal(hook.scale, before)
    assert int(hook.num_batches_tracked) == 1


def re_escape(text: str) -> str:
    return text.replace("+", r"\+")


def test_finite_data_gives_the_same_scale_as_before() -> None:
    x = torch.randn(6, 3, 7)
    assert VoltageHook(mode="Max")(x) is x
    hook = VoltageHook(mode="Max", momentum=None, channel_dim=1)
    hook(x)
    assert torch.equal(hook.scale, x.amax(dim=(0, 2)))


def test_integer_input_is_not_checked_for_nan() -> None:
    hook = VoltageHook(mode="Max")
    hook(torch.tensor([1, 5, 2]))
    assert hook.scale.item() == 5


@pytest.mark.parametrize(
    ("make_real", "make_int"),
    [(np.float32, np.int64), (np.float64, np.int32), (torch.tensor, torch.tensor)],
    ids=["np32", "np64", "torch0d"],
)
def test_numpy_and_torch_scalars_are_numbers(make_real: Any, make_int: Any) -> None:
    x = torch.rand(5, 3, 4)
    plain = VoltageHook(mode=0.5, momentum=0.25, channel_dim=1, max_candidates=64)
    other = VoltageHook(
        mode=make_real(0.5), momentum=make_real(0.25), channel_dim=make_int(1), max_candidates=make_int(64)
    )
    plain(x)
    other(x)
    assert torch.equal(other.scale, plain.scale)
    assert type(other.channel_dim) is int
    assert type(other.max_candidates) is int
    assert other.mode == 0.5
    scaler = VoltageScaler(torch.ones(3), channel_dim=make_int(1))
    assert torch.equal(scaler(x), x)
    assert VoltageScaler(make_real(2.0))(torch.ones(1)).item() == 2.0
    assert percentile(torch.arange(11.0), make_real(50.0)).item() == 5.0


@pytest.mark.parametrize("bad", [True, 1.0, torch.tensor([1])])
def test_bool_float_and_tensor_channel_dims_stay_refused(bad: Any) -> None:
    with pytest.raises(TypeError, match="channel_dim must be an int"):
        VoltageHook(channel_dim=bad)
    with pytest.raises(TypeError, match="max_candidates must be a positive int"):
        VoltageHook(max_candidates=bad)


def test_per_channel_scale_is_not_adopted_without_a_channel_dim() -> None:
    saved = VoltageScaler(torch.tensor([1.0, 2.0, 3.0, 4.0]), channel_dim=1).state_dict()
    x = torch.rand(2, 4, 4, 4)
    per_channel = VoltageScaler(1.0, channel_dim=1)
    per_channel.load_state_dict(saved)
    assert torch.equal(per_channel(x), x * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1))
    per_tensor = VoltageScaler(1.0)
    with pytest.raises(RuntimeError, match=r"saved scale has shape \(4,\) but this scaler has shape \(\)"):
        per_tensor.load_state_dict(saved)
    per_tensor.load_state_dict(VoltageScaler(3.0).state_dict())  # a 0-dim scale is adopted anywhere
    per_channel.load_state_dict(VoltageScaler(3.0).state_dict())
    assert torch.equal(per_channel(x), x * 3.0)

"""VoltageHook and VoltageScaler: the seed's behaviour, its fixes and the additions."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

from ann2snn_calib import NonFiniteError, VoltageHook, VoltageScaler

MODE_ERROR = re.escape("You have used a non-defined VoltageScale Method.")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ema(stats: list[torch.Tensor], momentum: float) -> torch.Tensor:
    scale = stats[0]
    for s in stats[1:]:
        scale = (1 - momentum) * scale + momentum * s
    return scale


# ---------------------------------------------------------------------------------------------- seed behaviour


def test_returns_the_same_object_and_records_no_graph() -> None:
    hook = VoltageHook()
    x = torch.randn(4, 5, generator=_gen(0), requires_grad=True)
    y = hook(x)
    assert y is x
    assert not hook.scale.requires_grad
    assert hook.scale.item() == x.max().item()


@pytest.mark.parametrize(
    ("momentum", "batches", "expected"),
    [(0.5, [4.0, 2.0], 3.0), (0.1, [7.0], 7.0), (0.1, [4.0, 2.0, 8.0], 0.9 * (0.9 * 4 + 0.1 * 2) + 0.1 * 8)],
)
def test_ema_of_batch_maxima(momentum: float, batches: list[float], expected: float) -> None:
    hook = VoltageHook(momentum=momentum)
    for b in batches:
        hook(torch.tensor([0.0, b, -1.0]))
    assert hook.scale.item() == pytest.approx(expected, rel=1e-6)
    assert hook.num_batches_tracked.item() == len(batches)
    assert hook.num_samples_tracked.item() == 3 * len(batches)


@pytest.mark.parametrize("mode", ["99.9%", "50%", "0%", "100%", "12.5%"])
def test_ema_of_exact_percentiles(mode: str) -> None:
    hook = VoltageHook(momentum=0.3, mode=mode)
    p = float(mode[:-1])
    batches = [torch.relu(torch.randn(4, 8, 9, 9, generator=_gen(i))) * (i + 1) for i in range(4)]
    for b in batches:
        hook(b)
    stats = [torch.tensor(np.percentile(b.numpy(), p)) for b in batches]
    assert torch.equal(hook.scale, _ema(stats, 0.3))


@pytest.mark.parametrize("fraction", [0.5, 1, 0.999, np.float64(0.25)])
def test_fraction_of_the_maximum(fraction: float) -> None:
    hook = VoltageHook(mode=fraction)
    x = torch.randn(100, generator=_gen(1))
    hook(x)
    assert hook.scale.item() == pytest.approx(float(fraction) * x.max().item(), rel=1e-7)


def test_first_call_replaces_the_initial_scale_and_int_initial_scale_is_int64() -> None:
    hook = VoltageHook(scale=5)
    assert hook.scale.dtype == torch.int64
    hook(torch.tensor([2.0]))
    assert hook.scale.dtype == torch.float32
    assert hook.scale.item() == 2.0


def test_records_in_eval_mode_too() -> None:
    hook = VoltageHook().eval()
    hook(torch.tensor([3.0]))
    assert hook.scale.item() == 3.0


def test_zero_dim_input_is_one_sample() -> None:
    hook = VoltageHook(mode="50%")
    hook(torch.tensor(2.5))
    assert hook.scale.item() == 2.5
    assert hook.num_samples_tracked.item() == 1
    assert hook.scale.shape == ()


# ---------------------------------------------------------------------------------------------- validation


UNDEFINED_MODES = [
    "",
    "%",
    "150%",
    "-1%",
    "100.01%",
    "nan%",
    "inf%",
    "abc%",
    "mean",
    "99.9",
    0.0,
    1.5,
    -0.5,
    2,
]
UNDEFINED_MODES += [True, False, None, float("nan"), float("inf"), [0.5], torch.tensor(1.5), torch.ones(1)]


@pytest.mark.parametrize("mode", UNDEFINED_MODES)
def test_undefined_modes_are_rejected_at_construction(mode: object) -> None:
    with pytest.raises(NotImplementedError, match=MODE_ERROR):
        VoltageHook(mode=mode)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["max", "MAX", "Max", "99.9%", "0%", "100%", 0.5, 1, 1.0])
def test_defined_modes_are_accepted(mode: object) -> None:
    hook = VoltageHook(mode=mode)  # type: ignore[arg-type]
    hook(torch.tensor([1.0, 2.0]))
    assert torch.isfinite(hook.scale)


@pytest.mark.parametrize(
    ("momentum", "exc"),
    [
        (-0.1, ValueError),
        (1.1, ValueError),
        (float("nan"), ValueError),
        ("0.1", TypeError),
        (True, TypeError),
    ],
)
def test_momentum_validation(momentum: object, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=r"momentum must be a float in \[0, 1\] or None"):
        VoltageHook(momentum=momentum)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"channel_dim": 1.0}, TypeError, "channel_dim must be an int"),
        ({"channel_dim": True}, TypeError, "channel_dim must be an int"),
        ({"max_candidates": 0}, ValueError, "max_candidates must be a positive int"),
        ({"max_candidates": 2.0}, TypeError, "max_candidates must be a positive int"),
        ({"scale": "1"}, TypeError, "scale must be a real number"),
        ({"scale": True}, TypeError, "scale must be a real number"),
        ({"scale": torch.tensor([1j])}, TypeError, "real tensor"),
    ],
)
def test_constructor_validation(kwargs: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        VoltageHook(**kwargs)


@pytest.mark.parametrize("mode", ["Max", "99%", 0.5])
def test_empty_and_non_tensor_inputs(mode: object) -> None:
    hook = VoltageHook(mode=mode)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"empty tensor of shape \(0, 3\)"):
        hook(torch.empty(0, 3))
    with pytest.raises(TypeError, match=r"expects a torch\.Tensor, got list"):
        hook([1.0])  # type: ignore[arg-type]
    assert hook.num_batches_tracked.item() == 0


# ---------------------------------------------------------------------------------------------- state, dtype, device


@pytest.mark.parametrize(
    ("dtype", "state"),
    [(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)],
)
@pytest.mark.parametrize("mode", ["Max", "99.9%", 0.5])
def test_state_dtype(dtype: torch.dtype, state: torch.dtype, mode: object) -> None:
    hook = VoltageHook(mode=mode, momentum=0.5)  # type: ignore[arg-type]
    xs = [torch.randn(3000, generator=_gen(i)).to(dtype) for i in range(2)]
    for x in xs:
        hook(x)
    assert hook.scale.dtype == state
    if mode == "99.9%":
        stats = [torch.tensor(np.percentile(x.to(state).numpy(), 99.9)) for x in xs]
        assert torch.equal(hook.scale, _ema(stats, 0.5))


def test_every_piece_of_state_is_a_buffer_and_round_trips() -> None:
    hook = VoltageHook(mode="99%", momentum=0.2)
    assert set(hook.state_dict()) == {"scale", "num_batches_tracked", "num_samples_tracked"}
    assert list(hook.parameters()) == []
    batches = [torch.randn(2, 500, generator=_gen(i)) for i in range(4)]
    for b in batches[:2]:
        hook(b)
    clone = VoltageHook(mode="99%", momentum=0.2)
    clone.load_state_dict(hook.state_dict())
    for b in batches[2:]:
        hook(b)
        clone(b)
    for name, value in hook.state_dict().items():
        assert torch.equal(value, clone.state_dict()[name]), name
    assert hook.num_batches_tracked.item() == 4
    assert hook.num_samples_tracked.item() == 8


def test_buffers_follow_module_moves() -> None:
    hook = VoltageHook().to(torch.float64)
    assert hook.scale.dtype == torch.float64
    assert hook.num_batches_tracked.dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["Max", "99.9%", "50%", 0.5])
def test_cuda_state_stays_on_the_device(mode: object) -> None:
    hook = VoltageHook(mode=mode, momentum=None)  # type: ignore[arg-type]
    x = torch.randn(2_000_000, generator=_gen(0)).cuda().half()
    hook(x)
    for buf in hook.buffers():
        assert buf.is_cuda
    if isinstance(mode, str) and mode.endswith("%"):
        assert hook.scale.item() == np.percentile(x.float().cpu().numpy(), float(mode[:-1]))


def test_extra_repr() -> None:
    assert repr(VoltageHook()) == "VoltageHook(mode='Max', momentum=0.1)"
    assert "channel_dim=1" in repr(VoltageHook(mode="99%", momentum=None, channel_dim=1))


# ---------------------------------------------------------------------------------------------- dataset level


def test_momentum_none_max_is_the_running_maximum() -> None:
    hook = VoltageHook(momentum=None)
    frac = VoltageHook(momentum=None, mode=0.5)
    for v in [3.0, 9.0, 1.0]:
        hook(torch.tensor([v]))
        frac(torch.tensor([v]))
    assert hook.scale.item() == 9.0
    assert frac.scale.item() == 4.5


@pytest.mark.parametrize("p", [0, 1, 20, 50, 99.9, 100])
def test_momentum_none_percentile_over_everything_seen(p: float) -> None:
    hook = VoltageHook(momentum=None, mode=f"{p}%", max_candidates=1 << 16)
    batches = [torch.randn(3, 7, 11, generator=_gen(i)) * (1 + i % 3) for i in range(6)]
    for i, b in enumerate(batches):
        hook(b)
        seen = torch.cat([x.reshape(-1) for x in batches[: i + 1]])
        assert hook.scale.item() == np.percentile(seen.numpy(), p)
    assert hook.candidates.shape[1] <= 1 << 16
    assert hook.elements_seen.item() == 6 * 3 * 7 * 11


@pytest.mark.parametrize("p", [99, 1])
def test_momentum_none_percentile_keeps_only_the_memory_bound(p: float) -> None:
    hook = VoltageHook(momentum=None, mode=f"{p}%", max_candidates=50)
    batches = [torch.randn(1000, generator=_gen(i)) for i in range(4)]
    for i, b in enumerate(batches):
        hook(b)
        assert hook.scale.item() == np.percentile(torch.cat(batches[: i + 1]).numpy(), p)
    assert hook.candidates.shape == (1, 50)
    # 4000 elements need 41 order statistics; 5000 need 51 > 50.
    with pytest.raises(RuntimeError, match="more than max_candidates=50"):
        hook(torch.randn(1000, generator=_gen(9)))


def test_momentum_none_state_round_trips() -> None:
    hook = VoltageHook(momentum=None, mode="90%", channel_dim=0)
    hook(torch.randn(2, 30, generator=_gen(0)))
    clone = VoltageHook(momentum=None, mode="90%", channel_dim=0)
    clone.load_state_dict(hook.state_dict())
    assert set(hook.state_dict()) == {
        "scale",
        "num_batches_tracked",
        "num_samples_tracked",
        "candidates",
        "elements_seen",
    }
    x = torch.randn(2, 30, generator=_gen(1))
    hook(x)
    clone(x)
    assert torch.equal(hook.scale, clone.scale)


# ---------------------------------------------------------------------------------------------- per channel


@pytest.mark.parametrize("channel_dim", [1, -3])
@pytest.mark.parametrize("mode", ["Max", 0.5, "99%", "50%", "0%"])
def test_per_channel_statistics(channel_dim: int, mode: object) -> None:
    hook = VoltageHook(mode=mode, momentum=0.5, channel_dim=channel_dim)  # type: ignore[arg-type]
    xs = [torch.randn(4, 6, 5, 5, generator=_gen(i)) for i in range(3)]
    for x in xs:
        hook(x)
    assert hook.scale.shape == (6,)

    def stat(x: torch.Tensor) -> torch.Tensor:
        rows = x.transpose(0, 1).reshape(6, -1).numpy()
        if isinstance(mode, str) and mode.endswith("%"):
            return torch.from_numpy(np.percentile(rows, float(mode[:-1]), axis=1))
        return torch.from_numpy(rows.max(axis=1)) * (1.0 if mode == "Max" else float(mode))  # type: ignore[arg-type]

    torch.testing.assert_close(hook.scale, _ema([stat(x) for x in xs], 0.5), rtol=0, atol=0)


def test_per_channel_dataset_level_percentile() -> None:
    hook = VoltageHook(mode="95%", momentum=None, channel_dim=-1)
    xs = [torch.randn(10, 4, generator=_gen(i)) for i in range(3)]
    for x in xs:
        hook(x)
    ref = np.percentile(torch.cat(xs).numpy(), 95, axis=0)
    assert torch.equal(hook.scale, torch.from_numpy(ref))


def test_per_channel_shape_checks() -> None:
    hook = VoltageHook(channel_dim=1)
    with pytest.raises(ValueError, match=r"needs an input with that dimension, got shape \(3,\)"):
        hook(torch.ones(3))
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        hook(torch.tensor(1.0))
    hook(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"has calibrated 3 channels, got an input of shape \(2, 4\) with 4"):
        hook(torch.ones(2, 4))


# ---------------------------------------------------------------------------------------------- VoltageScaler


def test_scaler_seed_behaviour() -> None:
    s = VoltageScaler(3.14)
    assert s.scale.dtype == torch.float32
    assert set(s.state_dict()) == {"scale"}
    assert "3.14" in s.extra_repr()
    assert repr(s) == "VoltageScaler(3.140000)"
    assert VoltageScaler(2).scale.dtype == torch.int64
    x = torch.tensor([1.0, -2.0])
    assert torch.equal(s(x), x * torch.tensor(3.14))
    assert VoltageScaler(2.0)(torch.ones(2, dtype=torch.float16)).dtype == torch.float16
    assert (
        VoltageScaler(2)(torch.ones(2, dtype=torch.int32)).dtype == torch.int32
    )  # 0-dim scale: x keeps its kind
    assert VoltageScaler(2.0)(torch.ones(2, dtype=torch.int32)).dtype == torch.float32
    assert torch.equal(VoltageScaler(0.0)(x), torch.zeros(2))


def test_scaler_repr_of_tiny_scales_is_faithful() -> None:
    assert VoltageScaler(2.5e-5).extra_repr() == "2.500000e-05"


def test_scaler_from_a_tensor_copies_without_warning() -> None:
    t = torch.tensor(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = VoltageScaler(t)
    t.fill_(9.0)
    assert s.scale.item() == 0.5


@pytest.mark.parametrize(
    ("scale", "kwargs", "exc", "match"),
    [
        (float("nan"), {}, ValueError, "finite scale"),
        (float("inf"), {}, ValueError, "finite scale"),
        (True, {}, TypeError, "real number"),
        ("2", {}, TypeError, "real number"),
        (torch.ones(2, 2), {"channel_dim": 1}, ValueError, r"0-dim or 1-D scale, got shape \(2, 2\)"),
        (torch.ones(2), {"channel_dim": "1"}, TypeError, "channel_dim must be an int"),
    ],
)
def test_scaler_validation(scale: object, kwargs: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        VoltageScaler(scale, **kwargs)  # type: ignore[arg-type]


def test_per_channel_scaler_applies_the_hook_scales_along_the_channel_dim() -> None:
    hook = VoltageHook(channel_dim=1)
    x = torch.rand(2, 3, 4, 4, generator=_gen(0)) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    hook(x)
    scaler = VoltageScaler(1 / hook.scale, channel_dim=1)
    y = scaler(x)
    torch.testing.assert_close(y.amax(dim=(0, 2, 3)), torch.ones(3))
    assert "channel_dim=1" in repr(scaler)
    with pytest.raises(ValueError, match=r"3 channel scales but the input of shape \(2, 4\) has 4"):
        scaler(torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"needs an input with that dimension, got shape \(3,\)"):
        scaler(torch.ones(3))
    with pytest.raises(TypeError, match=r"expects a torch\.Tensor"):
        scaler(1.0)  # type: ignore[arg-type]


def test_scaler_state_dict_adopts_a_per_channel_scale() -> None:
    saved = VoltageScaler(torch.tensor([1.0, 2.0]), channel_dim=0).state_dict()
    fresh = VoltageScaler(channel_dim=0)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh(torch.ones(2, 1)), torch.tensor([[1.0], [2.0]]))


@pytest.mark.parametrize("mode", ["Max", "99%"])
def test_calibration_inside_and_outside_inference_mode(mode: str) -> None:
    hook = VoltageHook(mode=mode, momentum=0.5)
    xs = [torch.randn(500, generator=_gen(i)) for i in range(3)]
    with torch.inference_mode():
        hook(xs[0])
    hook(xs[1])
    with torch.inference_mode():
        hook(xs[2])
    hook(xs[0])
    reference = VoltageHook(mode=mode, momentum=0.5)
    for x in [*xs, xs[0]]:
        reference(x)
    assert torch.equal(hook.scale, reference.scale)
    assert hook.num_batches_tracked.item() == 4


def test_docstring_examples_run() -> None:
    import doctest

    import ann2snn_calib._finite
    import ann2snn_calib._numbers
    import ann2snn_calib._select
    import ann2snn_calib.modules

    for module in (
        ann2snn_calib.modules,
        ann2snn_calib._select,
        ann2snn_calib._finite,
        ann2snn_calib._numbers,
    ):
        failed, attempted = doctest.testmod(module, raise_on_error=False)
        assert attempted > 0
        assert failed == 0


@pytest.mark.parametrize("p", [0, 0.1, 1, 5, 50, 93.75, 99, 99.9, 100])
@pytest.mark.parametrize("relu", [False, True])
def test_per_channel_percentile_on_large_channels(p: float, relu: bool) -> None:
    # 3 channels of 8 * 41 * 41 = 13448 values: the row-wise block pruning path, with a ragged tail.
    x = torch.randn(8, 3, 41, 41, generator=_gen(int(p * 10)))
    x = torch.relu(x) if relu else x
    hook = VoltageHook(mode=f"{p}%", channel_dim=1)
    hook(x)
    ref = np.percentile(x.transpose(0, 1).reshape(3, -1).numpy(), p, axis=1)
    assert torch.equal(hook.scale, torch.from_numpy(ref))


@pytest.mark.parametrize("p", [0, 0.1, 1, 5, 50, 95, 99.9, 100])
@pytest.mark.parametrize(
    ("shape", "channel_dim"), [((8, 3, 32, 32), 1), ((3, 4096), 0), ((16, 5, 512), -2), ((6, 3, 45, 45), 1)]
)
def test_per_channel_percentile_read_in_place(p: float, shape: tuple[int, ...], channel_dim: int) -> None:
    # Tails are read from the input without a copy, with ragged block ends (45 * 45 = 2025) too.
    x = torch.relu(torch.randn(shape, generator=_gen(int(p * 10))))
    hook = VoltageHook(mode=f"{p}%", channel_dim=channel_dim)
    hook(x)
    cd = channel_dim % x.dim()
    rows = x.movedim(cd, 0).reshape(x.shape[cd], -1).numpy()
    assert torch.equal(hook.scale, torch.from_numpy(np.percentile(rows, p, axis=1)))


def test_per_channel_percentile_refuses_nan_channels() -> None:
    # SPEC 13.4: a NaN (here in the ragged end of a row too) raises instead of giving NaN scales.
    x = torch.randn(8, 3, 33, 33, generator=_gen(0))
    x[5, 1, 7, 9] = float("nan")
    x[2, 2, 32, 32] = float("nan")
    for mode in ["99.9%", "0.1%", "50%"]:
        hook = VoltageHook(mode=mode, channel_dim=1)
        with pytest.raises(NonFiniteError, match=r"2 NaN, 0 \+inf, 0 -inf among 26136 values"):
            hook(x)
        assert int(hook.num_batches_tracked) == 0


def test_per_channel_in_place_path_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    import ann2snn_calib.modules as modules

    calls: list[tuple[int, ...]] = []
    original = modules.channel_pair

    def spy(x3: torch.Tensor, *args: object) -> object:
        calls.append(tuple(x3.shape))
        return original(x3, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(modules, "channel_pair", spy)
    VoltageHook(mode="99.9%", channel_dim=1)(torch.rand(8, 3, 32, 32, generator=_gen(0)))
    VoltageHook(mode="0.1%", channel_dim=1)(torch.rand(8, 3, 45, 45, generator=_gen(0)))
    assert calls == [(8, 3, 1024), (8, 3, 2025)]

"""run_snn and MultiStepSNN: equal to the step loop, convergent in T."""

from typing import Any

import pytest
import torch
from torch import fx, nn

from ann2snn_fx import (
    Converter,
    IFNode,
    MultiStepSNN,
    NeuronFactory,
    ThresholdOptimizer,
    reset_net,
    run_snn,
    trace_model,
)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.relu(self.conv(x) + x)
        x = self.pool(x)
        return self.fc(x.view(x.size(0), -1))


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    model = Residual().to(dtype).eval()
    with torch.no_grad():
        model.stem[1].running_mean.uniform_(-0.2, 0.2)
        model.stem[1].running_var.uniform_(0.5, 1.5)
    return model


def _convert(ann: nn.Module, mode: Any = "Max", **kwargs: Any) -> fx.GraphModule:
    g = torch.Generator().manual_seed(1)
    dtype = next(ann.parameters()).dtype
    loader = [torch.randn(16, 1, 8, 8, generator=g, dtype=dtype) for _ in range(4)]
    return Converter(loader, mode=mode, progress=False, **kwargs).convert_to_spiking_neurons(ann)


def test_run_snn_is_running_mean_of_step_loop() -> None:
    snn = _convert(_model())
    x = torch.randn(3, 1, 8, 8)
    reset_net(snn)
    with torch.no_grad():
        steps = torch.stack([snn(x) for _ in range(10)])
    raw = run_snn(snn, x, 10, running_mean=False)
    torch.testing.assert_close(raw, steps)
    mean = run_snn(snn, x, 10)
    torch.testing.assert_close(mean[4], steps[:5].mean(0))
    torch.testing.assert_close(mean[-1], steps.mean(0))


def test_run_snn_resets_unless_told_not_to() -> None:
    snn = _convert(_model())
    x = torch.randn(2, 1, 8, 8)
    first = run_snn(snn, x, 5, running_mean=False)
    again = run_snn(snn, x, 5, running_mean=False)
    torch.testing.assert_close(first, again)
    continued = run_snn(snn, x, 5, running_mean=False, reset=False)
    both = run_snn(snn, x, 10, running_mean=False)
    torch.testing.assert_close(continued, both[5:])


@pytest.mark.parametrize("v_init", [None, 0.5])
def test_multi_step_equals_step_loop(v_init: float | None) -> None:
    snn = _convert(_model(dtype=torch.float64), neuron_factory=NeuronFactory(v_init=v_init))
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    loop = run_snn(snn, x, 16, running_mean=False)
    multi = run_snn(snn, x, 16, running_mean=False, multi_step=True)
    torch.testing.assert_close(multi, loop)
    whole = run_snn(snn, x, 16, running_mean=False, multi_step=True, chunk_elements=None)
    torch.testing.assert_close(whole, loop)
    node = snn.get_submodule("stem.spiking_0.if_node")
    assert isinstance(node.v, torch.Tensor)
    assert node.v.shape == (3, 4, 8, 8)


@pytest.mark.parametrize("chunk_elements", [None, 1, 600, 2**20])
def test_multi_step_chunks_equal_step_loop(chunk_elements: int | None) -> None:
    snn = _convert(_model(dtype=torch.float64), neuron_factory=NeuronFactory(v_init=0.5))
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    loop = run_snn(snn, x, 11, running_mean=False)
    reset_net(snn)
    with torch.no_grad():
        multi = MultiStepSNN(snn, chunk_elements=chunk_elements)(x, 11)
    torch.testing.assert_close(multi, loop)
    with pytest.raises(ValueError, match="chunk_elements must be a positive int or None"):
        MultiStepSNN(snn, chunk_elements=0)


def test_multi_step_float32_close_to_step_loop() -> None:
    snn = _convert(_model())
    x = torch.randn(4, 1, 8, 8)
    loop = run_snn(snn, x, 32)
    multi = run_snn(snn, x, 32, multi_step=True)
    torch.testing.assert_close(multi[-1], loop[-1], atol=1e-3, rtol=1e-3)


def test_multi_step_model_without_neurons_repeats_output() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
    x = torch.randn(3, 2)
    out = MultiStepSNN(gm)(x, time_steps=4)
    assert out.shape == (4, 3, 2)
    torch.testing.assert_close(out[2], gm(x))


def test_multi_step_mixes_static_and_temporal_branches() -> None:
    class Mix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.node = IFNode(v_reset=None)
            self.b = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(self.node(h)) + h  # h is the same at every step

    torch.manual_seed(0)
    gm = trace_model(Mix().double())
    x = torch.randn(2, 3, dtype=torch.float64)
    loop = run_snn(gm, x, 6, running_mean=False)
    multi = run_snn(gm, x, 6, running_mean=False, multi_step=True)
    torch.testing.assert_close(multi, loop)
    for chunk in (1, 6):  # the compiled graph after the first interpreted step
        reset_net(gm)
        with torch.no_grad():
            torch.testing.assert_close(MultiStepSNN(gm, chunk_elements=chunk)(x, 6), loop)


def test_multi_step_per_channel_blocks_are_not_fused_but_equal() -> None:
    snn = _convert(_model(dtype=torch.float64), threshold_optimizer=ThresholdOptimizer("per_channel"))
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    loop = run_snn(snn, x, 7, running_mean=False)
    reset_net(snn)
    with torch.no_grad():
        torch.testing.assert_close(MultiStepSNN(snn, chunk_elements=1)(x, 7), loop)


def test_runner_errors() -> None:
    snn = trace_model(nn.Sequential(IFNode()))
    with pytest.raises(ValueError, match="time_steps must be a positive int"):
        run_snn(snn, torch.ones(1, 1), 0)
    with pytest.raises(ValueError, match="time_steps must be a positive int"):
        run_snn(snn, torch.ones(1, 1), True)
    with pytest.raises(TypeError, match="x must be a tensor"):
        run_snn(snn, [1.0], 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"snn must be an nn\.Module"):
        run_snn("snn", torch.ones(1), 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"multi_step=True needs an fx\.GraphModule"):
        run_snn(nn.Sequential(IFNode()), torch.ones(1, 1), 2, multi_step=True)
    with pytest.raises(TypeError, match=r"MultiStepSNN needs an fx\.GraphModule"):
        MultiStepSNN(nn.Identity())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expects a batched input tensor"):
        MultiStepSNN(snn)(torch.tensor(1.0), 2)

    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    with pytest.raises(TypeError, match="returning one tensor"):
        run_snn(Pair(), torch.ones(1), 2)
    with pytest.raises(TypeError, match="returning one tensor"):
        run_snn(fx.symbolic_trace(Pair()), torch.ones(1), 2, multi_step=True)


@pytest.mark.parametrize("mode", ["Max", "99.9%", 0.5])
def test_error_shrinks_with_time_steps(mode: Any) -> None:
    ann = _model()
    snn = _convert(ann, mode=mode)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        target = ann(x)
    out = run_snn(snn, x, 256, multi_step=True)
    errors = [(out[t - 1] - target).abs().mean().item() for t in (8, 32, 256)]
    assert errors[0] > errors[1] > errors[2]
    if mode == "Max":
        assert errors[2] < 0.05 * target.abs().mean().item()


def test_multi_step_cache_does_not_keep_the_snn_alive() -> None:
    import gc
    import weakref

    snn = _convert(_model())
    x = torch.randn(2, 1, 8, 8)
    run_snn(snn, x, 3, multi_step=True)
    run_snn(snn, x, 3, multi_step=True)  # second call: compiled graph only
    ref = weakref.ref(snn)
    del snn
    gc.collect()
    assert ref() is None

"""calibrate_snn against a straightforward layer-by-layer reference: the whole SNN rerun afresh in the step
loop for every measurement, the ANN's activations from forward hooks on the caller's model."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from ann2snn_fx import Converter, NeuronFactory, ThresholdOptimizer, calibrate_snn, run_snn


def _rate(snn: nn.Module, block: str, data: list[torch.Tensor], steps: int) -> torch.Tensor:
    """The block's output (its output scaler) averaged over ``steps`` and all samples, float64."""
    outs: list[torch.Tensor] = []
    handle = snn.get_submodule(f"{block}.scaler1").register_forward_hook(
        lambda m, i, o: outs.append(o.double().sum(0))
    )
    try:
        for x in data:
            run_snn(snn, x, steps)
    finally:
        handle.remove()
    return torch.stack(outs).sum(0) / (steps * sum(x.shape[0] for x in data))


def _reference(
    snn: nn.Module,
    ann: nn.Sequential,
    data: list[torch.Tensor],
    steps: int,
    method: str,
    bias_of: dict[str, str],
) -> nn.Module:
    ref = copy.deepcopy(snn)
    acts: list[torch.Tensor] = []
    relus = [m for m in ann if isinstance(m, nn.ReLU)]
    handles = [m.register_forward_hook(lambda m, i, o: acts.append(o.double().sum(0))) for m in relus]
    with torch.no_grad():
        for x in data:
            ann(x)
    for h in handles:
        h.remove()
    n = sum(x.shape[0] for x in data)
    targets = [sum(acts[k :: len(relus)]) / n for k in range(len(relus))]
    with torch.no_grad():
        for (block, layer), target in zip(bias_of.items(), targets):
            error = _rate(ref, block, data, steps) - target
            if method in ("bias", "both"):
                module: Any = ref.get_submodule(layer)
                shift = error.mean(dim=tuple(range(1, error.dim()))) if error.dim() > 1 else error
                module.bias -= shift.to(module.bias.dtype)
                error = _rate(ref, block, data, steps) - target
            if method in ("potential", "both"):
                neuron: Any = ref.get_submodule(f"{block}.if_node")
                scale = ref.get_submodule(f"{block}.scaler1").scale.double()
                if scale.dim() == 1 and error.dim() > 1:
                    scale = scale.view(-1, *([1] * (error.dim() - 1)))
                delta = -steps * error / scale * float(neuron.v_threshold)
                neuron.set_v_init((torch.as_tensor(neuron.v_init, dtype=torch.float64) + delta).float())
    return ref


@pytest.mark.parametrize(
    ("options", "strategy"),
    [({}, "fixed"), ({"burst": 2, "signed": True}, "fixed"), ({"signed": True}, "per_channel")],
    ids=["plain", "burst-signed", "signed-per-channel"],
)
@pytest.mark.parametrize("method", ["bias", "potential", "both"])
@pytest.mark.parametrize("steps", [2, 4])
def test_calibrate_snn_matches_a_layer_by_layer_reference(
    options: dict[str, Any], strategy: str, method: str, steps: int
) -> None:
    torch.manual_seed(5)
    ann = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 16, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )
    with torch.no_grad():
        ann[1].running_mean.uniform_(-0.5, 0.5)
        ann[1].running_var.uniform_(0.5, 2.0)
        ann[1].weight.uniform_(0.5, 1.5)
        ann[1].bias.uniform_(-0.2, 0.2)
    ann.eval()
    before = copy.deepcopy(ann.state_dict())
    data = [torch.randn(16, 2, 8, 8) for _ in range(3)]
    snn = Converter(
        data,
        progress=False,
        neuron_factory=NeuronFactory(v_init=0.5, **options),
        threshold_optimizer=ThresholdOptimizer(strategy),
    ).convert_to_spiking_neurons(ann)
    blocks = [c.block for c in snn.conversion_report.converted]
    assert len(blocks) == 3
    bias_of = dict(zip(blocks, ["0", "4", "7"]))
    fast = calibrate_snn(snn, ann, data, steps, method=method, progress=False)
    # The ANN (in eval mode: traced as it is, not copied) is untouched: its BatchNorm is not fused into it.
    assert type(ann[1]) is nn.BatchNorm2d
    assert not any(m.training for m in ann.modules())
    assert all(torch.equal(before[k], v) for k, v in ann.state_dict().items())
    ref = _reference(snn, ann, data, steps, method, bias_of)
    fast_state, ref_state = fast.state_dict(), ref.state_dict()
    assert fast_state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        torch.testing.assert_close(fast_state[key], value, rtol=1e-5, atol=1e-5, msg=key)
    old = snn.state_dict()
    moved = {k for k, v in ref_state.items() if k not in old or not torch.equal(v, old[k])}
    if method != "potential":
        assert {"0.bias", "4.bias", "7.bias"} <= moved
    if method != "bias":
        assert sum(k.endswith("v_init") for k in moved) == 3


def test_an_ann_in_training_mode_is_copied_and_left_in_it() -> None:
    torch.manual_seed(1)
    ann = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()).eval()
    data = [torch.randn(8, 2, 5, 5) for _ in range(2)]
    snn = Converter(
        data, progress=False, neuron_factory=NeuronFactory(v_init=0.5)
    ).convert_to_spiking_neurons(ann)
    expected = calibrate_snn(snn, ann, data, 2, progress=False).state_dict()
    ann.train()
    before = copy.deepcopy(ann.state_dict())
    got = calibrate_snn(snn, ann, data, 2, progress=False).state_dict()
    assert all(m.training for m in ann.modules())
    assert all(torch.equal(before[k], v) for k, v in ann.state_dict().items())  # running stats unchanged
    assert all(torch.equal(expected[k], v) for k, v in got.items())


def _small_cnn() -> tuple[nn.Module, list[torch.Tensor], nn.Module]:
    torch.manual_seed(3)
    ann = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten()
    ).eval()
    data = [torch.randn(6, 1, 5, 5) for _ in range(4)]
    snn = Converter(
        data, progress=False, neuron_factory=NeuronFactory(v_init=0.5)
    ).convert_to_spiking_neurons(ann)
    return ann, data, snn


def test_the_returned_snn_is_reset_and_its_tensors_are_contiguous() -> None:
    from ann2snn_fx import IFNode

    ann, data, snn = _small_cnn()
    fixed = calibrate_snn(snn, ann, data, 2, method="both", progress=False)
    neurons = [m for m in fixed.modules() if isinstance(m, IFNode)]
    assert len(neurons) == 2
    # No membrane of the calibration run (one per calibration sample) is left in the result.
    assert all(not isinstance(m.v, torch.Tensor) and m.v_seq is None for m in neurons)
    # The channels-last run leaves no permuted parameter or buffer behind.
    assert all(v.is_contiguous() for v in fixed.state_dict().values())
    # The result simulates as a freshly loaded copy of it does.
    x = torch.randn(3, 1, 5, 5)
    clone = copy.deepcopy(fixed)
    clone.load_state_dict(fixed.state_dict())
    torch.testing.assert_close(run_snn(fixed, x, 2), run_snn(clone, x, 2), rtol=0, atol=0)


def test_batches_are_merged_up_to_the_cap_and_only_when_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    from ann2snn_fx.relu import calibrate

    a, b, c = torch.randn(4, 3), torch.randn(2, 3), torch.randn(5, 3)
    merged = calibrate._merged([a, b, c])
    assert len(merged) == 1
    assert torch.equal(merged[0], torch.cat([a, b, c]))
    monkeypatch.setattr(calibrate, "_MERGE_ELEMENTS", 18)  # a + b fit (18 elements), c starts a new chunk
    merged = calibrate._merged([a, b, c])
    assert [m.shape[0] for m in merged] == [6, 5]
    monkeypatch.setattr(calibrate, "_MERGE_ELEMENTS", 2**22)
    other_shape, other_dtype = torch.randn(2, 4), torch.randn(2, 3, dtype=torch.float64)
    merged = calibrate._merged([a, other_shape, b, other_dtype, c])
    assert [tuple(m.shape) for m in merged] == [(4, 3), (2, 4), (2, 3), (2, 3), (5, 3)]
    assert [m.dtype for m in merged] == [torch.float32] * 3 + [torch.float64, torch.float32]


def test_merged_batches_calibrate_as_separate_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from ann2snn_fx.relu import calibrate

    ann, data, snn = _small_cnn()
    together = calibrate_snn(snn, ann, data, 2, method="both", progress=False)
    monkeypatch.setattr(calibrate, "_MERGE_ELEMENTS", 0)  # every batch alone
    apart = calibrate_snn(snn, ann, data, 2, method="both", progress=False)
    old = snn.state_dict()
    moved = set()
    for key, value in apart.state_dict().items():
        torch.testing.assert_close(together.state_dict()[key], value, rtol=1e-6, atol=1e-6, msg=key)
        if key not in old or not torch.equal(value, old[key]):
            moved.add(key)
    assert {"0.bias", "2.bias"} <= moved  # both biases were corrected
    assert sum(k.endswith("v_init") for k in moved) == 2  # and both initial potentials

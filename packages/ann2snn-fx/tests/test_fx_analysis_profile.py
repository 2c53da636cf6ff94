"""profile_snn: events against hand counts and an independent simulation, SOPs against a brute-force loop over
synapses, the shortcuts of other tools counted right, and hooks always removed."""

from __future__ import annotations

import csv
import io
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ann2snn_calib import VoltageScaler
from ann2snn_fx import IFNode, trace_model
from ann2snn_fx.analysis import FP32_45NM, EnergyModel, profile_snn

MODES = ("step", "multi")


class Pattern(nn.Module):
    """A stand-in neuron that emits a fixed signed event pattern ``[T, *]`` times ``spike_unit``."""

    def __init__(self, pattern: torch.Tensor, spike_unit: float = 1.0) -> None:
        super().__init__()
        self.pattern = pattern
        self.spike_unit = spike_unit
        self.t = 0

    def reset(self) -> None:
        self.t = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pattern[self.t].expand_as(x) * self.spike_unit
        self.t += 1
        return out

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.forward(x) for x in x_seq])


class BurstIF(nn.Module):
    """A stand-in burst neuron: ``k = clamp(floor(v / theta), 0, burst)``, ``v -= k theta``, output ``k theta``."""

    def __init__(self, theta: float, burst: int) -> None:
        super().__init__()
        self.theta, self.burst, self.spike_unit = theta, burst, theta
        self.v: torch.Tensor | float = 0.0

    def reset(self) -> None:
        self.v = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.v = self.v + x
        k = torch.clamp(torch.floor(self.v / self.theta), 0, self.burst)
        self.v = self.v - k * self.theta
        return k * self.theta

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.forward(x) for x in x_seq])


def _trace(*layers: nn.Module) -> torch.fx.GraphModule:
    return trace_model(nn.Sequential(*layers), leaf_modules=[Pattern, BurstIF]).eval()


def _row(profile, name):
    return next(r for r in profile.layers if r.name == name)


@pytest.mark.parametrize("mode", MODES)
def test_two_layer_mlp_matches_hand_count(mode: str) -> None:
    # Layer 1 currents per step: 0.5, 1.0, 0.25 -> over T=4 with soft reset from 0: 2, 4, 1 spikes.
    fc1 = nn.Linear(1, 3, bias=False)
    fc1.weight.data = torch.tensor([[0.5], [1.0], [0.25]])
    # Layer 2 neuron sums the three spike trains: steps 1..4 carry 1, 2, 1, 3 -> currents 0.5 1 0.5 1.5 (w=0.5)
    fc2 = nn.Linear(3, 1, bias=False)
    fc2.weight.data = torch.full((1, 3), 0.5)
    snn = _trace(fc1, IFNode(v_reset=None), fc2, IFNode(v_reset=None))
    profile = profile_snn(snn, torch.ones(2, 1), 4, mode=mode)
    first, second = _row(profile, "1"), _row(profile, "3")
    assert (first.events_pos, first.events_neg, first.neurons) == (7.0, 0.0, 3)
    assert first.firing_rate == pytest.approx(7 / 12)
    # v: 0.5, 1.5->fire(0.5), 1.0->fire(0), 1.5->fire(0.5): 3 spikes
    assert second.events_pos == 3.0
    assert second.silent_fraction == 0.0
    assert _row(profile, "0").role == "analog, once"
    assert _row(profile, "0").mac == 3.0
    assert _row(profile, "2").role == "spikes"
    assert _row(profile, "2").sop == 7.0
    assert first.state_adds == 3 * 4 + 7
    assert first.state_compares == 12
    assert profile.ann_mac == 3.0 + 3.0


def _reference_if(currents: list[torch.Tensor]) -> list[torch.Tensor]:
    v = torch.zeros_like(currents[0])
    out = []
    for x in currents:
        v = v + x
        s = (v >= 1.0).float()
        v = v - s
        out.append(s)
    return out


def _brute_force_conv_fanout(shape: tuple[int, int, int], conv: nn.Conv2d) -> torch.Tensor:
    """Count, for every input element, the output elements connected to it, by looping over synapses."""
    c, h, w = shape
    fan = torch.zeros(shape)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cin_g, cout_g = c // conv.groups, conv.out_channels // conv.groups
    for co, oy, ox, ci, ky, kx in itertools.product(
        range(conv.out_channels), range(oh), range(ow), range(cin_g), range(kh), range(kw)
    ):
        iy, ix = oy * sh - ph + ky * dh, ox * sw - pw + kx * dw
        if 0 <= iy < h and 0 <= ix < w:
            fan[(co // cout_g) * cin_g + ci, iy, ix] += 1
    return fan


@pytest.mark.parametrize("mode", MODES)
def test_conv_net_events_and_sops_against_brute_force(mode: str) -> None:
    torch.manual_seed(0)
    conv1 = nn.Conv2d(1, 4, 3, padding=1)
    conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
    fc = nn.Linear(6 * 3 * 3, 5)
    scaler = VoltageScaler(0.5)
    snn = _trace(
        conv1, IFNode(v_reset=None), scaler, nn.AvgPool2d(2), conv2, IFNode(v_reset=None), nn.Flatten(), fc
    )
    x, t = torch.rand(3, 1, 12, 12) * 2, 6
    profile = profile_snn(snn, x, t, mode=mode)

    # Independent simulation: the same layers with a hand-written IF.
    with torch.no_grad():
        s1 = _reference_if([conv1(x)] * t)
        s2 = _reference_if([conv2(F.avg_pool2d(s * 0.5, 2)) for s in s1])
    e1, e2 = sum(s1), sum(s2)
    assert _row(profile, "1").events_pos == pytest.approx(float(e1.sum()) / 3)
    assert _row(profile, "5").events_pos == pytest.approx(float(e2.sum()) / 3)
    assert _row(profile, "1").silent_fraction == pytest.approx(float((e1 == 0).float().mean()))

    # SOPs: every event of IF 1 goes into each 2x2 window that holds it, then along conv2's synapses.
    fan_pooled = _brute_force_conv_fanout((4, 6, 6), conv2)
    fan1 = fan_pooled.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert _row(profile, "4").sop == pytest.approx(float((e1.sum(0) * fan1).sum()) / 3)
    assert _row(profile, "4").synapses == float(fan1.sum())
    assert _row(profile, "7").sop == pytest.approx(float(e2.sum()) / 3 * 5)
    assert _row(profile, "4").ann_mac == 6 * 3 * 3 * 2 * 9


def test_both_modes_give_identical_records() -> None:
    torch.manual_seed(1)
    snn = _trace(
        nn.Conv2d(2, 3, 3), IFNode(v_reset=None), nn.Flatten(), nn.Linear(3 * 4 * 4, 2), IFNode(v_reset=None)
    )
    x = torch.rand(4, 2, 6, 6)
    step, multi = profile_snn(snn, x, 7), profile_snn(snn, x, 7, mode="multi")
    assert step.layers == multi.layers


@pytest.mark.parametrize("mode", MODES)
def test_signed_spikes_do_not_cancel(mode: str) -> None:
    # sinabs weighs by amplitude, so +1 and -1 cancel to 0 SOPs; they are two events of fan-out 10.
    snn = _trace(Pattern(torch.tensor([[1.0, -1.0, 0.0, 0.0]])), nn.Linear(4, 10))
    profile = profile_snn(snn, torch.zeros(1, 4), 1, mode=mode)
    neuron = _row(profile, "0")
    assert (neuron.events_pos, neuron.events_neg) == (1.0, 1.0)
    assert _row(profile, "1").sop == 20.0
    assert _row(profile, "1").mac == 0.0


def test_zero_or_x_analog_tensor_is_not_spikes() -> None:
    # syops calls any {0, x} tensor in [0, 1] spikes at a fractional rate (AC 10); it is analog: 40 MACs.
    class Fixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 0 + torch.tensor([0.5, 0.0, 0.5, 0.0])

    snn = _trace(Fixed(), nn.Linear(4, 10))
    row = _row(profile_snn(snn, torch.zeros(1, 4), 3), "1")
    assert row.role != "spikes"
    assert row.sop == 0.0
    assert row.mac == 40.0


@pytest.mark.parametrize("mode", MODES)
def test_threshold_scaled_spike_is_one_event(mode: str) -> None:
    # SpikingJelly counts a spike of amplitude 2 as a dense MAC (40); it is one event per spike: 20 SOPs.
    snn = _trace(IFNode(v_reset=None), VoltageScaler(2.0), nn.Linear(4, 10))
    profile = profile_snn(snn, torch.tensor([[1.0, 0.0, 1.0, 0.0]]), 1, mode=mode)
    assert _row(profile, "2").sop == 20.0
    assert _row(profile, "2").mac == 0.0
    scaled = _trace(Pattern(torch.tensor([[1.0, 0.0, 1.0, 0.0]]), spike_unit=0.37), nn.Linear(4, 10))
    assert _row(profile_snn(scaled, torch.zeros(1, 4), 1, mode=mode), "1").sop == 20.0


@pytest.mark.parametrize("mode", MODES)
def test_burst_of_k_is_k_events(mode: str) -> None:
    # current 2.5 per step, theta 1, burst 3: v 2.5 -> k=2 (0.5), 3.0 -> 3 (0), 2.5 -> 2, 3.0 -> 3: 10 events.
    snn = _trace(BurstIF(1.0, 3), nn.Linear(1, 4))
    profile = profile_snn(snn, torch.tensor([[2.5]]), 4, mode=mode)
    assert _row(profile, "0").events_pos == 10.0
    assert _row(profile, "1").sop == 40.0
    assert _row(profile, "0").firing_rate == 2.5


def test_sequence_mode_counts_time_leading_outputs() -> None:
    class SeqNeuron(nn.Module):
        spike_unit = 0.5

        def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
            return torch.sign(x_seq) * 0.5  # one signed event per nonzero element and step

    snn = trace_model(nn.Sequential(SeqNeuron(), nn.Linear(3, 2)), leaf_modules=[SeqNeuron])
    x = torch.tensor([[[1.0, -1.0, 0.0]], [[1.0, 0.0, 0.0]]])  # [T=2, B=1, 3]
    profile = profile_snn(snn, x, 2, mode="sequence")
    neuron = _row(profile, "0")
    assert (neuron.events_pos, neuron.events_neg, neuron.neurons) == (2.0, 1.0, 3)
    assert _row(profile, "1").sop == 6.0


def test_instrumentation_removed_even_on_error() -> None:
    class Failing(nn.Module):
        spike_unit = 1.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    fc = nn.Linear(2, 2)
    neuron = IFNode(v_reset=None)
    snn = trace_model(nn.Sequential(fc, neuron, nn.Linear(2, 2), Failing()), leaf_modules=[Failing])
    with pytest.raises(RuntimeError, match="boom"):
        profile_snn(snn, torch.ones(1, 2), 3)
    for module in snn.modules():
        assert not {"forward", "multi_step_forward", "_inference_sequence"} & set(vars(module))
        assert not module._forward_hooks
    profile_snn(trace_model(nn.Sequential(fc, neuron)), torch.ones(1, 2), 2)
    assert not fc._forward_hooks
    assert "forward" not in vars(neuron)


def test_tables_and_energy() -> None:
    snn = _trace(IFNode(v_reset=None), nn.Linear(2, 3))
    model = EnergyModel("test", mac_pj=2.0, add_pj=0.5, memory_pj=1.0)
    profile = profile_snn(snn, torch.tensor([[0.5, 1.0]]), 4, energy_models=[model, FP32_45NM])
    # 6 events x fan-out 3 = 18 SOPs; neuron adds 2*4 + 6 = 14, compares 8.
    e = profile.energy(model)
    assert e.snn_compute_pj == 0.5 * (18 + 14 + 8)
    assert e.snn_memory_pj == e.snn_compute_pj + 1.0 * (18 + 2 * 2 * 4)
    assert e.ann_compute_pj == 2.0 * 6
    assert e.qann_bits == 3
    assert e.qann_compute_pj == 0.5 * 3 * 6
    # dense part 0.5 * (2 neurons * 4 steps * 2); each unit of rate adds 0.5 * 4 * (2 subtracts + 6 synapses)
    assert e.break_even_rate == (9.0 - 8.0) / (0.5 * 4 * (2 + 6))
    text = profile.to_markdown()
    assert "test: MAC 2 pJ, add 0.5 pJ" in text
    assert "MAC 4.6 pJ, add 0.9 pJ" in text
    assert "compute-only" in text
    rows = list(csv.DictReader(io.StringIO(profile.to_csv())))
    assert [r["name"] for r in rows] == ["0", "1", "total"]
    assert float(rows[-1]["sop"]) == 18.0


def test_break_even_rate_balances_the_energies() -> None:
    torch.manual_seed(0)
    snn = _trace(IFNode(v_reset=None), nn.Linear(64, 256))
    profile = profile_snn(snn, torch.rand(8, 64) * 0.3, 16)
    e = profile.energy(FP32_45NM)
    n, t, d = 64, 16, 64 * 256
    uniform = FP32_45NM.add_pj * (2 * n * t + e.break_even_rate * t * (n + d))
    assert e.break_even_rate > 0
    assert uniform == pytest.approx(e.qann_compute_pj)


def test_bad_arguments() -> None:
    snn = _trace(IFNode(v_reset=None))
    with pytest.raises(TypeError, match=r"fx\.GraphModule"):
        profile_snn(nn.Sequential(IFNode()), torch.ones(1, 1), 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="time_steps"):
        profile_snn(snn, torch.ones(1, 1), 0)
    with pytest.raises(ValueError, match="mode"):
        profile_snn(snn, torch.ones(1, 1), 2, mode="fast")
    with pytest.raises(ValueError, match="labels"):
        profile_snn(snn, torch.ones(2, 1), 2, labels=torch.zeros(3))
    with pytest.raises(ValueError, match="T == time_steps"):
        profile_snn(snn, torch.ones(3, 1, 1), 2, mode="sequence")


@pytest.mark.parametrize("mode", MODES)
def test_analog_layer_after_neurons_counts_macs_every_step(mode: str) -> None:
    class AddBranches(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 1.0  # spikes plus a constant: not events

    snn = _trace(nn.Linear(2, 3), IFNode(v_reset=None), AddBranches(), nn.Linear(3, 5))
    row = _row(profile_snn(snn, torch.rand(4, 2), 6, mode=mode), "3")
    assert (row.role, row.mac, row.ann_mac, row.sop) == ("analog", 6 * 15.0, 15.0, 0.0)
    assert "not spike events" in row.source


def test_a_neuron_run_past_the_counter_raises_instead_of_miscounting() -> None:
    class Sneaky(nn.Module):
        spike_unit = 1.0

        def __call__(self, x: torch.Tensor) -> torch.Tensor:  # bypasses forward and every wrapped entry point
            return self.step(x)

        def step(self, x: torch.Tensor) -> torch.Tensor:
            return (x > 0).float()

    snn = trace_model(nn.Sequential(IFNode(), nn.Linear(2, 2)))
    snn.add_submodule("0", Sneaky())  # called by the graph, but never through forward
    with pytest.raises(RuntimeError, match="entry point"):
        profile_snn(snn, torch.ones(1, 2), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
def test_profile_and_diagnose_on_cuda_match_cpu(mode: str) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from ann2snn_fx import Converter
    from ann2snn_fx.analysis import diagnose

    torch.manual_seed(0)
    ann = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 16, 3)
    ).eval()
    x = torch.rand(8, 1, 8, 8)
    snn = Converter(DataLoader(TensorDataset(x), batch_size=8), progress=False).convert_to_spiking_neurons(
        ann
    )
    cpu = profile_snn(snn, x, 8, mode=mode)
    gpu_snn, gpu_x = snn.cuda(), x.cuda()
    gpu = profile_snn(gpu_snn, gpu_x, 8, mode=mode)
    for a, b in zip(cpu.layers, gpu.layers, strict=True):
        assert (a.name, a.role) == (b.name, b.role)
        assert [a.events_pos, a.silent_fraction, a.sop, a.mac] == pytest.approx(
            [b.events_pos, b.silent_fraction, b.sop, b.mac]
        )
    d = diagnose(ann.cuda(), gpu_snn, gpu_x, 4)
    assert d.layers[0].remainder < 1e-5


def test_overlapping_padded_pooling_and_conv1d_against_brute_force() -> None:
    torch.manual_seed(2)
    pool = nn.AvgPool2d(3, stride=2, padding=1)
    conv1d = nn.Conv1d(2, 3, 3, stride=2, padding=1)
    snn = _trace(nn.Conv2d(1, 2, 1), IFNode(v_reset=None), pool, nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    x = torch.rand(2, 1, 7, 7) * 1.5
    profile = profile_snn(snn, x, 5)
    with torch.no_grad():
        events = sum(_reference_if([snn.get_submodule("0")(x)] * 5))
    windows = torch.zeros(2, 7, 7)  # how many pooling windows hold each input, by looping over the windows
    for c, oy, ox in itertools.product(range(2), range(4), range(4)):
        for ky, kx in itertools.product(range(3), range(3)):
            iy, ix = oy * 2 - 1 + ky, ox * 2 - 1 + kx
            if 0 <= iy < 7 and 0 <= ix < 7:
                windows[c, iy, ix] += 1
    assert _row(profile, "4").sop == pytest.approx(float((events.sum(0) * windows * 3).sum()) / 2)

    snn1d = _trace(nn.Conv1d(1, 2, 1), IFNode(v_reset=None), conv1d)
    x1 = torch.rand(2, 1, 9) * 1.5
    with torch.no_grad():
        events1 = sum(_reference_if([snn1d.get_submodule("0")(x1)] * 4))
    fan = torch.zeros(2, 9)
    for _co, o, ci, k in itertools.product(range(3), range(5), range(2), range(3)):
        i = o * 2 - 1 + k
        if 0 <= i < 9:
            fan[ci, i] += 1
    row = _row(profile_snn(snn1d, x1, 4, mode="multi"), "2")
    assert row.sop == pytest.approx(float((events1.sum(0) * fan).sum()) / 2)
    assert row.synapses == float(fan.sum())

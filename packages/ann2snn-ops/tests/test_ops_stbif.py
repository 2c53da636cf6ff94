"""Quantizer and STBIFNeuron (SPEC 14.1): properties against a brute-force reference of the spec's step."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ann2snn_ops import Quantizer, STBIFNeuron, quantizer_bounds, set_streaming


def reference_stbif(x_seq: torch.Tensor, s: float, n_min: int, n_max: int) -> torch.Tensor:
    """The spec's step written out literally, element by element, in float64 and Python ints."""
    flat = x_seq.double().flatten(1)
    out = torch.zeros_like(flat)
    for i in range(flat.shape[1]):
        q, c = 0.5, 0
        for t in range(flat.shape[0]):
            q += float(flat[t, i]) / s
            spike = int(q >= 1 and c < n_max) - int(q < 0 and c > n_min)
            q -= spike
            c += spike
            out[t, i] = spike * s
    return out.reshape(x_seq.shape)


def impulse(x: torch.Tensor, steps: int) -> torch.Tensor:
    return torch.cat([x.unsqueeze(0), torch.zeros(steps - 1, *x.shape, dtype=x.dtype)])


@settings(max_examples=60, deadline=None)
@given(
    levels=st.sampled_from([2, 4, 8, 16, 32]),
    signed=st.booleans(),
    scale=st.floats(0.05, 3.0),
    values=st.lists(st.floats(-40.0, 40.0, allow_nan=False, width=32), min_size=1, max_size=12),
)
def test_impulse_sum_equals_quantizer(levels: int, signed: bool, scale: float, values: list[float]) -> None:
    q = Quantizer(levels, signed=signed, scale=scale)
    neuron = STBIFNeuron.from_quantizer(q)
    x = torch.tensor(values)
    steps = q.n_max - q.n_min + 1
    out = neuron(impulse(x, steps))
    counts = (out / neuron.scale).sum(0)
    assert torch.equal(counts, torch.floor(x / q.step.detach() + 0.5).clamp(q.n_min, q.n_max))
    # the step has 12 significant bits, so the running sum of spikes is count * step bit for bit
    assert torch.equal(out.cumsum(0)[-1], q(x).detach())
    assert torch.equal(neuron.scale, q.step.detach())
    assert set((out / neuron.spike_unit).unique().tolist()) <= {-1.0, 0.0, 1.0}
    # at most one spike per step, at most n_max - n_min steps spiking; quiet at the end
    assert not bool(neuron.activity[-1]) or steps == 1


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("ratio", [0.5, 1.5, -0.5, 2.5, -1.5, 0.499, -0.501])
def test_half_way_boundaries_round_half_up(signed: bool, ratio: float) -> None:
    s = 0.25
    q = Quantizer(16, signed=signed, scale=s)
    x = torch.tensor([ratio * s])
    n_min, n_max = quantizer_bounds(16, signed)
    expected = min(max(math.floor(ratio + 0.5), n_min), n_max) * s
    assert q(x).item() == expected
    assert STBIFNeuron.from_quantizer(q)(impulse(x, 17)).sum().item() == expected


@settings(max_examples=25, deadline=None)
@given(
    levels=st.sampled_from([4, 8, 16]),
    signed=st.booleans(),
    seed=st.integers(0, 2**16),
    steps=st.integers(1, 20),
)
def test_arbitrary_sequences_match_the_literal_step(levels: int, signed: bool, seed: int, steps: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, 3, 4, generator=gen, dtype=torch.float64) * (gen.seed() % 3 + 0.5)
    x[torch.rand(x.shape, generator=gen) < 0.3] = 0
    n_min, n_max = quantizer_bounds(levels, signed)
    neuron = STBIFNeuron(0.3, n_min, n_max)
    out = neuron(x)
    assert torch.allclose(out, reference_stbif(x, 0.3, n_min, n_max), atol=1e-12)
    # streaming gives the same, bit for bit, and the count is the integer sum of spikes
    set_streaming(neuron)
    steps_out = torch.stack([neuron(x[t]) for t in range(steps)])
    assert torch.equal(steps_out, out)
    assert neuron.count is not None
    assert neuron.count.dtype == torch.int64
    assert torch.equal(neuron.count, torch.round(out.sum(0) / 0.3).long())
    neuron.reset()
    assert neuron.count is None


def test_settled_count_is_the_quantised_sum() -> None:
    x = torch.randn(6, 50) * 2
    seq = torch.cat([x, torch.zeros(40, 50)])
    q = Quantizer(8, signed=True, scale=0.4)
    neuron = STBIFNeuron.from_quantizer(q)
    out = neuron(seq)
    assert torch.allclose(out.sum(0), q(x.sum(0)).detach(), atol=1e-6)
    last = int(torch.nonzero(neuron.activity).max())
    assert last < seq.shape[0] - 1  # it went quiet


def test_state_follows_device_and_dtype() -> None:
    neuron = STBIFNeuron(0.5, -4, 3)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        x = impulse(torch.tensor([1.3, -0.7, 0.2], dtype=dtype), 8)
        out = neuron(x)
        assert out.dtype == dtype
        assert out.sum(0).tolist() == [1.5, -0.5, 0.0]
    set_streaming(neuron)
    neuron(torch.ones(3, dtype=torch.float64))
    assert neuron._state["u"].dtype == torch.float64
    with pytest.raises(ValueError, match=r"state has shape \(3,\); call reset\(\)"):
        neuron(torch.ones(4, dtype=torch.float64))


def test_per_channel_scale_broadcasts() -> None:
    s = torch.tensor([0.5, 1.0, 2.0])
    neuron = STBIFNeuron(s, 0, 7)
    x = torch.tensor([[1.2, 1.2, 1.2]])
    out = neuron(impulse(x, 8))
    assert out.sum(0).tolist() == [[1.0, 1.0, 2.0]]
    assert torch.equal(neuron.spike_unit, s)


def test_step_is_rounded_to_12_significant_bits() -> None:
    q = Quantizer(16, scale=0.1)
    mantissa, _ = torch.frexp(q.step.detach())
    assert float(mantissa * 4096) == round(float(mantissa * 4096))
    assert abs(float(q.step) - 0.1) <= 0.1 * 2**-12
    q.step.backward()
    assert q.scale.grad is not None
    assert q.scale.grad.item() == 1.0  # straight through


def test_quantizer_lsq_gradients() -> None:
    q = Quantizer(4, scale=0.5)  # unsigned: n_min 0, n_max 3
    x = torch.tensor([-1.0, 0.3, 0.8, 5.0], requires_grad=True)
    y = q(x)
    assert y.tolist() == [0.0, 0.5, 1.0, 1.5]
    y.sum().backward()
    assert x.grad is not None
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    g = 1 / math.sqrt(3 * 4)
    # d/ds: bound outside the range, floor(x/s + 1/2) - x/s inside
    expected = (0 + (1 - 0.6) + (2 - 1.6) + 3) * g
    assert q.scale.grad is not None
    assert math.isclose(q.scale.grad.item(), expected, rel_tol=1e-6)
    # double backward works (plain differentiable ops)
    x2 = torch.tensor([0.3, 0.8], requires_grad=True)
    (gx,) = torch.autograd.grad(q(x2).pow(2).sum(), x2, create_graph=True)
    gx.sum().backward()


def test_quantizer_initialises_from_the_first_batch() -> None:
    q = Quantizer(16)
    assert not bool(q.initialized)
    x = torch.tensor([1.0, -3.0, 2.0, 0.0])
    q(x)
    assert bool(q.initialized)
    assert math.isclose(q.scale.item(), 2 * 1.5 / math.sqrt(15), rel_tol=1e-6)
    q(x * 100)  # not re-initialised
    assert math.isclose(q.scale.item(), 2 * 1.5 / math.sqrt(15), rel_tol=1e-6)
    state = q.state_dict()
    fresh = Quantizer(16)
    fresh.load_state_dict(state)
    assert bool(fresh.initialized)
    assert fresh.scale.item() == q.scale.item()
    with pytest.raises(ValueError, match="NaN or inf"):
        Quantizer(4)(torch.tensor([float("nan")]))


def test_errors_name_the_argument() -> None:
    with pytest.raises(TypeError, match="levels must be an integer, but got True"):
        Quantizer(True)
    with pytest.raises(ValueError, match="levels must be >= 2, but got 1"):
        Quantizer(1)
    with pytest.raises(TypeError, match="signed must be a bool"):
        Quantizer(4, signed=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"scale must be finite and > 0, but got -1\.0"):
        Quantizer(4, scale=-1.0)
    with pytest.raises(TypeError, match=r"floating-point input, but got dtype torch\.int64"):
        Quantizer(4, scale=1.0)(torch.tensor([1]))
    with pytest.raises(ValueError, match="n_min <= 0 <= n_max and n_min < n_max, but got n_min=1, n_max=3"):
        STBIFNeuron(1.0, 1, 3)
    with pytest.raises(TypeError, match=r"n_max must be an integer, but got 2\.5"):
        STBIFNeuron(1.0, 0, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expects an input sequence with shape \[T, \.\.\.\]"):
        STBIFNeuron(1.0, 0, 3)(torch.ones(3))
    with pytest.raises(RuntimeError, match="never set; calibrate first"):
        STBIFNeuron.from_quantizer(Quantizer(4))
    with pytest.raises(TypeError, match="expects a Quantizer, but got Linear"):
        STBIFNeuron.from_quantizer(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    # numpy and torch scalars are numbers
    import numpy as np

    assert Quantizer(np.int64(4), scale=np.float32(0.5)).n_max == 3
    assert STBIFNeuron(torch.tensor(0.5), np.int32(-2), 1).spike_unit == 0.5


def test_docstring_examples() -> None:
    import doctest

    import ann2snn_ops.stbif

    result = doctest.testmod(ann2snn_ops.stbif, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0

"""IFNode and reset_net: the reference semantics, v_init, validation, multi-step, gradients."""

import math

import pytest
import torch
from torch import nn

from ann2snn_fx import IFNode, SigmoidSurrogate, reset_net

SEQUENCE = [0.6, 0.6, 0.6, 2.5, 0.0]


def _run(node: IFNode, values: list[float]) -> list[float]:
    return [node(torch.tensor([v])).item() for v in values]


def test_soft_reset_sequence_and_residual() -> None:
    node = IFNode(v_threshold=1.0, v_reset=None)
    assert _run(node, SEQUENCE) == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert isinstance(node.v, torch.Tensor)
    torch.testing.assert_close(node.v, torch.tensor([1.3]))


def test_hard_reset_sequence() -> None:
    node = IFNode(v_threshold=1.0, v_reset=0.0)
    assert _run(node, SEQUENCE) == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert node.v.item() == 0.0


def test_default_is_hard_reset_to_zero() -> None:
    node = IFNode()
    assert node.v_reset == 0.0
    assert node.v == 0.0


def test_spike_exactly_at_threshold() -> None:
    node = IFNode(v_threshold=0.5, v_reset=None)
    assert node(torch.tensor([0.5])).item() == 1.0
    assert node.v.item() == 0.0


def test_tensor_threshold_assigned_after_construction() -> None:
    node = IFNode(v_reset=None)
    node.v_threshold = torch.tensor(2.0)
    assert _run(node, [1.5, 1.5, 1.5, 0.0]) == [0.0, 1.0, 1.0, 0.0]
    torch.testing.assert_close(node.v, torch.tensor([0.5]))


def test_int_and_tensor_thresholds_accepted() -> None:
    assert IFNode(v_threshold=2).v_threshold == 2.0
    assert IFNode(v_threshold=torch.tensor(3.0)).v_threshold == 3.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"v_threshold": 0.0}, ValueError, "v_threshold must be positive"),
        ({"v_threshold": -1.0}, ValueError, "v_threshold must be positive"),
        ({"v_threshold": float("inf")}, ValueError, "v_threshold must be finite"),
        ({"v_threshold": float("nan")}, ValueError, "v_threshold must be finite"),
        ({"v_threshold": True}, TypeError, "bool"),
        ({"v_threshold": "1"}, TypeError, "v_threshold must be an int"),
        ({"v_threshold": torch.ones(2)}, TypeError, "0-dim"),
        ({"v_reset": "0"}, TypeError, "v_reset must be an int"),
        ({"v_init": float("nan")}, ValueError, "v_init must be finite"),
        ({"detach_reset": 1}, TypeError, "detach_reset must be a bool"),
        ({"step_mode": "x"}, ValueError, "step_mode must be 's' or 'm'"),
        ({"backend": "cupy"}, ValueError, "backend must be 'torch'"),
        ({"store_v_seq": 1}, TypeError, "store_v_seq must be a bool"),
        ({"surrogate_function": 3}, TypeError, "surrogate_function must be callable"),
    ],
)
def test_constructor_validation(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        IFNode(**kwargs)


def test_v_init_starts_and_reset_restores() -> None:
    node = IFNode(v_reset=None, v_init=0.5)
    assert node.v == 0.5
    assert _run(node, [0.6, 0.6]) == [1.0, 0.0]
    node.reset()
    assert node.v == 0.5
    assert _run(node, [0.6]) == [1.0]


def test_v_init_rounds_the_rate() -> None:
    # Constant input a in [0, 1]: n = floor(T * a + v_init) spikes in T steps.
    torch.manual_seed(0)
    a = torch.rand(1000)
    for v_init, expected in ((0.0, torch.floor(4 * a)), (0.5, torch.floor(4 * a + 0.5))):
        node = IFNode(v_reset=None, v_init=v_init)
        total = sum(node(a) for _ in range(4))
        torch.testing.assert_close(total, expected)


def test_shape_change_reinitialises_from_v_init() -> None:
    node = IFNode(v_reset=None, v_init=0.25)
    node(torch.full((2, 3), 0.5))
    out = node(torch.full((4,), 0.5))
    assert out.shape == (4,)
    torch.testing.assert_close(node.v, torch.full((4,), 0.75))


def test_dtype_change_converts_state() -> None:
    node = IFNode(v_reset=None)
    node(torch.tensor([0.6]))
    out = node(torch.tensor([0.6], dtype=torch.float64))
    assert out.dtype == torch.float64
    assert out.item() == 1.0


def test_reset_returns_to_scalar() -> None:
    node = IFNode(v_reset=None)
    node(torch.ones(3))
    node.reset()
    assert node.v == 0.0
    assert isinstance(node.v, float)


@pytest.mark.parametrize("v_reset", [None, 0.0, -0.2])
def test_multi_step_equals_single_step_loop(v_reset: float | None) -> None:
    torch.manual_seed(1)
    x_seq = torch.rand(6, 3, 4) * 1.5
    single = IFNode(v_reset=v_reset, v_init=0.3)
    expected = torch.stack([single(x) for x in x_seq])
    multi = IFNode(v_reset=v_reset, v_init=0.3, step_mode="m", store_v_seq=True)
    out = multi(x_seq)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(multi.v, single.v)
    assert multi.v_seq is not None
    assert multi.v_seq.shape == x_seq.shape
    torch.testing.assert_close(multi.v_seq[-1], single.v)


@pytest.mark.parametrize("v_init", [None, 0.5])
def test_multi_step_inference_fast_path_equals_loop(v_init: float | None) -> None:
    torch.manual_seed(2)
    x_seq = torch.rand(5, 2, 3) * 1.5
    single = IFNode(v_reset=None, v_init=v_init).eval()
    multi = IFNode(v_reset=None, v_init=v_init, step_mode="m").eval()
    with torch.no_grad():
        expected = torch.stack([single(x) for x in x_seq])
        out = multi(x_seq)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(multi.v, single.v)
        torch.testing.assert_close(
            multi(x_seq), torch.stack([single(x) for x in x_seq])
        )  # state carries over


def test_multi_step_rejects_empty_time() -> None:
    with pytest.raises(ValueError, match="non-empty leading time dimension"):
        IFNode(step_mode="m")(torch.zeros(0, 2))


def test_forward_rejects_non_tensor() -> None:
    with pytest.raises(TypeError, match="expects a tensor"):
        IFNode()(1.0)  # type: ignore[arg-type]


def test_training_mode_same_values_and_surrogate_gradient() -> None:
    x = torch.tensor([0.2, 0.9, 1.4], requires_grad=True)
    train_node = IFNode(v_reset=None).train()
    eval_node = IFNode(v_reset=None).eval()
    spikes = train_node(x)
    torch.testing.assert_close(spikes, eval_node(x.detach()))
    spikes.sum().backward()
    sig = torch.sigmoid(4.0 * (x.detach() - 1.0))
    torch.testing.assert_close(x.grad, 4.0 * sig * (1 - sig))


def test_detach_reset_blocks_reset_gradient() -> None:
    x = torch.tensor([1.5], requires_grad=True)
    node = IFNode(v_reset=None, detach_reset=True).train()
    node(x)
    v = node.v
    assert isinstance(v, torch.Tensor)
    v.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(1))


def test_eval_grad_enabled_stays_differentiable() -> None:
    x = torch.tensor([0.7], requires_grad=True)
    node = IFNode(v_reset=None).eval()
    node(x)
    node(x)
    assert isinstance(node.v, torch.Tensor)
    assert node.v.requires_grad


def test_extra_repr_matches_reference_and_shows_v_init() -> None:
    assert IFNode(v_reset=None).extra_repr() == (
        "v_threshold=1.0, v_reset=None, detach_reset=False, step_mode=s, backend=torch"
    )
    assert IFNode(v_reset=None, v_init=0.5).extra_repr().endswith(", v_init=0.5")


def test_sigmoid_surrogate_validation_and_repr() -> None:
    assert SigmoidSurrogate(2.0).extra_repr() == "alpha=2.0"
    with pytest.raises(TypeError, match="alpha must be a finite real number"):
        SigmoidSurrogate(math.inf)


def test_reset_net_resets_only_that_model() -> None:
    a = nn.Sequential(nn.Identity(), IFNode(v_reset=None))
    b = nn.Sequential(IFNode(v_reset=None))
    a(torch.full((2,), 0.4))
    b(torch.full((2,), 0.4))
    reset_net(a)
    assert a[1].v == 0.0
    assert isinstance(b[0].v, torch.Tensor)


def test_reset_net_calls_callable_reset_only() -> None:
    class Odd(nn.Module):
        reset = 3  # not callable: must be ignored

    reset_net(nn.Sequential(Odd(), IFNode()))
    with pytest.raises(TypeError, match=r"expects an nn\.Module"):
        reset_net("net")  # type: ignore[arg-type]

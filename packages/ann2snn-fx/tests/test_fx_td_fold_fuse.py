"""TDTimeFolded's per-module dispatch cache: a checked leaf module later runs as one TD function."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ann2snn_fx.td import TDEquivalenceError, TDTimeFolded
from ann2snn_fx.td.fold_fuse import _FusedForward


class RMSNorm(nn.Module):
    """A leaf module of several TD ops (as Llama's RMSNorm: float32 statistics, weight after)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32) if x.dtype == torch.float32 else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * torch.tanh(h.to(x.dtype)) + 0.5


class Net(nn.Module):
    def __init__(self, norm: nn.Module, width: int = 6) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = norm
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.fc(x)) + x)


def _check(snn: TDTimeFolded, ann: nn.Module, x: torch.Tensor, tol: float) -> torch.Tensor:
    out = snn(x)
    refs = ann(x.cumsum(0).flatten(0, 1)).unflatten(0, x.shape[:2])
    torch.testing.assert_close(out.cumsum(0), refs, atol=tol, rtol=tol)
    return out


def _plans(snn: TDTimeFolded, name: str = "norm") -> dict[tuple[object, ...], object]:
    forward = vars(snn.model.get_submodule(name)).get("forward")
    assert isinstance(forward, _FusedForward)
    return forward.plans


@pytest.mark.parametrize("autograd", [False, True])
def test_checked_then_fused_calls_equal_the_ann_and_report_the_same(autograd: bool) -> None:
    torch.manual_seed(0)
    ann = Net(RMSNorm(6)).eval()
    snn = TDTimeFolded(ann, strict=True)
    x = torch.randn(4, 3, 5, 6)
    with torch.set_grad_enabled(autograd):
        _check(
            snn, ann, x, 1e-5
        )  # the first call per input signature is the shape probe's: every op recorded
        assert _plans(snn) == {}
        first = _check(snn, ann, x, 1e-5)
        report = [(r.op, r.detail) for r in snn.report.converted]
        assert any("TDMul" in detail for _, detail in report)  # the checked call ran op by op
        assert [plan is not None for plan in _plans(snn).values()] == [True]
        second = _check(snn, ann, x, 1e-5)  # fused: diff(norm(cumsum(x)))
    assert [(r.op, r.detail) for r in snn.report.converted] == report
    torch.testing.assert_close(second, first, atol=1e-5, rtol=1e-5)
    # the leaf linear layers keep their own forward (nothing to fuse in one op)
    assert "forward" not in vars(snn.model.fc)
    if autograd:  # gradients reach the fused module's weight as they reach the ANN's
        second.sum().backward()
        ann(x.cumsum(0)[-1]).sum().backward()  # the differences sum to the last cumulative step
        assert snn.model.norm.weight.grad is not None
        torch.testing.assert_close(snn.model.norm.weight.grad, ann.norm.weight.grad, atol=1e-4, rtol=1e-4)


def test_the_cache_is_keyed_by_input_metadata() -> None:
    # shape, T, dtype, autograd and the training flag each get their own checked call; every result is exact
    torch.manual_seed(0)
    ann = Net(RMSNorm(6)).eval()
    snn = TDTimeFolded(ann, strict=True)
    inputs = [torch.randn(4, 2, 6), torch.randn(7, 2, 6), torch.randn(4, 3, 6), torch.randn(4, 2, 6)]
    for _ in range(2):
        for x in inputs:
            with torch.no_grad():
                _check(snn, ann, x, 1e-5)
    assert len(_plans(snn)) == 3  # [4*2], [7*2], [4*3] folded batches
    with torch.no_grad():
        snn.double()
        ann.double()
        _check(snn, ann, inputs[0].double(), 1e-10)
        _check(snn, ann, inputs[0].double(), 1e-10)
    _check(snn, ann, inputs[0].double(), 1e-10)  # autograd records: another key
    snn.train()
    ann.train()
    for _ in range(3):  # the training flag: a new probe signature, then checked, then fused
        _check(snn, ann, inputs[0].double(), 1e-10)
    assert len(_plans(snn)) == 6
    assert all(plan is not None for plan in _plans(snn).values())


class InPlace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x) * 2.0
        F.relu(y, inplace=True)
        return y * x


class Keeps(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = torch.tanh(x)  # an attribute rebound at every call: others may read it
        return self.last * x


class Breaks(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x).softmax(0) * x  # softmax over the folded batch: reported


@pytest.mark.parametrize("make", [InPlace, Keeps])
def test_modules_that_are_not_pure_stay_op_by_op(make: Callable[[], nn.Module]) -> None:
    torch.manual_seed(0)
    ann = Net(make()).eval()
    snn = TDTimeFolded(ann, strict=True)
    x = torch.randn(4, 2, 6)
    with torch.no_grad():
        for _ in range(3):
            _check(snn, ann, x, 1e-5)
    assert list(_plans(snn).values()) == [None]


def test_a_reported_module_is_reported_at_every_call() -> None:
    torch.manual_seed(0)
    snn = TDTimeFolded(Net(Breaks()).eval(), strict=True)
    x = torch.randn(4, 2, 6)
    for _ in range(3):
        with pytest.raises(TDEquivalenceError, match="softmax"):
            snn(x)
    assert list(_plans(snn).values()) == [None]


def test_fused_modules_survive_deepcopy_and_plain_calls() -> None:
    torch.manual_seed(0)
    ann = Net(RMSNorm(6)).eval()
    snn = TDTimeFolded(ann, strict=True)
    x = torch.randn(4, 2, 6)
    with torch.no_grad():
        snn(x)
        snn(x)
        twin = copy.deepcopy(snn)
        twin.model.norm.weight.mul_(2.0)  # the copy's fused forward runs the copy's module
        ann.norm.weight.mul_(2.0)
        _check(twin, ann, x, 1e-5)
        ann.norm.weight.div_(2.0)
        _check(snn, ann, x, 1e-5)
        # outside a TDTimeFolded forward the module is the ANN's
        flat = x.flatten(0, 1)
        torch.testing.assert_close(snn.model(flat), ann(flat))


transformers = pytest.importorskip("transformers")


def _hf(name: str) -> nn.Module:
    if name == "llama":  # RMSNorm in float32, the fused leaf; grouped-query attention
        config = transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            max_position_embeddings=32,
        )
        return transformers.LlamaModel(config).eval()
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    return transformers.GPT2Model(config).double().eval()  # its tanh-GELU module: pow, tanh, products


@pytest.mark.parametrize("autograd", [False, True])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hugging_face_models_with_fused_leaves_equal_the_ann(name: str, autograd: bool) -> None:
    torch.manual_seed(0)
    model = _hf(name)
    dtype = next(model.parameters()).dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    snn = TDTimeFolded(model, time_inputs={"inputs_embeds"}, strict=True)
    reports = []
    # probed (the first call per input signature), probed (another T), checked, checked, fused, fused
    for steps in (3, 5, 3, 5, 3, 5):
        x = torch.randn(steps, 2, 6, 32, dtype=dtype)
        with torch.set_grad_enabled(autograd):
            out = snn(inputs_embeds=x, use_cache=False).last_hidden_state
            refs = [model(inputs_embeds=c, use_cache=False).last_hidden_state for c in x.cumsum(0)]
        for t, ref in enumerate(refs):
            torch.testing.assert_close(out.cumsum(0)[t], ref, atol=tol, rtol=tol)
        reports.append(sorted((r.op, r.detail) for r in snn.report.converted))
    assert reports[0] == reports[2] == reports[4]
    assert reports[1] == reports[3] == reports[5]
    fused = [
        m
        for m in snn.model.modules()
        if isinstance(vars(m).get("forward"), _FusedForward) and any(vars(m)["forward"].plans.values())
    ]
    assert fused  # the RMS norms / the GELU modules


class LiteralBatch(nn.Module):
    """A fusable leaf, then a reshape with a literal batch size (B = 2) that only the shape probe finds."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = RMSNorm(6)

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return (self.norm(x) * scale).view(2, -1)


def test_the_shape_probe_sees_every_op_of_a_fused_leaf() -> None:
    # a new input signature (another scale) probes again, after the leaf fused for this input shape: both
    # probe runs record the leaf's ops, so the literal-batch view after it is still found
    torch.manual_seed(0)
    snn = TDTimeFolded(LiteralBatch().eval())
    x = torch.randn(2, 2, 6)
    for scale in (1.0, 1.0, 1.0, 2.0):
        with torch.no_grad():
            snn(x, scale)
        assert any("literal batch size" in r.detail for r in snn.report.issues), scale
    assert [plan is not None for plan in _plans(snn).values()] == [True]


def test_the_verdicts_kept_per_module_are_bounded() -> None:
    from ann2snn_fx.td.fold_fuse import _PLANS

    torch.manual_seed(0)
    ann = Net(RMSNorm(6)).eval()
    snn = TDTimeFolded(ann, strict=True, shape_check=False)
    with torch.no_grad():
        for batch in range(1, _PLANS + 3):
            _check(snn, ann, torch.randn(2, batch, 6), 1e-5)
    plans = _plans(snn)
    assert len(plans) == _PLANS
    assert next(iter(plans))[0] == (2 * 3, 6)  # batches 1 and 2 were forgotten first

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


def _plans(snn: TDTimeFolded, name: str = "") -> dict[tuple[object, ...], object]:
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
    # the whole model fused (outermost first): its inner modules were run op by op in its checked call,
    # never checked themselves, and not called since
    assert _plans(snn, "norm") == {}
    assert _plans(snn, "fc") == {}
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


_SMALL = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 48,
    "max_position_embeddings": 32,
}
"""The size of every small Hugging Face model below (GPT-2 names its sizes differently)."""


def _hf(name: str) -> nn.Module:
    """A randomly initialised Hugging Face model of hidden size 32."""
    if name == "bert":
        return transformers.BertModel(transformers.BertConfig(**_SMALL)).eval()
    if name == "llama":  # RMSNorm in float32, the fused leaf; grouped-query attention
        return transformers.LlamaModel(transformers.LlamaConfig(**_SMALL, num_key_value_heads=2)).eval()
    if name == "mistral":  # a sliding window shorter than the tokens: DynamicSlidingWindowLayer caches
        config = transformers.MistralConfig(**_SMALL, num_key_value_heads=2, sliding_window=3)
        return transformers.MistralModel(config).eval()
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
    assert [plan is not None for plan in _plans(snn, "norm").values()] == [True]
    assert [plan is not None for plan in _plans(snn).values()] == [False]  # its output is [2, ...]


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
    assert next(iter(plans))[3][1] == (2 * 3, 6)  # batches 1 and 2 were forgotten first


# ---- non-leaf modules: a whole layer, a whole model, run as one TD function --------------------------------


def _fused_names(snn: TDTimeFolded) -> list[str]:
    """The modules with a fusing verdict (outermost first in the model's order)."""
    return [
        name
        for name, m in snn.model.named_modules()
        if isinstance(vars(m).get("forward"), _FusedForward)
        and any(plan is not None for plan in vars(m)["forward"].plans.values())
    ]


@pytest.mark.parametrize("autograd", [False, True])
@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_whole_hugging_face_models_fuse_and_equal_the_op_by_op_run_and_the_ann(
    name: str, autograd: bool
) -> None:
    torch.manual_seed(0)
    model, width = _hf(name), 32
    dtype = next(model.parameters()).dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding (a decoder) / padding (BERT)
    snn = TDTimeFolded(model, time_inputs={"inputs_embeds"}, strict=True)
    x = torch.randn(4, 2, 6, width, dtype=dtype, requires_grad=autograd)
    outs, reports, grads = [], [], []
    # probed, checked (op by op: the reference for the fused calls), fused, fused
    for _ in range(4):
        with torch.set_grad_enabled(autograd):
            out = snn(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
            refs = [
                model(inputs_embeds=c, attention_mask=mask, use_cache=False).last_hidden_state
                for c in x.detach().cumsum(0)
            ]
        for t, ref in enumerate(refs):
            torch.testing.assert_close(out.cumsum(0)[t], ref, atol=tol, rtol=tol)
        outs.append(out.detach())
        reports.append(sorted((r.op, r.detail) for r in snn.report.converted))
        if autograd:
            x.grad = None
            snn.zero_grad()
            (out * torch.linspace(0, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
            grads.append([x.grad.clone(), *(p.grad.clone() for p in snn.parameters() if p.grad is not None)])
    assert _fused_names(snn) == [""]  # the whole model, outermost first; its layers never checked alone
    for out, report in zip(outs[2:], reports[2:], strict=True):
        torch.testing.assert_close(out, outs[1], atol=tol, rtol=tol)
        assert report == reports[1]
    for grad in grads[2:]:  # gradients of the fused calls equal the op-by-op call's
        assert len(grad) == len(grads[1])
        for got, want in zip(grad, grads[1], strict=True):
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def _kv(cache: object) -> list[torch.Tensor]:
    """The key and value tensors of a transformers cache, layer by layer."""
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]  # type: ignore[attr-defined]


def _cumulative(td: torch.Tensor, steps: int) -> torch.Tensor:
    """The running sum over the steps of a folded [T*B, ...] TD tensor, folded again."""
    return td.unflatten(0, (steps, -1)).cumsum(0).flatten(0, 1)


@pytest.mark.parametrize("autograd", [False, True])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_decoders_returning_their_key_value_cache_fuse_whole_and_equal_op_by_op_and_the_ann(
    name: str, autograd: bool
) -> None:
    # use_cache=True (the default): the DynamicCache made in the forward is passed to every layer and
    # returned; the whole model fuses and its cache holds the TD-form keys and values of the op-by-op run
    torch.manual_seed(0)
    model = _hf(name)
    dtype = next(model.parameters()).dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    snn = TDTimeFolded(model, time_inputs={"inputs_embeds"}, strict=True)
    steps = 3
    x = torch.randn(steps, 2, 5, 32, dtype=dtype, requires_grad=autograd)
    with torch.no_grad():
        ref = model(
            inputs_embeds=x.detach().cumsum(0).flatten(0, 1), use_cache=True
        )  # per sample: every step
    outs, caches, grads = [], [], []
    for _ in range(4):  # probed, checked (op by op: the reference for the fused calls), fused, fused
        with torch.set_grad_enabled(autograd):
            out = snn(inputs_embeds=x, use_cache=True)
        hidden, kv = out.last_hidden_state, _kv(out.cache)
        assert len(kv) == 4
        assert all(t.shape[0] == steps * 2 for t in kv)
        torch.testing.assert_close(hidden.cumsum(0).flatten(0, 1), ref.last_hidden_state, atol=tol, rtol=tol)
        for got, want in zip(kv, _kv(ref.cache), strict=True):
            torch.testing.assert_close(_cumulative(got, steps), want, atol=tol, rtol=tol)
        outs.append(hidden.detach())
        caches.append([t.detach() for t in kv])
        if autograd:
            x.grad = None
            snn.zero_grad()
            (hidden.sum() + sum(t.sum() for t in kv)).backward()
            grads.append([x.grad.clone(), *(p.grad.clone() for p in snn.parameters() if p.grad is not None)])
    assert _fused_names(snn) == [""]  # the whole model; its layers never checked alone, not called since
    assert not any(_plans(snn, n) for n, m in snn.model.named_modules() if n.endswith((".0", ".1")))
    for out, kv in zip(outs[2:], caches[2:], strict=True):
        torch.testing.assert_close(out, outs[1], atol=tol, rtol=tol)
        for got, want in zip(kv, caches[1], strict=True):
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    for grad in grads[2:]:  # gradients through the fused call's cache equal the op-by-op call's
        assert len(grad) == len(grads[1])
        for got, want in zip(grad, grads[1], strict=True):
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_a_cache_passed_back_continues_the_sequence_exactly_and_fuses(name: str) -> None:
    # the next tokens with the cache the previous forward returned (TD form, [T*B, ...]): the past keys and
    # values are time-varying, so the result is the ANN's with its own cache on the cumulative inputs
    torch.manual_seed(0)
    model = _hf(name)
    snn = TDTimeFolded(model, time_inputs={"inputs_embeds"}, strict=True)
    steps = 3
    first, second = torch.randn(steps, 2, 5, 32), torch.randn(steps, 2, 2, 32)
    with torch.no_grad():
        ref = model(inputs_embeds=first.cumsum(0).flatten(0, 1))
        ref = model(inputs_embeds=second.cumsum(0).flatten(0, 1), cache=ref.cache)
        for _ in range(4):
            cache = snn(inputs_embeds=first).cache
            out = snn(inputs_embeds=second, cache=cache)
            assert out.cache is cache  # updated in place, as the ANN does
            assert all(t.shape[0] == steps * 2 for t in _kv(cache))
            torch.testing.assert_close(
                out.last_hidden_state.cumsum(0).flatten(0, 1), ref.last_hidden_state, atol=1e-4, rtol=1e-4
            )
            for got, want in zip(_kv(cache), _kv(ref.cache), strict=True):
                torch.testing.assert_close(_cumulative(got, steps), want, atol=1e-4, rtol=1e-4)
    plans = _plans(snn)
    assert len(plans) == 2
    assert all(plan is not None for plan in plans.values())


def test_a_cache_not_from_the_folded_path_is_refused() -> None:
    # the ANN's own cache holds [B, ...] keys: not a TD sequence of this [T, B]
    torch.manual_seed(0)
    model = _hf("llama")
    snn = TDTimeFolded(model, time_inputs={"inputs_embeds"}, strict=True)
    with torch.no_grad():
        cache = model(inputs_embeds=torch.randn(2, 5, 32)).cache
        with pytest.raises(ValueError, match=r"cache 'cache' holds, in layer 0, a float32 tensor of shape"):
            snn(inputs_embeds=torch.randn(3, 2, 1, 32), cache=cache)


def test_a_cache_of_an_unknown_class_keeps_its_users_op_by_op() -> None:
    # a cache class the folded path does not know (here a subclass): the model and its layers, which take
    # it, stay op by op (exact); the MLP blocks, which do not, fuse
    from transformers.cache_utils import DynamicCache

    class OwnCache(DynamicCache):
        pass

    torch.manual_seed(0)
    model = _hf("llama")
    snn = TDTimeFolded(model, time_inputs={"inputs_embeds"}, strict=True)
    x = torch.randn(3, 2, 5, 32)
    with torch.no_grad():
        ref = model(inputs_embeds=x.cumsum(0).flatten(0, 1), cache=OwnCache())
        for _ in range(4):
            out = snn(inputs_embeds=x, cache=OwnCache())
            torch.testing.assert_close(
                out.last_hidden_state.cumsum(0).flatten(0, 1), ref.last_hidden_state, atol=1e-4, rtol=1e-4
            )
            for got, want in zip(_kv(out.cache), _kv(ref.cache), strict=True):
                torch.testing.assert_close(_cumulative(got, 3), want, atol=1e-4, rtol=1e-4)
    names = _fused_names(snn)
    assert "" not in names
    assert not any(n.endswith(("layers.0", "layers.1")) for n in names)
    assert any(n.endswith("mlp") for n in names)


class Block(nn.Module):
    """A non-leaf module with a time input, a static mask, a plain flag changing control flow and a tuple
    output."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = RMSNorm(width)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, *, squash: bool = True, scale: float = 1.0
    ) -> tuple[torch.Tensor, None]:
        h = self.fc(x) * scale
        h = torch.tanh(h) if squash else torch.sigmoid(h)
        return self.norm(h.masked_fill(mask, 0.0)) + x, None


class Outer(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.out = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, squash: bool = True) -> torch.Tensor:
        h, _ = self.block(x, mask, squash=squash, scale=0.5)
        return self.out(h)


def _outer_refs(ann: nn.Module, x: torch.Tensor, mask: torch.Tensor, squash: bool) -> torch.Tensor:
    return torch.stack([ann(c, mask, squash) for c in x.cumsum(0)])


def test_a_plain_argument_that_changes_control_flow_gets_its_own_entry() -> None:
    torch.manual_seed(0)
    ann = Outer(Block()).eval()
    snn = TDTimeFolded(ann, strict=True)
    x = torch.randn(4, 2, 5, 6)
    mask = torch.rand(2, 5, 1) < 0.3
    with torch.no_grad():
        for squash in (True, False, True, False, True, False):
            for _ in range(3):
                out = snn(x, mask, squash)
                torch.testing.assert_close(
                    out.cumsum(0), _outer_refs(ann, x, mask, squash), atol=1e-5, rtol=1e-5
                )
    plans = _plans(snn)
    assert len(plans) == 2
    assert all(plan is not None for plan in plans.values())
    flags = {key: next(part[1] for part in key[3:] if part[0] == 2) for key in plans}  # argument 2: squash
    assert sorted(flags.values()) == [(bool, False), (bool, True)]  # the flag is in the key
    # each plan counts the nonlinearities of its own branch, as the op-by-op call did
    for key, plan in plans.items():
        assert (("torch.sigmoid", "-> TDFunction") in plan) is (flags[key] == (bool, False))


class StaticOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.block(x, mask)[0], mask.float() * 2.0  # a static tensor output


def test_a_module_with_a_static_tensor_output_is_not_fused() -> None:
    torch.manual_seed(0)
    ann = StaticOut().eval()
    snn = TDTimeFolded(ann, strict=True)
    x = torch.randn(4, 2, 5, 6)
    mask = (torch.rand(2, 5, 1) < 0.3).unsqueeze(0).expand(4, 2, 5, 1).flatten(0, 1)  # folded already
    with torch.no_grad():
        for _ in range(4):
            out, static = snn(x, mask)
            refs = [ann(c, mask[:2]) for c in x.cumsum(0)]
            torch.testing.assert_close(out.cumsum(0), torch.stack([r[0] for r in refs]), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(static.cumsum(0), torch.stack([r[1] for r in refs]))
    assert list(_plans(snn).values()) == [None]
    assert [plan is not None for plan in _plans(snn, "block").values()] == [True]  # the block inside fuses


def test_a_module_with_a_hook_inside_is_not_fused_and_the_hook_sees_every_call() -> None:
    torch.manual_seed(0)
    ann = Outer(Block()).eval()
    snn = TDTimeFolded(ann, strict=True)
    calls = []
    snn.model.block.norm.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    x = torch.randn(4, 2, 5, 6)
    mask = torch.rand(2, 5, 1) < 0.3
    with torch.no_grad():
        for _ in range(4):
            out = snn(x, mask)
            torch.testing.assert_close(out.cumsum(0), _outer_refs(ann, x, mask, True), atol=1e-5, rtol=1e-5)
    assert len(calls) == 4  # (the shape probe is skipped while hooks watch)
    # neither the model nor the block; the hooked leaf itself may (its hook sees the same call and output)
    assert _fused_names(snn) == ["block.norm"]
    assert _plans(snn) == {}
    assert _plans(snn, "block") == {}


@pytest.mark.parametrize("autograd", [False, True])
@pytest.mark.parametrize("masks", ["padding", "causal"])
def test_nn_transformer_encoder_fuses_whole_and_equals_the_ann(masks: str, autograd: bool) -> None:
    # the folded nn.MultiheadAttention inside a fused call: the TD operator on the cumulative inputs
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)  # dropout 0.1, inactive in eval
    ann = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    snn = TDTimeFolded(ann, strict=True, time_inputs={0})  # (a float causal mask is static)
    x = torch.randn(4, 2, 5, 16, requires_grad=autograd)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, -2:] = True
    kwargs = (
        {"src_key_padding_mask": pad}
        if masks == "padding"
        else {"mask": nn.Transformer.generate_square_subsequent_mask(5), "is_causal": True}
    )
    outs, grads = [], []
    for _ in range(4):  # probed, checked, fused, fused
        with torch.set_grad_enabled(autograd):
            out = snn(x, **kwargs)
            with torch.no_grad():
                ref = torch.stack([ann(c, **kwargs) for c in x.detach().cumsum(0)])
        torch.testing.assert_close(out.cumsum(0), ref, atol=1e-4, rtol=1e-4)
        outs.append(out.detach())
        if autograd:
            x.grad = None
            snn.zero_grad()
            (out * torch.linspace(0, 1, out.numel()).view_as(out)).sum().backward()
            grads.append([x.grad.clone(), *(p.grad.clone() for p in snn.parameters() if p.grad is not None)])
    assert _fused_names(snn) == [""]
    assert any("TDMultiheadAttention" in r.detail for r in snn.report.converted)
    for out in outs[2:]:
        torch.testing.assert_close(out, outs[1], atol=1e-5, rtol=1e-5)
    for grad in grads[2:]:
        assert len(grad) == len(grads[1])
        for got, want in zip(grad, grads[1], strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


class MaskedAttention(nn.Module):
    """An nn.MultiheadAttention given a per-sample 3-D mask ``[B*H, L, S]`` (one step's, not repeated)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h, _ = self.attn(x, x, x, key_padding_mask=pad, attn_mask=mask, need_weights=False)
        return self.norm(h + x)


def test_a_fused_call_applies_one_steps_attention_mask_at_every_step() -> None:
    torch.manual_seed(0)
    ann = MaskedAttention().eval()
    snn = TDTimeFolded(ann, strict=True, time_inputs={0})
    x = torch.randn(4, 2, 5, 8)
    mask = torch.randn(2 * 2, 5, 5)  # [B*H, L, S]: not the batch as leading dim, so not repeated
    pad = torch.zeros(2, 5)  # additive, as the mask (a [B, S] static input: repeated over the steps)
    pad[0, -1] = float("-inf")
    with torch.no_grad():
        for _ in range(4):  # probed, checked, fused, fused
            out = snn(x, mask, pad)
            ref = torch.stack([ann(c, mask, pad) for c in x.cumsum(0)])
            torch.testing.assert_close(out.cumsum(0), ref, atol=1e-5, rtol=1e-5)
    assert _fused_names(snn) == [""]


class BatchIndex(nn.Module):
    """Adds a tensor built from the folded batch's size (it differs between the steps of the folded batch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = torch.arange(x.shape[0], dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return torch.tanh(x) * 2.0 + index


def test_a_static_tensor_that_differs_between_steps_keeps_a_module_op_by_op() -> None:
    # op by op, a constant on the folded batch is taken as repeated over the steps (its first step used,
    # the ANN's value); a fused call would add each step's rows instead
    torch.manual_seed(0)
    ann = Net(BatchIndex()).eval()
    snn = TDTimeFolded(ann, strict=True)
    x = torch.randn(4, 2, 6)
    with torch.no_grad():
        for _ in range(4):  # the ANN on each step's cumulative input (not on the folded batch: other indices)
            ref = torch.stack([ann(c) for c in x.cumsum(0)])
            torch.testing.assert_close(snn(x).cumsum(0), ref, atol=1e-5, rtol=1e-5)
    assert _fused_names(snn) == []

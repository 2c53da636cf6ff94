"""SpikeZIP end to end: the SNN's settled cumulative output equals the QANN's, fed by spikes only."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ann2snn_fx import QANN, calibrate_qann, prepare_qann, qann_to_snn
from ann2snn_ops import Quantizer, STBIFNeuron, TDMatMul, TDMul

transformers = pytest.importorskip("transformers")


class PatchEncoder(nn.Module):
    """ViT-style: conv patches, class token, positional embedding, one nn.MultiheadAttention block, head."""

    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, width, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, 17, width))
        self.ln1, self.ln2, self.norm = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, 5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(self.norm(x)[:, 0])


class GatedAttention(nn.Module):
    """Hand-rolled heads with matmul + softmax, a sigmoid-gated SiLU feed-forward (a product of activations)."""

    def __init__(self, width: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm, self.ff = nn.LayerNorm(width), nn.Sequential(nn.Linear(width, width), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)).softmax(dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.ff(x) * torch.sigmoid(x)


def _hf(name: str) -> tuple[nn.Module, dict[str, Any], str]:
    small = {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0
    if name.startswith("bert"):
        cfg = transformers.BertConfig(
            vocab_size=64, hidden_size=32, max_position_embeddings=16, attn_implementation=name[5:], **small
        )
        return transformers.BertModel(cfg), {"attention_mask": mask}, "inputs_embeds"
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)
        return transformers.GPT2Model(cfg), {}, "inputs_embeds"
    if name == "vit":
        cfg = transformers.ViTConfig(hidden_size=32, image_size=16, patch_size=4, **small)
        return transformers.ViTModel(cfg), {}, "pixel_values"
    cfg = transformers.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=48)
    return transformers.DistilBertModel(cfg), {"attention_mask": mask}, "inputs_embeds"


def _model(name: str) -> tuple[nn.Module, Callable[[torch.Tensor], Any], tuple[int, ...], str | None]:
    """(model, batch -> kwargs or tensor, input shape, time-input name)."""
    torch.manual_seed(0)
    if name == "patch_mha":
        return PatchEncoder().eval(), lambda x: x, (3, 16, 16), None
    if name == "gated":
        return GatedAttention().eval(), lambda x: x, (7, 12), None
    model, static, key = _hf(name)
    shape = (3, 16, 16) if name == "vit" else (7, 32)
    return model.eval(), lambda x: {key: x, **static}, shape, key


def _output(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


class _SpikeCheck(TorchFunctionMode):
    """Outside the SNN: records every weight-layer call whose activation operand is not ternary."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.analog: list[str] = []

    def check(self, what: str, x: Any) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return
        self.calls += 1
        magnitudes = x.detach().abs().unique()
        if magnitudes[magnitudes > 0].numel() > 1:
            self.analog.append(what)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in (F.linear, F.conv2d, torch.mm):
            self.check(getattr(func, "__name__", str(func)), args[0])
        return func(*args, **kwargs)


@contextmanager
def _spike_check() -> Iterator[_SpikeCheck]:
    mode = _SpikeCheck()

    def hook(module: nn.Module, args: Any) -> None:  # TD products: both operands are spike sequences
        if isinstance(module, TDMatMul | TDMul):
            for x in args[:2]:
                mode.check(type(module).__name__, x)

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        with mode:
            yield mode
    finally:
        handle.remove()


MODELS = ["patch_mha", "gated", "bert_eager", "bert_sdpa", "gpt2", "vit", "distilbert"]


@pytest.mark.parametrize("levels", [4, 8, 16, 32])
@pytest.mark.parametrize("name", MODELS)
def test_settled_snn_equals_qann(name: str, levels: int) -> None:
    model, wrap, shape, key = _model(name)
    torch.manual_seed(1)
    calib = [torch.randn(2, *shape) for _ in range(2)]
    qann = calibrate_qann(prepare_qann(model, levels, example_inputs=wrap(calib[0])), calib, input_fn=wrap)
    assert len(qann.report.sites) > 0
    snn = qann_to_snn(qann, time_inputs=None if key is None else {key})
    x = torch.randn(2, *shape)
    with torch.no_grad():
        ref = _output(_call(qann, wrap(x)))
        with _spike_check() as check:
            out, steps = snn.run_until_quiet(**_kwargs(wrap(x)), max_steps=2048)
    got = _output(out)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert snn.report.equivalent, str(snn.report)
    # the settle time: quiet at `steps`, not before, and bounded
    assert 1 <= steps < 2048
    assert snn.settle_steps == steps
    # spike-driven: every weight layer and TD product is fed ternary values, except on the model input
    assert check.calls > 0
    assert len(check.analog) == sum(qann.report.left.values()), check.analog


def _call(qann: QANN, inputs: Any) -> Any:
    return qann(**inputs) if isinstance(inputs, dict) else qann(inputs)


def _kwargs(inputs: Any) -> dict[str, Any]:
    return inputs if isinstance(inputs, dict) else {"x" if inputs.dim() == 3 else "images": inputs}


def test_report_placement_and_the_callers_model_untouched() -> None:
    model, _wrap, shape, _ = _model("gated")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qann = prepare_qann(model, 8, example_inputs=torch.randn(2, *shape))
    ops = [(s.module, s.op, s.operand, s.signed) for s in qann.report.sites]
    # LN output feeds qkv (one quantiser), q/k and probs/v of the two matmuls, proj input, ff input, the gate
    assert ("qkv", "linear", "x", True) in ops
    assert ("<root>", "matmul", "a", True) in ops  # q of q @ k^T
    probs = [s for s in qann.report.sites if s.module == "<root>" and s.op == "matmul"][2]
    assert probs.signed is False  # the softmax output of the second matmul
    assert sum(1 for s in qann.report.sites if s.op == "mul") == 2  # ff(x) * sigmoid(x): both operands
    assert [s for s in qann.report.sites if s.op == "mul"][1].signed is False  # sigmoid output
    assert "QANN: 9 quantisers" in str(qann.report)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m) is not Quantizer for m in model.modules())


def test_quantisation_aware_training_updates_steps_and_weights() -> None:
    model, _, shape, _ = _model("patch_mha")
    x = torch.randn(8, *shape)
    qann = prepare_qann(model, 16, example_inputs=x).train()
    y = torch.randint(0, 5, (8,))
    opt = torch.optim.SGD(qann.parameters(), lr=0.1)
    loss = F.cross_entropy(qann(x), y)  # the first batch initialises every step (LSQ's rule)
    loss.backward()
    steps = {k: float(q.scale.detach()) for k, q in qann.quantizers.items()}
    grads = [q.scale.grad for q in qann.quantizers.values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs()) > 0 for g in grads if g is not None)
    opt.step()
    assert any(float(q.scale.detach()) != steps[k] for k, q in qann.quantizers.items())
    snn = qann_to_snn(qann.eval())
    with torch.no_grad():
        out, _ = snn.run_until_quiet(images=x[:2])
        torch.testing.assert_close(out, qann(x[:2]), rtol=1e-5, atol=1e-5)


def test_fixed_T_runs_report_unsettled_and_streaming_equals_full() -> None:
    model, _wrap, shape, _ = _model("gated")
    x = torch.randn(2, *shape)
    qann = calibrate_qann(prepare_qann(model, 32, example_inputs=x), [x])
    snn = qann_to_snn(qann)
    seq = torch.cat([x.unsqueeze(0), torch.zeros(3, *x.shape)])
    with torch.no_grad():
        snn(seq)
        assert snn.settle_steps is None  # level 32 needs more than 4 steps
        out, steps = snn.run_until_quiet(x, start_steps=4)
        assert steps > 4
        full = snn(torch.cat([x.unsqueeze(0), torch.zeros(steps + 4, *x.shape)]))
    assert snn.settle_steps == steps
    assert torch.equal(full[steps:], torch.zeros_like(full[steps:]))  # quiet means nothing moves after
    torch.testing.assert_close(full.sum(0), out, rtol=1e-6, atol=1e-6)
    assert all(isinstance(n, STBIFNeuron) for n in snn.neurons())


def test_errors() -> None:
    model, _wrap, shape, _ = _model("gated")
    x = torch.randn(2, *shape)
    with pytest.raises(TypeError, match=r"prepare_qann expects an nn\.Module, but got list"):
        prepare_qann([], example_inputs=x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="levels must be an integer >= 2, but got True"):
        prepare_qann(model, True, example_inputs=x)  # type: ignore[arg-type]
    qann = prepare_qann(model, 8, example_inputs=x)
    with pytest.raises(RuntimeError, match=r"the quantiser at qkv:linear0:x has no step yet"):
        qann_to_snn(qann)
    with pytest.raises(ValueError, match="calibrate_qann: data gave no batch"):
        calibrate_qann(qann, [])
    with pytest.raises(ValueError, match="NaN or inf"):
        calibrate_qann(qann, [torch.full((2, *shape), float("nan"))])
    with pytest.raises(
        TypeError, match="calibrate_qann expects a QANN from prepare_qann, but got GatedAttention"
    ):
        calibrate_qann(model, [x])  # type: ignore[arg-type]
    snn = qann_to_snn(calibrate_qann(qann, [x]))
    with pytest.raises(ValueError, match="max_steps must be a positive integer, but got 0"):
        snn.run_until_quiet(x, max_steps=0)


def test_hugging_face_bert_trains_as_a_qann() -> None:
    model, wrap, shape, _ = _model("bert_sdpa")
    x = torch.randn(2, *shape)
    qann = prepare_qann(model.train(), 8, example_inputs=wrap(x))  # SDPA with dropout_p > 0 in training
    out = qann(**wrap(x))
    (out.last_hidden_state.square().mean() + out.pooler_output.square().mean()).backward()
    assert all(q.scale.grad is not None for q in qann.quantizers.values())
    with pytest.raises(ValueError, match="need_weights=False"):
        prepare_qann(nn.MultiheadAttention(4, 2), example_inputs=(torch.randn(3, 1, 4),) * 3)


@pytest.mark.parametrize("name", ["gated", "bert_sdpa"])
def test_batch_slices_give_the_whole_batch_outputs(name: str) -> None:
    """batch_chunk runs the batch in slices (masks sliced with it): the same outputs and settle time."""
    model, wrap, shape, key = _model(name)
    torch.manual_seed(1)
    x = torch.randn(3, *shape)
    inputs = wrap(x)
    if isinstance(inputs, dict) and "attention_mask" in inputs:
        inputs["attention_mask"] = torch.ones(3, 7, dtype=torch.long)
        inputs["attention_mask"][1, -3:] = 0  # per sample: slicing must keep each mask with its sample
        inputs["attention_mask"][2, -1:] = 0
    qann = calibrate_qann(prepare_qann(model, 8, example_inputs=inputs), [inputs], input_fn=lambda b: b)
    kwargs = _kwargs(inputs)
    with torch.no_grad():
        ref = _output(_call(qann, inputs))
        whole = qann_to_snn(qann, time_inputs=None if key is None else {key}, batch_chunk=None)
        sliced = qann_to_snn(qann, time_inputs=None if key is None else {key}, batch_chunk=2)
        calls: list[int] = []
        sliced.model.register_forward_pre_hook(lambda _m, a, kw: calls.append(len(calls)), with_kwargs=True)
        out_whole, steps_whole = whole.run_until_quiet(**kwargs, max_steps=2048)
        out_sliced, steps_sliced = sliced.run_until_quiet(**kwargs, max_steps=2048)
    torch.testing.assert_close(_output(out_sliced), _output(out_whole), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_output(out_sliced), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert steps_sliced == steps_whole == sliced.settle_steps
    assert calls  # the slices (2 + 1 samples) ran one by one: two calls of the model per try
    assert len(calls) % 2 == 0
    with pytest.raises(ValueError, match="batch_chunk must be 'auto', None or a positive integer"):
        qann_to_snn(qann, batch_chunk=0)


class WithCount(nn.Module):
    """A linear layer whose output comes with a plain int: no [T, B] layout to join batch slices on."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self.fc(x), 3


def test_batch_slices_fall_back_to_the_whole_batch_for_an_output_they_cannot_join() -> None:
    torch.manual_seed(2)
    model = WithCount().eval()
    x = torch.randn(4, 6)
    qann = calibrate_qann(prepare_qann(model, 8, example_inputs=x), [x])
    x_seq = torch.zeros(5, 4, 6)
    x_seq[0] = x
    with torch.no_grad():
        ref, count = qann(x)
        whole = qann_to_snn(qann, batch_chunk=None)
        sliced = qann_to_snn(qann, batch_chunk=2)
        batches: list[int] = []
        sliced.model.register_forward_pre_hook(lambda _m, a: batches.append(a[0].shape[0]))
        (out_whole, count_whole), (out_sliced, count_sliced) = whole(x_seq), sliced(x_seq)
    assert count_whole == count_sliced == count == 3
    torch.testing.assert_close(out_sliced, out_whole, rtol=0, atol=0)
    torch.testing.assert_close(out_sliced.sum(0), ref, rtol=1e-5, atol=1e-5)
    assert batches == [5 * 2, 5 * 4]  # the first slice shows the layout, then one whole-batch run


class SequenceFirst(nn.Module):
    """``nn.MultiheadAttention(batch_first=False)``: inputs ``[L, B, E]``, a key padding mask ``[B, L]``."""

    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.ln, self.attn = nn.LayerNorm(width), nn.MultiheadAttention(width, heads)
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        y = self.ln(x)
        x = x + self.attn(y, y, y, key_padding_mask=pad, need_weights=False)[0]
        return self.fc(torch.relu(x))


@pytest.mark.parametrize(("length", "batch"), [(5, 3), (4, 4)])
@pytest.mark.parametrize("levels", [8, 16])
def test_sequence_first_multihead_attention_is_exact(length: int, batch: int, levels: int) -> None:
    torch.manual_seed(0)
    model = SequenceFirst().eval()
    x = torch.randn(length, batch, 16)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[1, -2:] = True  # sample 1 ignores its last two positions
    qann = calibrate_qann(prepare_qann(model, levels, example_inputs=(x, pad)), [(x, pad)], input_fn=tuple)
    snn = qann_to_snn(qann, time_inputs={0})
    with torch.no_grad():
        ref = qann(x, pad)
        out, steps = snn.run_until_quiet(x, pad, max_steps=512)
        unmasked = qann(x, torch.zeros_like(pad))
    assert not torch.allclose(ref, unmasked)  # the mask matters
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert snn.report.equivalent, str(snn.report)
    assert 1 <= steps < 512


@pytest.mark.parametrize("name", ["gated", "patch_mha", "bert_sdpa"])
def test_placement_without_example_inputs_happens_on_the_first_forward(name: str) -> None:
    model, wrap, shape, key = _model(name)
    torch.manual_seed(1)
    calib = [torch.randn(2, *shape) for _ in range(2)]
    eager = calibrate_qann(prepare_qann(model, 8, example_inputs=wrap(calib[0])), calib, input_fn=wrap)
    lazy = prepare_qann(model, 8)
    assert not lazy.placed
    assert not lazy.report.sites
    assert len(lazy.quantizers) == 0
    with pytest.raises(RuntimeError, match="quantisers are not placed yet"):
        qann_to_snn(lazy)
    calibrate_qann(lazy, calib, input_fn=wrap)  # the first batch places, every batch is observed
    assert lazy.placed
    assert lazy.report.sites == eager.report.sites
    assert lazy.report.left == eager.report.left
    for site in eager.quantizers:
        assert torch.equal(lazy.quantizers[site].step.detach(), eager.quantizers[site].step.detach())
    x = torch.randn(2, *shape)
    with torch.no_grad():
        ref = _output(_call(eager, wrap(x)))
        torch.testing.assert_close(_output(_call(lazy, wrap(x))), ref, rtol=0, atol=0)
        snn = qann_to_snn(lazy, time_inputs=None if key is None else {key})
        out, _ = snn.run_until_quiet(**_kwargs(wrap(x)), max_steps=2048)
    torch.testing.assert_close(_output(out), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_placement_on_the_first_training_batch_initialises_by_lsq() -> None:
    model, _, shape, _ = _model("gated")
    x = torch.randn(4, *shape)
    eager = prepare_qann(model, 8, example_inputs=x).train()
    lazy = prepare_qann(model, 8).train()
    out_eager, out_lazy = eager(x), lazy(x)  # both: the first training batch sets every step by LSQ's rule
    torch.testing.assert_close(out_lazy, out_eager, rtol=0, atol=0)
    out_lazy.square().mean().backward()
    assert all(q.scale.grad is not None for q in lazy.quantizers.values())
    assert [s.key for s in lazy.report.sites] == [s.key for s in eager.report.sites]

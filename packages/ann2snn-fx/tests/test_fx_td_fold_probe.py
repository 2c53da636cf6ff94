"""TDTimeFolded's shape probe: a literal batch size beside -1 (``x.view(2, -1)``) is reported, not silent."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ann2snn_fx.td import TDEquivalenceError, TDTimeFolded

BATCH = 2


class LiteralBatch(nn.Module):
    """A softmax over every feature of a sample, the batch size written as a literal (B = 2) or read from the
    tensor; ``calls`` counts the forwards (the probe adds one on a new input signature)."""

    def __init__(self, literal: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.literal = literal
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.fc(x)
        batch = BATCH if self.literal else y.shape[0]
        return F.softmax(y.view(batch, -1), dim=-1).view(y.shape)


def _ann(literal: bool) -> nn.Module:
    torch.manual_seed(0)
    return LiteralBatch(literal).double().eval()


def _reference(ann: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([ann(c) for c in x.cumsum(0)])


def test_literal_batch_size_that_the_steps_divide_is_reported() -> None:
    # T = 2 divides the literal 2: the folded view is [2, T*12], a legal shape, and the softmax mixes steps
    ann = _ann(literal=True)
    x = torch.randn(2, BATCH, 3, 4, dtype=torch.float64)
    snn = TDTimeFolded(ann)
    out = snn(x)
    assert (out.cumsum(0) - _reference(ann, x)).abs().max() > 1e-3  # really wrong: the report is due
    [issue] = snn.report.issues
    assert issue.op == "Tensor.view"
    for fragment in ("(2, 24)", "(2, 12)", "(4, 12)", "T=2", "x.shape[0]"):
        assert fragment in issue.detail
    with pytest.raises(TDEquivalenceError, match=r"Tensor\.view.*\(2, 24\).*\(2, 12\).*x\.shape\[0\]"):
        TDTimeFolded(ann, strict=True)(x)


@pytest.mark.parametrize("strict", [False, True])
def test_literal_batch_size_that_the_steps_do_not_divide_names_the_reshape(strict: bool) -> None:
    # T = 4 does not divide 2: the softmax on the [2, 48] view fails; the error names the view, not the softmax
    x = torch.randn(4, BATCH, 3, 4, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"forward failed.*\n.*Tensor\.view.*\(2, 48\).*\(2, 12\).*x\.shape\[0\]"
    ):
        TDTimeFolded(_ann(literal=True), strict=strict)(x)


@pytest.mark.parametrize("steps", [2, 4])
def test_batch_size_read_from_the_tensor_is_exact_and_clean(steps: int) -> None:
    ann = _ann(literal=False)
    x = torch.randn(steps, BATCH, 3, 4, dtype=torch.float64)
    snn = TDTimeFolded(ann, strict=True)
    torch.testing.assert_close(snn(x).cumsum(0), _reference(ann, x), atol=1e-9, rtol=1e-9)
    assert snn.report.equivalent
    assert list(snn._probed.values()) == [[]]  # the probe ran and found nothing


def test_the_probe_runs_once_per_input_signature_and_its_verdict_stays() -> None:
    snn = TDTimeFolded(_ann(literal=True))
    inner = snn.model
    x = torch.randn(2, BATCH, 3, 4, dtype=torch.float64)
    snn(x)
    assert inner.calls == 2  # the probe's run on one step's batch, then the folded forward
    for _ in range(2):
        snn(x.clone())
        assert not snn.report.equivalent  # the verdict is repeated, the probe not
    assert inner.calls == 4
    snn(torch.randn(2, BATCH, 5, 4, dtype=torch.float64))  # a new signature: probed again
    assert inner.calls == 6
    quiet = TDTimeFolded(_ann(literal=True), shape_check=False)
    quiet(x)
    assert quiet.model.calls == 1  # the silent failure the probe exists for
    assert quiet.report.equivalent


def test_the_probe_leaves_random_draws_and_buffers_as_they_were() -> None:
    # training mode: dropout draws and batch-norm running statistics must be those of a single forward
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4)).double().train()
    x = torch.randn(3, BATCH, 4, dtype=torch.float64)
    outs, stats = [], []
    for shape_check in (True, False):
        snn = TDTimeFolded(ann, shape_check=shape_check)
        torch.manual_seed(1)
        outs.append(snn(x))
        stats.append(snn.model[2].running_mean.clone())
        assert snn.model[2].num_batches_tracked.item() == 1
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    torch.testing.assert_close(stats[0], stats[1], atol=0, rtol=0)


def test_the_probe_stays_out_of_hooked_forwards() -> None:
    # hooks (diagnose_td, the folded accounting) would see its extra run: it waits for an unhooked forward
    snn = TDTimeFolded(_ann(literal=True))
    seen: list[tuple[int, ...]] = []
    handle = snn.model.fc.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    x = torch.randn(2, BATCH, 3, 4, dtype=torch.float64)
    snn(x)
    assert seen == [(4, 3, 4)]
    assert snn.model.calls == 1
    handle.remove()
    snn(x)
    assert snn.model.calls == 3
    assert not snn.report.equivalent


transformers = pytest.importorskip("transformers")


def _hf(name: str) -> tuple[nn.Module, str, tuple[int, ...], dict[str, object]]:
    small = {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}
    if name == "bert":
        config = transformers.BertConfig(vocab_size=64, hidden_size=32, max_position_embeddings=16, **small)
        mask = torch.ones(BATCH, 9, dtype=torch.long)
        mask[1, -3:] = 0
        return transformers.BertModel(config), "inputs_embeds", (9, 32), {"attention_mask": mask}
    if name == "llama":
        config = transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, num_key_value_heads=2, max_position_embeddings=32, **small
        )
        return transformers.LlamaModel(config), "inputs_embeds", (9, 32), {}
    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16)
        return transformers.GPT2Model(config), "inputs_embeds", (9, 32), {"use_cache": False}
    if name == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=48)
        return transformers.DistilBertModel(config), "inputs_embeds", (9, 32), {}
    config = transformers.ViTConfig(hidden_size=32, image_size=16, patch_size=4, **small)
    return transformers.ViTModel(config), "pixel_values", (3, 16, 16), {}


@pytest.mark.parametrize("steps", [2, 4])
@pytest.mark.parametrize("name", ["bert", "llama", "gpt2", "distilbert", "vit"])
def test_hugging_face_models_pass_the_probe(name: str, steps: int) -> None:
    torch.manual_seed(0)
    model, key, shape, extra = _hf(name)
    model = model.double().eval()
    snn = TDTimeFolded(model, time_inputs={key}, strict=True)
    x = torch.randn(steps, BATCH, *shape, dtype=torch.float64)
    out = snn(**{key: x}, **extra).last_hidden_state
    assert list(snn._probed.values()) == [[]]  # the probe ran and found nothing
    tol = 1e-5 if name == "llama" else 1e-9  # Llama's RMSNorm rounds each step to float32
    for t, c in enumerate(x.cumsum(0)):
        ref = model(**{key: c}, **extra).last_hidden_state
        torch.testing.assert_close(out.cumsum(0)[t], ref, atol=tol, rtol=tol)

"""A transformer block made TD by hand with ann2snn-ops alone, checked against the ANN block.

This is a transformer project's view: no converter, no torch.fx, only ``pip install ann2snn-ops``. Each TD
block is built from its ANN block with the operators' ``from_module`` constructors, and its outputs, summed
over time, must equal the ANN block applied to the cumulative input at every step.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ann2snn_ops import (
    TDGELU,
    TDLayerNorm,
    TDLinear,
    TDMatMul,
    TDMultiheadAttention,
    TDSoftmax,
)

E, HEADS, MLP, L, B = 16, 4, 32, 5, 3


class Block(nn.Module):
    """A pre-norm transformer encoder block (attention, then a GELU MLP), batch first."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(E)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.norm2 = nn.LayerNorm(E)
        self.fc1 = nn.Linear(E, MLP)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(MLP, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TDBlock(nn.Module):
    """The same block on time sequences ``[T, B, L, E]``: every op replaced by its TD version."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.norm1 = TDLayerNorm.from_module(block.norm1)
        self.attn = TDMultiheadAttention.from_module(block.attn)
        self.norm2 = TDLayerNorm.from_module(block.norm2)
        self.fc1 = TDLinear.from_module(block.fc1)
        self.act = TDGELU.from_module(block.act)
        self.fc2 = TDLinear.from_module(block.fc2)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x_seq)
        x_seq = x_seq + self.attn(h, h, h)[0]  # residual additions are linear: time-transparent as they are
        return x_seq + self.fc2(self.act(self.fc1(self.norm2(x_seq))))


class SingleHeadAttention(nn.Module):
    """Attention written out with matmul and softmax, as many research codebases do."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(E, E), nn.Linear(E, E), nn.Linear(E, E)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-2, -1) / math.sqrt(E)
        return self.softmax(scores) @ self.v(x)


class TDSingleHeadAttention(nn.Module):
    """Its TD version: the products of two time-varying tensors go through TDMatMul."""

    def __init__(self, ann: SingleHeadAttention) -> None:
        super().__init__()
        self.q, self.k, self.v = (TDLinear.from_module(m) for m in (ann.q, ann.k, ann.v))
        self.softmax = TDSoftmax.from_module(ann.softmax)
        self.scores, self.mix = TDMatMul(), TDMatMul()

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        scores = self.scores(self.q(x_seq), self.k(x_seq).transpose(-2, -1)) / math.sqrt(E)
        return self.mix(self.softmax(scores), self.v(x_seq))


def _ann_on_cumulative(ann: nn.Module, x_seq: torch.Tensor) -> torch.Tensor:
    """The ANN applied to the cumulative input at every step: ``[T, B, ...]`` folded into the batch."""
    x_cum = x_seq.cumsum(dim=0)
    out = ann(x_cum.flatten(0, 1))
    return out.unflatten(0, x_seq.shape[:2])


def _sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    return (20 * torch.log10(reference.norm() / (reference - approximation).norm())).item()


def _trained_looking(block: nn.Module, seed: int) -> nn.Module:
    """Give every parameter non-trivial values (LayerNorm starts at 1/0, attention biases at 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(
                torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3
                + (1.0 if p.dim() == 1 else 0.0)
            )
    return block.eval()


@pytest.mark.parametrize(
    ("ann_cls", "td_cls"), [(Block, TDBlock), (SingleHeadAttention, TDSingleHeadAttention)]
)
@pytest.mark.parametrize("steps", [1, 6])
def test_td_block_reproduces_the_ann_on_cumulative_input_float64(
    ann_cls: type[nn.Module], td_cls: type[nn.Module], steps: int
) -> None:
    ann = _trained_looking(ann_cls().double(), seed=0)
    td = td_cls(ann).eval()
    x_seq = torch.randn(steps, B, L, E, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        out_seq = td(x_seq)
        expected = _ann_on_cumulative(ann, x_seq)
    assert out_seq.shape == (steps, B, L, E)
    torch.testing.assert_close(out_seq.cumsum(dim=0), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    ("ann_cls", "td_cls"), [(Block, TDBlock), (SingleHeadAttention, TDSingleHeadAttention)]
)
def test_td_block_float32_matches_within_tolerance(ann_cls: type[nn.Module], td_cls: type[nn.Module]) -> None:
    ann = _trained_looking(ann_cls(), seed=2)
    td = td_cls(ann).eval()
    x_seq = torch.randn(16, B, L, E, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = td(x_seq).cumsum(dim=0)
        expected = _ann_on_cumulative(ann, x_seq)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert _sqnr_db(expected, got) > 80


def test_input_at_t0_then_zeros_gives_the_ann_output_at_every_step() -> None:
    ann = _trained_looking(Block(), seed=4)
    td = TDBlock(ann).eval()
    x = torch.randn(B, L, E, generator=torch.Generator().manual_seed(5))
    x_seq = torch.zeros(8, B, L, E)
    x_seq[0] = x
    with torch.no_grad():
        cumulative = td(x_seq).cumsum(dim=0)
        expected = ann(x)
    for t in range(8):
        torch.testing.assert_close(cumulative[t], expected, atol=1e-5, rtol=1e-5)


def test_plain_ann_on_differential_input_is_not_equivalent() -> None:
    """The control: without TD operators the bias and LayerNorm responses pile up over the zero steps."""
    ann = _trained_looking(Block(), seed=4)
    x = torch.randn(B, L, E, generator=torch.Generator().manual_seed(5))
    x_seq = torch.zeros(8, B, L, E)
    x_seq[0] = x
    with torch.no_grad():
        naive = torch.stack([ann(step) for step in x_seq]).sum(dim=0)
        expected = ann(x)
    assert (naive - expected).abs().max() > 1.0


def test_td_block_gradients_match_the_ann_on_cumulative_input() -> None:
    ann = _trained_looking(Block().double(), seed=6)
    td = TDBlock(ann).train()
    x_seq = torch.randn(4, B, L, E, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    weights = torch.randn(4, B, L, E, generator=torch.Generator().manual_seed(8), dtype=torch.float64)

    x_td = x_seq.clone().requires_grad_(True)
    (td(x_td).cumsum(dim=0) * weights).sum().backward()
    x_ann = x_seq.clone().requires_grad_(True)
    (_ann_on_cumulative(ann, x_ann) * weights).sum().backward()

    assert x_td.grad is not None
    assert x_ann.grad is not None
    torch.testing.assert_close(x_td.grad, x_ann.grad, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(td.fc1.weight.grad, ann.fc1.weight.grad, atol=1e-9, rtol=1e-9)

"""Issue 18: ops of real models in both TD paths (Bloom's baddbmm, GPT-2's addmm, Swin's roll and adaptive
pooling, an in-place ReLU whose mutation the code relies on, positive-dim reshapes).

Each failed before: baddbmm/addmm were flagged or off, roll and adaptive pooling were false alarms, the
in-place ReLU was silently 0.35+ off with a clean report, and an explicit-size reshape converted silently.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ann2snn_fx import TDTimeFolded, replace_by_td_operators

T, B, L, E = 3, 2, 5, 8

_CURRENT: dict[str, pytest.Item] = {}


@pytest.fixture(autouse=True)
def _current_test(request: pytest.FixtureRequest) -> None:
    """The running test, so that the checks can record what they measured (docs/models.md)."""
    _CURRENT["item"] = request.node


class Products(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.q, self.k = nn.Linear(E, E), nn.Linear(E, E)
        self.register_buffer("alibi", torch.randn(1, L, L))
        self.w, self.bias = nn.Parameter(torch.randn(E, 4)), nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.q(x), self.k(x).transpose(-1, -2)
        if self.kind == "baddbmm":  # Bloom: alibi * beta + (q @ k^T) * inv_norm
            return torch.baddbmm(self.alibi, q, k, beta=0.5, alpha=0.25).softmax(-1)
        if self.kind == "Tensor.baddbmm":
            return self.alibi.baddbmm(q, k, alpha=0.25)
        if self.kind == "addmm":  # GPT-2's Conv1D
            return torch.addmm(self.bias, q.flatten(-3, -2), self.w, beta=2.0)
        return torch.addbmm(self.alibi[0], q, k)


def _reference(ann: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([ann(x.cumsum(0)[t]) for t in range(x.shape[0])])


def _assert_exact(out: torch.Tensor, ann: nn.Module, x: torch.Tensor) -> None:
    """``out.cumsum(0)[t] == ann(x.cumsum(0)[t])`` at every step; the error is recorded (docs/models.md)."""
    reference = _reference(ann, x)
    error = (out.cumsum(0) - reference).abs().max().item()
    _CURRENT["item"].user_properties.append(("max_abs_error", f"{error:.1e} (float32)"))
    torch.testing.assert_close(out.cumsum(0), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["baddbmm", "Tensor.baddbmm", "addmm", "addbmm"])
@pytest.mark.parametrize("path", ["fx", "folded"])
def test_add_products_are_exact(kind: str, path: str) -> None:
    torch.manual_seed(0)
    ann = Products(kind).eval()
    x = torch.randn(T, B, L, E)
    if path == "folded" and kind == "addbmm":
        # addbmm sums over its batch dim, which TDTimeFolded shares with time: reported, not converted
        folded = TDTimeFolded(ann)
        with torch.no_grad():
            folded(x)
        assert any("addbmm" in record.node for record in folded.report.issues)
        return
    model = replace_by_td_operators(ann, strict=True) if path == "fx" else TDTimeFolded(ann, strict=True)
    with torch.no_grad():
        out = model(x)
    _assert_exact(out, ann, x)


class SwinLike(nn.Module):
    """Swin's shifted windows (torch.roll over token dims) and its adaptive average pooling head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm = nn.Linear(E, E), nn.LayerNorm(E)
        self.pool = nn.AdaptiveAvgPool1d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.roll(self.fc(x), shifts=2, dims=1).roll(-1, -2)
        pooled = self.pool(self.norm(y).transpose(-1, -2)).flatten(-2)
        # unsqueeze(-3) of a 3-D tensor inserts at dim 1 (it was a false alarm of the folded path)
        return pooled + F.adaptive_avg_pool2d(y.unsqueeze(-3), (1, E)).flatten(-3)


def test_roll_and_adaptive_pooling_are_time_transparent_in_the_folded_path() -> None:
    torch.manual_seed(1)
    ann = SwinLike().eval()
    x = torch.randn(T, B, L, E)
    folded = TDTimeFolded(ann, strict=True)  # before: roll and adaptive_avg_pool were reported
    with torch.no_grad():
        out = folded(x)
    _assert_exact(out, ann, x)
    assert folded.report.equivalent


def test_roll_over_a_token_dim_is_time_transparent_in_the_fx_path() -> None:
    class Roll(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(E, E)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.roll(self.fc(x), shifts=2, dims=-2)

    ann = Roll().eval()
    gm = replace_by_td_operators(ann, strict=True)
    x = torch.randn(T, B, L, E)
    with torch.no_grad():
        _assert_exact(gm(x), ann, x)
    with pytest.raises(Exception, match="roll"):  # a roll over all dims (flattened) mixes the steps
        replace_by_td_operators(_Lambda(lambda m, x: torch.roll(x, 1)), strict=True)


class _Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn, self.fc = fn, nn.Linear(E, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, self.fc(x))


@pytest.mark.parametrize(
    "inplace",
    [
        lambda y: F.relu(y, inplace=True),
        lambda y: y.relu_(),
        lambda y: torch.relu_(y),
        nn.ReLU(inplace=True),
    ],
    ids=["F.relu(inplace=True)", "Tensor.relu_", "torch.relu_", "nn.ReLU(inplace=True)"],
)
@pytest.mark.parametrize("path", ["fx", "folded"])
def test_inplace_relu_whose_mutation_is_read_later(inplace, path: str) -> None:
    class Mutates(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.fc2 = nn.Linear(E, E), nn.Linear(E, E)
            self.act = inplace if isinstance(inplace, nn.Module) else _Apply(inplace)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            self.act(y)  # result dropped: the code relies on y being overwritten
            return self.fc2(y)

    torch.manual_seed(2)
    ann = Mutates().eval()
    x = torch.randn(T, B, L, E)
    model = replace_by_td_operators(ann, strict=True) if path == "fx" else TDTimeFolded(ann, strict=True)
    with torch.no_grad():
        out = model(x)
    _assert_exact(out, ann, x)


class _Apply(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.fn(y)


def test_explicit_size_reshape_is_detected_at_conversion() -> None:
    ann = _Lambda(lambda m, y: y.reshape(B, L, 2, E // 2).sum(-1)).eval()
    with pytest.warns(UserWarning, match="TDTimeFolded"):
        gm = replace_by_td_operators(ann)
    assert any("TDTimeFolded" in record.detail for record in gm.td_report.issues)


class _TimmAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(E, 3 * E), nn.Linear(E, E)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal)
        return self.proj(out)


class TimmViTLike(nn.Module):
    """timm's ViT passes its forward's ``is_causal=False`` flag down to SDPA (timm itself needs torchvision,
    which does not load beside this torch, so its layout is rebuilt here)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn, self.head = _TimmAttention(), nn.Linear(E, 3)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        return self.head(self.attn(x, attn_mask=attn_mask, is_causal=is_causal).mean(-2))


def test_a_bool_flag_of_the_forward_is_a_constant_not_a_refusal() -> None:
    """Before: ``TD SDPA conversion only supports literal bool is_causal, but got is_causal``."""
    torch.manual_seed(3)
    ann = TimmViTLike().eval()
    gm = replace_by_td_operators(ann, strict=True)
    x = torch.randn(T, B, L, E)
    with torch.no_grad():
        _assert_exact(gm(x), ann, x)
    with pytest.raises(AssertionError, match="is_causal has been specialized"):
        gm(x, None, True)  # a different flag at run time is refused loudly, not run on the wrong graph


class PoolsAndUpsampling(nn.Module):
    """Average pooling and upsampling modules: linear, bias-free, run per step in the fx path."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(E, E)
        self.pool1 = nn.AdaptiveAvgPool1d(2)
        self.pool2 = nn.AvgPool2d(2, ceil_mode=True)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)  # [B, L, E]
        a = self.pool1(y.transpose(-1, -2)).flatten(-2)  # [B, 2E]
        b = self.up(self.pool2(y.unsqueeze(-3))).flatten(-3)  # [B, 2*ceil(L/2) * E]
        return torch.cat([a, b], -1)


def test_average_pooling_and_upsampling_modules_in_the_fx_path() -> None:
    """Before: reported as 'not known to be time-transparent', and the pools failed on the [T, ...] rank."""
    torch.manual_seed(4)
    ann = PoolsAndUpsampling().eval()
    gm = replace_by_td_operators(ann, strict=True)
    x = torch.randn(T, B, L, E)
    with torch.no_grad():
        _assert_exact(gm(x), ann, x)

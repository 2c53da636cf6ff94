"""TDTimeFolded: input handling, what it converts, what it reports, errors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ann2snn_fx.td import TDEquivalenceError, TDTimeFolded


class Fn(nn.Module):
    def __init__(self, fn: Callable[..., object]) -> None:
        super().__init__()
        self.fn = fn
        self.w = nn.Parameter(torch.randn(5))

    def forward(self, *xs: torch.Tensor) -> object:
        return self.fn(self, *xs)


def _inplace_ops(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = x * 1.0
    y += x  # time + time
    y += m.w  # constant: at t = 0
    y -= 0.5
    y *= 2.0
    y.mul_(x)  # time * time -> TDMul
    y /= 4.0
    return y


def _equivalent(ann: nn.Module, x: torch.Tensor, atol: float = 1e-9) -> TDTimeFolded:
    snn = TDTimeFolded(ann, strict=True)
    out = snn(x)
    for t, c in enumerate(x.cumsum(0)):
        torch.testing.assert_close(out.cumsum(0)[t], ann(c), atol=atol, rtol=atol)
    return snn


_OPS = [
    lambda m, x: 1.0 - x * m.w,
    lambda m, x: m.w - x,
    lambda m, x: torch.sub(x, m.w, alpha=2.0) + 3,
    lambda m, x: x.masked_fill(x.new_tensor([True, False, True, False, False]).bool(), -2.0),
    lambda m, x: F.layer_norm(x, (5,), m.w, None) + F.rms_norm(x, (5,), m.w),
    lambda m, x: torch.stack([x, m.w.expand_as(x)], dim=1).sum(1),
    lambda m, x: F.softmax(x.unsqueeze(1).expand(-1, 3, -1), dim=2).mean(1),
    lambda m, x: x.reshape(-1, 5).view(x.shape).flatten(1),
    lambda m, x: _inplace_ops(m, x),
    lambda m, x: torch.exp(x) + x.pow(3) + F.softplus(x, beta=2.0) + x.clamp(-0.5, 0.5),
    lambda m, x: torch.addmm(m.w, x, m.w.detach().view(5, 1).expand(5, 5)).type(torch.float64),
    lambda m, x: F.conv1d(x.unsqueeze(1), m.w.view(1, 1, 5), m.w[:1], padding=2).squeeze(1),
    # time tensors (and constants) passed as keywords, also nested in a keyword's list
    lambda m, x: torch.mul(x, other=x) + torch.cat(tensors=[x, m.w.expand_as(x)], dim=1)[:, 2:7],
    lambda m, x: F.linear(x, weight=m.w.view(1, 5).expand(5, 5), bias=m.w) + torch.clamp(x, min=-0.5),
]
_UNARY = [
    lambda m, x: F.gelu(x) + F.gelu(x, approximate="tanh"),
    lambda m, x: F.silu(x) * 2 + torch.tanh(x) + torch.sigmoid(x) + F.relu(x),
    lambda m, x: F.softmax(x, dim=-1) + x.unsqueeze(1).expand(-1, 2, -1).softmax(1).sum(1),
    lambda m, x: F.layer_norm(x, (5,), m.w, m.w.flip(0), 1e-3) * F.rms_norm(x, (5,), m.w),
]


@pytest.mark.parametrize("fn", _OPS + _UNARY)
def test_ops_are_time_equivalent(fn: Callable[..., torch.Tensor]) -> None:
    torch.manual_seed(0)
    _equivalent(Fn(fn).double(), torch.randn(4, 3, 5, dtype=torch.float64))


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("fn", _OPS + _UNARY)
def test_ops_are_time_equivalent_without_autograd(
    fn: Callable[..., torch.Tensor], context: Callable[[], object]
) -> None:
    # without autograd the norms and unary ops take the plain cumsum -> op -> difference path
    torch.manual_seed(0)
    ann = Fn(fn).double()
    x = torch.randn(5, 3, 5, dtype=torch.float64)
    with context():  # type: ignore[attr-defined]
        snn = _equivalent(ann, x)
        out = snn(x)
    torch.testing.assert_close(out, TDTimeFolded(ann, strict=True)(x).detach(), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(
    ("fn", "fragment"),
    [
        (lambda m, x: x.sum(0), "dim=0 mixes the time-folded batch"),
        (lambda m, x: torch.cat([x, x], dim=0), "concatenation along the time-folded batch"),
        (lambda m, x: x[0], "indexing the time-folded batch"),
        (lambda m, x: x.softmax(0), "softmax over dim=0"),
        (lambda m, x: x.transpose(0, 1), "dim=0 mixes"),
        (lambda m, x: x.reshape(5, -1), "reshape that does not keep"),
        (lambda m, x: F.batch_norm(x, torch.zeros(5), torch.ones(5)), "unconverted nonlinearity"),
        (lambda m, x: torch.pow(x, m.w), "extra arguments are time-varying or trainable"),
        (lambda m, x: torch.cumsum(x, -1), "not known to be time-transparent"),
        (lambda m, x: 1.0 / x, "not known to be time-transparent"),
        (lambda m, x: m.w / x, "division by a time-varying tensor"),
        (lambda m, x: F.dropout(x, 0.5, True), "dropout in training mode"),
        (lambda m, x: x.permute(1, 0).sum(-1), "moved off dim 0"),
        (lambda m, x: (x, m.w), "constant output of shape (5,)"),
        (
            lambda m, x: F.scaled_dot_product_attention(
                x[:, None, :, None],
                x[:, None, :, None],
                x[:, None, :, None],
                attn_mask=x[:, None, :, None] > 0,
            ),
            "attn_mask computed from the time inputs",
        ),
    ],
)
def test_breaking_ops_are_reported(fn: Callable[..., object], fragment: str) -> None:
    torch.manual_seed(0)
    snn = TDTimeFolded(Fn(fn))
    snn(torch.randn(4, 3, 5))
    assert not snn.report.equivalent
    assert fragment in " ".join(r.detail for r in snn.report.issues)
    with pytest.raises(TDEquivalenceError, match=r"TDTimeFolded\(strict=True\): [12] op\(s\)"):
        TDTimeFolded(Fn(fn), strict=True)(torch.randn(4, 3, 5))


def test_static_inputs_are_repeated_over_time() -> None:
    class Biased(nn.Module):
        def forward(self, x: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
            return torch.tanh(x + bias) * scale

    torch.manual_seed(0)
    ann = Biased()
    snn = TDTimeFolded(ann, time_inputs={0}, strict=True)
    x, bias = torch.randn(6, 2, 4), torch.randn(2, 4)
    out = snn(x, bias, scale=2.0)
    torch.testing.assert_close(out.sum(0), ann(x.sum(0), bias, 2.0))


def test_gradients_match_the_ann_on_the_summed_input() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(5, 5), nn.GELU(), nn.LayerNorm(5)).double()
    snn = TDTimeFolded(ann)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    snn(x).sum().backward()
    ann(x.sum(0)).sum().backward()
    for (name, p), q in zip(snn.model.named_parameters(), ann.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_input_errors() -> None:
    snn = TDTimeFolded(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="at least one time-sequence tensor input"):
        snn(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \[T, B, \.\.\.\] and a non-empty time dimension"):
        snn(torch.randn(3))
    with pytest.raises(ValueError, match=r"shape \[T, B, \.\.\.\] and a non-empty time dimension"):
        snn(torch.randn(0, 2, 3))
    with pytest.raises(ValueError, match=r"share \[T, B\]"):
        TDTimeFolded(Fn(lambda m, a, b: a + b))(torch.randn(2, 3, 5), torch.randn(3, 3, 5))
    with pytest.raises(TypeError, match=r"expects an nn\.Module"):
        TDTimeFolded("model")  # type: ignore[arg-type]


def test_multihead_attention_checks() -> None:
    # dropout is refused in training mode only (issue 18: inactive, hence ignored, in eval mode)
    with pytest.raises(ValueError, match=r"dropout=0\.1\) is in training mode"):
        TDTimeFolded(nn.MultiheadAttention(4, 2, dropout=0.1, batch_first=True))

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x)[0]

    with pytest.raises(ValueError, match="requires need_weights=False"):
        TDTimeFolded(Attn())(torch.randn(2, 1, 3, 4))
    ann = Attn()
    assert type(ann.attn) is nn.MultiheadAttention


def test_wrapper_mode_and_deepcopy() -> None:
    import copy

    torch.manual_seed(0)
    ann = nn.Sequential(nn.MultiheadAttention(4, 2, batch_first=True)).eval()

    class Call(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = ann

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner[0](x, x, x, need_weights=False)[0]

    snn = TDTimeFolded(Call().eval())
    assert not snn.training
    x = torch.randn(3, 2, 5, 4)
    twin = copy.deepcopy(snn)
    torch.testing.assert_close(twin(x), snn(x))
    torch.testing.assert_close(snn(x).sum(0), Call()(x.sum(0)), atol=1e-5, rtol=1e-5)


def test_explicit_batch_size_reshape() -> None:
    # issue 18: x.view(B, N, H, D) with a literal batch size B works on the T * B folded samples
    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.proj(x).view(2, 3, 2, 3).transpose(1, 2)  # [B, H, N, D] with literal B = 2
            return F.softmax(q @ q.transpose(-1, -2), dim=-1).reshape(2, 2 * 3 * 3)

    torch.manual_seed(0)
    snn = _equivalent(Heads().double(), torch.randn(4, 2, 3, 6, dtype=torch.float64))
    assert any("explicit leading size" in r.detail for r in snn.report.converted)
    # a size that fits no time step: a clear error naming the op, the shapes and the remedy
    with pytest.raises(
        ValueError, match=r"Tensor\.view\(3, 7\) of a time-varying tensor of shape \(12, 5\).*-1"
    ):
        TDTimeFolded(Fn(lambda m, x: x.view(3, 7)))(torch.randn(4, 3, 5))


@pytest.mark.parametrize("self_attention", [True, False])
def test_folded_multihead_attention_unfolds_a_shared_input_once(self_attention: bool) -> None:
    # self-attention (query is key is value) reaches the TD attention as one view: its packed projection
    # and one running sum; cross-attention keeps three; both equal the ANN on the cumulative input
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(6, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            kv = x if self_attention else x * 2.0
            return self.attn(x, kv, kv, need_weights=False)[0]

    ann = Attn().eval()
    snn = TDTimeFolded(ann, strict=True)
    seen: list[tuple[torch.Tensor, ...]] = []
    snn.model.attn.td.register_forward_pre_hook(lambda module, args: seen.append(args[:3]))
    x = torch.randn(4, 2, 5, 6)
    out = snn(x)
    q, k, v = seen[0]
    assert (q is k and k is v) == self_attention
    assert k is v
    reference = ann(x.cumsum(0).flatten(0, 1)).unflatten(0, (4, 2))
    torch.testing.assert_close(out.cumsum(0), reference, atol=1e-5, rtol=1e-5)


class _Constants(nn.Module):
    """Constants added to a time-varying tensor in every form the fold mode distinguishes (in place into a copy,
    or rebuilt: a constant that broadcasts the sum to a larger shape or promotes its dtype), and products of
    time-varying tensors that broadcast."""

    def __init__(self) -> None:
        super().__init__()
        self.row = nn.Parameter(torch.randn(5))  # same dtype, broadcasts into each step
        self.grid = nn.Parameter(torch.randn(3, 5))  # x[:, :1] + grid is larger than x[:, :1]
        self.register_buffer("wide", torch.randn(5, dtype=torch.float64))  # float32 + float64 -> float64

    def forward(self, x: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
        a = x + self.row + 0.5 - 2  # tensor and numbers
        b = x[:, :1] + self.grid  # [N, 1, 5] + [3, 5] -> [N, 3, 5]
        c = (x + self.wide).float()
        d = x + per_sample  # a static per-sample input, repeated over the folded batch
        e = x * x.mean(-1, keepdim=True)  # [N, 3, 5] * [N, 3, 1]: time * time of one rank, broadcast
        f = x.sum((1, 2)).unsqueeze(-1) * x.mean(1)  # [N, 1] * [N, 5]
        g = torch.tanh(x) + F.linear(x, self.grid, self.grid[0, :3].detach()).sum(-1, keepdim=True)
        return torch.cat([a, b, c, d, e, f.unsqueeze(1), g], dim=1)


@pytest.mark.parametrize("autograd", [True, False])
def test_constants_and_broadcast_products_equal_the_ann(autograd: bool) -> None:
    torch.manual_seed(0)
    ann = _Constants()
    snn = TDTimeFolded(ann, time_inputs={0}, strict=True)
    x, per_sample = torch.randn(5, 2, 3, 5), torch.randn(2, 3, 5)
    with torch.set_grad_enabled(autograd):
        out = snn(x, per_sample)
        refs = [ann(c, per_sample) for c in x.cumsum(0)]
    assert out.dtype == torch.float32
    for t, ref in enumerate(refs):
        torch.testing.assert_close(out.cumsum(0)[t], ref, atol=1e-5, rtol=1e-5)
    if autograd:  # the gradients reach the constants through the copies they were added into
        out.sum().backward()
        refs[-1].sum().backward()  # the sum of the differences is the last cumulative step
        torch.testing.assert_close(snn.model.row.grad, ann.row.grad)
        torch.testing.assert_close(snn.model.grid.grad, ann.grid.grad)


@pytest.mark.parametrize("autograd", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_grouped_query_attention_equals_the_ann(autograd: bool, causal: bool) -> None:
    # enable_gqa=True with 4 query heads on 2 key/value heads: without autograd the running sums are attended
    # with SDPA's own head repeat, with autograd the TD attention gets repeated heads; both equal the ANN
    torch.manual_seed(0)

    class Gqa(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(8, 16, bias=False)
            self.kv = nn.Linear(8, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.q(x).unflatten(-1, (4, 4)).transpose(1, 2)  # [N, 4, L, 4]
            k, v = self.kv(x).unflatten(-1, (2, 2, 4)).permute(2, 0, 3, 1, 4).unbind(0)  # [N, 2, L, 4] each
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            return y.transpose(1, 2).flatten(2)

    ann = Gqa().double()
    snn = TDTimeFolded(ann, strict=True)
    x = torch.randn(5, 2, 6, 8, dtype=torch.float64)
    with torch.set_grad_enabled(autograd):
        out = snn(x)
    for t, c in enumerate(x.cumsum(0)):
        torch.testing.assert_close(out.cumsum(0)[t], ann(c), atol=1e-9, rtol=1e-9)
    assert any("TDScaledDotProductAttention" in r.detail for r in snn.report.converted)


class _MixedMatmul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ x.float().transpose(-1, -2)


def test_operator_errors_are_the_anns_not_unsupported_operand() -> None:
    """``a @ b`` of float64 and float32 time tensors: the ANN's own error, not the "unsupported operand
    type(s)" that Tensor's operators make of a TD operator's TypeError."""
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError) as ann_error:
        _MixedMatmul()(x[0])
    with pytest.raises(RuntimeError) as td_error:
        TDTimeFolded(_MixedMatmul())(x)
    assert str(td_error.value) == str(ann_error.value)


def test_a_handler_type_error_the_plain_op_does_not_raise_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from ann2snn_fx.td import fold_table

    def broken(*args: object) -> None:
        raise TypeError("the handler's own limit")

    for func in [f for f in fold_table._HANDLERS if getattr(f, "__name__", "") == "matmul"]:
        monkeypatch.setitem(fold_table._HANDLERS, func, broken)
    x = torch.randn(3, 2, 4, 5)
    with pytest.raises(
        RuntimeError, match=r"TDTimeFolded: .*matmul.* on time-varying tensors failed: the handler's own"
    ):
        TDTimeFolded(Fn(lambda m, y: y @ y.transpose(-1, -2)))(x)

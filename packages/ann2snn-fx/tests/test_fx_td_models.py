"""Real transformer models end to end: the cumulative output equals the ANN at every time step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from ann2snn_fx.td import TDEquivalenceError, TDTimeFolded, replace_by_td_operators

TOL = {torch.float64: 1e-9, torch.float32: 1e-5}
_CURRENT: dict[str, pytest.Item] = {}


@pytest.fixture(autouse=True)
def _current_test(request: pytest.FixtureRequest) -> None:
    """The running test, so that _assert_cumulative can record the error it measured (docs/models.md)."""
    _CURRENT["item"] = request.node


def _assert_cumulative(
    out: torch.Tensor, ref: list[torch.Tensor], dtype: torch.dtype, precision: torch.dtype | None = None
) -> None:
    """``out``'s running sum equals ``ref`` at every step, to the tolerance of ``precision`` (default ``dtype``:
    a model that casts time-varying data to float32 holds only to float32 precision)."""
    cum = out.cumsum(0)
    error = max((cum[t] - expected).abs().max().item() for t, expected in enumerate(ref))
    label = f"{dtype}" if precision in (None, dtype) else f"{dtype}, to {precision} precision"
    _CURRENT["item"].user_properties.append(("max_abs_error", f"{error:.1e} ({label})".replace("torch.", "")))
    tol = TOL[precision or dtype]
    for t, expected in enumerate(ref):
        torch.testing.assert_close(cum[t], expected, atol=tol, rtol=tol)


class EncoderBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """A small ViT: conv patches, class token, positional embedding, MHA blocks, class-token head."""

    def __init__(
        self, width: int = 16, heads: int = 2, depth: int = 2, patch: int = 4, classes: int = 5
    ) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, width, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, 1 + (16 // patch) ** 2, width))
        self.blocks = nn.Sequential(*[EncoderBlock(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vit_with_multihead_attention(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    ann = ViT().to(dtype).eval()
    snn = TDTimeFolded(ann, strict=True)
    x = torch.randn(4, 3, 3, 16, 16, dtype=dtype)
    out = snn(x)
    assert out.shape == (4, 3, 5)
    _assert_cumulative(out, [ann(c) for c in x.cumsum(0)], dtype)
    converted = " ".join(r.detail for r in snn.report.converted)
    assert "TDMultiheadAttention" in converted
    assert "constant members placed at t = 0 only" in converted
    assert ann.training is False  # the caller's model is untouched
    assert type(ann.blocks[0].attn) is nn.MultiheadAttention


def test_vit_fx_path_is_not_silent() -> None:
    torch.manual_seed(0)
    with pytest.raises(TDEquivalenceError) as info:
        replace_by_td_operators(ViT().eval(), strict=True)
    nodes = [r.node for r in info.value.issues]
    assert nodes[:4] == ["flatten", "transpose", "getitem", "cat"]  # getitem: x.shape[0]
    assert any(node.startswith("getitem") for node in nodes)


class HandRolledAttention(nn.Module):
    """Multi-head self-attention written with matmul + softmax and the model's own head reshapes."""

    def __init__(self, width: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, width), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(out)
        return x + self.ff(x) * torch.sigmoid(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hand_rolled_attention_block(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    ann = HandRolledAttention().to(dtype).eval()
    snn = TDTimeFolded(ann, strict=True)
    x = torch.randn(5, 2, 7, 12, dtype=dtype)
    _assert_cumulative(snn(x), [ann(c) for c in x.cumsum(0)], dtype)
    converted = " ".join(r.op + r.detail for r in snn.report.converted)
    for name in ("TDMatMul", "TDSoftmax", "TDMul", "TDSiLU"):
        assert name in converted


class SingleHeadAttention(nn.Module):
    """Hand-rolled attention using only negative dims: the fx path converts it exactly."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.scale = width**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(self.q(x), self.k(x).transpose(-2, -1)) * self.scale
        return torch.softmax(scores, dim=-1) @ self.v(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hand_rolled_attention_fx_path(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    ann = SingleHeadAttention().to(dtype).eval()
    gm = replace_by_td_operators(ann, strict=True)
    x = torch.randn(6, 2, 5, 8, dtype=dtype)
    _assert_cumulative(gm(x), [ann(c) for c in x.cumsum(0)], dtype)


transformers = pytest.importorskip("transformers")


def _bert(attn_implementation: str, dtype: torch.dtype) -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=16,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_hugging_face_bert(attn_implementation: str, dtype: torch.dtype) -> None:
    bert = _bert(attn_implementation, dtype)
    snn = TDTimeFolded(bert, time_inputs={"inputs_embeds"}, strict=True)
    torch.manual_seed(1)
    steps, batch, length = 4, 3, 9
    embeds = torch.randn(steps, batch, length, 32, dtype=dtype)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -3:] = 0
    out = snn(inputs_embeds=embeds, attention_mask=mask)
    refs = [bert(inputs_embeds=c, attention_mask=mask) for c in embeds.cumsum(0)]
    _assert_cumulative(out.last_hidden_state, [r.last_hidden_state for r in refs], dtype)
    _assert_cumulative(out.pooler_output, [r.pooler_output for r in refs], dtype)
    details = " ".join(r.detail for r in snn.report.converted)
    assert "constant added at t = 0 only" in details  # token-type and position embeddings
    assert snn.report.equivalent


def test_bert_in_training_mode_reports_dropout() -> None:
    bert = _bert("eager", torch.float32).train()
    snn = TDTimeFolded(bert, time_inputs={"inputs_embeds"})
    snn(inputs_embeds=torch.randn(2, 1, 4, 32))
    assert any("dropout in training mode" in r.detail for r in snn.report.issues)
    with pytest.raises(TDEquivalenceError, match="dropout in training mode"):
        TDTimeFolded(bert, time_inputs={"inputs_embeds"}, strict=True)(inputs_embeds=torch.randn(2, 1, 4, 32))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_hugging_face_gpt2_causal(attn_implementation: str) -> None:
    config = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16, attn_implementation=attn_implementation
    )
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Model(config).double().eval()
    snn = TDTimeFolded(gpt2, time_inputs={"inputs_embeds"}, strict=True)
    embeds = torch.randn(3, 2, 6, 32, dtype=torch.float64)
    out = snn(inputs_embeds=embeds, use_cache=False).last_hidden_state
    refs = [gpt2(inputs_embeds=c, use_cache=False).last_hidden_state for c in embeds.cumsum(0)]
    _assert_cumulative(out, refs, torch.float64)
    converted = " ".join(r.op for r in snn.report.converted)
    assert "torch.addmm" in converted  # GPT-2's Conv1D
    assert "torch.pow" in converted  # its tanh-GELU written by hand


class HeadsWithNegativeDims(nn.Module):
    """Multi-head attention whose reshapes keep the leading dims (x.shape[:-1]): the fx path handles it."""

    def __init__(self, width: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        split = x.shape[:-1] + (self.heads, -1)  # noqa: RUF005 - unpacking a Proxy does not trace
        q, k, v = (t.reshape(split).transpose(-3, -2) for t in (q, k, v))
        out = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v
        return self.proj(out.transpose(-3, -2).reshape(x.shape))


def test_multi_head_attention_with_negative_dims_fx_path() -> None:
    torch.manual_seed(0)
    ann = HeadsWithNegativeDims().double().eval()
    gm = replace_by_td_operators(ann, strict=True)
    x = torch.randn(4, 2, 5, 12, dtype=torch.float64)
    _assert_cumulative(gm(x), [ann(c) for c in x.cumsum(0)], torch.float64)


def _zoo(name: str) -> tuple[nn.Module, str, tuple[int, ...]]:
    small = {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48}
    if name == "vit":
        config = transformers.ViTConfig(hidden_size=32, image_size=16, patch_size=4, **small)
        return transformers.ViTModel(config), "pixel_values", (3, 16, 16)
    if name == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=48)
        return transformers.DistilBertModel(config), "inputs_embeds", (7, 32)
    if name == "t5":
        # T5's RMS norm multiplies the states by an rsqrt computed in float32: mixed dtypes in float64
        config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
        return transformers.T5EncoderModel(config), "inputs_embeds", (7, 32)
    # grouped-query attention, rotary embeddings, RMSNorm computed in float32, SiLU-gated MLP
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, num_key_value_heads=2, max_position_embeddings=32, **small
    )
    return transformers.LlamaModel(config), "inputs_embeds", (7, 32)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("vit", torch.float64),
        ("distilbert", torch.float64),
        ("llama", torch.float32),
        ("t5", torch.float64),
        ("t5", torch.float32),
    ],
)
def test_hugging_face_zoo(name: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model, key, shape = _zoo(name)
    model = model.to(dtype).eval()
    snn = TDTimeFolded(model, time_inputs={key}, strict=True)
    x = torch.randn(3, 2, *shape, dtype=dtype)
    out = snn(**{key: x}).last_hidden_state
    ref = [model(**{key: c}).last_hidden_state for c in x.cumsum(0)]
    # T5 computes its RMS norm's variance from a float32 cast of the states, which rounds each step
    # separately: in float64 the equivalence holds to float32 precision (the TDTimeFolded docstring says so)
    _assert_cumulative(out, ref, dtype, torch.float32 if name == "t5" else None)

"""replace_by_td_operators: the seed's behaviour, and the seed's bugs fixed."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx
from torch.fx.proxy import TraceError

from ann2snn_fx.td import TDConversionReport, replace_by_td_operators
from ann2snn_ops import (
    TDGELU,
    TDLayerNorm,
    TDLinear,
    TDMultiheadAttention,
    TDScaledDotProductAttention,
)


def _cumulative_close(gm: nn.Module, ann: nn.Module, *inputs: torch.Tensor, atol: float = 1e-5) -> None:
    """Every prefix sum of the converted output equals the ANN on the cumulative input."""
    out = gm(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    cums = [x.cumsum(0) for x in inputs]
    for t in range(inputs[0].shape[0]):
        ref = ann(*[c[t] for c in cums])
        ref = ref[0] if isinstance(ref, tuple) else ref
        torch.testing.assert_close(out.cumsum(0)[t], ref, atol=atol, rtol=atol)


class Block(nn.Module):
    def __init__(self, e: int = 8, h: int = 2) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(e)
        self.attn = nn.MultiheadAttention(e, h, batch_first=True)
        self.fc = nn.Linear(e, 2 * e)
        self.act = nn.GELU(approximate="tanh")
        self.out = nn.Linear(2 * e, e, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.out(self.act(self.fc(x)))


def test_seed_modules_replaced_with_parameters_copied() -> None:
    torch.manual_seed(0)
    ann = Block().eval()
    gm = replace_by_td_operators(ann)
    assert isinstance(gm, fx.GraphModule)
    assert type(gm.ln) is TDLayerNorm
    assert type(gm.fc) is TDLinear
    assert type(gm.act) is TDGELU
    assert type(gm.attn) is TDMultiheadAttention
    assert gm.act.approximate == "tanh"
    assert gm.out.bias is None
    torch.testing.assert_close(gm.fc.weight, ann.fc.weight)
    _q, k, _v = ann.attn.in_proj_weight.chunk(3)
    torch.testing.assert_close(gm.attn.k_proj.weight, k)
    torch.testing.assert_close(gm.attn.v_proj.bias, ann.attn.in_proj_bias.chunk(3)[2])
    torch.testing.assert_close(gm.attn.out_proj.weight, ann.attn.out_proj.weight)
    assert gm.fc.weight.data_ptr() != ann.fc.weight.data_ptr()
    _cumulative_close(gm, ann, torch.randn(5, 2, 3, 8))
    report = gm.td_report
    assert isinstance(report, TDConversionReport)
    assert report.equivalent
    assert {r.detail for r in report.converted} >= {"-> TDLinear", "-> TDMultiheadAttention"}


def test_t1_equals_ann() -> None:
    torch.manual_seed(1)
    ann = Block().eval()
    x = torch.randn(1, 2, 3, 8)
    torch.testing.assert_close(replace_by_td_operators(ann)(x)[0], ann(x[0]), atol=1e-6, rtol=1e-6)


def test_training_state_and_requires_grad_preserved() -> None:
    torch.manual_seed(0)
    ann = Block()
    ann.ln.eval()
    ann.fc.weight.requires_grad_(False)
    ann.attn.in_proj_weight.requires_grad_(False)
    gm = replace_by_td_operators(ann)
    assert gm.training
    assert gm.fc.training
    assert gm.attn.training
    assert not gm.ln.training
    assert not gm.fc.weight.requires_grad
    assert gm.fc.bias.requires_grad
    assert not gm.attn.q_proj.weight.requires_grad
    assert gm.attn.out_proj.weight.requires_grad
    ann.eval()
    gm = replace_by_td_operators(ann)
    assert all(not m.training for m in gm.modules())


def test_input_model_untouched_even_on_device_change() -> None:
    torch.manual_seed(0)
    ann = Block().eval()
    before = {k: v.clone() for k, v in ann.state_dict().items()}
    gm = replace_by_td_operators(ann, device="meta")
    assert gm.fc.weight.device.type == "meta"
    assert all(p.device.type == "cpu" for p in ann.parameters())
    for key, value in ann.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert type(ann.fc) is nn.Linear
    assert not hasattr(ann, "td_report")


def test_new_sdpa_modules_follow_eval_mode() -> None:
    class Att(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v)

    gm = replace_by_td_operators(Att().eval())
    assert not gm.td_scaled_dot_product_attention_0.training


def test_mha_tuple_output_is_kept() -> None:
    class Raw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            return self.attn(x, x, x, need_weights=False)

    out = replace_by_td_operators(Raw().eval())(torch.randn(2, 1, 3, 8))
    assert isinstance(out, tuple)
    assert out[1] is None
    assert out[0].shape == (2, 1, 3, 8)


class _MHAModel(nn.Module):
    def __init__(self, call: str = "plain", **kwargs: object) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, **{"batch_first": True, **kwargs})  # type: ignore[arg-type]
        self.call = call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.call == "default_weights":
            return self.attn(x, x, x)[0]
        if self.call == "kpm":
            return self.attn(x, x, x, x[..., 0] > 0, False)[0]
        if self.call == "avg":
            return self.attn(x, x, x, need_weights=False, average_attn_weights=False)[0]
        return self.attn(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize(
    ("kwargs", "call", "message"),
    [
        ({"batch_first": False}, "default_weights", "requires need_weights=False"),  # either layout
        ({"kdim": 4}, "default_weights", r"kdim == vdim == embed_dim"),
        ({"vdim": 4}, "plain", r"kdim == vdim == embed_dim"),
        ({"add_bias_kv": True}, "default_weights", "does not support add_bias_kv"),
        ({"add_zero_attn": True}, "default_weights", "does not support add_zero_attn"),
        ({}, "default_weights", "requires need_weights=False"),
        ({}, "avg", "does not support average_attn_weights=False"),
    ],
)
def test_mha_rejections_in_seed_order(kwargs: dict[str, object], call: str, message: str) -> None:
    ann = _MHAModel(call, **kwargs).eval()
    with pytest.raises(ValueError, match=message):
        replace_by_td_operators(ann)


def test_mha_key_padding_mask_is_converted_and_one_from_time_data_reported() -> None:
    """The seed refused every key_padding_mask; now a constant one converts (test_fx_td_padding_masks.py) and
    this one, computed from the time-varying input, is reported instead of being refused."""
    ann = _MHAModel("kpm").eval()
    gm = replace_by_td_operators(ann)
    assert "call_module TDMultiheadAttention" in {r.op for r in gm.td_report.issues}
    assert any("key_padding_mask is computed from the time-sequence" in r.detail for r in gm.td_report.issues)


def test_every_call_site_of_a_shared_mha_is_validated() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.attn(x, x, x, need_weights=False)[0]
            return self.attn(y, y, y)[0]  # need_weights defaults to True: must be rejected

    with pytest.raises(ValueError, match="requires need_weights=False"):
        replace_by_td_operators(Shared().eval())


class _SDPA(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = self.mode
        if m == "kw":
            return F.scaled_dot_product_attention(query=q, key=k, value=v, scale=0.5)
        if m == "dropout":
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
        if m == "gqa":
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        if m == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[-1] > 2)
        if m == "scale":
            return F.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)
        return F.scaled_dot_product_attention(q, k, v, None, 0.0, True)


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("dropout", r"only supports literal dropout_p=0.0, but got 0.1"),
        ("gqa", "does not support enable_gqa=True"),
        ("causal", "only supports literal bool is_causal, but got gt"),
        ("scale", "only supports literal numeric scale or None, but got pow"),
    ],
)
def test_sdpa_rejections(mode: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace_by_td_operators(_SDPA(mode))


def test_sdpa_missing_qkv_is_rejected() -> None:
    # Python cannot trace such a call, but a custom tracer can hand one over.
    class HandMade(fx.Tracer):
        def trace(self, root, concrete_args=None):  # type: ignore[no-untyped-def,override]
            graph = fx.Graph()
            q = graph.placeholder("q")
            graph.output(graph.call_function(F.scaled_dot_product_attention, (q, q)))
            self.root = root
            return graph

    with pytest.raises(ValueError, match=r"SDPA node must have query, key, and value arguments\."):
        replace_by_td_operators(nn.Identity(), tracer_class=HandMade)


@pytest.mark.parametrize("mode", ["kw", "positional"])
def test_sdpa_positional_and_keyword_qkv(mode: str) -> None:
    torch.manual_seed(0)
    ann = _SDPA(mode)
    gm = replace_by_td_operators(ann)
    module = gm.td_scaled_dot_product_attention_0
    assert isinstance(module, TDScaledDotProductAttention)
    assert (module.scale, module.is_causal) == ((0.5, False) if mode == "kw" else (None, True))
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert len(node.args) == 4
    assert node.args[3] is None
    q, k, v = (torch.randn(3, 2, 2, 5, 4) for _ in range(3))
    _cumulative_close(gm, ann, q, k, v)


def test_new_names_never_collide() -> None:
    class Taken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.td_scaled_dot_product_attention_0 = nn.Linear(4, 4)

        def forward(self, q: torch.Tensor) -> torch.Tensor:
            y = F.scaled_dot_product_attention(q, q, q)
            return self.td_scaled_dot_product_attention_0(y)

    torch.manual_seed(0)
    ann = Taken()
    gm = replace_by_td_operators(ann)
    assert isinstance(gm.td_scaled_dot_product_attention_0, TDLinear)
    assert isinstance(gm.td_scaled_dot_product_attention_1, TDScaledDotProductAttention)
    _cumulative_close(gm, ann, torch.randn(3, 2, 5, 4))


def test_type_errors() -> None:
    with pytest.raises(TypeError, match=r"expects an nn\.Module"):
        replace_by_td_operators(lambda x: x)  # type: ignore[arg-type]


def test_mha_query_key_value_by_keyword() -> None:
    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            return self.attn(x, key=m, value=m, need_weights=False)[0]

    torch.manual_seed(0)
    ann = Keywords().eval()
    _cumulative_close(replace_by_td_operators(ann), ann, torch.randn(3, 2, 4, 8), torch.randn(3, 2, 5, 8))


def test_mha_call_check_needs_a_node() -> None:
    from ann2snn_fx.td.build import check_mha_call

    with pytest.raises(ValueError, match=r"TD MHA conversion requires an FX node\."):
        check_mha_call(None)


def test_untraceable_models_point_to_td_time_folded() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(TraceError, match="convert with TDTimeFolded"):
        replace_by_td_operators(Branchy())


def test_gradients_of_the_converted_graph_match_the_ann() -> None:
    torch.manual_seed(0)
    ann = Block().double().eval()
    gm = replace_by_td_operators(ann)
    x = torch.randn(4, 2, 3, 8, dtype=torch.float64)
    gm(x).sum().backward()  # sum over time = the ANN's output on the summed input
    ann(x.sum(0)).sum().backward()
    grads = dict(gm.named_parameters())
    torch.testing.assert_close(grads["fc.weight"].grad, ann.fc.weight.grad)
    torch.testing.assert_close(grads["ln.bias"].grad, ann.ln.bias.grad)
    packed = torch.cat([grads[f"attn.{p}_proj.weight"].grad for p in "qkv"])
    torch.testing.assert_close(packed, ann.attn.in_proj_weight.grad)


def test_converting_twice_changes_nothing() -> None:
    torch.manual_seed(0)
    ann = Block().eval()
    once = replace_by_td_operators(ann, strict=True)
    twice = replace_by_td_operators(once, strict=True)
    assert twice.td_report.converted == []
    x = torch.randn(3, 2, 3, 8)
    torch.testing.assert_close(twice(x), once(x))

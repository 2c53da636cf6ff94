"""profile_snn on time-folded SNNs: TDTimeFolded (analog, MACs as the ANN) and SpikeZIPSNN (spike-driven)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ann2snn_fx import TDTimeFolded, calibrate_qann, prepare_qann, qann_to_snn
from ann2snn_fx.analysis import profile_snn
from ann2snn_ops import STBIFNeuron

transformers = pytest.importorskip("transformers")

_WEIGHTED = ("F.linear", "F.conv2d", "torch.mm", "torch.matmul", "torch.addmm", "TDMatMul", "TDMul")


class Attention(nn.Module):
    """A small hand-written attention block: qkv heads, SDPA, projection, a gated (product) MLP."""

    def __init__(self, width: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm, self.ff = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (
            t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
            for t in self.qkv(self.norm(x)).chunk(3, -1)
        )
        att = F.scaled_dot_product_attention(q, k, v)  # the QANN computes it in its parts: two matmuls
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, c))
        return x + self.ff(x) * torch.sigmoid(x)


class Patches(nn.Module):
    """ViT-style: conv patches (fed the image: analog), then the attention block."""

    def __init__(self) -> None:
        super().__init__()
        self.patch, self.block = nn.Conv2d(3, 8, 4, stride=4), Attention()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.block(self.patch(images).flatten(2).transpose(1, 2))


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=8, attn_implementation="sdpa",
    )  # fmt: skip
    return transformers.BertModel(cfg).eval()


def _sequence(x: torch.Tensor, steps: int) -> torch.Tensor:
    return torch.cat([x.unsqueeze(0), x.new_zeros(steps - 1, *x.shape)])


@pytest.mark.parametrize("name", ["attention", "patches", "bert", "gpt2"])
def test_spike_driven_transformer_feeds_spikes_to_every_weight_layer_and_product(name: str) -> None:
    torch.manual_seed(0)
    if name in ("bert", "gpt2"):  # GPT-2's Conv1D layers are addmm calls
        cfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=8)
        model: nn.Module = _bert() if name == "bert" else transformers.GPT2Model(cfg).eval()
        x = torch.randn(2, 5, 16)
        mask = torch.ones(2, 5, dtype=torch.long)
        mask[1, -1] = 0
        qann = prepare_qann(model, 8, example_inputs={"inputs_embeds": x, "attention_mask": mask})
        calibrate_qann(qann, [{"inputs_embeds": x, "attention_mask": mask}], input_fn=lambda b: b)
        snn = qann_to_snn(qann, time_inputs={"inputs_embeds"})
        inputs: Any = {"inputs_embeds": _sequence(x, 12), "attention_mask": mask}
    else:
        model = (Attention() if name == "attention" else Patches()).eval()
        x = torch.randn(2, 5, 8) if name == "attention" else torch.randn(2, 3, 8, 8)
        qann = calibrate_qann(prepare_qann(model, 8, example_inputs=x), [x])
        snn = qann_to_snn(qann)
        inputs = _sequence(x, 12)
    profile = profile_snn(snn, inputs, 12)
    products = [r for r in profile.layers if r.op in _WEIGHTED]
    analog = [r for r in products if r.role != "spikes"]
    # every weight layer and product is fed ternary spikes, except those the QANN left fed the model input
    assert len(analog) == sum(qann.report.left.values()), [(r.name, r.source) for r in analog]
    assert all("analog operand" in r.source for r in analog)
    fed = [s.split(" <- ") for r in products if r.role == "spikes" for s in r.source.split("; ")]
    assert {neuron for _, neuron in fed} == {site.key for site in qann.report.sites}  # every neuron feeds one
    for r in products:
        if r.role == "spikes":
            assert len(r.source.split("; ")) == (2 if r.op.startswith("TD") else 1)
    assert (
        any(r.op in ("TDMatMul", "torch.matmul") and r.role == "spikes" for r in products) or name == "bert"
    )
    neurons = [r for r in profile.layers if r.role == "neuron"]
    assert len(neurons) == len(snn.neurons())
    assert profile.sop > 0
    assert profile.events > 0


class _Pair(nn.Module):
    """Two projections of the input multiplied together: one Linear fed spikes and a product of spikes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, L, 3]
        scores = self.a(x) @ self.b(x).transpose(-1, -2)  # [B, L, L]
        return self.out(scores @ self.a(x))  # [B, L, 2]


def test_sops_equal_a_brute_force_loop_over_synapses() -> None:
    torch.manual_seed(0)
    model, x = _Pair().eval(), torch.randn(2, 3, 3)
    qann = calibrate_qann(prepare_qann(model, 8, example_inputs=x), [x])
    snn = qann_to_snn(qann)
    seq = _sequence(x, 10)
    seen: dict[str, torch.Tensor] = {}
    keys = {id(m): k for k, m in snn.model.neurons.items()}
    hook = nn.modules.module.register_module_forward_hook(
        lambda m, a, out: seen.__setitem__(keys[id(m)], out / m.spike_unit) if id(m) in keys else None
    )
    try:
        with torch.no_grad():
            snn(seq)
    finally:
        hook.remove()
    profile = profile_snn(snn, seq, 10)
    rows = {r.name: r for r in profile.layers}
    for key, spikes in seen.items():  # events hand-counted from the neurons' outputs, [T, B, ...]
        assert rows[key].events_pos == pytest.approx(float(spikes.clamp(min=0).sum()) / 2)
        assert rows[key].events_neg == pytest.approx(float(-spikes.clamp(max=0).sum()) / 2)
    products = [r for r in profile.layers if r.op == "TDMatMul"]
    assert len(products) == 2
    assert all(r.role == "spikes" for r in products)
    first = products[0]
    a_key, b_key = (s.split(" <- ")[1] for s in first.source.split("; "))
    a, b = seen[a_key], seen[b_key]  # [T, B, L, 4] @ [T, B, 4, L] (b quantised after its transpose)
    sop = 0
    for t in range(10):  # every event of a reaches L outputs per row; of b, L outputs per column
        for s in range(2):
            for i in range(3):
                for k in range(4):
                    for j in range(3):
                        sop += abs(int(a[t, s, i, k])) + abs(int(b[t, s, k, j]))
    assert first.sop == pytest.approx(sop / 2)
    out = rows["out"]
    assert out.role == "spikes"
    assert out.op == "F.linear"
    fed = seen[out.source.split(" <- ")[1]]
    assert out.sop == pytest.approx(float(fed.abs().sum()) * 2 / 2)  # events x out_features, per sample
    assert out.ann_mac == 3 * 4 * 2
    assert rows["a"].role == "analog"  # fed the model input: MACs every step
    assert rows["a"].mac == 10 * 3 * 3 * 4


def test_conv_fed_spikes_counts_exact_border_fanout() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU(), nn.Conv2d(2, 3, 3, stride=2, padding=1)).eval()
    x = torch.randn(2, 1, 7, 7)
    qann = calibrate_qann(prepare_qann(model, 4, example_inputs=x), [x])
    snn = qann_to_snn(qann)
    seq = _sequence(x, 6)
    profile = profile_snn(snn, seq, 6)
    row = next(r for r in profile.layers if r.name == "2")
    neuron: STBIFNeuron = snn.neurons()[0]
    with torch.no_grad():  # the neuron's spikes, recomputed outside the SNN
        pre = torch.nn.functional.conv2d(seq.flatten(0, 1), model[0].weight).unflatten(0, (6, 2))
        pre[0] += model[0].bias.reshape(-1, 1, 1)
        events = (
            STBIFNeuron(neuron.scale, neuron.n_min, neuron.n_max)(
                torch.nn.functional.gelu(pre.cumsum(0)).diff(dim=0, prepend=torch.zeros_like(pre[:1]))
            )
            / neuron.spike_unit
        )
    sop = 0
    for oy in range(3):  # 5x5 input, kernel 3, stride 2, padding 1 -> 3x3 outputs, 3 channels
        for ox in range(3):
            for ky in range(3):
                for kx in range(3):
                    iy, ix = 2 * oy + ky - 1, 2 * ox + kx - 1
                    if 0 <= iy < 5 and 0 <= ix < 5:
                        sop += 3 * float(events[:, :, :, iy, ix].abs().sum())
    assert row.role == "spikes"
    assert row.sop == pytest.approx(sop / 2)


def test_td_time_folded_bert_counts_macs_as_the_ann_every_step() -> None:
    torch.manual_seed(0)
    bert = _bert()
    snn = TDTimeFolded(bert, time_inputs={"inputs_embeds"})
    seq = torch.randn(4, 2, 5, 16)
    profile = profile_snn(snn, {"inputs_embeds": seq}, 4)
    rows = {r.name: r for r in profile.layers}
    query = rows["encoder.layer.0.attention.self.query"]
    assert query.role == "analog"
    assert query.ann_mac == 5 * 16 * 16
    assert query.mac == 4 * 5 * 16 * 16
    assert profile.sop == 0.0
    assert profile.events == 0.0
    with pytest.raises(ValueError, match="time_steps"):
        profile_snn(snn, {"inputs_embeds": seq}, 5)
    with pytest.raises(ValueError, match="mode"):
        profile_snn(snn, {"inputs_embeds": seq}, 4, mode="step")


class _Floor(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.floor(x)  # not time-transparent: the fold mode runs it unchanged and reports it


def test_diagnose_td_finds_the_broken_module_of_a_time_folded_model() -> None:
    from ann2snn_fx.analysis import diagnose_td

    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.LayerNorm(6), nn.Linear(6, 3)).eval()
    seq = torch.randn(3, 2, 4)
    good = diagnose_td(ann, TDTimeFolded(ann), seq)
    assert good.first_broken is None
    assert [n.name for n in good.nodes] == ["0", "1", "2", "3"]
    assert max(n.deviation for n in good.nodes) < 1e-5
    bad_ann = nn.Sequential(nn.Linear(4, 6), _Floor(), nn.Linear(6, 3)).eval()
    bad = diagnose_td(bad_ann, TDTimeFolded(bad_ann), seq * 3)
    assert bad.first_broken == "1"
    assert bad.nodes[0].deviation < 1e-5


def test_diagnose_td_compares_a_settled_spikezip_snn_with_its_qann() -> None:
    from ann2snn_fx.analysis import diagnose_td

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3)).eval(), torch.randn(8, 4)
    qann = calibrate_qann(prepare_qann(model, 8, example_inputs=x), [x])
    snn = qann_to_snn(qann)
    _, steps = snn.run_until_quiet(x)
    settled = diagnose_td(qann, snn, _sequence(x, steps + 1))
    assert settled.first_broken is None
    assert {n.name for n in settled.nodes} == {"0", "1", "2"}
    early = diagnose_td(qann, snn, _sequence(x, 1))  # one step: the counts have not settled
    assert early.first_broken is not None
    with pytest.raises(TypeError, match="QANN"):
        diagnose_td(model, snn, _sequence(x, 4))


def test_a_per_channel_spike_unit_counts_events_not_amplitudes() -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3)).eval(), torch.randn(8, 4)
    snn = qann_to_snn(calibrate_qann(prepare_qann(model, 8, example_inputs=x), [x]))
    neuron = snn.neurons()[0]
    neuron.scale = neuron.scale * torch.linspace(0.5, 2.0, 6)  # one step per channel: spikes of 6 amplitudes
    seq = _sequence(x, 10)
    spikes: list[torch.Tensor] = []
    handle = neuron.register_forward_hook(lambda m, a, out: spikes.append(out / m.scale))
    try:
        with torch.no_grad():
            snn(seq)
    finally:
        handle.remove()
    events = spikes[0]
    assert set(events.unique().tolist()) <= {-1.0, 0.0, 1.0}
    profile = profile_snn(snn, seq, 10)
    rows = {r.name: r for r in profile.layers}
    assert rows[next(iter(snn.model.neurons))].events == pytest.approx(float(events.abs().sum()) / 8)
    assert rows["2"].role == "spikes"
    assert rows["2"].sop == pytest.approx(float(events.abs().sum()) * 3 / 8)

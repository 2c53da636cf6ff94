"""profile_snn in sequence mode: TD transformers (MACs as the ANN, T times) and spike-driven blocks (events)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ann2snn_fx import replace_by_td_operators, trace_model
from ann2snn_fx.analysis import profile_snn


def _row(profile, name):
    return next(r for r in profile.layers if r.name == name)


class STBIF(nn.Module):
    """A stand-in ST-BIF neuron (SPEC 14.1) on full sequences ``[T, ...]``: ternary spikes times ``scale``."""

    def __init__(self, scale: float, n_min: int, n_max: int) -> None:
        super().__init__()
        self.scale, self.n_min, self.n_max, self.spike_unit = scale, n_min, n_max, scale

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        q, c, out = torch.full_like(x_seq[0], 0.5), torch.zeros_like(x_seq[0]), []
        for x in x_seq:
            q = q + x / self.scale
            spike = ((q >= 1) & (c < self.n_max)).float() - ((q < 0) & (c > self.n_min)).float()
            q, c = q - spike, c + spike
            out.append(spike * self.scale)
        return torch.stack(out)


def test_td_transformer_and_spike_driven_block_in_sequence_mode() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 4)).eval()
    td = replace_by_td_operators(ann)
    x = torch.randn(5, 3, 6)  # T=5, B=3
    profile = profile_snn(td, x, 5, mode="sequence")
    rows = {r.name: r for r in profile.layers}
    assert rows["0"].role == "analog"
    assert rows["0"].ann_mac == 6 * 8
    assert rows["0"].mac == 5 * 6 * 8
    assert rows["2"].ann_mac == 4 * 8
    assert rows["3"].mac == 5 * 8 * 4
    assert profile.sop == 0.0

    stbif = STBIF(0.25, -4, 3)
    sdt = trace_model(nn.Sequential(nn.Linear(6, 8), stbif, nn.Linear(8, 4)), leaf_modules=[STBIF])
    x_seq = torch.zeros(8, 3, 6)
    x_seq[0] = torch.randn(3, 6)  # analog input at t = 0 only
    profile = profile_snn(sdt, x_seq, 8, mode="sequence")
    with torch.no_grad():
        spikes = stbif(sdt.get_submodule("0")(x_seq)) / 0.25
    neuron = _row(profile, "1")
    assert neuron.events_pos == pytest.approx(float(spikes.clamp(min=0).sum()) / 3)
    assert neuron.events_neg == pytest.approx(float(-spikes.clamp(max=0).sum()) / 3)
    assert neuron.events_neg > 0  # the case where amplitude-weighted counting would cancel
    assert _row(profile, "2").role == "spikes"
    assert _row(profile, "2").sop == pytest.approx(neuron.events * 4)


def test_attention_products_count_macs_as_the_ann() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scores = self.q(x) @ self.k(x).transpose(-1, -2)  # [B, L, L]
            out, _ = self.mha(x, x, x, need_weights=False)
            return scores.sum(-1, keepdim=True) + out

    torch.manual_seed(0)
    td = replace_by_td_operators(Attention().eval())
    profile = profile_snn(td, torch.randn(3, 2, 5, 4), 3, mode="sequence")  # T=3, B=2, L=5, E=4
    by_op = {r.op: r for r in profile.layers}
    assert by_op["TDMatMul"].ann_mac == 5 * 5 * 4  # L x L outputs, E each
    assert by_op["TDMatMul"].mac == 3 * 5 * 5 * 4
    # projections q, k, v, out: 4 x (L E E); scores and weighted sum: 2 x (L L E)
    assert by_op["TDMultiheadAttention"].ann_mac == 4 * 5 * 4 * 4 + 2 * 5 * 5 * 4

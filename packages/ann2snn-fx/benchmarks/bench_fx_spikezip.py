"""Benchmark: SpikeZIP SNN (ours, multi-step) against SpikingJelly 2.0.0's SpikeZIP recipe, tiny RoBERTa-style.

Run: ``python packages/ann2snn-fx/benchmarks/bench_fx_spikezip.py [--quick] [--markdown PATH]``.

One float model (post-LN encoder: LayerNorm'd embeddings, self-attention, ReLU feed-forward), quantised by
``prepare_qann`` + ``calibrate_qann`` (level 16); SpikingJelly gets the same QANN hand-written in its
RoBERTa form (``query/key/value`` + ``*_quan`` attributes) with the same steps, converted by
``ModuleConverter(SpikeZIPTFQANNRecipe())`` and run step by step (its recipe's single-step loop). Peak
memory is the growth of the process's max RSS while one path runs, each path in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from _timing import bench_parser, emit, median_times

from ann2snn_fx import QANN, calibrate_qann, prepare_qann, qann_to_snn


class Layer(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.dense, self.ln1 = nn.Linear(width, width), nn.LayerNorm(width)
        self.inter, self.out, self.ln2 = (
            nn.Linear(width, 4 * width),
            nn.Linear(4 * width, width),
            nn.LayerNorm(width),
        )

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], self.heads, -1).transpose(-3, -2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        ctx = (probs @ v).transpose(-3, -2).flatten(-2)
        x = self.ln1(x + self.dense(ctx))
        return self.ln2(x + self.out(F.relu(self.inter(x))))


class Encoder(nn.Module):
    def __init__(self, width: int, heads: int, depth: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.layers = nn.Sequential(*[Layer(width, heads) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.ln(x))


# ---- the same QANN in SpikingJelly's RoBERTa form ------------------------------------------------------
class SJQuan(nn.Module):
    """SpikeZIP's quantiser interface (``s``, ``sym``, ``pos_max``, ``neg_min``, ``level``)."""

    def __init__(self, scale: float, n_min: int, n_max: int, level: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(scale))
        self.sym, self.pos_max, self.neg_min, self.level = n_min < 0, n_max, n_min, level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.floor(x / self.s + 0.5), self.neg_min, self.pos_max) * self.s


class SJSelfAttention(nn.Module):
    def __init__(self, layer: Layer, quan: Callable[[str], SJQuan]) -> None:
        super().__init__()
        self.query, self.key, self.value = layer.query, layer.key, layer.value
        self.num_attention_heads = layer.heads
        self.attention_head_size = layer.query.out_features // layer.heads
        self.all_head_size = layer.query.out_features
        self.dropout = nn.Identity()
        self.query_quan, self.key_quan = quan("matmul0:a"), quan("matmul0:b")
        self.attn_quan, self.value_quan = quan("matmul1:a"), quan("matmul1:b")
        self.after_attn_quan = quan("/dense:linear0:x")

    def forward(self, x: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor]:
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(*t.shape[:-1], self.num_attention_heads, -1).transpose(-3, -2)

        q, k = split(self.query_quan(self.query(x))), split(self.key_quan(self.key(x)))
        v = split(self.value_quan(self.value(x)))
        probs = self.attn_quan(
            torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.attention_head_size), -1)
        )
        return (self.after_attn_quan((probs @ v).transpose(-3, -2).flatten(-2)),)


class SJLayer(nn.Module):
    """The same layer as SpikeZIP-style QANN modules (SJ's recipe converts attention, Linear, LN, quantisers)."""

    def __init__(self, layer: Layer, quan: Callable[[str], SJQuan]) -> None:
        super().__init__()
        self.in_quan = quan("/query:linear0:x")
        self.attention = SJSelfAttention(layer, quan)
        self.dense, self.ln1, self.inter_quan = layer.dense, layer.ln1, quan("/inter:linear0:x")
        self.inter, self.relu, self.out_quan = layer.inter, nn.ReLU(), quan("/out:linear0:x")
        self.out, self.ln2 = layer.out, layer.ln2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.dense(self.attention(self.in_quan(x))[0]))
        return self.ln2(x + self.out(self.out_quan(self.relu(self.inter(self.inter_quan(x))))))


def sj_qann(qann: QANN) -> nn.Module:
    """Our QANN rebuilt in SpikingJelly's RoBERTa form: same weights, same quantiser sites and steps."""
    model: Any = qann.model

    def quan_of(i: int) -> Callable[[str], SJQuan]:
        def make(site: str) -> SJQuan:
            key = f"layers/{i}" + (site if site.startswith("/") else ":" + site)
            q: Any = qann.quantizers[key]
            return SJQuan(float(q.step.detach()), q.n_min, q.n_max, q.levels)

        return make

    return nn.Sequential(model.ln, *[SJLayer(layer, quan_of(i)) for i, layer in enumerate(model.layers)])


def _sj_snn(qann: QANN) -> nn.Module:
    from spikingjelly.activation_based.ann2snn import ModuleConverter, SpikeZIPTFQANNRecipe

    return ModuleConverter(SpikeZIPTFQANNRecipe(time_steps=32, model_family="roberta")).convert(sj_qann(qann))


def _sj_run(snn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from spikingjelly.activation_based import functional

    functional.reset_net(snn)
    return torch.stack([snn(x[t]) for t in range(x.shape[0])])


def build(quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    width, heads, depth, tokens, batch, steps = (32, 4, 1, 8, 2, 8) if quick else (128, 4, 2, 64, 16, 32)
    ann = Encoder(width, heads, depth).eval()
    calib = [torch.randn(batch, tokens, width) for _ in range(2)]
    qann = calibrate_qann(prepare_qann(ann, 16, example_inputs=calib[0]), calib)
    x = torch.randn(batch, tokens, width)
    seq = torch.cat([x.unsqueeze(0), torch.zeros(steps - 1, *x.shape)])
    return {"qann": qann, "x": x, "seq": seq, "shape": (width, heads, depth, tokens, batch, steps)}


def paths(setup: dict[str, Any]) -> dict[str, Callable[[], object]]:
    qann, x, seq = setup["qann"], setup["x"], setup["seq"]
    flat = torch.randn(seq.shape[0] * x.shape[0], *x.shape[1:])
    snn = qann_to_snn(qann)
    for neuron in snn.neurons():
        neuron.record_activity = False  # a fixed-T run: no settle bookkeeping
    sj = _sj_snn(qann)
    return {
        "qann_TB": lambda: qann(flat),
        "qann_Tx_B": lambda: [qann(x) for _ in range(seq.shape[0])],
        "ours": lambda: snn(seq),
        "sj": lambda: _sj_run(sj, seq),
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1])


def _peak_growth(fn: Callable[[], object]) -> float:
    """MiB the resident set peaks above its level before ``fn`` (freed heap trimmed, peak counter reset)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    before = _status_kib("VmRSS")
    with torch.inference_mode():
        fn()
    return (_status_kib("VmHWM") - before) / 1024


def peak(path: str, quick: bool) -> float:
    """MiB the process's max RSS grows by while ``path`` runs once (in a fresh subprocess)."""
    cmd = [sys.executable, __file__, "--peak-of", path] + (["--quick"] if quick else [])
    return float(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))


def run(quick: bool) -> str:
    setup = build(quick)
    width, heads, depth, tokens, batch, steps = setup["shape"]
    fns = paths(setup)
    repeats = 1 if quick else 5
    with torch.inference_mode():
        times = median_times(fns, repeats)
        ref = setup["qann"](setup["x"])
        snn = qann_to_snn(setup["qann"])
        ours = snn(setup["seq"]).sum(0)
        sj = _sj_run(_sj_snn(setup["qann"]), setup["seq"]).sum(0)
    parity = {"ours": float((ours - ref).abs().max()), "sj": float((sj - ref).abs().max())}
    flips = {
        "ours": float(((ours - ref).abs() > 1e-4).float().mean()),
        "sj": float(((sj - ref).abs() > 1e-4).float().mean()),
    }
    mem = {name: peak(name, quick) for name in ("qann_TB", "ours", "sj")}
    base = times["qann_TB"]
    mem_base = max(mem["qann_TB"], 1e-9)
    lines = [
        "## ann2snn-fx: SpikeZIP SNN against SpikingJelly 2.0.0",
        "",
        f"Tiny RoBERTa-style encoder (hidden {width}, {heads} heads, {depth} layers, ReLU FFN), level 16, "
        f"seq {tokens}, batch {batch}, T = {steps}; QANN by `prepare_qann` + `calibrate_qann`; SpikingJelly "
        "gets the same QANN in its RoBERTa form (same weights, sites and steps), converted by "
        "`SpikeZIPTFQANNRecipe` and run by its single-step loop. Times are ratios to the QANN's forward on "
        f"`[T*B]` ({base * 1e3:.1f} ms; float32, CPU, {torch.get_num_threads()} thread(s), median of {repeats}); "
        "peak memory is the max-RSS growth of one run in a fresh process, as a ratio to the QANN on `[T*B]`. "
        f"Parity: max abs error of the summed output against the QANN after T steps, and the "
        f"share of output elements off by more than 1e-4 (a quantiser input within float rounding of a "
        f"rounding boundary flips one count): ours {parity['ours']:.1e} ({flips['ours']:.1e}), "
        f"SpikingJelly {parity['sj']:.1e} ({flips['sj']:.1e}).",
        "",
        "| path | time / QANN[T*B] | time / (T x QANN[B]) | peak memory / QANN[T*B] |",
        "|---|---|---|---|",
        f"| QANN on [T*B] | 1.00x | {base / times['qann_Tx_B']:.2f}x | 1.00x ({mem['qann_TB']:.0f} MiB) |",
        f"| ours (`qann_to_snn`, multi-step) | {times['ours'] / base:.2f}x | "
        f"{times['ours'] / times['qann_Tx_B']:.2f}x | {mem['ours'] / mem_base:.2f}x |",
        f"| SpikingJelly 2.0.0 (single-step loop) | {times['sj'] / base:.2f}x | "
        f"{times['sj'] / times['qann_Tx_B']:.2f}x | {mem['sj'] / mem_base:.2f}x |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_of:
        print(json.dumps(_peak_growth(paths(build(args.quick))[args.peak_of])))
        return
    emit(run(args.quick), args.markdown)


if __name__ == "__main__":
    main()

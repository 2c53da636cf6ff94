"""Benchmark: the cost of the accounting (profile_snn) and of the conversion doctor (diagnose).

Run: ``python packages/ann2snn-fx/benchmarks/bench_fx_analysis.py [--quick] [--markdown PATH]``.

Measured side by side in one run (medians of interleaved repeats), on a converted CNN (3 conv layers, Conv+BN
folded) at T = 32:

* ``profile_snn`` in step-loop and multi-step mode against the plain ``run_snn`` of the same mode (target: at
  most 1.3x);
* ``diagnose`` against the plain step-loop ``run_snn`` (target: at most 3x);
* ``profile_snn`` on a spike-driven transformer block (``SpikeZIPSNN``, the time-folded path: a
  ``TorchFunctionMode`` and module hooks) against its plain forward on the same sequence (target: at most 1.3x);
* the peer, SpikingJelly 2.0.0's ``DispatchCounterMode([SynOpCounter(), MACCounter()])`` around the same step
  loop (it counts a threshold-scaled spike as a MAC: its SynOp total is shown beside ours).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
from _timing import emit, median_times
from torch.utils.data import DataLoader, TensorDataset

from ann2snn_fx import Converter, calibrate_qann, diagnose, prepare_qann, profile_snn, qann_to_snn, run_snn


class _Block(nn.Module):
    """A small attention block: norm, qkv heads, q @ k^T, softmax, @ v, projection, MLP (all products quantised)."""

    def __init__(self, width: int, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(x)


def _spike_driven(quick: bool) -> tuple[nn.Module, torch.Tensor, int]:
    width, batch, tokens, t = (16, 2, 4, 4) if quick else (64, 8, 16, 32)
    x = torch.randn(batch, tokens, width)
    qann = calibrate_qann(prepare_qann(_Block(width).eval(), 16, example_inputs=x), [x])
    return qann_to_snn(qann), torch.cat([x[None], torch.zeros(t - 1, *x.shape)]), t


def _cnn(width: int) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, width), nn.AvgPool2d(2), *block(width, 2 * width), nn.AvgPool2d(2), *block(2 * width, 2 * width),
        nn.Flatten(), nn.Linear(2 * width * 8 * 8, 10),
    )  # fmt: skip


def _peer(snn: nn.Module, x: torch.Tensor, t: int) -> tuple[object, int] | None:
    try:
        from spikingjelly.activation_based.op_counter import DispatchCounterMode, MACCounter, SynOpCounter
    except ImportError:
        return None
    synop, mac = SynOpCounter(), MACCounter()

    def run() -> None:
        synop.reset()
        mac.reset()
        with DispatchCounterMode([synop, mac]):
            run_snn(snn, x, t)

    run()
    return run, synop.get_total()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (a smoke test)")
    parser.add_argument("--markdown", help="write the markdown section to this path")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    torch.manual_seed(0)
    width, batch, t, repeats = (4, 4, 4, 1) if args.quick else (16, 32, 32, 5)
    ann = _cnn(width).eval()
    x = torch.rand(batch, 3, 32, 32)
    snn = Converter(
        DataLoader(TensorDataset(x), batch_size=batch), progress=False
    ).convert_to_spiking_neurons(ann)
    snn.eval()
    fns = {
        "run_snn (step loop)": lambda: run_snn(snn, x, t),
        "profile_snn (step loop)": lambda: profile_snn(snn, x, t),
        "run_snn (multi-step)": lambda: run_snn(snn, x, t, multi_step=True),
        "profile_snn (multi-step)": lambda: profile_snn(snn, x, t, mode="multi"),
        "diagnose (step loop)": lambda: diagnose(ann, snn, x, t),
    }
    sdt, x_seq, t_sdt = _spike_driven(args.quick)
    fns["SpikeZIPSNN forward (spike-driven, T steps)"] = lambda: sdt(x_seq)
    fns["profile_snn (SpikeZIPSNN)"] = lambda: profile_snn(sdt, x_seq, t_sdt)
    peer = _peer(snn, x, t)
    if peer is not None:
        fns["SpikingJelly 2.0.0 SynOp+MAC counters (step loop)"] = peer[0]  # type: ignore[assignment]
    times = median_times(fns, repeats)
    base = {"step": times["run_snn (step loop)"], "multi": times["run_snn (multi-step)"]}
    base["spike"] = times["SpikeZIPSNN forward (spike-driven, T steps)"]
    rows = ["| what | seconds | relative to the plain run of its mode | target |", "|---|---|---|---|"]
    targets = {"profile_snn": "<= 1.3x", "diagnose": "<= 3x"}
    for name, seconds in times.items():
        mode = "multi" if "multi-step" in name else "spike" if "SpikeZIPSNN" in name else "step"
        target = next((v for k, v in targets.items() if name.startswith(k)), "")
        rows.append(f"| {name} | {seconds:.3f} | {seconds / base[mode]:.2f}x | {target} |")
    ours = profile_snn(snn, x, t)
    lines = [
        "## ann2snn-fx: accounting and conversion doctor",
        "",
        f"Measured on CPU with {torch.get_num_threads()} torch threads, medians of {repeats} interleaved "
        f"repeats; a converted 3-conv CNN (width {width}, input {tuple(x.shape)}), T = {t}; a spike-driven "
        f"attention block (SpikeZIPSNN, levels 16, sequence {tuple(x_seq.shape)}), T = {t_sdt}.",
        "",
        *rows,
        "",
        f"Synaptic operations per inference: ours {ours.sop:.4g} SOP + {ours.mac:.4g} MAC (events counted once, "
        "threshold-scaled spikes included)"
        + (
            ""
            if peer is None
            else f"; SpikingJelly's SynOpCounter {peer[1] / batch:.4g} (it sees the scaled spikes as non-binary, "
            "so they go to its MAC counter)"
        )
        + ".",
        "",
    ]
    emit("\n".join(lines), args.markdown, start)


if __name__ == "__main__":
    main()

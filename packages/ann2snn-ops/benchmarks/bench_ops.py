#!/usr/bin/env python
"""Cost of the TD operators relative to the plain torch op, side by side with SpikingJelly 2.0.0's.

For realistic ViT shapes each TD operator runs on a time sequence ``[T, B, ...]`` and the plain torch op on
the same data folded to ``[T*B, ...]`` (the floor: a TD op must at least do the plain op's work). Reported
per op, as ratios to the plain op measured in the same run (medians of interleaved repeats):

- forward time (inference, ``torch.no_grad``) and forward+backward time (inputs and parameters need grad);
- peak memory of the forward and of the forward+backward call, each being the bytes of the live inputs and
  parameters plus the highest net allocation during the call, read from ``torch.profiler``'s
  ``profile_memory`` events (the CPU analogue of ``torch.cuda.max_memory_allocated``).

SpikingJelly 2.0.0's operators are timed if ``spikingjelly`` imports (``pip install --no-deps
spikingjelly==2.0.0 loguru``); anything that does not import or fails is reported as ``n/a``. A last
table gives the half-precision accuracy: the max error of the cumulative output against a float64 ground
truth, relative to the largest reference value, for inputs whose cumulative sum grows.

Run: ``python bench_ops.py [--quick] [--markdown PATH]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence the profiler's start/stop lines

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

import ann2snn_ops as ops

try:
    from spikingjelly.activation_based.ann2snn import operators as sj

    SJ_NOTE = "SpikingJelly 2.0.0 imported"
except Exception as exc:  # pragma: no cover - depends on the bench venv
    sj = None
    SJ_NOTE = f"SpikingJelly not available ({type(exc).__name__}: {exc}); its columns are n/a"


@dataclass(frozen=True)
class Shape:
    t: int
    b: int
    n: int  # tokens
    c: int  # width
    h: int  # heads

    @property
    def label(self) -> str:
        return f"T={self.t}, B={self.b}, N={self.n}, C={self.c}, H={self.h}"


FULL = [Shape(4, 8, 197, 192, 3), Shape(16, 4, 64, 384, 6), Shape(32, 4, 64, 192, 3)]
QUICK = [Shape(4, 2, 16, 32, 2)]


@dataclass
class Case:
    """One operator: inputs ``[T, B, ...]``, the plain op on folded inputs, our module, SpikingJelly's."""

    name: str
    inputs: list[torch.Tensor]
    plain: Callable[..., torch.Tensor]
    ours: Callable[..., torch.Tensor]
    theirs: Callable[..., torch.Tensor] | None
    params: list[torch.Tensor] = field(default_factory=list)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _sj_call(module: nn.Module | None) -> Callable[..., torch.Tensor] | None:
    if module is None:
        return None

    def call(*xs: torch.Tensor) -> torch.Tensor:
        module.reset()  # 2.0.0's multi-step mode keeps accumulating across calls until reset
        return _first(module(*xs))

    return call


def _sj(factory: Callable[[], nn.Module]) -> nn.Module | None:
    if sj is None:
        return None
    try:
        return factory()
    except Exception:
        return None


def _copy_params(dst: nn.Module | None, src: nn.Module) -> nn.Module | None:
    if dst is not None:
        try:
            dst.load_state_dict(src.state_dict())
        except Exception:
            return None
    return dst


def make_cases(s: Shape, gen: torch.Generator) -> list[Case]:
    t, b, n, c, h = s.t, s.b, s.n, s.c, s.h
    d = c // h

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    x = rnd(t, b, n, c)
    cases: list[Case] = []

    lin = ops.TDLinear(c, c)
    sj_lin = _copy_params(_sj(lambda: sj.TDLinear(c, c)), lin)
    cases.append(
        Case(
            "Linear",
            [x],
            lambda a: F.linear(a, lin.weight, lin.bias),
            lin,
            _sj_call(sj_lin),
            list(lin.parameters()),
        )
    )

    ch, side = (64, 28) if c >= 128 else (8, 8)  # a hybrid-ViT / ConvNet stage; tiny for --quick
    conv = ops.TDConv2d(ch, ch, 3, padding=1)
    sj_conv = _copy_params(_sj(lambda: sj.TDConv2d(ch, ch, 3, padding=1)), conv)
    xc = rnd(t, 2, ch, side, side)  # batch 2: the convolution is the heaviest case

    def conv_plain(a: torch.Tensor) -> torch.Tensor:
        return F.conv2d(a, conv.weight, conv.bias, padding=1)

    cases.append(
        Case(
            f"Conv2d 3x3 {ch}ch {side}x{side} (B=2)",
            [xc],
            conv_plain,
            conv,
            _sj_call(sj_conv),
            list(conv.parameters()),
        )
    )

    cases.append(Case("GELU", [x], F.gelu, ops.TDGELU(), _sj_call(_sj(lambda: sj.TDGELU()))))
    cases.append(Case("SiLU", [x], F.silu, ops.TDSiLU(), _sj_call(_sj(lambda: sj.TDSiLU()))))

    scores = rnd(t, b, h, n, n)
    cases.append(
        Case(
            "Softmax (scores)",
            [scores],
            lambda a: torch.softmax(a, -1),
            ops.TDSoftmax(-1),
            _sj_call(_sj(lambda: sj.TDSoftmax(-1))),
        )
    )

    ln = ops.TDLayerNorm(c)
    sj_ln = _copy_params(_sj(lambda: sj.TDLayerNorm(c)), ln)
    cases.append(
        Case(
            "LayerNorm",
            [x],
            lambda a: F.layer_norm(a, (c,), ln.weight, ln.bias),
            ln,
            _sj_call(sj_ln),
            list(ln.parameters()),
        )
    )
    rms = ops.TDRMSNorm(c)
    sj_rms = _copy_params(_sj(lambda: sj.TDRMSNorm(c)), rms)
    cases.append(
        Case(
            "RMSNorm",
            [x],
            lambda a: F.rms_norm(a, (c,), rms.weight),
            rms,
            _sj_call(sj_rms),
            list(rms.parameters()),
        )
    )

    q, k, v = rnd(t, b, h, n, d), rnd(t, b, h, n, d), rnd(t, b, h, n, d)
    cases.append(
        Case(
            "SDPA",
            [q, k, v],
            F.scaled_dot_product_attention,
            ops.TDScaledDotProductAttention(),
            _sj_call(_sj(lambda: sj.TDScaledDotProductAttention())),
        )
    )

    mha = ops.TDMultiheadAttention(c, h)
    ref = nn.MultiheadAttention(c, h, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([mha.q_proj.bias, mha.k_proj.bias, mha.v_proj.bias]))
        ref.out_proj.load_state_dict(mha.out_proj.state_dict())
    sj_mha = _copy_params(_sj(lambda: sj.TDMultiheadAttention(c, h)), mha)

    def mha_plain(a: torch.Tensor) -> torch.Tensor:
        return ref(a, a, a, need_weights=False)[0]

    def mha_ours(a: torch.Tensor) -> torch.Tensor:
        return mha(a, a, a)[0]

    sj_mha_call = None
    if sj_mha is not None:

        def sj_mha_call(a: torch.Tensor) -> torch.Tensor:
            sj_mha.reset()
            return sj_mha(a, a, a, need_weights=False)[0]

    cases.append(
        Case("MultiheadAttention (self)", [x], mha_plain, mha_ours, sj_mha_call, list(ref.parameters()))
    )

    kt = rnd(t, b, h, d, n)
    cases.append(
        Case(
            "MatMul q@kT",
            [q, kt],
            torch.matmul,
            ops.TDMatMul(),
            _sj_call(_sj(lambda: sj.SNNMatrixOperator())),
        )
    )
    cases.append(
        Case(
            "Mul",
            [x, rnd(t, b, n, c)],
            torch.mul,
            ops.TDMul(),
            _sj_call(_sj(lambda: sj.SNNElementWiseProduct())),
        )
    )
    return cases


# -- measurement ------------------------------------------------------------------------------------------------


def _fold(xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [x.flatten(0, 1) for x in xs]


def _runner(
    fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], params: list[torch.Tensor], backward: bool
) -> Callable[[], None]:
    if not backward:

        def run() -> None:
            with torch.no_grad():
                fn(*inputs)

        return run
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    grad: list[torch.Tensor] = []

    def run_bwd() -> None:
        y = fn(*leaves)
        if not grad:
            grad.append(torch.randn_like(y))
        y.backward(grad[0])
        del y
        for p in (*leaves, *params):  # each run allocates its gradients afresh, none outlives it
            p.grad = None

    return run_bwd


def _peak_bytes(runs: dict[str, Callable[[], None]]) -> dict[str, int]:
    """Highest net allocation during each run, from one profiler session (runs marked by record_function)."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for label, run in runs.items():
            with record_function(f"bench::{label}"):
                run()
            gc.collect()
    events = prof.profiler.kineto_results.events()
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    spans = {
        e.name()[len("bench::") :]: (e.start_ns(), e.end_ns())
        for e in events
        if e.name().startswith("bench::")
    }
    peaks: dict[str, int] = {}
    for label, (start, end) in spans.items():
        live = peak = 0
        for ts, nbytes in memory:
            if start <= ts <= end:
                live += nbytes
                peak = max(peak, live)
        peaks[label] = peak
    return peaks


def _nbytes(ts: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def measure(case: Case, repeats: int) -> dict[str, dict[str, float | None]]:
    """Ratios to the plain op: {'fwd'|'fwdbwd'|'mem_fwd'|'mem_fwdbwd': {'ours': r, 'sj': r}} plus plain ms."""
    impls: dict[str, tuple[Callable[..., torch.Tensor], list[torch.Tensor]]] = {
        "plain": (case.plain, _fold(case.inputs)),
        "ours": (case.ours, case.inputs),
    }
    if case.theirs is not None:
        impls["sj"] = (case.theirs, case.inputs)
    out: dict[str, dict[str, float | None]] = {}
    base = _nbytes(case.inputs) + _nbytes(case.params)
    all_runs: dict[str, Callable[[], None]] = {}
    for mode, backward in (("fwd", False), ("fwdbwd", True)):
        runs: dict[str, Callable[[], None]] = {}
        for name, (fn, inputs) in impls.items():
            run = _runner(fn, inputs, case.params, backward)
            try:
                run()  # warm-up; SpikingJelly may reject a configuration
            except Exception as exc:
                if name == "sj":
                    print(
                        f"  [n/a] SpikingJelly {case.name} {mode}: {type(exc).__name__}: {exc}",
                        file=sys.stderr,
                    )
                    continue
                raise
            runs[name] = run
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():  # interleaved, so machine noise hits every implementation alike
                start = time.process_time()
                run()
                times[name].append(time.process_time() - start)
        # Median over repeats of the ratio to the plain run of the same repeat (paired: drift cancels).
        out[mode] = {
            name: statistics.median(a / max(p, 1e-9) for a, p in zip(times[name], times["plain"]))
            if name in times
            else None
            for name in ("ours", "sj")
        }
        out[mode]["plain_ms"] = statistics.median(times["plain"]) * 1e3
        all_runs.update({f"{mode}:{name}": run for name, run in runs.items()})
    peaks = {label: base + peak for label, peak in _peak_bytes(all_runs).items()}
    for mode in ("fwd", "fwdbwd"):
        plain = peaks[f"{mode}:plain"]
        out[f"mem_{mode}"] = {
            name: peaks[f"{mode}:{name}"] / plain if f"{mode}:{name}" in peaks else None
            for name in ("ours", "sj")
        }
    return out


# -- half precision ---------------------------------------------------------------------------------------------


def precision_rows(ts: Sequence[int]) -> list[list[str]]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ln = ops.TDLayerNorm(64)
    lin = ops.TDLinear(64, 64)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    specs: list[
        tuple[str, Callable[[], nn.Module], Callable[[], nn.Module | None], Callable[..., torch.Tensor], int]
    ] = [
        ("GELU", ops.TDGELU, lambda: _sj(lambda: sj.TDGELU()), F.gelu, 1),
        ("Softmax", ops.TDSoftmax, lambda: _sj(lambda: sj.TDSoftmax(-1)), lambda a: torch.softmax(a, -1), 1),
        (
            "LayerNorm",
            lambda: ln,
            lambda: _copy_params(_sj(lambda: sj.TDLayerNorm(64)), ln),
            lambda a: F.layer_norm(a, (64,), ln.weight.to(a.dtype), ln.bias.to(a.dtype)),
            1,
        ),
        (
            "Linear",
            lambda: lin,
            lambda: _copy_params(_sj(lambda: sj.TDLinear(64, 64)), lin),
            lambda a: F.linear(a, lin.weight.to(a.dtype), lin.bias.to(a.dtype)),
            1,
        ),
        (
            "SDPA",
            ops.TDScaledDotProductAttention,
            lambda: _sj(lambda: sj.TDScaledDotProductAttention()),
            F.scaled_dot_product_attention,
            3,
        ),
    ]
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for t in ts:
            for name, make, make_sj, plain, arity in specs:
                # positive drift: the cumulative input grows with t
                xs = [
                    (0.05 + 0.05 * torch.randn(t, 4, 16, 64, generator=gen, dtype=torch.float64))
                    for _ in range(arity)
                ]
                half = [x.to(dtype) for x in xs]
                cum64 = [x.double().cumsum(0) for x in half]
                ref = plain(*cum64)

                def rel(y: torch.Tensor, ref: torch.Tensor = ref) -> str:
                    return f"{((y.double() - ref).abs().max() / ref.abs().max()).item():.1e}"

                with torch.no_grad():
                    plain_err = rel(plain(*(x.to(dtype) for x in cum64)))
                    ours_err = rel(make().to(dtype)(*half).double().cumsum(0))
                    theirs = make_sj()
                    try:
                        sj_err = (
                            "n/a"
                            if theirs is None
                            else rel(_sj_call(theirs.to(dtype))(*half).double().cumsum(0))
                        )
                    except Exception:
                        sj_err = "n/a"
                rows.append([name, str(dtype).replace("torch.", ""), str(t), plain_err, ours_err, sj_err])
    return rows


# -- output -----------------------------------------------------------------------------------------------------


def _fmt(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes, one repeat: a smoke test of seconds"
    )
    parser.add_argument("--markdown", metavar="PATH", help="write the markdown section to PATH")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--only", metavar="SUBSTRING", help="run only the ops whose name contains SUBSTRING")
    parser.add_argument(
        "--shape", type=int, default=None, help="run only the full-size shape with this index"
    )
    args = parser.parse_args(argv)
    shapes = QUICK if args.quick else FULL
    if args.shape is not None:
        shapes = [FULL[args.shape]]
    repeats = args.repeats or (1 if args.quick else 5)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    parts = [
        "## ann2snn-ops: TD operators against the plain op and SpikingJelly 2.0.0",
        "",
        "Each TD operator runs on a time sequence `[T, B, ...]`; the plain torch op runs on the same data folded "
        "to `[T*B, ...]` (the floor). Figures are ratios to the plain op measured in the same run: the median over "
        f"{repeats} interleaved repeats of (TD time / plain time of that repeat). Time is the process CPU time "
        "(user + system, so page faults of fresh buffers count) with "
        f"{torch.get_num_threads()} torch thread(s): on a shared machine wall-clock time mostly measures the "
        f"neighbours (torch {torch.__version__}). "
        "*fwd* is inference under `no_grad`; *fwd+bwd* includes the backward pass with inputs and parameters "
        "requiring grad. *mem* is the peak memory of the call: bytes of the live inputs and parameters plus the "
        "highest net allocation during the call, from `torch.profiler` memory events (`profile_memory=True`). "
        f"SJ = SpikingJelly 2.0.0's operator ({SJ_NOTE}).",
    ]
    header = [
        "op",
        "plain fwd ms",
        "fwd ours",
        "fwd SJ",
        "fwd+bwd ours",
        "fwd+bwd SJ",
        "mem fwd ours",
        "mem fwd SJ",
        "mem fwd+bwd ours",
        "mem fwd+bwd SJ",
    ]
    for shape in shapes:
        rows = []
        for case in make_cases(shape, gen):
            if args.only and args.only.lower() not in case.name.lower():
                continue
            r = measure(case, repeats)
            rows.append(
                [
                    case.name,
                    f"{r['fwd']['plain_ms']:.2f}",
                    _fmt(r["fwd"]["ours"]),
                    _fmt(r["fwd"]["sj"]),
                    _fmt(r["fwdbwd"]["ours"]),
                    _fmt(r["fwdbwd"]["sj"]),
                    _fmt(r["mem_fwd"]["ours"]),
                    _fmt(r["mem_fwd"]["sj"]),
                    _fmt(r["mem_fwdbwd"]["ours"]),
                    _fmt(r["mem_fwdbwd"]["sj"]),
                ]
            )
            print(f"{shape.label} | " + " | ".join(rows[-1]), file=sys.stderr, flush=True)
        parts += ["", f"### {shape.label}", "", _table(header, rows)]
    ts = (16,) if args.quick else (16, 256, 1024)
    parts += [
        "",
        "### Half-precision accuracy",
        "",
        "Max |error| of the cumulative output against float64, relative to the largest reference value; inputs "
        "`0.05 + 0.05 * randn` (the cumulative sum grows with T), shape `[T, 4, 16, 64]`. *plain* is the torch "
        "op on the correctly rounded cumulative input in the same dtype.",
        "",
        _table(["op", "dtype", "T", "plain", "ours", "SJ"], precision_rows(ts)),
        "",
        f"Total benchmark time: {time.perf_counter() - started:.0f} s.",
    ]
    text = "\n".join(parts) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

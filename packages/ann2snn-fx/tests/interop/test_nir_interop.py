"""The proof of the NIR export: converted CNNs, written to file, read back and run by from_nir, sinabs and
snnTorch, spike for spike against the converted SNN at every layer (T = 32, batch 1 and batch > 1).

These tests need the ``nir`` extra and the consumers; ``nox -s interop`` installs them at the pinned
versions. Without them (the plain ``tests(fx)`` session) every test here is skipped with the reason.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

pytest.importorskip("nir", reason="needs the ann2snn-fx[nir] extra (nox -s interop installs it)")

import importlib.util
import pathlib

import nir

_spec = importlib.util.spec_from_file_location(
    "nir_consumers", pathlib.Path(__file__).with_name("nir_consumers.py")
)
assert _spec is not None
assert _spec.loader is not None
consumers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(consumers)
ResCNN, digits, digits_cnn, train = consumers.ResCNN, consumers.digits, consumers.digits_cnn, consumers.train
original_spikes, from_nir_spikes = consumers.original_spikes, consumers.from_nir_spikes
threshold_margins = consumers.threshold_margins
sinabs_spikes, snntorch_spikes = consumers.sinabs_spikes, consumers.snntorch_spikes

from ann2snn_fx import Converter, ThresholdOptimizer  # noqa: E402
from ann2snn_fx.export import from_nir, to_nir, write_nir  # noqa: E402

_MODELS: dict[str, Any] = {}


def _model(name: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if name not in _MODELS:
        xtr, ytr, xte, yte = digits()
        torch.manual_seed(0)
        ann = train(digits_cnn() if name == "digits" else ResCNN(), xtr, ytr, epochs=3)
        snn = Converter(
            [xtr[i : i + 256] for i in range(0, 1024, 256)], progress=False
        ).convert_to_spiking_neurons(ann)
        path = tmp_path_factory.mktemp("nir") / f"{name}.nir"
        start = time.perf_counter()
        write_nir(snn, path, xte[:1])
        print(f"{name}: to_nir + nir.write took {time.perf_counter() - start:.3f} s")  # a figure, not a check
        _MODELS[name] = {"snn": snn, "graph": nir.read(path), "x": xte[:96], "y": yte[:96]}
    return _MODELS[name]


TIE = 1e-5
"""A membrane within ``TIE·θ`` of its threshold is a tie: the folded weights and thresholds of the export are
rounded products, so such an entry may fire in one simulator and not in the other."""


def _assert_same(
    spikes: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    margins: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Every spike entry equal; with ``margins`` (:func:`threshold_margins` of the reference SNN), a sample may
    differ only where its first difference (earliest step, first neuron layer in data-flow order) is a tie.

    Returns the mask ``[B]`` of the samples whose spikes agree at every layer and step.
    """
    assert sorted(spikes) == sorted(reference)
    names = list(margins) if margins is not None else list(reference)
    for name in names:
        assert spikes[name].shape == reference[name].shape, name
    differ = {k: spikes[k] != reference[k] for k in names}
    per_layer = torch.stack([d.flatten(2).any(2) for d in differ.values()])  # [layers, T, B]
    diverged = per_layer.any(1).any(0)
    counts = {k: int(d.sum()) for k, d in differ.items() if d.any()}
    if margins is None:
        assert not counts, f"spike entries differ: {counts}"
        return ~diverged
    for b in diverged.nonzero().flatten().tolist():
        t = int(per_layer[:, :, b].any(0).nonzero()[0])
        name = names[int(per_layer[:, t, b].nonzero()[0])]
        worst = float(margins[name][t, b][differ[name][t, b]].max())
        assert worst <= TIE, (
            f"sample {b}: the first difference (step {t}, {name}) is not a tie: the SNN's membrane was "
            f"{worst:.2e}·θ from its threshold (ties are within {TIE:g}·θ); differing entries: {counts}"
        )
    # Ties are rare: 0 or 1 of the 96 test digits differed, for either model, on the two CPUs measured.
    assert int(diverged.sum()) <= max(1, diverged.numel() // 20), (
        f"{int(diverged.sum())} samples differ: {counts}"
    )
    return ~diverged


def _accuracy(out: torch.Tensor, y: torch.Tensor) -> float:
    return (out.mean(0).argmax(-1) == y).float().mean().item()


CASES = [("digits", 1), ("digits", 96), ("res", 1), ("res", 96)]


@pytest.mark.parametrize(("name", "batch"), CASES)
def test_from_nir_reproduces_every_spike(
    name: str, batch: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    m = _model(name, tmp_path_factory)
    x = m["x"][:batch]
    reference, out = original_spikes(m["snn"], x)
    spikes, out_nir = from_nir_spikes(from_nir(m["graph"]), x)
    agree = _assert_same(spikes, reference, threshold_margins(m["snn"], x))
    # the folded weights round differently
    torch.testing.assert_close(out_nir[:, agree], out[:, agree], rtol=1e-5, atol=1e-4)
    assert sum(int(s.sum()) for s in reference.values()) > 0


@pytest.mark.parametrize(("name", "batch"), CASES)
def test_sinabs_reproduces_every_spike(
    name: str, batch: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pytest.importorskip("sinabs", reason="sinabs is installed by nox -s interop")
    m = _model(name, tmp_path_factory)
    x = m["x"][:batch]
    reference, out = original_spikes(m["snn"], x)
    spikes, out_sinabs = sinabs_spikes(m["graph"], x)
    agree = _assert_same(spikes, reference, threshold_margins(m["snn"], x))
    torch.testing.assert_close(out_sinabs[:, agree], out[:, agree], rtol=1e-5, atol=1e-4)
    if batch > 1:
        y = m["y"][:batch][agree]
        assert _accuracy(out_sinabs[:, agree], y) == _accuracy(out[:, agree], y)


@pytest.mark.parametrize(("name", "batch"), CASES)
def test_snntorch_reproduces_every_spike(
    name: str, batch: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """snnTorch fires on ``v > θ``: it equals from_nir(spike_condition=">") exactly, and the original SNN
    wherever no membrane lands exactly on a threshold (counted: the ties)."""
    pytest.importorskip("snntorch", reason="snnTorch is installed by nox -s interop")
    m = _model(name, tmp_path_factory)
    x = m["x"][:batch]
    reference, out = original_spikes(m["snn"], x)
    strict, _ = from_nir_spikes(from_nir(m["graph"], spike_condition=">"), x)
    spikes, out_snntorch = snntorch_spikes(m["graph"], x)
    _assert_same(spikes, strict)
    ties = sum(int((strict[k] != reference[k]).sum()) for k in reference)
    print(f"{name} batch {batch}: {ties} spike entries differ between >= and > (ties v == θ)")
    if ties == 0:
        _assert_same(spikes, reference)
        torch.testing.assert_close(out_snntorch, out, rtol=1e-5, atol=1e-4)
    if batch > 1:
        assert _accuracy(out_snntorch, m["y"][:batch]) == _accuracy(out, m["y"][:batch])


@pytest.mark.parametrize("name", ["digits", "res"])
def test_reset_to_zero_consumer_differs_as_documented(
    name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Plain NIR semantics (reset to v_reset = 0, fire on >), as Norse and SpikingJelly run an IF: the
    residual charge above the threshold is lost, so neurons fire less; measured and shown."""
    m = _model(name, tmp_path_factory)
    x, y = m["x"], m["y"]
    reference, out = original_spikes(m["snn"], x)
    zero, out_zero = from_nir_spikes(from_nir(m["graph"], reset="value", spike_condition=">"), x)
    total = sum(int(s.sum()) for s in reference.values())
    total_zero = sum(int(s.sum()) for s in zero.values())
    acc, acc_zero = _accuracy(out, y), _accuracy(out_zero, y)
    print(
        f"{name}: spikes {total} (subtract, >=) vs {total_zero} (reset to 0, >); accuracy {acc:.3f} vs {acc_zero:.3f}"
    )
    assert total_zero < total
    differ = sum(int((zero[k] != reference[k]).sum()) for k in reference)
    assert differ > 0


def test_norse_resets_to_zero(tmp_path_factory: pytest.TempPathFactory) -> None:
    norse = pytest.importorskip(
        "norse.torch",
        reason="Norse needs torchvision, which does not load beside the CPU torch of this project",
    )
    m = _model("digits", tmp_path_factory)
    x = m["x"][:8]
    zero, _ = from_nir_spikes(from_nir(m["graph"], reset="value", spike_condition=">"), x)
    model = norse.from_nir(m["graph"])
    state = None
    outs = []
    with torch.no_grad():
        for _ in range(32):
            out, state = model(x, state)
            outs.append(out)
    assert len(outs) == 32
    assert sum(int(s.sum()) for s in zero.values()) > 0


def test_per_channel_thresholds_round_trip(tmp_path_factory: pytest.TempPathFactory) -> None:
    pytest.importorskip("sinabs", reason="sinabs is installed by nox -s interop")
    xtr, ytr, xte, _ = digits()
    torch.manual_seed(0)
    ann = train(ResCNN(), xtr[:512], ytr[:512], epochs=1)
    converter = Converter(
        [xtr[:256]], progress=False, threshold_optimizer=ThresholdOptimizer("per_channel", channel_dim=1)
    )
    snn = converter.convert_to_spiking_neurons(ann)
    graph = to_nir(snn, xte[:1])
    thresholds = [n.v_threshold for n in graph.nodes.values() if isinstance(n, nir.IF)]
    assert any(len(set(t.flatten().tolist())) > 1 for t in thresholds)  # per channel, at the joins
    assert all(
        t.shape == n.r.shape
        for t, n in zip(thresholds, [n for n in graph.nodes.values() if isinstance(n, nir.IF)])
    )
    x = xte[:16]
    reference, _ = original_spikes(snn, x)
    margins = threshold_margins(snn, x)
    _assert_same(from_nir_spikes(from_nir(graph), x)[0], reference, margins)
    _assert_same(sinabs_spikes(graph, x)[0], reference, margins)


def test_legacy_file_for_old_nir(tmp_path_factory: pytest.TempPathFactory) -> None:
    import h5py

    m = _model("digits", tmp_path_factory)
    path = tmp_path_factory.mktemp("legacy") / "old.nir"
    write_nir(m["graph"], path, legacy=True)
    with h5py.File(path) as f:
        groups = [g for g in f["node"]["nodes"].values() if g["type"][()] == b"IF"]
        assert groups
        assert all("v_reset" not in g for g in groups)
    again = nir.read(path)
    x = m["x"][:4]
    reference = original_spikes(m["snn"], x)[0]
    _assert_same(from_nir_spikes(from_nir(again), x)[0], reference, threshold_margins(m["snn"], x))


def test_reads_a_graph_written_by_sinabs() -> None:
    """Another tool's graph: sinabs.to_nir writes no metadata, so from_nir reads NIR semantics by default; told
    sinabs's own (subtract, >=), it reproduces sinabs's simulation exactly."""
    sinabs = pytest.importorskip("sinabs", reason="sinabs is installed by nox -s interop")
    import sinabs.layers as sl
    from torch import nn

    from ann2snn_fx import run_snn

    torch.manual_seed(0)
    iaf = sl.IAFSqueeze(batch_size=1, spike_fn=sinabs.activation.SingleSpike, min_v_mem=None)
    net = nn.Sequential(nn.Linear(4, 6), iaf, nn.Linear(6, 3))
    graph = sinabs.to_nir(net, torch.rand(1, 4))
    assert not graph.metadata
    x = torch.rand(1, 4)
    with torch.no_grad():
        iaf.reset_states()
        reference = net(x.expand(32, 4))
    ours = run_snn(from_nir(graph, reset="subtract", spike_condition=">="), x, 32, running_mean=False)
    torch.testing.assert_close(ours[:, 0], reference, rtol=0, atol=0)

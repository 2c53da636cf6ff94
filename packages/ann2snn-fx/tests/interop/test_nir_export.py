"""to_nir / from_nir logic that needs only ``nir``: the folding against hand-built references, refusals,
strict=False, metadata and v_init."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("nir", reason="needs the ann2snn-fx[nir] extra (nox -s interop installs it)")

import nir

from ann2snn_fx import Converter, IFNode, NeuronFactory, reset_net, run_snn, trace_model
from ann2snn_fx.export import ExportError, from_nir, to_nir, write_nir


def _convert(ann: nn.Module, shape: tuple[int, ...], **options: object) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    loader = [torch.rand(32, *shape) for _ in range(2)]
    return Converter(loader, progress=False, **options).convert_to_spiking_neurons(ann.eval())  # type: ignore[arg-type]


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5, bias=False), nn.ReLU(), nn.Linear(5, 3)
    )


def test_folded_graph_matches_hand_reference() -> None:
    """Affine(W1 c1, b1 c1) -> IF(1) -> Affine(W2 s1 c2, 0) -> IF(1) -> Affine(W3 s2, b3), by hand."""
    snn = _convert(_mlp(), (6,))
    graph = to_nir(snn, torch.rand(1, 6))
    c1 = float(snn.spiking_0.scaler0.scale)
    s1 = float(snn.spiking_0.scaler1.scale)
    c2 = float(snn.spiking_1.scaler0.scale)
    s2 = float(snn.spiking_1.scaler1.scale)
    w1, b1 = snn.get_submodule("0").weight.detach().double(), snn.get_submodule("0").bias.detach().double()
    w2, w3 = snn.get_submodule("2").weight.detach().double(), snn.get_submodule("4").weight.detach().double()
    nodes = graph.nodes
    np.testing.assert_array_equal(nodes["_0"].weight, (w1 * c1).float().numpy())
    np.testing.assert_array_equal(nodes["_0"].bias, (b1 * c1).float().numpy())
    np.testing.assert_array_equal(nodes["_2"].weight, (w2 * s1 * c2).float().numpy())
    np.testing.assert_array_equal(nodes["_2"].bias, np.zeros(5, dtype=np.float32))  # zero bias, not Linear
    np.testing.assert_array_equal(nodes["_4"].weight, (w3 * s2).float().numpy())
    for name in ("spiking_0_if_node", "spiking_1_if_node"):
        assert isinstance(nodes[name], nir.IF)
        np.testing.assert_array_equal(nodes[name].v_threshold, np.ones_like(nodes[name].r))
        np.testing.assert_array_equal(nodes[name].r, 1.0)
        assert nodes[name].metadata["reset"] == "subtract"
    assert set(graph.edges) == {
        ("input", "_0"),
        ("_0", "spiking_0_if_node"),
        ("spiking_0_if_node", "_2"),
        ("_2", "spiking_1_if_node"),
        ("spiking_1_if_node", "_4"),
        ("_4", "output"),
    }
    meta = graph.metadata
    assert (meta["reset"], meta["spike_condition"], meta["dt"], meta["v_init"]) == (
        "subtract",
        ">=",
        1.0,
        0.0,
    )
    assert meta["exporter"].startswith("ann2snn-fx ")


def test_pool_folds_one_over_k_squared_and_flatten_counts_without_batch() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(3), nn.Flatten(), nn.Linear(12, 4)
    )
    snn = _convert(ann, (2, 6, 6))
    graph = to_nir(snn, torch.rand(1, 2, 6, 6))
    pools = [n for n in graph.nodes.values() if isinstance(n, nir.SumPool2d)]
    flat = [n for n in graph.nodes.values() if isinstance(n, nir.Flatten)]
    assert len(pools) == 1
    assert list(pools[0].kernel_size) == [3, 3]
    assert len(flat) == 1
    assert flat[0].start_dim == 0
    s = float(snn.spiking_0.scaler1.scale)
    expected = (snn.get_submodule("4").weight.detach().double() * s / 9).float().numpy()
    np.testing.assert_array_equal(graph.nodes["_4"].weight, expected)
    x = torch.rand(3, 2, 6, 6)
    reference = run_snn(snn, x, 16, running_mean=False)
    torch.testing.assert_close(
        run_snn(from_nir(graph), x, 16, running_mean=False), reference, rtol=1e-5, atol=1e-5
    )


def test_caller_model_untouched_and_file_round_trip(tmp_path: pytest.TempPathFactory) -> None:
    snn = _convert(_mlp(), (6,))
    before = {k: v.clone() for k, v in snn.state_dict().items()}
    path = tmp_path / "mlp.nir"  # type: ignore[operator]
    graph = write_nir(snn, path, torch.rand(2, 6))
    assert all(torch.equal(before[k], v) for k, v in snn.state_dict().items())
    assert snn.spiking_0.if_node.v == 0.0
    again = nir.read(path)
    assert again.metadata["reset"] == "subtract"
    assert sorted(again.nodes) == sorted(graph.nodes)
    x = torch.rand(4, 6)
    torch.testing.assert_close(run_snn(from_nir(path), x, 20), run_snn(snn, x, 20), rtol=1e-5, atol=1e-5)


def test_v_init_is_refused_then_exported_with_warning_and_honoured() -> None:
    snn = _convert(_mlp(), (6,), neuron_factory=NeuronFactory(v_init=0.5))
    with pytest.raises(ExportError, match=r"spiking_0_if_node.*v_init=0.5.*v_init=None"):
        to_nir(snn, torch.rand(1, 6))
    with pytest.warns(UserWarning, match="v_init"):
        graph = to_nir(snn, torch.rand(1, 6), strict=False)
    assert "v_init" in graph.metadata["approximations"]
    x = torch.rand(8, 6)
    reference = run_snn(snn, x, 24, running_mean=False)
    ours = run_snn(from_nir(graph), x, 24, running_mean=False)  # our metadata: starts at v_init
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    plain = run_snn(from_nir(graph, reset="subtract", spike_condition=">="), x, 24, running_mean=False)
    assert not torch.allclose(plain, reference)  # a consumer starting at 0 differs


@pytest.mark.parametrize(
    ("attribute", "value", "match"), [("burst", 4, "burst=4"), ("signed", True, "signed=True")]
)
def test_burst_and_signed_neurons_are_refused(attribute: str, value: object, match: str) -> None:
    snn = _convert(_mlp(), (6,))
    setattr(snn.spiking_1.if_node, attribute, value)
    with pytest.raises(ExportError, match=rf"spiking_1_if_node.*{match}"):
        to_nir(snn, torch.rand(1, 6))
    with pytest.warns(UserWarning, match=match):
        graph = to_nir(snn, torch.rand(1, 6), strict=False)
    assert match in graph.metadata["approximations"]


def test_max_pool_and_td_operators_are_refused() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 2))
    snn = _convert(ann, (1, 4, 4))
    with pytest.raises(ExportError, match=r"'_2'.*max-pool.*AvgPool2d"):
        to_nir(snn, torch.rand(1, 1, 4, 4), strict=False)
    from ann2snn_fx.td import replace_by_td_operators

    td = replace_by_td_operators(nn.Sequential(nn.Linear(4, 4), nn.GELU()).eval())
    with pytest.raises(ExportError, match="temporal-difference"):
        to_nir(td, torch.rand(1, 4))


def test_input_validation() -> None:
    snn = _convert(_mlp(), (6,))
    with pytest.raises(TypeError, match="sample_input"):
        to_nir(snn, torch.rand(6))
    with pytest.raises(TypeError, match="strict"):
        to_nir(snn, torch.rand(1, 6), strict=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="snn"):
        to_nir("model", torch.rand(1, 6))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reset"):
        from_nir(to_nir(snn, torch.rand(1, 6)), reset="zero")


def test_foreign_graph_in_nir_semantics() -> None:
    """A graph without our metadata (another tool's): reset to v_reset, fire on v > θ, start at 0 -- against
    a brute-force loop."""
    w = np.array([[1.0], [1.0], [-0.4]], dtype=np.float32)
    graph = nir.NIRGraph.from_list(
        nir.Affine(w, np.zeros(3, dtype=np.float32)),
        nir.IF(r=np.ones(3), v_threshold=np.array([0.25, 0.5, 1.0]), v_reset=np.array([0.0, 0.1, 0.0])),
    )
    x = torch.tensor([[0.25], [0.7]])
    got = run_snn(from_nir(graph), x, 12, running_mean=False)
    theta, v_reset = np.array([0.25, 0.5, 1.0], dtype=np.float32), np.array([0.0, 0.1, 0.0], dtype=np.float32)
    for b in range(2):
        v = np.zeros(3, dtype=np.float32)
        for t in range(12):
            v = v + (w[:, 0] * x[b, 0].item()).astype(np.float32)
            spike = v > theta
            np.testing.assert_array_equal(got[t, b].numpy(), spike.astype(np.float32))
            v = np.where(spike, v_reset, v)
    with pytest.raises(NotImplementedError, match="LIF"):
        from_nir(
            nir.NIRGraph.from_list(
                nir.LIF(tau=np.ones(1), r=np.ones(1), v_leak=np.zeros(1), v_threshold=np.ones(1))
            )
        )


def test_legacy_refuses_non_zero_v_reset(tmp_path: pytest.TempPathFactory) -> None:
    net = trace_model(nn.Sequential(nn.Linear(2, 2), IFNode(v_threshold=1.0, v_reset=0.5, v_init=0.0)))
    graph = to_nir(net, torch.rand(1, 2))
    with pytest.raises(ValueError, match=r"legacy=True.*v_reset"):
        write_nir(graph, tmp_path / "g.nir", legacy=True)  # type: ignore[operator]
    reset_net(net)
    x = torch.rand(3, 2) * 2
    torch.testing.assert_close(run_snn(from_nir(graph), x, 10), run_snn(net, x, 10))


def test_docstring_examples() -> None:
    import doctest

    from ann2snn_fx.export import _from_nir, _nir

    for module in (_nir, _from_nir):
        result = doctest.testmod(
            module, optionflags=doctest.NORMALIZE_WHITESPACE, extraglobs={"nn": nn, "torch": torch}
        )
        assert result.attempted > 0, module.__name__
        assert result.failed == 0, module.__name__


class _TwoBranches(nn.Module):
    """relu(a(x)) + relu(b(x)) -> linear: a join of two spike trains with different scales (neither side has
    a weight to absorb the other's scale, so the exporter adds an explicit diagonal Affine)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)
        self.ra, self.rb = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ra(self.a(x)) + self.rb(self.b(x)))


def test_join_of_spike_trains_gets_an_explicit_scale() -> None:
    torch.manual_seed(0)
    snn = _convert(_TwoBranches(), (4,))
    graph = to_nir(snn, torch.rand(1, 4))
    extra = [n for name, n in graph.nodes.items() if name.endswith("_scale")]
    assert len(extra) == 1
    assert isinstance(extra[0], nir.Affine)
    x = torch.rand(6, 4)
    reference = run_snn(snn, x, 20, running_mean=False)
    torch.testing.assert_close(
        run_snn(from_nir(graph), x, 20, running_mean=False), reference, rtol=1e-5, atol=1e-5
    )


def test_conv1d_model() -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
    snn = _convert(ann, (2, 8))
    graph = to_nir(snn, torch.rand(1, 2, 8))
    assert any(isinstance(n, nir.Conv1d) for n in graph.nodes.values())
    x = torch.rand(5, 2, 8)
    reference = run_snn(snn, x, 20, running_mean=False)
    torch.testing.assert_close(
        run_snn(from_nir(graph), x, 20, running_mean=False), reference, rtol=1e-5, atol=1e-5
    )

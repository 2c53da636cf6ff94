"""A model converted by the ReLU -> IF Converter survives torch.save when its forward has string annotations.

This file uses ``from __future__ import annotations`` on purpose: every ``forward`` annotation below is a
string, as in any user module written that way.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import fx, nn
from torch.utils.data import DataLoader, TensorDataset

from ann2snn_fx import Converter, IFNode, reset_net

STEPS = 6


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.relu, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def _loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    data = torch.rand(16, 4, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(data, torch.zeros(16)), batch_size=8)


def _ann() -> nn.Module:
    torch.manual_seed(0)
    return _Net().eval()


def _convert(case: str) -> fx.GraphModule:
    converter = Converter(_loader(), mode="max", progress=False)
    if case == "module":
        return converter.convert_to_spiking_neurons(_ann())
    if case == "skeleton":
        return converter.convert_to_spiking_neurons(_ann(), calibrate=False)
    return converter.convert_to_spiking_neurons(fx.symbolic_trace(_ann()))  # a GraphModule input


def _run(snn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    reset_net(snn)
    with torch.no_grad():
        return torch.stack([snn(x) for _ in range(STEPS)])


# Runs in a new interpreter: nothing of the parent's state (this test module, the converter) is shared.
_CHILD = textwrap.dedent(
    f"""
    import sys
    import torch
    from ann2snn_fx import reset_net

    model_path, inputs_path, out_path = sys.argv[1:4]
    model = torch.load(model_path, weights_only=False)
    x = torch.load(inputs_path)
    reset_net(model)
    with torch.no_grad():
        outputs = torch.stack([model(x) for _ in range({STEPS})])
    torch.save(outputs, out_path)
    """
)


def test_the_test_module_really_uses_string_annotations() -> None:
    assert _Net.forward.__annotations__ == {"x": "torch.Tensor", "return": "torch.Tensor"}
    assert [n.type for n in fx.symbolic_trace(_ann()).graph.nodes if n.op == "placeholder"] == [
        "torch.Tensor"
    ]


@pytest.mark.parametrize("case", ["module", "skeleton", "graph_module"])
def test_string_annotations_are_resolved(case: str) -> None:
    snn = _convert(case)
    assert any(isinstance(m, IFNode) for m in snn.modules())
    types = {n.op: n.type for n in snn.graph.nodes if n.op in ("placeholder", "output")}
    assert types == {"placeholder": torch.Tensor, "output": torch.Tensor}
    assert "'torch.Tensor'" not in snn.code


@pytest.mark.parametrize("case", ["module", "skeleton", "graph_module"])
def test_save_load_round_trip_in_a_new_process(case: str, tmp_path: pathlib.Path) -> None:
    snn = _convert(case)
    x = torch.rand(5, 4, generator=torch.Generator().manual_seed(1))
    model_path, inputs_path, out_path = tmp_path / "model.pt", tmp_path / "x.pt", tmp_path / "out.pt"
    torch.save(snn, model_path)
    torch.save(x, inputs_path)
    expected = _run(snn, x)
    assert not torch.equal(expected[0], expected[-1])  # the neurons spike: the outputs change over time
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    result = subprocess.run(
        [sys.executable, str(script), str(model_path), str(inputs_path), str(out_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # the GraphModule pickles without _Net: the child never imports this file
    )
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.load(out_path), expected, atol=0, rtol=0)

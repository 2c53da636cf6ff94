"""A converted SNN saved with ``torch.save`` in one process, loaded and run in a fresh one."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ann2snn_fx import Converter, reset_net
from ann2snn_fx.td import replace_by_td_operators

STEPS = 12

# Runs in a new interpreter: nothing of the parent's state (imported classes, the converter) is shared.
_CHILD = textwrap.dedent(
    """
    import sys
    import torch

    model_path, inputs_path, out_path, kind, steps = sys.argv[1:6]
    steps = int(steps)
    model = torch.load(model_path, weights_only=False)  # a whole module: its classes are imported by name
    x = torch.load(inputs_path)
    model.eval()
    with torch.no_grad():
        if kind == "snn":
            from ann2snn_fx import reset_net

            reset_net(model)
            outputs = torch.stack([model(x) for _ in range(steps)])
        else:
            x_seq = torch.zeros(steps, *x.shape)
            x_seq[0] = x
            outputs = model(x_seq)
    torch.save({"outputs": outputs, "modules": sorted({type(m).__module__ for m in model.modules()})}, out_path)
    """
)


def _run_child(tmp_path: pathlib.Path, model: nn.Module, x: torch.Tensor, kind: str) -> dict:
    model_path, inputs_path, out_path = tmp_path / "model.pt", tmp_path / "x.pt", tmp_path / "out.pt"
    torch.save(model, model_path)
    torch.save(x, inputs_path)
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    result = subprocess.run(
        [sys.executable, str(script), str(model_path), str(inputs_path), str(out_path), kind, str(STEPS)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the repository: the child must find the packages where they are installed
    )
    assert result.returncode == 0, result.stderr
    return torch.load(out_path)


def test_spiking_cnn_round_trips_through_torch_save(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    ann = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    ).eval()
    images = torch.rand(32, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(images, torch.zeros(32, dtype=torch.long)), batch_size=8)
    snn = Converter(loader, mode="99.9%", progress=False).convert_to_spiking_neurons(ann).eval()

    x = images[:5]
    with torch.no_grad():
        reset_net(snn)
        expected = torch.stack([snn(x) for _ in range(STEPS)])
    assert expected.abs().sum() > 0  # the neurons fire: the comparison below is not between zeros

    # Run some steps before saving: the saved membrane state must not leak into the loaded model's run.
    with torch.no_grad():
        snn(x)
    child = _run_child(tmp_path, snn, x, "snn")

    torch.testing.assert_close(child["outputs"], expected, atol=0, rtol=0)
    assert any(m.startswith("ann2snn_fx") for m in child["modules"])  # the IF neurons
    assert any(m.startswith("ann2snn_calib") for m in child["modules"])


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.position = nn.Parameter(torch.randn(5, 8))  # a constant the TD conversion moves to t = 0
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.embed(x) + self.position
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(self.norm(x).mean(dim=-2))


class _AnnotatedTransformer(_Transformer):
    # Under ``from __future__ import annotations`` (this file) the annotations are strings, which torch.fx
    # copies into the generated code as globals that torch.save cannot pickle.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def _check_td_round_trip(tmp_path: pathlib.Path, ann: nn.Module) -> None:
    td = replace_by_td_operators(ann, strict=True).eval()
    x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(1))

    child = _run_child(tmp_path, td, x, "td")

    with torch.no_grad():
        expected = ann(x)
    assert child["outputs"].shape == (STEPS, 4, 3)
    for t in range(STEPS):
        torch.testing.assert_close(child["outputs"].cumsum(dim=0)[t], expected, atol=1e-5, rtol=1e-5)
    assert any(m.startswith("ann2snn_ops") for m in child["modules"])


def test_td_transformer_round_trips_through_torch_save(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    _check_td_round_trip(tmp_path, _Transformer().eval())


def test_td_transformer_with_string_annotations_round_trips(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    _check_td_round_trip(tmp_path, _AnnotatedTransformer().eval())

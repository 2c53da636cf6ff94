"""A model converted by replace_by_td_operators survives torch.save: constants at t = 0, string annotations.

This file uses ``from __future__ import annotations`` on purpose: every ``forward`` annotation below is a
string, as in any user module written that way.
"""

from __future__ import annotations

import io
import pathlib
import subprocess
import sys
import textwrap
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from ann2snn_fx.td import TDImpulse, replace_by_td_operators, td_impulse


class _Embedded(nn.Module):
    """Every kind of constant the TD pass moves to t = 0: a parameter, F.linear and F.layer_norm biases,
    a literal, a concatenated token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.position = nn.Parameter(torch.randn(5, 8))
        self.token = nn.Parameter(torch.randn(1, 1, 8))
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.bias = nn.Parameter(torch.randn(8))
        self.norm_weight = nn.Parameter(torch.rand(8) + 0.5)
        self.norm_bias = nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.position
        h = F.linear(h, self.weight, self.bias) - 1.5
        h = F.layer_norm(h, (8,), self.norm_weight, self.norm_bias)
        return torch.cat([self.token.expand(x.shape[-3], 1, 8), h], dim=-2)


def _sequence(seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(seed))


def _converted() -> tuple[nn.Module, fx.GraphModule]:
    torch.manual_seed(0)
    ann = _Embedded().eval()
    return ann, replace_by_td_operators(ann, strict=True).eval()


def _round_trip(gm: nn.Module) -> nn.Module:
    """torch.save and torch.load in this process (the load re-traces the code all the same)."""
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # type: ignore[no-any-return]


def test_constants_at_t0_are_calls_to_one_td_impulse_module() -> None:
    ann, gm = _converted()
    x = _sequence()
    for t in range(x.shape[0]):
        torch.testing.assert_close(gm(x).cumsum(0)[t], ann(x.cumsum(0)[t]), atol=1e-5, rtol=1e-5)
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target is td_impulse]
    impulses = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "td_impulse_0"]
    # the embedding, the F.linear bias, the literal 1.5, the layer-norm bias and the concatenated token
    assert len(impulses) == 5
    assert isinstance(gm.td_impulse_0, TDImpulse)
    assert not hasattr(gm, "td_impulse_1")  # one stateless module shared by every call site


class _Crowded(_Embedded):
    """Already holds the names the TD pass would pick first."""

    def __init__(self) -> None:
        super().__init__()
        self.td_impulse_0 = nn.Identity()
        self.register_buffer("td_impulse_1", torch.full((1,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.td_impulse_0(super().forward(x)) * self.td_impulse_1


def test_td_impulse_module_name_never_overwrites() -> None:
    torch.manual_seed(0)
    ann = _Crowded().eval()
    gm = replace_by_td_operators(ann, strict=True)
    assert isinstance(gm.td_impulse_0, nn.Identity)
    torch.testing.assert_close(gm.td_impulse_1, torch.full((1,), 2.0))
    assert isinstance(gm.td_impulse_2, TDImpulse)
    assert any(n.op == "call_module" and n.target == "td_impulse_2" for n in gm.graph.nodes)
    x = _sequence()
    torch.testing.assert_close(gm(x).cumsum(0)[-1], ann(x.sum(0)), atol=1e-5, rtol=1e-5)


def test_td_impulse_module_matches_the_function() -> None:
    reference = torch.zeros(3, 2, 4)
    constant = torch.arange(4.0)
    torch.testing.assert_close(
        TDImpulse()(constant, reference), td_impulse(constant, reference), atol=0, rtol=0
    )
    torch.testing.assert_close(TDImpulse()(2.5, reference)[:, 0, 0], torch.tensor([2.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="more dims than one time step"):
        TDImpulse()(torch.zeros(1, 3, 2, 4), reference)


def test_converted_model_retraces_with_modules_as_leaves() -> None:
    """What torch.load does: re-trace the generated code; nothing emitted may hold Python control flow."""
    _, gm = _converted()

    class KeepModules(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
            return True

    graph = KeepModules().trace(gm)
    x = _sequence()
    torch.testing.assert_close(fx.GraphModule(gm, graph)(x), gm(x), atol=0, rtol=0)


def test_converting_twice_keeps_the_impulses() -> None:
    _, gm = _converted()
    again = replace_by_td_operators(gm, strict=True)
    x = _sequence()
    torch.testing.assert_close(again(x), gm(x), atol=0, rtol=0)
    targets = [n.target for n in again.graph.nodes if n.op == "call_module"]
    assert targets.count("td_impulse_0") == 5
    assert not hasattr(again, "td_impulse_1")
    assert again.td_report.converted == []  # nothing left to convert


def test_save_load_round_trip_in_process() -> None:
    _, gm = _converted()
    loaded = _round_trip(gm)
    x = _sequence()
    torch.testing.assert_close(loaded(x), gm(x), atol=0, rtol=0)
    assert isinstance(loaded.td_impulse_0, TDImpulse)


# Runs in a new interpreter: nothing of the parent's state (this test module, the converter) is shared.
_CHILD = textwrap.dedent(
    """
    import sys
    import torch

    model_path, inputs_path, out_path = sys.argv[1:4]
    model = torch.load(model_path, weights_only=False)
    with torch.no_grad():
        outputs = model(torch.load(inputs_path))
    torch.save(outputs, out_path)
    """
)


def test_save_load_round_trip_in_a_new_process(tmp_path: pathlib.Path) -> None:
    _, gm = _converted()
    x = _sequence()
    with torch.no_grad():
        expected = gm(x)
    model_path, inputs_path, out_path = tmp_path / "model.pt", tmp_path / "x.pt", tmp_path / "out.pt"
    torch.save(gm, model_path)
    torch.save(x, inputs_path)
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    result = subprocess.run(
        [sys.executable, str(script), str(model_path), str(inputs_path), str(out_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # the GraphModule pickles without _Embedded: the child never imports this file
    )
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.load(out_path), expected, atol=0, rtol=0)


class _Annotated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.offset = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:  # noqa: UP045
        return self.linear(x) + self.offset


class _Unresolvable(_Annotated):
    def forward(self, x: torch.Tensor, y: Undefined) -> Optional[Undefined]:  # type: ignore[name-defined,override]  # noqa: F821, UP045
        return self.linear(x) + y + self.offset


def test_string_annotations_are_resolved() -> None:
    ann = _Annotated().eval()
    assert _Annotated.forward.__annotations__["x"] == "torch.Tensor"  # the module really uses PEP 563
    gm = replace_by_td_operators(ann, strict=True, static_inputs=["scale"])
    types = {n.target: n.type for n in gm.graph.nodes if n.op == "placeholder"}
    assert types == {"x": torch.Tensor, "scale": Optional[torch.Tensor]}  # noqa: UP045
    assert next(n for n in gm.graph.nodes if n.op == "output").type is torch.Tensor
    loaded = _round_trip(gm)
    x = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loaded(x), gm(x), atol=0, rtol=0)
    torch.testing.assert_close(gm(x).cumsum(0), ann(x.cumsum(0)), atol=1e-5, rtol=1e-5)


def test_unresolvable_string_annotations_are_dropped() -> None:
    ann = _Unresolvable().eval()
    gm = replace_by_td_operators(ann, strict=True)
    types = {n.target: n.type for n in gm.graph.nodes if n.op == "placeholder"}
    assert types == {"x": torch.Tensor, "y": None}  # the broken annotation does not hide x's
    assert next(n for n in gm.graph.nodes if n.op == "output").type is None
    assert "Undefined" not in gm.code
    loaded = _round_trip(gm)
    x, y = torch.randn(2, 3, 3, 4, generator=torch.Generator().manual_seed(3)).unbind(0)
    torch.testing.assert_close(loaded(x, y), gm(x, y), atol=0, rtol=0)

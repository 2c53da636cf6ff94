"""The analysis docstring examples run; plots draw what the profile holds; the public names are exported."""

from __future__ import annotations

import doctest
import warnings

import pytest
import torch
import torch.nn as nn

import ann2snn_fx
import ann2snn_fx.analysis.doctor
import ann2snn_fx.analysis.energy
import ann2snn_fx.analysis.plot
import ann2snn_fx.analysis.profile
from ann2snn_fx import IFNode, trace_model
from ann2snn_fx.analysis import (
    FP32_45NM,
    EnergyModel,
    bit_matched_bits,
    plot_profile,
    plot_sweep,
    profile_sweep,
)

MODULES = [
    ann2snn_fx.analysis.doctor,
    ann2snn_fx.analysis.energy,
    ann2snn_fx.analysis.plot,
    ann2snn_fx.analysis.profile,
]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_docstring_examples(module: object) -> None:
    if module is ann2snn_fx.analysis.plot:
        pytest.importorskip("matplotlib")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)  # type: ignore[arg-type]
    assert result.attempted > 0
    assert result.failed == 0


def test_public_names() -> None:
    for name in ("profile_snn", "profile_sweep", "diagnose", "diagnose_td", "SNNProfile", "EnergyModel"):
        assert name in ann2snn_fx.__all__
        assert getattr(ann2snn_fx, name) is getattr(ann2snn_fx.analysis, name)


def test_plots_show_the_profile(tmp_path: object) -> None:
    pytest.importorskip("matplotlib")
    snn = trace_model(nn.Sequential(nn.Linear(3, 4), IFNode(v_reset=None), nn.Linear(4, 2)))
    x, labels = torch.rand(6, 3), torch.zeros(6, dtype=torch.long)
    profiles = profile_sweep(snn, x, [2, 8], labels=labels)
    fig = plot_profile(profiles[1], str(tmp_path) + "/profile.png")
    heights = [p.get_height() for p in fig.axes[0].patches[:1]]
    assert heights == [profiles[1].layers[1].events_pos]
    sweep = plot_sweep(profiles, FP32_45NM, str(tmp_path) + "/sweep.png")
    energy_line = sweep.axes[0].lines[0].get_ydata()
    assert list(energy_line) == [p.energy(FP32_45NM).snn_compute_pj for p in profiles]
    assert list(sweep.axes[1].lines[0].get_ydata()) == [p.accuracy for p in profiles]


def test_energy_model_validation() -> None:
    with pytest.raises(TypeError, match="mac_pj"):
        EnergyModel("x", mac_pj="1", add_pj=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="add_pj"):
        EnergyModel("x", mac_pj=1.0, add_pj=float("nan"))
    with pytest.raises(ValueError, match="time_steps"):
        bit_matched_bits(True)  # type: ignore[arg-type]
    assert EnergyModel("np", mac_pj=torch.tensor(1.5).item(), add_pj=1).add_pj == 1.0


def test_plot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    snn = trace_model(nn.Sequential(IFNode(v_reset=None), nn.Linear(2, 3)))
    profile = profile_sweep(snn, torch.ones(1, 2), [2])[0]
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"ann2snn-fx\[plot\]"):
        plot_profile(profile)

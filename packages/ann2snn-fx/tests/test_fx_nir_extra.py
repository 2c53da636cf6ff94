"""The nir extra is optional: ``import ann2snn_fx`` never imports nir, and calling the exporter without it
raises an ImportError naming the extra."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import ann2snn_fx


def test_import_does_not_load_nir() -> None:
    code = "import sys, ann2snn_fx; ann2snn_fx.to_nir; ann2snn_fx.from_nir; print('nir' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_missing_nir_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nir", None)  # makes `import nir` fail
    snn = ann2snn_fx.trace_model(nn.Sequential(nn.Linear(2, 2), ann2snn_fx.IFNode(v_reset=None)))
    with pytest.raises(ImportError, match=r"ann2snn-fx\[nir\]"):
        ann2snn_fx.to_nir(snn, torch.rand(1, 2))
    with pytest.raises(ImportError, match=r"ann2snn-fx\[nir\]"):
        ann2snn_fx.from_nir("graph.nir")

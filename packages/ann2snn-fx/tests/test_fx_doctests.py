"""The Examples in the ReLU -> IF docstrings run."""

from __future__ import annotations

import doctest
import warnings

import pytest

import ann2snn_fx.converter
import ann2snn_fx.factories
import ann2snn_fx.neuron
import ann2snn_fx.observers
import ann2snn_fx.relu.calibration
import ann2snn_fx.report
import ann2snn_fx.rules
import ann2snn_fx.runner
import ann2snn_fx.snn.inputs
import ann2snn_fx.threshold
import ann2snn_fx.tracing
from ann2snn_fx import _numbers

MODULES = [
    ann2snn_fx.converter,
    ann2snn_fx.factories,
    ann2snn_fx.neuron,
    ann2snn_fx.observers,
    ann2snn_fx.report,
    ann2snn_fx.rules,
    ann2snn_fx.runner,
    ann2snn_fx.threshold,
    ann2snn_fx.tracing,
    ann2snn_fx.snn.inputs,
    ann2snn_fx.relu.calibration,
    _numbers,
]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_docstring_examples(module: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)  # type: ignore[arg-type]
    assert result.attempted > 0
    assert result.failed == 0

"""The Examples in the TD conversion docstrings run."""

from __future__ import annotations

import doctest

import pytest

import ann2snn_fx.td
import ann2snn_fx.td.fold
import ann2snn_fx.td.fx_pass
import ann2snn_fx.td.impulse
import ann2snn_fx.td.report


@pytest.mark.parametrize(
    "module", [ann2snn_fx.td, ann2snn_fx.td.fold, ann2snn_fx.td.impulse, ann2snn_fx.td.report]
)
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)  # type: ignore[arg-type]
    assert result.attempted > 0
    assert result.failed == 0

"""The Examples in the TD conversion docstrings run."""

from __future__ import annotations

import doctest

import pytest

import ann2snn_fx._td_fold
import ann2snn_fx._td_fx
import ann2snn_fx._td_report
import ann2snn_fx.td


@pytest.mark.parametrize(
    "module", [ann2snn_fx.td, ann2snn_fx._td_fold, ann2snn_fx._td_fx, ann2snn_fx._td_report]
)
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)  # type: ignore[arg-type]
    assert result.attempted > 0
    assert result.failed == 0

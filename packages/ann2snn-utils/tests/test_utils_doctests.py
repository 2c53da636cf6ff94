"""The docstring examples of every module run as doctests (CI runs only tests/, so they are collected here)."""

import doctest
import importlib

import pytest

MODULES = ["ann2snn_utils", "ann2snn_utils.download", "ann2snn_utils.errors", "ann2snn_utils._http"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0


def test_errors_module_has_examples() -> None:
    finder = doctest.DocTestFinder()
    examples = sum(len(t.examples) for t in finder.find(importlib.import_module("ann2snn_utils.errors")))
    assert examples >= 7

"""The docstring examples of every public class run and hold."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "ann2snn_ops._cumsum",
    "ann2snn_ops.attention",
    "ann2snn_ops.elementwise",
    "ann2snn_ops.generic",
    "ann2snn_ops.linear",
    "ann2snn_ops.multihead",
    "ann2snn_ops.norm",
    "ann2snn_ops.products",
    "ann2snn_ops.streaming",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_every_public_class_has_an_example() -> None:
    import ann2snn_ops

    for name in ann2snn_ops.__all__:
        obj = getattr(ann2snn_ops, name)
        if isinstance(obj, type) and name != "TDModule":  # functions document themselves by example too
            assert obj.__doc__ is not None
            assert "Examples:" in obj.__doc__, name
            assert "Shape:" in obj.__doc__, name


def test_runtime_imports_are_torch_and_stdlib_only() -> None:
    """The ops-only install has torch alone: no module of the package may import anything else."""
    import ast
    import pathlib
    import sys

    import ann2snn_ops

    allowed = {"torch", "ann2snn_ops", "__future__"} | set(sys.stdlib_module_names)
    root = pathlib.Path(ann2snn_ops.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_readme_example_runs() -> None:
    import pathlib
    import re

    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(encoding="utf-8"), re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, str(readme), "exec"), {})

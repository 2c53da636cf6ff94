"""Every ```python block of the READMEs and the docs runs as written, so no example can rot.

The blocks of one file run in order in one namespace (like a notebook), in a temporary working folder. A
block that is only pymdownx snippet markers (``--8<-- "file"``) includes a file that is tested elsewhere (the
tutorials' scripts run in ``test_integration_demo.py``); here it is checked that the included file exists. A block
marked ``<!-- not executed: REASON -->`` on the line before is not run; the reason is required (only for blocks
that need software no venv of this scenario can hold, such as the NIR consumers of ``nox -s interop``).
"""

from __future__ import annotations

import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^```\s*$", re.MULTILINE | re.DOTALL)
SNIPPET = re.compile(r'^--8<-- "(?P<path>[^":]+)(?::[\w-]+)?"\s*$')
PYTHON = {"python", "py", "pycon"}
NOT_EXECUTED = re.compile(r"^<!-- not executed: (?P<reason>.+?) -->$")
SKIP_PREFIX = "#not-executed: "


def _markdown_files() -> list[pathlib.Path]:
    files = [
        ROOT / "README.md",
        *sorted(ROOT.glob("packages/*/README.md")),
        *sorted(ROOT.glob("docs/**/*.md")),
    ]
    return [f for f in files if f.is_file() and python_blocks(f.read_text(encoding="utf-8"))]


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced python block.

    A block right after the line ``<!-- not executed: REASON -->`` comes back as ``SKIP_PREFIX + REASON``:
    it needs software that this venv cannot hold (the reason must say which, and what runs it instead).
    """
    blocks = []
    for m in FENCE.finditer(text):
        if m.group("lang").lower() not in PYTHON:
            continue
        before = text[: m.start()].rstrip().rsplit("\n", 1)[-1].strip()
        skip = NOT_EXECUTED.match(before)
        code = f"{SKIP_PREFIX}{skip.group('reason').strip()}" if skip else m.group("body")
        blocks.append((text.count("\n", 0, m.start()) + 2, code))
    return blocks


def _snippet_paths(code: str) -> list[str] | None:
    lines = [line for line in code.splitlines() if line.strip()]
    matches = [SNIPPET.match(line.strip()) for line in lines]
    if lines and all(matches):
        return [m.group("path") for m in matches if m]
    return None


def test_the_extractor_finds_blocks_and_line_numbers() -> None:
    text = "intro\n```python\nx = 1\n```\n\n```bash\nls\n```\n```py\ny = 2\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (10, "y = 2\n")]
    marked = "<!-- not executed: needs a simulator installed elsewhere -->\n```python\nz = 3\n```\n"
    assert python_blocks(marked) == [(3, SKIP_PREFIX + "needs a simulator installed elsewhere")]


def test_the_collection_sees_the_readmes_and_guides() -> None:
    names = {str(f.relative_to(ROOT)) for f in _markdown_files()}
    assert {"packages/ann2snn-fx/README.md", "packages/ann2snn-utils/README.md"} <= names
    assert any(name.startswith("docs/guides/") for name in names)


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_python_blocks_run(path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    namespace: dict[str, object] = {"__name__": "__markdown__"}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for line, code in blocks:
            if code.startswith(SKIP_PREFIX):
                assert len(code) > len(SKIP_PREFIX) + 10, f"{path.name}:{line}: say why it is not executed"
                continue
            included = _snippet_paths(code)
            if included is not None:
                for rel in included:
                    assert (ROOT / rel).is_file(), f"{path.name}:{line} includes a missing file {rel}"
                continue
            try:
                exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"the block at {path.relative_to(ROOT)}:{line} fails: {err!r}") from err
    finally:
        os.chdir(cwd)

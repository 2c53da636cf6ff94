"""Components pinned separately, resolved by pip itself against a real package index on 127.0.0.1.

``nox -s "integration(pinning)"`` builds today's four wheels, a patch-bumped copy of ann2snn-ops and a
minor-bumped copy of ann2snn-fx that requires the bumped ops, and passes their folders in
``ANN2SNN_PINNING_WHEELS`` (``allow/``: the newest fx admits both ops versions; ``deny/``: it does not). Here
each folder becomes a PEP 503 ``simple/`` tree served by ``http.server``; pip runs isolated from every other
index and configuration, with torch (and tqdm, requests) pre-installed in this venv, so nothing is resolved
from anywhere else and torch is never resolved at all.
"""

from __future__ import annotations

import functools
import hashlib
import html
import http.server
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

WHEELS = os.environ.get("ANN2SNN_PINNING_WHEELS")
pytestmark = pytest.mark.skipif(
    WHEELS is None, reason="run by nox -s 'integration(pinning)', which builds the wheels"
)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _simple_tree(wheels: pathlib.Path, root: pathlib.Path) -> dict[str, list[str]]:
    """A PEP 503 simple index of the wheels in ``wheels``; returns project -> versions."""
    projects: dict[str, list[pathlib.Path]] = {}
    for wheel in sorted(wheels.glob("*.whl")):
        projects.setdefault(_normalize(wheel.name.split("-")[0]), []).append(wheel)
    simple = root / "simple"
    simple.mkdir(parents=True)
    links = "".join(f'<a href="{p}/">{p}</a>\n' for p in projects)
    (simple / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    for project, files in projects.items():
        (simple / project).mkdir()
        anchors = []
        for wheel in files:
            (simple / project / wheel.name).write_bytes(wheel.read_bytes())
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            anchors.append(
                f'<a href="{html.escape(wheel.name)}#sha256={digest}">{html.escape(wheel.name)}</a>\n'
            )
        (simple / project / "index.html").write_text(
            f"<!DOCTYPE html><html><body>\n{''.join(anchors)}</body></html>\n"
        )
    return {p: sorted(w.name.split("-")[1] for w in files) for p, files in projects.items()}


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    assert WHEELS is not None
    root = tmp_path_factory.mktemp("index")
    versions = {name: _simple_tree(pathlib.Path(WHEELS) / name, root / name) for name in ("allow", "deny")}

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{server.server_port}", "versions": versions}
    finally:
        server.shutdown()
        thread.join()


def _pip(
    index: dict[str, object], which: str, *requirements: str, tmp: pathlib.Path
) -> tuple[int, str, dict]:
    """``pip install --dry-run`` of ``requirements`` from one local index only; (returncode, output, report)."""
    report = tmp / "report.json"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--no-cache-dir"]
    cmd += ["--index-url", f"{index['url']}/{which}/simple/", "--report", str(report), *requirements]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    data = json.loads(report.read_text()) if report.exists() else {}
    return done.returncode, done.stdout + done.stderr, data


def _installs(report: dict) -> dict[str, str]:
    return {_normalize(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}


def _versions(index: dict[str, object], which: str, project: str) -> list[str]:
    versions = index["versions"]
    assert isinstance(versions, dict)
    return sorted(versions[which][project], key=lambda v: tuple(int(x) for x in v.split(".")))


def test_the_index_serves_two_versions_of_ops(index, tmp_path: pathlib.Path) -> None:
    assert len(_versions(index, "allow", "ann2snn-ops")) == 2
    assert len(_versions(index, "allow", "ann2snn-fx")) == 1
    assert len(_versions(index, "deny", "ann2snn-fx")) == 2
    # Unpinned, pip takes the newest ops that the newest fx admits.
    rc, out, report = _pip(index, "allow", "ann2snn-fx", tmp=tmp_path)
    assert rc == 0, out
    assert _installs(report)["ann2snn-ops"] == _versions(index, "allow", "ann2snn-ops")[-1]


def test_older_ops_pinned_with_the_newest_fx_resolves_when_the_range_admits_it(index, tmp_path) -> None:
    old_ops = _versions(index, "allow", "ann2snn-ops")[0]
    newest_fx = _versions(index, "allow", "ann2snn-fx")[-1]
    rc, out, report = _pip(
        index, "allow", f"ann2snn-ops=={old_ops}", f"ann2snn-fx=={newest_fx}", tmp=tmp_path
    )
    assert rc == 0, out
    installs = _installs(report)
    assert installs["ann2snn-ops"] == old_ops
    assert installs["ann2snn-fx"] == newest_fx
    assert set(installs) == {"ann2snn-ops", "ann2snn-calib", "ann2snn-fx"}  # torch, tqdm: already there


def test_older_ops_pinned_with_the_newest_fx_fails_in_the_resolver_when_it_does_not(index, tmp_path) -> None:
    old_ops = _versions(index, "deny", "ann2snn-ops")[0]
    newest_fx = _versions(index, "deny", "ann2snn-fx")[-1]
    rc, out, _ = _pip(index, "deny", f"ann2snn-ops=={old_ops}", f"ann2snn-fx=={newest_fx}", tmp=tmp_path)
    assert rc != 0
    assert "ResolutionImpossible" in out, out
    assert f"ann2snn-fx {newest_fx} depends on ann2snn-ops" in out, out
    # Left free, pip backtracks to the older fx whose range admits the pinned ops.
    rc, out, report = _pip(index, "deny", f"ann2snn-ops=={old_ops}", "ann2snn-fx", tmp=tmp_path)
    assert rc == 0, out
    assert _installs(report)["ann2snn-fx"] == _versions(index, "deny", "ann2snn-fx")[0]


def test_an_ops_only_install_pulls_nothing_but_torch(index, tmp_path) -> None:
    rc, out, report = _pip(index, "allow", "ann2snn-ops", tmp=tmp_path)
    assert rc == 0, out
    assert set(_installs(report)) == {"ann2snn-ops"}  # torch is pre-installed here; nothing else is needed
    (item,) = report["install"]
    requires = {
        _normalize(re.split(r"[ <>=!~;\[(]", r, maxsplit=1)[0]) for r in item["metadata"]["requires_dist"]
    }
    assert requires == {"torch"}

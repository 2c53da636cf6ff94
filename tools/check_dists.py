"""Check what `nox -s build` produced: a wheel and an sdist per package, each naming the right dependencies.

Usage: python tools/check_dists.py DIST_DIR '{"ann2snn-ops": ["torch"], ...}'
"""

from __future__ import annotations

import email.parser
import json
import pathlib
import sys
import tarfile
import zipfile

from packaging.requirements import Requirement


def _metadata(path: pathlib.Path) -> str:
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as zf:
            name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            return zf.read(name).decode()
    with tarfile.open(path) as tf:
        member = next(m for m in tf.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
        fh = tf.extractfile(member)
        assert fh is not None
        return fh.read().decode()


def main() -> int:
    outdir = pathlib.Path(sys.argv[1])
    expected: dict[str, list[str]] = json.loads(sys.argv[2])
    problems = []
    artifacts = sorted(outdir.iterdir())
    if len(artifacts) != 2 * len(expected):
        problems.append(
            f"expected {2 * len(expected)} artifacts, found {len(artifacts)}: {[a.name for a in artifacts]}"
        )
    for dist, deps in expected.items():
        prefix = dist.replace("-", "_") + "-"
        mine = [a for a in artifacts if a.name.startswith(prefix)]
        kinds = sorted(a.suffix for a in mine)
        if kinds != [".gz", ".whl"]:
            problems.append(f"{dist}: expected one wheel and one sdist, found {[a.name for a in mine]}")
        for art in mine:
            meta = email.parser.Parser().parsestr(_metadata(art))
            requires = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
            runtime = sorted(r.name.lower() for r in requires if r.marker is None)
            if runtime != sorted(deps):
                problems.append(f"{art.name}: Requires-Dist {runtime}, expected {sorted(deps)}")
            for r in requires:
                if r.name.startswith("ann2snn-") and any(s.operator == "==" for s in r.specifier):
                    problems.append(f"{art.name}: sibling {r} pinned with ==; use a range")
            if meta["License-Expression"] != "Apache-2.0":
                problems.append(f"{art.name}: License-Expression {meta['License-Expression']!r}")
            print(f"{art.name}: {meta['Name']} {meta['Version']} requires {[str(r) for r in requires]}")
    for p in problems:
        print("ERROR:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

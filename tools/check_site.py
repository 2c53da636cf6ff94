"""Checks of the built mkdocs site that ``mkdocs build --strict`` does not make (``nox -s docs`` runs it).

    python tools/check_site.py site docs

1. Every link and asset of every page resolves to a file of the site when opened from disk (file://) or
   served under a sub-path: no root-absolute link (``/...``), no relative link to a missing file (the 404
   pages excepted, whose links are absolute by design).
2. Every Chinese page (``docs/**/*.zh.md``) is reachable from the Chinese navigation, and every Chinese
   navigation title is translated (titles that are package names, ``ann2snn-*``, stay as they are).
"""

from __future__ import annotations

import html.parser
import pathlib
import sys
import urllib.parse


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.nav: list[tuple[str, str]] = []  # (href, title) of the primary navigation
        self._nav_href: str | None = None
        self._nav_text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("href", "src"):
            if a.get(key) and not (tag == "link" and a.get("rel") in ("canonical", "alternate")):
                self.links.append(a[key] or "")
        if (
            tag == "a"
            and "md-nav__link" in (a.get("class") or "").split()
            and (a.get("href") or "#")[0] != "#"
        ):
            self._nav_href, self._nav_text = a.get("href"), []

    def handle_data(self, data: str) -> None:
        if self._nav_href is not None:
            self._nav_text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._nav_href is not None:
            self.nav.append((self._nav_href, " ".join("".join(self._nav_text).split())))
            self._nav_href = None


def _parse(page: pathlib.Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def _target(site: pathlib.Path, page: pathlib.Path, link: str) -> pathlib.Path | None:
    """The file a relative link points to, or None for external links and in-page anchors."""
    parts = urllib.parse.urlsplit(link)
    if parts.scheme or parts.netloc or not parts.path:
        return None
    path = (page.parent / urllib.parse.unquote(parts.path)).resolve()
    return path / "index.html" if link.split("#")[0].endswith("/") or path.is_dir() else path


def check_links(site: pathlib.Path) -> list[str]:
    errors = []
    for page in sorted(site.rglob("*.html")):
        if (
            page.name == "404.html"
        ):  # served by the web server for any missing path: its links must be absolute
            continue
        for link in _parse(page).links:
            rel = page.relative_to(site)
            if link.startswith("/") and not link.startswith("//"):
                errors.append(f"{rel}: root-absolute link {link!r} breaks from file:// and under a sub-path")
                continue
            target = _target(site, page, link)
            if target is not None and not target.is_file():
                errors.append(f"{rel}: link {link!r} points to a missing file")
    return errors


def check_zh_nav(site: pathlib.Path, docs: pathlib.Path) -> list[str]:
    errors = []
    en, zh = _parse(site / "index.html").nav, _parse(site / "zh" / "index.html").nav
    reachable = {_target(site, site / "zh" / "index.html", href) for href, _ in zh}
    for source in sorted(docs.rglob("*.zh.md")):
        stem = source.relative_to(docs).as_posix()[: -len(".zh.md")]
        built = site / "zh" / ("index.html" if stem == "index" else f"{stem}/index.html")
        if built.resolve() not in reachable:
            errors.append(f"{source.relative_to(docs)}: not reachable from the Chinese navigation")
    if len(en) != len(zh):
        errors.append(f"the navigations differ in length: {len(en)} English entries, {len(zh)} Chinese")
    for (_, en_title), (_, zh_title) in zip(en, zh):
        if en_title == zh_title and not en_title.startswith("ann2snn"):
            errors.append(f"Chinese navigation title {zh_title!r} is not translated (nav_translations)")
    return errors


def main(argv: list[str]) -> int:
    site, docs = pathlib.Path(argv[0]).resolve(), pathlib.Path(argv[1]).resolve()
    errors = check_links(site) + check_zh_nav(site, docs)
    for error in errors:
        print(error, file=sys.stderr)
    pages = len(list(site.rglob("*.html")))
    print(f"checked {pages} pages: {'OK' if not errors else f'{len(errors)} problem(s)'}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""mkdocs hooks of the ann2snn site (``hooks:`` in mkdocs.yml).

mkdocs-static-i18n 1.3 leaves the language switcher of the two home pages pointing at root-absolute links
built from ``site_url`` (``/ann2snn/``, ``/ann2snn/zh/``), which break when the site is opened from disk or
served under another path. Here every page's switcher points at its translation's URL, which the theme then
writes relative to the page (``zh/``, ``../``), as the plugin already does for the other pages.
"""

from __future__ import annotations

from typing import Any


def on_page_context(context: dict[str, Any], page: Any, config: Any, nav: Any) -> dict[str, Any]:
    alternates = getattr(page.file, "alternates", None) or {}
    for alternate in getattr(config.extra, "alternate", None) or []:  # the attribute the theme reads
        target = alternates.get(alternate.get("lang"))
        if target is not None:
            alternate["link"] = target.url or "./"
    return context

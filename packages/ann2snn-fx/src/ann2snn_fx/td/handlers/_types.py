"""The handler signature shared by the TD fx pass's op families."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import fx

from ann2snn_fx.td.state import PassState

__all__ = ["Handler", "table"]

Handler = Callable[[PassState, fx.Node], None]


def table(*entries: tuple[Iterable[Any], Handler]) -> dict[Any, Handler]:
    """``{key: handler}`` for every key of every ``(keys, handler)`` entry."""
    return {key: handler for keys, handler in entries for key in keys}

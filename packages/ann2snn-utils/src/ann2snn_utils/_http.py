"""HTTP policy of [`download_url`][ann2snn_utils.download_url]: statuses, ranges, Retry-After and retries."""

from __future__ import annotations

import email.utils
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import requests
import urllib3

from ann2snn_utils.errors import DownloadError, HTTPStatusError, TransferError

logger = logging.getLogger("ann2snn_utils.download")

_T = TypeVar("_T")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.ASCII)
_UNSATISFIED_RANGE_RE = re.compile(r"bytes\s+\*/(\d+)", re.ASCII)
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 8.0
THROTTLE_STATUSES = (429, 503)


class Truncated(Exception):
    """The body ended before the announced size: treated like a dropped connection (retried, resumed)."""


class Throttled(Exception):
    """``429``/``503``: the server asks to come back later (after ``retry_after`` seconds, when it says)."""

    def __init__(self, status: int, reason: str, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status} {reason}".rstrip())
        self.status, self.reason, self.retry_after = status, reason, retry_after


# Failures worth another try: the next attempt resumes from what is on disk. SSLError is a ConnectionError
# too, but a certificate problem does not go away by retrying, so it is handled before these. The urllib3
# errors come from reading the body through ``response.raw`` (requests' iter_content would rename them).
RETRIABLE: tuple[type[BaseException], ...] = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.ReadTimeoutError,
    urllib3.exceptions.IncompleteRead,
    Truncated,
)


def check_status(resp: requests.Response, url: str) -> None:
    """Raise ``Throttled`` for 429/503 and `HTTPStatusError` for any other status but 200/206."""
    status = resp.status_code
    if status in THROTTLE_STATUSES:
        raise Throttled(status, resp.reason or "", retry_after(resp.headers.get("Retry-After")))
    if status not in (200, 206):
        raise HTTPStatusError(url, status, resp.reason or "")


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds asked by a ``Retry-After`` header (delta-seconds or an HTTP date); None when absent or invalid.

    Examples:
        >>> retry_after("120"), retry_after(None), retry_after("soon")
        (120.0, None, None)
        >>> retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412480.0)
        30.0
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # HTTP dates are GMT; a date without a zone is not one
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


class RetryPolicy:
    """The retry budget of one call: ``retries`` failed attempts and ``budget`` seconds of waiting in all.

    A network failure waits the exponential backoff (0.5 s, 1 s, 2 s, ... at most 8 s); ``429``/``503``
    waits what its ``Retry-After`` asks (the backoff without one). A wait longer than what is left of the
    budget is not shortened: the call raises at once, naming the status, the wait asked and the budget.
    """

    def __init__(
        self, url: str, part: Path, retries: int, budget: float, sleep: Callable[[float], object]
    ) -> None:
        self.url, self.part, self.retries, self.budget, self.sleep = url, part, retries, budget, sleep
        self.failures = 0
        self.waited = 0.0

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn``, retrying network failures and throttling while the budget lasts."""
        while True:
            try:
                return fn()
            except requests.exceptions.SSLError as exc:
                raise TransferError(
                    f"download of {self.url} failed: {exc}", self.url, self.part, self.failures + 1
                ) from exc
            except Throttled as exc:
                self._wait_throttled(exc)
            except RETRIABLE as exc:
                self._wait_failed(exc)
            except requests.RequestException as exc:
                raise DownloadError(f"download of {self.url} failed: {exc}", self.url) from exc

    def _backoff(self) -> float:
        return min(_BACKOFF_FIRST_S * 2 ** (self.failures - 1), _BACKOFF_MAX_S)

    def _wait_failed(self, exc: BaseException) -> None:
        self.failures += 1
        delay = self._backoff()
        left = self.budget - self.waited
        if self.failures > self.retries or delay > left:
            spent = (
                f"after {self.failures} attempt(s)"
                if self.failures > self.retries
                else f"with {left:.1f} s left of the retry budget (retry_budget={self.budget:g} s)"
            )
            raise TransferError(
                f"download of {self.url} failed {spent}: {exc}; "
                f"the partial file {self.part} is kept for a later resume",
                self.url,
                self.part,
                self.failures,
            ) from exc
        logger.warning(
            "download of %s interrupted (%s); retry %d of %d in %.1f s",
            self.url,
            exc,
            self.failures,
            self.retries,
            delay,
        )
        self._sleep(delay)

    def _wait_throttled(self, exc: Throttled) -> None:
        self.failures += 1
        asked = exc.retry_after
        delay = self._backoff() if asked is None else asked
        left = self.budget - self.waited
        said = "" if asked is None else f"the server asked to retry after {asked:g} s (Retry-After)"
        if self.failures > self.retries:
            detail = f"still refused after {self.failures} attempt(s) (retries={self.retries})"
            detail += f", {said}" if said else " (no Retry-After)"
        elif delay > left:
            detail = (
                f"{said or f'the backoff of {delay:g} s is'}, more than the {left:g} s left of the retry "
                f"budget (retry_budget={self.budget:g} s, retries={self.retries})"
            )
        else:
            logger.warning(
                "%s answered %s; retry %d of %d in %.1f s", self.url, exc, self.failures, self.retries, delay
            )
            self._sleep(delay)
            return
        raise HTTPStatusError(self.url, exc.status, exc.reason, detail=detail, retry_after=asked) from None

    def _sleep(self, delay: float) -> None:
        self.waited += delay
        self.sleep(delay)


# -- response headers ------------------------------------------------------------------------------------------


def content_length(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Length", "").strip()
    return int(value) if value.isascii() and value.isdigit() else None


def validator(resp: requests.Response) -> str | None:
    """A validator for ``If-Range``: a strong ETag, else Last-Modified (weak ETags are not allowed there)."""
    etag = resp.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return resp.headers.get("Last-Modified") or None


def content_range(value: str) -> tuple[int, int, int | None] | None:
    """``bytes first-last/total`` as ``(first, last, total or None)``; None when malformed."""
    match = _CONTENT_RANGE_RE.fullmatch(value.strip())
    if match is None:
        return None
    first, last = int(match.group(1)), int(match.group(2))
    if last < first:
        return None
    total = None if match.group(3) == "*" else int(match.group(3))
    return first, last, total


def unsatisfied_total(resp: requests.Response) -> int | None:
    """The size a ``416`` answer names in ``Content-Range: bytes */size``, or None."""
    match = _UNSATISFIED_RANGE_RE.fullmatch(resp.headers.get("Content-Range", "").strip())
    return int(match.group(1)) if match else None


def range_problem(resp: requests.Response, offset: int, known_total: int | None) -> str | None:
    """Why a 206 answer cannot continue a part of ``offset`` bytes, or None when it can."""
    value = resp.headers.get("Content-Range", "")
    span = content_range(value)
    if span is None:
        return f"Content-Range {value!r} is not a byte range"
    first, last, total = span
    if first != offset:
        return f"Content-Range {value!r} does not start at byte {offset}, where the partial file ends"
    if total is not None and last + 1 > total:
        return f"Content-Range {value!r} ends beyond the file's size"
    length = content_length(resp)
    if length is not None and length != last - first + 1:
        return f"Content-Length {length} disagrees with Content-Range {value!r}"
    if total is not None and known_total is not None and total != known_total:
        return f"the remote file changed size from {known_total} to {total} bytes during the download"
    return None


def remote_size(session: requests.Session, url: str, timeout: float) -> int | None:
    """The remote size from HEAD, else from a one-byte ranged GET; None when the server does not say."""
    with session.head(url, allow_redirects=True, timeout=timeout) as resp:
        if resp.status_code in THROTTLE_STATUSES:
            check_status(resp, url)
        if resp.status_code == 200:
            size = content_length(resp)
            if size is not None:
                return size
    with session.get(url, headers={"Range": "bytes=0-0"}, stream=True, timeout=timeout) as resp:
        # The body is never read: a 200 here (Range ignored) is closed with the connection.
        if resp.status_code == 206:
            span = content_range(resp.headers.get("Content-Range", ""))
            return span[2] if span is not None else None
        if resp.status_code == 200:
            return content_length(resp)
        if resp.status_code == 416:
            return unsatisfied_total(resp)
        check_status(resp, url)
        raise HTTPStatusError(url, resp.status_code, resp.reason or "")  # an unusable 2xx/3xx

"""Resumable, verified HTTP(S) downloads: [`download_url`][ann2snn_utils.download_url]."""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import os
import re
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import requests
from tqdm import tqdm

from ann2snn_utils.__about__ import __version__
from ann2snn_utils.errors import (
    ChecksumMismatchError,
    DownloadError,
    HTTPStatusError,
    InvalidResponseError,
    SizeMismatchError,
    TransferError,
)

__all__ = ["USER_AGENT", "download_url"]

logger = logging.getLogger(__name__)

USER_AGENT = f"ann2snn-utils/{__version__} (+https://github.com/ann2snn/ann2snn) python-requests/{requests.__version__}"
"""The one ``User-Agent`` sent with every request."""

_T = TypeVar("_T")
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.ASCII)
_UNSATISFIED_RANGE_RE = re.compile(r"bytes\s+\*/(\d+)", re.ASCII)
_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 8.0
_MAX_RESTARTS = 2
_HASH_READ_SIZE = 1 << 20

# Indirection so tests can record the backoff delays instead of sleeping.
_sleep = time.sleep


class _Truncated(Exception):
    """The body ended before the announced size: treated like a dropped connection (retried, resumed)."""


# Failures worth another try: the next attempt resumes from what is on disk. SSLError is a ConnectionError
# too, but a certificate problem does not go away by retrying, so it is handled before these.
_RETRIABLE: tuple[type[BaseException], ...] = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    _Truncated,
)


class _Step(enum.Enum):
    DONE = "done"
    AGAIN = "again"


def download_url(
    url: str,
    dst: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    timeout: float = 30,
    retries: int = 3,
    progress: bool = True,
    chunk_size: int = 1 << 20,
) -> int:
    """Download ``url`` to ``dst``, resuming an interrupted download, and return the file's size in bytes.

    The body is streamed into ``<dst>.part`` beside the destination, and moved into place with
    `os.replace` only when it is complete and verified, so a failed or interrupted download never
    leaves a file at ``dst`` (an existing ``dst`` stays as it was until the new file replaces it).

    - **Resume.** An existing ``<dst>.part`` is continued with a ``Range`` request. A ``206`` answer is used
      only when its ``Content-Range`` starts where the part ends; a server that ignores ``Range`` (``200``)
      makes the download start over from byte 0 instead of appending; ``416`` on a part whose size equals the
      remote size means the part is complete; a part larger than the remote file is discarded. A server that
      sends a shorter range than asked is asked again for the rest. Within one call, a resume after a network
      failure carries ``If-Range`` (the first answer's strong ETag or Last-Modified), and a ``Content-Range``
      total that differs from the size seen before also starts the download over, so a file that changes on
      the server mid-download is never stitched from two versions. A ``.part`` left by an earlier call has no
      such check: give ``sha256`` to have the result verified.
    - **Nothing downloaded twice.** An existing ``dst`` whose SHA-256 equals ``sha256`` is returned without
      contacting the server. Without ``sha256``, an existing ``dst`` whose size equals the remote size is
      returned; the remote size comes from ``HEAD`` (or, where ``HEAD`` fails, a ``Range: bytes=0-0``
      request), never from transferring the body.
    - **Errors.** An HTTP error raises [`HTTPStatusError`][ann2snn_utils.HTTPStatusError] naming the URL and
      the status. A refused or dropped connection, a timeout or a body cut short is retried up to ``retries``
      times in all, with exponential backoff (0.5 s, 1 s, 2 s, ... at most 8 s), each retry resuming; then
      [`TransferError`][ann2snn_utils.TransferError] is raised and the ``.part`` is kept, so calling again
      resumes. Redirects are followed.
    - **Verification.** The byte count is checked against ``Content-Length``/``Content-Range`` when the server
      announces one (without it the body is read to its end), and the SHA-256 against ``sha256`` when given. A
      mismatch raises an [`IntegrityError`][ann2snn_utils.IntegrityError] and deletes the bad part, so the
      next call starts from scratch.
    - **Requests.** One `requests.Session` per call; every request carries the same ``User-Agent``
      ([`USER_AGENT`][ann2snn_utils.USER_AGENT]) and ``Accept-Encoding: identity`` (so sizes are raw bytes),
      and every response is closed. ``timeout`` applies to connecting and to each wait for data, not to the
      whole transfer.

    Two calls must not download to the same ``dst`` at the same time (they would share the ``.part``).

    Args:
        url: An ``http://`` or ``https://`` URL.
        dst: The destination file. Missing parent folders are created.
        sha256: The expected SHA-256 hex digest of the file (64 hex digits, any case), or None to skip it.
        timeout: Seconds to wait for a connection and for each read; a positive finite number.
        retries: How many times in all a network failure is retried; 0 disables retrying.
        progress: Show a tqdm progress bar (bytes, to stderr). False prints nothing.
        chunk_size: Bytes read and written at a time; a positive int.

    Returns:
        The size of ``dst`` in bytes.

    Raises:
        ValueError: A URL that is not http(s), or an out-of-range option.
        TypeError: An argument of the wrong type.
        HTTPStatusError: The server answered 4xx/5xx (``dst`` untouched, ``.part`` kept).
        TransferError: Network failures exhausted the retries (``.part`` kept).
        IntegrityError: Too many bytes or a wrong SHA-256 (``.part`` deleted).
        InvalidResponseError: The server's ranges stay inconsistent after starting over.
        DownloadError: Any other failure of the request (too many redirects, for example).

    Examples:
        >>> from ann2snn_utils import download_url
        >>> size = download_url("https://example.org/weights.pt", "models/weights.pt")  # doctest: +SKIP
    """
    _check_url(url)
    dst_path = _check_dst(dst)
    expected_sha256 = _check_sha256(sha256)
    timeout = _check_timeout(timeout)
    _check_int("retries", retries, minimum=0)
    _check_int("chunk_size", chunk_size, minimum=1)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")

    dst_path.parent.mkdir(parents=True, exist_ok=True)
    with requests.Session() as session:
        session.headers.update({"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
        job = _Download(session, url, dst_path, expected_sha256, timeout, retries, progress, chunk_size)
        return job.run()


class _Download:
    """The state of one [`download_url`][ann2snn_utils.download_url] call."""

    def __init__(
        self,
        session: requests.Session,
        url: str,
        dst: Path,
        sha256: str | None,
        timeout: float,
        retries: int,
        progress: bool,
        chunk_size: int,
    ) -> None:
        self.session = session
        self.url = url
        self.dst = dst
        self.part = dst.with_name(dst.name + ".part")
        self.sha256 = sha256
        self.timeout = timeout
        self.retries = retries
        self.progress = progress
        self.chunk_size = chunk_size
        self.failures = 0
        self.restarts = 0
        self.total: int | None = None  # remote size, once known
        self.validator: str | None = None  # strong ETag or Last-Modified of the last response, for If-Range
        self.hasher: hashlib._Hash | None = None  # digest of the first `hashed` bytes of the part
        self.hashed = 0
        self.bar: tqdm | None = None

    # -- the whole job ------------------------------------------------------------------------------------

    def run(self) -> int:
        if self.dst.is_file() and self._dst_is_complete():
            return self.dst.stat().st_size
        started = time.perf_counter()
        try:
            while self._retrying(self._attempt) is _Step.AGAIN:
                pass
        finally:
            if self.bar is not None:
                self.bar.close()
        size = self._verify_part()
        os.replace(self.part, self.dst)
        logger.info(
            "downloaded %s to %s (%d bytes) in %.2f s",
            self.url,
            self.dst,
            size,
            time.perf_counter() - started,
        )
        return size

    def _dst_is_complete(self) -> bool:
        local = self.dst.stat().st_size
        if self.sha256 is not None:
            if _file_sha256(self.dst) == self.sha256:
                logger.info("%s already has the expected sha256; not downloading %s", self.dst, self.url)
                return True
            logger.info("%s exists but its sha256 differs; downloading %s again", self.dst, self.url)
            return False
        remote = self._retrying(self._remote_size)
        if remote is not None and remote == local:
            logger.info("%s is complete (%d bytes); not downloading %s", self.dst, local, self.url)
            return True
        logger.info(
            "%s exists (%d bytes, remote %s); downloading %s again", self.dst, local, remote, self.url
        )
        return False

    def _retrying(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn``, retrying network failures with backoff while the call's retry budget lasts."""
        while True:
            try:
                return fn()
            except requests.exceptions.SSLError as exc:
                raise TransferError(
                    f"download of {self.url} failed: {exc}", self.url, self.part, self.failures + 1
                ) from exc
            except _RETRIABLE as exc:
                self.failures += 1
                if self.failures > self.retries:
                    raise TransferError(
                        f"download of {self.url} failed after {self.failures} attempt(s): {exc}; "
                        f"the partial file {self.part} is kept for a later resume",
                        self.url,
                        self.part,
                        self.failures,
                    ) from exc
                delay = min(_BACKOFF_FIRST_S * 2 ** (self.failures - 1), _BACKOFF_MAX_S)
                logger.warning(
                    "download of %s interrupted (%s); retry %d of %d in %.1f s",
                    self.url,
                    exc,
                    self.failures,
                    self.retries,
                    delay,
                )
                _sleep(delay)
            except requests.RequestException as exc:
                raise DownloadError(f"download of {self.url} failed: {exc}", self.url) from exc

    # -- one request ---------------------------------------------------------------------------------------

    def _attempt(self) -> _Step:
        offset = self._part_size()
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if self.validator is not None:
                # Within this call: a changed remote file then answers 200 (start over), not a mixed range.
                headers["If-Range"] = self.validator
        with self.session.get(self.url, headers=headers, stream=True, timeout=self.timeout) as resp:
            status = resp.status_code
            if status == 416 and offset:
                return self._unsatisfiable(resp, offset)
            if status not in (200, 206):
                raise HTTPStatusError(self.url, status, resp.reason or "")
            if status == 200:
                if offset:
                    logger.info("server ignored Range for %s; starting over from byte 0", self.url)
                    offset = 0
                self.total = end = _content_length(resp)
            else:
                if not offset:
                    raise InvalidResponseError(
                        f"download of {self.url} failed: 206 Partial Content to a request without Range",
                        self.url,
                    )
                problem = self._range_problem(resp, offset)
                if problem is not None:
                    return self._restart(problem)
                span = _content_range(resp.headers["Content-Range"])
                assert span is not None  # checked by _range_problem
                end = span[1] + 1
                if span[2] is not None:
                    self.total = span[2]
            self.validator = _validator(resp)
            self._stream(resp, offset, end)
        if self.total is not None and self._part_size() < self.total:
            return _Step.AGAIN  # the server sent a shorter range than asked; ask for the rest
        return _Step.DONE

    def _range_problem(self, resp: requests.Response, offset: int) -> str | None:
        """Why a 206 answer cannot continue a part of ``offset`` bytes, or None when it can."""
        value = resp.headers.get("Content-Range", "")
        span = _content_range(value)
        if span is None:
            return f"Content-Range {value!r} is not a byte range"
        first, last, total = span
        if first != offset:
            return f"Content-Range {value!r} does not start at byte {offset}, where the partial file ends"
        if total is not None and last + 1 > total:
            return f"Content-Range {value!r} ends beyond the file's size"
        length = _content_length(resp)
        if length is not None and length != last - first + 1:
            return f"Content-Length {length} disagrees with Content-Range {value!r}"
        if total is not None and self.total is not None and total != self.total:
            return f"the remote file changed size from {self.total} to {total} bytes during the download"
        return None

    def _stream(self, resp: requests.Response, offset: int, end: int | None) -> None:
        """Write the body at ``offset`` of the part; ``end`` is where the server says it stops."""
        self._sync_hasher(offset)
        bar = self._progress_bar(offset)
        hasher = self.hasher
        written = offset
        try:
            with open(self.part, "ab" if offset else "wb") as fh:
                for chunk in resp.iter_content(self.chunk_size):
                    fh.write(chunk)
                    written += len(chunk)
                    if hasher is not None:
                        hasher.update(chunk)
                    bar.update(len(chunk))
                    if end is not None and written > end:
                        break
        finally:
            self.hashed = written
        if end is not None and written > end:
            self._discard()
            raise SizeMismatchError(
                f"download of {self.url} failed: the server sent more than the {end - offset} bytes it "
                f"announced; the partial file was deleted",
                self.url,
                end,
                written,
            )
        if end is not None and written < end:
            raise _Truncated(f"the body ended at byte {written} of {end}")

    def _unsatisfiable(self, resp: requests.Response, offset: int) -> _Step:
        """Handle ``416 Range Not Satisfiable`` to a resume at ``offset``."""
        match = _UNSATISFIED_RANGE_RE.fullmatch(resp.headers.get("Content-Range", "").strip())
        total = int(match.group(1)) if match else self._remote_size()
        if total == offset:
            logger.info("%s is already complete (%d bytes)", self.part, offset)
            self.total = total
            return _Step.DONE
        remote = "an unknown size" if total is None else f"{total} bytes"
        return self._restart(f"the partial file has {offset} bytes but the remote file has {remote}")

    def _restart(self, reason: str) -> _Step:
        self.restarts += 1
        if self.restarts > _MAX_RESTARTS:
            raise InvalidResponseError(f"download of {self.url} failed: {reason}", self.url)
        logger.info("download of %s starts over from byte 0: %s", self.url, reason)
        self._discard()
        return _Step.AGAIN

    def _remote_size(self) -> int | None:
        """The remote size from HEAD, else from a one-byte ranged GET; None when the server does not say."""
        with self.session.head(self.url, allow_redirects=True, timeout=self.timeout) as resp:
            if resp.status_code == 200:
                size = _content_length(resp)
                if size is not None:
                    return size
        with self.session.get(
            self.url, headers={"Range": "bytes=0-0"}, stream=True, timeout=self.timeout
        ) as resp:
            # The body is never read: a 200 here (Range ignored) is closed with the connection.
            if resp.status_code == 206:
                span = _content_range(resp.headers.get("Content-Range", ""))
                return span[2] if span is not None else None
            if resp.status_code == 200:
                return _content_length(resp)
            if resp.status_code == 416:
                match = _UNSATISFIED_RANGE_RE.fullmatch(resp.headers.get("Content-Range", "").strip())
                return int(match.group(1)) if match else None
            raise HTTPStatusError(self.url, resp.status_code, resp.reason or "")

    # -- the partial file ----------------------------------------------------------------------------------

    def _part_size(self) -> int:
        try:
            return self.part.stat().st_size
        except FileNotFoundError:
            return 0

    def _discard(self) -> None:
        self.part.unlink(missing_ok=True)
        self.hasher = None
        self.hashed = 0

    def _sync_hasher(self, size: int) -> None:
        """Make ``self.hasher`` the digest of the first ``size`` bytes of the part (the part's whole content)."""
        if self.sha256 is None:
            return
        if size == 0:
            self.hasher, self.hashed = hashlib.sha256(), 0
        elif self.hasher is None or self.hashed != size:
            self.hasher, self.hashed = _file_hasher(self.part), size

    def _verify_part(self) -> int:
        if not self.part.is_file():  # even an empty body makes one: _stream opens it with "wb"
            raise DownloadError(f"download of {self.url} failed: {self.part} vanished", self.url)
        size = self._part_size()
        if self.total is not None and size != self.total:
            self._discard()
            raise SizeMismatchError(
                f"download of {self.url} failed: {size} bytes on disk, the server announced {self.total}; "
                f"the partial file was deleted",
                self.url,
                self.total,
                size,
            )
        if self.sha256 is not None:
            self._sync_hasher(size)
            assert self.hasher is not None  # set by _sync_hasher when sha256 is given
            actual = self.hasher.hexdigest()
            if actual != self.sha256:
                self._discard()
                raise ChecksumMismatchError(
                    f"download of {self.url} failed: sha256 {actual} differs from the expected {self.sha256}; "
                    f"the partial file was deleted",
                    self.url,
                    self.sha256,
                    actual,
                )
        return size

    def _progress_bar(self, offset: int) -> tqdm:
        if self.bar is None:
            self.bar = tqdm(
                total=self.total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=str(self.dst),
                disable=not self.progress,
            )
        else:
            self.bar.reset(total=self.total)
            self.bar.update(offset)
        return self.bar


# -- helpers -------------------------------------------------------------------------------------------------


def _content_length(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Length", "").strip()
    return int(value) if value.isascii() and value.isdigit() else None


def _validator(resp: requests.Response) -> str | None:
    """A validator for ``If-Range``: a strong ETag, else Last-Modified (weak ETags are not allowed there)."""
    etag = resp.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return resp.headers.get("Last-Modified") or None


def _content_range(value: str) -> tuple[int, int, int | None] | None:
    """``bytes first-last/total`` as ``(first, last, total or None)``; None when malformed."""
    match = _CONTENT_RANGE_RE.fullmatch(value.strip())
    if match is None:
        return None
    first, last = int(match.group(1)), int(match.group(2))
    if last < first:
        return None
    total = None if match.group(3) == "*" else int(match.group(3))
    return first, last, total


def _file_hasher(path: Path) -> hashlib._Hash:
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_READ_SIZE):
            hasher.update(block)
    return hasher


def _file_sha256(path: Path) -> str:
    return _file_hasher(path).hexdigest()


# -- argument checks -----------------------------------------------------------------------------------------


def _check_url(url: object) -> None:
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, got {type(url).__name__}")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        got = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise ValueError(f"download_url supports only http and https URLs, got {got} in {url!r}")
    if not parts.hostname:
        raise ValueError(f"download_url needs a URL with a host, got {url!r}")


def _check_dst(dst: object) -> Path:
    fspath = os.fspath(dst) if isinstance(dst, (str, os.PathLike)) else None
    if not isinstance(fspath, str):
        raise TypeError(f"dst must be a str or os.PathLike[str], got {type(dst).__name__}")
    path = Path(fspath)
    if not path.name:
        raise ValueError(f"dst must name a file, got {dst!r}")
    if path.is_dir():
        raise ValueError(f"dst must name a file, got the existing directory {os.fspath(path)!r}")
    return path


def _check_sha256(sha256: object) -> str | None:
    if sha256 is None:
        return None
    if not isinstance(sha256, str):
        raise TypeError(f"sha256 must be a str of 64 hex digits or None, got {type(sha256).__name__}")
    if not _SHA256_RE.fullmatch(sha256):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return sha256.lower()


def _check_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, got {type(timeout).__name__}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive finite number of seconds, got {timeout!r}")
    return float(timeout)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")

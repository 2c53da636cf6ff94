"""Exceptions raised by [`download_url`][ann2snn_utils.download_url].

Every failure of a download is a [`DownloadError`][ann2snn_utils.DownloadError], itself a `RuntimeError`,
so one ``except`` clause catches them all:

    RuntimeError
    └── DownloadError              any failed download; .url
        ├── HTTPStatusError        the server answered 4xx/5xx (or another unusable status); .status, .reason
        ├── InvalidResponseError   the answer breaks HTTP range semantics even after starting over
        ├── TransferError          connection failed, dropped or timed out on every attempt; .part is kept
        └── IntegrityError         the bytes are not the expected ones; the bad part is deleted
            ├── SizeMismatchError      more bytes than announced; .expected, .actual
            └── ChecksumMismatchError  SHA-256 differs from ``sha256=``; .expected, .actual

Invalid arguments raise `ValueError` or `TypeError` before any request is sent, and local
file-system errors (a full disk, a read-only folder) propagate as `OSError`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "ChecksumMismatchError",
    "DownloadError",
    "HTTPStatusError",
    "IntegrityError",
    "InvalidResponseError",
    "SizeMismatchError",
    "TransferError",
]


class DownloadError(RuntimeError):
    """A download failed; nothing was written at the destination.

    Args:
        message: What went wrong, naming the URL.
        url: The URL that was being downloaded.

    Examples:
        >>> err = DownloadError("download of http://example.org/x failed", "http://example.org/x")
        >>> isinstance(err, RuntimeError), err.url
        (True, 'http://example.org/x')
    """

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.url = url


class HTTPStatusError(DownloadError):
    """The server answered with an error status (4xx, 5xx) or another status a download cannot use.

    ``429 Too Many Requests`` and ``503 Service Unavailable`` are retried first (honouring ``Retry-After``);
    this error is raised for them once the call's retry budget is spent, and ``detail`` says so.

    Args:
        url: The requested URL.
        status: The HTTP status code.
        reason: The reason phrase the server sent (may be empty).
        detail: More about the failure, appended to the message (for example, the retry budget spent).
        retry_after: The seconds the server's last ``Retry-After`` asked for, or None.

    Examples:
        >>> err = HTTPStatusError("http://example.org/x", 404, "Not Found")
        >>> str(err)
        'download of http://example.org/x failed: HTTP 404 Not Found'
        >>> err.status
        404
        >>> HTTPStatusError("http://example.org/x", 503, "Service Unavailable", retry_after=60.0).retry_after
        60.0
    """

    def __init__(
        self, url: str, status: int, reason: str = "", *, detail: str = "", retry_after: float | None = None
    ) -> None:
        text = f"HTTP {status} {reason}".rstrip()
        if detail:
            text += f"; {detail}"
        super().__init__(f"download of {url} failed: {text}", url)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


class InvalidResponseError(DownloadError):
    """The server's answer cannot be used even after starting over from byte 0.

    Raised, for example, for a ``206 Partial Content`` answer to a request that asked for no range, or a
    ``Content-Range`` that keeps disagreeing with the requested range.

    Examples:
        >>> err = InvalidResponseError("download of http://example.org/x failed: 206 without Range", "http://example.org/x")
        >>> isinstance(err, DownloadError)
        True
    """


class TransferError(DownloadError):
    """The connection failed, dropped or timed out on every allowed attempt.

    The partial file is kept, so calling [`download_url`][ann2snn_utils.download_url] again resumes where it
    stopped.

    Args:
        message: What went wrong, naming the URL and the last network error.
        url: The requested URL.
        part: The partial file kept for a later resume.
        attempts: How many requests were tried in all.

    Examples:
        >>> from pathlib import Path
        >>> err = TransferError("download of http://example.org/x failed", "http://example.org/x", Path("x.part"), 4)
        >>> err.attempts, err.part.name
        (4, 'x.part')
    """

    def __init__(self, message: str, url: str, part: Path, attempts: int) -> None:
        super().__init__(message, url)
        self.part = part
        self.attempts = attempts


class IntegrityError(DownloadError):
    """The downloaded bytes are not the expected ones; the bad partial file has been deleted.

    Args:
        message: What differs, naming the URL.
        url: The requested URL.
        expected: The expected value (a size in bytes or a hex digest).
        actual: The value that arrived.

    Examples:
        >>> err = IntegrityError("download of http://example.org/x failed: bad bytes", "http://example.org/x", 1, 2)
        >>> err.expected, err.actual
        (1, 2)
    """

    def __init__(self, message: str, url: str, expected: object, actual: object) -> None:
        super().__init__(message, url)
        self.expected = expected
        self.actual = actual


class SizeMismatchError(IntegrityError):
    """The server sent more bytes than it announced (``Content-Length`` or ``Content-Range``).

    Examples:
        >>> err = SizeMismatchError("download of http://example.org/x failed: 12 bytes, expected 10", "http://example.org/x", 10, 12)
        >>> isinstance(err, IntegrityError)
        True
    """


class ChecksumMismatchError(IntegrityError):
    """The SHA-256 digest of the downloaded file differs from the ``sha256=`` the caller gave.

    Examples:
        >>> err = ChecksumMismatchError("download of http://example.org/x failed: sha256 differs", "http://example.org/x", "ab", "cd")
        >>> err.expected
        'ab'
    """

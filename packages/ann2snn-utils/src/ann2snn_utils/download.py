"""Resumable, verified HTTP(S) downloads: [`download_url`][ann2snn_utils.download_url]."""

from __future__ import annotations

import math
import os
import re
import time
import urllib.parse
from pathlib import Path

import requests
from tqdm import tqdm

from ann2snn_utils.__about__ import __version__
from ann2snn_utils._job import Download

__all__ = ["USER_AGENT", "download_url"]

USER_AGENT = f"ann2snn-utils/{__version__} (+https://github.com/ann2snn/ann2snn) python-requests/{requests.__version__}"
"""The one ``User-Agent`` sent with every request."""

_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")

# Indirections looked up at each call, so tests can record the waits instead of sleeping, or wrap the bar.
_sleep = time.sleep


def download_url(
    url: str,
    dst: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    timeout: float = 30,
    retries: int = 3,
    retry_budget: float = 120,
    progress: bool | None = None,
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
    - **Every byte that arrived is kept.** The body is read as it arrives (not in whole ``chunk_size``
      blocks), written, and on any failure flushed and fsync'ed, so a connection that drops after a few
      kilobytes still makes progress: the next attempt asks for ``Range: bytes=<what is on disk>-``.
    - **One download per destination at a time.** The whole call holds an exclusive lock on
      ``<dst>.lock`` (standard library only: `fcntl.flock` on POSIX, `msvcrt.locking` on Windows, so the
      package needs nothing beyond requests and tqdm; the kernel drops the lock if its holder dies). Threads
      and processes downloading to the same ``dst`` therefore run one after the other, and a call that waited
      finds the destination complete. The lock file is left in place.
    - **Links are never followed.** A ``<dst>.part`` that is a symlink (or anything but a regular file) is
      removed, not written through, and the part is opened with ``O_NOFOLLOW`` where the OS has it; the
      result is installed by an atomic `os.replace` of that regular file, after checking that the file at
      ``<dst>.part`` is still the one written (device, inode, size).
    - **Nothing downloaded twice.** An existing ``dst`` whose SHA-256 equals ``sha256`` is returned without
      contacting the server. Without ``sha256``, an existing ``dst`` whose size equals the remote size is
      returned; the remote size comes from ``HEAD`` (or, where ``HEAD`` fails, a ``Range: bytes=0-0``
      request), never from transferring the body.
    - **Errors and retries.** An HTTP error raises [`HTTPStatusError`][ann2snn_utils.HTTPStatusError] naming
      the URL and the status. A refused or dropped connection, a timeout or a body cut short is retried with
      exponential backoff (0.5 s, 1 s, 2 s, ... at most 8 s), each retry resuming; ``429 Too Many Requests``
      and ``503 Service Unavailable`` are retried after the wait their ``Retry-After`` asks (seconds or an
      HTTP date; the backoff without one). The retry budget is ``retries`` failed attempts and
      ``retry_budget`` seconds of waiting in all: a ``Retry-After`` longer than what is left raises at once
      (the server's wait is never cut short), with a message naming the status, the wait asked and the
      budget. Spent on network failures, [`TransferError`][ann2snn_utils.TransferError] is raised and the
      ``.part`` is kept, so calling again resumes. Redirects are followed.
    - **Verification.** The byte count is checked against ``Content-Length``/``Content-Range`` when the server
      announces one (without it the body is read to its end), and the SHA-256 against ``sha256`` when given.
      The digest is that of the file that is installed: the bytes already on disk are read back once through
      the handle that then writes the new ones, each received block is hashed as it is written into that
      file, no other call can write it meanwhile (the lock), and the rename checks it is still the same file
      (a part replaced by another file between attempts is hashed again from byte 0). The hashing runs on a
      background thread fed the blocks as they are written (hashlib releases the interpreter lock), so it
      overlaps the transfer where a spare CPU core is free; the thread is joined before each attempt ends,
      and an error on it is raised by the call.
      A mismatch raises an [`IntegrityError`][ann2snn_utils.IntegrityError] and deletes the bad part, so the
      next call starts from scratch.
    - **Requests.** One `requests.Session` per call; every request carries the same ``User-Agent``
      ([`USER_AGENT`][ann2snn_utils.USER_AGENT]) and ``Accept-Encoding: identity`` (so sizes are raw bytes),
      and every response is closed. ``timeout`` applies to connecting and to each wait for data, not to the
      whole transfer.

    Args:
        url: An ``http://`` or ``https://`` URL.
        dst: The destination file. Missing parent folders are created.
        sha256: The expected SHA-256 hex digest of the file (64 hex digits, any case), or None to skip it.
        timeout: Seconds to wait for a connection and for each read; a positive finite number.
        retries: How many failed attempts in all are retried (network failures, 429, 503); 0 disables it.
        retry_budget: The most seconds spent waiting between attempts in all (backoff and ``Retry-After``);
            a finite number >= 0.
        progress: Show a tqdm progress bar (bytes, to stderr); False prints nothing. None (the default) shows
            it unless the environment sets ``TQDM_DISABLE`` (to anything but ``0``/``false``/``no``).
        chunk_size: The most bytes read and written at a time; a positive int.

    Returns:
        The size of ``dst`` in bytes.

    Raises:
        ValueError: A URL that is not http(s), or an out-of-range option.
        TypeError: An argument of the wrong type.
        HTTPStatusError: The server answered 4xx/5xx (429/503 once the retry budget is spent; ``dst``
            untouched, ``.part`` kept).
        TransferError: Network failures exhausted the retries (``.part`` kept).
        IntegrityError: Too many bytes or a wrong SHA-256 (``.part`` deleted).
        InvalidResponseError: The server's ranges stay inconsistent after starting over.
        DownloadError: Any other failure of the request (too many redirects, for example).
        OSError: A local file-system error, such as a ``.part`` that is a directory.

    Examples:
        >>> from ann2snn_utils import download_url
        >>> size = download_url("https://example.org/weights.pt", "models/weights.pt")  # doctest: +SKIP
    """
    _check_url(url)
    dst_path = _check_dst(dst)
    expected_sha256 = _check_sha256(sha256)
    options = {
        "timeout": _check_seconds("timeout", timeout, positive=True),
        "retries": _check_int("retries", retries, minimum=0),
        "retry_budget": _check_seconds("retry_budget", retry_budget, positive=False),
        "chunk_size": _check_int("chunk_size", chunk_size, minimum=1),
        "progress": _progress(progress),
    }

    dst_path.parent.mkdir(parents=True, exist_ok=True)
    with requests.Session() as session:
        session.headers.update({"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
        job = Download(session, url, dst_path, expected_sha256, options, sleep=_sleep, bar_factory=tqdm)
        return job.run()


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


def _check_seconds(name: str, value: object, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if positive and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number of seconds, got {value!r}")
    if not positive and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _progress(progress: object) -> bool:
    """``progress=`` as given, or from ``TQDM_DISABLE`` when None (SPEC 13.5: the argument overrides the env)."""
    if progress is None:
        return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("", "0", "false", "no")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    return progress


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value

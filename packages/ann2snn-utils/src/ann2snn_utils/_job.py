"""One [`download_url`][ann2snn_utils.download_url] call: resume, restart, verify, install."""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from ann2snn_utils import _http
from ann2snn_utils._lock import dst_lock
from ann2snn_utils._partfile import PartFile, file_sha256
from ann2snn_utils.errors import ChecksumMismatchError, InvalidResponseError, SizeMismatchError

logger = logging.getLogger("ann2snn_utils.download")

_MAX_RESTARTS = 2


class Step(enum.Enum):
    DONE = "done"
    AGAIN = "again"


class Download:
    """The state of one call; ``bar_factory`` is tqdm (looked up per call, so tests can replace it)."""

    def __init__(
        self,
        session: requests.Session,
        url: str,
        dst: Path,
        sha256: str | None,
        options: dict[str, Any],
        sleep: Callable[[float], object],
        bar_factory: Callable[..., Any],
    ) -> None:
        self.session, self.url, self.dst, self.sha256 = session, url, dst, sha256
        self.timeout: float = options["timeout"]
        self.progress: bool = options["progress"]
        self.chunk_size: int = options["chunk_size"]
        self.part = PartFile(dst.with_name(dst.name + ".part"), hashing=sha256 is not None)
        self.policy = _http.RetryPolicy(
            url, self.part.path, options["retries"], options["retry_budget"], sleep
        )
        self.bar_factory = bar_factory
        self.restarts = 0
        self.total: int | None = None  # remote size, once known
        self.validator: str | None = None  # strong ETag or Last-Modified of the last response, for If-Range
        self.bar: Any = None

    def run(self) -> int:
        with dst_lock(self.dst.with_name(self.dst.name + ".lock")):
            if self.dst.is_file() and self._dst_is_complete():
                return self.dst.stat().st_size
            start = time.monotonic()
            try:
                while self.policy.call(self._attempt) is Step.AGAIN:
                    pass
                size = self._verify_and_install()
            finally:
                self.part.close()
                if self.bar is not None:
                    self.bar.close()
        logger.info(
            "downloaded %s to %s (%d bytes) in %.2f s", self.url, self.dst, size, time.monotonic() - start
        )
        return size

    def _dst_is_complete(self) -> bool:
        local = self.dst.stat().st_size
        if self.sha256 is not None:
            if file_sha256(self.dst) == self.sha256:
                logger.info("%s already has the expected sha256; not downloading %s", self.dst, self.url)
                return True
            logger.info("%s exists but its sha256 differs; downloading %s again", self.dst, self.url)
            return False
        remote = self.policy.call(lambda: _http.remote_size(self.session, self.url, self.timeout))
        if remote is not None and remote == local:
            logger.info("%s is complete (%d bytes); not downloading %s", self.dst, local, self.url)
            return True
        logger.info(
            "%s exists (%d bytes, remote %s); downloading %s again", self.dst, local, remote, self.url
        )
        return False

    def _attempt(self) -> Step:
        offset = self.part.size()
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if self.validator is not None:
                # Within this call: a changed remote file then answers 200 (start over), not a mixed range.
                headers["If-Range"] = self.validator
        with self.session.get(self.url, headers=headers, stream=True, timeout=self.timeout) as resp:
            if resp.status_code == 416 and offset:
                return self._unsatisfiable(resp, offset)
            _http.check_status(resp, self.url)
            if resp.status_code == 200:
                if offset:
                    logger.info("server ignored Range for %s; starting over from byte 0", self.url)
                    offset = 0
                self.total = end = _http.content_length(resp)
            else:
                if not offset:
                    raise InvalidResponseError(
                        f"download of {self.url} failed: 206 Partial Content to a request without Range",
                        self.url,
                    )
                problem = _http.range_problem(resp, offset, self.total)
                if problem is not None:
                    return self._restart(problem)
                span = _http.content_range(resp.headers["Content-Range"])
                assert span is not None  # checked by range_problem
                end = span[1] + 1
                self.total = span[2] if span[2] is not None else self.total
            self.validator = _http.validator(resp)
            self._receive(resp, offset, end)
        if self.total is not None and self.part.position < self.total:
            return Step.AGAIN  # the server sent a shorter range than asked; ask for the rest
        return Step.DONE

    def _receive(self, resp: requests.Response, offset: int, end: int | None) -> None:
        """Write the body at ``offset`` of the part; ``end`` is where the server says it stops."""
        self.part.open(offset)
        self.part.receive(resp, end, self._progress_bar(offset), self.chunk_size)
        written = self.part.position
        if end is not None and written > end:
            self.part.discard()
            raise SizeMismatchError(
                f"download of {self.url} failed: the server sent more than the {end - offset} bytes it "
                f"announced; the partial file was deleted",
                self.url,
                end,
                written,
            )
        if end is not None and written < end:
            raise _http.Truncated(f"the body ended at byte {written} of {end}")

    def _unsatisfiable(self, resp: requests.Response, offset: int) -> Step:
        """Handle ``416 Range Not Satisfiable`` to a resume at ``offset``."""
        total = _http.unsatisfied_total(resp)
        if total is None:
            total = _http.remote_size(self.session, self.url, self.timeout)
        if total == offset:
            logger.info("%s is already complete (%d bytes)", self.part.path, offset)
            self.total = total
            self.part.open(offset)
            try:
                self.part.hash_written()  # what is on disk, through this handle: the installed file is verified
            finally:
                self.part.close()
            return Step.DONE
        remote = "an unknown size" if total is None else f"{total} bytes"
        return self._restart(f"the partial file has {offset} bytes but the remote file has {remote}")

    def _restart(self, reason: str) -> Step:
        self.restarts += 1
        if self.restarts > _MAX_RESTARTS:
            raise InvalidResponseError(f"download of {self.url} failed: {reason}", self.url)
        logger.info("download of %s starts over from byte 0: %s", self.url, reason)
        self.part.discard()
        return Step.AGAIN

    def _verify_and_install(self) -> int:
        size = check_integrity(self.part, self.url, self.total, self.sha256)
        self.part.install(self.dst)
        return size

    def _progress_bar(self, offset: int) -> Any:
        if self.bar is None:
            self.bar = self.bar_factory(
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


def check_integrity(part: PartFile, url: str, total: int | None, sha256: str | None) -> int:
    """The part's size, once it matches ``total`` and ``sha256`` (where known); else delete it and raise."""
    size = part.position
    if total is not None and size != total:
        part.discard()
        raise SizeMismatchError(
            f"download of {url} failed: {size} bytes on disk, the server announced {total}; "
            f"the partial file was deleted",
            url,
            total,
            size,
        )
    if sha256 is not None:
        actual = part.sha256()
        if actual != sha256:
            part.discard()
            raise ChecksumMismatchError(
                f"download of {url} failed: sha256 {actual} differs from the expected {sha256}; "
                f"the partial file was deleted",
                url,
                sha256,
                actual,
            )
    return size

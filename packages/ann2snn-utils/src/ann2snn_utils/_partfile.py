"""The partial file ``<dst>.part``: never followed through a link, written and hashed in one pass, kept on
failure (flushed and fsync'ed), and installed by an atomic `os.replace` of the very file that was hashed."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path
from typing import BinaryIO, Protocol

import requests

logger = logging.getLogger("ann2snn_utils.download")

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # absent on Windows, where the lstat check below does the work
_BINARY = getattr(os, "O_BINARY", 0)
_HASH_READ_SIZE = 1 << 20


class _Bar(Protocol):
    def update(self, n: float | None = 1) -> bool | None: ...


class PartFile:
    """``<dst>.part`` of one call, and the SHA-256 of its first ``hashed`` bytes when ``hashing``."""

    def __init__(self, path: Path, hashing: bool) -> None:
        self.path = path
        self.hashing = hashing
        self.hasher: hashlib._Hash | None = None
        self.hashed = 0
        self.position = 0  # bytes in the file, as written through ``fh``
        self.fh: BinaryIO | None = None
        self.identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file written

    def size(self) -> int:
        """Bytes already on disk; a link (or any other non-regular file) at the path is removed, not followed."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return 0
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(f"the partial file {os.fspath(self.path)!r} is a directory; remove it")
        logger.warning(
            "%s is not a regular file (a symlink?); removing it, its target stays untouched", self.path
        )
        os.unlink(self.path)  # the link itself
        self.hasher, self.hashed = None, 0
        return 0

    def open(self, offset: int) -> None:
        """Open for writing at ``offset`` (0 truncates); the digest then covers the first ``offset`` bytes."""
        flags = os.O_RDWR | os.O_CREAT | _NOFOLLOW | _BINARY | (0 if offset else os.O_TRUNC)
        fd = os.open(self.path, flags, 0o644)  # ELOOP if a link was put there since size()
        fh = os.fdopen(fd, "r+b")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            fh.close()
            raise OSError(f"the partial file {os.fspath(self.path)!r} is not a regular file")
        self.fh, self.identity = fh, (st.st_dev, st.st_ino)
        if self.hashing and (self.hasher is None or self.hashed != offset):
            self._hash_prefix(fh, offset)
        fh.seek(offset)
        fh.truncate()
        self.position = offset

    def _hash_prefix(self, fh: BinaryIO, offset: int) -> None:
        """Hash the bytes already on disk, once per call (read through the handle that is written)."""
        hasher = hashlib.sha256()
        fh.seek(0)
        left = offset
        while left and (block := fh.read(min(left, _HASH_READ_SIZE))):
            hasher.update(block)
            left -= len(block)
        self.hasher, self.hashed = hasher, offset - left

    def receive(self, resp: requests.Response, end: int | None, bar: _Bar, chunk_size: int) -> None:
        """Append the body of ``resp`` until it ends (or passes ``end``), keeping every byte that arrived.

        ``read1`` returns what one receive brought, so a connection that drops mid-chunk loses nothing that
        reached us (``iter_content`` would drop the incomplete chunk); urllib3 1.x has no ``read1``, and its
        ``read`` returns a short read before raising. The file is flushed and fsync'ed even on failure.
        """
        raw = resp.raw
        read = getattr(raw, "read1", None) or raw.read
        fh, hasher = self.fh, self.hasher if self.hashing else None
        assert fh is not None, "open() first"
        try:
            while piece := read(chunk_size, decode_content=True):
                fh.write(piece)
                if hasher is not None:
                    hasher.update(piece)
                self.position += len(piece)
                bar.update(len(piece))
                if end is not None and self.position > end:
                    break
        finally:
            if hasher is not None:
                self.hashed = self.position
            self.close()

    def close(self) -> None:
        if self.fh is not None:
            fh, self.fh = self.fh, None
            try:
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fh.close()

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
        self.hasher, self.hashed, self.position = None, 0, 0

    def sha256(self) -> str:
        """The digest of the whole file, as written (the prefix read back once, the rest while receiving)."""
        if self.hasher is None or self.hashed != self.position:
            raise RuntimeError(f"{self.path} was not hashed in full ({self.hashed} of {self.position} bytes)")
        return self.hasher.hexdigest()

    def install(self, dst: Path) -> None:
        """Rename the file that was written and hashed to ``dst``: checked to be that same regular file first."""
        st = os.lstat(self.path)
        if (
            not stat.S_ISREG(st.st_mode)
            or (st.st_dev, st.st_ino) != self.identity
            or st.st_size != self.position
        ):
            raise RuntimeError(
                f"{self.path} changed under the download (it is no longer the {self.position}-byte file written); "
                f"another process wrote it without holding {self.path.with_suffix('.lock').name}"
            )
        os.replace(self.path, dst)
        _fsync_dir(dst.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); folders cannot be opened for fsync on Windows."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_READ_SIZE):
            hasher.update(block)
    return hasher.hexdigest()

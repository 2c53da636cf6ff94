"""The partial file ``<dst>.part``: never followed through a link, written and hashed in one pass, kept on
failure (flushed and fsync'ed), and installed by an atomic `os.replace` of the very file that was hashed.

With ``sha256=`` the hashing runs on a background thread (hashlib releases the interpreter lock while it hashes
blocks of 2 KiB or more), fed through a bounded queue with each block as it is written, so the digest overlaps
the network read and the file write instead of adding to them. On a resume, that thread first reads back the
bytes already on disk (``os.pread`` on the handle that then writes the new ones). The thread lives inside one
`PartFile.receive` call: it is joined before ``receive`` returns or raises, and an error on it is raised there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import stat
import threading
from pathlib import Path
from typing import BinaryIO, Protocol

import requests

logger = logging.getLogger("ann2snn_utils.download")

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # absent on Windows, where the lstat check below does the work
_BINARY = getattr(os, "O_BINARY", 0)
_HASH_READ_SIZE = 1 << 20
# Received bytes waiting for the hashing thread: few, so the allocator reuses the freed blocks (a deeper queue
# measured slower: fresh pages for every block) and memory stays bounded whatever the chunk size.
_HASH_QUEUE_BYTES = 2 << 20


class _Aborted(Exception):
    """The receiving thread failed: the hashing thread stops reading the prefix back."""


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
        identity = (st.st_dev, st.st_ino)
        if self.hasher is None or identity != self.identity or self.hashed > offset:
            # Another file than the one hashed so far (or a shorter one): its digest starts from byte 0.
            self.hasher, self.hashed = (hashlib.sha256() if self.hashing else None), 0
        self.fh, self.identity = fh, identity
        fh.seek(offset)
        fh.truncate()
        self.position = offset
        if self.hashing and not hasattr(os, "pread"):
            self.hash_written()  # Windows: no positional reads for the hashing thread, so read it back here

    def hash_written(self) -> None:
        """Bring the digest up to the bytes written so far, reading them back now (``open`` first)."""
        assert self.fh is not None, "open() first"
        if self.hashing and self.hashed < self.position:
            self._hash_prefix(self.fh, self.position)
            self.fh.seek(self.position)

    def _hash_prefix(self, fh: BinaryIO, offset: int, stop: threading.Event | None = None) -> None:
        """Hash bytes ``hashed`` to ``offset`` of the file as it is on disk, read through ``fh``'s descriptor.

        Runs on the hashing thread during ``receive`` (a positional read, so the writes after ``offset`` and
        the file position are untouched), else on the caller's. ``stop`` set: raise `_Aborted` between blocks.
        """
        assert self.hasher is not None
        fd = fh.fileno()
        while self.hashed < offset:
            if stop is not None and stop.is_set():
                raise _Aborted
            want = min(offset - self.hashed, _HASH_READ_SIZE)
            if hasattr(os, "pread"):
                block = os.pread(fd, want, self.hashed)
            else:
                fh.seek(self.hashed)
                block = fh.read(want)
            if not block:
                raise RuntimeError(
                    f"{self.path} changed under the download (it ends at byte {self.hashed}, not {offset}); "
                    f"another process wrote it without holding {self.path.with_suffix('.lock').name}"
                )
            self.hasher.update(block)
            self.hashed += len(block)

    def receive(self, resp: requests.Response, end: int | None, bar: _Bar, chunk_size: int) -> None:
        """Append the body of ``resp`` until it ends (or passes ``end``), keeping every byte that arrived.

        ``read1`` returns what one receive brought, so a connection that drops mid-chunk loses nothing that
        reached us (``iter_content`` would drop the incomplete chunk); urllib3 1.x has no ``read1``, and its
        ``read`` returns a short read before raising. The file is flushed and fsync'ed even on failure.
        """
        raw = resp.raw
        read = getattr(raw, "read1", None) or raw.read
        fh = self.fh
        assert fh is not None, "open() first"
        hashing = _HashThread(self, fh, chunk_size) if self.hashing else None
        try:
            while piece := read(chunk_size, decode_content=True):
                fh.write(piece)
                if hashing is not None:
                    hashing.put(piece)
                self.position += len(piece)
                bar.update(len(piece))
                if end is not None and self.position > end:
                    break
        except BaseException:
            if hashing is not None:
                hashing.abort()
            self.close()
            raise
        try:
            if hashing is not None:
                hashing.finish()
        finally:
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


class _HashThread:
    """The hashing thread of one `PartFile.receive`: the prefix on disk first, then each block as it is written.

    Only this thread touches the part's hasher and ``hashed`` count until `finish`/`abort` has joined it; the
    two always agree (``hashed`` counts exactly the bytes hashed), so a later attempt continues from there.
    The thread keeps taking blocks off the queue until the end marker (None), even after an error, so `put`
    never blocks on a thread that has stopped.
    """

    def __init__(self, part: PartFile, fh: BinaryIO, chunk_size: int) -> None:
        self.part, self.fh = part, fh
        self.prefix_end = part.position
        self.blocks: queue.Queue[bytes | None] = queue.Queue(
            max(2, min(_HASH_QUEUE_BYTES // chunk_size, 4096))
        )
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, name=f"ann2snn-utils sha256 of {part.path.name}", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        part = self.part
        try:
            if part.hashed < self.prefix_end:
                part._hash_prefix(self.fh, self.prefix_end, self.stop)
            assert part.hasher is not None
            update = part.hasher.update
            while (block := self.blocks.get()) is not None:
                update(block)
                part.hashed += len(block)
        except _Aborted:
            pass
        except BaseException as exc:  # raised on the receiving thread by put/finish
            self.error = exc
            part.hasher, part.hashed = None, 0
        else:
            return
        while self.blocks.get() is not None:  # let put() go on until the receiving thread notices
            pass

    def put(self, block: bytes) -> None:
        """Queue one written block (waits while the queue is full); raise the thread's error, if any."""
        if self.error is not None:
            raise self.error
        self.blocks.put(block)

    def finish(self) -> None:
        """Wait until every queued block is hashed; raise the thread's error, if any."""
        self.blocks.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """After a failure of the transfer: stop reading the prefix back, hash what is queued, and join."""
        self.stop.set()
        self.blocks.put(None)
        self.thread.join()


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

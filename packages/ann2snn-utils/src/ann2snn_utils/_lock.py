"""An inter-process lock on one destination: ``<dst>.lock``, held for the whole of a download.

Standard library only, so the package keeps depending on ``requests`` and ``tqdm`` alone: `fcntl.flock` on
POSIX (an exclusive lock on the open file description: two ``open`` calls conflict even within one process,
so threads are serialised as well as processes, and the kernel drops the lock when its holder dies) and
`msvcrt.locking` on byte 0 on Windows. The lock file is left in place afterwards: deleting it would let a
waiter lock an unlinked file while a newcomer locks a fresh one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_WINDOWS_POLL_S = 0.05


@contextlib.contextmanager
def dst_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing, never followed through a symlink)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"cannot open the lock file {os.fspath(path)!r} ({exc.strerror}); it must be a regular file",
        ) from exc
    try:
        _acquire(fd)
        try:
            yield
        finally:
            _release(fd)
    finally:
        os.close(fd)


if sys.platform == "win32":
    import msvcrt

    def _acquire(fd: int) -> None:
        while True:
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                return
            except OSError:
                time.sleep(_WINDOWS_POLL_S)

    def _release(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _acquire(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _release(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

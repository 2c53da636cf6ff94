"""Resumable, verified downloads for ANN-to-SNN workflows.

The package's one job is [`download_url`][ann2snn_utils.download_url]: fetch a file over HTTP(S) into
place, resuming an interrupted download and verifying its size and (optionally) SHA-256. Its failures are
the exceptions of `ann2snn_utils.errors`, all subclasses of [`DownloadError`][ann2snn_utils.DownloadError]
(a `RuntimeError`).
"""

from ann2snn_utils.__about__ import __version__
from ann2snn_utils.download import USER_AGENT, download_url
from ann2snn_utils.errors import (
    ChecksumMismatchError,
    DownloadError,
    HTTPStatusError,
    IntegrityError,
    InvalidResponseError,
    SizeMismatchError,
    TransferError,
)

__all__ = [
    "USER_AGENT",
    "ChecksumMismatchError",
    "DownloadError",
    "HTTPStatusError",
    "IntegrityError",
    "InvalidResponseError",
    "SizeMismatchError",
    "TransferError",
    "__version__",
    "download_url",
]

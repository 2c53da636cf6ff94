"""download_url against a real HTTP server on 127.0.0.1 with fault modes.

The server (stdlib ``http.server`` in a thread) serves in-memory files and records every request, so each test
checks both the bytes on disk (against the served bytes' SHA-256) and what went over the wire.
"""

from __future__ import annotations

import email.utils
import hashlib
import multiprocessing
import random
import re
import socket
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

import ann2snn_utils
from ann2snn_utils import (
    USER_AGENT,
    ChecksumMismatchError,
    DownloadError,
    HTTPStatusError,
    IntegrityError,
    InvalidResponseError,
    SizeMismatchError,
    TransferError,
    download_url,
)
from ann2snn_utils import download as download_module

# -- the server ------------------------------------------------------------------------------------------------


@dataclass
class Resource:
    """One served file and the faults it shows."""

    data: bytes = b""
    ranges: bool = True  # honour Range (else answer 200 with the whole body)
    content_length: bool = True  # else chunked (chunked=True) or delimited by closing the connection
    chunked: bool = False
    drop_after: int | None = None  # cut the connection after this many body bytes ...
    drops: int = 0  # ... on this many GETs
    stall: float = 0.0  # wait this long after `stall_after` body bytes ...
    stall_after: int = 0
    stalls: int = 0  # ... on this many GETs
    status: int | None = None  # answer this error status instead
    location: str | None = None  # answer 302 to this path instead
    head: bool = True  # else HEAD gets 405
    range_shift: int = 0  # a 206's Content-Range lies by this many bytes ...
    range_lies: int = 0  # ... on this many GETs
    unsatisfied_header: bool = True  # a 416 carries Content-Range: bytes */size
    extra: bytes = b""  # appended to a 206 body beyond its Content-Range (close-delimited only)
    always_206: bool = False  # answer 206 even without Range
    etag: bool = True  # send a strong ETag and honour If-Range
    range_cap: int | None = None  # a 206 carries at most this many bytes
    changed: bytes | None = None  # the file's new content once a dropped GET has been cut
    throttle: int = 0  # answer this many requests (HEAD or GET) with `throttle_status` ...
    throttle_status: int = 503
    retry_after: str | None = None  # ... carrying this Retry-After header


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    sent: int = 0  # body bytes written to the socket
    done: threading.Event = field(default_factory=threading.Event)  # the handler has finished


@dataclass
class Server:
    base: str
    resources: dict[str, Resource] = field(default_factory=dict)
    log: list[Hit] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, path: str, data: bytes = b"", **faults: Any) -> str:
        self.resources[path] = Resource(data=data, **faults)
        return self.base + path

    @property
    def hits(self) -> list[Hit]:
        """Every request so far, once its handler has finished (the client may be done before the server)."""
        for hit in self.log:
            assert hit.done.wait(10), f"the server is still answering {hit}"
        return list(self.log)

    def gets(self) -> list[Hit]:
        return [h for h in self.hits if h.method == "GET"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _reply(self, hit: Hit, status: int, headers: dict[str, str]) -> None:
        hit.status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def _error(self, hit: Hit, status: int, head: bool) -> None:
        body = f"<html><body>error {status}</body></html>".encode()
        self._reply(hit, status, {"Content-Type": "text/html", "Content-Length": str(len(body))})
        if not head:
            self.wfile.write(body)
            hit.sent = len(body)

    def _serve(self, head: bool) -> None:
        state = self.server.state
        hit = Hit(self.command, self.path.split("?", 1)[0], dict(self.headers.items()))
        with state.lock:
            state.log.append(hit)
        try:
            self._answer(hit, head)
        finally:
            hit.done.set()

    def _answer(self, hit: Hit, head: bool) -> None:
        state = self.server.state
        path = hit.path
        with state.lock:
            res = state.resources.get(path)
            faults = {}
            throttled = res is not None and res.throttle > 0
            if throttled:
                res.throttle -= 1  # type: ignore[union-attr]
            if res is not None and not head:
                for name, counter in (("drop", "drops"), ("stall", "stalls"), ("lie", "range_lies")):
                    faults[name] = getattr(res, counter) > 0
                    if faults[name]:
                        setattr(res, counter, getattr(res, counter) - 1)
        if res is None:
            return self._error(hit, 404, head)
        if res.status is not None:
            return self._error(hit, res.status, head)
        if throttled:
            hit.status = res.throttle_status
            self.send_response(res.throttle_status)
            if res.retry_after is not None:
                self.send_header("Retry-After", res.retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if res.location is not None:
            return self._reply(hit, 302, {"Location": res.location, "Content-Length": "0"})
        if head and not res.head:
            return self._error(hit, 405, head)

        data, size = res.data, len(res.data)
        status, headers = 200, {"Content-Type": "application/octet-stream"}
        etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        if res.etag:
            headers["ETag"] = etag
        body = data
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if_range = self.headers.get("If-Range")
        if match and res.ranges and (if_range is None or (res.etag and if_range == etag)):
            first = int(match.group(1))
            last = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
            if res.range_cap is not None:
                last = min(last, first + res.range_cap - 1)
            if first >= size:
                headers = {"Content-Length": "0"}
                if res.unsatisfied_header:
                    headers["Content-Range"] = f"bytes */{size}"
                return self._reply(hit, 416, headers)
            shift = res.range_shift if faults.get("lie") else 0
            status, body = 206, data[first : last + 1]
            headers["Content-Range"] = f"bytes {first + shift}-{last + shift}/{size}"
            if res.extra:
                body += res.extra
        elif res.always_206:
            status = 206
            headers["Content-Range"] = f"bytes 0-{size - 1}/{size}"
        if res.content_length:
            headers["Content-Length"] = str(len(body))
        elif res.chunked:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers["Connection"] = "close"
            self.close_connection = True
        self._reply(hit, status, headers)
        if head:
            return
        cut = res.drop_after if faults.get("drop") else None
        stall_at = res.stall_after if faults.get("stall") else None
        try:
            self._send_body(hit, body, res.chunked and not res.content_length, cut, stall_at, res.stall)
        except OSError:  # the client went away (a timeout on its side): nothing to do
            self.close_connection = True
        if cut is not None and res.changed is not None:
            res.data, res.changed = res.changed, None

    def _send_body(
        self, hit: Hit, body: bytes, chunked: bool, cut: int | None, stall_at: int | None, stall: float
    ) -> None:
        view = memoryview(body)
        pos = 0
        while pos < len(view):
            step = 64 * 1024
            if stall_at is not None and pos <= stall_at < pos + step:
                step = max(stall_at - pos, 0)
            if cut is not None and pos <= cut < pos + step:
                step = cut - pos
            piece = view[pos : pos + step]
            if piece:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                pos += len(piece)
                hit.sent = pos
            if cut is not None and pos == cut:
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if stall_at is not None and pos == stall_at:
                stall_at = None
                self.server.state.stop.wait(stall)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    state: Server

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up mid-body is one of the tested faults


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = Server(base=f"http://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd.state
    finally:
        httpd.state.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The backoff delays download_url asked for, recorded instead of slept."""
    delays: list[float] = []
    monkeypatch.setattr(download_module, "_sleep", delays.append)
    return delays


@pytest.fixture(autouse=True)
def responses(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[requests.Response]]:
    """Every response a session received (redirect hops included); each must be closed by the test's end."""
    seen: list[requests.Response] = []
    original = requests.Session.send

    def send(self: requests.Session, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        resp = original(self, request, **kwargs)
        seen.append(resp)
        return resp

    monkeypatch.setattr(requests.Session, "send", send)
    yield seen
    unclosed = [(r.request.method, r.status_code) for r in seen if not r.raw.closed]
    assert unclosed == [], f"responses left open: {unclosed}"


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_file(path: Path, data: bytes) -> None:
    assert path.is_file()
    assert sha(path.read_bytes()) == sha(data)
    assert not Path(str(path) + ".part").exists()


def assert_nothing_at(path: Path) -> None:
    assert not path.exists()


SIZE = 1_572_869  # 1.5 MiB and an odd tail: more than one 1 MiB chunk
KIB64 = 64 * 1024


# -- normal operation -------------------------------------------------------------------------------------------


def test_fresh_download_writes_the_served_bytes(
    server: Server, tmp_path: Path, responses: list[requests.Response]
) -> None:
    data = payload(SIZE)
    url = server.add("/file.bin", data)
    dst = tmp_path / "deep" / "er" / "file.bin"  # missing parents are created

    assert download_url(url, dst, progress=False) == SIZE

    assert_file(dst, data)
    assert [(h.method, h.status, h.sent) for h in server.hits] == [("GET", 200, SIZE)]
    hit = server.hits[0]
    assert hit.headers["User-Agent"] == USER_AGENT
    assert hit.headers["Accept-Encoding"] == "identity"
    assert "Range" not in hit.headers
    assert responses
    assert all(r.raw.closed for r in responses)


def test_user_agent_names_the_package_and_version() -> None:
    assert USER_AGENT.startswith(f"ann2snn-utils/{ann2snn_utils.__version__} ")


def test_accepts_str_paths_and_uppercase_sha256(server: Server, tmp_path: Path) -> None:
    data = payload(1000, seed=1)
    url = server.add("/small.bin", data)
    dst = tmp_path / "small.bin"

    assert download_url(url, str(dst), sha256=sha(data).upper(), progress=False) == 1000
    assert_file(dst, data)


def test_empty_file(server: Server, tmp_path: Path) -> None:
    url = server.add("/empty", b"")
    dst = tmp_path / "empty"

    assert download_url(url, dst, sha256=sha(b""), progress=False) == 0
    assert_file(dst, b"")


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "close-delimited"])
def test_no_content_length_streams_to_the_end(server: Server, tmp_path: Path, chunked: bool) -> None:
    data = payload(SIZE, seed=2)
    url = server.add("/stream", data, content_length=False, chunked=chunked)
    dst = tmp_path / "stream"

    assert download_url(url, dst, progress=False, chunk_size=KIB64) == SIZE
    assert_file(dst, data)
    assert "Content-Length" not in requests.get(url, timeout=5).headers


def test_redirect_is_followed_with_the_same_headers(server: Server, tmp_path: Path) -> None:
    data = payload(SIZE, seed=3)
    server.add("/real.bin", data)
    url = server.add("/old.bin", location="/real.bin")
    dst = tmp_path / "real.bin"
    part = tmp_path / "real.bin.part"
    part.write_bytes(data[:1000])  # the Range must survive the redirect too

    assert download_url(url, dst, progress=False) == SIZE

    assert_file(dst, data)
    assert [(h.path, h.status) for h in server.hits] == [("/old.bin", 302), ("/real.bin", 206)]
    assert all(h.headers["User-Agent"] == USER_AGENT for h in server.hits)
    assert server.hits[1].headers["Range"] == "bytes=1000-"


def test_redirect_loop_raises_download_error(server: Server, tmp_path: Path) -> None:
    url = server.add("/loop", location="/loop")
    dst = tmp_path / "loop"

    with pytest.raises(DownloadError, match=r"download of .*/loop failed: Exceeded \d+ redirects"):
        download_url(url, dst, progress=False)
    assert_nothing_at(dst)


# -- resume -----------------------------------------------------------------------------------------------------


def test_resume_requests_only_the_missing_bytes(server: Server, tmp_path: Path) -> None:
    data = payload(SIZE, seed=4)
    url = server.add("/file.bin", data)
    dst = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(data[:700_001])

    assert download_url(url, dst, sha256=sha(data), progress=False) == SIZE

    assert_file(dst, data)
    [hit] = server.hits
    assert (hit.headers["Range"], hit.status, hit.sent) == ("bytes=700001-", 206, SIZE - 700_001)


def test_range_ignored_starts_over_instead_of_appending(server: Server, tmp_path: Path) -> None:
    data = payload(SIZE, seed=5)
    url = server.add("/file.bin", data, ranges=False)
    dst = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(data[:500_000])

    assert download_url(url, dst, progress=False) == SIZE

    assert_file(dst, data)  # the anchor appended here: 500_000 + SIZE bytes
    [hit] = server.hits
    assert (hit.headers["Range"], hit.status, hit.sent) == ("bytes=500000-", 200, SIZE)


@pytest.mark.parametrize("shift", [7, -7, -500_000])
def test_invalid_content_range_starts_over(server: Server, tmp_path: Path, shift: int) -> None:
    data = payload(SIZE, seed=6)
    url = server.add("/file.bin", data, range_shift=shift, range_lies=1)
    dst = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(data[:500_000])

    assert download_url(url, dst, progress=False) == SIZE

    assert_file(dst, data)
    assert [(h.headers.get("Range"), h.status) for h in server.hits] == [("bytes=500000-", 206), (None, 200)]


def test_short_ranges_are_continued(server: Server, tmp_path: Path) -> None:
    data = payload(SIZE, seed=27)
    url = server.add("/file.bin", data, range_cap=600_000)
    dst = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(data[:1000])

    assert download_url(url, dst, sha256=sha(data), progress=False) == SIZE

    assert_file(dst, data)
    assert [(h.headers["Range"], h.status, h.sent) for h in server.gets()] == [
        ("bytes=1000-", 206, 600_000),
        ("bytes=601000-", 206, 600_000),
        ("bytes=1201000-", 206, SIZE - 1_201_000),
    ]


@pytest.mark.parametrize(
    ("etag", "new_size"), [(True, SIZE), (False, SIZE + 5)], ids=["if-range", "content-range-total"]
)
def test_remote_change_during_the_download_starts_over(
    server: Server, tmp_path: Path, sleeps: list[float], etag: bool, new_size: int
) -> None:
    old, new = payload(SIZE, seed=28), payload(new_size, seed=29)
    url = server.add("/file.bin", old, drop_after=700_000, drops=1, changed=new, etag=etag)
    dst = tmp_path / "file.bin"

    assert download_url(url, dst, progress=False, chunk_size=KIB64) == new_size

    assert_file(dst, new)  # not old[:700_000] + new[700_000:]
    first, *rest = server.gets()
    assert ("Range" not in first.headers, first.sent) == (True, 700_000)
    resume = rest[0].headers["Range"]
    if etag:  # the server sees If-Range and answers with the whole new file
        assert rest[0].headers["If-Range"] == f'"{sha(old)[:16]}"'
        assert [(h.status, h.sent) for h in rest] == [(200, new_size)]
    else:  # the new total in Content-Range gives the change away
        assert "If-Range" not in rest[0].headers
        assert [(h.headers.get("Range"), h.status) for h in rest] == [(resume, 206), (None, 200)]
    assert sleeps == [0.5]


def test_206_without_range_raises(server: Server, tmp_path: Path) -> None:
    url = server.add("/odd", payload(1000), always_206=True)
    dst = tmp_path / "odd"

    with pytest.raises(
        InvalidResponseError, match=r"/odd failed: 206 Partial Content to a request without Range"
    ):
        download_url(url, dst, progress=False)
    assert_nothing_at(dst)


@pytest.mark.parametrize("with_header", [True, False], ids=["content-range", "head-probe"])
def test_416_on_a_complete_part_is_done(server: Server, tmp_path: Path, with_header: bool) -> None:
    data = payload(SIZE, seed=7)
    url = server.add("/file.bin", data, unsatisfied_header=with_header)
    dst = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(data)

    assert download_url(url, dst, sha256=sha(data), progress=False) == SIZE

    assert_file(dst, data)
    expected = [("GET", 416)] if with_header else [("GET", 416), ("HEAD", 200)]
    assert [(h.method, h.status) for h in server.hits] == expected
    assert sum(h.sent for h in server.hits) == 0


@pytest.mark.parametrize("with_header", [True, False], ids=["content-range", "head-probe"])
def test_part_larger_than_remote_starts_over(server: Server, tmp_path: Path, with_header: bool) -> None:
    data = payload(SIZE, seed=8)
    url = server.add("/file.bin", data, unsatisfied_header=with_header)
    dst = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(data + b"stale tail")

    assert download_url(url, dst, progress=False) == SIZE

    assert_file(dst, data)
    probe = [] if with_header else [("HEAD", None, 200)]
    assert [(h.method, h.headers.get("Range"), h.status) for h in server.hits] == [
        ("GET", f"bytes={SIZE + 10}-", 416),
        *probe,
        ("GET", None, 200),
    ]


def test_more_bytes_than_the_content_range_raises_and_discards(server: Server, tmp_path: Path) -> None:
    data = payload(SIZE, seed=9)
    url = server.add("/file.bin", data, content_length=False, extra=b"junk")
    dst = tmp_path / "file.bin"
    part = tmp_path / "file.bin.part"
    part.write_bytes(data[:1000])

    with pytest.raises(
        SizeMismatchError, match=r"/file\.bin failed: the server sent more than the \d+ bytes"
    ):
        download_url(url, dst, progress=False)
    assert_nothing_at(dst)
    assert not part.exists()


# -- already complete -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("redirected", [False, True], ids=["direct", "redirected"])
def test_complete_dst_is_not_downloaded_again(server: Server, tmp_path: Path, redirected: bool) -> None:
    data = payload(SIZE, seed=10)
    url = server.add("/file.bin", data)
    if redirected:
        url = server.add("/latest.bin", location="/file.bin")
    dst = tmp_path / "file.bin"
    dst.write_bytes(data)
    before = dst.stat().st_mtime_ns

    assert download_url(url, dst, progress=False) == SIZE

    assert_file(dst, data)
    assert dst.stat().st_mtime_ns == before
    expected = [("HEAD", 302, 0), ("HEAD", 200, 0)] if redirected else [("HEAD", 200, 0)]
    assert [(h.method, h.status, h.sent) for h in server.hits] == expected


def test_complete_dst_probe_without_head_uses_one_byte_range(server: Server, tmp_path: Path) -> None:
    data = payload(SIZE, seed=11)
    url = server.add("/file.bin", data, head=False)
    dst = tmp_path / "file.bin"
    dst.write_bytes(data)

    assert download_url(url, dst, progress=False) == SIZE

    assert_file(dst, data)
    assert [(h.method, h.status, h.headers.get("Range")) for h in server.hits] == [
        ("HEAD", 405, None),
        ("GET", 206, "bytes=0-0"),
    ]
    assert server.hits[1].sent <= 1  # the one byte asked for, if it was written before the client hung up


def test_complete_dst_with_matching_sha256_makes_no_request(server: Server, tmp_path: Path) -> None:
    data = payload(SIZE, seed=12)
    url = server.add("/file.bin", data)
    dst = tmp_path / "file.bin"
    dst.write_bytes(data)

    assert download_url(url, dst, sha256=sha(data), progress=False) == SIZE

    assert_file(dst, data)
    assert server.hits == []


def test_dst_of_another_size_is_replaced(server: Server, tmp_path: Path) -> None:
    data = payload(SIZE, seed=13)
    url = server.add("/file.bin", data)
    dst = tmp_path / "file.bin"
    dst.write_bytes(b"an older, shorter version")

    assert download_url(url, dst, progress=False) == SIZE

    assert_file(dst, data)
    assert [(h.method, h.status) for h in server.hits] == [("HEAD", 200), ("GET", 200)]


def test_dst_of_the_same_size_but_another_sha256_is_replaced(server: Server, tmp_path: Path) -> None:
    data = payload(SIZE, seed=14)
    url = server.add("/file.bin", data)
    dst = tmp_path / "file.bin"
    dst.write_bytes(payload(SIZE, seed=15))

    assert download_url(url, dst, sha256=sha(data), progress=False) == SIZE

    assert_file(dst, data)
    assert [(h.method, h.status) for h in server.hits] == [("GET", 200)]


# -- HTTP errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [404, 500, 403])
def test_http_error_raises_and_writes_nothing(
    server: Server, tmp_path: Path, status: int, responses: list[requests.Response]
) -> None:
    url = server.add("/broken", status=status)
    dst = tmp_path / "broken"

    with pytest.raises(
        HTTPStatusError, match=rf"download of {re.escape(url)} failed: HTTP {status} "
    ) as info:
        download_url(url, dst, progress=False)

    assert info.value.status == status
    assert info.value.url == url
    assert isinstance(info.value, RuntimeError)
    assert_nothing_at(dst)
    assert not (tmp_path / "broken.part").exists()  # the error page is not data
    assert responses
    assert all(r.raw.closed for r in responses)


def test_http_error_leaves_an_existing_dst_untouched(server: Server, tmp_path: Path) -> None:
    old = payload(1000, seed=16)
    url = server.add("/broken", status=500)
    dst = tmp_path / "broken"
    dst.write_bytes(old)

    with pytest.raises(HTTPStatusError, match=r"HTTP 500"):
        download_url(url, dst, progress=False)
    assert dst.read_bytes() == old


def test_missing_url_with_existing_dst_raises(server: Server, tmp_path: Path) -> None:
    dst = tmp_path / "gone"
    dst.write_bytes(b"local")
    url = server.base + "/gone"

    with pytest.raises(HTTPStatusError, match=r"/gone failed: HTTP 404"):
        download_url(url, dst, progress=False)
    assert dst.read_bytes() == b"local"


# -- network faults ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_dropped_connection_is_retried_and_resumed(
    server: Server, tmp_path: Path, sleeps: list[float], chunked: bool
) -> None:
    data = payload(SIZE, seed=17)
    url = server.add(
        "/file.bin", data, drop_after=900_000, drops=1, content_length=not chunked, chunked=chunked
    )
    dst = tmp_path / "file.bin"

    assert download_url(url, dst, sha256=sha(data), progress=False, chunk_size=KIB64) == SIZE

    assert_file(dst, data)
    first, second = server.gets()
    assert first.sent == 900_000
    assert "Range" not in first.headers
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", second.headers["Range"]).group(1))  # type: ignore[union-attr]
    assert 0 < resumed_at <= 900_000
    assert (second.status, second.sent) == (206, SIZE - resumed_at)
    assert sleeps == [0.5]


def test_dropped_connection_every_time_raises_and_keeps_the_part(
    server: Server, tmp_path: Path, sleeps: list[float]
) -> None:
    data = payload(SIZE, seed=18)
    url = server.add("/file.bin", data, drop_after=300_000, drops=100)
    dst = tmp_path / "file.bin"
    part = tmp_path / "file.bin.part"

    with pytest.raises(
        TransferError, match=rf"download of {re.escape(url)} failed after 3 attempt\(s\)"
    ) as info:
        download_url(url, dst, retries=2, progress=False, chunk_size=KIB64)

    assert_nothing_at(dst)
    assert info.value.part == part
    assert info.value.attempts == 3
    assert sleeps == [0.5, 1.0]
    kept = part.read_bytes()
    assert 0 < len(kept) < SIZE
    assert kept == data[: len(kept)]
    assert len(server.gets()) == 3

    # A later call, once the network is fine, resumes the kept part.
    server.resources["/file.bin"].drops = 0
    assert download_url(url, dst, sha256=sha(data), progress=False) == SIZE
    assert_file(dst, data)
    assert server.gets()[-1].headers["Range"] == f"bytes={len(kept)}-"


def test_close_delimited_range_cut_short_is_retried(
    server: Server, tmp_path: Path, sleeps: list[float]
) -> None:
    # Without Content-Length only our own count against Content-Range can notice the early end.
    data = payload(SIZE, seed=26)
    url = server.add("/file.bin", data, content_length=False, drop_after=400_000, drops=1)
    dst = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(data[:1000])

    assert download_url(url, dst, progress=False, chunk_size=KIB64) == SIZE

    assert_file(dst, data)
    assert [(h.headers["Range"], h.status, h.sent) for h in server.gets()] == [
        ("bytes=1000-", 206, 400_000),
        ("bytes=401000-", 206, SIZE - 401_000),
    ]
    assert sleeps == [0.5]


def test_slow_server_times_out(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    data = payload(SIZE, seed=19)
    url = server.add("/slow", data, stall=5.0, stall_after=0, stalls=100)
    dst = tmp_path / "slow"

    with pytest.raises(TransferError, match=r"/slow failed after 2 attempt\(s\): .*[Tt]imed out"):
        download_url(url, dst, timeout=0.5, retries=1, progress=False)
    assert_nothing_at(dst)
    assert sleeps == [0.5]


def test_stall_mid_body_is_retried_and_resumed(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    data = payload(SIZE, seed=20)
    url = server.add("/slow", data, stall=2.0, stall_after=600_000, stalls=1)
    dst = tmp_path / "slow"

    assert download_url(url, dst, timeout=1.0, progress=False, chunk_size=KIB64) == SIZE

    assert_file(dst, data)
    first, second = server.gets()
    assert "Range" not in first.headers
    assert second.headers["Range"].startswith("bytes=")
    assert second.status == 206
    assert sleeps == [0.5]


def test_connection_refused_is_retried_then_raises(tmp_path: Path, sleeps: list[float]) -> None:
    with socket.socket() as sock:  # a port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dst = tmp_path / "file.bin"

    with pytest.raises(TransferError, match=r"failed after 2 attempt\(s\)"):
        download_url(f"http://127.0.0.1:{port}/file.bin", dst, retries=1, progress=False)
    assert_nothing_at(dst)
    assert sleeps == [0.5]


# -- integrity --------------------------------------------------------------------------------------------------


def test_wrong_sha256_raises_and_discards_the_part(server: Server, tmp_path: Path) -> None:
    data = payload(SIZE, seed=21)
    url = server.add("/file.bin", data)
    dst = tmp_path / "file.bin"
    wrong = sha(b"something else")

    with pytest.raises(
        ChecksumMismatchError, match=rf"sha256 {sha(data)} differs from the expected {wrong}"
    ) as info:
        download_url(url, dst, sha256=wrong, progress=False)

    assert isinstance(info.value, IntegrityError)
    assert (info.value.expected, info.value.actual) == (wrong, sha(data))
    assert_nothing_at(dst)
    assert not (tmp_path / "file.bin.part").exists()
    # the next call starts from scratch and succeeds with the right digest
    assert download_url(url, dst, sha256=sha(data), progress=False) == SIZE
    assert_file(dst, data)


def test_sha256_covers_a_resumed_prefix(server: Server, tmp_path: Path) -> None:
    data = payload(SIZE, seed=22)
    url = server.add("/file.bin", data)
    dst = tmp_path / "file.bin"
    part = tmp_path / "file.bin.part"
    part.write_bytes(b"X" * 1000)  # a corrupt prefix the server cannot know about

    with pytest.raises(ChecksumMismatchError, match=r"differs from the expected"):
        download_url(url, dst, sha256=sha(data), progress=False)
    assert_nothing_at(dst)
    assert not part.exists()


# -- progress ---------------------------------------------------------------------------------------------------


def test_progress_false_prints_nothing(
    server: Server, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    data = payload(SIZE, seed=23)
    url = server.add("/file.bin", data)
    dst = tmp_path / "file.bin"

    download_url(url, dst, progress=False)

    assert_file(dst, data)
    assert capfd.readouterr() == ("", "")


def test_progress_bar_counts_real_bytes_across_a_resume(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sleeps: list[float]
) -> None:
    data = payload(SIZE, seed=24)
    url = server.add("/file.bin", data, drop_after=800_000, drops=1)
    dst = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(data[:100_000])
    bars: list[Any] = []

    class RecordingBar(download_module.tqdm):  # type: ignore[misc,name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.updates: list[int] = []
            bars.append(self)

        def update(self, n: float | None = 1) -> bool | None:
            self.updates.append(int(n or 0))
            return super().update(n)

        def close(self) -> None:
            self.final = (self.n, self.total)
            super().close()

    monkeypatch.setattr(download_module, "tqdm", RecordingBar)
    assert download_url(url, dst, progress=True, chunk_size=KIB64) == SIZE

    assert_file(dst, data)
    [bar] = bars
    assert bar.final == (SIZE, SIZE)
    assert bar.unit == "B"
    assert bar.desc.startswith(str(dst))
    resumed_at = int(server.gets()[1].headers["Range"][6:-1])
    # the bytes of the second request, 64 KiB at a time, after the bar was set to the resumed offset
    tail = bar.updates[bar.updates.index(resumed_at) + 1 :]
    assert sum(tail) == SIZE - resumed_at
    assert max(tail) <= KIB64


def test_progress_true_draws_a_bar_on_stderr(
    server: Server, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    url = server.add("/file.bin", payload(SIZE, seed=25))
    dst = tmp_path / "file.bin"

    download_url(url, dst)

    out, err = capfd.readouterr()
    assert out == ""
    assert str(dst) in err
    assert "1.50M/1.50M" in err
    assert "100%" in err


# -- argument validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("ftp://example.org/x", r"only http and https URLs, got scheme 'ftp' in 'ftp://example.org/x'"),
        ("file:///etc/passwd", r"got scheme 'file'"),
        ("example.org/x", r"got no scheme"),
        ("http:///x", r"needs a URL with a host"),
    ],
)
def test_bad_url_raises_value_error(tmp_path: Path, url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        download_url(url, tmp_path / "x", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"url": b"http://x"}, TypeError, r"url must be a str, got bytes"),
        ({"dst": 3}, TypeError, r"dst must be a str or os.PathLike\[str\], got int"),
        ({"dst": ""}, ValueError, r"dst must name a file"),
        ({"sha256": "abc"}, ValueError, r"sha256 must be 64 hex digits, got 'abc'"),
        ({"sha256": "g" * 64}, ValueError, r"sha256 must be 64 hex digits"),
        ({"sha256": b"0" * 64}, TypeError, r"sha256 must be a str of 64 hex digits or None, got bytes"),
        ({"timeout": 0}, ValueError, r"timeout must be a positive finite number of seconds, got 0"),
        ({"timeout": float("nan")}, ValueError, r"got nan"),
        ({"timeout": None}, TypeError, r"timeout must be a number of seconds, got NoneType"),
        ({"timeout": True}, TypeError, r"got bool"),
        ({"retries": -1}, ValueError, r"retries must be >= 0, got -1"),
        ({"retries": 1.0}, TypeError, r"retries must be an int, got float"),
        ({"chunk_size": 0}, ValueError, r"chunk_size must be >= 1, got 0"),
        ({"progress": 1}, TypeError, r"progress must be a bool, got int"),
    ],
)
def test_bad_arguments_raise(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    call: dict[str, Any] = {"url": "http://127.0.0.1:9/x", "dst": tmp_path / "x", "progress": False}
    call.update(kwargs)
    url, dst = call.pop("url"), call.pop("dst")
    with pytest.raises(error, match=match):
        download_url(url, dst, **call)


def test_dst_that_is_a_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"dst must name a file, got the existing directory"):
        download_url("http://127.0.0.1:9/x", tmp_path, progress=False)


# -- issue 12: kept bytes, concurrent calls, symlinked parts, Retry-After -------------------------------------


def test_drop_inside_the_first_chunk_keeps_the_bytes_that_arrived(
    server: Server, tmp_path: Path, sleeps: list[float]
) -> None:
    # 300 000 bytes arrive, then the connection drops: inside the first 1 MiB read (the default chunk_size).
    data = payload(SIZE, seed=30)
    url = server.add("/file.bin", data, drop_after=300_000, drops=2)
    dst = tmp_path / "file.bin"
    part = tmp_path / "file.bin.part"

    with pytest.raises(TransferError, match=r"failed after 2 attempt\(s\)"):
        download_url(url, dst, retries=1, progress=False)

    assert part.read_bytes() == data[:600_000]  # both cut requests made progress
    assert [(h.headers.get("Range"), h.status, h.sent) for h in server.gets()] == [
        (None, 200, 300_000),
        ("bytes=300000-", 206, 300_000),
    ]
    assert download_url(url, dst, sha256=sha(data), progress=False) == SIZE
    assert_file(dst, data)
    assert server.gets()[-1].headers["Range"] == "bytes=600000-"


def _wait_until_sent(server: Server, path: str, count: int) -> None:
    """Block until the server has sent ``count`` body bytes of ``path`` (the slow caller is mid-transfer)."""
    deadline = time.monotonic() + 60
    while not any(h.path == path and h.sent >= count for h in server.log):
        assert time.monotonic() < deadline, f"{path} never sent {count} bytes"
        time.sleep(0.01)


@pytest.mark.parametrize("with_sha256", [True, False], ids=["sha256", "size-only"])
def test_concurrent_threads_on_one_dst_are_serialised(
    server: Server, tmp_path: Path, with_sha256: bool
) -> None:
    data = payload(SIZE, seed=31)
    fast = server.add("/fast.bin", data)
    slow = server.add("/slow.bin", data, stall=1.0, stall_after=300_000, stalls=1)
    dst = tmp_path / "model.bin"
    (tmp_path / "model.bin.part").write_bytes(data[:100_000])  # both resume it (appending, on today's main)
    digest = sha(data) if with_sha256 else None
    results: dict[str, object] = {}

    def call(name: str, url: str) -> None:
        try:
            results[name] = download_url(
                url, dst, sha256=digest, progress=False, timeout=10, chunk_size=KIB64
            )
        except Exception as exc:  # reported below
            results[name] = exc

    slow_thread = threading.Thread(target=call, args=("slow", slow))
    slow_thread.start()
    _wait_until_sent(server, "/slow.bin", 300_000)
    fast_thread = threading.Thread(target=call, args=("fast", fast))
    fast_thread.start()
    slow_thread.join(60)
    fast_thread.join(60)

    assert results == {"slow": SIZE, "fast": SIZE}
    assert_file(dst, data)
    assert not dst.is_symlink()
    # the fast caller waited for the lock and then found dst complete: it transferred no body
    assert sum(h.sent for h in server.hits if h.path == "/fast.bin") == 0


def test_concurrent_processes_on_one_dst_are_serialised(server: Server, tmp_path: Path) -> None:
    data = payload(SIZE, seed=32)
    fast = server.add("/fast.bin", data)
    slow = server.add("/slow.bin", data, stall=2.0, stall_after=300_000, stalls=1)
    dst = str(tmp_path / "model.bin")
    (tmp_path / "model.bin.part").write_bytes(data[:100_000])
    kwargs = {"sha256": sha(data), "progress": False, "timeout": 10, "chunk_size": KIB64}

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        slow_call = pool.apply_async(download_url, (slow, dst), kwargs)
        _wait_until_sent(server, "/slow.bin", 300_000)
        fast_call = pool.apply_async(download_url, (fast, dst), kwargs)
        results = [slow_call.get(60), fast_call.get(60)]

    assert results == [SIZE, SIZE]
    assert_file(Path(dst), data)
    # serialised across processes: the second call waited for the lock, then found dst complete
    assert sum(h.sent for h in server.hits if h.path == "/fast.bin") == 0


@pytest.mark.parametrize("target_exists", [True, False], ids=["link-to-file", "dangling-link"])
@pytest.mark.parametrize("with_sha256", [True, False], ids=["sha256", "size-only"])
def test_symlinked_part_is_never_followed(
    server: Server, tmp_path: Path, target_exists: bool, with_sha256: bool
) -> None:
    data = payload(SIZE, seed=33)
    url = server.add("/file.bin", data)
    dst = tmp_path / "file.bin"
    victim = tmp_path / "victim.txt"
    if target_exists:
        victim.write_bytes(b"precious")
    (tmp_path / "file.bin.part").symlink_to(victim)

    assert download_url(url, dst, sha256=sha(data) if with_sha256 else None, progress=False) == SIZE

    assert_file(dst, data)
    assert not dst.is_symlink()
    if target_exists:
        assert victim.read_bytes() == b"precious"
    else:
        assert not victim.exists()
        assert not victim.is_symlink()
    [hit] = server.gets()
    assert "Range" not in hit.headers  # the link's target is no resume prefix


@pytest.mark.parametrize("status", [503, 429])
def test_retry_after_seconds_is_honoured(
    server: Server, tmp_path: Path, sleeps: list[float], status: int
) -> None:
    data = payload(SIZE, seed=34)
    url = server.add("/file.bin", data, throttle=2, throttle_status=status, retry_after="7")
    dst = tmp_path / "file.bin"

    assert download_url(url, dst, sha256=sha(data), progress=False) == SIZE

    assert_file(dst, data)
    assert sleeps == [7.0, 7.0]
    assert [h.status for h in server.gets()] == [status, status, 200]


def test_retry_after_http_date_is_honoured(server: Server, tmp_path: Path, sleeps: list[float]) -> None:
    data = payload(1000, seed=35)
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    url = server.add("/file.bin", data, throttle=1, retry_after=when)
    dst = tmp_path / "file.bin"

    assert download_url(url, dst, progress=False) == 1000

    assert_file(dst, data)
    [delay] = sleeps
    assert 27 <= delay <= 31  # one-second resolution of HTTP dates, and the time the request took


def test_throttle_without_retry_after_uses_the_backoff(
    server: Server, tmp_path: Path, sleeps: list[float]
) -> None:
    data = payload(1000, seed=36)
    url = server.add("/file.bin", data, throttle=2)
    dst = tmp_path / "file.bin"

    assert download_url(url, dst, progress=False) == 1000
    assert_file(dst, data)
    assert sleeps == [0.5, 1.0]


def test_retry_after_really_waits(server: Server, tmp_path: Path) -> None:
    data = payload(1000, seed=37)
    url = server.add("/file.bin", data, throttle=1, throttle_status=429, retry_after="1")
    dst = tmp_path / "file.bin"

    start = time.monotonic()
    assert download_url(url, dst, progress=False) == 1000
    elapsed = time.monotonic() - start

    assert_file(dst, data)
    assert 1.0 <= elapsed < 20
    first, second = server.gets()
    assert (first.status, second.status) == (429, 200)


@pytest.mark.parametrize(
    ("retry_after", "kwargs", "asked"),
    [("3600", {}, "3600"), ("10", {"retry_budget": 5}, "10")],
    ids=["default-budget", "retry_budget=5"],
)
def test_retry_after_beyond_the_budget_raises_at_once(
    server: Server,
    tmp_path: Path,
    sleeps: list[float],
    retry_after: str,
    kwargs: dict[str, Any],
    asked: str,
) -> None:
    url = server.add("/file.bin", payload(1000), throttle=100, retry_after=retry_after)
    dst = tmp_path / "file.bin"
    budget = kwargs.get("retry_budget", 120)

    with pytest.raises(
        HTTPStatusError,
        match=rf"HTTP 503 Service Unavailable; the server asked to retry after {asked} s \(Retry-After\), "
        rf"more than the .* s left of the retry budget \(retry_budget={budget} s",
    ) as info:
        download_url(url, dst, progress=False, **kwargs)

    assert info.value.status == 503
    assert info.value.retry_after == float(asked)
    assert sleeps == []
    assert len(server.gets()) == 1
    assert_nothing_at(dst)
    assert not (tmp_path / "file.bin.part").exists()


def test_throttled_on_every_attempt_says_the_retries_are_spent(
    server: Server, tmp_path: Path, sleeps: list[float]
) -> None:
    url = server.add("/file.bin", payload(1000), throttle=100, throttle_status=429, retry_after="1")
    dst = tmp_path / "file.bin"

    with pytest.raises(
        HTTPStatusError,
        match=r"HTTP 429 Too Many Requests; still refused after 3 attempt\(s\) \(retries=2\), "
        r"the server asked to retry after 1 s \(Retry-After\)",
    ):
        download_url(url, dst, retries=2, progress=False)
    assert sleeps == [1.0, 1.0]
    assert len(server.gets()) == 3
    assert_nothing_at(dst)


def test_bad_retry_budget_raises() -> None:
    with pytest.raises(ValueError, match=r"retry_budget must be a finite number of seconds >= 0, got -1"):
        download_url("http://127.0.0.1:9/x", "x", retry_budget=-1, progress=False)
    with pytest.raises(TypeError, match=r"retry_budget must be a number of seconds, got str"):
        download_url("http://127.0.0.1:9/x", "x", retry_budget="5", progress=False)  # type: ignore[arg-type]


def test_resumed_prefix_is_hashed_once_across_retries(
    server: Server, tmp_path: Path, sleeps: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = payload(SIZE, seed=38)
    url = server.add("/file.bin", data, drop_after=200_000, drops=2)
    dst = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(data[:500_000])
    from ann2snn_utils import _partfile

    prefixes: list[int] = []
    original = _partfile.PartFile._hash_prefix

    def counting(self: Any, fh: Any, offset: int, *args: Any) -> None:
        prefixes.append(offset)
        original(self, fh, offset, *args)

    monkeypatch.setattr(_partfile.PartFile, "_hash_prefix", counting)
    assert download_url(url, dst, sha256=sha(data), progress=False) == SIZE

    assert_file(dst, data)
    assert prefixes == [500_000]  # read back once; the two resumes after the drops continue the digest
    assert [h.headers["Range"] for h in server.gets()] == ["bytes=500000-", "bytes=700000-", "bytes=900000-"]


def test_part_swapped_by_a_writer_without_the_lock_is_not_installed(server: Server, tmp_path: Path) -> None:
    data = payload(SIZE, seed=39)
    url = server.add("/file.bin", data, stall=1.5, stall_after=300_000, stalls=1)
    dst = tmp_path / "file.bin"
    part = tmp_path / "file.bin.part"
    errors: list[BaseException] = []

    def call() -> None:
        try:
            download_url(url, dst, sha256=sha(data), progress=False, timeout=10, chunk_size=KIB64)
        except BaseException as exc:  # checked below
            errors.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    _wait_until_sent(server, "/file.bin", 300_000)
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size >= 300_000):  # the bytes that arrived are on disk
        assert time.monotonic() < deadline, "the download never wrote its first 300 000 bytes"
        time.sleep(0.01)
    intruder = tmp_path / "intruder"
    intruder.write_bytes(b"not the download")
    intruder.replace(part)  # a process that ignores <dst>.lock
    worker.join(60)

    [error] = errors
    assert isinstance(error, RuntimeError)
    assert re.search(
        r"file\.bin\.part changed under the download .* without holding file\.bin\.lock", str(error)
    )
    assert_nothing_at(dst)


def test_part_that_is_a_directory_raises(server: Server, tmp_path: Path) -> None:
    url = server.add("/file.bin", payload(1000))
    (tmp_path / "file.bin.part").mkdir()

    with pytest.raises(IsADirectoryError, match=r"the partial file '.*file\.bin\.part' is a directory"):
        download_url(url, tmp_path / "file.bin", progress=False)
    assert server.hits == []


def test_throttled_size_probe_of_a_complete_dst_waits_as_asked(
    server: Server, tmp_path: Path, sleeps: list[float]
) -> None:
    data = payload(SIZE, seed=40)
    url = server.add("/file.bin", data, throttle=1, retry_after="3")
    dst = tmp_path / "file.bin"
    dst.write_bytes(data)

    assert download_url(url, dst, progress=False) == SIZE

    assert_file(dst, data)
    assert sleeps == [3.0]
    assert [(h.method, h.status, h.sent) for h in server.hits] == [("HEAD", 503, 0), ("HEAD", 200, 0)]


@pytest.mark.parametrize(
    ("env", "progress", "drawn"), [("1", None, False), ("1", True, True), ("0", None, True)]
)
def test_tqdm_disable_is_honoured_unless_progress_is_given(
    server: Server,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    env: str,
    progress: bool | None,
    drawn: bool,
) -> None:
    monkeypatch.setenv("TQDM_DISABLE", env)
    data = payload(SIZE, seed=41)
    url = server.add("/file.bin", data)
    dst = tmp_path / "file.bin"

    assert download_url(url, dst, progress=progress) == SIZE

    assert_file(dst, data)
    out, err = capfd.readouterr()
    assert out == ""
    assert ("1.50M/1.50M" in err) is drawn


# -- the hashing thread ------------------------------------------------------------------------------------------


def _hashing_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ann2snn-utils sha256")]


@pytest.fixture
def hash_threads(monkeypatch: pytest.MonkeyPatch) -> list[threading.Thread]:
    """Every hashing thread download_url started (so a test can check one ran, and that it was joined)."""
    from ann2snn_utils import _partfile

    started: list[threading.Thread] = []
    original = _partfile._HashThread.__init__

    def init(self: Any, *args: Any) -> None:
        original(self, *args)
        started.append(self.thread)

    monkeypatch.setattr(_partfile._HashThread, "__init__", init)
    return started


def test_failed_transfer_leaves_no_hashing_thread(
    server: Server, tmp_path: Path, sleeps: list[float], hash_threads: list[threading.Thread]
) -> None:
    data = payload(SIZE, seed=42)
    url = server.add("/file.bin", data, drop_after=700_000, drops=100)
    dst = tmp_path / "file.bin"
    part = tmp_path / "file.bin.part"

    with pytest.raises(TransferError):
        download_url(url, dst, sha256=sha(data), retries=1, progress=False, chunk_size=KIB64)

    assert len(hash_threads) == 2  # one per attempt, each joined before the attempt ended
    assert not any(t.is_alive() for t in hash_threads)
    assert _hashing_threads() == []
    kept = part.read_bytes()
    assert 0 < len(kept) < SIZE
    assert kept == data[: len(kept)]
    assert_nothing_at(dst)

    # The kept part resumes, its prefix hashed on the thread, and the digest is verified.
    server.resources["/file.bin"].drops = 0
    assert download_url(url, dst, sha256=sha(data), progress=False) == SIZE
    assert_file(dst, data)
    assert server.gets()[-1].headers["Range"] == f"bytes={len(kept)}-"
    assert _hashing_threads() == []


class _FailingHasher:
    """A SHA-256 whose update raises once it has been given ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.inner, self.limit, self.seen = hashlib.sha256(), limit, 0

    def update(self, data: bytes) -> None:
        self.seen += len(data)
        if self.seen > self.limit:
            raise MemoryError(f"hashing failed after {self.seen} bytes")
        self.inner.update(data)

    def hexdigest(self) -> str:
        return self.inner.hexdigest()


def test_error_in_the_hashing_thread_is_raised(
    server: Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    hash_threads: list[threading.Thread],
) -> None:
    from ann2snn_utils import _partfile

    data = payload(SIZE, seed=43)
    url = server.add("/file.bin", data)
    dst = tmp_path / "file.bin"
    main = threading.get_ident()
    where: list[int] = []

    def failing() -> _FailingHasher:
        hasher = _FailingHasher(500_000)
        original = hasher.update

        def update(block: bytes) -> None:
            where.append(threading.get_ident())
            original(block)

        hasher.update = update  # type: ignore[method-assign]
        return hasher

    monkeypatch.setattr(_partfile, "hashlib", types.SimpleNamespace(sha256=failing))
    with pytest.raises(MemoryError, match=r"hashing failed after \d+ bytes"):
        download_url(url, dst, sha256=sha(data), progress=False, chunk_size=KIB64)

    assert where
    assert main not in where
    assert len(hash_threads) == 1
    assert not hash_threads[0].is_alive()
    assert _hashing_threads() == []
    assert_nothing_at(dst)


def test_error_reading_the_prefix_back_is_raised(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hash_threads: list[threading.Thread]
) -> None:
    from ann2snn_utils import _partfile

    data = payload(SIZE, seed=44)
    url = server.add("/file.bin", data)
    dst = tmp_path / "file.bin"
    part = tmp_path / "file.bin.part"
    part.write_bytes(data[:600_000])

    def pread(fd: int, n: int, offset: int) -> bytes:
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(_partfile.os, "pread", pread)
    with pytest.raises(OSError, match=r"Input/output error \(injected\)"):
        download_url(url, dst, sha256=sha(data), progress=False, chunk_size=KIB64)

    assert len(hash_threads) == 1
    assert not hash_threads[0].is_alive()
    assert _hashing_threads() == []
    assert_nothing_at(dst)
    kept = part.read_bytes()  # the prefix is intact, and whatever arrived after it was kept
    assert len(kept) >= 600_000
    assert kept == data[: len(kept)]


def test_resume_without_pread_hashes_the_prefix_on_the_calling_thread(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ann2snn_utils import _partfile

    monkeypatch.delattr(_partfile.os, "pread")  # as on Windows
    data = payload(SIZE, seed=45)
    url = server.add("/file.bin", data)
    dst = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(data[:400_000])

    assert download_url(url, dst, sha256=sha(data), progress=False) == SIZE
    assert_file(dst, data)
    assert [h.headers["Range"] for h in server.gets()] == ["bytes=400000-"]

    (tmp_path / "other.bin.part").write_bytes(b"X" * 400_000)  # a corrupt prefix is caught the same way
    with pytest.raises(ChecksumMismatchError):
        download_url(url, tmp_path / "other.bin", sha256=sha(data), progress=False)


def test_part_replaced_between_attempts_is_hashed_again(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = payload(SIZE, seed=46)
    url = server.add("/file.bin", data, drop_after=500_000, drops=1)
    dst = tmp_path / "file.bin"
    part = tmp_path / "file.bin.part"

    def swap(delay: float) -> None:
        # During the backoff, a writer that ignores the lock replaces the part by another file of its size.
        size = part.stat().st_size
        other = tmp_path / "other"
        other.write_bytes(b"X" * size)
        other.replace(part)

    monkeypatch.setattr(download_module, "_sleep", swap)
    with pytest.raises(ChecksumMismatchError, match=r"differs from the expected"):
        download_url(url, dst, sha256=sha(data), progress=False, chunk_size=KIB64)
    assert_nothing_at(dst)
    assert not part.exists()

"""Throughput of download_url against a plain requests streaming loop, from a local HTTP server.

The server runs in a child process (so it does not share the interpreter lock with the client) and serves one
in-memory payload from 127.0.0.1. Each round downloads the payload once with every method, in a rotating
order, to a fresh file; the tables give medians over rounds, and each ratio is the median of the per-round
ratios of a method's time to the plain loop's time in the same round (below 1.10 is the target).

    python bench_download.py                 # full run (192 MiB x 9 rounds, under a minute on 2 cores)
    python bench_download.py --quick         # smoke test, seconds
    python bench_download.py --markdown out.md
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests
from tqdm import tqdm

from ann2snn_utils import download_url

MIB = 1 << 20


def make_payload(size: int) -> bytes:
    """Incompressible-looking bytes: a seeded random MiB repeated (randbytes caps out near 256 MiB)."""
    block = random.Random(0).randbytes(MIB)
    return (block * (size // MIB + 1))[:size]


# -- the server (child process) ------------------------------------------------------------------------------


def serve(size: int) -> None:
    payload = memoryview(make_payload(size))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            start = 0
            spec = self.headers.get("Range", "")
            if spec.startswith("bytes=") and spec.endswith("-") and spec[6:-1].isdigit():
                start = int(spec[6:-1])
            if start >= size > 0:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.send_header("Content-Length", str(size - start))
            self.end_headers()
            if body:
                with contextlib.suppress(OSError):
                    self.wfile.write(payload[start:])

    class Server(ThreadingHTTPServer):
        daemon_threads = True

    httpd = Server(("127.0.0.1", 0), Handler)
    print(httpd.server_address[1], flush=True)
    httpd.serve_forever()


# -- the methods compared -------------------------------------------------------------------------------------


def plain_requests(url: str, dst: Path) -> None:
    """The yardstick: a streaming GET written 1 MiB at a time."""
    with requests.get(url, stream=True, timeout=30) as resp:
        resp.raise_for_status()
        with open(dst, "wb") as fh:
            for chunk in resp.iter_content(MIB):
                fh.write(chunk)


def reference_1kib(url: str, dst: Path) -> None:
    """The anchor's transfer loop as SPEC section 5.1 describes it: 1 KiB chunks, append mode, a bar."""
    with requests.get(url, stream=True, timeout=30) as resp:
        total = int(resp.headers["Content-Length"])
        with open(dst, "ab") as fh, tqdm(total=total, unit="B", unit_scale=True, desc=str(dst)) as bar:
            for chunk in resp.iter_content(1024):
                if chunk:
                    fh.write(chunk)
                    bar.update(1024)


def ours(progress: bool, sha256: str | None = None) -> Callable[[str, Path], None]:
    def run(url: str, dst: Path) -> None:
        download_url(url, dst, progress=progress, sha256=sha256)

    return run


# -- measurement ----------------------------------------------------------------------------------------------


def scratch_dir() -> str | None:
    """tmpfs when there is one, so disk writeback does not add noise to the transfer times."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def measure(
    methods: dict[str, Callable[[str, Path], None]], url: str, size: int, rounds: int, slow_rounds: int
):
    """Seconds per method and round; methods named with "reference" run only in the first slow_rounds rounds."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    with tempfile.TemporaryDirectory(dir=scratch_dir()) as tmp:
        dst = Path(tmp) / "payload.bin"
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                if "reference" in name and r >= slow_rounds:
                    continue
                with contextlib.redirect_stderr(io.StringIO()):  # bars are drawn, but not on the console
                    start = time.perf_counter()
                    methods[name](url, dst)
                    elapsed = time.perf_counter() - start
                if dst.stat().st_size != size:
                    raise RuntimeError(f"{name} wrote {dst.stat().st_size} bytes, expected {size}")
                dst.unlink()
                times[name].append(elapsed)
    return times


def table(times: dict[str, list[float]], size: int, baseline: str) -> list[str]:
    rows = [
        "| method | median time (ms) | throughput (MiB/s) | time / plain requests loop |",
        "|---|---:|---:|---:|",
    ]
    base = times[baseline]
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        med = statistics.median(ts)
        rows.append(f"| {name} | {med * 1e3:.0f} | {size / MIB / med:.0f} | {ratio:.2f}x |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run for smoke-testing")
    parser.add_argument("--markdown", type=Path, help="also write a markdown section to this file")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return 0

    size, rounds, slow_rounds = (16 * MIB, 2, 1) if args.quick else (192 * MIB, 9, 2)
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(size)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        url = f"http://127.0.0.1:{int(child.stdout.readline())}/payload.bin"
        digest = hashlib.sha256(make_payload(size)).hexdigest()
        methods = {
            "plain requests loop, 1 MiB chunks": plain_requests,
            "download_url(progress=False)": ours(progress=False),
            "download_url(progress=True)": ours(progress=True),
            "download_url(progress=False, sha256=...)": ours(progress=False, sha256=digest),
            "reference approach (1 KiB chunks, append, bar)": reference_1kib,
        }
        times = measure(methods, url, size, rounds, slow_rounds)
    finally:
        child.terminate()
        child.wait()

    lines = [
        "## download_url throughput (ann2snn-utils)",
        "",
        f"Downloading a {size // MIB} MiB payload from a local HTTP server (another process on 127.0.0.1) to a file "
        f"(in {scratch_dir() or 'the temporary folder'}): "
        f"median over {rounds} rounds ({slow_rounds} for the reference approach) with the methods in rotating "
        "order; the ratio is the median of per-round time ratios to the plain `requests` loop (target: at most "
        "1.10x). With `sha256=` the digest is computed while streaming. "
        f"Python {sys.version.split()[0]}, requests {requests.__version__}, {os.cpu_count()} CPUs.",
        "",
        *table(times, size, "plain requests loop, 1 MiB chunks"),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

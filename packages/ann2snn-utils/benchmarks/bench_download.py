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


def serve(size: int, rate: float) -> None:
    """Serve the payload; ``rate`` > 0 paces each body to that many MiB/s (a link slower than loopback)."""
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
                    self._send(payload[start:])

        def _send(self, body: memoryview) -> None:
            if rate <= 0:
                self.wfile.write(body)
                return
            began = time.perf_counter()
            for pos in range(0, len(body), MIB):
                self.wfile.write(body[pos : pos + MIB])
                ahead = began + (pos + MIB) / (rate * MIB) - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)

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


def plain_requests_sha256(url: str, dst: Path) -> None:
    """The yardstick for ``sha256=``: the same loop, hashing each chunk as it is written."""
    hasher = hashlib.sha256()
    with requests.get(url, stream=True, timeout=30) as resp:
        resp.raise_for_status()
        with open(dst, "wb") as fh:
            for chunk in resp.iter_content(MIB):
                fh.write(chunk)
                hasher.update(chunk)
    hasher.hexdigest()


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
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            f"| {name} | {med * 1e3:.0f} | {size / MIB / med:.0f} | {ratio(times, name, baseline):.2f}x |"
        )
    return rows


def ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    return statistics.median(t / b for t, b in zip(times[name], times[baseline]))


def hash_time(size: int, rounds: int) -> float:
    """Median seconds to SHA-256 the payload in memory, 1 MiB at a time (the floor of ``sha256=``'s cost)."""
    view = memoryview(make_payload(size))
    runs = []
    for _ in range(rounds):
        start = time.perf_counter()
        hasher = hashlib.sha256()
        for pos in range(0, size, MIB):
            hasher.update(view[pos : pos + MIB])
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def with_server(
    size: int, rate: float, job: Callable[[str], dict[str, list[float]]]
) -> dict[str, list[float]]:
    """Run ``job(url)`` against a server child process serving ``size`` bytes at ``rate`` MiB/s (0: unpaced)."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(size), "--rate", str(rate)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        return job(f"http://127.0.0.1:{int(child.stdout.readline())}/payload.bin")
    finally:
        child.terminate()
        child.wait()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run for smoke-testing")
    parser.add_argument("--markdown", type=Path, help="also write a markdown section to this file")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.rate)
        return 0

    size, rounds, slow_rounds = (16 * MIB, 2, 1) if args.quick else (192 * MIB, 9, 2)
    digest = hashlib.sha256(make_payload(size)).hexdigest()
    methods = {
        "plain requests loop, 1 MiB chunks": plain_requests,
        "download_url(progress=False)": ours(progress=False),
        "download_url(progress=True)": ours(progress=True),
        "download_url(progress=False, sha256=...)": ours(progress=False, sha256=digest),
        "plain requests loop + hashlib.sha256 per chunk": plain_requests_sha256,
        "reference approach (1 KiB chunks, append, bar)": reference_1kib,
    }
    times = with_server(size, 0, lambda url: measure(methods, url, size, rounds, slow_rounds))
    hash_alone = hash_time(size, rounds)

    # A link slower than loopback (still faster than most real ones): the hash then overlaps the transfer.
    link_size, link_rounds, rate = (8 * MIB, 2, 200.0) if args.quick else (64 * MIB, 5, 200.0)
    link_digest = hashlib.sha256(make_payload(link_size)).hexdigest()
    link_methods = {
        "plain requests loop, 1 MiB chunks": plain_requests,
        "download_url(progress=False)": ours(progress=False),
        "download_url(progress=False, sha256=...)": ours(progress=False, sha256=link_digest),
        "plain requests loop + hashlib.sha256 per chunk": plain_requests_sha256,
    }
    link_times = with_server(
        link_size, rate, lambda url: measure(link_methods, url, link_size, link_rounds, 0)
    )

    base = "plain requests loop, 1 MiB chunks"
    sha_ratio = ratio(times, "download_url(progress=False, sha256=...)", base)
    lines = [
        "## download_url throughput (ann2snn-utils)",
        "",
        f"Downloading a {size // MIB} MiB payload from a local HTTP server (another process on 127.0.0.1) to a file "
        f"(in {scratch_dir() or 'the temporary folder'}): "
        f"median over {rounds} rounds ({slow_rounds} for the reference approach) with the methods in rotating "
        "order; the ratio is the median of per-round time ratios to the plain `requests` loop (target: at most "
        "1.10x). With `sha256=` the digest is computed while streaming, on a background thread fed the blocks "
        "as they are written (the bytes already on disk of a resumed part are read back once, on that thread). "
        f"Python {sys.version.split()[0]}, requests {requests.__version__}, {os.cpu_count()} CPUs.",
        "",
        *table(times, size, base),
        "",
        f"SHA-256 of the payload alone, in memory (hashlib, one thread): {hash_alone * 1e3:.0f} ms "
        f"({size / MIB / hash_alone:.0f} MiB/s), {hash_alone / statistics.median(times[base]):.2f}x the plain "
        "loop's median time: one SHA-256 cannot be split over cores, so where the hash is slower than the "
        "transfer, its own time is the floor of `sha256=` even when it fully overlaps the transfer. "
        f"`sha256=` took {sha_ratio:.2f}x the plain loop, and "
        f"{ratio(times, 'download_url(progress=False, sha256=...)', 'plain requests loop + hashlib.sha256 per chunk'):.2f}x "
        "the same loop hashing its chunks. Over a link slower than the hash (below), it costs almost nothing.",
        "",
        f"### Over a {rate:.0f} MiB/s link ({link_size // MIB} MiB, {link_rounds} rounds, the server paces its "
        "sends)",
        "",
        *table(link_times, link_size, base),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Unary gRPC load from h2load (nghttp2-client): a C load generator that costs the host little CPU.

gRPC over HTTP/2 is a POST whose body is length-prefixed messages; h2load sends the
same pre-encoded body on every request. h2load counts HTTP statuses only (a gRPC
error is still HTTP 200), so callers check the gateway's own request counters for
errors (``grpc_status_counts``).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import urllib.request
from dataclasses import dataclass

from google.protobuf.message import Message

INSTALL_HINT = "h2load is not installed (Debian: apt-get install nghttp2-client; `make bench` installs it)"


def grpc_frame(message: Message) -> bytes:
    """One uncompressed gRPC message: flag 0, 4-byte big-endian length, the protobuf."""
    body = message.SerializeToString()
    return b"\0" + struct.pack(">I", len(body)) + body


def available() -> bool:
    return shutil.which("h2load") is not None


@dataclass(frozen=True)
class H2loadResult:
    throughput: float
    """Requests per second over the measured duration."""
    done: int
    succeeded: int
    failed: int
    mean_ms: float
    max_ms: float
    output: str


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    return float(match.group(1)) * _UNITS[match.group(2)] if match else 0.0


def run_h2load(url: str, body_path: str, *, duration: float, warmup: float = 1.0, clients: int = 16,
               streams: int = 4, threads: int = 1) -> H2loadResult:
    """``h2load`` against ``url`` (``http://host:port/package.Service/Method``) for ``duration`` seconds."""
    command = [
        "h2load", "-D", f"{round(duration * 1000)}ms", f"--warm-up-time={round(warmup * 1000)}ms",
        "-c", str(clients), "-m", str(streams),
        "-t", str(threads), "-d", body_path, "-H", "content-type: application/grpc", "-H", "te: trailers", url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=duration + warmup + 60, check=False)
    out = result.stdout + result.stderr
    finished = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    timing = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if result.returncode != 0 or finished is None or counts is None:
        raise RuntimeError(f"h2load failed ({result.returncode}): {out.strip()[-500:]}")
    return H2loadResult(
        throughput=float(finished.group(1)),
        done=int(counts.group(2)),
        succeeded=int(counts.group(3)),
        failed=int(counts.group(4)),
        mean_ms=_ms(timing.group(3)) if timing else 0.0,
        max_ms=_ms(timing.group(2)) if timing else 0.0,
        output=out,
    )


_REQUESTS = re.compile(r'^hsmgw_requests_total\{(?P<labels>[^}]*)\} (?P<value>[\d.e+]+)$', re.MULTILINE)


def grpc_status_counts(metrics_urls: list[str], rpc: str) -> dict[str, int]:
    """Finished calls of ``rpc`` by status code, summed over the workers' /metrics endpoints."""
    counts: dict[str, int] = {}
    for url in metrics_urls:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - our own loopback endpoint
            text = response.read().decode()
        for match in _REQUESTS.finditer(text):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group("labels")))
            if labels.get("rpc") == rpc:
                code = labels.get("code", "")
                counts[code] = counts.get(code, 0) + int(float(match.group("value")))
    return counts

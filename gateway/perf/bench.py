"""``hsmgw bench``: the gateway against the HSM's own speed, side by side, in one run.

The benchmark makes its own throw-away SoftHSM2 fleet (``hsmgw fleet init`` in a
temporary directory), so it never touches a fleet in use, and measures, for
ECDSA_SHA256 (P-256) and RSA_PKCS1_SHA256 (2048):

1. direct python-pkcs11 on the module (best of 1 and 2 processes);
2. the gateway (``--workers 2``), unary, driven by h2load with a pre-encoded request;
3. the gateway, ``BatchSign`` (batches of 64), from Python client processes;
4. the gateway, unary, from Python client processes;
5. a peer forwarder: ``p11-kit server`` exporting the same token, used through
   ``p11-kit-client.so`` by the same number of Python processes;
6. the floor: one bare Python gRPC process per CPU doing only the HSM call
   (``gateway.perf.floor``), driven by the same h2load as (2);
7. (1) again, signing through the gateway's own binding (``router.pkcs11._signer``)
   instead of python-pkcs11's ``Key.sign``: how much of a ratio to (1) is the binding;

each with its ratio to (1): rows 1, 2, 3 and 6 in paired rounds (``--rounds``; each
round's ratio against that round's direct measurement, the median reported), since the
machine's speed drifts over a run; then the latency a Python caller adds at concurrency 1,
and the routing cost with 1,000 and 1,000,000 placements in the store and cache
(synthetic, apart from the key signed with; after a warm-up turn each, the two take
turns ``ROUTING_ROUNDS`` times, medians reported),
with each worker's RSS. Results go to
a JSON file and into ``docs/performance.md`` between its bench markers (the prose
around them is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.perf.direct import DirectTarget
from gateway.perf.grpc_driver import GatewayTarget, algorithm_pb, digest_for
from gateway.perf.h2load import INSTALL_HINT, available, grpc_frame, grpc_status_counts, run_h2load
from gateway.perf.report import Report
from gateway.perf.runner import RunError, run
from gateway.perf.workload import Workload
from router.model import Operation

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
P11KIT_CLIENT_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib/pkcs11/p11-kit-client.so",
)
ALGORITHMS = {
    "ecdsa": (Operation.ECDSA_SHA256, "EC_P256"),
    "rsa": (Operation.RSA_PKCS1_SHA256, "RSA_2048"),
}
PYTHON_PROCESSES = 2
DIRECT = "direct python-pkcs11"
FLOOR = "floor: bare Python gRPC + C_Sign, h2load"
DIRECT_BINDING = "direct, the gateway's signing binding"
ROUTING_ROUNDS = 5
"""Turns each placement count takes in the routing-cost measurement (medians are reported),
after one warm-up turn each that is not counted."""
IDLE_CHECK_SECONDS = 2.0
"""How long the bench watches the cores before it starts (a busy machine is noted)."""
BUSY_AT_START = 0.15
"""Share of the cores busy before the start above which the report says the machine was not idle."""
BATCH_IN_FLIGHT = 4
"""Calls in flight per BatchSign client process, each on its own connection: the kernel spreads
connections, not calls, over the workers, so a handful of connections can land unevenly."""


class BenchError(RuntimeError):
    """The benchmark cannot run here; the message says why."""


@dataclass
class Row:
    name: str
    throughput: float | None
    note: str = ""
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    detail: dict[str, Any] = field(default_factory=dict)
    ratio: float | None = None
    """To direct: the median of the per-round ratios for a row measured in rounds."""
    rounds: list[dict[str, float]] = field(default_factory=list)
    """Each round's throughput and ratio to that round's direct measurement."""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "throughput": None if self.throughput is None else round(self.throughput, 1),
                "ratio": self.ratio, "rounds": self.rounds,
                "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "errors": self.errors, "note": self.note,
                "detail": self.detail}


def _paired(rows: list[Row], directs: list[float]) -> Row:
    """One row from its rounds: median throughput, median of the ratios to each round's direct."""
    first = rows[0]
    measured = [(row, d) for row, d in zip(rows, directs, strict=True) if row.throughput is not None and d > 0]
    if not measured:
        return Row(first.name, None, note=first.note, errors=sum(r.errors for r in rows))
    middle = sorted(measured, key=lambda m: m[0].throughput or 0.0)[len(measured) // 2][0]
    ratios = [(row.throughput or 0.0) / d for row, d in measured]
    return Row(first.name, statistics.median(row.throughput or 0.0 for row, _ in measured), note=first.note,
               p50_ms=middle.p50_ms, p99_ms=middle.p99_ms, errors=sum(r.errors for r in rows),
               detail=middle.detail, ratio=round(statistics.median(ratios), 3),
               rounds=[{"throughput": round(row.throughput or 0.0, 1), "ratio": round(ratio, 3), "direct": round(d, 1)}
                       for (row, d), ratio in zip(measured, ratios, strict=True)])


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the gateway under test ----------------------------------------------------------------------


def _free_ports(count: int) -> int:
    """A base port with ``count`` consecutive free ports after it (for the workers' /metrics)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base: int = probe.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            sockets = []
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
        return base
    raise BenchError("no free ports for the gateway's metrics endpoints")


class BenchGateway:
    """``hsmgw serve --workers N`` on a bench config; /metrics on consecutive ports."""

    def __init__(self, config: Path, workers: int, workdir: Path) -> None:
        self.workers = workers
        self.metrics_base = _free_ports(workers)
        text = config.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{self.metrics_base}"\n'
        # Beside the original: its relative paths (secrets, store) must still resolve.
        self.config = config.parent / f"{config.stem}-bench-{uuid.uuid4().hex[:6]}.toml"
        self.config.write_text(text)
        self.port_file = workdir / f"port-{uuid.uuid4().hex[:6]}"
        self.log_path = workdir / f"gateway-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.started_in = 0.0

    def start(self, timeout: float = 600.0) -> BenchGateway:
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli.hsmgw", "--log-format", "json", "serve", "--config",
                 str(self.config), "--workers", str(self.workers), "--port-file", str(self.port_file),
                 "--grace", "2"],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            )
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() - started > timeout:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise BenchError(f"the bench gateway did not start:\n{tail}")
            time.sleep(0.1)
        self.port = int(self.port_file.read_text())
        self.started_in = time.monotonic() - started
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.metrics_base + i}/metrics" for i in range(self.workers)]

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in children.read_text().split()] if children.exists() else []

    def rss_mb(self) -> list[float]:
        sizes = []
        for pid in self.worker_pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes.append(round(int(line.split()[1]) / 1024, 1))
        return sizes

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- measurements ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.duration = float(args.duration)
        self.warmup = min(1.0, max(0.2, self.duration / 5))
        only = {part.strip() for part in (args.only or "").split(",") if part.strip()}
        unknown = only - {*ALGORITHMS, "routing", "latency"}
        if unknown:
            raise BenchError(f"--only: unknown part(s) {', '.join(sorted(unknown))}; "
                             "choose from ecdsa, rsa, routing, latency")
        self.only = only
        self.workers = int(args.workers)
        self.rounds = int(args.rounds)
        self.workdir = Path(tempfile.mkdtemp(prefix="hsmgw-bench-"))
        self.results: dict[str, Any] = {}
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        """A note for the report, once however many rounds meet it."""
        if text not in self.notes:
            self.notes.append(text)

    def wants(self, part: str) -> bool:
        return not self.only or part in self.only

    # -- set-up --

    def make_fleet(self) -> Any:
        from gateway.fleet import FleetError, init_fleet

        try:
            return init_fleet(self.workdir / "fleet", listen="127.0.0.1:0")
        except FleetError as exc:
            raise BenchError(str(exc)) from exc

    def create_keys(self, target: str) -> dict[str, str]:
        from gateway import _pbenum
        from hsmgw.v1 import crypto_pb2 as pb
        from hsmgw.v1 import crypto_pb2_grpc

        keys = {}
        with GatewayTarget(target).channel(own_connection=False) as channel:
            stub = crypto_pb2_grpc.CryptoServiceStub(channel)
            for name, (_, key_algorithm) in ALGORITHMS.items():
                key_id = f"bench/{name}"
                stub.GenerateKey(pb.GenerateKeyRequest(
                    request_id=f"bench-{name}", key_id=key_id,
                    algorithm=_pbenum.value(pb.KeyAlgorithm, "KEY_ALGORITHM_" + key_algorithm)), timeout=60)
                keys[name] = key_id
        return keys

    def workload(self, op: Operation, key_id: str, *, mode: str = "unary", processes: int, in_flight: int,
                 duration: float | None = None) -> Workload:
        return Workload(op="sign", algorithm=op, key_ids=(key_id,), mode=mode, processes=processes,
                        in_flight=in_flight, duration=duration or self.duration, warmup=self.warmup).check()

    def measure(self, name: str, workload: Workload, driver: Any) -> Report:
        _say(f"  {name}: {workload.describe()}")
        try:
            report = run(workload, driver, label=name)
        except RunError as exc:
            # A SoftHSM process that initialised while another process rewrote a token's
            # files may never list that token (seen once in 20 runs); new processes do.
            if "NoSuchToken" not in str(exc):
                raise
            self.note(f"{name}: {exc}; measured again with new client processes")
            report = run(workload, driver, label=name)
        _say(f"    {report.throughput:,.0f} ops/s, p50 {report.latency_ms['p50']:.2f} ms, "
             f"errors {report.error_count}")
        return report

    def h2load(self, gateway: BenchGateway, op: Operation, key_id: str) -> Row:
        from hsmgw.v1 import crypto_pb2 as pb

        if not available():
            self.note(INSTALL_HINT)
            return Row("gateway unary, h2load", None, note=INSTALL_HINT)
        body = self.workdir / f"sign-{key_id.replace('/', '_')}.bin"
        body.write_bytes(grpc_frame(pb.SignRequest(key_id=key_id, algorithm=algorithm_pb(op),
                                                   digest=digest_for(op, bytes(32)))))
        before = grpc_status_counts(gateway.metrics_urls, "Sign")
        _say(f"  h2load: unary Sign, 16 connections x 4 streams, {self.duration:g}s")
        result = run_h2load(f"http://{gateway.target}/hsmgw.v1.CryptoService/Sign", str(body),
                            duration=self.duration, warmup=self.warmup)
        after = grpc_status_counts(gateway.metrics_urls, "Sign")
        grpc_errors = sum(after.get(c, 0) - before.get(c, 0) for c in after if c != "OK")
        ok = after.get("OK", 0) - before.get("OK", 0)
        _say(f"    {result.throughput:,.0f} req/s, mean {result.mean_ms:.2f} ms; gateway counted {ok:,} OK, "
             f"{grpc_errors} errors")
        return Row("gateway unary, h2load", result.throughput, errors=grpc_errors + result.failed,
                   note="16 connections x 4 streams; gRPC status checked in the gateway's counters",
                   detail={"mean_ms": result.mean_ms, "max_ms": result.max_ms, "server_ok": ok})

    @contextlib.contextmanager
    def floor_server(self, fleet: Any, key_id: str) -> Iterator[int]:
        """``gateway.perf.floor`` running, one process per worker CPU: yields its port."""
        from gateway.config import load
        from gateway.workers import worker_cpus

        config = load(fleet.config_path)
        port = _free_ports(1)
        procs: list[subprocess.Popen[bytes]] = []
        ready = [self.workdir / f"floor-{uuid.uuid4().hex[:6]}" for _ in range(self.workers)]
        try:
            for flag, cpu in zip(ready, worker_cpus(self.workers, config.server.pin_workers), strict=True):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "gateway.perf.floor", "--config", str(fleet.config_path), "--key", key_id,
                     "--port", str(port), "--cpu", str(-1 if cpu is None else cpu),
                     "--threads", str(config.server.threads), "--scheduling", config.server.scheduling,
                     "--ready", str(flag)],
                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            end = time.monotonic() + 60
            while not all(flag.exists() for flag in ready):
                failed = next((p for p in procs if p.poll() is not None), None)
                if failed is not None or time.monotonic() > end:
                    err = failed.stderr.read().decode(errors="replace") if failed and failed.stderr else "timeout"
                    raise BenchError(f"the floor server did not start: {err.strip()[-500:]}")
                time.sleep(0.05)
            yield port
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def floor(self, port: int | None, op: Operation, key_id: str) -> Row:
        """h2load against the floor server: Python gRPC doing nothing but the HSM call."""
        from hsmgw.v1 import crypto_pb2 as pb

        if not available():
            return Row(FLOOR, None, note=INSTALL_HINT)
        if port is None:
            return Row(FLOOR, None, note="the floor server did not start (see the notes)")
        body = self.workdir / f"floor-{key_id.replace('/', '_')}.bin"
        body.write_bytes(grpc_frame(pb.SignRequest(key_id=key_id, algorithm=algorithm_pb(op),
                                                   digest=digest_for(op, bytes(32)))))
        _say(f"  floor: {self.workers} bare Python gRPC processes signing, h2load as above")
        result = run_h2load(f"http://127.0.0.1:{port}/hsmgw.v1.CryptoService/Sign", str(body),
                            duration=self.duration, warmup=self.warmup)
        _say(f"    {result.throughput:,.0f} req/s, mean {result.mean_ms:.2f} ms")
        return Row(FLOOR, result.throughput, errors=result.failed,
                   note=f"{self.workers} processes, one per CPU: no auth, routing, metrics; the ceiling for row 2",
                   detail={"mean_ms": result.mean_ms, "max_ms": result.max_ms})

    def p11kit(self, fleet: Any, op: Operation, key_id: str, cluster_label: str) -> Row:
        module = next((p for p in P11KIT_CLIENT_CANDIDATES if os.path.exists(p)), None)
        if shutil.which("p11-kit") is None or module is None:
            note = "p11-kit or p11-kit-client.so is not installed (Debian: apt-get install p11-kit)"
            self.note(note)
            return Row("p11-kit peer forwarder", None, note=note)
        from gateway.config import load

        config = load(fleet.config_path)
        sock = self.workdir / f"p11kit-{uuid.uuid4().hex[:6]}.sock"
        env = {**os.environ, "SOFTHSM2_CONF": str(fleet.softhsm_conf)}
        server = subprocess.Popen(
            ["p11-kit", "server", "-f", "-n", str(sock), "--provider", config.pkcs11.module,
             f"pkcs11:token={cluster_label}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            end = time.monotonic() + 10
            while not sock.exists():
                if server.poll() is not None or time.monotonic() > end:
                    err = server.stderr.read().decode(errors="replace") if server.stderr else ""
                    raise BenchError(f"p11-kit server did not start: {err.strip()}")
                time.sleep(0.05)
            driver = DirectTarget(str(fleet.config_path), module=module,
                                  env=(("P11_KIT_SERVER_ADDRESS", f"unix:path={sock}"),))
            report = self.measure("p11-kit peer", self.workload(op, key_id, processes=PYTHON_PROCESSES,
                                                                 in_flight=1), driver)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
        return Row("p11-kit peer forwarder", report.throughput, p50_ms=report.latency_ms["p50"],
                   p99_ms=report.latency_ms["p99"], errors=report.error_count,
                   note=f"p11-kit server + p11-kit-client.so, {PYTHON_PROCESSES} Python processes")

    def algorithm(self, name: str, gateway: BenchGateway, fleet: Any, key_id: str) -> dict[str, Any]:
        """The seven rows for one algorithm; direct, h2load, BatchSign and the floor in paired rounds.

        The machine's speed drifts by 10-30 % over minutes, so each of those rows is measured
        ``--rounds`` times, next to a direct measurement of its own round, the rows in reverse
        order every other round: a row's ratio is the median of its per-round ratios, and its
        throughput the median of its rounds. Python unary and the p11-kit peer, far from any
        target, are measured once, against the median direct.
        """
        op = ALGORITHMS[name][0]
        _say(f"{op.value}:")
        direct = DirectTarget(str(fleet.config_path))
        one = self.measure("direct, 1 process", self.workload(op, key_id, processes=1, in_flight=1), direct)
        two = self.measure("direct, 2 processes", self.workload(op, key_id, processes=2, in_flight=1), direct)
        best = max((one, two), key=lambda r: r.throughput)
        processes = int(best.workload["processes"])
        target = GatewayTarget(gateway.target)

        def measure_direct() -> Row:
            report = self.measure(f"direct, {processes} process(es)",
                                  self.workload(op, key_id, processes=processes, in_flight=1), direct)
            return Row(DIRECT, report.throughput, p50_ms=report.latency_ms["p50"],
                       p99_ms=report.latency_ms["p99"], errors=report.error_count)

        def measure_batch() -> Row:
            report = self.measure("BatchSign x64", self.workload(
                op, key_id, mode="batch", processes=PYTHON_PROCESSES, in_flight=BATCH_IN_FLIGHT), target)
            return Row("gateway BatchSign (64/call), Python clients", report.throughput,
                       p50_ms=report.latency_ms["p50"], p99_ms=report.latency_ms["p99"], errors=report.error_count,
                       note=f"{PYTHON_PROCESSES} processes x {BATCH_IN_FLIGHT} calls in flight; "
                            "latency is per batch")

        rounds: list[dict[str, Row]] = []
        with contextlib.ExitStack() as stack:
            port: int | None = None
            if available():
                try:
                    port = stack.enter_context(self.floor_server(fleet, key_id))
                except BenchError as exc:
                    self.note(f"floor server failed: {exc}")
            parts: dict[str, Callable[[], Row]] = {
                "direct": measure_direct, "h2load": lambda: self.h2load(gateway, op, key_id),
                "batch": measure_batch, "floor": lambda: self.floor(port, op, key_id)}
            for number in range(self.rounds):
                _say(f"  round {number + 1} of {self.rounds}")
                order = list(parts) if number % 2 == 0 else list(reversed(parts))
                measured: dict[str, Row] = {}
                for part in order:
                    if number == 0 and part == "direct":  # the best of 1-2 processes, just measured
                        measured[part] = Row(DIRECT, best.throughput, p50_ms=best.latency_ms["p50"],
                                             p99_ms=best.latency_ms["p99"], errors=best.error_count)
                    else:
                        measured[part] = parts[part]()
                rounds.append(measured)
        directs = [r["direct"].throughput or 0.0 for r in rounds]
        paired = {part: _paired([r[part] for r in rounds], directs) for part in ("direct", "h2load", "batch", "floor")}
        base = paired["direct"].throughput or 1.0
        paired["direct"].name = (f"direct python-pkcs11 (best of 1-2 processes: {processes}; "
                                 f"{self.rounds} round(s))")
        paired["direct"].detail.update({"1": one.throughput, "2": two.throughput})
        unary = self.measure("unary, Python", self.workload(op, key_id, processes=PYTHON_PROCESSES, in_flight=8),
                             target)
        rows = [paired["direct"], paired["h2load"], paired["batch"],
                Row("gateway unary, Python clients", unary.throughput, p50_ms=unary.latency_ms["p50"],
                    p99_ms=unary.latency_ms["p99"], errors=unary.error_count,
                    note=f"{PYTHON_PROCESSES} processes x 8 calls in flight")]
        primary = self._primary(fleet, key_id)
        try:
            rows.append(self.p11kit(fleet, op, key_id, primary))
        except (RunError, BenchError) as exc:
            note = f"p11-kit peer failed: {exc}"
            self.note(note)
            rows.append(Row("p11-kit peer forwarder", None, note=note))
        rows.append(paired["floor"])
        binding = self.measure("direct, the gateway's binding", self.workload(
            op, key_id, processes=processes, in_flight=1), DirectTarget(str(fleet.config_path), gateway_binding=True))
        rows.append(Row(DIRECT_BINDING, binding.throughput, p50_ms=binding.latency_ms["p50"],
                        p99_ms=binding.latency_ms["p99"], errors=binding.error_count,
                        note="row 1, signing as the gateway does (router/pkcs11/_signer.py) instead of "
                             "python-pkcs11's Key.sign"))
        for row in rows:
            if row.ratio is None and row.throughput is not None:
                row.ratio = round(row.throughput / base, 3)
        # Row 2 over row 6, round by round: how much of what Python gRPC and the HSM allow is
        # left after the gateway's own work. Both are driven by the same h2load, so what gRPC,
        # the kernel and the load generator cost is in both and out of the ratio.
        shares = [r["h2load"].throughput / r["floor"].throughput for r in rounds
                  if r["h2load"].throughput and r["floor"].throughput]
        return {"algorithm": op.value, "rounds": self.rounds, "rows": [r.as_dict() for r in rows],
                "share_of_floor": round(statistics.median(shares), 3) if shares else None,
                "share_of_floor_rounds": [round(s, 3) for s in shares]}

    @staticmethod
    def _primary(fleet: Any, key_id: str) -> str:
        from gateway.config import load
        from router.placement.factory import make_store

        config = load(fleet.config_path)
        store = make_store(config.store.url, config.base_dir)
        try:
            placement = store.get(key_id)
        finally:
            store.close()
        assert placement is not None
        return {c.name: c.token_label for c in config.clusters}[placement.primary]

    def latency(self, gateway: BenchGateway, fleet: Any, keys: dict[str, str]) -> dict[str, Any]:
        _say("added latency at concurrency 1 (one Python caller, one call at a time):")
        out = {}
        for name, key_id in keys.items():
            if not self.wants(name) and self.only - {"latency"}:
                continue
            op = ALGORITHMS[name][0]
            w = self.workload(op, key_id, processes=1, in_flight=1)
            direct = self.measure(f"direct {name}", w, DirectTarget(str(fleet.config_path)))
            via = self.measure(f"gateway {name}", w, GatewayTarget(gateway.target))
            out[op.value] = {
                "direct_p50_ms": direct.latency_ms["p50"], "gateway_p50_ms": via.latency_ms["p50"],
                "added_p50_ms": round(via.latency_ms["p50"] - direct.latency_ms["p50"], 3),
                "direct_p99_ms": direct.latency_ms["p99"], "gateway_p99_ms": via.latency_ms["p99"],
            }
        return out

    def routing(self, fleet: Any, key_id: str) -> dict[str, Any]:
        """Unary sign throughput and RSS with 1,000 and with ``--placements`` keys.

        One gateway per size, all started first; each size gets a warm-up turn that
        is not counted, then the sizes take turns ROUTING_ROUNDS times, in reverse
        order every other round (ABBA), and each size reports its median: a drift in
        the machine's load then hits both sizes alike.
        """
        from router.placement.sqlite import SqliteStore

        total = int(self.args.placements)
        sizes = sorted({1000, total}) if total > 1000 else [1000]
        op = ALGORITHMS["ecdsa"][0]
        gateways: dict[int, BenchGateway] = {}
        measured: dict[int, list[Row]] = {size: [] for size in sizes}
        try:
            for size in sizes:
                store_path = self.workdir / f"routing-{size}.db"
                with sqlite3.connect(fleet.state_dir / "placements.db") as source, \
                        sqlite3.connect(store_path) as dest:
                    source.backup(dest)
                SqliteStore(store_path).close()
                _say(f"routing cost: {size:,} placements")
                _add_synthetic(store_path, size)
                text = fleet.config_path.read_text()
                if 'url = "sqlite:placements.db"' not in text:
                    raise BenchError("the bench fleet's config has no store url to replace")
                config = fleet.config_path.parent / f"routing-{size}.toml"
                config.write_text(text.replace('url = "sqlite:placements.db"', f'url = "sqlite:{store_path}"'))
                gateways[size] = BenchGateway(config, self.args.workers, self.workdir).start()
                _say(f"    started in {gateways[size].started_in:.1f}s; workers' RSS {gateways[size].rss_mb()} MB")
            rss_at_start = {size: gateway.rss_mb() for size, gateway in gateways.items()}
            order = list(gateways.items())
            for round_ in range(ROUTING_ROUNDS + 1):
                for size, gateway in order if round_ % 2 else reversed(order):
                    counted = round_ > 0
                    _say(f"  round {round_}/{ROUTING_ROUNDS}, {size:,} placements" if counted
                         else f"  warm-up, {size:,} placements")
                    if available():
                        row = self.h2load(gateway, op, key_id)
                    else:
                        report = self.measure("unary, Python", self.workload(
                            op, key_id, processes=PYTHON_PROCESSES, in_flight=8), GatewayTarget(gateway.target))
                        row = Row("gateway unary, Python clients", report.throughput, errors=report.error_count)
                    if counted:
                        measured[size].append(row)
            runs: list[dict[str, Any]] = []
            for size, gateway in gateways.items():
                rows = measured[size]
                rates = sorted(r.throughput or 0.0 for r in rows)
                runs.append({"placements": size, "throughput": rates[len(rates) // 2], "rounds": rates,
                             "errors": sum(r.errors for r in rows), "how": rows[0].name,
                             "worker_rss_mb": gateway.rss_mb(), "worker_rss_mb_at_start": rss_at_start[size],
                             "start_seconds": round(gateway.started_in, 1)})
        finally:
            for gateway in gateways.values():
                gateway.stop()
        if len(runs) == 2 and runs[0]["throughput"] and runs[1]["throughput"]:
            change = runs[1]["throughput"] / runs[0]["throughput"] - 1
        else:
            change = None
        return {"runs": runs, "throughput_change": None if change is None else round(change, 4)}

    # -- the run --

    def run(self) -> dict[str, Any]:
        load = os.getloadavg()
        # What the cores did just now: the load average trails by a minute and more, so a
        # run that starts right after another would be flagged on the first one's account.
        before = cpu_times()
        time.sleep(IDLE_CHECK_SECONDS)
        after = cpu_times()
        busy = busy_share(before, after) if before and after else None
        _say(f"bench: work directory {self.workdir}; cores {_fmt(_percent(busy))} % busy "
             f"over {IDLE_CHECK_SECONDS:g} s; load average {load[0]:.2f}")
        if busy is not None and busy > BUSY_AT_START:
            self.note(f"the machine was not idle at the start (cores {100 * busy:.0f} % busy over "
                      f"{IDLE_CHECK_SECONDS:g} s): other processes shared the cores")
        elif busy is None and load[0] > 0.5:
            self.note(f"the machine was not idle at the start (load average {load[0]:.2f}): "
                      "other processes shared the cores")
        fleet = self.make_fleet()
        gateway = BenchGateway(fleet.config_path, self.args.workers, self.workdir).start()
        try:
            keys = self.create_keys(gateway.target)
            for name in ALGORITHMS:
                if self.wants(name):
                    self.results[name] = self.algorithm(name, gateway, fleet, keys[name])
            if self.wants("latency"):
                self.results["latency"] = self.latency(gateway, fleet, keys)
        finally:
            gateway.stop()
        if self.wants("routing") and int(self.args.placements) > 0:
            self.results["routing"] = self.routing(fleet, keys["ecdsa"])
        return {
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                        "busy_at_start": None if busy is None else round(busy, 3),
                        "load_average_at_start": round(load[0], 2), "platform": platform.platform()},
            "settings": {"duration": self.duration, "warmup": self.warmup, "gateway_workers": self.args.workers,
                         "python_client_processes": PYTHON_PROCESSES},
            "results": self.results,
            "notes": self.notes,
        }

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def cpu_times() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat; None without it.

    Busy is everything but idle and I/O wait, so time the hypervisor gave to other
    machines (steal) counts as busy: the bench would not have had it either.
    """
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    ticks = [int(value) for value in first[1:9]]  # user nice system idle iowait irq softirq steal
    total = sum(ticks)
    return total - sum(ticks[3:5]), total


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of CPU time that was busy between two ``cpu_times`` readings (0 to 1)."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def _add_synthetic(store_path: Path, size: int) -> None:
    """Fill the store up to ``size`` placements with synthetic ENABLED keys (never signed with)."""
    db = sqlite3.connect(store_path)
    try:
        have = db.execute("SELECT COUNT(*) FROM placements").fetchone()[0]
        now = time.time()
        rows = (
            (f"synthetic/{i:09d}", "EC_P256", "SIGN_VERIFY", "ENABLED", "use1-a", '["usw2-a"]', now,
             f"synthetic-{i:09d}", f"synthetic/{i:09d}|EC_P256|SIGN_VERIFY|0|TOKEN|True", "TOKEN", 1, 1, b"", b"", 2)
            for i in range(max(0, size - have))
        )
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO placements (key_id, algorithm, usage, state, primary_cluster, replicas, create_time, "
            "request_id, fingerprint, storage, version, extractable, wrapped, public_der, copies) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        db.execute("COMMIT")
    finally:
        db.close()


# -- output ---------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _percent(share: float | None) -> float | None:
    return None if share is None else 100 * share


def markdown(data: dict[str, Any]) -> str:
    lines = [f"Measured {data['when']} on {data['machine']['cores']} cores (Python {data['machine']['python']}); "
             f"{data['settings']['duration']:g} s per measurement, gateway `--workers "
             f"{data['settings']['gateway_workers']}`; at the start, the cores were "
             f"{_fmt(_percent(data['machine'].get('busy_at_start')))} % busy (load average "
             f"{data['machine']['load_average_at_start']}).", ""]
    for name in ALGORITHMS:
        result = data["results"].get(name)
        if not result:
            continue
        rounds = result.get("rounds", 1)
        lines += [f"**{result['algorithm']}** (rows 1, 2, 3 and 6: median of {rounds} paired round(s); "
                  "each round's ratio is to that round's direct measurement)", "",
                  "| | ops/s | × direct | × direct by round | p50 ms | p99 ms | errors | how |",
                  "|---|---:|---:|---|---:|---:|---:|---|"]
        for i, row in enumerate(result["rows"], 1):
            ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}"
            by_round = ", ".join(f"{r['ratio']:.2f}" for r in row.get("rounds", [])) or "once"
            lines.append(f"| {i}. {row['name']} | {_fmt(row['throughput'])} | {ratio} | {by_round} | "
                         f"{_fmt(row['p50_ms'], 2)} | {_fmt(row['p99_ms'], 2)} | {row['errors']} | {row['note']} |")
        share = result.get("share_of_floor")
        if share is not None:
            by_round = ", ".join(f"{x:.2f}" for x in result.get("share_of_floor_rounds", []))
            lines += ["", f"Gateway unary over the floor (row 2 ÷ row 6, median of the rounds): **{share:.2f}** "
                          f"({by_round})."]
        lines.append("")
    latency = data["results"].get("latency")
    if latency:
        lines += ["**Latency at concurrency 1** (one Python caller, one call at a time)", "",
                  "| | direct p50 ms | gateway p50 ms | added ms |", "|---|---:|---:|---:|"]
        for alg, row in latency.items():
            lines.append(f"| {alg} | {row['direct_p50_ms']:.3f} | {row['gateway_p50_ms']:.3f} | "
                         f"{row['added_p50_ms']:.3f} |")
        lines.append("")
    routing = data["results"].get("routing")
    if routing:
        lines += ["**Routing cost** (ECDSA_SHA256 unary sign; synthetic placements in the store and every "
                  "worker's cache; the sizes take turns, median of the rounds)", "",
                  "| placements | ops/s (median) | rounds | errors | worker RSS MB | worker start s |",
                  "|---:|---:|---|---:|---|---:|"]
        for r in routing["runs"]:
            rounds = ", ".join(_fmt(x) for x in r.get("rounds", [r["throughput"]]))
            lines.append(f"| {r['placements']:,} | {_fmt(r['throughput'])} | {rounds} | {r['errors']} | "
                         f"{', '.join(str(x) for x in r['worker_rss_mb'])} | {r['start_seconds']} |")
        if routing["throughput_change"] is not None:
            lines.append(f"\nThroughput change from the smallest to the largest: "
                         f"{100 * routing['throughput_change']:+.1f} %.")
        lines.append("")
    for note in data["notes"]:
        lines.append(f"- Note: {note}")
    return "\n".join(lines).rstrip() + "\n"


SKELETON = f"""# Performance

How fast the gateway is next to the HSM it fronts. `make bench` (or `hsmgw bench`)
writes the results between the markers below and `docs/performance.json`.

## Results

{BEGIN}
{END}
"""


def write_markdown(path: Path, data: dict[str, Any]) -> None:
    text = path.read_text() if path.exists() else SKELETON
    if BEGIN not in text or END not in text:
        text = text.rstrip() + "\n\n## Results\n\n" + BEGIN + "\n" + END + "\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + BEGIN + "\n" + markdown(data) + END + tail)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(args)
    try:
        data = bench.run()
    except (RunError, RuntimeError) as exc:
        raise BenchError(str(exc)) from exc
    finally:
        bench.cleanup()
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(data, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        write_markdown(Path(args.markdown), data)
    print(markdown(data))
    return data

"""``hsmgw serve --workers N``: N gateway processes sharing one port.

One Python process serves about one core of gRPC (DESIGN.md, "Facts measured"), so
a host runs one worker per core. The supervisor — this module, in the process
that ran ``hsmgw serve`` — never loads the PKCS #11 module: each worker is a fresh
interpreter (``hsmgw serve --workers 1`` with hidden worker flags) that
initialises the module, logs in and opens its own pools, as a module must be
initialised after ``fork``, never inherited. State every worker must see
(placements, switches, pending changes) lives in the placement store.

The port: the supervisor binds it first (``SO_REUSEPORT``, not listening, so the
kernel never hands it a connection), which reserves it — port 0 picks a free one —
and refuses a port another program holds. Each worker then listens on the same
port with ``SO_REUSEPORT`` and the kernel spreads new connections over them.

Start-up: worker 0 starts alone; if it fails (a wrong PIN, a missing token, a taken
metrics port) the supervisor exits with its status, and the worker's own one-line
error is the only one printed. The others then start together, and the port file
is written when every worker serves.

CPUs: with ``[server] pin_workers`` (the default) and no more workers than usable
CPUs, worker *i* runs on the *i*-th usable CPU only, so its threads never pass a
request to another core.

Running: SIGTERM or SIGINT stops every worker (each drains for ``grace`` seconds), and
so does either during start-up (exit 0): a worker ignores SIGINT until it serves, so
Ctrl-C, which reaches every process of the group, leaves the stop to the supervisor.
SIGHUP is passed on to the workers that serve (each reloads its policy and TLS files).
A worker that dies is started again after a pause that doubles with each death in a
row (``RESTART_PAUSE`` up to ``RESTART_PAUSE_MAX``), while the others serve. One that
cannot start for its configuration or a refused PIN (exit status ``EXIT_CONFIG``) is
not started again until the next SIGHUP: trying a refused PIN again and again can lock
the HSM user out. The gateway stops only when no worker serves and workers died
``RESTARTS_PER_MINUTE`` times within a minute, or every worker was given up. A serving
worker touches its port file every second; one silent for ``SILENT`` seconds (stopped,
or stuck with the interpreter) is killed and so started again. A starting worker touches
its progress file as its start moves on (logged in, each step of worker 0's start-up
reconcile, which may take long on a large store): one that shows no progress for
``start_timeout`` seconds (stopped, stuck in an HSM login that does not return) is killed,
once, and started again; on the first start, the gateway does not start.

``[metrics] listen``: worker *i* serves metrics on the configured port + *i* (or
an ephemeral port when the configured port is 0).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gateway import sharedlimits
from gateway._signals import Signals
from gateway.config import GatewayConfig

log = logging.getLogger(__name__)

RESTARTS_PER_MINUTE = 5
RESTART_PAUSE = 0.5
"""Seconds before the first restart of a worker that died; doubled for each death in a row."""
RESTART_PAUSE_MAX = 30.0
SERVING_RESETS = 60.0
"""Seconds a restarted worker must serve before its next death counts as a first one."""
SILENT = 10.0
"""Seconds without a heartbeat (``gateway.server.HEARTBEAT``) after which a serving worker
counts as stopped or stuck: it is killed and started again."""
STOP_AFTER_GRACE = 13.0
"""Seconds a worker's stop may take beyond its grace before the supervisor kills it: up to
``gateway.server.CALLS_TIMEOUT`` (5 s) for calls still running, then up to
``router.router.CLOSE_TIMEOUT`` (5 s) for the sessions to close, however many HSMs hang
(``Gateway.stop``), up to ``gateway.server.EXIT_WAIT`` (1 s) before the process exits without
the calls still inside a hung HSM (``serve``), and 2 s to log and exit. The stop timeouts in
deploy/ count on it."""
EXIT_CONFIG = 78
"""A worker's exit status when its configuration or credentials are refused (sysexits' EX_CONFIG)."""
PR_SET_PDEATHSIG = 1


class WorkerError(RuntimeError):
    """The supervisor could not start (its message is the one error line)."""


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes]
    port_file: Path
    progress_file: Path
    """Touched by the worker as its start moves on (``start_progress``); made by ``_spawn``."""
    started: float
    """When it was started (monotonic)."""
    serving_since: float | None = None
    killed: bool = False
    """Killed for its start: not killed, nor logged, again while the process lingers."""

    @property
    def pid(self) -> int:
        return self.proc.pid


def start_progress(path: str | None) -> Callable[[], None]:
    """In a worker: what tells the supervisor its start moves on (touches ``path``, at most once
    a second); does nothing for ``path`` None (not a worker)."""
    if path is None:
        return lambda: None
    last = time.monotonic()

    def moved_on() -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= 1.0:
            last = now
            try:
                os.utime(path)
            except OSError:  # the supervisor is gone, or stopping
                pass
    return moved_on


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def worker_cpus(workers: int, pin: bool) -> list[int | None]:
    """The CPU each worker is pinned to (None: not pinned).

    Pinned only when asked and when every worker gets a CPU of its own among those
    this process may use (a container's cpuset is respected).
    """
    try:
        usable = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = []
    if not pin or workers > len(usable):
        return [None] * workers
    return list(usable[:workers])


def apply_scheduling(policy: str) -> None:
    """Put every thread of this process under ``policy`` (``[server] scheduling``); the
    threads it starts later inherit it. ``"inherit"`` leaves the policy as it is, and so
    does ``"batch"`` for a process started under a policy other than the normal one
    (``SCHED_FIFO``, ``SCHED_IDLE`` …): someone chose that.

    ``SCHED_BATCH`` needs no privilege. Where it is refused (a seccomp filter), the
    process serves on under the policy it has, and says so.
    """
    if policy == "inherit" or not hasattr(os, "SCHED_BATCH"):
        return
    started = os.sched_getscheduler(0)
    if started != os.SCHED_OTHER:
        log.info("server.scheduling: started under scheduling policy %d; keeping it", started)
        return
    try:
        for task in os.listdir("/proc/self/task"):
            try:
                os.sched_setscheduler(int(task), os.SCHED_BATCH, os.sched_param(0))
            except ProcessLookupError:  # a thread that ended meanwhile
                pass
    except OSError as exc:
        log.warning("server.scheduling: cannot run under SCHED_BATCH (%s); serving under the inherited policy",
                    exc.strerror or exc)


def _start_child(cpu: int | None) -> Callable[[], None]:
    def prepare() -> None:
        _die_with_parent()
        # Ctrl-C reaches every process of the group: a worker still importing or logging in
        # would die of a KeyboardInterrupt traceback. Ignored until it serves (gateway.server
        # takes it over then); the supervisor stops the workers itself.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
    return prepare


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) ``host:port`` with SO_REUSEPORT; raises WorkerError if it is taken."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise WorkerError(f"server.listen: cannot resolve {host!r}: {exc.strerror}") from exc
    if port:
        # A plain bind first: a port held by anything else, even a SO_REUSEPORT group, is refused.
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise WorkerError(f"server.listen: cannot listen on {host}:{port}: {exc.strerror}") from exc
    hold = socket.socket(family, socket.SOCK_STREAM)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        hold.bind(address)
    except OSError as exc:
        hold.close()
        raise WorkerError(f"server.listen: cannot listen on {host}:{port}: {exc.strerror}") from exc
    return hold


def worker_metrics_listen(listen: str, index: int) -> str:
    """Worker ``index``'s metrics address: the configured port + index (0 stays 0)."""
    if not listen:
        return listen
    host, _, port = listen.rpartition(":")
    return f"{host}:{int(port) + index}" if int(port) else listen


class Supervisor:
    """Runs and watches the worker processes of one gateway."""

    def __init__(
        self,
        config_path: str,
        config: GatewayConfig,
        workers: int,
        *,
        grace: float = 5.0,
        port_file: str | None = None,
        cli_flags: tuple[str, ...] = (),
        start_timeout: float = 300.0,
    ) -> None:
        if workers < 1:
            raise WorkerError("--workers must be at least 1")
        self.config_path = str(Path(config_path).resolve())
        self.config = config
        self.count = workers
        self.grace = grace
        self.port_file = port_file
        self.cli_flags = cli_flags
        self.start_timeout = start_timeout
        self.port = 0
        self.workers: dict[int, Worker] = {}
        self.cpus = worker_cpus(workers, config.server.pin_workers)
        self._signals = Signals()
        self._stopping: int | None = None  # the signal that stops the gateway
        self._deaths: deque[float] = deque()
        self._in_a_row: dict[int, int] = {}  # worker index -> deaths since it last served a while
        self._restart_at: dict[int, float] = {}  # worker index -> when to start it again
        self._given_up: set[int] = set()  # refused its configuration or PIN: waits for a SIGHUP
        self._retry_given_up = False
        self._dir = Path(tempfile.mkdtemp(prefix="hsmgw-workers-"))
        # Per-identity rate and concurrency limits hold for the gateway, not for each worker. The
        # file is known by its descriptor alone: no cleaner of temporary files can remove it.
        limits = self._dir / "limits"
        sharedlimits.create(limits, workers)
        self.limits_fd = os.open(limits, os.O_RDWR)
        limits.unlink()
        self._hold: socket.socket | None = None

    # -- life cycle -------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status."""
        self._signals.catch(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        try:
            self._hold = reserve_port(self.config.server.host, self.config.server.port)
            self.port = self._hold.getsockname()[1]
            status = self._start_all()
            if self._stopping is not None:  # SIGTERM or Ctrl-C while the workers started: a stop, not a failure
                return 0
            if status:
                return status
            self._write_port_file()
            log.info("serving on %s:%d with %d worker processes (pids %s)%s", self.config.server.host, self.port,
                     self.count, ", ".join(str(w.pid) for w in self.workers.values()),
                     ", one per CPU" if self.cpus[0] is not None else "")
            return self._watch()
        finally:
            self._stop_all()
            if self._hold is not None:
                self._hold.close()
            if self.port_file:  # a stale port file would send the next reader to a closed port
                Path(self.port_file).unlink(missing_ok=True)
            shutil.rmtree(self._dir, ignore_errors=True)
            os.close(self.limits_fd)

    def _on_signals(self, signums: list[int]) -> None:
        """Act on the signals received (``gateway._signals``: never in a handler)."""
        for signum in signums:
            if signum == signal.SIGHUP:
                # Only to workers that serve: one still starting reads the current files anyway.
                for worker in list(self.workers.values()):
                    if worker.proc.poll() is None and worker.port_file.exists():
                        worker.proc.send_signal(signal.SIGHUP)
                self._retry_given_up = True  # the operator may have fixed what they refused
            elif self._stopping is None:
                self._stopping = signum
                log.info("signal %s: stopping %d workers", signal.Signals(signum).name, len(self.workers))

    # -- workers ----------------------------------------------------------------------------

    def _command(self, index: int, port_file: Path) -> list[str]:
        return [
            sys.executable, "-m", "gateway.cli.hsmgw", *self.cli_flags,
            "serve", "--config", self.config_path, "--workers", "1", "--grace", str(self.grace),
            "--port-file", str(port_file), "--worker-index", str(index), "--limits-fd", str(self.limits_fd),
            "--progress-file", str(self._dir / f"worker-{index}.progress"),
            "--listen", f"{self.config.server.listen.rpartition(':')[0]}:{self.port}",
        ]

    def _spawn(self, index: int) -> Worker:
        port_file = self._dir / f"worker-{index}.port"
        port_file.unlink(missing_ok=True)
        progress_file = self._dir / f"worker-{index}.progress"
        progress_file.touch()
        os.utime(progress_file)  # the start is its first sign of progress
        cpu = self.cpus[index]
        proc = subprocess.Popen(self._command(index, port_file), preexec_fn=_start_child(cpu),
                                pass_fds=(self.limits_fd,))
        if cpu is not None:
            log.debug("worker %d (pid %d) runs on CPU %d", index, proc.pid, cpu)
        worker = Worker(index, proc, port_file, progress_file, started=time.monotonic())
        self.workers[index] = worker
        return worker

    def _await_ready(self, workers: list[Worker]) -> int:
        """0 once every worker serves; else the exit status of the first that failed."""
        waiting = list(workers)
        while waiting:
            for worker in list(waiting):
                if worker.port_file.exists():
                    waiting.remove(worker)
                elif worker.proc.poll() is not None:
                    log.info("worker %d exited with %s during start-up", worker.index, worker.proc.returncode)
                    return worker.proc.returncode or 1
            self._on_signals(self._signals.wait(0.05))
            if self._stopping is not None:
                return 1
            for worker in waiting:
                if self._start_silence(worker) > self.start_timeout:
                    raise WorkerError(f"worker {worker.index} showed no progress in its start for "
                                      f"{self.start_timeout:g}s")
        return 0

    def _start_all(self) -> int:
        # Worker 0 alone first: a configuration problem is reported once, by one process.
        status = self._await_ready([self._spawn(0)])
        if status or self.count == 1 or self._stopping is not None:
            return status
        return self._await_ready([self._spawn(i) for i in range(1, self.count)])

    def _watch(self) -> int:
        while True:
            self._on_signals(self._signals.wait(0.2))
            if self._stopping is not None:
                return 0
            now = time.monotonic()
            if self._retry_given_up:
                self._retry_given_up = False
                for index in sorted(self._given_up):
                    log.info("reload: starting worker %d again", index)
                    self._restart_at[index] = now
                self._given_up.clear()
            for index, at in sorted(self._restart_at.items()):
                if at <= now:
                    del self._restart_at[index]
                    self._spawn(index)
            for index, worker in list(self.workers.items()):
                if index in self._restart_at or index in self._given_up:
                    continue
                code = worker.proc.poll()
                if code is None:
                    if worker.serving_since is None and worker.port_file.exists():
                        worker.serving_since = now
                    elif worker.serving_since is not None and now - worker.serving_since >= SERVING_RESETS:
                        self._in_a_row.pop(index, None)
                    if worker.serving_since is None:
                        self._check_start(worker)
                    else:
                        self._check_heartbeat(worker)
                    continue
                status = self._died(worker, code, now)
                if status is not None:
                    return status

    def _start_silence(self, worker: Worker) -> float:
        """Seconds since a starting worker last showed progress (``start_progress``)."""
        try:
            return time.time() - worker.progress_file.stat().st_mtime
        except FileNotFoundError:  # pragma: no cover - made by _spawn, removed with the supervisor's directory
            return time.monotonic() - worker.started

    def _check_start(self, worker: Worker) -> None:
        """Kill a restarted worker whose start shows no progress for ``start_timeout`` (stopped, stuck
        in an HSM login that does not return): the gateway would run a worker short, and say nothing.
        A start that moves on, such as worker 0's reconcile of a large store, is left to finish. Killed
        and logged once: a process in an HSM driver's uninterruptible sleep outlives its SIGKILL for a
        while. Its death counts as any other, and it is started again after the usual pause."""
        if worker.killed:
            return
        silent = self._start_silence(worker)
        if silent > self.start_timeout:
            log.error("worker %d (pid %d) has shown no progress in its start for %.0f s (stopped, or stuck); "
                      "killing it", worker.index, worker.pid, silent)
            worker.killed = True
            worker.proc.kill()

    def _check_heartbeat(self, worker: Worker) -> None:
        """Kill a serving worker whose heartbeat stopped (SIGSTOP, a stuck interpreter): the
        kernel would go on handing it connections that no one answers."""
        try:
            silent = time.time() - worker.port_file.stat().st_mtime
        except FileNotFoundError:  # stopping
            return
        if silent > SILENT:
            log.error("worker %d (pid %d) has not shown a sign of life for %.0f s (stopped or stuck); killing it",
                      worker.index, worker.pid, silent)
            worker.port_file.unlink(missing_ok=True)
            worker.proc.kill()

    def _died(self, worker: Worker, code: int, now: float) -> int | None:
        """Schedule a dead worker's restart, or give it up; the gateway's exit status when it must stop."""
        index = worker.index
        try:  # the calls it had in flight no longer count against its identities' limits
            sharedlimits.forget(self.limits_fd, index)
        except sharedlimits.SharedLimitsError as exc:
            log.error("worker %d: its calls in flight cannot be forgotten (%s); its successor forgets them", index, exc)
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > 60.0:
            self._deaths.popleft()
        serving = [w for w in self.workers.values()
                   if w is not worker and w.index not in self._restart_at and w.index not in self._given_up
                   and w.proc.poll() is None and w.port_file.exists()]
        if code == EXIT_CONFIG:
            self._given_up.add(index)
            log.error("worker %d (pid %d) cannot start: its configuration or PIN was refused (its log says which); "
                      "it is not started again until a reload (SIGHUP) or a restart%s", index, worker.pid,
                      "" if serving else ", and no worker serves: stopping the gateway")
            return None if serving else EXIT_CONFIG
        if not serving and len(self._deaths) >= RESTARTS_PER_MINUTE:
            log.error("workers died %d times within a minute and none serves; stopping the gateway",
                      len(self._deaths))
            return 1
        in_a_row = self._in_a_row[index] = self._in_a_row.get(index, 0) + 1
        pause = min(RESTART_PAUSE_MAX, RESTART_PAUSE * 2 ** (in_a_row - 1))
        self._restart_at[index] = now + pause
        (log.warning if in_a_row == 1 else log.error)(
            "worker %d (pid %d) exited with %s%s; starting it again in %.1f s", index, worker.pid, code,
            f" ({in_a_row} times in a row)" if in_a_row > 1 else "", pause)
        return None

    def _stop_all(self) -> None:
        running = [w for w in self.workers.values() if w.proc.poll() is None]
        for worker in running:
            worker.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + self.grace + STOP_AFTER_GRACE
        for worker in running:
            try:
                worker.proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not stop; killing it", worker.index, worker.pid)
                worker.proc.kill()
                worker.proc.wait()
        if running:
            log.info("stopped %d workers", len(running))

    def _write_port_file(self) -> None:
        if not self.port_file:
            return
        tmp = f"{self.port_file}.tmp"
        with open(tmp, "w") as f:
            f.write(str(self.port))
        os.replace(tmp, self.port_file)


__all__ = ["Supervisor", "WorkerError", "reserve_port", "worker_metrics_listen"]

"""Cluster health: circuit breakers fed by outcomes, plus active probes.

Each cluster has a ``CircuitBreaker``:

- **closed**: requests flow. It opens after ``failures_to_open`` consecutive
  cluster failures, or when the failure rate over the last ``window`` outcomes
  exceeds ``max_failure_rate`` (passive outlier detection: a throttled HSM
  failing every other call is ejected even though it never fails 3 in a row).
- **open**: the router skips the cluster for ``cooldown`` seconds.
- **half-open**: after the cooldown, one trial request (or probe) at a time; a
  success closes the circuit, a failure opens it again.

``HealthMonitor`` probes every cluster on an interval (a cheap call on a pooled
session) so that a dead cluster is noticed without traffic and a recovered one
is readmitted; state changes are logged and reported to a listener (the
gateway maps them to ``grpc.health.v1`` statuses). The clock is injected.

A hung HSM gives no errors to count: its calls just do not return. The
monitor's watchdog looks at every cluster's calls on the same interval, and
while any is past its time (``HsmBackend.hung_calls``) the cluster's circuit
stays open, its probes wait, and requests go to replicas. The calls' own
threads stay inside the module until it answers: at most ``pool_size`` of them.
"""

from __future__ import annotations

import collections
import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping

from router.backend import HsmBackend
from router.errors import ResourceExhausted, RouterError

log = logging.getLogger(__name__)


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


_MINUTE = 60
"""Seconds of outcomes ``ops_per_second`` and ``error_rate`` look back over."""


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failures_to_open: int = 3,
        window: int = 20,
        max_failure_rate: float = 0.3,
        cooldown: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, CircuitState], None] = lambda name, state: None,
    ) -> None:
        self.name = name
        self._failures_to_open = failures_to_open
        self._window: collections.deque[bool] = collections.deque(maxlen=window)
        self._max_failure_rate = max_failure_rate
        self._cooldown = cooldown
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = CircuitState.CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self._changes: list[CircuitState] = []
        # Outcomes of the last minute, counted per second: [second, successes, failures].
        self._recent: collections.deque[list[int]] = collections.deque()
        self._since = clock()

    @property
    def state(self) -> CircuitState:
        # No notification from here: listeners read ``state`` themselves, and the
        # half-open change is reported by the next allow()/record_*().
        with self._lock:
            self._maybe_half_open()
            return self._state

    def _maybe_half_open(self) -> None:
        if self._state is CircuitState.OPEN and self._clock() - self._opened_at >= self._cooldown:
            self._set(CircuitState.HALF_OPEN)

    def _set(self, state: CircuitState) -> None:
        if state is not self._state:
            self._state = state
            self._trial_in_flight = False
            self._changes.append(state)

    def _notify(self) -> None:
        """Tell the listener about state changes, outside the lock (it may look at other breakers)."""
        if not self._changes:  # the common case on the hot path: no lock taken
            return
        while True:
            with self._lock:
                if not self._changes:
                    return
                state = self._changes.pop(0)
            self._on_change(self.name, state)

    def allow(self) -> bool:
        """May a request go to this cluster now? (Claims the trial slot when half-open.)"""
        with self._lock:
            self._maybe_half_open()
            allowed = self._state is CircuitState.CLOSED
            if self._state is CircuitState.HALF_OPEN and not self._trial_in_flight:
                self._trial_in_flight = True
                allowed = True
        self._notify()
        return allowed

    def record_success(self) -> None:
        with self._lock:
            self._note(True)
            self._consecutive = 0
            self._window.append(True)
            if self._state is not CircuitState.CLOSED:
                self._window.clear()
                self._set(CircuitState.CLOSED)
        self._notify()

    def record_failure(self) -> None:
        with self._lock:
            self._note(False)
            self._consecutive += 1
            self._window.append(False)
            if self._state is CircuitState.HALF_OPEN:
                self._open()
            elif self._state is CircuitState.CLOSED:
                failures = self._window.count(False)
                full = len(self._window) == self._window.maxlen
                if self._consecutive >= self._failures_to_open or (
                    full and failures / len(self._window) > self._max_failure_rate
                ):
                    self._open()
        self._notify()

    def _note(self, ok: bool) -> None:
        second = int(self._clock())
        recent = self._recent
        if not recent or recent[-1][0] != second:
            recent.append([second, 0, 0])
            while second - recent[0][0] > _MINUTE:
                recent.popleft()
        recent[-1][1 if ok else 2] += 1

    def _last_minute(self) -> tuple[int, int]:
        """(successes, failures) over the last minute."""
        now = int(self._clock())
        buckets = [b for b in self._recent if now - b[0] <= _MINUTE]
        return sum(b[1] for b in buckets), sum(b[2] for b in buckets)

    def ops_per_second(self) -> float:
        """Outcomes per second over the last minute (requests and probes), or since the breaker
        was made if that is less (a gateway 15 s old shows its rate, not a quarter of it)."""
        with self._lock:
            ok, failed = self._last_minute()
            covered = min(float(_MINUTE), max(1.0, self._clock() - self._since))
        return (ok + failed) / covered

    def error_rate(self) -> float:
        """Share of failed outcomes over the last minute."""
        with self._lock:
            ok, failed = self._last_minute()
        return failed / (ok + failed) if ok + failed else 0.0

    def trip(self) -> None:
        """Open now, whatever the counts say, or restart an open circuit's cooldown.

        For a cluster whose calls hang: they produce no outcomes to count, and a
        half-open trial would only join them.
        """
        with self._lock:
            self._open()
        self._notify()

    def release_trial(self) -> None:
        """A half-open trial ended without a verdict (e.g. a caller error)."""
        with self._lock:
            self._trial_in_flight = False

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._consecutive = 0
        self._window.clear()
        self._set(CircuitState.OPEN)


class HealthMonitor:
    """Probes every cluster on an interval and keeps its breaker up to date."""

    def __init__(
        self,
        backends: Mapping[str, HsmBackend],
        breakers: Mapping[str, CircuitBreaker],
        *,
        interval: float = 1.0,
        probe_timeout: float = 2.0,
    ) -> None:
        self._backends = backends
        self._breakers = breakers
        self._interval = interval
        self._probe_timeout = probe_timeout
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._hung: set[str] = set()
        """Clusters the watchdog found with calls past their time at its last look."""
        self._probing: set[str] = set()
        """Clusters whose probe is under way (a probe in a hung HSM stays here)."""

    def watch_once(self) -> None:
        """Open the circuit of every cluster with calls past their time; log each hang once."""
        for name, backend in self._backends.items():
            count, oldest = backend.hung_calls()
            if count:
                self._breakers[name].trip()
                if name not in self._hung:
                    self._hung.add(name)
                    log.error(
                        "cluster %s: %d PKCS #11 call(s) have not returned for %.1f s (call_timeout %.1f s); "
                        "its circuit stays open and requests go to replicas until they return",
                        name, count, oldest, backend.spec.call_timeout,
                    )
            elif name in self._hung:
                self._hung.discard(name)
                log.warning("cluster %s: its hung PKCS #11 calls have returned", name)

    def probe_once(self, name: str) -> bool:
        breaker = self._breakers[name]
        if name in self._hung:
            return False  # a probe would only wait behind the hung calls, or join them
        try:
            self._backends[name].probe(time.monotonic() + self._probe_timeout)
        except ResourceExhausted:
            return True  # every session busy: the cluster is working, not failing
        except RouterError as exc:
            log.debug("probe of %s failed: %s", name, exc.message)
            breaker.record_failure()
            return False
        breaker.record_success()
        return True

    def start(self) -> None:
        # One thread per cluster: a hung cluster must not delay the others' probes.
        for name in self._backends:
            thread = threading.Thread(target=self._loop, args=(name,), name=f"probe-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        # Its own thread, making no HSM calls: a probe can hang too.
        thread = threading.Thread(target=self._watch, name="hsm-watchdog", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _loop(self, name: str) -> None:
        while not self._stop.wait(self._interval):
            self._probing.add(name)
            try:
                self.probe_once(name)
            except Exception:  # a bug must not end this cluster's probes for good
                log.exception("probe of cluster %s failed unexpectedly", name)
                self._breakers[name].record_failure()
            finally:
                self._probing.discard(name)

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.watch_once()
            except Exception:  # noqa: BLE001 - the watchdog must outlive a bad look
                log.exception("hsm watchdog: looking at the clusters' calls failed")

    def stop(self, until: float | None = None) -> list[str]:
        """Stop probing and watching; wait for the threads until ``until`` (monotonic; by
        default ``probe_timeout + interval`` from now), all against that one deadline.
        Returns the clusters whose probe had not returned by then.

        A probe inside a hung HSM does not return until the HSM answers: its thread (a
        daemon) is left to the process's exit, so a stop waits no longer for several hung
        clusters than for one.
        """
        self._stop.set()
        if until is None:
            until = time.monotonic() + self._probe_timeout + self._interval
        for thread in self._threads:
            thread.join(max(0.0, until - time.monotonic()))
        return sorted(self._probing.copy())  # a copy: a probe may end meanwhile

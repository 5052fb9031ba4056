"""Cluster health: circuit breakers fed by outcomes, plus active probes.

Each cluster has a ``CircuitBreaker``:

- **closed**: requests flow. It opens when the cluster is failing, not when it
  fails some calls (those are retried on another cluster, within the retry budget):

  - **a run of failures**: ``failures_to_open`` (3) cluster failures in a row open
    the circuit of a cluster whose calls were succeeding, as a dead cluster's do at
    once, however little traffic there is. A cluster that already failed some of
    its calls needs a longer run, one that chance would give less than once in
    ``1 / run_chance`` calls (at 30 % failures, 12 in a row): under load a cluster
    failing a minority of calls makes short runs all the time. The share of calls
    it fails is taken over its last ``window`` outcomes while its circuit was
    closed, less the runs that opened it. Not over all its last outcomes: an
    outage's failures (the run that opened the circuit, probes and trials while
    it was not closed) say nothing of how often the cluster fails calls once it
    is back, and would make it need a run of dozens. Nor over the outcomes since
    the circuit last closed only: a cluster failing a minority of calls, whose
    circuit a chance run opened, would then open again on its next short run;
  - **a failure rate**: half or more (``max_failure_rate``) of its outcomes since
    the circuit last changed state failed (of the last ``window`` (100) of them
    at most), once there are at least ``min_calls`` (20). Busy answers
    (throttling) count here, never in a run (they do count in the share of calls
    the run rule weighs): a busy HSM is alive, and is skipped only while it
    refuses most calls.

- **open**: the router skips the cluster for ``cooldown`` seconds. The dispatcher
  may still send it a request when every candidate's circuit is open (its "panic"
  rule): ``answered`` says how likely the cluster is to answer one.
- **half-open**: after the cooldown, one trial request (or probe) at a time; a
  success closes the circuit, a failure opens it again. A success of any request
  or probe closes it, whatever its state.

``HealthMonitor`` probes every cluster on an interval (a cheap call on a pooled
session) so that a dead cluster is noticed without traffic and a recovered one
is readmitted; state changes are logged and reported to a listener (the
gateway maps them to ``grpc.health.v1`` statuses). The clock is injected.

A hung HSM gives no errors to count: its calls just do not return. The
monitor's watchdog looks at every cluster's calls on the same interval, and
while any is past its time (``HsmBackend.hung_calls``) the cluster's circuit
stays open (``trip``: no request is sent there, not even in a panic), its probes
wait, and requests go to replicas. The calls' own threads stay inside the module
until it answers: at most ``pool_size`` of them.
"""

from __future__ import annotations

import collections
import enum
import itertools
import logging
import math
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

LAST_CALLS = 10
"""Outcomes ``answered`` looks at: few, so that a dead cluster soon shows none answered."""


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failures_to_open: int = 3,
        run_chance: float = 1e-6,
        window: int = 100,
        min_calls: int = 20,
        max_failure_rate: float = 0.5,
        cooldown: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, CircuitState, str], None] = lambda name, state, cause: None,
    ) -> None:
        """``failures_to_open``: failures in a row that open the circuit of a cluster whose calls
        were succeeding. ``run_chance``: how unlikely by chance a run must be to open the circuit
        of a cluster that already fails some calls. ``window``, ``min_calls``,
        ``max_failure_rate``: the circuit opens when at least that share of its outcomes since it
        last changed state failed (of the last ``window`` of them at most), with ``min_calls`` of
        them at least; ``window`` also bounds the outcomes the run rule weighs.
        ``cooldown``: seconds an open circuit waits before its trial. ``on_change``: called with
        (name, new state, cause) after each change, outside the lock; ``cause`` names the HSM error
        of the failure that opened the circuit (``record_failure``), ``""`` for every other change."""
        self.name = name
        self._failures_to_open = failures_to_open
        self._log_chance = math.log(run_chance)
        self._window: collections.deque[bool] = collections.deque(maxlen=window)
        """The last outcomes, kept across state changes (``answered`` reads them)."""
        self._fresh = 0
        """Outcomes since the circuit last changed state: the rate looks at no others."""
        self._served: collections.deque[bool] = collections.deque(maxlen=window)
        """The last outcomes recorded while the circuit was closed, less the runs of failures that
        opened it and the busy answers: the share of calls the cluster fails when it is not down
        (``_run_opens``). A busy HSM answered: after a spell of throttling, a dead cluster still
        opens on ``failures_to_open`` in a row."""
        self._min_calls = min_calls
        self._max_failure_rate = max_failure_rate
        self._cooldown = cooldown
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = CircuitState.CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self._held = False
        """Opened by ``trip`` (calls that hang), and not closed since: a success ends it."""
        self._busy = False
        """The last failure was a busy answer (the HSM throttles), not a cluster failure."""
        self._changes: list[tuple[CircuitState, str]] = []
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

    def _set(self, state: CircuitState, cause: str = "") -> None:
        if state is not self._state:
            self._state = state
            self._trial_in_flight = False
            self._fresh = 0
            if state is CircuitState.CLOSED:
                self._held = False  # not on the move to half-open: the trial may hang as well
            self._changes.append((state, cause))

    def _notify(self) -> None:
        """Tell the listener about state changes, outside the lock (it may look at other breakers)."""
        if not self._changes:  # the common case on the hot path: no lock taken
            return
        while True:
            with self._lock:
                if not self._changes:
                    return
                state, cause = self._changes.pop(0)
            self._on_change(self.name, state, cause)

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
            self._fresh += 1
            if self._state is CircuitState.CLOSED:
                self._served.append(True)
            else:
                self._set(CircuitState.CLOSED)
        self._notify()

    def record_failure(self, *, busy: bool = False, cause: str = "") -> None:
        """A cluster failure, or with ``busy`` a busy answer (throttling): the HSM answered, so
        it ends a run of failures, but it counts toward the failure rate. ``cause``: the HSM's
        own error (``CKR_DEVICE_ERROR``…), named to the listener if this failure opens the circuit."""
        with self._lock:
            self._note(False)
            self._consecutive = 0 if busy else self._consecutive + 1
            self._busy = busy
            self._window.append(False)
            self._fresh += 1
            if self._state is CircuitState.HALF_OPEN:
                self._open(cause)
            elif self._state is CircuitState.CLOSED:
                if not busy:
                    self._served.append(False)
                if self._run_opens():
                    # The run was an outage's start, not the share of calls the cluster fails.
                    for _ in range(min(self._consecutive, len(self._served))):
                        self._served.pop()
                    self._open(cause)
                elif self._rate_opens():
                    self._open(cause)
        self._notify()

    def _run_opens(self) -> bool:
        """Is the run of failures that ends now too long to be chance? Short runs come by
        chance from a cluster that fails some calls; the run needed grows with the share of
        its calls that failed before this run, among its last ``window`` outcomes while the
        circuit was closed (``_served``: not an outage's failures, which would make a cluster
        back from one need a run of dozens, but still the failures of a cluster that fails a
        minority of calls and whose circuit a chance run opened: it needs long runs as before)."""
        if self._consecutive < self._failures_to_open:
            return False
        failed = max(0, self._served.count(False) - self._consecutive)
        if not failed:
            return True
        # Few calls say little: the share is taken over at least ``min_calls``.
        share = failed / max(len(self._served) - self._consecutive, self._min_calls)
        if share >= 1.0:
            return False  # the failure rate decides
        return self._consecutive >= self._log_chance / math.log(share)

    def _rate_opens(self) -> bool:
        fresh = min(self._fresh, len(self._window))
        if fresh < self._min_calls:
            return False
        failures = sum(1 for ok in itertools.islice(reversed(self._window), fresh) if not ok)
        return failures >= self._max_failure_rate * fresh

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

    def answered(self) -> int:
        """How many of the cluster's last 10 calls (requests and probes) succeeded; 0 from the
        watchdog's ``trip`` for calls that hang until a success closes the circuit, half-open
        included (a request would only join them, or the trial that may hang too).

        What the dispatcher ranks clusters by when every candidate's circuit is open.
        """
        with self._lock:
            if self._held:
                return 0
            return sum(itertools.islice(reversed(self._window), LAST_CALLS))

    @property
    def busy(self) -> bool:
        """Not closed, and its last failure was a busy answer: the HSM throttles, it is not down."""
        return self._busy and self._state is not CircuitState.CLOSED

    def reopens_in(self) -> float:
        """Seconds until an open circuit lets its trial through (0 when it is not open)."""
        with self._lock:
            if self._state is not CircuitState.OPEN:
                return 0.0
            return max(0.0, self._opened_at + self._cooldown - self._clock())

    def trip(self) -> None:
        """Open now, whatever the counts say, or restart an open circuit's cooldown.

        For a cluster whose calls hang: they produce no outcomes to count, and a
        half-open trial would only join them.
        """
        with self._lock:
            self._open()
            self._busy = False
            self._held = True
        self._notify()

    def release_trial(self) -> None:
        """A half-open trial ended without a verdict (e.g. a caller error)."""
        with self._lock:
            self._trial_in_flight = False

    def _open(self, cause: str = "") -> None:
        self._opened_at = self._clock()
        self._consecutive = 0
        self._fresh = 0
        self._set(CircuitState.OPEN, cause)


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
            breaker.record_failure(cause=self._backends[name].fault_name(exc))
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

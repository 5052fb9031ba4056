"""Dispatch: run an operation on the best cluster that can serve it.

Candidates come in order — the primary, replicas in the gateway's home region,
then replicas in the DR regions — with drained clusters and failed-over regions
moved to the back and clusters whose circuit is open skipped. On a cluster
failure (``ClusterDown``) the same cluster is tried once more (an HSM being
replaced answers the next call), then the next candidate; on ``Throttled`` the
next candidate after a short jittered backoff. Every extra attempt spends from
the retry budget, and no attempt starts after the caller's deadline. Caller
errors are never retried; a cluster that lacks the key's material, or whose
sessions all stayed busy (``SessionsBusy``: load, or calls its HSM does not
answer), passes the request to the next candidate without a verdict on its
health (the health monitor's watchdog judges hung calls). A refusal to unwrap an
EXTERNAL key's record (``WrappedKeyRefused``) is the answer only once every candidate
was asked: while one could not be (its circuit open, its sessions busy, the deadline
or the retry budget spent first), the call is UNAVAILABLE; so is a key some clusters
lack while another that may hold it could not be asked (``KeyOutOfReach``, naming
that cluster).

When every candidate was skipped for its open circuit, or failed, the request is not
refused outright: it goes to the skipped cluster that answered most of its last calls
(``CircuitBreaker.answered``; the "panic" rule of Envoy's load balancer), so that
circuits opened by chance on every cluster, when each fails a minority of calls, do
not refuse every request. Only when none of them answered any of its last calls
(down, or hung) is the request refused at once: RESOURCE_EXHAUSTED with a delay when
a candidate is busy (throttling), else UNAVAILABLE. Every error names a cluster and
its region: the one that could not answer, else the last one tried, else the last
candidate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from router.backend import HsmBackend
from router.errors import (
    AmbiguousKey,
    ClusterDown,
    KeyNotFound,
    KeyOutOfReach,
    RouterError,
    SessionsBusy,
    StaleSession,
    Throttled,
    Unavailable,
    WrappedKeyRefused,
)
from router.health import LAST_CALLS, CircuitBreaker, CircuitState
from router.retry import RetryBudget, backoff

log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E", bound=RouterError)

_ORDERS_KEPT = 4096
"""Candidate lists whose order is remembered; more are sorted again (keys of many shapes)."""

_PANIC_LOG_EVERY = 10.0
"""Seconds between log lines about requests sent to clusters whose circuit is not closed."""

_BUSY_RETRY_AFTER = 0.1
"""Least RetryInfo delay when every candidate is busy (a throttling HSM's own answer's)."""


class Dispatcher:
    def __init__(
        self,
        backends: Mapping[str, HsmBackend],
        *,
        home_region: str,
        region_order: tuple[str, ...],
        breakers: Mapping[str, CircuitBreaker],
        budget: RetryBudget,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.backends = backends
        self.breakers = breakers
        self.budget = budget
        self._home_region = home_region
        self._region_rank = {region: i for i, region in enumerate(region_order)}
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._drained: frozenset[str] = frozenset()
        self._orders: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._failed_over: frozenset[str] = frozenset()
        self.failovers = 0
        self.panics = 0
        """Requests sent to a cluster whose circuit was open, as every candidate's was."""
        self._panic_logged = -_PANIC_LOG_EVERY

    # -- operator switches ----------------------------------------------------

    def set_drained(self, clusters: Iterable[str]) -> None:
        with self._lock:
            self._drained = frozenset(clusters)
            self._orders = {}  # after the switch: see order()

    def set_failed_over(self, regions: Iterable[str]) -> None:
        with self._lock:
            self._failed_over = frozenset(regions)
            self._orders = {}

    @property
    def drained(self) -> frozenset[str]:
        return self._drained

    @property
    def failed_over(self) -> frozenset[str]:
        return self._failed_over

    def avoided(self, name: str) -> bool:
        """Drained, or in a region an operator failed over: use only as a last resort."""
        return name in self._drained or self.backends[name].spec.region in self._failed_over

    def usable(self, name: str) -> bool:
        """Healthy (circuit not open) and not avoided: fit for new keys and copies."""
        return not self.avoided(name) and self.breakers[name].state is not CircuitState.OPEN

    # -- ordering -------------------------------------------------------------------

    def order(self, names: Iterable[str]) -> tuple[str, ...]:
        """Candidates in the order to try them (stable: the primary leads its rank).

        Remembered per candidate list until an operator switch changes: every key of one
        shape has the same list, and sorting it anew cost each request a few µs.
        """
        key = names if isinstance(names, tuple) else tuple(names)
        orders = self._orders  # read before the switches: a switch replaces the dict after setting them
        known = orders.get(key)
        if known is None:
            far = len(self._region_rank)
            known = tuple(sorted(
                (n for n in dict.fromkeys(key) if n in self.backends),
                key=lambda n: (self.avoided(n), self._region_rank.get(self.backends[n].spec.region, far)),
            ))
            if len(orders) >= _ORDERS_KEPT:
                orders.clear()
            orders[key] = known
        return known

    # -- running ----------------------------------------------------------------------

    def run(self, names: Iterable[str], fn: Callable[[HsmBackend], T], deadline: float, what: str) -> tuple[T, str]:
        """Run ``fn`` on the first candidate that succeeds: (result, cluster name)."""
        self.budget.record_request()
        last: RouterError | None = None  # every attempt that did not succeed sets it
        attempts = 0
        skipped: list[str] | None = None  # candidates whose circuit was not closed, in order
        unheard: list[str] | None = None  # candidates skipped or failed as clusters: they may hold what others lack
        missing: KeyNotFound | None = None  # a cluster asked lacks the key's material
        refused: WrappedKeyRefused | None = None  # a cluster asked refused to unwrap the key
        candidates = self.order(names)
        count = len(candidates)
        index = 0
        panic = False
        while True:
            if index < count:
                name = candidates[index]
                breaker = self.breakers[name]
                if not breaker.allow():
                    skipped, unheard = _add(skipped, name), _add(unheard, name)
                    index += 1
                    continue
            else:
                # Every candidate was skipped or failed: ask the skipped one most likely to
                # answer rather than refuse (one attempt, from the budget if not the first).
                if panic or skipped is None or (pick := self._panic_pick(skipped)) is None:
                    break
                panic, name = True, pick
                breaker = self.breakers[name]
                index = candidates.index(name)
            backend = self.backends[name]
            for same_cluster_try in range(2):
                if last is not None:  # not the first attempt
                    if self._clock() >= deadline:
                        _not_the_records_fault(last, what, "the deadline passed before the other clusters, which "
                                                            "may unwrap it, were asked")
                        self._not_missing_for_sure(last, name, what, "the deadline passed")
                        raise last
                    if not self.budget.try_spend():
                        log.warning("retry budget spent; not retrying %s", what)
                        _not_the_records_fault(last, what, "the retry budget is spent: the other clusters, which "
                                                            "may unwrap it, were not asked")
                        self._not_missing_for_sure(last, name, what, "the retry budget is spent")
                        raise last
                attempts += 1
                try:
                    result = fn(backend)
                except (ClusterDown, StaleSession) as exc:
                    # A stale session here outlived the cluster's own repairs (every pooled
                    # session replaced): the HSM's fault, as a replacement in progress is.
                    breaker.record_failure(cause=backend.fault_name(exc))
                    last, unheard = self._at(exc, name), _add(unheard, name)
                    if same_cluster_try == 0 and breaker.allow():
                        continue  # HSM replacement errors clear on retry
                    break
                except Throttled as exc:
                    # Busy, not down: counted toward the failure rate, never as a run of failures.
                    breaker.record_failure(busy=True, cause=backend.fault_name(exc))
                    last, unheard = self._at(exc, name), _add(unheard, name)
                    pause = min(backoff(attempts), max(0.0, deadline - self._clock()))
                    if pause:
                        self._sleep(pause)
                    break
                except (KeyNotFound, AmbiguousKey, SessionsBusy, WrappedKeyRefused) as exc:
                    # This cluster lacks the key's material (moved, or lost) or holds it
                    # twice, or cannot unwrap it, or has no session free: a replica may
                    # still serve. Not the cluster's health. A busy one was not heard: it
                    # may hold what the others lack, or unwrap what they refuse.
                    breaker.release_trial()
                    last = self._at(exc, name)
                    if isinstance(exc, KeyNotFound):
                        missing = missing or exc
                    elif isinstance(exc, WrappedKeyRefused):
                        refused = refused or exc
                    if isinstance(exc, SessionsBusy):
                        unheard = _add(unheard, name)
                    elif unheard is not None and name in unheard:
                        unheard = [n for n in unheard if n != name]  # asked in a panic: heard now
                    break
                except BaseException:
                    # A caller error says nothing about the cluster; a bug must never leave a
                    # half-open circuit waiting for its trial.
                    breaker.release_trial()
                    raise
                breaker.record_success()
                if index or attempts > 1:
                    with self._lock:
                        self.failovers += 1
                return result, name
            if panic:
                break
            index += 1
        if last is None:
            raise self._refusal(skipped or candidates, what)
        if missing is not None and unheard:
            # Not "no such key": a cluster that may hold it (the source of a move, say) could not answer.
            # The error names that cluster, the one to look at, not the one that lacks the key.
            raise KeyOutOfReach(f"no cluster could serve {what}: the clusters asked lack it ({missing.cluster}), "
                                f"and another that may hold it cannot answer now ({unheard[0]})",
                                cluster=unheard[0], region=self._region(unheard[0])) from missing
        if refused is not None and unheard:
            # Not the record's fault for sure: a cluster that may unwrap it could not be asked.
            raise Unavailable(f"no cluster could serve {what}: {refused.message}; another cluster, which may "
                              f"unwrap it, cannot answer now ({unheard[0]})", cluster=unheard[0],
                              region=self._region(unheard[0])) from refused
        if isinstance(last, (Throttled, SessionsBusy, KeyNotFound, AmbiguousKey, WrappedKeyRefused)):
            raise last
        # Chained: the HSM error behind the last failure is the failed call's (its metrics).
        raise Unavailable(f"no cluster could serve {what}: {last.message}", cluster=last.cluster,
                          region=last.region or self._region(last.cluster)) from last

    def _panic_pick(self, skipped: list[str]) -> str | None:
        """The skipped candidate most likely to answer: most successes among its last calls,
        the earlier candidate on a tie; None when none of them answered any (down, or hung)."""
        best, most = None, 0
        for name in skipped:
            answered = self.breakers[name].answered()
            if answered > most:
                best, most = name, answered
        if best is not None:
            with self._lock:
                self.panics += 1
                now = self._clock()
                quiet = now - self._panic_logged >= _PANIC_LOG_EVERY
                if quiet:
                    self._panic_logged = now
            if quiet:
                half_open = self.breakers[best].state is CircuitState.HALF_OPEN
                log.warning("every candidate of a request failed or was skipped for its circuit (skipped: %s): it "
                            "goes to %s, whose circuit is %s but which answered %d of its last %d calls, instead of "
                            "being refused (logged once every %.0f s)", ", ".join(skipped), best,
                            "half-open with its trial under way" if half_open else "open", most, LAST_CALLS,
                            _PANIC_LOG_EVERY)
        return best

    def _refusal(self, skipped: Iterable[str], what: str) -> RouterError:
        """The answer when no candidate could be asked: their circuits are not closed and none is
        likely to answer. Busy HSMs (throttling) are told apart from failing ones: the caller should
        come back shortly, not look elsewhere."""
        names = list(skipped)
        busy = [name for name in names if self.breakers[name].busy]
        if busy:
            soonest = min(busy, key=lambda name: self.breakers[name].reopens_in())
            down = [name for name in names if name not in busy]  # none of their last calls answered, or hung
            if down:
                message = (f"{_clusters(busy)}, which can serve {what}, {_are(busy)} busy "
                           f"({'it' if len(busy) == 1 else f'cluster {soonest}'} takes requests again shortly); "
                           f"{_clusters(down)} {_are(down)} down or hung")
            else:
                message = (f"every cluster that can serve {what} is busy (cluster {soonest} takes requests again "
                           "shortly)")
            return Throttled(message, cluster=soonest, region=self._region(soonest),
                             retry_after=max(_BUSY_RETRY_AFTER, self.breakers[soonest].reopens_in()))
        name = names[-1] if names else ""
        return Unavailable(f"no healthy cluster can serve {what}", cluster=name, region=self._region(name))

    def _not_missing_for_sure(self, last: RouterError | None, name: str, what: str, why: str) -> None:
        """Raise KEY_OUT_OF_REACH for a run cut short after a cluster lacked the key, before
        ``name`` (which may hold it) was asked: NOT_FOUND is only for a key no candidate holds."""
        if isinstance(last, KeyNotFound):
            raise KeyOutOfReach(f"no cluster could serve {what}: the clusters asked lack it ({last.cluster}), and "
                                f"another that may hold it was not asked ({name}): {why}",
                                cluster=name, region=self._region(name)) from last

    def _at(self, exc: E, name: str) -> E:
        """``exc``, naming the cluster it came from if it does not yet: every error that leaves
        here names a cluster (``ErrorInfo``, and the errors metric's label)."""
        if not exc.cluster:
            exc.cluster, exc.region = name, self._region(name)
        return exc

    def _region(self, name: str) -> str:
        backend = self.backends.get(name)
        return backend.spec.region if backend is not None else ""


def _add(names: list[str] | None, name: str) -> list[str]:
    if names is None:
        return [name]
    if name not in names:
        names.append(name)
    return names


def _clusters(names: list[str]) -> str:
    """"cluster a", "clusters a and b", "clusters a, b and c"."""
    if len(names) == 1:
        return f"cluster {names[0]}"
    return f"clusters {', '.join(names[:-1])} and {names[-1]}"


def _are(names: list[str]) -> str:
    return "is" if len(names) == 1 else "are"


def _not_the_records_fault(last: RouterError | None, what: str, why: str) -> None:
    """Raise UNAVAILABLE for a run cut short after a cluster refused an EXTERNAL key's record:
    the clusters not asked may unwrap it, so the record is not known to be at fault (and a
    refusal the router takes as final is remembered against the record: ``router._refused``)."""
    if isinstance(last, WrappedKeyRefused):
        raise Unavailable(f"no cluster could serve {what}: {last.message}; {why}", cluster=last.cluster,
                          region=last.region) from last

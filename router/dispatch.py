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
or the retry budget spent first), the call is UNAVAILABLE.
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
    DeadlineExceeded,
    KeyNotFound,
    KeyOutOfReach,
    RouterError,
    SessionsBusy,
    StaleSession,
    Throttled,
    Unavailable,
    WrappedKeyRefused,
)
from router.health import CircuitBreaker, CircuitState
from router.retry import RetryBudget, backoff

log = logging.getLogger(__name__)

T = TypeVar("T")

_ORDERS_KEPT = 4096
"""Candidate lists whose order is remembered; more are sorted again (keys of many shapes)."""


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
        last: RouterError | None = None
        attempts = 0
        unheard = False  # a candidate was skipped or failed as a cluster: it may hold what others lack
        for index, name in enumerate(self.order(names)):
            breaker = self.breakers[name]
            if not breaker.allow():
                unheard = True
                continue
            backend = self.backends[name]
            for same_cluster_try in range(2):
                if attempts:
                    if self._clock() >= deadline:
                        _not_the_records_fault(last, what, "the deadline passed before the other clusters, which "
                                                            "may unwrap it, were asked")
                        raise last or DeadlineExceeded(f"deadline exceeded for {what}")
                    if not self.budget.try_spend():
                        log.warning("retry budget spent; not retrying %s", what)
                        _not_the_records_fault(last, what, "the retry budget is spent: the other clusters, which "
                                                            "may unwrap it, were not asked")
                        raise last or Unavailable(f"no cluster could serve {what}")
                attempts += 1
                try:
                    result = fn(backend)
                except (ClusterDown, StaleSession) as exc:
                    # A stale session here outlived the cluster's own repairs (every pooled
                    # session replaced): the HSM's fault, as a replacement in progress is.
                    breaker.record_failure()
                    last, unheard = exc, True
                    if same_cluster_try == 0 and breaker.allow():
                        continue  # HSM replacement errors clear on retry
                    break
                except Throttled as exc:
                    breaker.record_failure()
                    last, unheard = exc, True
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
                    last = exc
                    unheard |= isinstance(exc, SessionsBusy)
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
        if last is None:
            raise Unavailable(f"no healthy cluster can serve {what}")
        if isinstance(last, KeyNotFound) and unheard:
            # Not "no such key": a cluster that may hold it (the source of a move, say) could not answer.
            raise KeyOutOfReach(f"no cluster could serve {what}: the clusters asked lack it, and another that may "
                                "hold it cannot answer now", cluster=last.cluster, region=last.region) from last
        if isinstance(last, WrappedKeyRefused) and unheard:
            # Not the record's fault for sure: a cluster that may unwrap it could not be asked.
            raise Unavailable(f"no cluster could serve {what}: {last.message}; another cluster, which may "
                              "unwrap it, cannot answer now", cluster=last.cluster, region=last.region) from last
        if isinstance(last, (Throttled, SessionsBusy, KeyNotFound, AmbiguousKey, WrappedKeyRefused)):
            raise last
        raise Unavailable(f"no cluster could serve {what}: {last.message}", cluster=last.cluster, region=last.region)


def _not_the_records_fault(last: RouterError | None, what: str, why: str) -> None:
    """Raise UNAVAILABLE for a run cut short after a cluster refused an EXTERNAL key's record:
    the clusters not asked may unwrap it, so the record is not known to be at fault (and a
    refusal the router takes as final is remembered against the record: ``router._refused``)."""
    if isinstance(last, WrappedKeyRefused):
        raise Unavailable(f"no cluster could serve {what}: {last.message}; {why}", cluster=last.cluster,
                          region=last.region) from last

"""The engine: find where a key lives, pick a cluster, run the operation.

``Router`` owns the placement cache and one ``HsmBackend`` per cluster. It never
imports grpc: the gateway turns requests into these calls and ``RouterError``s
into statuses. Every call takes an absolute ``deadline`` (``time.monotonic``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from typing import Any, Callable, TypeVar

from router import validation
from router._owner import Liveness, liveness, this_process
from router._refused import RefusedRecords
from router.backend import MARK_AGAIN, MARK_RETRY, HsmBackend, KeyMaterial
from router.cache import PlacementCache
from router.dispatch import Dispatcher
from router.errors import (
    AlreadyExists,
    ClusterDown,
    FailedPrecondition,
    ForeignObjects,
    InternalError,
    InvalidArgument,
    KeyBeingCreated,
    KeyChanged,
    KeyCreationElsewhere,
    KeyNotFound,
    KeyOutOfReach,
    OtherFleet,
    RequestConflict,
    ResourceExhausted,
    RouterError,
    Stopping,
    Throttled,
    Unavailable,
    WrappedKeyRefused,
)
from router.health import CircuitBreaker, CircuitState
from router.model import (
    OPERATION_KEYS,
    KeyAlgorithm,
    KeySpec,
    KeyState,
    KeyStorage,
    KeyUsage,
    Operation,
    Placement,
    ReplicationPolicy,
)
from router.placement.ring import PlacementRing
from router.placement.store import ChangeLog, Conflict, PlacementStore, StoreError, edit_admin_record
from router.retry import RetryBudget

log = logging.getLogger(__name__)

PINS = "pins"
"""The admin record of operators' placements for keys not made yet: key id -> cluster."""
MAX_PINS = 1000
"""Keys placed (``pin``) and not yet created: the pins are one admin record, one placement-store
item (DynamoDB: 400 KB; 1,000 pins of 128-character key ids take about 160 KB)."""

T = TypeVar("T")


RSA_MODULUS_BYTES = {KeyAlgorithm.RSA_2048: 256, KeyAlgorithm.RSA_3072: 384, KeyAlgorithm.RSA_4096: 512}
# OAEP with SHA-256 carries at most k - 2·32 - 2 bytes (RFC 8017, 7.1.1).
RSA_OAEP_MAX_PLAINTEXT = {alg: size - 66 for alg, size in RSA_MODULUS_BYTES.items()}


SINGLE_COPY = ReplicationPolicy(copies=1, require_dr_copy=False)

PUBLIC_KEYS_KEPT = 10_000
"""Public keys read from a cluster and kept in memory (a key id is never reused, so a key's
public key never changes): GetPublicKey then costs the HSM nothing. ~420 bytes each for RSA-2048."""

CLOSE_TIMEOUT = 5.0
"""Seconds ``close`` waits for the clusters' sessions to close (a hung HSM never answers)."""

NO_RECORD = "no record in the placement store names the key"
"""What ``Router.why_kept`` answers for objects whose key id the store has no record of."""

FLEET_REREAD = 60.0
"""Seconds between two reads of the store's fleet id by ``follow_store_fleet``."""
DESTROY_TRIES = 3
"""Times a DestroyKey reads and writes the key's record before it answers "changed meanwhile": a
repair or a move that lands between its read and its write changes where the key is, not that
it is to be destroyed, so it reads the record again and destroys what that names."""
MATERIAL_WAIT = 2.0
"""Seconds a DestroyKey waits at most to read the key's material for its sweep (``_material_to_sweep``)."""
FOREIGN_SEEN = 6 * 3600.0
"""Seconds reconcile takes objects it compared with their key and found not to be the key's for
such without comparing them again (``known_foreign``), so that its next passes compare others."""
FOREIGN_RETRY = 600.0
"""Seconds the repairer leaves a cluster alone for a key, once objects there under the key's id
turned out not to be the key's (``ForeignObjects``, in a repair or a rebalance), before it looks again."""
OTHER_FLEET = "other_fleet"
"""``Router.fleet_check``: the token's fleet marker lists other stores' fleets, not this one's."""
FLEET_UNREAD = "fleet_unread"
"""``Router.fleet_check``: the token's fleet marker, or the store's fleet id, could not be read."""

_RELOAD_AT_LEAST = 1000
"""A refresh re-reads changed keys one by one up to this many (or a tenth of the cache); beyond, it reloads."""

EXTERNAL_STALENESS = 30.0
"""Default of ``Router(external_staleness=)``: seconds an EXTERNAL key is served from a cache
that has not been brought up to date with the store (``[store] external_staleness``)."""

_EXTERNAL = KeyStorage.EXTERNAL
"""For the per-call check: a module global is read in ~20 ns, an enum member (Python 3.11) in ~250."""

_CONFIRMED_KEPT = 10_000
"""EXTERNAL keys whose records were read one by one while the cache was older than
``external_staleness`` (each a read time); beyond, all are forgotten (each is read again on its next call)."""

STORE_RETRY = 1.0
"""Seconds after a failed read of the placement store during which an EXTERNAL key's record is
not read again to confirm it: the call is refused at once, rather than hold a request thread for
the store's timeout (the placement refresh, every 2 s, reads it meanwhile)."""


@dataclass(frozen=True)
class Topology:
    """Regions and clusters as the router sees them."""

    home_region: str
    dr_regions: tuple[str, ...]
    regions: Mapping[str, tuple[str, ...]]
    """Region name → cluster names."""


_STORE_LOG_EVERY = 60.0
"""Seconds between log lines about placement store calls that failed a request."""
_store_log = {"at": float("-inf"), "since": 0}
_store_log_lock = threading.Lock()
"""Guards ``_store_log``: request threads of every Router in the process fail at once when the store does."""


def _fleets_shown(fleets: Sequence[str]) -> str:
    """A token's fleet ids as messages name them: the three latest, and how many more."""
    return ", ".join(fleets[-3:]) + (f" and {len(fleets) - 3} more" if len(fleets) > 3 else "")


def _room_for_pin(pins: dict[str, Any] | None, key_id: str) -> None:
    """FailedPrecondition when placing one more key would take the pins past ``MAX_PINS``."""
    if pins and key_id not in pins and len(pins) >= MAX_PINS:
        raise FailedPrecondition(f"{len(pins)} keys are placed and not yet created, the most the placement store "
                                 "keeps: create them, or take back placements of keys that will not be made "
                                 "(hsmctl keys placed lists them; hsmctl keys release KEY), then place this one")


def _store_down(message: str, exc: StoreError) -> Unavailable:
    """The UNAVAILABLE a request gets when the placement store failed it, and a WARNING with the
    store's own error (a read-only file, throttling, a timeout), at most once a minute a process:
    the caller's message does not name the store."""
    now = time.monotonic()
    with _store_log_lock:  # decided and recorded in one step; the line is written outside
        due = now - _store_log["at"] >= _STORE_LOG_EVERY
        if due:
            more = _store_log["since"]
            _store_log["at"], _store_log["since"] = now, 0
        else:
            _store_log["since"] += 1
    if due:
        log.warning("placement store failed a request (%s): %s%s", message, exc,
                    f" ({more} more since the last such line)" if more else "")
    return Unavailable(message)


def _owned_at(version: int) -> str:
    """This process as the owner of a creation record, with the version its write gives the record."""
    return f"{this_process()}@{version}"


def _owner_now(placement: Placement) -> str:
    """The process a creation record names as making the key, if it wrote the record as it is now;
    "" if not known. A record whose version is not its owner's was written since by a gateway
    that names no owner (an older version's claim during a rolling upgrade): the process it
    names may be gone while that one makes the key."""
    owner, _, version = placement.owner.rpartition("@")
    return owner if version == str(placement.version) else ""


def _counted(objects: dict[str, int]) -> str:
    return ", ".join(f"{count} {kind}" for kind, count in sorted(objects.items()))


def _same_request(earlier: Placement, spec: KeySpec) -> bool:
    """Whether ``spec`` asks for what made ``earlier`` (a retry of its request). Copies left to the
    gateway's policy (0) and the count the key was made with are the same request."""
    if earlier.fingerprint == spec.fingerprint():
        return True
    if spec.copies not in (0, earlier.copies):
        return False
    return earlier.fingerprint in (replace(spec, copies=0).fingerprint(),
                                   replace(spec, copies=earlier.copies).fingerprint())


class _RecordChanged(Exception):
    """``Router._destroy_key``: another writer changed the key's record between its read and its write.
    ``material``: the key's, as that try read it (a move or a repair does not change it)."""

    def __init__(self, conflict: Conflict, material: KeyMaterial | None) -> None:
        super().__init__(str(conflict))
        self.conflict = conflict
        self.material = material


class Router:
    def __init__(
        self,
        topology: Topology,
        backends: Mapping[str, HsmBackend],
        store: PlacementStore,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        creation_grace: float = 30.0,
        fault: Callable[[str], None] = lambda point: None,
        replication: ReplicationPolicy = SINGLE_COPY,
        breaker_cooldown: float = 2.0,
        rescan_interval: float = 60.0,
        on_health_change: Callable[[str, CircuitState, str], None] = lambda name, state, cause: None,
        creates_keys: bool = True,
        external_staleness: float = EXTERNAL_STALENESS,
        retry_budget: float = 0.5,
        adopted_fleet_ids: Iterable[str] = (),
    ) -> None:
        self.topology = topology
        self.creates_keys = creates_keys
        self.backends = dict(backends)
        self.store = store
        self._clock = clock
        self.wall_clock = wall_clock
        self._lock = threading.Lock()
        self._closed = False
        self._creating: set[str] = set()
        """Keys whose creation runs in this process now (what a close cuts off leaves CREATING)."""
        self._unswept: dict[str, tuple[list[str], KeyMaterial | None]] = {}
        """TOKEN keys this process destroyed -> the clusters their records do not name that are
        still to be looked at for a stray copy (``sweep_destroyed``), and the key's material as
        read before it was destroyed (digests only), which what the sweep destroys must be."""
        self._cache = PlacementCache()
        self._public_keys: dict[str, bytes] = {}  # oldest first
        self._public_keys_lock = threading.Lock()
        self._seen_counter = -1
        self._log: ChangeLog | None = None
        self._unread: set[str] = set()
        self.reloads = 0
        """Full reloads of the cache (a store scan each), the one at start included."""
        self.keys_reread = 0
        """Keys re-read because a change log named them."""
        self.rescan_interval = rescan_interval
        self._rescanned = -rescan_interval
        self.external_staleness = external_staleness or float("inf")
        """Seconds an EXTERNAL key is served from the cache since the cache was last known to
        match the store (0: for ever). Its record is what says it is destroyed, as no token
        object goes: past this, each key's record is read again before it is used."""
        self._current_at = -float("inf")
        """When (``clock``) the cache last held every change made to the store before then."""
        self._confirmed: dict[str, float] = {}
        """EXTERNAL keys read again since the cache fell behind: key id -> when."""
        self._store_failed: tuple[float, StoreError] | None = None
        """When (``clock``) the last read of the store failed, and how; None once one succeeds."""
        self._probing = threading.Lock()
        """Held by the one call that reads the store to confirm a key while it is failing."""
        self._refused = RefusedRecords(clock)
        """EXTERNAL key records every cluster refused to unwrap lately: refused again at once."""
        self.replication = replication
        self.creation_grace = creation_grace
        self.breakers = {
            name: CircuitBreaker(name, cooldown=breaker_cooldown, clock=clock, on_change=self._health_changed)
            for name in self.backends
        }
        self._on_health_change = on_health_change
        self.dispatcher = Dispatcher(
            self.backends,
            home_region=topology.home_region,
            region_order=(topology.home_region, *topology.dr_regions,
                          *(r for r in topology.regions if r != topology.home_region and r not in topology.dr_regions)),
            breakers=self.breakers,
            budget=RetryBudget(ratio=retry_budget, clock=clock),
            clock=clock,
        )
        # Called at named points of multi-step changes; tests inject crashes here.
        self._fault = fault
        self.reload()
        self.fleet_id = store.fleet_id()
        """The store's fleet id: written on every token this router puts a key object on, and
        what a token's marker must list before reconcile destroys anything there."""
        self._former_fleet_ids = frozenset(adopted_fleet_ids)
        """Other ids that are this fleet's: ones this process read as the store's before it
        changed (``fleet_check``), and the operator's ``[store] adopted_fleet_ids``. Replaced, never
        changed in place: request threads read it while the repairer's may follow the store."""
        self._fleet_read_at = float("-inf")
        """When ``follow_store_fleet`` last read the store's fleet id."""
        self._foreign: dict[tuple[str, str], float] = {}
        """(key id, cluster) → when the repairer may try a copy there again (``FOREIGN_RETRY``).
        Written under ``_lock``: by the repairer's thread, and by a rebalance's (an admin call's)
        through ``foreign_found``."""
        self._foreign_seen: dict[tuple[str, str], tuple[str, float]] = {}
        """(cluster, key id) → why its objects are not the key's, and when reconcile found it
        (``foreign_objects``). Written under ``_lock``: the periodic reconcile and admin calls."""

    # -- placement cache -------------------------------------------------

    def refresh(self) -> bool:
        """Bring the cache up to date if any process changed the store since the last look.

        Reads only the changed keys where the store keeps a change log (SQLite),
        else rescans, at most every ``rescan_interval`` seconds. Keeps keys made
        by other gateways servable from the cache while the store is unreachable.
        Returns True when anything changed.
        """
        try:
            return self._refresh()
        except StoreError as exc:
            self._store_failed = (self._clock(), exc)
            raise

    def _refresh(self) -> bool:
        started = self._clock()
        counter = self.store.change_counter()
        self._store_failed = None
        if counter == self._seen_counter and not self._unread:
            self._caught_up(started)
            return False
        key_ids = self._log.read() if self._log is not None else None
        if key_ids is None:
            if self._clock() - self._rescanned < self.rescan_interval:
                return False  # no (usable) change log: rescan at most every rescan_interval
            self.reload()
            return True
        # Keys the log named are kept until re-read: a store error half-way loses none.
        self._unread.update(key_ids)
        if len(self._unread) > max(_RELOAD_AT_LEAST, len(self._cache) // 10):
            self.reload()  # a bulk change: one scan beats a read per key
            return True
        for key_id in sorted(self._unread):
            self.reload_key(key_id)
            self._unread.discard(key_id)
            self.keys_reread += 1
        self._seen_counter = counter  # the log covered at least every change up to it
        self._caught_up(started)
        return True

    def _caught_up(self, since: float) -> None:
        """The cache holds every change made to the store before ``since``."""
        self._current_at = since
        if self._confirmed:
            self._confirmed.clear()

    def reload(self) -> None:
        """Load every placement from the store into the cache."""
        started = self._clock()
        counter = self.store.change_counter()
        log = self.store.change_log()  # before the scan: changes made during it show up in its first read
        self._rescanned = started
        cache = PlacementCache(self.store.scan())
        with self._lock:
            before, self._cache = self._cache, cache
            self._seen_counter = counter
            self._log = log
            self._unread = set()
            self.reloads += 1
        self._caught_up(started)
        for placement in before.select(lambda p: p.external and p.state is not KeyState.DESTROYED):
            now = cache.get(placement.key_id)
            if now is None or now.state is KeyState.DESTROYED:
                self._forget_unwrapped(placement.key_id)

    def _remember(self, placement: Placement) -> None:
        """Cache ``placement``. Every path that caches a record comes here, so that a record
        saying an EXTERNAL key the cache had live is destroyed drops the key's unwrapped copies
        (no token object goes, so nothing else tells the sessions), whichever path read it."""
        before = self._cache.get(placement.key_id)
        self._cache.put(placement)
        if placement.state is KeyState.DESTROYED:
            self._gone(before)

    def _forget(self, key_id: str) -> None:
        """Drop the key from the cache (its record is gone), and an EXTERNAL key's unwrapped copies."""
        before = self._cache.get(key_id)
        self._cache.pop(key_id)
        self._gone(before)

    def _gone(self, before: Placement | None) -> None:
        """The key cached as ``before`` is destroyed or gone: a live EXTERNAL key's unwrapped copies go."""
        if before is not None and before.external and before.state is not KeyState.DESTROYED:
            self._forget_unwrapped(before.key_id)

    def placement(self, key_id: str) -> Placement:
        """The key's placement, from the cache (falling back to the store).

        Cached placements carry no creation record (``create_time``,
        ``request_id``, ``fingerprint``): see ``router.cache``.
        """
        placement = self._cache.get(key_id)
        if placement is None:
            validation.key_id(key_id)
            try:
                placement = self.store.get(key_id)
            except StoreError as exc:
                raise _store_down("placement store is unreachable and the key is not cached", exc) from exc
            if placement is None:
                raise KeyNotFound(f"key {key_id!r} not found")
            self._remember(placement)
        return placement

    def cached_keys(self, state: KeyState | None = None) -> int:
        """Cached keys (in ``state``, if given): for metrics, no store scan."""
        return len(self._cache) if state is None else self._cache.count_state(state)

    def _usable(self, key_id: str) -> Placement:
        placement = self.placement(key_id)
        if placement.state is KeyState.DESTROYED:
            raise FailedPrecondition(f"key {key_id!r} is destroyed")
        if placement.storage is _EXTERNAL and self._unconfirmed(key_id):
            placement = self._confirm(key_id)
        if placement.state is KeyState.CREATING:
            # Maybe cached mid-creation by another process's change: look again.
            try:
                self.reload_key(key_id)
            except StoreError as exc:
                raise _store_down(f"placement store is unreachable, and key {key_id!r} was being created when "
                                  "last read", exc) from exc
            fresh = self._cache.get(key_id)
            if fresh is None:  # the creation failed and was rolled back
                raise KeyNotFound(f"key {key_id!r} not found")
            if fresh.state is KeyState.CREATING:
                raise KeyBeingCreated(f"key {key_id!r} is still being created; retry shortly")
            return self._usable(key_id)
        return placement

    def _unconfirmed(self, key_id: str) -> bool:
        """Whether the cache may be more than ``external_staleness`` behind the store for this
        EXTERNAL key: the cache has not been brought up to date since, nor the key read alone."""
        now = self._clock()
        if now - self._current_at < self.external_staleness:
            return False
        read = self._confirmed.get(key_id)
        return read is None or now - read >= self.external_staleness

    def _confirm(self, key_id: str) -> Placement:
        """An EXTERNAL key's record, read again before it is used from a cache that fell behind.

        Nothing on an HSM tells that an EXTERNAL key was destroyed (the cache and the sessions
        hold its material): without its record, it is not used. While the store is failing,
        the record is read by one call at a time, and by none for ``STORE_RETRY`` seconds after
        a failed read: the others are refused at once, so an outage holds at most one request
        thread on the store's timeout, and TOKEN keys keep their threads.
        """
        failed = self._store_failed
        probing = False
        if failed is not None:
            when, error = failed
            if self._clock() - when < STORE_RETRY or not self._probing.acquire(blocking=False):
                raise self._unconfirmable(key_id) from error
            probing = True
        try:
            read_at = self._clock()
            try:
                fresh = self.reload_key(key_id)
            except StoreError as exc:
                self._store_failed = (self._clock(), exc)
                raise self._unconfirmable(key_id) from exc
            self._store_failed = None
        finally:
            if probing:
                self._probing.release()
        if fresh is None:
            raise KeyNotFound(f"key {key_id!r} not found")
        if fresh.state is KeyState.DESTROYED:
            raise FailedPrecondition(f"key {key_id!r} is destroyed")
        if len(self._confirmed) >= _CONFIRMED_KEPT:
            self._confirmed.clear()
        self._confirmed[key_id] = read_at
        return fresh

    def _unconfirmable(self, key_id: str) -> Unavailable:
        return Unavailable(
            f"key {key_id!r} is EXTERNAL, and the placement store has not been read for over "
            f"{self.external_staleness:.0f} s (store.external_staleness): only the key's record tells whether "
            "it was destroyed since, so it is not used until the store answers")

    def reload_key(self, key_id: str) -> Placement | None:
        """Replace one cached placement with the store's, and return it (None: the key is gone)."""
        fresh = self.store.get(key_id)
        if fresh is None:
            self._forget(key_id)
        else:
            self._remember(fresh)
        return fresh

    def _forget_unwrapped(self, key_id: str) -> None:
        """Every cluster drops the key's unwrapped session objects (an EXTERNAL key destroyed)."""
        for backend in self.backends.values():
            backend.forget_key(key_id)

    def key_counts(self) -> dict[str, int]:
        counts = self._cache.counts()
        return {name: counts.get(name, 0) for name in self.backends}

    # -- dispatch ----------------------------------------------------------

    def set_health_listener(self, listener: Callable[[str, CircuitState, str], None]) -> None:
        """Called with (cluster, state, cause) whenever a cluster's circuit changes: ``cause`` is
        the HSM error (``CKR_DEVICE_ERROR``…) of the failure that opened it, ``""`` if none was
        named (hung calls, a failure with no CKR) and for every other change."""
        self._on_health_change = listener

    def _health_changed(self, name: str, state: CircuitState, cause: str) -> None:
        level = logging.INFO if state is CircuitState.CLOSED else logging.WARNING
        log.log(level, "cluster %s: circuit %s%s", name, state.value, f" ({cause})" if cause else "")
        self._on_health_change(name, state, cause)

    def _candidates(self, placement: Placement) -> tuple[str, ...]:
        if placement.external:
            # Any cluster holding the trusted wrapping key can unwrap it.
            return (placement.primary, *self._region_order())
        return placement.clusters

    def _region_order(self) -> list[str]:
        regions = (self.topology.home_region, *self.topology.dr_regions)
        return [name for region in regions for name in self.topology.regions.get(region, ())]

    def _dispatch(
        self, placement: Placement, fn: Callable[[HsmBackend, Placement], T], deadline: float
    ) -> tuple[T, str]:
        """Run on the key's best cluster. If the key's material is missing there, the
        placement may have moved, or the key been destroyed, by another gateway process:
        re-read it once, and retry or say what became of the key."""
        what = f"key {placement.key_id!r}"
        if placement.storage is _EXTERNAL:
            self._refused.check(placement)
        try:
            return self.dispatcher.run(self._candidates(placement), lambda b: fn(b, placement), deadline, what)
        except WrappedKeyRefused as refused:
            # Every cluster asked refused the record, after each unwrapped a key of its own: the
            # record's fault. Its retries are answered without that work for a while.
            self._refused.add(placement, refused)
            raise
        except (KeyNotFound, KeyOutOfReach):
            try:
                fresh = self.store.get(placement.key_id)
            except StoreError as failed:
                raise _store_down(f"{what}: its copies were not found where the placement says, and the "
                                  "placement store cannot be read to look again", failed) from failed
            # Destroyed (or gone) since this process cached it: say so, not "material missing",
            # which a caller could take for a key to make again.
            if fresh is None:
                self._forget(placement.key_id)
                raise KeyNotFound(f"{what} not found") from None
            if fresh.state is KeyState.DESTROYED:
                self._remember(fresh)
                raise FailedPrecondition(f"{what} is destroyed") from None
            if fresh.clusters == placement.clusters or not fresh.usable:
                raise
            self._remember(fresh)
            return self.dispatcher.run(self._candidates(fresh), lambda b: fn(b, fresh), deadline, what)
        finally:
            if placement.storage is _EXTERNAL:
                # A destroy that dropped the key's unwrapped copies while this call ran may have
                # come before the call unwrapped it: then the copy it left is dropped here.
                now = self._cache.get(placement.key_id)
                if now is None or now.state is KeyState.DESTROYED:
                    self._forget_unwrapped(placement.key_id)

    def _any_backend(self, fn: Callable[[HsmBackend], T], deadline: float) -> T:
        result, _ = self.dispatcher.run(self._region_order(), fn, deadline, "the request")
        return result

    # -- operator controls ---------------------------------------------------------

    def apply_switches(self, drained: AbstractSet[str], failed_over: AbstractSet[str]) -> None:
        """Drain exactly ``drained`` and fail over exactly ``failed_over`` (names this gateway does
        not serve are ignored). A drained cluster takes no new keys and serves only when no replica
        can; a failed-over region's traffic goes to replicas elsewhere."""
        drained = set(drained) & set(self.backends)
        failed_over = set(failed_over) & set(self.topology.regions)
        before_drained, before_failed = self.dispatcher.drained, self.dispatcher.failed_over
        if drained != before_drained:
            self.dispatcher.set_drained(drained)
            for cluster in sorted(drained ^ before_drained):
                log.warning("cluster %s %s", cluster, "drained" if cluster in drained else "back in service")
        if failed_over != before_failed:
            self.dispatcher.set_failed_over(failed_over)
            for region in sorted(failed_over ^ before_failed):
                log.warning("region %s %s", region, "failed over" if region in failed_over else "failed back")

    def fail_over_region(self, region: str, failed_over: bool = True) -> None:
        """Move traffic away from a region (to replicas elsewhere) or back."""
        if region not in self.topology.regions:
            raise KeyNotFound(f"no region named {region!r}")
        regions = set(self.dispatcher.failed_over)
        (regions.add if failed_over else regions.discard)(region)
        self.apply_switches(self.dispatcher.drained, regions)

    # -- key lifecycle ----------------------------------------------------

    def generate_key(self, spec: KeySpec, deadline: float) -> Placement:
        validation.key_id(spec.key_id)
        validation.request_id(spec.request_id)
        try:
            pin = self._pin_of(spec.key_id)  # kept until the key is made: a failed creation leaves it for the retry
            made = self._generate(spec, deadline, pin)
        except StoreError as exc:
            raise _store_down("placement store is unreachable; keys cannot be created now", exc) from exc
        self._unpin(made, pin)  # made (by this call or an earlier one): its pin, if any, is used up
        return made

    def _generate(self, spec: KeySpec, deadline: float, pin: str | None = None) -> Placement:
        existing = self._existing(spec)
        if existing is not None:
            return existing
        self._may_create()
        if spec.storage is KeyStorage.EXTERNAL and not spec.extractable:
            raise InvalidArgument("an EXTERNAL key lives wrapped outside the HSM; it cannot be non-extractable")
        if spec.storage is KeyStorage.EXTERNAL and spec.copies > 1:
            raise InvalidArgument("an EXTERNAL key lives wrapped in the placement store, not on clusters: "
                                  "it takes no replication.copies")
        copies = 1 if spec.storage is KeyStorage.EXTERNAL else (spec.copies or self.replication.copies)
        if copies > len(self.backends):
            raise FailedPrecondition(f"replication.copies = {copies}, but this gateway has {len(self.backends)} "
                                     "clusters: a key has at most one copy on each")
        least = self.replication.min_copies if spec.storage is KeyStorage.TOKEN else 1
        if least > 1 and not spec.extractable:
            raise FailedPrecondition(f"a non-extractable key cannot be copied, and this gateway's [replication] "
                                     f"min_copies = {least} places each key it makes on {least} clusters or more: "
                                     "it cannot be made here")
        if copies < least:
            raise FailedPrecondition(f"replication.copies = {copies} is below this gateway's [replication] "
                                     f"min_copies = {least}: each key it makes is placed on {least} clusters or more")
        if copies > 1 and not spec.extractable:
            raise FailedPrecondition(
                f"a non-extractable key cannot be replicated; ask for replication.copies = 1 (policy: {copies})"
            )
        primary, replicas, pinned = self._choose_clusters(spec.key_id, copies, pin,
                                                          needs_room=spec.storage is KeyStorage.TOKEN)
        unsearched: set[str] = set()
        if spec.storage is KeyStorage.TOKEN:
            existing = self._unrecorded_objects(spec, (primary, *replicas), deadline, unsearched)
            if existing is not None:
                return existing
        # Held: rebalance leaves it where the operator put it (rebalance never moves the others).
        held = pinned and spec.storage is KeyStorage.TOKEN and spec.extractable
        intent = Placement(
            key_id=spec.key_id,
            algorithm=spec.algorithm,
            usage=spec.usage,
            state=KeyState.CREATING,
            primary=primary,
            create_time=self.wall_clock(),
            request_id=spec.request_id,
            fingerprint=spec.fingerprint(),
            storage=spec.storage,
            extractable=spec.extractable,
            replicas=replicas,
            copies=copies,
            held=held,
            owner=_owned_at(1),  # the version a new record has
        )
        try:
            self.store.create(intent)
        except Conflict:
            existing = self._existing(spec)
            if existing is not None:
                return existing
            raise AlreadyExists(f"key {spec.key_id!r} already exists") from None
        if held:
            intent = self._unheld_if_taken_back(intent, pin)
        return self._materialise(intent, self._within_claim(deadline), unsearched)

    def _unheld_if_taken_back(self, intent: Placement, pin: str | None) -> Placement:
        """The creation record of a placed key, not held if its placement was taken back (keys
        release) or changed since it was read. Read after the record is written: a release takes
        the placement back before it reads the record, so it either sees this record or this
        sees the placement gone."""
        try:
            if self._pin_of(intent.key_id) == pin:
                return intent
            unheld = self.store.update(replace(intent, held=False, owner=_owned_at(intent.version + 1)))
        except (Conflict, StoreError) as exc:  # changed meanwhile (a DestroyKey): the creation finds out
            log.info("key %s: whether its placement still holds could not be checked (%s)", intent.key_id, exc)
            return intent
        log.warning("key %s: its placement on %s was taken back or changed while it was being created; it is made "
                    "there, not held (rebalance may move it)", intent.key_id, intent.primary)
        return unheld

    def _unrecorded_objects(self, spec: KeySpec, clusters: tuple[str, ...], deadline: float,
                            unsearched: set[str]) -> Placement | None:
        """Before a new key's record is written: refuse to make it where objects under its id
        already are, and no record names them.

        A creation clears what is under its key id on a cluster before it makes the key (an
        earlier attempt's leftovers). Every attempt writes its record before its objects, so
        objects found before there is a record are another application's key, a key made with
        another placement store (a wrong ``[store] url``, an empty table), or, rarely, a copy
        that an earlier creation of this id could not remove after its record was rolled back
        (logged then as a WARNING). Which one only an operator can tell, and clearing them
        could destroy a key: reconcile never does either.
        A chosen cluster that cannot be searched now refuses the creation (UNAVAILABLE, nothing
        made): its HSM busy or failing a moment, the creation could succeed there after all,
        and clear what the search would have found. Except a replica under ``ack-local``: the
        key is made without it, as it would be were the copy to fail (added to ``unsearched``:
        the creation does not copy there, and the repairer, which compares what it finds there
        with the key, copies it later). Returns what ``_existing`` finds if a record appeared meanwhile
        (another attempt made those objects)."""
        for name in clusters:
            backend = self.backends.get(name)
            if backend is None:
                continue
            try:
                found = backend.key_objects(deadline, key_id=spec.key_id).get(spec.key_id)
            except Stopping:
                raise
            except RouterError as exc:
                if name != clusters[0] and self.replication.ack_local:
                    unsearched.add(name)
                    continue
                raise Unavailable(f"cluster {name} could not be searched for objects under key id {spec.key_id!r} "
                                  f"({exc.message}); nothing was made: retry", cluster=name,
                                  region=backend.spec.region) from exc
            if not found:
                continue
            existing = self._existing(spec)  # another attempt, since this one looked
            if existing is not None:
                return existing
            raise FailedPrecondition(
                f"cluster {name} already holds objects under key id {spec.key_id!r} ({_counted(found)}) that no "
                "record in the placement store names: another application's key, one made with another "
                "placement store ([store] url names the wrong store?), or a copy an earlier creation of this id "
                "could not remove. Nothing was made or destroyed; an operator decides what they are "
                "(docs/operations.md, objects no record names)",
                cluster=name, region=backend.spec.region)
        return None

    def _existing(self, spec: KeySpec) -> Placement | None:
        """The key an earlier attempt of this request made; errors for clashes."""
        earlier = self.store.by_request(spec.request_id)
        if earlier is not None:
            if not _same_request(earlier, spec):
                raise RequestConflict(
                    f"request_id {spec.request_id!r} was used for a different key or parameters"
                )
            if earlier.state is KeyState.CREATING:
                self._may_create()  # finishing it here would make objects here
                return self._take_over(earlier)
            self._remember(earlier)
            if earlier.state is KeyState.DESTROYED:
                # Not OK with a key that serves no more: a retry that took it for made would fail later.
                raise KeyChanged(f"key {spec.key_id!r} was made by this request_id and has since been destroyed; "
                                 "key ids are never reused")
            return earlier
        taken = self.store.get(spec.key_id)
        if taken is not None:
            if taken.state is KeyState.DESTROYED:
                raise AlreadyExists(f"key {spec.key_id!r} was destroyed; key ids are never reused")
            raise AlreadyExists(f"key {spec.key_id!r} already exists")
        return None

    def _may_create(self) -> None:
        if not self.creates_keys:
            raise KeyCreationElsewhere(
                f"this gateway ({self.topology.home_region}) does not create keys ([gateway] creates_keys = false): "
                "send GenerateKey to the region that does", region=self.topology.home_region)

    def _take_over(self, intent: Placement) -> Placement:
        """Finish a creation that an earlier attempt (maybe a crashed process) left half-way.

        The claim bumps the record's version (only one taker wins), restarts its clock and
        names this process its owner: for the next ``creation_grace`` seconds other attempts
        are told to retry and reconcile leaves the intent alone, and this attempt gives up
        within half of that. Two attempts never make the key's objects at once, which could
        leave a token with two of each. Within the grace, an intent is taken over only if
        its owner is a process of this host and PID namespace that is gone (killed, crashed):
        nothing makes its objects any more. An owner elsewhere, alive, or not known (a record
        from before owners were recorded) may still be making them.
        """
        now = self.wall_clock()
        gone = False
        if now - intent.create_time < self.creation_grace:
            gone = liveness(_owner_now(intent)) is Liveness.GONE
            if not gone:
                raise KeyBeingCreated(f"key {intent.key_id!r} is being created; retry shortly")
        breaker = self.breakers.get(intent.primary)
        if breaker is not None and breaker.state is CircuitState.OPEN:
            # Its objects are made there and its roll-back needs it: trying would only fail,
            # or join the calls of an HSM that hangs. The intent waits, unclaimed.
            backend = self.backends[intent.primary]
            raise Unavailable(
                f"key {intent.key_id!r}: its creation began on cluster {intent.primary}, which is not serving; "
                "retry with the same request_id once it is",
                cluster=intent.primary,
                region=backend.spec.region,
            )
        try:
            claimed = self.store.update(replace(intent, create_time=now, owner=_owned_at(intent.version + 1)))
        except Conflict as exc:
            return self._settled(exc.existing, intent.key_id, intent.request_id)
        if gone:
            log.warning(
                "key %s: the process that was making it (pid %s) is gone; finishing its creation, begun %.0f s ago "
                "(request %s), without waiting for replication.creation_grace; its objects are made again",
                intent.key_id, _owner_now(intent).split(":")[3], now - intent.create_time, intent.request_id,
            )
        else:
            log.warning(
                "key %s: finishing a creation left unfinished %.0f s ago (request %s); its objects are made again",
                intent.key_id, now - intent.create_time, intent.request_id,
            )
        return self._materialise(claimed, self._within_claim(time.monotonic() + 60.0))

    def _within_claim(self, deadline: float) -> float:
        """A creation attempt ends within half the grace period: past the grace, a retry may claim it."""
        return min(deadline, time.monotonic() + self.creation_grace / 2)

    @staticmethod
    def _settled(current: Placement | None, key_id: str, request_id: str) -> Placement:
        if current is not None and current.state is KeyState.DESTROYED:
            # A DestroyKey came while this key was being made: it is gone, not made.
            raise KeyChanged(f"key {key_id!r} was destroyed while it was being created; key ids are never reused")
        if current is not None and current.request_id != request_id:
            # This attempt outlived its roll-back, and another request made the id since: its key,
            # with its parameters, is not this request's to answer with.
            raise AlreadyExists(f"key {key_id!r} already exists: another request made it while this one's "
                                "creation was rolled back")
        if current is not None and current.state is not KeyState.CREATING:
            return current
        raise KeyBeingCreated(f"key {key_id!r} is being created; retry shortly")

    def _materialise(self, intent: Placement, deadline: float, unsearched: AbstractSet[str] = frozenset()) -> Placement:
        """Make the key's objects on its primary and copy it to its replicas but ``unsearched``
        (left to the repairer: ``_unrecorded_objects``), then enable it."""
        backend = self.backends.get(intent.primary)
        if backend is None:
            raise Unavailable(f"cluster {intent.primary} is not configured on this gateway")
        with self._lock:
            self._creating.add(intent.key_id)
        try:
            return self._make(intent, backend, deadline, unsearched)
        finally:
            with self._lock:
                self._creating.discard(intent.key_id)

    def _make(self, intent: Placement, backend: HsmBackend, deadline: float,
              unsearched: AbstractSet[str] = frozenset()) -> Placement:
        material: dict[str, bytes] = {}
        made = [intent.primary]
        for name in unsearched:
            log.warning("key %s: not copied to %s, which could not be searched for objects under its id; the "
                        "repairer copies it", intent.key_id, name)
        try:
            if intent.external:
                material["wrapped"], material["public_der"] = backend.generate_external(intent, deadline)
            else:
                not_ours = self._not_ours(intent)
                self._mark(backend, deadline)
                backend.generate(intent, deadline, unless=not_ours)
                made += self._replicate(
                    intent, backend, tuple(n for n in intent.replicas if n not in unsearched), deadline,
                    strict=not self.replication.ack_local, unless=not_ours,
                )
        except KeyChanged as changed:
            # The record is no longer this attempt's (it outlived creation_grace in a call that
            # hung): another attempt's key may be on the cluster, so this one stopped, touching
            # nothing there. What it made before is dropped if no record or a destroyed one names
            # it; the caller hears what became of the key.
            self.roll_back(intent)
            try:
                current = self.store.get(intent.key_id)
            except StoreError as failed:
                raise _store_down(f"key {intent.key_id!r} was not finished: its record changed, or could not be "
                                  "read, while it was being made; retry with the same request_id", failed) from changed
            return self._settled(current, intent.key_id, intent.request_id)
        except (InternalError, KeyNotFound) as exc:
            # The HSM failed in a way we did not expect (logged with its traceback), or
            # an object just made was not found again: not the caller's "not found".
            # Creation is idempotent and rolled back, so the caller may simply retry.
            self.roll_back(intent)
            raise Unavailable(
                f"cluster {intent.primary} could not create key {intent.key_id!r}; nothing was created, "
                "retry with the same request_id",
                cluster=intent.primary,
                region=backend.spec.region,
            ) from exc
        except RouterError:
            self.roll_back(intent)
            raise
        self._fault("created-on-hsm")
        if self._closed:  # the store is closed too: the intent stays, for reconcile (close said so)
            raise Stopping(f"the gateway is stopping; key {intent.key_id!r} was not finished, retry with the "
                           "same request_id on another gateway")
        holds = self._policy_holds(intent.copies, made)
        state = KeyState.ENABLED if holds else KeyState.UNDER_REPLICATED
        replicas = tuple(n for n in made if n != intent.primary)
        try:
            enabled = self.store.update(
                replace(
                    intent,
                    state=state,
                    replicas=replicas,
                    wrapped=material.get("wrapped", intent.wrapped),
                    public_der=material.get("public_der", intent.public_der),
                    owner="",  # made: no process makes it any more
                )
            )
        except Conflict as exc:
            if exc.existing is not None and exc.existing.state is KeyState.DESTROYED and not intent.external:
                # DestroyKey's pass over the key's clusters may have come before some of the
                # objects made here: they would outlive the DestroyKey that said it was done.
                self._drop_copies(intent.key_id, made, "creation")
            elif exc.existing is None and not intent.external:
                # This attempt outlived creation_grace (an HSM call that hung), and a sweep or
                # reconcile rolled the creation back meanwhile: no record names what it made.
                self._drop_unrecorded(intent.key_id, made)
            return self._settled(exc.existing, intent.key_id, intent.request_id)
        self._remember(enabled)
        log.info(
            "key %s created on %s (replicas: %s; %s)",
            enabled.key_id, enabled.primary, ", ".join(enabled.replicas) or "none", state.value,
        )
        return enabled

    def _drop_unrecorded(self, key_id: str, clusters: Sequence[str]) -> None:
        """Destroy the objects a creation made on ``clusters`` after its record was removed: no
        record would ever name them, and reconcile leaves objects no record names alone. Each
        cluster's objects are held still while the store is read again, and they stay if a
        record names the key by then (a new creation of the id, which makes its objects only
        after its record)."""
        def recorded() -> bool:
            try:
                return self.store.get(key_id) is not None
            except StoreError:
                return True  # cannot tell: they stay, listed by reconcile as objects no record names

        for name in clusters:
            backend = self.backends.get(name)
            if backend is None:
                continue
            try:
                removed = backend.destroy(key_id, time.monotonic() + 10.0, unless=recorded)
            except RouterError as exc:
                log.warning("creation of %s outlived its roll-back; its copy on %s, which no record names, could "
                            "not be removed (%s): reconcile lists it as an object no record names", key_id, name,
                            exc.message)
                continue
            if removed:
                log.warning("creation of %s outlived its roll-back; its copy on %s, which no record names, is "
                            "destroyed", key_id, name)

    def _not_ours(self, intent: Placement) -> Callable[[], bool]:
        """Whether the key's record is no longer this creation's ``intent``: another attempt took
        it over, or a sweep rolled it back (this one outlived creation_grace in an HSM call that
        hung), or a DestroyKey came. Asked while a cluster's objects are held still, before a
        creation clears what is there under the key's id: they may be the other attempt's key. A
        store that cannot answer says so too: nothing is cleared on a guess."""
        def changed() -> bool:
            try:
                current = self.store.get(intent.key_id)
            except StoreError:
                return True
            return current is None or (current.request_id, current.version) != (intent.request_id, intent.version)

        return changed

    def _replicate(
        self, key: Placement, source: HsmBackend, targets: tuple[str, ...], deadline: float, *, strict: bool,
        unless: Callable[[], bool] | None = None, own_leftovers: bool = False,
        exported: tuple[bytes, bytes] | None = None,
    ) -> list[str]:
        """Copy the key to ``targets`` by trusted wrapping; returns the names copied to.

        ``strict``: the first target that fails ends it with UNAVAILABLE (the
        caller rolls everything back); otherwise failures are logged and skipped.
        ``own_leftovers``: objects already under the key's id on a target are replaced only if
        they are the key's (``HsmBackend.import_wrapped``): for targets that were not searched
        for other objects before the key's record was written (a repair's, a move's). A
        creation's were (``_unrecorded_objects``), and what it finds there is an earlier
        attempt's, with other material. ``exported``: the key's export, made already (else from ``source``).
        """
        if not targets:
            return []
        wrapped, public_der = source.export_wrapped(key, deadline) if exported is None else exported
        self._fault("copy-exported")
        made = []
        for name in targets:
            target, breaker = self.backends.get(name), self.breakers.get(name)
            error: RouterError
            if target is None or breaker is None:
                # A creation another gateway began, naming a cluster this one's config lacks.
                error = Unavailable(f"cluster {name} is not configured on this gateway", cluster=name)
            else:
                try:
                    self._mark(target, deadline)
                    target.import_wrapped(key, wrapped, public_der, deadline, unless=unless,
                                          own_leftovers=own_leftovers)
                except (Stopping, KeyChanged):  # the stop, or another attempt's key there: no more copies
                    raise
                except RouterError as exc:
                    if isinstance(exc, (ClusterDown, Throttled)):
                        # A busy HSM answered.
                        breaker.record_failure(busy=isinstance(exc, Throttled), cause=target.fault_name(exc))
                    error = exc
                else:
                    breaker.record_success()
                    made.append(name)
                    continue
            if strict:
                if isinstance(error, (OtherFleet, ForeignObjects)):
                    raise error  # not a cluster that fails: asking again will not help
                raise Unavailable(
                    f"cannot copy key {key.key_id!r} to cluster {name} ({error.message}); nothing was created",
                    cluster=name,
                    region=target.spec.region if target is not None else "",
                ) from error
            if isinstance(error, ForeignObjects):
                self.foreign_found(key.key_id, name)
                log.error("key %s: not copied to %s: %s; the repairer looks again in %.0f minutes",
                          key.key_id, name, error.message, FOREIGN_RETRY / 60)
                continue
            log.warning("key %s: copy to %s failed (%s); the repairer will retry", key.key_id, name, error.message)
        return made

    def _mark(self, backend: HsmBackend, deadline: float) -> None:
        """Record this store's fleet on the cluster's token before a key object is written there
        (once per process). One that cannot be recorded only means reconcile may later leave that
        token alone, not that the key cannot be made: logged, and the write goes on.

        A token whose marker lists other fleets only refuses the key (``OtherFleet``): marked
        with this store's id too, it would be this store's for its reconcile, which would then
        destroy there what this store's records say is destroyed or abandoned, under key ids
        the other fleet's live keys may have."""
        try:
            backend.mark(self.fleet_id, deadline, also=self._former_fleet_ids)
        except OtherFleet as other:
            try:
                changed = self._store_fleet_changed()
            except StoreError as exc:
                raise _store_down("placement store is unreachable; keys cannot be created now", exc) from exc
            if changed:
                return self._mark(backend, deadline)
            raise OtherFleet(
                f"cluster {backend.name}'s token holds keys made with another placement store (fleet "
                f"{_fleets_shown(other.fleets)}), "
                f"not this store's ({self.fleet_id}): [store] url may name the wrong store. Nothing was made "
                "there. If that fleet is this one (a store rebuilt without its fleet id, two regions' first "
                "gateways each writing one to a new global table), list its id in [store] adopted_fleet_ids",
                fleets=other.fleets, cluster=backend.name, region=backend.spec.region) from None
        except Stopping:
            raise
        except RouterError as exc:
            when = ("the next key" if isinstance(exc, MARK_AGAIN)
                    else f"a key written there {MARK_RETRY / 60:g} minutes from now")
            log.warning("cluster %s: could not record fleet %s on its token (%s); tried again at %s",
                        backend.name, self.fleet_id, exc.message, when)

    def fleet_check(self, name: str, deadline: float) -> tuple[str, str]:
        """Whether cluster ``name``'s token is this store's fleet's, before something is destroyed
        there on the store's word: ("", "") if its fleet marker lists this store's fleet id, or if
        the token has no marker (made before markers); else (``OTHER_FLEET`` or ``FLEET_UNREAD``,
        why). It marks no token of another fleet: a token is marked only when a key is made
        there, so a gateway on the wrong store that only looks (a report-only reconcile) claims
        none. (A token it marked with an id it read as the store's before is given the store's
        id too, below.)

        A marker without the id this process read at start is looked at once more against the
        store's id read again: on a DynamoDB global table, two regions' first gateways may each
        write an id, and the table keeps the last. A token this process marked with the id it
        had read is this store's, and gets the store's id too.

        Key ids are chosen by callers, so two fleets' stores name the same ids: a gateway whose
        ``[store] url`` names another fleet's store would take that store's destroyed keys and
        unfinished creations for those of the keys on these tokens.
        """
        backend = self.backends[name]
        try:
            fleets = backend.fleets(deadline)
        except RouterError as exc:
            return FLEET_UNREAD, f"its fleet marker could not be read ({exc.message})"
        if fleets is None or self.fleet_id in fleets:
            return "", ""
        if not self._former_fleet_ids.isdisjoint(fleets):
            self._mark(backend, deadline)
            return "", ""
        try:
            changed = self._store_fleet_changed()
        except StoreError as exc:
            return FLEET_UNREAD, f"the placement store's fleet id could not be read ({exc})"
        if changed:
            return self.fleet_check(name, deadline)
        return OTHER_FLEET, (f"its keys were made with another placement store: its token lists fleet(s) "
                             f"{_fleets_shown(fleets)}, "
                             f"not this store's {self.fleet_id}; [store] url may name the wrong store")

    def follow_store_fleet(self, deadline: float) -> bool:
        """Read the store's fleet id again, at most once every ``FLEET_REREAD`` seconds; if it is
        not the one this process read (two regions' first gateways on a new DynamoDB global table
        each wrote one, and the table kept the other's), follow it, and add it to the tokens this
        process marked with the one it had read. Else, once this process restarted and read only
        the store's, those tokens would list no id of its fleet, and take no new key. Whether it
        changed; a store that does not answer is left to the next time (the refresh logs it)."""
        now = self._clock()
        if now - self._fleet_read_at < FLEET_REREAD:
            return False
        self._fleet_read_at = now
        try:
            if not self._store_fleet_changed():
                return False
        except StoreError:
            return False
        for name in self.backends:
            self.fleet_check(name, deadline)  # a token that lists the id read before gets the store's
        return True

    def _store_fleet_changed(self) -> bool:
        """Read the store's fleet id again; if it is not the one this process read, follow it
        (the old one stays this fleet's) and say so. On a DynamoDB global table, two regions'
        first gateways may each write an id, and the table keeps the last."""
        stored = self.store.existing_fleet_id()  # only reads: a store whose id is gone gets none from here
        if stored is None or stored == self.fleet_id:
            return False
        log.warning("the placement store's fleet id is %s, not %s as read before (another region's first "
                    "gateway wrote its own): keys are marked with it from now on", stored, self.fleet_id)
        self._former_fleet_ids = self._former_fleet_ids | {self.fleet_id}
        self.fleet_id = stored
        return True

    def _policy_holds(self, copies: int, clusters: list[str] | tuple[str, ...]) -> bool:
        return not self._policy_broken(copies, clusters)

    def _policy_broken(self, copies: int, clusters: list[str] | tuple[str, ...]) -> list[str]:
        """The replication rules ``clusters`` break for a key of ``copies`` copies."""
        broken = []
        if len(set(clusters)) < copies:
            broken.append(f"fewer than the {copies} copies its replication policy asks for")
        if copies > 1 and self.replication.require_dr_copy:
            dr = self.topology.dr_regions
            if not any(self.backends[n].spec.region in dr for n in clusters if n in self.backends):
                broken.append(f"no copy in a DR region ({', '.join(dr)}), which [replication] require_dr_copy "
                              "asks for")
        return broken

    def roll_back(self, intent: Placement, deadline: float | None = None) -> bool:
        """Remove an unfinished creation's objects, then its record.

        The intent is claimed first (a version bump that restarts its clock and names this
        process its owner, so no retry takes it over meanwhile), and only a successful claim
        destroys anything: this attempt may have outlived ``creation_grace`` (a hung HSM call
        that failed late), and a retry that took the creation over may have made and
        acknowledged the key. The primary must be reachable. A replica that is not keeps its
        objects, and the key its record (claimed, so a retry takes it over only after
        ``creation_grace``, or once this process is gone): the
        record goes last, once a search on each cluster after its destroy finds nothing left,
        since objects that no record names are never destroyed (``router.reconcile``: they may
        be another application's). Reconcile rolls the intent back again later. An intent a
        DestroyKey claimed first is not rolled back: the key's copies on its clusters are
        dropped, unless the record, read again, needs them. False (and logged) when the record
        was not removed.
        """
        deadline = time.monotonic() + 10.0 if deadline is None else deadline
        if self._closed:  # its sessions and the store are closed; close() named the key
            log.debug("rollback of %s: the gateway is stopping; left to reconcile", intent.key_id)
            return False
        try:
            # Owned by this process while its objects go: a retry waits for it as for a creation.
            intent = self.store.update(replace(intent, create_time=self.wall_clock(),
                                               owner=_owned_at(intent.version + 1)))
        except Conflict as lost:
            if lost.existing is not None and lost.existing.state is KeyState.DESTROYED and not intent.external:
                # A DestroyKey came meanwhile. Its pass over the key's clusters may have come before
                # copies this creation made: they would outlive the DestroyKey that said it was done.
                self._drop_copies(intent.key_id, intent.clusters, "creation")
                return False
            if lost.existing is None and not intent.external:
                # Another roll-back removed the record meanwhile (this attempt outlived
                # creation_grace): what this attempt made since is named by no record.
                self._drop_unrecorded(intent.key_id, intent.clusters)
                return False
            log.warning("rollback of %s: the creation was taken over or settled meanwhile; nothing destroyed",
                        intent.key_id)
            return False
        except StoreError:
            log.exception("rolling back key %s failed; the reconciler will finish it", intent.key_id)
            return False
        try:
            left: list[str] = []
            for name in intent.clusters:
                backend = self.backends.get(name)
                try:
                    if backend is None:
                        raise Unavailable(f"cluster {name} is not configured here")
                    backend.destroy(intent.key_id, deadline)
                    # A destroy that answered may still have missed objects (a search that saw only
                    # some): the record, the only thing that names them, goes once none is found.
                    remaining = backend.key_objects(deadline, key_id=intent.key_id).get(intent.key_id)
                except RouterError:
                    if name == intent.primary:
                        raise
                    left.append(f"{name} not reached")
                    continue
                if remaining:
                    held = ", ".join(f"{count} {kind}" for kind, count in sorted(remaining.items()))
                    left.append(f"{name} still holds {held}")
            if left:
                log.warning("rollback of %s: %s; the intent stays until reconcile removes what is left there",
                            intent.key_id, "; ".join(left))
                return False
            self.store.delete(intent.key_id, intent.version)
        except Stopping:  # the stop closed the clusters meanwhile; close() named the key
            log.debug("rollback of %s: the gateway is stopping; left to reconcile", intent.key_id)
            return False
        except (RouterError, StoreError, Conflict):
            if self._closed:
                log.debug("rollback of %s: the gateway is stopping; left to reconcile", intent.key_id, exc_info=True)
                return False
            log.exception("rolling back key %s failed; the reconciler will finish it", intent.key_id)
            return False
        return True

    def _choose_clusters(self, key_id: str, copies: int, pin: str | None = None, *, needs_room: bool = True,
                         usable: Callable[[str], bool] | None = None,
                         short: bool = False, what_if: bool = False) -> tuple[str, tuple[str, ...], bool]:
        """Primary and replicas for a new key, and whether the primary is ``pin`` (an
        operator's choice, taken when that cluster can take the key now).

        The primary comes from the home region (the DR regions only once the
        home region is full), by consistent hashing over eligible clusters:
        healthy, not drained, below their key limit. With ``require_dr_copy``,
        one replica goes to a DR region; the rest fill from any region.
        ``usable``: which clusters may take keys, if not the dispatcher's (``creation_blocked``);
        ``short``: return a placement short of the policy instead of failing, as ``ack_local`` does;
        ``what_if``: no key is being placed (``creation_blocked``), so nothing is logged as if one were.
        """
        usable = usable or self.dispatcher.usable
        counts = self.key_counts()
        full = {n for n, b in self.backends.items() if needs_room and counts.get(n, 0) >= b.spec.max_keys}
        home = self.topology.home_region
        dr = self.topology.dr_regions

        def eligible(regions: tuple[str, ...], exclude: set[str]) -> list[str]:
            return [
                name
                for region in regions
                for name in self.topology.regions.get(region, ())
                if name in self.backends and name not in full and name not in exclude and usable(name)
            ]

        primary = None
        if pin is not None:
            if pin not in self.backends or pin in full or not usable(pin):
                log.warning("key %s was placed on %s, which cannot take it now (full, drained, failed over or down); "
                            "placing it as usual", key_id, pin)
            else:
                primary = pin
        pinned = primary is not None
        for region in (home, *dr):
            if primary is not None:
                break
            primary = PlacementRing(eligible((region,), set())).choose(key_id)
            if primary is not None:
                if region != home and not what_if:
                    log.warning("region %s has no room for new keys; placing %s in %s", home, key_id, region)
                break
        if primary is None:
            if full:
                raise ResourceExhausted(
                    f"every cluster is at its key limit ({', '.join(sorted(full))}); add a cluster or destroy keys",
                    region=home,
                )
            kept, switched = self._kept_from_new_keys(
                [n for region in (home, *dr) for n in self.topology.regions.get(region, ())], full)
            if switched:
                raise Unavailable(f"no cluster can take new keys: {'; '.join(kept)}", region=home)
            raise Unavailable("no healthy cluster can take new keys", region=home)

        replicas: list[str] = []
        chosen = {primary}
        if copies > 1 and self.replication.require_dr_copy and self.backends[primary].spec.region not in dr:
            pick = PlacementRing(eligible(dr, chosen)).choose(key_id)
            if pick is not None:
                replicas.append(pick)
                chosen.add(pick)
        everywhere = (home, *dr, *(r for r in self.topology.regions if r != home and r not in dr))
        while len(replicas) < copies - 1:
            pick = PlacementRing(eligible(everywhere, chosen)).choose(f"{key_id}#{len(replicas)}")
            if pick is None:
                break
            replicas.append(pick)
            chosen.add(pick)
        if not self._policy_holds(copies, [primary, *replicas]) and not (self.replication.ack_local or short):
            # The clusters that could have made up the copy missing: any other, or another DR one.
            others = [n for n in self.backends if n not in chosen]
            if len(chosen) >= copies:
                others = [n for n in others if self.backends[n].spec.region in dr]
            kept, switched = self._kept_from_new_keys(others, full)
            why = f"{'; '.join(kept)}, so too few clusters take new keys" if switched else "not enough healthy clusters"
            raise Unavailable(
                f"cannot place {copies} copies of {key_id!r}"
                f"{' with one in a DR region' if self.replication.require_dr_copy else ''}: "
                f"{why}; nothing was created",
                region=home,
            )
        return primary, tuple(replicas), pinned

    def _kept_from_new_keys(self, names: Iterable[str], full: AbstractSet[str]) -> tuple[list[str], bool]:
        """Why each of ``names`` takes no new key now, and whether an operator's switch (a drain, a
        failover) is among the reasons: then it is the cause to name, not the clusters' health."""
        reasons: list[str] = []
        switched = False
        for name in names:
            if name not in self.backends:
                continue
            region = self.backends[name].spec.region
            if name in self.dispatcher.drained:
                reason, switch = f"cluster {name} is drained", True
            elif region in self.dispatcher.failed_over:
                reason, switch = f"region {region} is failed over", True
            elif name in full:
                reason, switch = f"cluster {name} is at its key limit", False
            elif self.breakers[name].state is CircuitState.OPEN:
                reason, switch = f"cluster {name} is not healthy (circuit open)", False
            else:
                continue
            if reason not in reasons:
                reasons.append(reason)
            switched = switched or switch
        return reasons, switched

    def creation_blocked(self, drained: AbstractSet[str], failed_over: AbstractSet[str]) -> str | None:
        """What becomes of new keys under these operator switches, if GenerateKey could not place
        one under the replication policy; None when it could.

        Placement chooses as for a real key (``_choose_clusters``), with every cluster taken as
        healthy and below its key limit: a switch lasts until an operator turns it off, while a
        circuit closes by itself and a full cluster is the keys-near-limit alarm's business.
        """
        def switched_on(name: str) -> bool:
            return name not in drained and self.backends[name].spec.region not in failed_over

        copies = self.replication.copies
        try:
            primary, replicas, _ = self._choose_clusters("hsmgw/creation-check", copies, needs_room=False,
                                                         usable=switched_on, short=True, what_if=True)
        except Unavailable:
            return "no cluster would take new keys: every GenerateKey would fail UNAVAILABLE"
        broken = self._policy_broken(copies, [primary, *replicas])
        if not broken:
            return None
        if self.replication.ack_local:
            return (f"new keys would be acknowledged with {broken[0]} (UNDER_REPLICATED until the switch is turned "
                    "off and the repairer copies them)")
        return (f"new keys cannot be placed, since each would have {broken[0]}: every GenerateKey fails "
                "UNAVAILABLE and creates nothing")

    # -- placement changes (operators) -------------------------------------------------

    def switched_off(self, cluster: str) -> str | None:
        """Why an operator switch keeps new keys and copies off ``cluster`` (it is drained, or
        its region is failed over), or None."""
        if cluster in self.dispatcher.drained:
            return f"cluster {cluster} is drained"
        region = self.backends[cluster].spec.region
        if region in self.dispatcher.failed_over:
            return f"cluster {cluster} is in region {region}, which is failed over"
        return None

    def check_pin(self, key_id: str, cluster: str) -> None:
        """Whether a key that does not exist yet may be placed on ``cluster`` now: it does not exist, and
        the cluster is neither drained nor in a failed-over region (asked again by ``pin``)."""
        validation.key_id(key_id)
        if cluster not in self.backends:
            raise InvalidArgument(f"no cluster named {cluster!r}")
        existing = self._read_for_change(key_id)
        if existing is not None and existing.state is KeyState.DESTROYED:
            raise FailedPrecondition(f"key {key_id!r} is destroyed; key ids are never reused")
        if existing is not None:
            raise FailedPrecondition(f"key {key_id!r} already exists; move it instead (hsmctl keys move)")
        barred = self.switched_off(cluster)
        if barred is not None:
            # Creation would pass the pin over and put the key elsewhere, as if placed there.
            raise FailedPrecondition(f"key {key_id!r} cannot be placed on {cluster}: {barred}, so it takes no keys "
                                     "until an operator puts it back in service")
        _room_for_pin(self.pins(), key_id)

    def pin(self, key_id: str, cluster: str) -> None:
        """Make a key that does not exist yet go to ``cluster`` when it is created, through any
        process of any gateway on this store (the pin is an admin record there)."""
        self.check_pin(key_id, cluster)

        def add(pins: dict[str, Any] | None) -> dict[str, Any]:
            _room_for_pin(pins, key_id)
            return {**(pins or {}), key_id: cluster}

        try:
            edit_admin_record(self.store, PINS, add)
        except StoreError as exc:
            raise _store_down("placement store is unreachable; the placement is not recorded", exc) from exc

    def unpin(self, key_id: str) -> str:
        """Take back the placement of a key that does not exist yet (it is placed as any new key
        when it is created), or one its creation could not clear. The cluster it named;
        FailedPrecondition if there is none (the key was created meanwhile, or it was taken back)."""
        try:
            taken = self._take_pin(key_id)
        except StoreError as exc:
            raise _store_down("placement store is unreachable; the placement was not taken back", exc) from exc
        if taken is None:  # gone since it was looked at
            raise FailedPrecondition(f"key {key_id!r} is not placed: it was created meanwhile (release it again) "
                                     "or its placement was taken back")
        log.info("key %s: its placement on %s taken back", key_id, taken)
        return taken

    def _take_pin(self, key_id: str) -> str | None:
        """Remove the key's pin; the cluster it named, None if it had none. ``StoreError`` as the store raises it."""
        taken: list[str] = []

        def take(pins: dict[str, Any] | None) -> dict[str, Any] | None:
            taken.clear()  # another writer came first: this attempt decides
            if not pins or key_id not in pins:
                return None
            taken[:] = [str(pins[key_id])]
            return {k: v for k, v in pins.items() if k != key_id}

        edit_admin_record(self.store, PINS, take)
        return taken[0] if taken else None

    def pins(self) -> dict[str, str]:
        """The keys placed (``pin``) and not yet created: key id → cluster, by key id."""
        try:
            record = self.store.admin_record(PINS)
        except StoreError as exc:
            raise _store_down("placement store is unreachable; placements cannot be read now", exc) from exc
        return {str(k): str(v) for k, v in sorted((record[0] if record else {}).items())}

    def _pin_of(self, key_id: str) -> str | None:
        """The cluster an operator chose for this new key (``pin``), if any."""
        record = self.store.admin_record(PINS)
        cluster = record[0].get(key_id) if record else None
        return str(cluster) if cluster is not None else None

    def _unpin(self, made: Placement, seen: str | None) -> None:
        """The key is made: its pin is used up (kept, it would place the key again if it were
        destroyed and made anew). One that is not the pin ``seen`` at the start came too late."""
        key_id = made.key_id
        try:
            chosen = self._take_pin(key_id)
        except StoreError as exc:
            log.warning("key %s is made, but its placement could not be cleared (%s); hsmctl keys release takes "
                        "it back", key_id, exc)
            return
        if chosen is not None and chosen != seen and chosen != made.primary:
            log.warning("key %s was placed on %s after its creation had begun; it was made on %s (hsmctl keys move "
                        "puts it there)", key_id, chosen, made.primary)

    def check_move(self, key_id: str, to: str, source: str = "", version: int | None = None) -> tuple[Placement, str]:
        """The key's record and the cluster it would move from, if it may move to ``to`` now;
        else the error the move would end with (asked again when the move runs). With
        ``version``: KeyChanged first if the record is not that version (or is gone)."""
        current = self._read_for_change(key_id)
        if version is not None and (current is None or current.version != version):
            raise KeyChanged(f"key {key_id!r} changed since the move was planned")
        if current is None:
            raise KeyNotFound(f"key {key_id!r} not found")
        if not current.usable:
            raise FailedPrecondition(f"key {key_id!r} is {current.state.value.lower()}")
        if current.external:
            raise FailedPrecondition(f"key {key_id!r} is EXTERNAL: it lives wrapped in the store, not on a cluster")
        if not current.extractable:
            raise FailedPrecondition(f"key {key_id!r} is non-extractable: it never leaves the cluster it was made on, "
                                     "so it cannot be moved")
        if to not in self.backends:
            raise InvalidArgument(f"no cluster named {to!r}")
        source = source or current.primary
        if source not in current.clusters:
            raise FailedPrecondition(f"key {key_id!r} is not on cluster {source!r} (it is on "
                                     f"{', '.join(current.clusters)})")
        if to in current.clusters:
            raise FailedPrecondition(f"key {key_id!r} is already on cluster {to}")
        barred = self.switched_off(to)
        if barred is not None:
            # Placed there, the key would be served from its other copies (the drained cluster
            # only as a last resort), and rebalance would never take a held key off again.
            raise FailedPrecondition(f"key {key_id!r} cannot move to {to}: {barred}, so it takes no keys or "
                                     "copies until an operator puts it back in service")
        # A key short of its policy already (the repairer is on it) may move, but no move breaks a rule anew.
        before = self._policy_broken(current.copies, current.clusters)
        after = self._policy_broken(current.copies, [to if name == source else name for name in current.clusters])
        broken = [rule for rule in after if rule not in before]
        if broken:
            raise FailedPrecondition(f"moving key {key_id!r} from {source} to {to} would leave it with "
                                     f"{broken[0]}; move that copy to a cluster that keeps the policy")
        if self.key_counts().get(to, 0) >= self.backends[to].spec.max_keys:
            raise ResourceExhausted(f"cluster {to} is at its key limit", cluster=to)
        return current, source

    def check_move_objects(self, key_id: str, to: str, deadline: float) -> None:
        """FOREIGN_OBJECTS now if cluster ``to`` holds objects under the key's id that are not the
        key's, which a move there would be refused for when it runs: an admin hears it on asking
        for the move, not from the change's result. Any other failure is left to the move."""
        try:
            current = self.store.get(key_id)
            target = self.backends.get(to)
            if current is not None and target is not None and current.usable and current.extractable:
                target.check_foreign(self.material_of(current, deadline, besides=to), deadline)
        except ForeignObjects:
            raise
        except (RouterError, StoreError) as exc:
            log.info("move of %s to %s: its objects there not checked before the request (%s)", key_id, to, exc)

    def move_key(self, key_id: str, to: str, deadline: float, *, source: str = "", hold: bool = False,
                 version: int | None = None) -> Placement:
        """Copy the key to ``to`` by trusted wrap, prove the copy works, switch, drop the old copy.

        Requests keep succeeding throughout: the old copy serves until the
        mapping switches, and is destroyed only after. ``hold``: an operator's
        move, which rebalance leaves alone from then on (``Placement.held``).
        ``version``: move only the record of that version, else KeyChanged (a planned move;
        every later write is conditional on the version read here).
        """
        current, source = self.check_move(key_id, to, source, version)
        if self.breakers[to].state is CircuitState.OPEN:
            # Named in the record before a copy it cannot take, the target would stay named
            # (its copy cannot be destroyed to undo), and the repairer would copy the key there
            # once it is back: a move reported failed that happened after all.
            raise Unavailable(f"cluster {to} is not answering (its circuit is open); key {key_id!r} was not "
                              "moved, try again once it is back (hsmctl clusters)", cluster=to)
        holders = [n for n in self.dispatcher.order([source, *current.clusters]) if self.dispatcher.usable(n)]
        if not holders:
            raise Unavailable(f"no healthy cluster holds key {key_id!r} to copy it from")
        holder, target = self.backends[holders[0]], self.backends[to]
        # What the target holds under the key's id already must be the key's (an earlier move's
        # leftovers) before the record names it: named, another key there would serve the key's calls.
        wrapped, public_der = holder.export_wrapped(current, deadline)
        material = KeyMaterial.of(current, wrapped, public_der)
        target.check_foreign(material, deadline)
        # The record names the target before the copy is made: a reconcile that lists the
        # target's token meanwhile must see the copy as the key's, not as an orphan to
        # destroy (the key would be lost once the old copy goes). Until the copy exists,
        # a call routed there finds no material and fails over to the key's other clusters;
        # a reconcile that drops the name meanwhile bumps the version, so this move's own
        # update below fails and the move undoes itself (router.reconcile).
        changed = f"key {key_id!r} changed while moving; nothing was changed, try again"
        try:
            pending = self.store.update(replace(current, replicas=(*current.replicas, to)))
        except Conflict:
            if version is not None:  # a planned move: the record is no longer the one planned for
                raise KeyChanged(f"key {key_id!r} changed since the plan; it was not moved") from None
            raise Unavailable(changed) from None
        except StoreError as exc:
            raise _store_down(f"placement store is unreachable; key {key_id!r} was not moved", exc) from exc
        self._remember(pending)
        try:
            self._fault("move-target-named")
            self._replicate(current, holder, (to,), deadline, strict=True, own_leftovers=True,
                            exported=(wrapped, public_der))
            self._prove_copy(current, holder, target, deadline)
            self._fault("moved-copy-proven")
        except RouterError:
            self._undo_move(pending, current, target, material)
            raise
        clusters = [to if name == source else name for name in current.clusters]
        try:
            moved = self.store.update(replace(pending, primary=clusters[0], replicas=tuple(clusters[1:]),
                                              held=pending.held or hold))
        except Conflict as exc:
            landed = exc.existing
            if landed is None or landed.clusters != tuple(clusters):  # else: our own write, answered late
                self._undo_move(pending, current, target, material)
                raise Unavailable(changed) from None
            moved = landed
        except StoreError as exc:
            # The write may have landed: undoing could destroy the copy the record now names,
            # and removing the source the one it still names. Both copies stay; either record
            # is sound, and reconcile removes the copy the record does not name.
            log.warning("move of %s to %s: the store did not confirm the switch (%s); both copies kept",
                        key_id, to, exc)
            raise _store_down(f"placement store is unreachable; whether key {key_id!r} moved to {to} is not "
                              "known: both copies are kept (hsmctl keys show tells; reconcile tidies up)", exc) from exc
        self._remember(moved)
        try:
            self.backends[source].destroy(key_id, deadline)
        except RouterError as exc:
            log.warning("move of %s: old copy on %s not removed (%s); reconcile will", key_id, source, exc.message)
        log.info("key %s moved from %s to %s", key_id, source, to)
        return moved

    def _undo_move(self, pending: Placement, current: Placement, target: HsmBackend, material: KeyMaterial) -> None:
        """A move that failed: the target's copy goes, then the target leaves the record. Only
        the key's own objects go (``material``): what else is there under its id (another key's,
        which the copy refused to clear) stays."""
        key_id = current.key_id
        try:
            target.destroy(key_id, time.monotonic() + 10.0, of=material)
        except ForeignObjects as exc:
            log.warning("move of %s: %s", key_id, exc.message)
        except RouterError as exc:
            log.warning("move of %s: copy on %s not removed (%s); reconcile will", key_id, target.name, exc.message)
            return  # the record keeps naming it: never leave objects the record does not account for
        record = pending
        for _ in range(3):  # another writer may have changed the record since the move named the target
            try:
                self._remember(self.store.update(
                    replace(record, replicas=tuple(r for r in record.replicas if r != target.name))))
                return
            except Conflict:
                try:
                    fresh = self.store.get(key_id)
                except StoreError:
                    break
                if fresh is None or target.name not in fresh.replicas:
                    return  # gone, or no longer named as this move's target
                record = fresh
            except StoreError:
                break
        log.warning("move of %s: %s still named as a replica; reconcile --fix drops the name", key_id, target.name)

    def _prove_copy(self, key: Placement, holder: HsmBackend, target: HsmBackend, deadline: float) -> None:
        """The copy must do what the original does, bit for bit where the math allows."""
        probe = hashlib.sha256(b"hsmgw move probe " + key.key_id.encode()).digest()
        ok: bool
        if key.usage is KeyUsage.SIGN_VERIFY:
            op = next(o for o, (u, algs) in OPERATION_KEYS.items() if u is key.usage and key.algorithm in algs)
            signature = target.sign(key, op, probe, deadline)
            ok = holder.verify(key, op, probe, signature, deadline)
        elif key.algorithm is KeyAlgorithm.AES_256:
            ciphertext, iv = holder.encrypt(key, Operation.AES_GCM, probe, b"move", deadline)
            ok = target.decrypt(key, Operation.AES_GCM, ciphertext, iv, b"move", deadline) == probe
        elif key.algorithm is KeyAlgorithm.HMAC_SHA256:
            ok = holder.mac(key, Operation.HMAC_SHA256, probe, deadline) == target.mac(
                key, Operation.HMAC_SHA256, probe, deadline)
        else:
            ciphertext, _ = holder.encrypt(key, Operation.RSA_OAEP_SHA256, probe, b"", deadline)
            ok = target.decrypt(key, Operation.RSA_OAEP_SHA256, ciphertext, b"", b"", deadline) == probe
        if not ok:
            raise InternalError(f"the copy of key {key.key_id!r} on {target.name} does not match the original")

    def check_release(self, key_id: str) -> Placement | None:
        """The key's record, if it is held (placed or moved by an operator); None if it does not
        exist yet and an operator placed it (``pin``: a release takes the placement back,
        ``unpin``), or exists not held and keeps a placement its creation could not clear; else
        the error a release ends with."""
        current = self._read_for_change(key_id)
        if current is None or current.state is not KeyState.CREATING:
            try:
                placed = self._pin_of(key_id) is not None
            except StoreError as exc:
                raise _store_down("placement store is unreachable; the change cannot be checked now", exc) from exc
            # Not made yet; or made, its placement left by a creation that could not clear it: a
            # held key is released too (``release_key``), any other only loses the placement.
            if placed and (current is None or not current.held):
                return None
        if current is None:
            raise KeyNotFound(f"key {key_id!r} not found (nor placed for its creation)")
        if current.state is KeyState.DESTROYED:
            raise FailedPrecondition(f"key {key_id!r} is destroyed")
        if current.state is KeyState.CREATING:
            raise FailedPrecondition(f"key {key_id!r} is still being created; release it once it is made")
        if not current.held:
            if current.external or not current.extractable:
                kind = "EXTERNAL" if current.external else "non-extractable"
                raise FailedPrecondition(f"key {key_id!r} is not held: it is {kind}, and rebalance never moves it")
            raise FailedPrecondition(f"key {key_id!r} is not held: rebalance already places it")
        return current

    def _read_for_change(self, key_id: str) -> Placement | None:
        try:
            return self.store.get(validation.key_id(key_id))
        except StoreError as exc:
            raise _store_down("placement store is unreachable; the change cannot be checked now", exc) from exc

    def release_key(self, key_id: str) -> Placement:
        """Let rebalance place a held key again (it stays where it is until a rebalance moves it)."""
        for _ in range(3):  # the record may change under us (a repair, another release)
            current = self.check_release(key_id)
            if current is None:
                raise FailedPrecondition(f"key {key_id!r} changed meanwhile (it is not held, or was destroyed); "
                                         "nothing was changed, release it again")
            try:
                released = self.store.update(replace(current, held=False))
            except Conflict:
                continue
            except StoreError as exc:
                raise _store_down("placement store is unreachable; the key was not released", exc) from exc
            self._remember(released)
            log.info("key %s released: rebalance may move it", key_id)
            return released
        raise Unavailable(f"key {key_id!r} kept changing; nothing was changed, try again")

    def plan_rebalance(self) -> list[tuple[str, str, str]]:
        """(key id, from, to) for every key whose primary the ring now puts elsewhere.

        Only keys with their primary in the home region move, between usable
        home-region clusters, so adding a cluster moves about keys/clusters keys.
        """
        return self.plan_of(self.rebalance_moves())

    @staticmethod
    def plan_of(moves: Sequence[tuple[Placement, str]]) -> list[tuple[str, str, str]]:
        """(key id, from, to) for each of ``rebalance_moves()``: what a plan shows and is named by."""
        return [(placement.key_id, placement.primary, target) for placement, target in moves]

    def rebalance_layout(self) -> tuple[str, ...]:
        """The home-region clusters a rebalance places primaries on now (usable: not drained, failed
        over or down). Under the same layout every unchanged key's move is the same."""
        home = self.topology.regions.get(self.topology.home_region, ())
        return tuple(n for n in home if n in self.backends and self.dispatcher.usable(n))

    def rebalance_moves(self, layout: Sequence[str] | None = None) -> list[tuple[Placement, str]]:
        """``plan_rebalance`` with each key's record as the plan read it (its version tells a
        change made since); onto ``layout``, if given, else ``rebalance_layout()``."""
        home = self.topology.regions.get(self.topology.home_region, ())
        ring = PlacementRing(list(self.rebalance_layout() if layout is None else layout))
        moves = []
        for placement in sorted(self.store.scan(), key=lambda p: p.key_id):
            if (placement.external or not placement.extractable or placement.held or not placement.usable
                    or placement.primary not in home):
                continue  # non-extractable keys stay where they were made; held ones where an operator put them
            desired = ring.choose(placement.key_id)
            if desired is not None and desired != placement.primary and desired not in placement.clusters:
                # Even onto a cluster whose objects under the key's id were found not to be the key's:
                # a plan is the same in every process (ApplyRebalance makes it again, and compares), and
                # what this process found is its own; the move keeps the key where it is (_do_rebalance).
                moves.append((placement, desired))
        return moves

    def foreign_found(self, key_id: str, cluster: str) -> None:
        """Objects under the key's id on ``cluster`` are not the key's (a copy there was refused with
        ``ForeignObjects``): for ``FOREIGN_RETRY`` seconds the repairer does not copy the key there."""
        with self._lock:
            self._foreign[(key_id, cluster)] = self._clock() + FOREIGN_RETRY

    # -- repair ------------------------------------------------------------------------

    def short_of_copies(self, placement: Placement) -> bool:
        """A usable token key with fewer copies than its policy: the repairer copies it."""
        return (not placement.external and placement.usable
                and not self._policy_holds(placement.copies, placement.clusters))

    def sweep_intents(self, deadline: float) -> int:
        """Roll back creations left unfinished longer than ``creation_grace``; how many went.

        A creation cut off by a stop or a crash leaves its record CREATING, and calls on the key
        are told to retry shortly (``KeyBeingCreated``). No attempt runs past the grace (each
        ends within half of it), so past it a retry of the request would take the creation over;
        without one, the key would answer "retry shortly" for good. The roll-back claims the
        intent first, so a retry that took it over meanwhile keeps it, as in reconcile. An intent
        that names a cluster whose token is not this store's fleet's (``fleet_check``) is left.
        """
        swept = 0
        now = self.wall_clock()
        checked: dict[str, tuple[str, str]] = {}  # cluster -> its fleet check, once a pass
        for cached in self._cache.select(lambda p: p.state is KeyState.CREATING):
            if self._clock() >= deadline:
                break
            try:
                intent = self.store.get(cached.key_id)  # the cache keeps no create_time
            except StoreError as exc:
                log.warning("unfinished creation of %s not looked at: %s", cached.key_id, exc)
                continue
            if intent is None:
                self._forget(cached.key_id)
                continue
            if intent.state is not KeyState.CREATING:
                self._remember(intent)
                continue
            if now - intent.create_time < self.creation_grace:
                continue
            # Its roll-back destroys the objects under its id on every cluster it names: only on this fleet's.
            refused = []
            for name in intent.clusters:
                if name not in self.backends:
                    continue
                if name not in checked:
                    checked[name] = self.fleet_check(name, deadline)
                    if checked[name][0]:  # once a pass for each cluster, however many intents name it
                        log.error("unfinished creations naming cluster %s are not rolled back: nothing is destroyed "
                                  "on it: %s", name, checked[name][1])
                if checked[name][0]:
                    refused.append(name)
            if refused:
                continue
            if self.roll_back(intent, deadline):
                log.warning("rolled back the creation of %s, left unfinished %.0f s ago (request %s)",
                            intent.key_id, now - intent.create_time, intent.request_id)
                self._forget(intent.key_id)
                swept += 1
        return swept

    def repair_once(self, deadline: float) -> int:
        """Bring under-replicated keys up to their policy; returns how many now meet it."""
        fixed = 0
        if self._foreign:
            now = self._clock()
            with self._lock:
                self._foreign = {where: until for where, until in self._foreign.items() if until > now}
        for placement in self._cache.select(self.short_of_copies):
            if self._clock() >= deadline:
                break
            try:
                fixed += self._repair_key(placement, deadline)
            except (RouterError, StoreError) as exc:
                log.warning("repair of %s failed: %s", placement.key_id, exc)
        return fixed

    def _repair_key(self, cached: Placement, deadline: float) -> bool:
        placement = self.store.get(cached.key_id)  # the whole record: the update writes it back
        if placement is None:
            self._forget(cached.key_id)
            return False
        if placement.version != cached.version:
            self._remember(placement)  # changed elsewhere: the next pass sees the new record
            return False
        holders = [n for n in self.dispatcher.order(placement.clusters) if self.dispatcher.usable(n)]
        if not holders:
            return False
        have = list(placement.clusters)
        dr = self.topology.dr_regions
        home = self.topology.home_region
        regions = (*dr, home) if self.replication.require_dr_copy else (home, *dr)
        targets: list[str] = []
        now = self._clock()
        for name in (n for r in regions for n in self.topology.regions.get(r, ())):
            if self._policy_holds(placement.copies, [*have, *targets]):
                break
            if self._foreign.get((placement.key_id, name), now) > now:
                continue  # not the key's objects there: another cluster, if the policy allows one
            if name in self.backends and name not in have and self.dispatcher.usable(name):
                targets.append(name)
        if not targets:
            return False
        made = self._replicate(placement, self.backends[holders[0]], tuple(targets), deadline, strict=False,
                               own_leftovers=True)
        if not made:
            return False
        self._fault("repair-copied")
        replicas = tuple(dict.fromkeys((*placement.replicas, *made)))
        holds = self._policy_holds(placement.copies, (placement.primary, *replicas))
        state = KeyState.ENABLED if holds else KeyState.UNDER_REPLICATED
        try:
            updated = self.store.update(replace(placement, replicas=replicas, state=state))
        except Conflict:
            self._forget(placement.key_id)
            # Most often a DestroyKey came first: its record does not name these copies, so
            # neither it nor a second DestroyKey would look for them.
            self._drop_copies(placement.key_id, made, "repair")
            return False
        self._remember(updated)
        log.info("key %s repaired: now on %s (%s)", placement.key_id, ", ".join(updated.clusters), state.value)
        return holds

    def why_kept(self, cluster: str, key_id: str, *, claim: bool = False) -> str:
        """Why the key's objects on ``cluster``, which its record did not name when last read,
        may still be the key's; "" if they are not (an orphan's), ``NO_RECORD`` if no record
        names the key at all.

        The record is read again: since then, a move may have named ``cluster`` as its target
        (it does so before it copies), a creation may have begun, or the repairer may be making
        a copy it names only once made. ``claim`` also bumps the record's version when it is
        live, so that a writer that read it before fails and undoes its change rather than
        naming a copy about to be destroyed. A DESTROYED record needs nothing anywhere: it stays
        for good, so its key id is never another key's.
        """
        try:
            current = self.store.get(key_id)  # now, not as the caller last saw it
        except StoreError as exc:
            return f"the placement store cannot say whose it is ({exc})"
        if current is None:
            return NO_RECORD
        if current.state is KeyState.DESTROYED:
            return ""
        if cluster in current.clusters:
            return f"its record names {cluster} now"
        if current.state is KeyState.CREATING:
            return "the key is being created"
        if self.short_of_copies(current):
            return "the key is short of copies, a repair may be making it"
        if claim:
            try:
                self.store.update(current)
            except Conflict:
                return "its record changed just now"
            except StoreError as exc:
                return f"the placement store cannot say whose it is ({exc})"
        return ""

    def _drop_copies(self, key_id: str, clusters: Sequence[str], doing: str) -> None:
        """Destroy the key's objects that this ``doing`` (a repair, a creation) made on ``clusters``
        before its record write lost to another change, unless the record needs them now.

        The change that won is most often a DestroyKey, whose pass over the key's clusters may
        have come before these copies were made: left, a destroyed key's private key would
        outlive the DestroyKey that reported it gone. As for a failed move: no objects that no
        record accounts for, and none that a live record still needs. Each cluster's objects are
        held still while the record is read again (``why_kept``), and only those listed before
        that look go, as in reconcile.
        """
        for name in clusters:
            if name not in self.backends:
                # A creation another gateway began may name a cluster this one's config lacks.
                log.warning("%s of %s lost to another change (a DestroyKey, most often); cluster %s is not "
                            "configured here: a gateway that has it, or reconcile there, removes any copy on it",
                            doing, key_id, name)
                continue
            why = self._drop_copy(key_id, name)
            if why:
                log.info("%s of %s lost to another change; its copy on %s stays: %s", doing, key_id, name, why)
            else:
                log.warning("%s of %s lost to another change (a DestroyKey, most often); its copy on %s is "
                            "destroyed", doing, key_id, name)

    def _drop_copy(self, key_id: str, name: str) -> str:
        """``_drop_copies`` on one cluster: why the objects stayed, or ""."""
        try:
            # Its own deadline, as a failed move's undo: the caller's may be spent, and the copy must go.
            return self.destroy_unless_kept(name, key_id, time.monotonic() + 10.0)
        except ForeignObjects as exc:
            return f"left: {exc.message}"
        except RouterError as exc:
            return f"not removed ({exc.message}); reconcile --fix removes it"

    def destroy_unless_kept(self, name: str, key_id: str, deadline: float) -> str:
        """Destroy the key's objects on cluster ``name``, which its record did not name when last
        read, unless it may still need them: why they stayed (``why_kept``), or "" once destroyed.

        The record is read and claimed again while the token's objects are held still for this
        host's processes (``HsmBackend.destroy(unless=…)``): no creation, move or repair run here
        can make the key's objects between that look and the destroy. Only objects listed before
        the look go: a gateway on another host that copies the key there after the claim read the
        claimed record, and its copy stays. Raises the cluster's ``RouterError`` if the destroy
        itself failed.

        The objects under a live key's id must be its own material (``material_of``), else
        ``ForeignObjects`` and nothing is destroyed: leftovers of its moves and copies are, and
        another application's key under the same id, on a cluster the key was never searched
        for, is not. A live key whose objects ``why_kept`` keeps as its record reads now is not
        asked for its material: they stay. On a cluster its record does not name, a destroyed key
        that was never copied (EXTERNAL, non-extractable) has no objects, and another destroyed
        key's are compared with the material its record keeps (``Placement.destroyed_material``).
        Only a destroyed key's whose record keeps none (read too late, or destroyed by an older
        version) and an unknown key's are destroyed without a comparison (the look under the
        lock keeps an unknown key's).
        """
        why: list[str] = []

        def keep() -> bool:
            why[:] = [self.why_kept(name, key_id, claim=True)]
            return bool(why[0])

        try:
            current = self.store.get(key_id)
        except StoreError as exc:
            return f"the placement store cannot say whose it is ({exc})"  # as ``why_kept`` says it
        material = None
        if current is not None and current.state is not KeyState.DESTROYED:
            kept = self.why_kept(name, key_id)
            if kept:
                return kept
        if current is not None:
            material = self._material_elsewhere(current, name, deadline)
        self.backends[name].destroy(key_id, deadline, unless=keep, of=material)
        return why[0] if why else ""

    def _material_elsewhere(self, current: Placement, name: str, deadline: float) -> KeyMaterial | None:
        """What the objects under the key's id on cluster ``name`` must be to be the key's
        (``destroy_unless_kept``): a live key's material as a holder other than ``name`` exports it
        (``material_of``, which raises when none can), a destroyed key's as its record keeps it;
        None when nothing is known to compare them with (a destroyed key that its record names
        there, or whose record keeps no digests)."""
        if current.state is not KeyState.DESTROYED:
            return self.material_of(current, deadline, besides=name)
        if name in current.clusters:
            return None
        never_copied = current.external or not current.extractable
        return KeyMaterial.never_copied(current) if never_copied else KeyMaterial.recorded(current)

    def foreign_objects(self, name: str, key_id: str, deadline: float) -> str:
        """Why the objects under the key's id on cluster ``name``, which its record does not name
        and ``why_kept`` just did not keep (the caller asked it), are not the key's
        (``ForeignObjects``' message: another application's key under that id), or "" when they are
        its own (a move's source, a cut-off copy) or could not be compared with it (logged at INFO).
        Changes nothing: reconcile reports such objects apart from orphans, since no fix destroys
        them. A copy made there since (a move's, a repair's) is the key's, and compares so."""
        try:
            current = self.store.get(key_id)
            backend = self.backends.get(name)
            if current is None or backend is None:
                return ""
            material = self._material_elsewhere(current, name, deadline)
            if material is None:
                return ""
            backend.check_foreign(material, deadline)
        except Stopping:
            raise
        except ForeignObjects as exc:
            if current is not None and current.state is not KeyState.DESTROYED:  # a destroyed one's: compared
                with self._lock:  # where they would be destroyed anyway (finish_destroys)
                    if len(self._foreign_seen) >= 10_000:  # another application's keys by the thousand: afresh
                        self._foreign_seen = {}
                    self._foreign_seen[(name, key_id)] = (exc.message, self._clock())
            return exc.message
        except (RouterError, StoreError) as exc:
            log.info("objects under key id %r on %s not compared with the key: %s", key_id, name,
                     exc.message if isinstance(exc, RouterError) else exc)
            return ""
        with self._lock:  # the key's own: whatever was found there before is gone
            self._foreign_seen.pop((name, key_id), None)
        return ""

    def forget_foreign(self, listed: Mapping[str, AbstractSet[str]]) -> None:
        """Forget what ``foreign_objects`` found on the clusters of ``listed`` (cluster → the key ids
        with objects there now) under the ids no longer there: those objects are gone, and what
        appears under such an id later is compared afresh."""
        with self._lock:
            self._foreign_seen = {(name, key_id): seen for (name, key_id), seen in self._foreign_seen.items()
                                  if name not in listed or key_id in listed[name]}

    def known_foreign(self, name: str, key_id: str) -> str:
        """Why the objects under the key's id on cluster ``name`` are not the key's, as
        ``foreign_objects`` found in the last ``FOREIGN_SEEN`` seconds; "" if it did not."""
        with self._lock:
            seen = self._foreign_seen.get((name, key_id))
        return seen[0] if seen is not None and self._clock() - seen[1] < FOREIGN_SEEN else ""

    def material_of(self, key: Placement, deadline: float, *, besides: str = "") -> KeyMaterial:
        """What a live key's objects are (``HsmBackend.destroy(of=…)``), read from a cluster that
        holds it other than ``besides``. An EXTERNAL key never has objects on a token, and a
        non-extractable one none beyond its cluster: no object matches what is returned for
        them. UNAVAILABLE when no cluster holding the key can export it."""
        if key.external or not key.extractable:
            return KeyMaterial.never_copied(key)
        failed: list[str] = []
        for holder in self.dispatcher.order(n for n in key.clusters if n != besides):
            backend = self.backends.get(holder)
            if backend is None:
                continue
            try:
                wrapped, public_der = backend.export_wrapped(key, deadline)
            except Stopping:
                raise
            except RouterError as exc:
                failed.append(f"{holder}: {exc.message}")
                continue
            return KeyMaterial.of(key, wrapped, public_der)
        asked = "; ".join(failed) or "none of them is configured here"
        where = self.backends.get(besides)
        raise Unavailable(f"key {key.key_id!r}'s material could not be read from its clusters ({asked}) to compare "
                          "with the objects under its id elsewhere; nothing was changed there", cluster=besides,
                          region=where.spec.region if where is not None else "")

    def get_key(self, key_id: str) -> Placement:
        """The key's whole record, from the store (the cache's copy lacks the creation record);
        the cached placement when the store cannot answer."""
        validation.key_id(key_id)
        try:
            placement = self.store.get(key_id)
        except StoreError:
            return self.placement(key_id)
        if placement is None:
            raise KeyNotFound(f"key {key_id!r} not found")
        return placement

    def list_keys(self, prefix: str, page_size: int, page_token: str) -> tuple[list[Placement], str]:
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        if page_token and not (validation.is_key_id(page_token) and page_token.startswith(prefix)):
            # A token is the last key id of a page of this prefix: anything else would silently
            # skip the keys that sort before it.
            raise InvalidArgument("page_token is not one a listing of this prefix returned; list again without it")
        size = min(page_size or 100, 1000)
        try:
            page = self.store.list(prefix=prefix, after=page_token, limit=size + 1)
        except StoreError as exc:
            raise _store_down("placement store is unreachable", exc) from exc
        more = len(page) > size
        page = page[:size]
        return page, (page[-1].key_id if more else "")

    def destroy_key(self, key_id: str, deadline: float) -> Placement:
        tries, material = 1, None
        while True:
            try:
                return self._destroy_key(key_id, deadline, material)
            except _RecordChanged as exc:
                material = exc.material  # read once: it can take MATERIAL_WAIT
                if tries == DESTROY_TRIES or time.monotonic() >= deadline:
                    raise Unavailable(f"key {key_id!r} kept changing (a move or a repair); nothing was destroyed, "
                                      "try again") from exc.conflict
                tries += 1
                log.info("key %s changed while being destroyed (a move or a repair): destroying it as it is now",
                         key_id)

    def _destroy_key(self, key_id: str, deadline: float, material: KeyMaterial | None) -> Placement:
        """``destroy_key``, once: ``_RecordChanged`` when another writer changed the record (not by
        destroying it) between its read and its write; nothing was destroyed then. ``material``:
        the key's, read by an earlier try (else read here)."""
        # From the store, not the cache: another gateway may have moved the key,
        # and every cluster that holds it must lose it.
        try:
            placement = self.store.get(validation.key_id(key_id))
        except StoreError as exc:
            raise _store_down("placement store is unreachable; keys cannot be destroyed now", exc) from exc
        if placement is None:
            raise KeyNotFound(f"key {key_id!r} not found")
        if not placement.external:
            self._our_tokens(placement, deadline)
        # The record says DESTROYED before any object goes: from then on nothing serves,
        # moves or copies the key (a change that read the record before fails on its
        # version), and whatever copy cannot be removed now is an orphan for reconcile.
        # The other way round, a failure half-way left a usable record without material.
        destroyed = placement
        material = material or self._material_to_sweep(placement, deadline)
        # A record destroyed by an earlier version may still hold an EXTERNAL key's material.
        if placement.state is not KeyState.DESTROYED or placement.wrapped or placement.public_der:
            elsewhere = [name for name in placement.clusters if name not in self.backends]
            if elsewhere and placement.state is not KeyState.DESTROYED:
                raise Unavailable(f"key {key_id!r} is also on {', '.join(elsewhere)}, not configured here; "
                                  "destroy it through a gateway that has every cluster of the key")
            try:
                # Nothing is left to place: the record does not stay "held" by an operator either.
                # Nor does it keep an EXTERNAL key's material: whoever reads the store and holds a
                # cluster's PIN could unwrap the wrapped key and use it. It keeps the digests of a
                # copyable key's material, which unwrap nothing: this process's sweep may die with
                # it, and a reconcile that finishes the destroy compares what it finds with them.
                destroyed = self.store.update(replace(placement, state=KeyState.DESTROYED, held=False,
                                                      wrapped=b"", public_der=b"",
                                                      destroyed_material=material.digests if material else b""))
            except StoreError as exc:
                raise _store_down("placement store is unreachable; keys cannot be destroyed now", exc) from exc
            except Conflict as exc:
                try:
                    self.reload_key(key_id)
                except StoreError as failed:
                    raise _store_down("placement store is unreachable; keys cannot be destroyed now",
                                      failed) from failed
                if exc.existing is None or exc.existing.state is not KeyState.DESTROYED:
                    raise _RecordChanged(exc, material) from exc
                destroyed = exc.existing  # another DestroyKey came first: finish it with it
                material = material or KeyMaterial.recorded(destroyed)
        # An EXTERNAL key's sessions drop what they unwrapped before their next call (no token
        # object goes, so nothing else tells them); other processes' do when they read the record.
        self._remember(destroyed)
        left = []  # a destroyed key's objects are removed again on every DestroyKey: the call is idempotent
        # An EXTERNAL key has no token objects: it needs no cluster to be destroyed, not even its primary.
        for name in () if destroyed.external else destroyed.clusters:
            backend = self.backends.get(name)
            try:
                if backend is None:
                    raise Unavailable(f"cluster {name} is not configured here")
                backend.destroy(key_id, deadline)
            except RouterError as exc:
                log.warning("key %s destroyed, but its objects on %s are not removed yet: %s", key_id, name,
                            exc.message)
                left.append(name)
        others = [name for name in self.backends if name not in destroyed.clusters]
        # An EXTERNAL key never has token objects, and a non-extractable one none but where it was
        # made: what is under their ids elsewhere is another key's.
        if others and not destroyed.external and destroyed.extractable:
            with self._lock:
                self._unswept[key_id] = (others, material)
        if left:
            raise Unavailable(f"key {key_id!r} is destroyed and serves no more, but its objects on "
                              f"{', '.join(left)} could not be removed now: call DestroyKey again, or "
                              "reconcile --fix removes them")
        log.info("key %s destroyed", key_id)
        return destroyed

    def _material_to_sweep(self, placement: Placement, deadline: float) -> KeyMaterial | None:
        """A live copyable key's material, read before its DestroyKey destroys it (a destroyed one's,
        from its record): what a stray copy the sweep or a later reconcile finds on a cluster its
        record does not name must be (another application's key under that id stays). None when it
        cannot be read (a cluster busy or down: the sweep then destroys what it finds there, as
        reconcile does for a destroyed key whose record keeps no material) or is not needed
        (EXTERNAL or non-extractable: never swept)."""
        if placement.external or not placement.extractable:
            return None
        if placement.state is KeyState.DESTROYED:
            return KeyMaterial.recorded(placement)
        try:
            return self.material_of(placement, min(deadline, time.monotonic() + MATERIAL_WAIT))
        except Stopping:
            raise
        except RouterError as exc:
            log.info("key %s: its material could not be read before its destroy (%s); clusters its record does "
                     "not name are swept without a comparison", placement.key_id, exc.message)
            return None

    def _our_tokens(self, placement: Placement, deadline: float) -> None:
        """``OtherFleet`` if a cluster the record names has a token whose fleet marker lists only
        other fleets: with ``[store] url`` naming another fleet's store, a DestroyKey of one of its
        keys would destroy this fleet's key of that id there. Nothing is changed then."""
        for name in placement.clusters:
            if name not in self.backends:
                continue
            kind, why = self.fleet_check(name, deadline)
            if kind == OTHER_FLEET:
                raise OtherFleet(f"key {placement.key_id!r} was not destroyed: cluster {name}: {why}",
                                 cluster=name, region=self.backends[name].spec.region)

    def sweep_destroyed(self, deadline: float) -> int:
        """Remove the objects of keys this process destroyed from the clusters their records do
        not name; how many objects went. The repairer runs it, so no DestroyKey waits for it.

        A copy may be there that no record names: a repair or a creation that lost to a
        DestroyKey and could not remove its copy, or one killed between its copy and its record
        write. The DESTROYED record stays for good (a key id is never reused), so no live key of
        this fleet has objects with this id; a token whose fleet marker lists only other fleets
        is left alone (``fleet_check``). One search per cluster; a cluster that fails it or whose
        circuit is open is logged and left to reconcile. What the deadline leaves is looked at
        next time.
        """
        removed = 0
        with self._lock:
            pending = [(key_id, list(names), material) for key_id, (names, material) in self._unswept.items()]
        checked: dict[str, tuple[str, str]] = {}  # cluster -> its fleet check, once a pass
        for key_id, names, material in pending:
            for name in names:
                if time.monotonic() >= deadline:
                    return removed
                removed += self._sweep(key_id, name, deadline, material, checked)
                with self._lock:
                    left, _ = self._unswept.get(key_id, ([], None))
                    if name in left:
                        left.remove(name)
                        if not left:
                            del self._unswept[key_id]
        return removed

    def _sweep(self, key_id: str, name: str, deadline: float, material: KeyMaterial | None,
               checked: dict[str, tuple[str, str]]) -> int:
        """``sweep_destroyed`` on one cluster: how many objects went (only ``material``'s, if known).
        ``checked``: the pass's fleet checks, by cluster (one marker read a cluster, not one a key)."""
        if self.breakers[name].state is CircuitState.OPEN:
            log.warning("key %s destroyed; cluster %s, which its record does not name, was not looked at for "
                        "a stray copy (its circuit is open): the next periodic reconcile removes any", key_id, name)
            return 0
        # What is there under this id on another fleet's token is that fleet's key, not a stray copy.
        kind, why = checked.get(name) or self.fleet_check(name, deadline)
        if kind != FLEET_UNREAD:  # a marker that could not be read now is asked again for the next key
            checked[name] = kind, why
        if kind:
            log.warning("key %s destroyed; cluster %s, which its record does not name, was not looked at for a "
                        "stray copy: %s", key_id, name, why)
            return 0
        try:
            removed = self.backends[name].destroy(key_id, deadline, of=material)
        except ForeignObjects as exc:
            log.warning("key %s destroyed; on cluster %s, which its record does not name: %s", key_id, name,
                        exc.message)
            return 0
        except RouterError as exc:
            log.warning("key %s destroyed; cluster %s, which its record does not name, could not be looked at "
                        "for a stray copy (%s): the next periodic reconcile removes any", key_id, name, exc.message)
            return 0
        if removed:
            log.warning("key %s destroyed; %d of its objects were on cluster %s, which its record does not name "
                        "(a copy a repair or creation left): removed", key_id, removed, name)
        return removed

    # -- crypto -------------------------------------------------------------

    def public_key(self, key_id: str, deadline: float) -> tuple[Placement, bytes]:
        placement = self._usable(key_id)
        if not placement.algorithm.is_asymmetric:
            raise FailedPrecondition(f"key {key_id!r} is {placement.algorithm.value}: it has no public key")
        kept = self._public_keys.get(key_id)  # only after the placement said the key may be used
        # An EXTERNAL key's public key is its record's, handed out once a cluster has checked it
        # against the wrapped private key; a record whose public key changed since is checked again.
        if kept is not None and (not placement.external or kept == placement.public_der):
            return placement, kept
        der, _ = self._dispatch(placement, lambda b, p: b.public_key(p, deadline), deadline)
        with self._public_keys_lock:
            if len(self._public_keys) >= PUBLIC_KEYS_KEPT:
                del self._public_keys[next(iter(self._public_keys))]
            self._public_keys[key_id] = der
        return placement, der

    @staticmethod
    def _digest(op: Operation, digest: bytes | None, message: bytes | None) -> bytes:
        if digest is not None:
            if len(digest) != op.digest_size:
                raise InvalidArgument(
                    f"digest is {len(digest)} bytes; {op.value} needs {op.digest_size}"
                )
            return digest
        if message is None:
            raise InvalidArgument("one of digest or message is required")
        validation.payload("message", message, required=False)
        return hashlib.new(op.hash_name, message).digest()

    def sign(
        self, key_id: str, op: Operation, digest: bytes | None, message: bytes | None, deadline: float
    ) -> tuple[bytes, str]:
        validation.operation_kind(op, validation.SIGNATURE_OPS, "Sign")
        placement = self._usable(key_id)
        validation.operation_fits(placement, op)
        data = self._digest(op, digest, message)
        return self._dispatch(placement, lambda b, p: b.sign(p, op, data, deadline), deadline)

    def sign_many(
        self, items: Sequence[tuple[str, Operation, bytes | None, bytes | None]], deadline: float
    ) -> list[tuple[bytes, str] | RouterError]:
        """Sign (key id, algorithm, digest, message) items, as ``sign`` does each (BatchSign).

        Items of one key and algorithm share one placement lookup, one dispatch and one
        session. Results are in item order: (signature, cluster), or the item's own error.
        A group that fails as a whole for a reason not shared by all its items (the module
        refused some input) is signed again item by item, so each gets its own status.
        """
        results: list[tuple[bytes, str] | RouterError | None] = [None] * len(items)
        groups: dict[tuple[str, Operation], list[tuple[int, bytes]]] = {}
        for index, (key_id, op, digest, message) in enumerate(items):
            try:
                validation.operation_kind(op, validation.SIGNATURE_OPS, "Sign")
                groups.setdefault((key_id, op), []).append((index, self._digest(op, digest, message)))
            except RouterError as exc:
                results[index] = exc
        for (key_id, op), members in groups.items():
            try:
                placement = self._usable(key_id)
                validation.operation_fits(placement, op)
            except RouterError as exc:
                for index, _ in members:
                    results[index] = exc
                continue
            self._sign_group(placement, op, members, deadline, results)
        return [r if r is not None else InternalError("batch item was not signed") for r in results]

    def _sign_group(
        self, placement: Placement, op: Operation, members: list[tuple[int, bytes]], deadline: float,
        results: list[tuple[bytes, str] | RouterError | None],
    ) -> None:
        digests = [data for _, data in members]
        try:
            signed, cluster = self._dispatch(placement, lambda b, p: b.sign_many(p, op, digests, deadline), deadline)
        except (InvalidArgument, InternalError) as exc:
            if len(members) == 1:
                results[members[0][0]] = exc
                return
            for index, data in members:
                try:
                    results[index] = self._sign_one(placement, op, data, deadline)
                except RouterError as item_exc:
                    results[index] = item_exc
            return
        except RouterError as exc:
            for index, _ in members:
                results[index] = exc
            return
        for (index, _), outcome in zip(members, signed, strict=True):
            results[index] = outcome if isinstance(outcome, RouterError) else (outcome, cluster)

    def _sign_one(self, placement: Placement, op: Operation, data: bytes, deadline: float) -> tuple[bytes, str]:
        return self._dispatch(placement, lambda b, p: b.sign(p, op, data, deadline), deadline)

    def verify(
        self,
        key_id: str,
        op: Operation,
        digest: bytes | None,
        message: bytes | None,
        signature: bytes,
        deadline: float,
    ) -> bool:
        validation.operation_kind(op, validation.SIGNATURE_OPS, "Verify")
        placement = self._usable(key_id)
        validation.operation_fits(placement, op)
        data = self._digest(op, digest, message)
        validation.payload("signature", signature)
        valid, _ = self._dispatch(
            placement, lambda b, p: b.verify(p, op, data, signature, deadline), deadline
        )
        return valid

    def encrypt(
        self, key_id: str, op: Operation, plaintext: bytes, aad: bytes, deadline: float
    ) -> tuple[bytes, bytes, str]:
        validation.operation_kind(op, validation.CIPHER_OPS, "Encrypt")
        placement = self._usable(key_id)
        validation.operation_fits(placement, op)
        validation.payload("plaintext", plaintext, required=False)
        validation.payload("aad", aad, required=False)
        if op is Operation.RSA_OAEP_SHA256:
            if aad:
                raise InvalidArgument("aad is only used with AES_GCM")
            limit = RSA_OAEP_MAX_PLAINTEXT[placement.algorithm]
            if len(plaintext) > limit:
                raise InvalidArgument(
                    f"plaintext is {len(plaintext)} bytes; RSA_OAEP_SHA256 with {placement.algorithm.value} "
                    f"takes at most {limit}"
                )
        (ciphertext, iv), cluster = self._dispatch(
            placement, lambda b, p: b.encrypt(p, op, plaintext, aad, deadline), deadline
        )
        return ciphertext, iv, cluster

    def decrypt(
        self, key_id: str, op: Operation, ciphertext: bytes, iv: bytes, aad: bytes, deadline: float
    ) -> bytes:
        validation.operation_kind(op, validation.CIPHER_OPS, "Decrypt")
        placement = self._usable(key_id)
        validation.operation_fits(placement, op)
        gcm = op is Operation.AES_GCM
        # Whatever Encrypt returned decrypts: a GCM ciphertext carries its tag on top of the plaintext.
        validation.payload("ciphertext", ciphertext,
                           limit=validation.MAX_PAYLOAD + (validation.GCM_TAG_BYTES if gcm else 0))
        validation.payload("aad", aad, required=False)
        if gcm:
            if len(iv) != 12:
                raise InvalidArgument(f"iv is {len(iv)} bytes; AES_GCM needs 12")
            if len(ciphertext) < validation.GCM_TAG_BYTES:
                raise InvalidArgument(f"ciphertext is shorter than the {validation.GCM_TAG_BYTES}-byte GCM tag")
        else:
            if iv or aad:
                raise InvalidArgument("iv and aad are only used with AES_GCM")
            size = RSA_MODULUS_BYTES[placement.algorithm]
            if len(ciphertext) != size:
                raise InvalidArgument(f"ciphertext is {len(ciphertext)} bytes; a {placement.algorithm.value} "
                                      f"ciphertext is {size}")
        plaintext, _ = self._dispatch(
            placement, lambda b, p: b.decrypt(p, op, ciphertext, iv, aad, deadline), deadline
        )
        return plaintext

    def mac(self, key_id: str, op: Operation, data: bytes, deadline: float) -> bytes:
        validation.operation_kind(op, validation.MAC_OPS, "Mac")
        placement = self._usable(key_id)
        validation.operation_fits(placement, op)
        validation.payload("data", data, required=False)
        mac, _ = self._dispatch(placement, lambda b, p: b.mac(p, op, data, deadline), deadline)
        return mac

    def verify_mac(self, key_id: str, op: Operation, data: bytes, mac: bytes, deadline: float) -> bool:
        validation.operation_kind(op, validation.MAC_OPS, "VerifyMac")
        placement = self._usable(key_id)
        validation.operation_fits(placement, op)
        validation.payload("data", data, required=False)
        validation.payload("mac", mac)
        valid, _ = self._dispatch(placement, lambda b, p: b.verify_mac(p, op, data, mac, deadline), deadline)
        return valid

    def random(self, length: int, deadline: float) -> bytes:
        if not 1 <= length <= validation.MAX_RANDOM:
            raise InvalidArgument(f"length must be 1 to {validation.MAX_RANDOM}")
        return self._any_backend(lambda b: b.random(length, deadline), deadline)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close every cluster's sessions, each on its own thread, and the store.

        A hung HSM would hang its ``C_CloseSession`` too, and a gateway must still stop:
        a cluster whose sessions have not closed after ``timeout`` seconds is left to
        the process's exit, which ends its sessions as the HSM sees it.

        Calls still running fail at their next HSM call (``Stopping``): a closed cluster
        opens no session and logs in no more. Keys they were creating stay CREATING, for a
        retry of their request or a repairer's ``sweep_intents`` (logged here, with their ids).
        """
        with self._lock:
            self._closed = True
            cut_off = sorted(self._creating)
            unswept = sorted(self._unswept)
        if cut_off:
            log.warning("%d key creation(s) cut off by the stop, left CREATING: %s; a retry with the same "
                        "request_id finishes each, or a gateway's repairer rolls it back once older than "
                        "replication.creation_grace (%.0f s)", len(cut_off), ", ".join(cut_off), self.creation_grace)
        if unswept:
            log.warning("%d destroyed key(s) not yet looked for on the clusters their records do not name: %s; "
                        "the next periodic reconcile removes any copy there", len(unswept), ", ".join(unswept))

        def close(name: str, backend: HsmBackend) -> None:
            try:
                backend.close()
            except Exception:  # noqa: BLE001 - the other clusters and the store still close
                log.exception("cluster %s: closing its sessions failed", name)

        closers = {name: threading.Thread(target=close, args=(name, backend), name=f"close-{name}", daemon=True)
                   for name, backend in self.backends.items()}
        for thread in closers.values():
            thread.start()
        end = time.monotonic() + timeout
        for name, thread in closers.items():
            thread.join(max(0.0, end - time.monotonic()))
            if thread.is_alive():
                log.warning("cluster %s: sessions not closed after %.0f s (the HSM is not answering); "
                            "left to the process's exit", name, timeout)
        self.store.close()


__all__ = ["Router", "Topology", "KeyAlgorithm", "KeyUsage", "KeySpec", "KeyStorage"]

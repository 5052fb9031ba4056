"""Reconciliation: make the placement store and the tokens agree.

Finds, per cluster:
- **stale intents**: CREATING records older than the grace period (a creation
  that crashed half-way): their objects are destroyed and the record removed;
- **orphans**: key objects on a token that a placement record accounts for but does
  not put there (the source left by a move, the objects of a destroyed key): destroyed,
  except for a key short of copies, whose object may be the copy a repair is making, and
  objects under a key's id that are not its material, which are ``foreign``, below.
  A destroyed key's are destroyed by ``finish_destroys`` too, without ``fix``: its
  DestroyKey was asked for and answered; what it could not reach (a copy a killed
  repairer left, whose sweep died with the process that destroyed the key) goes then,
  if it is the material whose digests the record keeps (``Placement.destroyed_material``);
- **foreign**: objects under a key's id, on a cluster its record does not name, that are not
  the key's material (``Router.foreign_objects``: another application's key that has the id):
  never destroyed, by ``fix`` or anything else (``Router.destroy_unless_kept`` compares first),
  logged at ERROR on each pass; the key is neither moved nor copied there until an operator
  removes them (docs/operations.md, objects that are not the key's). A report-only pass
  compares at most ``MAX_COMPARES`` orphans with their key, on clusters of this store's fleet;
  the rest are listed as orphans until a later pass has compared them;
- **unknown**: key objects no record in the store names at all. The gateway writes a
  key's record before it makes objects and removes it only after them, so none of its
  own keys is ever found so: these are another application's keys, or the store is not
  the one the keys were made with (a typo in ``[store] url``, an empty table). Never
  destroyed here, by ``fix`` or anything else: an operator decides (docs/operations.md);
- **missing**: a placement says the cluster holds the key but the token has no
  object for it (a move that crashed after naming its target, a copy lost on the
  HSM). With ``fix``, the name is dropped from the record when, looked at again, the
  record still names the cluster, the token still lacks the key and another named
  cluster holds it; the key is then short of copies, so the repairer makes a real
  copy and the under-replicated alarm counts it meanwhile. Never the last name: a key
  that no named cluster holds is left for an operator. At most ``MAX_DROPS`` a pass;
- **duplicates**: two or more objects of one class for one key (a stray import, or a
  process killed while it wrote the token): reported, never fixed here, since which
  object is the key's is for an operator to establish (docs/operations.md). Until then
  the gateway serves the key from its other clusters.

- **another fleet's tokens**: nothing is destroyed on a cluster (no orphan, no
  destroyed key's object, no unfinished creation's) unless its token is this store's
  fleet's: its fleet marker lists the store's fleet id (``Router.fleet_check``). Key ids
  are chosen by callers, so another fleet's store names the same ids as this one: with
  ``[store] url`` naming it, its destroyed keys and unfinished creations would be taken
  for the live keys on these tokens. A token that lists only other fleets is reported
  (``other_fleet``, at ERROR); one whose marker cannot be read is left alone for the
  pass (``fleet_unread``). A token with no marker at all (made before markers) is
  reconciled as before; reconcile marks nothing (the first key a gateway writes there does).

A fix may be limited to the findings someone approved (``only``): those that no longer
hold are skipped, and findings that were not approved are reported, not acted on.

Token objects are listed *before* the store is read: every creation writes its
intent record before it makes objects, so an object seen on the token always has
its record visible in the later read, and in-flight creations are never taken
for orphans. Ids starting with ``_`` are the gateway's own objects (wrapping
keys) and are never touched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from router.errors import ForeignObjects, RouterError
from router.model import KeyState
from router.placement.store import Conflict, StoreError
from router.router import NO_RECORD, OTHER_FLEET, Router

log = logging.getLogger(__name__)

MAX_DROPS = 1000
"""Missing copies dropped in one pass: each costs a store read and a search on each named
cluster, and a gateway's start waits for its reconcile."""


MAX_COMPARES = 100
"""Orphans compared with their key's material in one report-only pass, to tell them from ``foreign``
objects: each costs an export of the key on a cluster holding it and one of each object found.
Objects found foreign are taken for such for ``FOREIGN_SEEN`` without a comparison, so that the
passes after compare others."""
COMPARE_WAIT = 5.0
"""Seconds one comparison may take at most: a busy cluster does not hold up the rest of the pass."""


Finding = tuple[str, str, str]
"""(kind, cluster, key id) of a finding a fix acts on: ``stale_intent`` (no cluster),
``orphan``, or ``missing`` (a name a fix drops)."""


@dataclass
class ReconcileReport:
    stale_intents: list[str] = field(default_factory=list)
    orphans: list[tuple[str, str]] = field(default_factory=list)
    """(cluster, key id) of objects whose key's record does not put them there."""
    foreign: list[tuple[str, str, str]] = field(default_factory=list)
    """(cluster, key id, why) of objects under a key's id that are not the key's material: never
    destroyed."""
    unknown: list[tuple[str, str]] = field(default_factory=list)
    """(cluster, key id) of objects whose key id no record names: never destroyed."""
    missing: list[tuple[str, str]] = field(default_factory=list)
    """(cluster, key id) where a placement expects objects that are not there."""
    droppable: list[tuple[str, str]] = field(default_factory=list)
    """The missing copies of keys another named cluster held: ``fix`` drops these names."""
    dropped: list[tuple[str, str]] = field(default_factory=list)
    """The missing copies whose names were removed from their records (with ``fix``)."""
    duplicates: list[tuple[str, str, str, int]] = field(default_factory=list)
    """(cluster, key id, object class, how many) where a key has more than one object of a class."""
    unreachable: list[str] = field(default_factory=list)
    """Clusters that could not be checked."""
    other_fleet: list[str] = field(default_factory=list)
    """Clusters whose token's fleet marker lists other placement stores' fleets, not this store's:
    their keys were made with another store, and nothing was destroyed on them."""
    fleet_unread: list[str] = field(default_factory=list)
    """Clusters whose fleet could not be checked (their token's fleet marker, or the store's fleet id,
    could not be read): nothing was destroyed on them this pass."""
    fixed: bool = False
    only: frozenset[Finding] | None = None
    """The findings a fix was limited to (None: every one it can act on)."""
    removed: list[tuple[str, str]] = field(default_factory=list)
    """(cluster, key id) of orphans whose objects a fix destroyed."""
    rolled_back: list[str] = field(default_factory=list)
    """Stale intents a fix rolled back (objects and record gone)."""
    finished: list[tuple[str, str]] = field(default_factory=list)
    """(cluster, key id) of a destroyed key's objects that ``finish_destroys`` removed."""

    @property
    def fixable(self) -> list[Finding]:
        """The findings a fix would act on, as the report found them."""
        left = {*self.other_fleet, *self.fleet_unread}  # nothing is destroyed there
        return ([("stale_intent", "", k) for k in self.stale_intents]
                + [("orphan", c, k) for c, k in self.orphans if c not in left]
                + [("missing", c, k) for c, k in self.droppable])

    def approved(self, finding: Finding) -> bool:
        return self.only is None or finding in self.only

    @property
    def clean(self) -> bool:
        return not (self.stale_intents or self.orphans or self.foreign or self.unknown or self.missing
                    or self.duplicates or self.unreachable or self.other_fleet or self.fleet_unread)

    def summary(self) -> str:
        """One line for the log and the admin change's result: what was done (``fix``) or found."""
        return self._summary() + self._fleets()

    def _fleets(self) -> str:
        """The summary's part about clusters reconcile destroyed nothing on: "" when there are none."""
        parts = []
        if self.other_fleet:
            parts.append(f"{len(self.other_fleet)} clusters whose keys were made with another placement store "
                         f"({', '.join(self.other_fleet)}; nothing destroyed there: [store] url may name the wrong "
                         "store)")
        if self.fleet_unread:
            parts.append(f"{len(self.fleet_unread)} clusters whose fleet could not be checked "
                         f"({', '.join(self.fleet_unread)}; nothing destroyed there)")
        return "".join(f", {part}" for part in parts)

    def _foreign(self) -> str:
        """The summary's part about objects that are not their key's: "" when there are none."""
        if not self.foreign:
            return ""
        return (f"{len(self.foreign)} objects under keys' ids that are not the keys' (left alone: another "
                "application's; docs/operations.md), ")

    def _summary(self) -> str:
        if not self.fixed:
            finished = (f"{len(self.finished)} objects of destroyed keys removed, " if self.finished else "")
            return (f"{finished}{len(self.stale_intents)} unfinished creations, {len(self.orphans)} orphan objects, "
                    f"{self._foreign()}{len(self.unknown)} objects no record names, "
                    f"{len(self.missing)} missing copies ({len(self.droppable)} a fix would drop from their "
                    f"records), {len(self.duplicates)} duplicate objects, {len(self.unreachable)} unreachable "
                    "clusters")
        if self.only is not None:
            found = set(self.fixable)
            rolled = len(self.rolled_back)
            foreign = {("orphan", c, k) for c, k, _ in self.foreign}  # counted with them, below
            gone = len(self.only - found - foreign)
            new = len(found - self.only)
            return (f"{rolled} unfinished creations rolled back, {len(self.removed)} orphan objects removed, "
                    f"{len(self.dropped)} missing copies dropped from their records, of the {len(self.only)} "
                    f"findings approved; {gone} of them no longer held (skipped); {new} findings it does not list "
                    f"left for a new request (hsmctl reconcile --fix); {self._foreign()}{len(self.unknown)} objects "
                    f"no record names and {len(self.duplicates)} duplicate objects (left for an operator), "
                    f"{len(self.unreachable)} unreachable clusters")
        intents_left = len(self.stale_intents) - len(self.rolled_back)
        orphans_left = len(self.orphans) - len(self.removed)
        return (f"{len(self.rolled_back)} unfinished creations rolled back ({intents_left} not), "
                f"{len(self.removed)} orphan objects removed ({orphans_left} not), "
                f"{self._foreign()}{len(self.unknown)} objects no record names (left alone), "
                f"{len(self.missing)} missing copies ({len(self.dropped)} dropped from their records), "
                f"{len(self.duplicates)} duplicate objects (left for an operator), "
                f"{len(self.unreachable)} unreachable clusters")


def reconcile(
    router: Router,
    *,
    fix: bool,
    grace: float | None = None,
    wall_clock: Callable[[], float] | None = None,
    deadline_s: float = 60.0,
    only: frozenset[Finding] | None = None,
    progress: Callable[[], None] | None = None,
    finish_destroys: bool = False,
) -> ReconcileReport:
    """Compare the store with the tokens; with ``fix``, act on what was found (with ``only``,
    on those findings alone: each is found again first, and one no longer found is skipped).
    ``progress`` is called after each step (a cluster listed, a record read, an object or a
    record fixed): a worker's start-up tells its supervisor it is not stuck.
    ``finish_destroys``: remove a destroyed key's objects even without ``fix``."""
    step = progress or (lambda: None)
    grace = router.creation_grace if grace is None else grace
    deadline = time.monotonic() + deadline_s
    report = ReconcileReport(fixed=fix, only=only)

    checked: dict[str, bool] = {}

    def ours(name: str) -> bool:
        """Whether reconcile may destroy on cluster ``name`` (its fleet is checked once a pass)."""
        if name not in checked:
            finding, why = router.fleet_check(name, deadline)
            checked[name] = not finding
            if finding == OTHER_FLEET:
                report.other_fleet.append(name)
                log.error("reconcile: cluster %s: %s. Nothing is destroyed on it (docs/operations.md)", name, why)
            elif finding:
                report.fleet_unread.append(name)
                log.warning("reconcile: cluster %s: %s; nothing is destroyed on it this pass", name, why)
        return checked[name]

    on_token: dict[str, set[str]] = {}
    for name, backend in router.backends.items():
        try:
            objects = {k: v for k, v in backend.key_objects(deadline).items() if not k.startswith("_")}
        except RouterError as exc:
            log.warning("reconcile: cluster %s unreachable: %s", name, exc.message)
            report.unreachable.append(name)
            continue
        step()
        ours(name)
        on_token[name] = set(objects)
        for key_id, counts in sorted(objects.items()):
            for kind, count in sorted(counts.items()):
                if count > 1:
                    report.duplicates.append((name, key_id, kind, count))
                    log.error("reconcile: cluster %s holds %d %s objects for key %r; which is the key's is for "
                              "an operator to establish (docs/operations.md)", name, count, kind, key_id)

    expected: dict[str, set[str]] = {name: set() for name in router.backends}
    unheld = 0  # keys that none of their clusters, every one of them listed, held
    unheld_ids: list[str] = []  # the first few, for the log
    now = (wall_clock or router.wall_clock)()
    for placement in router.store.scan():
        step()
        if placement.state is KeyState.DESTROYED:
            continue
        if placement.state is KeyState.CREATING and now - placement.create_time >= grace:
            report.stale_intents.append(placement.key_id)
            if fix and report.approved(("stale_intent", "", placement.key_id)):
                # Every cluster is looked at, before any is left out: each one not its fleet's is reported.
                theirs = [name for name in placement.clusters if name in router.backends and not ours(name)]
                if theirs:
                    log.warning("reconcile: unfinished creation of %s not rolled back: nothing is destroyed on %s",
                                placement.key_id, ", ".join(theirs))
                    continue
                # Router.roll_back claims the intent first: one a retry finished or took over since
                # the scan keeps its objects (a version conflict, logged there).
                if router.roll_back(placement, deadline):
                    log.warning("reconcile: rolled back unfinished creation of %s", placement.key_id)
                    report.rolled_back.append(placement.key_id)
            continue
        if placement.external:
            continue  # lives wrapped in the store, never as token objects
        held = False  # by a named cluster, as listed above
        missed: list[str] = []
        for name in placement.clusters:
            if name in expected:
                expected[name].add(placement.key_id)
                if placement.state is not KeyState.CREATING and name in on_token:
                    if placement.key_id in on_token[name]:
                        held = True
                    else:
                        missed.append(name)
        if missed:
            report.missing += [(name, placement.key_id) for name in missed]
            if held:
                report.droppable += [(name, placement.key_id) for name in missed]
            elif len(missed) == len(placement.clusters):
                unheld += 1
                if len(unheld_ids) < 5:
                    unheld_ids.append(placement.key_id)

    compares = 0
    router.forget_foreign(on_token)
    for name, ids in on_token.items():
        for key_id in sorted(ids - expected[name]):
            if key_id in report.stale_intents:
                continue  # handled with its intent
            # One look at the record: under the token's lock when it may end in a destroy.
            destroy = fix and report.approved(("orphan", name, key_id)) and ours(name)
            foreign = ""  # why the objects are not the key's
            if destroy:
                why, foreign = _destroy_orphan(router, name, key_id, deadline)
            else:
                why = router.why_kept(name, key_id)
                # Told apart from orphans for a report; a fix compares what it destroys anyway, and
                # another fleet's tokens are only reported on.
                if not (why or fix) and ours(name):
                    foreign = router.known_foreign(name, key_id)
                    if not foreign and compares < MAX_COMPARES:
                        compares += 1
                        foreign = router.foreign_objects(name, key_id, min(deadline, time.monotonic() + COMPARE_WAIT))
            if not (why or foreign or destroy) and finish_destroys and ours(name) and _destroyed(router, key_id):
                why, foreign = _destroy_orphan(router, name, key_id, deadline)
                if not (why or foreign):
                    report.finished.append((name, key_id))
                    step()
                    continue
            step()
            if foreign:
                report.foreign.append((name, key_id, foreign))
                log.error("reconcile: %s", foreign)
            elif why == NO_RECORD:
                report.unknown.append((name, key_id))
            elif why == NOT_DESTROYED:  # still an orphan, for the next reconcile
                report.orphans.append((name, key_id))
            elif why:
                log.info("reconcile: %s on %s left alone: %s", key_id, name, why)
            else:
                report.orphans.append((name, key_id))
                if destroy:
                    report.removed.append((name, key_id))
    for name in on_token:
        strangers = [key_id for cluster, key_id in report.unknown if cluster == name]
        if strangers:
            log.error("reconcile: %d key object(s) on cluster %s have no record in the placement store, e.g. %s; "
                      "left alone. Keys this gateway made always have one: if these are its keys, [store] url "
                      "names the wrong store; else another application made them (docs/operations.md)",
                      len(strangers), name, ", ".join(repr(k) for k in strangers[:5]))
    if unheld:
        log.error("reconcile: %d key(s) held by none of the clusters their records name, e.g. %s; their records "
                  "stay as they are, for an operator to restore the keys (docs/operations.md)",
                  unheld, ", ".join(repr(k) for k in unheld_ids))
    if fix:
        for name, key_id in [d for d in report.droppable if report.approved(("missing", *d))][:MAX_DROPS]:
            if _drop_missing(router, name, key_id, deadline):
                report.dropped.append((name, key_id))
            step()
        if len(report.droppable) > MAX_DROPS:
            log.warning("reconcile: %d more missing copies to drop from their records; the next reconcile will",
                        len(report.droppable) - MAX_DROPS)
    if report.rolled_back:
        router.reload()
    return report


def _drop_missing(router: Router, name: str, key_id: str, deadline: float) -> bool:
    """Remove ``name`` from the key's record if it is still a name without a copy.

    The record is read first, then the tokens, then the record is written only if no
    one changed it since: a move names its target before it copies, and a copy that
    appears after the token was looked at belongs to a move that has not yet written
    its result, so that write fails on the version and the move undoes itself. A move
    that already finished changed the record before it was read here.
    """
    try:
        current = router.store.get(key_id)
    except StoreError as exc:
        log.error("reconcile: cannot read %s to drop its missing copy on %s: %s", key_id, name, exc)
        return False
    if (current is None or name not in current.clusters or current.external
            or current.state in (KeyState.CREATING, KeyState.DESTROYED)):
        return False  # changed since the scan
    holders: list[str] = []
    for cluster in current.clusters:
        backend = router.backends.get(cluster)
        held: bool | None = None  # None: not looked at (not configured here, or unreachable)
        if backend is not None:
            try:
                held = key_id in backend.key_objects(deadline, key_id=key_id)
            except RouterError as exc:
                log.info("reconcile: %s on %s not looked at again: %s", key_id, cluster, exc.message)
        if cluster == name and held is not False:
            return False  # there now, or not seen to be missing twice: the name stays
        if held:
            holders.append(cluster)
    if not holders:
        log.warning("reconcile: %s stays named for key %r: no other cluster named for it was seen to hold it "
                    "just now", name, key_id)
        return False
    rest = [c for c in current.clusters if c != name]
    if name == current.primary:  # the first cluster seen to hold the key takes its place
        rest.remove(holders[0])
        rest.insert(0, holders[0])
    kept = replace(current, primary=rest[0], replicas=tuple(rest[1:]))
    if kept.state is KeyState.ENABLED and router.short_of_copies(kept):
        kept = replace(kept, state=KeyState.UNDER_REPLICATED)
    try:
        router.store.update(kept)
    except Conflict:
        log.info("reconcile: %s changed while its missing copy on %s was checked; left alone", key_id, name)
        return False
    except StoreError as exc:
        log.error("reconcile: could not drop the missing copy of %s on %s: %s", key_id, name, exc)
        return False
    try:
        router.reload_key(key_id)
    except StoreError:  # the cache catches up on its next refresh
        pass
    log.warning("reconcile: dropped %s from key %r's record: the cluster has no copy (now on %s, %s)",
                name, key_id, ", ".join(kept.clusters), kept.state.value)
    return True


NOT_DESTROYED = "the cluster did not destroy them"
"""What ``_destroy_orphan`` answers when the destroy itself failed (logged): still an orphan."""


def _destroyed(router: Router, key_id: str) -> bool:
    """Whether the key's record says it was destroyed (for good: a key id is never reused)."""
    try:
        current = router.store.get(key_id)
    except StoreError as exc:
        log.warning("reconcile: cannot read %s to see whether it was destroyed: %s", key_id, exc)
        return False
    return current is not None and current.state is KeyState.DESTROYED


def _destroy_orphan(router: Router, name: str, key_id: str, deadline: float) -> tuple[str, str]:
    """Destroy an orphan's objects on ``name`` (``Router.destroy_unless_kept``): why they were
    left alone, or ""; and why they are not the key's (``ForeignObjects``: nothing destroyed), or ""."""
    try:
        why = router.destroy_unless_kept(name, key_id, deadline)
    except ForeignObjects as exc:
        return "", exc.message
    except RouterError as exc:
        log.error("reconcile: could not destroy orphan %s on %s: %s", key_id, name, exc.message)
        return NOT_DESTROYED, ""
    if why:
        return why, ""
    log.warning("reconcile: destroyed orphan %s on %s", key_id, name)
    return "", ""

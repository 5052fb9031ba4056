"""Reconciliation: make the placement store and the tokens agree.

Finds, per cluster:
- **stale intents**: CREATING records older than the grace period (a creation
  that crashed half-way): their objects are destroyed and the record removed;
- **orphans**: key objects on a token that no placement puts there: destroyed, except
  for a key short of copies, whose object may be the copy a repair is making;
- **missing**: a placement says the cluster holds the key but the token has no
  object for it: reported (repair needs a replica; see replication);
- **duplicates**: two or more objects of one class for one key (a stray import, or a
  process killed while it wrote the token): reported, never fixed here, since which
  object is the key's is for an operator to establish (docs/operations.md). Until then
  the gateway serves the key from its other clusters.

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

from router.errors import RouterError
from router.model import KeyState, Placement
from router.placement.store import Conflict, StoreError
from router.router import Router

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    stale_intents: list[str] = field(default_factory=list)
    orphans: list[tuple[str, str]] = field(default_factory=list)
    """(cluster, key id) of objects no placement accounts for."""
    missing: list[tuple[str, str]] = field(default_factory=list)
    """(cluster, key id) where a placement expects objects that are not there."""
    duplicates: list[tuple[str, str, str, int]] = field(default_factory=list)
    """(cluster, key id, object class, how many) where a key has more than one object of a class."""
    unreachable: list[str] = field(default_factory=list)
    """Clusters that could not be checked."""
    fixed: bool = False

    @property
    def clean(self) -> bool:
        return not (self.stale_intents or self.orphans or self.missing or self.duplicates or self.unreachable)

    def summary(self) -> str:
        """One line for the log and the admin change's result (of a reconcile with ``fix``)."""
        return (f"{len(self.stale_intents)} unfinished creations rolled back, {len(self.orphans)} orphan objects "
                f"removed, {len(self.missing)} missing copies, {len(self.duplicates)} duplicate objects "
                f"(left for an operator), {len(self.unreachable)} unreachable clusters")


def reconcile(
    router: Router,
    *,
    fix: bool,
    grace: float | None = None,
    wall_clock: Callable[[], float] | None = None,
    deadline_s: float = 60.0,
) -> ReconcileReport:
    grace = router.creation_grace if grace is None else grace
    deadline = time.monotonic() + deadline_s
    report = ReconcileReport(fixed=fix)

    on_token: dict[str, set[str]] = {}
    for name, backend in router.backends.items():
        try:
            objects = {k: v for k, v in backend.key_objects(deadline).items() if not k.startswith("_")}
        except RouterError as exc:
            log.warning("reconcile: cluster %s unreachable: %s", name, exc.message)
            report.unreachable.append(name)
            continue
        on_token[name] = set(objects)
        for key_id, counts in sorted(objects.items()):
            for kind, count in sorted(counts.items()):
                if count > 1:
                    report.duplicates.append((name, key_id, kind, count))
                    log.error("reconcile: cluster %s holds %d %s objects for key %r; which is the key's is for "
                              "an operator to establish (docs/operations.md)", name, count, kind, key_id)

    expected: dict[str, set[str]] = {name: set() for name in router.backends}
    now = (wall_clock or router.wall_clock)()
    for placement in router.store.scan():
        if placement.state is KeyState.DESTROYED:
            continue
        if placement.state is KeyState.CREATING and now - placement.create_time >= grace:
            report.stale_intents.append(placement.key_id)
            if fix:
                _roll_back(router, placement, now, deadline)
            continue
        if placement.external:
            continue  # lives wrapped in the store, never as token objects
        for name in placement.clusters:
            if name in expected:
                expected[name].add(placement.key_id)
                if placement.state is not KeyState.CREATING and name in on_token:
                    if placement.key_id not in on_token[name]:
                        report.missing.append((name, placement.key_id))

    for name, ids in on_token.items():
        for key_id in sorted(ids - expected[name]):
            if key_id in report.stale_intents:
                continue  # handled with its intent
            why = _why_not_an_orphan(router, key_id)
            if why:
                log.info("reconcile: %s on %s left alone: %s", key_id, name, why)
                continue
            report.orphans.append((name, key_id))
            if fix:
                try:
                    router.backends[name].destroy(key_id, deadline)
                    log.warning("reconcile: destroyed orphan %s on %s", key_id, name)
                except RouterError as exc:
                    log.error("reconcile: could not destroy orphan %s on %s: %s", key_id, name, exc.message)
    if fix and report.stale_intents:
        router.reload()
    return report


def _why_not_an_orphan(router: Router, key_id: str) -> str:
    """Why an object no placement named in the scan may still be a key's, or "" if it is not.

    The repairer copies a key short of copies before it names the new copy in the record:
    the object may be that copy, seconds before it is named.
    """
    try:
        current = router.store.get(key_id)  # now, not as the scan saw it
    except StoreError as exc:
        return f"the placement store cannot say whose it is ({exc})"
    if current is not None and router.short_of_copies(current):
        return "the key is short of copies, a repair may be making it"
    return ""


def _roll_back(router: Router, intent: Placement, now: float, deadline: float) -> None:
    """Remove a stale intent's objects and record, if it is still the stale intent that was read.

    The intent is claimed first (a version bump that restarts its clock), and only a
    successful claim destroys anything: a creation that finished, or was taken over,
    after the scan keeps its objects, where destroying first and then failing to delete
    the record would leave an acknowledged key without its material.
    """
    key_id = intent.key_id
    try:
        claimed = router.store.update(replace(intent, create_time=now))
    except Conflict:
        log.info("reconcile: %s changed since it was read (finished or taken over); left alone", key_id)
        return
    except StoreError as exc:
        log.error("reconcile: could not roll back %s: %s", key_id, exc)
        return
    if router.roll_back(claimed, deadline):
        log.warning("reconcile: rolled back unfinished creation of %s", key_id)

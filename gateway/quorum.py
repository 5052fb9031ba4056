"""Quorum approvals: a mutating admin operation runs only after M distinct admins agree.

A request becomes a pending **change** (the requester's own approval counts as
the first). Each further approval comes from another admin; when the count
reaches the quorum the change runs, once, and its result is recorded. A change
that nobody approves in time expires and never runs.

The approver that runs a change records itself as its runner and holds a lease on it,
renewed while the action runs. A running change whose lease lapsed (its gateway was
killed, or lost the store for longer than the lease) is taken as **interrupted** by
whoever reads it next, a gateway's start included: that is recorded and audited, and
its result says the action may be partly applied. A runner that is in fact still alive
writes its own result over that once it finishes.

Changes and the operator switches (drained clusters, failed-over regions) are
admin records in the placement store, so every process of every gateway sharing
the store sees the same ones: a change requested through one gateway may be
approved through another, and a drain applies everywhere. Every write names the
version it read (``PlacementStore.put_admin_record``); one that lost is read again
and retried, so two approvals at once both count and a change runs exactly once.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.errors import AuditUnavailable, FailedPrecondition, KeyNotFound, RouterError, Unavailable
from router.placement.store import PlacementStore, Stale, StoreError, edit_admin_record

log = logging.getLogger(__name__)

PENDING, APPLIED, REJECTED, EXPIRED, FAILED, RUNNING = "pending", "applied", "rejected", "expired", "failed", "running"
INTERRUPTED = "interrupted"
"""A change whose runner stopped renewing its lease before recording a result."""
OPEN = (PENDING, RUNNING)
"""States of a change that has not ended (``list`` shows these by default)."""
START_GRACE = 60.0
"""Seconds after its approvals met the quorum that a change waits for the admin whose approval met
it to start it: only then does another approval run it (that admin's process stopped). Sooner, the
approval that met the quorum may yet be withdrawn, its audit record not written."""
LEASE = 60.0
"""Seconds a runner's lease on a running change lasts; it renews it every third of that."""
RUN_LIMIT = 300.0
"""Seconds a runner renews its lease for, unless ``run_limits`` names its action: past that the
action is stuck (an HSM call that never returns cannot be interrupted), its lease lapses and the
change shows interrupted, so that it no longer holds its key. Should the action end after all,
its result is written over that."""

SWITCHES = "switches"
"""The admin record of the operator switches: ``{kind: [names]}``."""
INDEX = "changes"
"""The admin record listing change ids, oldest first (``{"ids": [...]}``)."""
INDEX_KEEP = 500
"""Changes ``list`` reaches; an older one is still read by its id."""
_ATTEMPTS = 20
"""Tries of a read-and-write that keeps losing to other writers before giving up."""
_RUNNING: contextvars.ContextVar[str] = contextvars.ContextVar("hsmgw_running_change", default="")


def running_change() -> str:
    """The id of the change whose action runs in this call ("" outside one): ``ChangeBook`` sets
    it for the action's call only, so that what the action records names the change."""
    return _RUNNING.get()


@dataclass
class Change:
    id: str
    action: str
    params: dict[str, str]
    requested_by: str
    approved_by: list[str]
    state: str
    needed: int
    created: float
    expires: float
    result: str = ""
    runner: str = ""
    """Who runs (or ran) it: host, process and run."""
    lease_until: float = 0.0
    """While running: the time after which, unless renewed, the change is taken as interrupted."""
    origins: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    """Where each admin who asked or approved called from: identity → ``{"peer": …,
    "authenticated_by": "certificate" | "header" | "default"}`` (none for a change recorded
    before origins were)."""
    met: float = 0.0
    """When its approvals met the quorum (0: not yet, or recorded before this was): the admin whose
    approval met it audits that approval and runs the change next (``START_GRACE``)."""


class NotAnotherAdmin(FailedPrecondition):
    """An approval by the change's requester, or by an admin who approved it already."""

    reason = "NEEDS_ANOTHER_ADMIN"


Action = Callable[[dict[str, str]], str]
Edit = Callable[[Change], Change | None]


class EventUnsynced(AuditUnavailable):
    """What ``ChangeBook``'s ``on_event`` raises when the audit log took the event's record but
    could not sync it: the step is taken back as for any event not audited, and since the log
    holds a record saying it was taken, that it was taken back is recorded too
    (``change_request_withdrawn``, ``change_approval_withdrawn``)."""


def _record(change: Change) -> dict[str, Any]:
    return {"action": change.action, "params": change.params, "requested_by": change.requested_by,
            "approved_by": change.approved_by, "state": change.state, "needed": change.needed,
            "created": change.created, "expires": change.expires, "result": change.result,
            "runner": change.runner, "lease_until": change.lease_until, "origins": change.origins,
            "met": change.met}


def _change(change_id: str, body: dict[str, Any]) -> Change:
    try:
        return Change(id=change_id, action=str(body["action"]), params=dict(body["params"]),
                      requested_by=str(body["requested_by"]), approved_by=list(body["approved_by"]),
                      state=str(body["state"]), needed=int(body["needed"]), created=float(body["created"]),
                      expires=float(body["expires"]), result=str(body.get("result", "")),
                      runner=str(body.get("runner", "")),
                      # Written by a version without leases: taken as interrupted once past its expiry.
                      lease_until=float(body.get("lease_until", body["expires"])),
                      origins={str(who): {str(k): str(v) for k, v in dict(where).items()}
                               for who, where in dict(body.get("origins", {})).items()},
                      met=float(body.get("met", 0.0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"malformed change record {change_id!r} in the placement store: {exc!r}") from exc


def _lapse(change: Change, now: float, runner: str = "") -> str:
    """The event of ``change``'s lapse at ``now``: ``change_expired`` (pending past its expiry),
    ``change_interrupted`` (running past its lease, unless ``runner`` is the one running it), or ""."""
    if change.state == PENDING and now >= change.expires:
        return "change_expired"
    if change.state == RUNNING and now >= change.lease_until and not (runner and change.runner == runner):
        return "change_interrupted"
    return ""


def _interrupted(change: Change) -> Change:
    return dataclasses.replace(change, state=INTERRUPTED, result=(
        f"interrupted: the gateway running it ({change.runner or 'unknown'}) stopped before it recorded a result "
        "(its lease lapsed); the change may be partly applied: run hsmctl reconcile, and check what it changes "
        "(hsmctl keys show, hsmctl clusters, hsmctl rebalance --plan) before asking for it again"))


def _only_pending(change: Change, verb: str) -> None:
    if change.state == RUNNING:
        raise FailedPrecondition(f"change {change.id} is running ({change.result}); it can no longer be {verb}: "
                                 "hsmctl changes list --all shows how it ends")
    if change.state != PENDING:
        raise FailedPrecondition(f"change {change.id} is {change.state}; only pending changes can be {verb}")


def _unavailable(exc: StoreError) -> Unavailable:
    return Unavailable(f"placement store is unreachable; admin changes cannot be read or recorded now ({exc})")


class ChangeBook:
    def __init__(
        self,
        store: PlacementStore,
        actions: dict[str, Action],
        *,
        quorum: int = 2,
        ttl: float = 3600.0,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str, str, Change], None] = lambda actor, event, change: None,
        lease: float = LEASE,
        renew_every: float | None = None,
        run_limits: dict[str, float] | None = None,
    ) -> None:
        """``lease``: seconds (on ``clock``) a runner's lease lasts; ``renew_every``: real seconds
        between its renewals while the action runs (default: a third of the lease); ``run_limits``:
        seconds (on ``clock``) an action's lease is renewed for, by action (default ``RUN_LIMIT``)."""
        self._store = store
        self._lock = threading.Lock()  # this process's writers take turns; other processes are met by versions
        self._unrecorded: dict[str, Change] = {}  # changes that ran, by id, whose result the store did not take
        self._actions = actions
        self.quorum = quorum
        self._ttl = ttl
        self._clock = clock
        self._on_event = on_event
        self._lease = lease
        self._renew_every = lease / 3 if renew_every is None else renew_every
        self._run_limits = dict(run_limits or {})

    # -- records

    def _edit(self, name: str, edit: Callable[[dict[str, Any] | None], dict[str, Any] | None]) -> dict[str, Any] | None:
        """``edit_admin_record`` on this book's store: read, edit, write on the version read."""
        return edit_admin_record(self._store, name, edit, attempts=_ATTEMPTS)

    def _list_ids(self, ids: list[str]) -> None:
        """Add change ids to the index (the last ``INDEX_KEEP`` stay); the caller holds ``_lock``."""
        self._edit(INDEX, lambda body: {"ids": [*(body or {}).get("ids", []), *ids][-INDEX_KEEP:]})

    def _update(self, change_id: str, edit: Edit, *, runner: str = "") -> tuple[Change, bool]:
        """The change after ``edit``, and whether ``edit`` changed it (it raises to refuse, or
        returns None to leave the change as it is). A pending change past its expiry is
        marked expired first, and a running one whose lease lapsed interrupted (unless
        ``runner`` is the one running it), and ``edit`` sees it so."""
        seen: list[tuple[Change, bool, str]] = []  # (change, edited, event of a lapse) of the last read
        refused: list[RouterError] = []  # why ``edit`` refused a lapsed change, raised once it is marked

        def step(body: dict[str, Any] | None) -> dict[str, Any] | None:
            seen.clear()
            refused.clear()
            if body is None:
                raise KeyNotFound(f"no change {change_id!r}")
            change = _change(change_id, body)
            lapse = _lapse(change, self._clock(), runner)
            if lapse == "change_expired":
                change = dataclasses.replace(change, state=EXPIRED)
            elif lapse:
                change = _interrupted(change)
            try:
                edited = edit(dataclasses.replace(change, approved_by=list(change.approved_by)))
            except RouterError as exc:
                if not lapse:
                    raise
                refused.append(exc)
                edited = None
            seen.append((edited or change, edited is not None, lapse))
            return _record(edited or change) if edited is not None or lapse else None

        with self._lock:
            try:
                self._edit(f"change/{change_id}", step)
            except StoreError as exc:
                raise _unavailable(exc) from exc
        change, edited, lapse = seen[0]
        if lapse:
            if lapse == "change_interrupted":
                log.error("change %s (%s): %s", change.id, change.action, change.result)
            try:
                self._on_event("-", lapse, change)
            except RouterError as exc:
                # It expired or was interrupted all the same: what reads or acts on it goes on (a
                # status call must show what is wrong). The audit log names the event it could not take.
                log.warning("change %s is %s; its %s event is not in the audit log: %s", change.id, change.state,
                            lapse, exc.message)
        if refused:
            raise refused[0]
        return change, edited

    def get(self, change_id: str) -> Change:
        change, _ = self._update(change_id, lambda change: None)
        return change

    def request(self, actor: str, action: str, params: dict[str, str],
                origin: dict[str, str] | None = None) -> Change:
        """Record a new change; with a quorum of 1 it runs at once. ``origin``: where ``actor``
        called from (``Change.origins``)."""
        if action not in self._actions:
            raise FailedPrecondition(f"unknown action {action!r}")
        now = self._clock()
        change = Change(
            id=secrets.token_hex(4), action=action, params=dict(params), requested_by=actor, approved_by=[actor],
            state=PENDING, needed=self.quorum, created=now, expires=now + self._ttl,
            origins={actor: dict(origin)} if origin else {}, met=now if self.quorum <= 1 else 0.0,
        )
        with self._lock:
            try:
                while True:
                    try:
                        self._store.put_admin_record(f"change/{change.id}", _record(change), 0)
                        break
                    except Stale:  # that id is taken
                        change.id = secrets.token_hex(4)
                self._list_ids([change.id])
            except StoreError as exc:
                raise _unavailable(exc) from exc
        try:
            self._on_event(actor, "change_requested", change)
        except RouterError as exc:  # not audited: it must not be approved
            self._undo(change.id, lambda c: dataclasses.replace(
                c, state=FAILED, result="withdrawn: its request could not be audited") if c.state == PENDING else None,
                actor, "change_request_withdrawn", exc)
            raise
        if len(change.approved_by) >= change.needed:
            return self._run(change.id, actor)
        return change

    def _undo(self, change_id: str, edit: Edit, actor: str, withdrawn: str, failure: RouterError) -> None:
        """Take back a step whose event could not be recorded; the step's caller raises. When the
        log holds the step's record all the same (``EventUnsynced``), the ``withdrawn`` event
        follows it there, so that the log does not say the step stands: at best, as the log may
        not take it either (it then logs that, and counts it)."""
        try:
            change, changed = self._update(change_id, edit)
        except RouterError as exc:
            log.error("change %s: a step that could not be audited could not be taken back either: %s",
                      change_id, exc.message)
            return
        if changed and isinstance(failure, EventUnsynced):
            try:
                self._on_event(actor, withdrawn, change)
            except RouterError:
                pass  # the audit log names the event it could not take

    def approve(self, actor: str, change_id: str, origin: dict[str, str] | None = None) -> Change:
        """Add ``actor``'s approval (``origin``: where it called from); the approval that meets
        the quorum runs the change, and is audited with the outcome ``running``."""
        def add(change: Change) -> Change | None:
            _only_pending(change, "approved")
            if len(change.approved_by) >= change.needed:
                waited = self._clock() - change.met
                if waited < START_GRACE:  # its last approver is auditing that approval, then runs it
                    raise FailedPrecondition(
                        f"change {change_id} has its approvals; the admin whose approval completed them starts it "
                        f"(hsmctl changes list shows it running). If it is still pending in "
                        f"{START_GRACE - waited:.0f} s, approve it again to run it")
                return None  # approved already, and its run never began (its approver stopped): run it now
            if actor in change.approved_by:
                who = "requested" if actor == change.requested_by else "already approved"
                raise NotAnotherAdmin(f"{actor} {who} change {change_id}; another admin must approve it")
            change.approved_by.append(actor)
            if origin:
                change.origins = {**change.origins, actor: dict(origin)}
            if len(change.approved_by) >= change.needed:
                change.met = self._clock()
            return change

        def withdraw(c: Change) -> Change | None:
            if c.state != PENDING or actor not in c.approved_by:
                return None
            return dataclasses.replace(c, approved_by=[a for a in c.approved_by if a != actor],
                                       origins={who: o for who, o in c.origins.items() if who != actor}, met=0.0)

        change, added = self._update(change_id, add)
        met = len(change.approved_by) >= change.needed
        if added:
            try:
                # The approval that meets the quorum sets the change running: this approver runs it next.
                self._on_event(actor, "change_approved", dataclasses.replace(change, state=RUNNING) if met else change)
            except RouterError as exc:  # not audited: it does not count
                self._undo(change_id, withdraw, actor, "change_approval_withdrawn", exc)
                raise
        if met:
            return self._run(change_id, actor)
        return change

    def reject(self, actor: str, change_id: str) -> Change:
        """Reject a pending change: it never runs. Rejected it stays even when its event could not
        be audited (a veto is not taken back): the result then says so."""
        def refuse(change: Change) -> Change:
            _only_pending(change, "rejected")
            return dataclasses.replace(change, state=REJECTED, result=f"rejected by {actor}")

        change, _ = self._update(change_id, refuse)
        try:
            self._on_event(actor, "change_rejected", change)
        except RouterError as exc:
            note = f"{change.result} (not in the audit log: {exc.message})"
            try:
                change, _ = self._update(change_id, lambda c: dataclasses.replace(c, result=note)
                                         if c.state == REJECTED else None)
            except RouterError:
                change = dataclasses.replace(change, result=note)
        return change

    def _run(self, change_id: str, actor: str) -> Change:
        """Run the change whose quorum ``actor``'s approval (or request) met: its result is audited as ``actor``'s."""
        # Claim it: exactly one approver runs it, even across processes and gateways.
        where = f"{socket.gethostname()} pid {os.getpid()}"
        runner = f"{where} run {secrets.token_hex(4)}"

        def claim(c: Change) -> Change | None:
            if c.state != PENDING:
                return None
            return dataclasses.replace(c, state=RUNNING, runner=runner, lease_until=self._clock() + self._lease,
                                       result=f"running on {where}")

        change, claimed = self._update(change_id, claim)
        if not claimed:
            return change
        stop = threading.Event()
        until = self._clock() + self._run_limits.get(change.action, RUN_LIMIT)
        renewer = threading.Thread(target=self._renew, args=(change_id, runner, stop, until), daemon=True,
                                   name=f"lease-{change_id}")
        renewer.start()
        running = _RUNNING.set(change_id)
        try:
            result = self._actions[change.action](change.params)
            state = APPLIED
        except RouterError as exc:
            result, state = exc.message, FAILED
        except StoreError:  # the action read or wrote the store, which did not answer
            result = "the placement store did not answer; the change may be partly applied: check, then try again"
            state = FAILED
        except Exception as exc:  # noqa: BLE001 - recorded; the admin sees a generic failure
            result, state = f"internal error ({type(exc).__name__})", FAILED
        finally:
            _RUNNING.reset(running)
            stop.set()
            renewer.join()
        done = dataclasses.replace(change, state=state, result=result)
        answer = done
        try:
            self._record_result(done)
        except Unavailable:
            # It ran: say so, and write the result once the store answers (``record_results``).
            with self._lock:
                self._unrecorded[change_id] = done
            log.error("change %s (%s) %s: %s; the placement store did not take that result yet, so it shows "
                      "as running until it does", change_id, change.action, state, result)
            answer = dataclasses.replace(done, result=f"{result} (not recorded yet: the placement store is "
                                                      "unreachable; it is written once it answers)")
        try:
            self._on_event(actor, f"change_{state}", done)
        except RouterError as exc:  # it ran: say so, and that the audit log lacks it
            log.error("change %s (%s) %s: %s; this is not in the audit log: %s",
                      change_id, change.action, state, result, exc.message)
            answer = dataclasses.replace(answer, result=f"{answer.result} (not in the audit log: {exc.message})")
        return answer

    def _renew(self, change_id: str, runner: str, stop: threading.Event, until: float) -> None:
        """Renew ``runner``'s lease on a running change until ``stop`` is set, or ``until`` (on
        ``clock``) passes: an action still running then is stuck, and its lease may lapse."""
        def extend(c: Change) -> Change | None:
            if c.state != RUNNING or c.runner != runner:
                return None
            return dataclasses.replace(c, lease_until=self._clock() + self._lease)

        while not stop.wait(self._renew_every):
            if self._clock() >= until:
                log.error("change %s has run past its limit, stuck (an HSM call that does not return?): its lease "
                          "is no longer renewed, so it shows interrupted once the lease lapses and no longer holds "
                          "its key; should it end, its result is written over that", change_id)
                return
            try:
                change, renewed = self._update(change_id, extend, runner=runner)
            except RouterError as exc:  # the next renewal tries again; the result is written over a lapse
                log.warning("change %s: its lease could not be renewed: %s", change_id, exc.message)
                continue
            if not renewed:
                log.error("change %s is %s while this process still runs it: its lease lapsed; its result is "
                          "recorded once it ends", change_id, change.state)
                return

    def _record_result(self, done: Change) -> None:
        # Over an interruption too: another gateway took this runner for gone, and the result is the truth.
        self._update(done.id, lambda c: dataclasses.replace(c, state=done.state, result=done.result)
                     if c.state in (RUNNING, INTERRUPTED) and c.runner == done.runner else None,
                     runner=done.runner)

    def record_results(self) -> None:
        """Write the results of changes that ran while the store did not answer (called
        with every sync); what still fails stays for the next call."""
        with self._lock:
            waiting = list(self._unrecorded.values())
        for done in waiting:
            try:
                self._record_result(done)
            except Unavailable:
                return
            with self._lock:
                self._unrecorded.pop(done.id, None)
            log.info("change %s: its result (%s) is recorded now", done.id, done.state)

    def list(self, *, include_done: bool = False) -> list[Change]:
        """The indexed changes that have not ended (pending, running; every one with
        ``include_done``), oldest first: read together (one request per 100 on DynamoDB).
        A pending one past its expiry is marked expired on the way, and a running one whose
        lease lapsed interrupted."""
        try:
            found = self._store.admin_record(INDEX)
            ids = found[0].get("ids", []) if found else []
            records = self._store.admin_records_named([f"change/{change_id}" for change_id in ids])
        except StoreError as exc:
            raise _unavailable(exc) from exc
        changes = []
        for change_id in ids:
            record = records.get(f"change/{change_id}")
            if record is None:  # listed, but its record was never written
                continue
            try:
                change = _change(change_id, record[0])
            except StoreError as exc:
                raise _unavailable(exc) from exc
            if _lapse(change, self._clock()):
                try:
                    change = self.get(change_id)  # records the expiry or interruption, once
                except KeyNotFound:
                    continue
            changes.append(change)
        return [c for c in changes if include_done or c.state in OPEN]

    def settle(self) -> None:
        """Mark the changes that ended unseen: pending ones past their expiry, running ones
        whose runner's lease lapsed (a gateway's start does this)."""
        self.list()

    # -- operator switches: drained clusters, failed-over regions ------------------------

    def set_switch(self, kind: str, name: str, on: bool,
                   check: Callable[[dict[str, set[str]]], None] | None = None) -> None:
        """Record a switch: every process of every gateway on this store applies it. ``check`` sees
        the switches as they are when the write is made (again, should another writer come first)
        and may refuse it by raising: a check made before the write could let two writers pass."""

        def flip(body: dict[str, Any] | None) -> dict[str, Any] | None:
            switches = dict(body or {})
            names = set(switches.get(kind, []))
            if (name in names) == on:
                return None
            if check is not None:
                check({k: set(v) for k, v in switches.items()})
            switches[kind] = sorted(names | {name} if on else names - {name})
            return switches

        with self._lock:
            try:
                self._edit(SWITCHES, flip)
            except StoreError as exc:
                raise _unavailable(exc) from exc

    def switches(self) -> dict[str, set[str]]:
        """Every kind of switch and the names switched on (raises ``StoreError``)."""
        found = self._store.admin_record(SWITCHES)
        return {kind: set(names) for kind, names in (found[0] if found else {}).items()}

    def carry_over(self, legacy: Path) -> None:
        """Move the switches and pending changes of an admin state file (where earlier versions
        kept them, one per host) into the store, then rename the file ``<name>.migrated``.
        Every process of a gateway may do it at once: what is already there is left."""
        try:  # mode=rw: never creates the file (another process may have just renamed it)
            db = sqlite3.connect(f"file:{legacy}?mode=rw", uri=True)
        except sqlite3.Error:
            return
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            switches = db.execute("SELECT kind, name FROM switches").fetchall() if "switches" in tables else []
            rows = db.execute(
                "SELECT id, action, params, requested_by, approved_by, needed, created, expires "
                "FROM changes WHERE state = ?", (PENDING,)).fetchall() if "changes" in tables else []
        except sqlite3.Error as exc:
            log.error("cannot read the admin state file %s (%s); its switches and pending changes were not "
                      "carried over into the placement store", legacy, exc)
            return
        finally:
            db.close()
        carried = []
        try:
            for kind, name in switches:
                self.set_switch(str(kind), str(name), True)
            for change_id, action, params, requested_by, approved_by, needed, created, expires in rows:
                change = Change(id=change_id, action=action, params=json.loads(params), requested_by=requested_by,
                                approved_by=json.loads(approved_by), state=PENDING, needed=needed, created=created,
                                expires=expires)
                try:
                    self._store.put_admin_record(f"change/{change_id}", _record(change), 0)
                except Stale:  # another process carried it over first
                    continue
                carried.append(change_id)
            if carried:
                with self._lock:
                    self._list_ids(carried)
        except (StoreError, Unavailable) as exc:
            log.error("cannot carry the admin state file %s over into the placement store (%s); "
                      "trying again at the next start", legacy, exc)
            return
        try:
            legacy.rename(legacy.with_name(legacy.name + ".migrated"))
        except FileNotFoundError:  # another process renamed it
            return
        except OSError as exc:
            log.error("carried the admin state file %s over into the placement store but cannot rename it (%s): "
                      "remove it, or the next start carries its switches over again", legacy, exc)
            return
        for suffix in ("-wal", "-shm"):
            legacy.with_name(legacy.name + suffix).unlink(missing_ok=True)
        log.warning("carried %d operator switch(es) and %d pending change(s) over from %s into the placement "
                    "store; the file is no longer used (renamed %s.migrated)",
                    len(switches), len(carried), legacy, legacy.name)

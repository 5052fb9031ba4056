"""Quorum approvals: a mutating admin operation runs only after M distinct admins agree.

A request becomes a pending **change** (the requester's own approval counts as
the first). Each further approval comes from another admin; when the count
reaches the quorum the change runs, once, and its result is recorded. A change
that nobody approves in time expires and never runs. Changes live in an SQLite
file beside the placement store, so every gateway process sees the same ones.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from router.errors import AlreadyExists, FailedPrecondition, KeyNotFound, RouterError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS switches (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS changes (
    id TEXT PRIMARY KEY,
    action TEXT NOT NULL,
    params TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    approved_by TEXT NOT NULL,
    state TEXT NOT NULL,
    needed INTEGER NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    result TEXT NOT NULL DEFAULT ''
);
"""

PENDING, APPLIED, REJECTED, EXPIRED, FAILED, RUNNING = "pending", "applied", "rejected", "expired", "failed", "running"


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
    extra: dict[str, str] = field(default_factory=dict)


Action = Callable[[dict[str, str]], str]


class ChangeBook:
    def __init__(
        self,
        path: str | Path,
        actions: dict[str, Action],
        *,
        quorum: int = 2,
        ttl: float = 3600.0,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str, str, Change], None] = lambda actor, event, change: None,
    ) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._actions = actions
        self.quorum = quorum
        self._ttl = ttl
        self._clock = clock
        self._on_event = on_event

    def _row(self, row: tuple[Any, ...]) -> Change:
        return Change(
            id=row[0], action=row[1], params=json.loads(row[2]), requested_by=row[3],
            approved_by=json.loads(row[4]), state=row[5], needed=row[6], created=row[7], expires=row[8],
            result=row[9],
        )

    def _get(self, change_id: str) -> Change:
        rows = self._db.execute("SELECT * FROM changes WHERE id = ?", (change_id,)).fetchall()
        if not rows:
            raise KeyNotFound(f"no change {change_id!r}")
        change = self._row(rows[0])
        if change.state == PENDING and self._clock() >= change.expires:
            self._db.execute("UPDATE changes SET state = ? WHERE id = ? AND state = ?", (EXPIRED, change_id, PENDING))
            change.state = EXPIRED
            self._on_event("-", "change_expired", change)
        return change

    def get(self, change_id: str) -> Change:
        with self._lock:
            return self._get(change_id)

    def request(self, actor: str, action: str, params: dict[str, str]) -> Change:
        """Record a new change; with a quorum of 1 it runs at once."""
        if action not in self._actions:
            raise FailedPrecondition(f"unknown action {action!r}")
        now = self._clock()
        change = Change(
            id=secrets.token_hex(4), action=action, params=dict(params), requested_by=actor, approved_by=[actor],
            state=PENDING, needed=self.quorum, created=now, expires=now + self._ttl,
        )
        with self._lock:
            self._db.execute(
                "INSERT INTO changes VALUES (?,?,?,?,?,?,?,?,?,?)",
                (change.id, action, json.dumps(change.params), actor, json.dumps(change.approved_by), PENDING,
                 change.needed, change.created, change.expires, ""),
            )
        self._on_event(actor, "change_requested", change)
        if len(change.approved_by) >= change.needed:
            return self._run(change.id)
        return change

    def approve(self, actor: str, change_id: str) -> Change:
        with self._lock:
            change = self._get(change_id)
            if change.state != PENDING:
                raise FailedPrecondition(f"change {change_id} is {change.state}; only pending changes can be approved")
            if actor in change.approved_by:
                who = "requested" if actor == change.requested_by else "already approved"
                raise AlreadyExists(f"{actor} {who} change {change_id}; another admin must approve it")
            change.approved_by.append(actor)
            self._db.execute("UPDATE changes SET approved_by = ? WHERE id = ?",
                             (json.dumps(change.approved_by), change_id))
        self._on_event(actor, "change_approved", change)
        if len(change.approved_by) >= change.needed:
            return self._run(change_id)
        return change

    def reject(self, actor: str, change_id: str) -> Change:
        with self._lock:
            change = self._get(change_id)
            if change.state != PENDING:
                raise FailedPrecondition(f"change {change_id} is {change.state}; only pending changes can be rejected")
            self._db.execute("UPDATE changes SET state = ?, result = ? WHERE id = ?",
                             (REJECTED, f"rejected by {actor}", change_id))
            change.state, change.result = REJECTED, f"rejected by {actor}"
        self._on_event(actor, "change_rejected", change)
        return change

    def _run(self, change_id: str) -> Change:
        with self._lock:
            # Claim it: exactly one approver runs it, even across processes.
            claimed = self._db.execute(
                "UPDATE changes SET state = ? WHERE id = ? AND state = ?", (RUNNING, change_id, PENDING)
            ).rowcount
            change = self._get(change_id)
        if claimed != 1:
            return change
        try:
            result = self._actions[change.action](change.params)
            state = APPLIED
        except RouterError as exc:
            result, state = exc.message, FAILED
        except Exception as exc:  # noqa: BLE001 - recorded; the admin sees a generic failure
            result, state = f"internal error ({type(exc).__name__})", FAILED
        with self._lock:
            self._db.execute("UPDATE changes SET state = ?, result = ? WHERE id = ?", (state, result, change_id))
            change = self._get(change_id)
        self._on_event("-", f"change_{state}", change)
        return change

    def list(self, *, include_done: bool = False) -> list[Change]:
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM changes ORDER BY created").fetchall()]
            changes = [self._get(i) for i in ids]
        return [c for c in changes if include_done or c.state == PENDING]

    # -- operator switches: drained clusters, failed-over regions ------------------------

    def set_switch(self, kind: str, name: str, on: bool) -> None:
        """Record a switch so restarts and other worker processes see it."""
        with self._lock:
            if on:
                self._db.execute("INSERT OR IGNORE INTO switches VALUES (?, ?)", (kind, name))
            else:
                self._db.execute("DELETE FROM switches WHERE kind = ? AND name = ?", (kind, name))

    def switches(self, kind: str) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT name FROM switches WHERE kind = ?", (kind,))}

    def close(self) -> None:
        self._db.close()

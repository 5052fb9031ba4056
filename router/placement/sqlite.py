"""The embedded default placement store: one SQLite file (WAL mode).

Several worker processes may share the file; SQLite serialises writers and
``change_counter`` (a row bumped on every write) lets each process's cache see
the others' changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from router.model import KeyAlgorithm, KeyState, KeyStorage, KeyUsage, Placement
from router.placement.store import (
    ChangeLog,
    Conflict,
    PlacementStore,
    Stale,
    StoreError,
    StoreMisconfigured,
    new_fleet_id,
)

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS placements (
    key_id TEXT PRIMARY KEY,
    algorithm TEXT NOT NULL,
    usage TEXT NOT NULL,
    state TEXT NOT NULL,
    primary_cluster TEXT NOT NULL,
    replicas TEXT NOT NULL DEFAULT '[]',
    create_time REAL NOT NULL,
    request_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    storage TEXT NOT NULL DEFAULT 'TOKEN',
    version INTEGER NOT NULL DEFAULT 1,
    extractable INTEGER NOT NULL DEFAULT 1,
    wrapped BLOB NOT NULL DEFAULT x'',
    public_der BLOB NOT NULL DEFAULT x'',
    copies INTEGER NOT NULL DEFAULT 1,
    held INTEGER NOT NULL DEFAULT 0,
    owner TEXT NOT NULL DEFAULT '',
    destroyed_material BLOB NOT NULL DEFAULT x''
);
CREATE UNIQUE INDEX IF NOT EXISTS placements_request ON placements(request_id);
CREATE TABLE IF NOT EXISTS changes (id INTEGER PRIMARY KEY CHECK (id = 1), counter INTEGER NOT NULL);
INSERT OR IGNORE INTO changes (id, counter) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS change_log (counter INTEGER PRIMARY KEY, key_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS admin_records (name TEXT PRIMARY KEY, body TEXT NOT NULL, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_ADDED_COLUMNS = (
    ("extractable", "INTEGER NOT NULL DEFAULT 1"),
    ("wrapped", "BLOB NOT NULL DEFAULT x''"),
    ("public_der", "BLOB NOT NULL DEFAULT x''"),
    ("copies", "INTEGER NOT NULL DEFAULT 1"),
    ("held", "INTEGER NOT NULL DEFAULT 0"),
    ("owner", "TEXT NOT NULL DEFAULT ''"),
    ("destroyed_material", "BLOB NOT NULL DEFAULT x''"),
)

_COLUMNS = (
    "key_id, algorithm, usage, state, primary_cluster, replicas, create_time, "
    "request_id, fingerprint, storage, version, extractable, wrapped, public_der, copies, held, owner, "
    "destroyed_material"
)
_PLACES = ",".join("?" * len(_COLUMNS.split(",")))


_SCAN_PAGE = 2000
_LOG_KEEP = 100_000
"""Changes the log remembers; a cache further behind than this rescans."""

_TUPLES: dict[str, tuple[str, ...]] = {}


def _replicas(text: str) -> tuple[str, ...]:
    """The replicas tuple, shared between rows: a million keys name a handful of clusters."""
    replicas = _TUPLES.get(text)
    if replicas is None:
        replicas = _TUPLES.setdefault(text, tuple(sys.intern(n) for n in json.loads(text)))
    return replicas


_ALGORITHMS = {a.value: a for a in KeyAlgorithm}
_USAGES = {u.value: u for u in KeyUsage}
_STATES = {s.value: s for s in KeyState}
_STORAGES = {s.value: s for s in KeyStorage}


def _row(row: tuple) -> Placement:  # type: ignore[type-arg]
    # Dict lookups, not Enum(value) calls: a cache loads a million rows at start.
    return Placement(
        key_id=row[0],
        algorithm=_ALGORITHMS[row[1]],
        usage=_USAGES[row[2]],
        state=_STATES[row[3]],
        primary=sys.intern(row[4]),
        replicas=_replicas(row[5]),
        create_time=row[6],
        request_id=row[7],
        fingerprint=row[8],
        storage=_STORAGES[row[9]],
        version=row[10],
        extractable=bool(row[11]),
        wrapped=bytes(row[12]),
        public_der=bytes(row[13]),
        copies=row[14],
        held=bool(row[15]),
        owner=row[16],
        destroyed_material=bytes(row[17]),
    )


def _values(p: Placement) -> tuple:  # type: ignore[type-arg]
    return (
        p.key_id,
        p.algorithm.value,
        p.usage.value,
        p.state.value,
        p.primary,
        json.dumps(list(p.replicas)),
        p.create_time,
        p.request_id,
        p.fingerprint,
        p.storage.value,
        p.version,
        int(p.extractable),
        p.wrapped,
        p.public_der,
        p.copies,
        int(p.held),
        p.owner,
        p.destroyed_material,
    )


def _unusable(path: Path) -> str | None:
    """Why ``path`` cannot hold a store whatever the time (sqlite's own error does not say), if it cannot."""
    try:
        return _unusable_path(path)
    except OSError as exc:  # the path cannot even be looked at: a name too long, a loop of links…
        return exc.strerror or str(exc)


def _unusable_path(path: Path) -> str | None:
    directory = path.parent
    if not directory.is_dir():
        return f"the directory {directory} does not exist"
    if path.is_dir():
        return "it is a directory"
    # The journal (-wal, -shm) is written next to the file: the directory must be writable too.
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"this user ({os.getuid()}) cannot write to the directory {directory}"
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return f"this user ({os.getuid()}) cannot read and write it"
    return None


def _create_private(path: Path) -> None:
    """Make a new store file owner-only (0600), before SQLite makes it with the process's umask:
    its WAL and shared-memory files take the database file's mode. Writing the store comes close
    to holding keys (docs/security.md); an existing file keeps the mode its operator gave it."""
    if str(path) == ":memory:":
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass  # there already (a directory too), or another process made it just now
    except OSError:
        pass  # no such directory, not writable, a name too long: opening it fails below, and says why


class SqliteStore(PlacementStore):
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        _create_private(Path(self.path))
        try:
            self._db = self._connect()
            self._db.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.Error as exc:
            problem = _unusable(Path(self.path))
            if problem:
                raise StoreMisconfigured(f"cannot open placement store {self.path}: {problem}") from exc
            raise StoreError(f"cannot open placement store {self.path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        except BaseException:
            db.close()
            raise
        return db

    def _reopen(self, why: sqlite3.Error) -> None:
        """Replace a connection left in a transaction its ROLLBACK could not end: every later
        ``BEGIN`` on it would fail, and every read see that transaction's snapshot.
        Called with ``_lock`` held."""
        log.warning("placement store %s: a failed transaction could not be rolled back (%s); reopening the store",
                    self.path, why)
        try:
            fresh = self._connect()
        except sqlite3.Error as exc:  # the next write that finds the connection so tries again
            log.warning("placement store %s could not be reopened: %s", self.path, exc)
            return
        stale, self._db = self._db, fresh
        with contextlib.suppress(sqlite3.Error):
            stale.close()  # closing rolls back what the connection had not committed

    def _migrate(self) -> None:
        """Add columns that newer versions introduced to an older store file. The gateway's
        worker processes open the file at once: another may add a column between the look and
        the change, and the column is there all the same."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(placements)")}
        for column, ddl in _ADDED_COLUMNS:
            if column not in have:
                try:
                    self._db.execute(f"ALTER TABLE placements ADD COLUMN {column} {ddl}")
                except sqlite3.OperationalError as exc:
                    if "duplicate column name" not in str(exc):
                        raise

    def _begin(self, how: str) -> sqlite3.Cursor:
        """A cursor in a new transaction (``BEGIN`` or ``BEGIN IMMEDIATE``). Called with ``_lock`` held."""
        if self._db.in_transaction:  # left so by a failed roll-back that could not reopen then
            self._reopen(sqlite3.OperationalError("the connection is still in a transaction"))
        cur = self._db.cursor()
        cur.execute(how)
        return cur

    def _abandon(self, cur: sqlite3.Cursor) -> None:
        """End a transaction that failed. SQLite has rolled back already after some errors (a
        read-only or full disk, an I/O error): a second ROLLBACK would fail and hide the first
        error. A connection whose ROLLBACK fails is replaced. Called with ``_lock`` held."""
        if self._db.in_transaction:
            try:
                cur.execute("ROLLBACK")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    cur.close()  # a statement it holds would keep the old connection (and its lock)
                    self._reopen(exc)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:  # type: ignore[type-arg]
        try:
            with self._lock:
                return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"placement store error: {exc}") from exc

    def _write(self, key_id: str, statements: list[tuple[str, tuple]]) -> int:  # type: ignore[type-arg]
        """Run statements (changing ``key_id``'s record) in one transaction with the change
        counter and the change log; rowcount of the first."""
        try:
            with self._lock:
                cur = self._begin("BEGIN IMMEDIATE")
                try:
                    first = -1
                    for sql, args in statements:
                        cur.execute(sql, args)
                        if first < 0:
                            first = cur.rowcount
                    cur.execute("UPDATE changes SET counter = counter + 1 WHERE id = 1")
                    cur.execute("INSERT INTO change_log (counter, key_id) SELECT counter, ? FROM changes", (key_id,))
                    cur.execute("DELETE FROM change_log WHERE counter <= (SELECT counter FROM changes) - ?",
                                (_LOG_KEEP,))
                    cur.execute("COMMIT")
                    return first
                except BaseException:
                    self._abandon(cur)
                    raise
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise StoreError(f"placement store error: {exc}") from exc

    def fleet_id(self, proposed: str | None = None) -> str:
        found = self.existing_fleet_id()
        if found is None:
            # The first writer's id stays: every other process's insert is ignored, and it reads that one.
            self._query("INSERT OR IGNORE INTO meta (name, value) VALUES ('fleet_id', ?)",
                        (proposed or new_fleet_id(),))
            found = self.existing_fleet_id()
        assert found is not None  # made just now, by this call or another
        return found

    def existing_fleet_id(self) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE name = 'fleet_id'")
        return str(rows[0][0]) if rows else None

    def get(self, key_id: str) -> Placement | None:
        rows = self._query(f"SELECT {_COLUMNS} FROM placements WHERE key_id = ?", (key_id,))
        return _row(rows[0]) if rows else None

    def by_request(self, request_id: str) -> Placement | None:
        rows = self._query(f"SELECT {_COLUMNS} FROM placements WHERE request_id = ?", (request_id,))
        return _row(rows[0]) if rows else None

    def create(self, placement: Placement) -> None:
        try:
            self._write(
                placement.key_id,
                [(f"INSERT INTO placements ({_COLUMNS}) VALUES ({_PLACES})", _values(placement))]
            )
        except sqlite3.IntegrityError as exc:
            existing = self.get(placement.key_id) or self.by_request(placement.request_id)
            raise Conflict(existing) from exc

    def update(self, placement: Placement) -> Placement:
        new = dataclasses.replace(placement, version=placement.version + 1)
        values = _values(new)
        count = self._write(
            placement.key_id,
            [
                (
                    "UPDATE placements SET algorithm=?, usage=?, state=?, primary_cluster=?, replicas=?, "
                    "create_time=?, request_id=?, fingerprint=?, storage=?, version=?, extractable=?, "
                    "wrapped=?, public_der=?, copies=?, held=?, owner=?, destroyed_material=? "
                    "WHERE key_id=? AND version=? AND request_id=?",
                    (*values[1:], placement.key_id, placement.version, placement.request_id),
                )
            ]
        )
        if count != 1:
            raise Conflict(self.get(placement.key_id))
        return new

    def delete(self, key_id: str, version: int) -> None:
        count = self._write(key_id, [("DELETE FROM placements WHERE key_id=? AND version=?", (key_id, version))])
        if count != 1:
            raise Conflict(self.get(key_id))

    def list(self, prefix: str = "", after: str = "", limit: int = 100) -> list[Placement]:
        # Range scan on the primary key instead of LIKE, so '%' and '_' in ids are literal.
        upper = prefix + "\U0010ffff"
        lower = max(prefix, after)
        rows = self._query(
            f"SELECT {_COLUMNS} FROM placements WHERE key_id > ? AND key_id >= ? AND key_id < ? "
            "ORDER BY key_id LIMIT ?",
            (after, lower, upper, limit),
        )
        return [_row(r) for r in rows]

    def scan(self) -> Iterator[Placement]:
        # A page at a time: a million rows at once would cost a worker gigabytes.
        after = ""
        while True:
            rows = self._query(
                f"SELECT {_COLUMNS} FROM placements WHERE key_id > ? ORDER BY key_id LIMIT {_SCAN_PAGE}", (after,)
            )
            for row in rows:
                yield _row(row)
            if len(rows) < _SCAN_PAGE:
                return
            after = rows[-1][0]

    def change_counter(self) -> int:
        return int(self._query("SELECT counter FROM changes WHERE id = 1")[0][0])

    def change_log(self) -> ChangeLog:
        return _SqliteChangeLog(self, self.change_counter())

    def changes_since(self, counter: int) -> tuple[int, tuple[str, ...]] | None:
        """The change counter now and the ids of the keys written since ``counter``;
        None when the log no longer reaches back to ``counter``."""
        try:
            with self._lock:
                cur = self._begin("BEGIN")  # one snapshot for the counter and the log
                try:
                    now = int(cur.execute("SELECT counter FROM changes WHERE id = 1").fetchone()[0])
                    rows = cur.execute("SELECT counter, key_id FROM change_log WHERE counter > ?",
                                       (counter,)).fetchall()
                    cur.execute("COMMIT")
                except BaseException:
                    # Left open, the read's snapshot would be every later read's: the cache
                    # would learn no change again.
                    self._abandon(cur)
                    raise
        except sqlite3.Error as exc:
            raise StoreError(f"placement store error: {exc}") from exc
        if counter < 0 or len(rows) != now - counter:
            return None  # the log does not cover every change since ``counter``
        return now, tuple(dict.fromkeys(key_id for _, key_id in rows))

    def admin_record(self, name: str) -> tuple[dict[str, Any], int] | None:
        rows = self._query("SELECT body, version FROM admin_records WHERE name = ?", (name,))
        return (json.loads(rows[0][0]), int(rows[0][1])) if rows else None

    def admin_records_named(self, names: Sequence[str]) -> dict[str, tuple[dict[str, Any], int]]:
        unique = list(dict.fromkeys(names))
        found = {}
        for start in range(0, len(unique), 500):  # well under SQLite's limit on parameters
            chunk = unique[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            for name, body, version in self._query(
                    f"SELECT name, body, version FROM admin_records WHERE name IN ({marks})", tuple(chunk)):
                found[name] = (json.loads(body), int(version))
        return found

    def admin_records(self) -> Iterator[tuple[str, dict[str, Any], int]]:
        for name, body, version in self._query("SELECT name, body, version FROM admin_records ORDER BY name"):
            yield name, json.loads(body), int(version)

    def put_admin_record(self, name: str, body: dict[str, Any], version: int) -> int:
        text = json.dumps(body, sort_keys=True)
        try:
            with self._lock:
                if version == 0:
                    count = self._db.execute("INSERT OR IGNORE INTO admin_records VALUES (?, ?, 1)",
                                             (name, text)).rowcount
                else:
                    count = self._db.execute(
                        "UPDATE admin_records SET body = ?, version = version + 1 WHERE name = ? AND version = ?",
                        (text, name, version)).rowcount
        except sqlite3.Error as exc:
            raise StoreError(f"placement store error: {exc}") from exc
        if count != 1:
            raise Stale(name)
        return version + 1

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _SqliteChangeLog(ChangeLog):
    def __init__(self, store: SqliteStore, counter: int) -> None:
        self._store = store
        self._counter: int | None = counter

    def read(self) -> tuple[str, ...] | None:
        if self._counter is None:
            return None
        feed = self._store.changes_since(self._counter)
        if feed is None:
            self._counter = None
            return None
        self._counter, key_ids = feed
        return key_ids

"""The tamper-evident audit log: a hash-chained JSON-lines file.

Format
    One record per line, UTF-8, each line the canonical JSON of the record
    (``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)``)
    followed by ``\\n``::

        {"action": "keys.move", "actor": "alice", "details": {...}, "hash": "…",
         "outcome": "ok", "prev": "…", "seq": 7, "target": "payments/k1",
         "time": "2025-01-02T03:04:05.000000+00:00"}

    ``seq``
        1 for the first record, then consecutive.
    ``time``
        ISO 8601, UTC, from the log's injected clock.
    ``actor``, ``action``, ``target``, ``outcome``
        Who did what to which object, and how it ended (``ok``, ``denied``,
        ``failed``, ``pending``, ...).
    ``details``
        A JSON object of anything else worth keeping. Never secrets: detail keys
        named like a PIN, password, secret or private key are refused, and so are
        ``bytes`` values (pass a hex fingerprint instead).
    ``prev``
        Hex SHA-256 of the previous record's line bytes (without the ``\\n``);
        64 zeros for the first record.
    ``hash``
        Hex SHA-256 of the canonical JSON of this record without ``hash``.

    A record may carry ``details.unwritten``: the events this process could not
    append since its previous record (the file was unwritable), as ``{"events": n,
    "actions": {action: n}, "since": time, "error": why}``. The gap is thus in the
    chain itself, and :func:`verify` counts it. Those events are in the gateway's
    log (each failed write is an ERROR line naming its event); a process that stops
    before it writes again leaves its note unwritten.

    Several threads and several processes may append to one file: every append
    takes an exclusive ``flock`` on the file, re-reads the last line under it to
    get ``prev`` and ``seq``, writes the whole line in one ``write`` and fsyncs.

What it detects, and what it does not
    :func:`verify` finds an edited byte (the record's hash, its canonical form or
    the next record's ``prev`` no longer matches), a deleted line (a ``seq`` gap),
    reordered lines (``seq`` out of order, ``prev`` of another record), a truncated
    last line and lines that are not JSON, and names the line and record.

    The chain protects against *careless or partial* tampering only. Nothing in it
    is secret, so someone who can write the file can rewrite every record after the
    one they change and recompute all hashes, or simply drop records from the end;
    the result verifies. Operators anchor the chain outside the box:

    * ship records off-box as they are written (syslog/SIEM, write-once storage),
      so a rewritten local copy disagrees with the shipped one;
    * periodically record :meth:`AuditLog.head` — ``(seq, hash)`` of the last
      record — somewhere the gateway host cannot write (a ticket, another system's
      log, a signed note) and pass it back as ``verify(path, anchor=(seq, hash))``,
      which fails unless that exact record is still in the chain. Records up to an
      anchor cannot be rewritten or removed without detection.

Logging bridge
    :class:`AuditHandler` turns records of the ``hsmgw.audit`` logger (one JSON
    object per message, see :func:`gateway.auth.audit`) into appended records.
    The logger must be enabled for INFO for those messages to exist.

Errors
    ``ValueError``
        ``append`` refused a detail: a secret-looking key, a ``bytes`` value, a
        non-finite float or a string that is not valid Unicode.
    ``TypeError``
        ``append`` got a value JSON cannot hold (or a non-string field).
    :class:`AuditLogError`
        The existing file cannot be extended or read: its last line is truncated
        or not a record. Run :func:`verify` to see what is wrong; the log is never
        repaired silently.
    :class:`AuditSyncError` (an :class:`AuditLogError`)
        The record's line was written whole, but the fsync of the file (or, for a
        new file, of its directory) failed: the record is in the chain, but may not
        survive a crash.
    ``OSError``
        From the filesystem, unchanged.

    A write that fails (``OSError``, :class:`AuditLogError`) is logged as one ERROR
    line naming the event, counted (``on_failure``) and noted in the next record this
    process writes; the exception still reaches the caller, which decides whether the
    operation may go on without its record (``gateway.auth.audit(required=True)``).
    A record written but not synced (:class:`AuditSyncError`) is no gap: it is logged
    as one ERROR line naming the event and counted (``on_unsynced``), never noted as
    unwritten; the exception reaches the caller too, since the record's durability is
    in doubt.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "AUDIT_LOGGER",
    "GENESIS",
    "AuditHandler",
    "AuditLog",
    "AuditLogError",
    "AuditSyncError",
    "Unwritten",
    "WriteFailure",
    "VerifyResult",
    "digest",
    "tail",
    "take_failure",
    "verify",
]

log = logging.getLogger(__name__)  # not AUDIT_LOGGER: what is said about the audit log is not audited

AUDIT_LOGGER = "hsmgw.audit"
"""The logger whose records :class:`AuditHandler` appends."""

GENESIS = "0" * 64
"""``prev`` of the first record."""

_FIELDS = ("seq", "time", "actor", "action", "target", "outcome", "details", "prev", "hash")
_TEXT_FIELDS = ("time", "actor", "action", "target", "outcome", "prev", "hash")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 8192
_FILE_MODE = 0o600

# Key names are split into words (snake_case, kebab-case, camelCase) so that "pin"
# catches "so_pin" and "userPin" but not "pinned" or "spin".
_SECRET_WORDS = frozenset({"pin", "sopin", "userpin", "pwd", "passwd", "privkey"})
_SECRET_PARTS = ("password", "passphrase", "secret", "privatekey")
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")


class AuditLogError(Exception):
    """The audit file cannot be extended or read, or did not durably take a record; the message says why."""


class AuditSyncError(AuditLogError):
    """A record's line was written whole, but fsync of the file (or, for a new file, of its
    directory) failed: the record is in the file, and the chain goes on from it, but it may
    not survive a crash or a power loss. The ``OSError`` is the ``__cause__``."""

    def __init__(self, path: Path, record: dict[str, Any], exc: OSError) -> None:
        self.record = record
        """The record as written."""
        self.reason = exc.strerror or str(exc)
        super().__init__(f"{path}: record {record['seq']} was written but could not be synced: {self.reason}")


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :func:`verify`."""

    ok: bool
    """True when every line is an intact record of the chain (and the anchor, if given, is in it)."""
    records: int
    """Records that checked out before the first problem (all of them when ``ok``)."""
    problem: str | None = None
    """What is wrong and where, e.g. ``line 7 (seq 7): hash does not match its contents (edited?)``."""
    line: int | None = None
    """1-based line number of the problem, when it has one."""
    unwritten: int = 0
    """Events the records checked say could not be written (``details.unwritten``): gaps the
    gateway admitted, not tampering."""
    unwritten_noted_at: tuple[int, ...] = ()
    """The ``seq`` of each record that notes such a gap."""


@dataclass(frozen=True)
class Unwritten:
    """What one process could not append since its last record (see ``details.unwritten``)."""

    events: int
    """How many events were lost."""
    actions: Mapping[str, int]
    """How many of each action."""
    since: str
    """When the first of them was (ISO 8601, UTC)."""
    error: str
    """Why the last of them could not be written."""

    def as_detail(self) -> dict[str, Any]:
        return {"events": self.events, "actions": dict(self.actions), "since": self.since, "error": self.error}


@dataclass(frozen=True)
class WriteFailure:
    """This process's last append, when it failed (see :meth:`AuditLog.failing`)."""

    at: str
    """When it failed (ISO 8601, UTC)."""
    error: str
    """Why."""
    written: bool = False
    """The record is in the file, but could not be synced (:class:`AuditSyncError`)."""


# -- the writer ----------------------------------------------------------------------


class AuditLog:
    """Appends hash-chained records to ``path``; safe across threads and processes.

    The file is opened for each append so that every writer — thread or forked
    process — holds its own ``flock`` (locks belong to an open file description,
    which a fork would otherwise share).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time,
        on_failure: Callable[[str], None] = lambda action: None,
        on_unsynced: Callable[[str], None] = lambda action: None,
    ) -> None:
        """``on_failure(action)``: called once for each record that could not be written, and is
        noted as unwritten in the next (a metric). ``on_unsynced(action)``: once for each record
        written whose sync failed (another metric)."""
        self.path = Path(path)
        self._clock = clock
        self._on_failure = on_failure
        self._on_unsynced = on_unsynced
        self._lock = threading.Lock()
        self._unwritten: Unwritten | None = None
        self._failing: WriteFailure | None = None

    def failing(self) -> WriteFailure | None:
        """The last append of this process to finish, if it failed; None once one since succeeded.

        Only a record written clears it: the file opening, or its last line reading, says
        nothing of a full disk. While it is set, what must be audited before it runs is refused."""
        with self._lock:
            return self._failing

    def unwritten(self) -> Unwritten | None:
        """The events this process could not write since its last record, None if none."""
        with self._lock:
            return self._unwritten

    def _failed(self, actor: str, action: str, target: str, outcome: str, exc: BaseException) -> None:
        why = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
        with self._lock:
            lost = self._unwritten
            actions = dict(lost.actions) if lost else {}
            actions[action] = actions.get(action, 0) + 1
            now = _iso(self._clock())
            self._unwritten = Unwritten(events=(lost.events if lost else 0) + 1, actions=actions,
                                        since=lost.since if lost else now, error=why)
            self._failing = WriteFailure(at=now, error=why)
        # One line, no traceback: the event it names is what an operator needs, and a log shipper keeps.
        log.error("audit log %s cannot be written: %s; the %s event (actor %s, target %s, outcome %s) is not in it",
                  self.path, why, action, actor, target or "-", outcome,
                  extra={"audit_event": action, "audit_actor": actor, "audit_target": target,
                         "audit_outcome": outcome, "audit_error": why})
        try:
            self._on_failure(action)
        except Exception:  # noqa: BLE001 - a metric must never turn a refusal into a crash
            log.exception("counting an audit write failure failed")

    def _unsynced(self, actor: str, action: str, target: str, outcome: str, exc: AuditSyncError) -> None:
        with self._lock:
            self._failing = WriteFailure(at=_iso(self._clock()), error=exc.reason, written=True)
        # Not a gap (the record is in the chain, and no later one notes it), but a crash may lose it.
        log.error("audit log %s could not be synced: %s; the %s event (actor %s, target %s, outcome %s) is record "
                  "%d, written but not known to be on disk", self.path, exc.reason, action, actor, target or "-",
                  outcome, exc.record["seq"],
                  extra={"audit_event": action, "audit_actor": actor, "audit_target": target,
                         "audit_outcome": outcome, "audit_error": exc.reason, "audit_seq": exc.record["seq"]})
        try:
            self._on_unsynced(action)
        except Exception:  # noqa: BLE001 - a metric must never turn a refusal into a crash
            log.exception("counting an audit sync failure failed")

    def _take_unwritten(self) -> Unwritten | None:
        """The events to note in the record about to be written, forgotten in the same step: two
        threads writing at once must not both note them, or ``verify`` counts the gap twice."""
        with self._lock:
            noted, self._unwritten = self._unwritten, None
            return noted

    def _put_back(self, noted: Unwritten) -> None:
        """The record that was to note ``noted`` was not written: remember those events again,
        with any lost since (their error is the latest)."""
        with self._lock:
            now = self._unwritten
            if now is None:
                self._unwritten = noted
                return
            actions = dict(noted.actions)
            for action, n in now.actions.items():
                actions[action] = actions.get(action, 0) + n
            self._unwritten = Unwritten(events=noted.events + now.events, actions=actions, since=noted.since,
                                        error=now.error)

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r})"

    def check(self) -> None:
        """Make sure records can be appended (the file is created if missing, and its last
        line is a complete record); :class:`AuditLogError` says why not. For start-up:
        a gateway that cannot audit must not take admin changes."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        except OSError as exc:
            raise AuditLogError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            last = _last_line(fd, os.fstat(fd).st_size, self.path)
            if last is not None:
                _parse_seq(last, self.path)
        finally:
            os.close(fd)

    def append(self, actor: str, action: str, target: str, outcome: str = "ok", **details: object) -> dict[str, Any]:
        """Append one record and return it as written (after its line is fsynced).

        Raises ``ValueError`` for a secret-looking detail key or a ``bytes`` value,
        ``TypeError`` for a value JSON cannot hold, :class:`AuditLogError` when the
        file's last line is not a complete record, :class:`AuditSyncError` when the
        line was written but could not be synced.
        """
        return self._append(actor, action, target, outcome, details)

    def _append(
        self, actor: str, action: str, target: str, outcome: str, details: Mapping[str, object]
    ) -> dict[str, Any]:
        for name, value in (("actor", actor), ("action", action), ("target", target), ("outcome", outcome)):
            if not isinstance(value, str):
                raise TypeError(f"audit {name} must be a str, not {type(value).__name__}")
            _check_text(value, name)
        clean = _clean_details(details)
        noted = self._take_unwritten()
        if noted is not None:
            clean["unwritten"] = noted.as_detail()
        try:
            record = self._write(actor, action, target, outcome, clean)
        except AuditSyncError as exc:  # the line, with any note it carries, is in the file
            self._unsynced(actor, action, target, outcome, exc)
            raise
        except BaseException as exc:
            if noted is not None:
                self._put_back(noted)
            if isinstance(exc, (OSError, AuditLogError)):
                self._failed(actor, action, target, outcome, exc)
            raise
        with self._lock:
            self._failing = None
        if noted is not None:
            log.warning("audit log %s is written again; record %d notes the %d event(s) that could not be",
                        self.path, record["seq"], noted.events)
        return record

    def _write(self, actor: str, action: str, target: str, outcome: str, clean: dict[str, Any]) -> dict[str, Any]:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Under the lock: nobody else is between reading the tail and writing.
            size = os.fstat(fd).st_size
            last = _last_line(fd, size, self.path)
            if last is None:
                seq, prev = 1, GENESIS
            else:
                seq, prev = _parse_seq(last, self.path) + 1, _sha256(last)
            record: dict[str, Any] = {
                "seq": seq,
                "time": _iso(self._clock()),
                "actor": actor,
                "action": action,
                "target": target,
                "outcome": outcome,
                "details": clean,
                "prev": prev,
            }
            record["hash"] = _sha256(_canonical(record))
            _write_all(fd, _canonical(record) + b"\n")
            try:
                os.fsync(fd)
                if size == 0:
                    _fsync_dir(self.path.parent)  # the file's directory entry is new
            except OSError as exc:
                raise AuditSyncError(self.path, record, exc) from exc
        finally:
            os.close(fd)  # releases the lock
        return record

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last record, ``(0, GENESIS)`` for an empty or missing log.

        Keep this pair somewhere the gateway host cannot write, and later pass it
        to ``verify(path, anchor=...)``.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0, GENESIS
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            last = _last_line(fd, os.fstat(fd).st_size, self.path)
        finally:
            os.close(fd)
        if last is None:
            return 0, GENESIS
        record = _load(last)
        if record is None or not isinstance(record.get("hash"), str):
            raise AuditLogError(f"{self.path}: the last line is not an audit record; run verify")
        return _parse_seq(last, self.path), record["hash"]


def digest(value: object) -> str:
    """Hex SHA-256 of ``value``'s canonical JSON (as a record is written: keys sorted, no spaces,
    UTF-8): a detail that stands for something too long to repeat in every record."""
    return _sha256(_canonical(value))


# -- readers --------------------------------------------------------------------------


def verify(path: str | os.PathLike[str], *, anchor: tuple[int, str] | None = None) -> VerifyResult:
    """Check the whole chain in ``path`` and report the first problem, naming its line.

    ``anchor`` is a ``(seq, hash)`` pair from :meth:`AuditLog.head` kept off-box;
    when given, that record must still be in the chain with that hash, which also
    catches records dropped from the end and a rewritten chain.
    """
    path = Path(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return VerifyResult(False, 0, f"{path}: no such file", None)
    with handle:
        # Only the bytes present when a writer was not mid-line; appends after that
        # point cannot change them, so writers are blocked for an instant, not a scan.
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
        size = os.fstat(handle.fileno()).st_size
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return _verify_lines(path, _numbered_lines(handle, size), anchor)


def tail(path: str | os.PathLike[str], n: int) -> list[dict[str, Any]]:
    """The last ``n`` records, oldest first (not verified: use :func:`verify` for that)."""
    if n <= 0:
        return []
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        size = os.fstat(fd).st_size
        end = size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            raise AuditLogError(f"{path}: the last line is incomplete (truncated write?); run verify")
        data = b""
        # Read backwards until we hold n complete lines (n + 1 newlines, or the file start).
        while end > 0 and data.count(b"\n") <= n:
            start = max(0, end - _CHUNK)
            data = os.pread(fd, end - start, start) + data
            end = start
    finally:
        os.close(fd)
    lines = data.split(b"\n")[:-1]  # drop what follows the final newline
    if end > 0:
        lines = lines[1:]  # the first piece may be the end of an earlier line
    records = []
    for raw in lines[-n:]:
        record = _load(raw)
        if record is None:
            raise AuditLogError(f"{path}: a line near the end is not an audit record; run verify")
        records.append(record)
    return records


# -- the logging bridge -----------------------------------------------------------


class AuditHandler(logging.Handler):
    """Appends each ``hsmgw.audit`` log message to an :class:`AuditLog`.

    A message is one JSON object. Its ``actor``/``action``/``target``/``outcome``/
    ``details`` keys are used as they are; the event form that
    :func:`gateway.auth.audit` writes is mapped too (``event`` → action,
    ``identity`` or ``peer`` → actor, ``resource`` or ``method`` → target, an
    ``….denied``/``….failed`` event or ``"ok": false`` → outcome). Remaining keys
    go to ``details``; secret-looking keys are withheld rather than the whole
    event dropped. A message that is not JSON is kept as ``details.message``.
    Records of other loggers are ignored, so attaching the handler too high up
    cannot flood the audit log.

    A message that cannot be appended is never a traceback: an unwritable file is one
    ERROR line naming the event (:class:`AuditLog`), a message the log refuses (a
    value JSON cannot hold) one ERROR line with the reason. Either way the failure is
    left for :func:`take_failure`, so that the code that logged the event learns, in
    its own thread, that it is not in the log.
    """

    def __init__(self, audit_log: AuditLog, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.audit_log = audit_log

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != AUDIT_LOGGER and not record.name.startswith(AUDIT_LOGGER + "."):
            return
        try:
            actor, action, target, outcome, details = _from_message(record.getMessage())
            self.audit_log._append(actor, action, target, outcome, details)
        except (OSError, AuditLogError) as exc:  # logged and counted by the log
            _FAILURE.error = exc
        except Exception as exc:  # noqa: BLE001 - a logging handler must not raise
            _FAILURE.error = exc
            log.error("audit event not written: %s: %s", type(exc).__name__, exc)


class _Failure(threading.local):
    error: BaseException | None = None


_FAILURE = _Failure()


def take_failure() -> BaseException | None:
    """Why the last audit message this thread logged was not appended (None: it was, or no
    :class:`AuditHandler` is attached); clears it. Clear it before logging, read it after."""
    error, _FAILURE.error = _FAILURE.error, None
    return error


def _from_message(message: str) -> tuple[str, str, str, str, dict[str, Any]]:
    try:
        fields = json.loads(message)
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        return "-", "log", "", "ok", {"message": message}
    fields = dict(fields)
    fields.pop("time", None)  # the record has its own time
    event = fields.pop("event", None)
    ok = fields.pop("ok", None) if "outcome" not in fields else None

    def text(*keys: str, default: str) -> str:
        for key in keys:
            value = fields.get(key)
            if value not in (None, ""):
                del fields[key]
                return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        return default

    action = text("action", default=str(event) if event else "log")
    actor = text("actor", "identity", default=str(fields.get("peer", "-")))
    target = text("target", "resource", "method", default="")
    if "outcome" in fields:
        outcome = text("outcome", default="ok")
    elif isinstance(event, str) and event.rsplit(".", 1)[-1] in ("denied", "failed"):
        outcome = event.rsplit(".", 1)[-1]
    else:
        outcome = "failed" if ok is False else "ok"
    if event is not None and action != event:
        fields["event"] = event
    nested = fields.pop("details", None)
    details: dict[str, Any] = dict(nested) if isinstance(nested, dict) else {}
    if nested is not None and not isinstance(nested, dict):
        details["details"] = nested
    details.update(fields)
    withheld = sorted(_withhold(details))
    if withheld:
        details["withheld"] = withheld
    return actor, action, target, outcome, {str(k): v for k, v in details.items()}


def _withhold(value: object, path: str = "") -> Iterator[str]:
    """Remove secret-looking keys in place (at any depth) and yield their paths."""
    if isinstance(value, dict):
        for key in list(value):
            here = f"{path}.{key}" if path else str(key)
            if _is_secret_name(str(key)):
                del value[key]
                yield here
            else:
                yield from _withhold(value[key], here)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _withhold(item, f"{path}[{i}]")


# -- helpers --------------------------------------------------------------------------


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc).isoformat(timespec="microseconds")


def _is_secret_name(name: str) -> bool:
    words = [w.lower() for w in _WORD.findall(name)]
    if any(w in _SECRET_WORDS for w in words):
        return True
    squashed = "".join(words)
    return any(part in squashed for part in _SECRET_PARTS)


def _check_text(value: str, where: str) -> None:
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"audit {where} is not valid Unicode (lone surrogate?)") from exc


def _clean_details(details: Mapping[str, object]) -> dict[str, Any]:
    return _clean_mapping(details, "")


def _clean_mapping(mapping: Mapping[Any, object], where: str) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for key, value in mapping.items():
        here = f"{where}.{key}" if where else str(key)
        if not isinstance(key, str):
            raise TypeError(f"audit detail {here!r}: keys must be str, not {type(key).__name__}")
        _check_text(key, f"detail key {here!r}")
        if _is_secret_name(key):
            raise ValueError(f"audit detail {here!r} looks like a secret; never log PINs, passwords or keys")
        clean[key] = _clean(value, here)
    return clean


def _clean(value: object, where: str) -> Any:
    """A JSON-native copy of ``value``; refuse secrets and anything JSON cannot hold."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"audit detail {where!r} is {value}, which JSON cannot hold")
        return value
    if isinstance(value, str):
        _check_text(value, f"detail {where!r}")
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"audit detail {where!r} is bytes; pass a hex fingerprint, never key material")
    if isinstance(value, Mapping):
        return _clean_mapping(value, where)
    if isinstance(value, (list, tuple)):
        return [_clean(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"audit detail {where!r}: {type(value).__name__} is not JSON; convert it first")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _last_line(fd: int, size: int, path: Path) -> bytes | None:
    """The last line without its newline, None for an empty file."""
    if size == 0:
        return None
    if os.pread(fd, 1, size - 1) != b"\n":
        raise AuditLogError(f"{path}: the last line is incomplete (truncated write?); run verify")
    data = b""
    pos = size - 1  # the final newline is not part of the line
    while pos > 0:
        step = min(_CHUNK, pos)
        pos -= step
        data = os.pread(fd, step, pos) + data
        cut = data.rfind(b"\n")
        if cut >= 0:
            return data[cut + 1 :]
    return data


def _parse_seq(line: bytes, path: Path) -> int:
    record = _load(line)
    seq = record.get("seq") if record is not None else None
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise AuditLogError(f"{path}: the last line is not an audit record; run verify")
    return seq


def _load(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line.decode())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _numbered_lines(handle: Any, limit: int | None = None) -> Iterator[tuple[int, bytes, bool]]:
    """``(line number, bytes without newline, ended with a newline)`` of the first ``limit`` bytes."""
    left = limit
    for number, raw in enumerate(handle, start=1):
        if left is not None:
            if left <= 0:
                return
            raw = raw[:left]
            left -= len(raw)
        if raw.endswith(b"\n"):
            yield number, raw[:-1], True
        else:
            yield number, raw, False


def _shape_problem(record: dict[str, Any]) -> str | None:
    missing = [name for name in _FIELDS if name not in record]
    if missing:
        return "missing " + ", ".join(repr(m) for m in missing)
    extra = sorted(set(record) - set(_FIELDS))
    if extra:
        return "unexpected " + ", ".join(repr(e) for e in extra)
    seq = record["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool):
        return "'seq' is not an integer"
    for name in _TEXT_FIELDS:
        if not isinstance(record[name], str):
            return f"{name!r} is not a string"
    if not isinstance(record["details"], dict):
        return "'details' is not an object"
    for name in ("prev", "hash"):
        if not _HEX64.fullmatch(record[name]):
            return f"{name!r} is not a hex SHA-256"
    return None


def _verify_lines(path: Path, lines: Iterator[tuple[int, bytes, bool]], anchor: tuple[int, str] | None) -> VerifyResult:
    good = 0
    expected_seq = 1
    prev_digest = GENESIS
    anchor_seen = False
    unwritten = 0
    noted_at: list[int] = []

    def fail(number: int | None, problem: str) -> VerifyResult:
        return VerifyResult(False, good, problem, number, unwritten, tuple(noted_at))

    for number, raw, complete in lines:
        if not complete:
            return fail(number, f"line {number}: last line is truncated (no newline at the end; incomplete write?)")
        if not raw:
            return fail(number, f"line {number}: empty line")
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            return fail(number, f"line {number}: not valid UTF-8 (edited?)")
        try:
            record = json.loads(text)
        except ValueError:
            return fail(number, f"line {number}: not valid JSON (edited?)")
        if not isinstance(record, dict):
            return fail(number, f"line {number}: not a JSON object (edited?)")
        shape = _shape_problem(record)
        seq = record.get("seq")
        where = f"line {number} (seq {seq})" if isinstance(seq, int) else f"line {number}"
        if shape:
            return fail(number, f"{where}: not an audit record: {shape} (edited?)")
        body = {k: v for k, v in record.items() if k != "hash"}
        if _sha256(_canonical(body)) != record["hash"]:
            return fail(number, f"{where}: hash does not match its contents (edited?)")
        if _canonical(record) != raw:
            return fail(number, f"{where}: bytes differ from the record's canonical form (edited?)")
        if seq != expected_seq:
            return fail(
                number,
                f"line {number}: expected seq {expected_seq}, found seq {seq} "
                f"({_seq_hint(path, expected_seq, seq, number)})",
            )
        if record["prev"] != prev_digest:
            before = f"line {number - 1}" if number > 1 else "the start of the chain"
            return fail(number, f"{where}: 'prev' does not match {before} (a record replaced or reordered?)")
        if anchor is not None and seq == anchor[0]:
            if record["hash"] != anchor[1]:
                return fail(number, f"{where}: hash differs from the anchor {anchor[1][:16]}… (chain rewritten?)")
            anchor_seen = True
        good += 1
        expected_seq = seq + 1
        prev_digest = _sha256(raw)
        lost = _unwritten_events(record["details"])
        if lost:
            unwritten += lost
            noted_at.append(seq)

    if anchor is not None and not anchor_seen and anchor[0] > 0:
        return fail(
            None,
            f"anchored record seq {anchor[0]} is missing: the log ends at seq {expected_seq - 1} "
            f"(records removed from the end?)",
        )
    if anchor is not None and anchor[0] == 0 and anchor[1] != GENESIS:
        return fail(None, "anchor (0, …) must carry the genesis hash")
    return VerifyResult(True, good, None, None, unwritten, tuple(noted_at))


def _unwritten_events(details: dict[str, Any]) -> int:
    note = details.get("unwritten")
    events = note.get("events") if isinstance(note, dict) else None
    return events if isinstance(events, int) and not isinstance(events, bool) and events > 0 else 0


def _seq_hint(path: Path, expected: int, found: object, number: int) -> str:
    """Why ``found`` sits where ``expected`` should: deleted, or moved elsewhere."""
    if isinstance(found, int) and found < expected:
        return f"record {found} appears twice or lines are out of order"
    elsewhere = _line_of_seq(path, expected, skip=number)
    if elsewhere is not None:
        return f"record {expected} is at line {elsewhere}: lines swapped or reordered?"
    if isinstance(found, int) and found > expected + 1:
        return f"records {expected}..{found - 1} deleted?"
    return f"record {expected} deleted?"


def _line_of_seq(path: Path, seq: int, *, skip: int) -> int | None:
    with open(path, "rb") as handle:
        for number, raw, _ in _numbered_lines(handle):
            if number == skip:
                continue
            record = _load(raw)
            if record is not None and record.get("seq") == seq:
                return number
    return None

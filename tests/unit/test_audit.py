"""The audit log: concurrent writers keep one chain; any tampering is found and named."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import (
    GENESIS,
    AuditLog,
    AuditLogError,
    tail,
    verify,
)
from tests.support import FakeClock
from tests.support import audit_bridged as _bridged

T0 = 1_735_787_045.0  # 2025-01-02T03:04:05Z


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


@pytest.fixture(scope="module")
def pristine_200(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 200-record log written once (200 fsyncs are the slow part); tests tamper with copies."""
    original = tmp_path_factory.mktemp("pristine") / "audit.jsonl"
    write_log(original, 200)
    assert verify(original).ok
    return original


@pytest.fixture
def log_200(path: Path, pristine_200: Path) -> AuditLog:
    shutil.copyfile(pristine_200, path)
    return AuditLog(path)


def write_log(path: Path, count: int) -> AuditLog:
    clock = FakeClock(T0)
    log = AuditLog(path, clock=clock)
    for i in range(count):
        clock.now += 1
        log.append("alice", "keys.move", f"payments/key-{i}", outcome="ok", to="cluster-b", n=i)
    return log


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


# -- concurrent writers -----------------------------------------------------------


def append_many(path: str, writer: str, count: int, go: Any) -> None:
    """Run in a thread or a spawned process; ``go`` releases every writer at once."""
    go.wait(10)
    log = AuditLog(path)
    for i in range(count):
        log.append(writer, "keys.sign", f"k{i}", i=i)


def test_threads_and_processes_share_one_unbroken_chain(path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")  # forking a threaded pytest is unsafe
    go = ctx.Event()
    processes = [ctx.Process(target=append_many, args=(str(path), f"proc-{p}", 50, go)) for p in range(2)]
    threads = [threading.Thread(target=append_many, args=(str(path), f"thread-{t}", 25, go)) for t in range(4)]
    for worker in [*processes, *threads]:
        worker.start()
    go.set()
    for thread in threads:
        thread.join(30)
    for process in processes:
        process.join(30)
        assert process.exitcode == 0

    result = verify(path)
    assert result.ok, result.problem
    assert result.records == 200
    records = tail(path, 500)
    assert [r["seq"] for r in records] == list(range(1, 201))
    # Every append landed exactly once, and each writer's own order survived.
    by_writer: dict[str, list[int]] = {}
    for record in records:
        by_writer.setdefault(record["actor"], []).append(record["details"]["i"])
    assert by_writer == {
        **{f"proc-{p}": list(range(50)) for p in range(2)},
        **{f"thread-{t}": list(range(25)) for t in range(4)},
    }
    assert AuditLog(path).head() == (200, records[-1]["hash"])


def test_verify_while_writers_append_sees_a_consistent_prefix(path: Path) -> None:
    write_log(path, 1)
    go = threading.Event()
    go.set()
    writer = threading.Thread(target=append_many, args=(str(path), "busy", 100, go))
    writer.start()
    seen = []
    while writer.is_alive():
        result = verify(path)
        assert result.ok, result.problem
        seen.append(result.records)
    writer.join()
    assert seen == sorted(seen)
    assert verify(path).records == 101


# -- the format -------------------------------------------------------------------


def test_record_format_is_the_documented_chain(path: Path) -> None:
    log = AuditLog(path, clock=FakeClock(T0))
    first = log.append("alice", "clusters.drain", "eu-1/a", outcome="pending", change="c-17", approvals=["bob"])
    second = log.append("bob", "changes.approve", "c-17")

    assert first["time"] == "2025-01-02T03:04:05.000000+00:00"
    assert first["seq"] == 1 and first["prev"] == GENESIS
    assert first["details"] == {"change": "c-17", "approvals": ["bob"]}
    raw = lines_of(path)
    assert [json.loads(line) for line in raw] == [first, second]
    for record in (first, second):
        body = {k: v for k, v in record.items() if k != "hash"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert record["hash"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert second["seq"] == 2
    assert second["prev"] == hashlib.sha256(raw[0].rstrip(b"\n")).hexdigest()
    assert second["outcome"] == "ok"


def test_non_ascii_and_long_records_chain_and_verify(path: Path) -> None:
    log = AuditLog(path, clock=FakeClock(T0))
    log.append("zoë", "keys.generate", "ключ/1", note="x" * 20_000)  # longer than one read chunk
    log.append("zoë", "keys.destroy", "ключ/1", note="line\nbreak\u2028sep")
    assert "ключ" in path.read_text(encoding="utf-8")
    assert verify(path).ok
    assert [r["seq"] for r in tail(path, 1)] == [2]
    assert log.head()[0] == 2


def test_an_empty_or_missing_log(path: Path) -> None:
    assert AuditLog(path).head() == (0, GENESIS)
    result = verify(path)
    assert not result.ok and "no such file" in (result.problem or "")
    path.touch()
    assert verify(path).ok and verify(path).records == 0
    assert tail(path, 5) == []


# -- tampering --------------------------------------------------------------------


def test_an_edited_byte_is_named(path: Path, log_200: AuditLog) -> None:
    lines = lines_of(path)
    lines[136] = lines[136].replace(b"keys.move", b"keys.mova")
    rewrite(path, lines)

    result = verify(path)
    assert not result.ok
    assert result.line == 137
    assert result.records == 136
    assert result.problem == "line 137 (seq 137): hash does not match its contents (edited?)"


def test_every_single_byte_edit_of_a_line_is_caught_at_that_line(path: Path) -> None:
    write_log(path, 12)
    original = lines_of(path)
    k = 7
    for offset in range(len(original[k - 1])):  # includes the newline
        line = bytearray(original[k - 1])
        line[offset] = ord("x") if line[offset] != ord("x") else ord("y")
        rewrite(path, [*original[: k - 1], bytes(line), *original[k:]])
        result = verify(path)
        assert not result.ok, f"edit at offset {offset} went unnoticed"
        assert result.line == k, (offset, result.problem)
        assert result.problem is not None and result.problem.startswith(f"line {k}")


def test_a_record_rewritten_with_a_fresh_hash_breaks_the_next_link(path: Path) -> None:
    write_log(path, 10)
    lines = lines_of(path)
    record = json.loads(lines[3])
    record["outcome"] = "denied"
    body = {k: v for k, v in record.items() if k != "hash"}
    record["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    lines[3] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    rewrite(path, lines)

    result = verify(path)
    assert not result.ok and result.line == 5
    assert result.problem == "line 5 (seq 5): 'prev' does not match line 4 (a record replaced or reordered?)"


@pytest.mark.parametrize("k", [1, 5, 100, 199])
def test_a_deleted_line_is_named(path: Path, log_200: AuditLog, k: int) -> None:
    lines = lines_of(path)
    del lines[k - 1]
    rewrite(path, lines)

    result = verify(path)
    assert not result.ok and result.line == k
    assert result.problem == f"line {k}: expected seq {k}, found seq {k + 1} (record {k} deleted?)"


def test_several_deleted_lines_are_named(path: Path) -> None:
    write_log(path, 20)
    lines = lines_of(path)
    del lines[4:7]
    rewrite(path, lines)

    result = verify(path)
    assert result.line == 5
    assert result.problem == "line 5: expected seq 5, found seq 8 (records 5..7 deleted?)"


@pytest.mark.parametrize(("a", "b"), [(5, 6), (3, 150), (1, 2)])
def test_swapped_lines_are_named(path: Path, log_200: AuditLog, a: int, b: int) -> None:
    lines = lines_of(path)
    lines[a - 1], lines[b - 1] = lines[b - 1], lines[a - 1]
    rewrite(path, lines)

    result = verify(path)
    assert not result.ok and result.line == a
    assert result.problem == (
        f"line {a}: expected seq {a}, found seq {b} (record {a} is at line {b}: lines swapped or reordered?)"
    )


@pytest.mark.parametrize("cut", [1, 2, 40])
def test_a_truncated_last_line_is_named(path: Path, log_200: AuditLog, cut: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-cut])

    result = verify(path)
    assert not result.ok and result.line == 200
    assert "truncated" in (result.problem or "")
    # Writers refuse to chain onto a broken tail rather than hide it.
    with pytest.raises(AuditLogError, match="incomplete"):
        log_200.append("alice", "keys.move", "k")
    assert path.read_bytes() == data[:-cut]
    with pytest.raises(AuditLogError):
        tail(path, 3)


def test_a_line_that_is_not_json_is_named(path: Path) -> None:
    write_log(path, 10)
    lines = lines_of(path)
    lines.insert(6, b"rm -rf / # oops\n")
    rewrite(path, lines)

    result = verify(path)
    assert result.line == 7 and result.problem == "line 7: not valid JSON (edited?)"


def test_a_rewritten_chain_needs_the_off_box_anchor_to_be_caught(path: Path) -> None:
    """The documented limit: whoever can write the file can forge a whole new chain."""
    log = write_log(path, 10)
    anchor = log.head()
    assert verify(path, anchor=anchor).ok

    forged = path.with_suffix(".forged")
    forger = AuditLog(forged, clock=FakeClock(T0))
    for i in range(10):
        forger.append("alice", "keys.move", f"payments/key-{i}", outcome="ok", to="cluster-EVIL", n=i)
    forged.replace(path)

    assert verify(path).ok  # self-consistent...
    result = verify(path, anchor=anchor)  # ...but not the chain the operator anchored
    assert not result.ok and result.line == 10
    assert "anchor" in (result.problem or "")


def test_records_dropped_from_the_end_are_caught_by_the_anchor(path: Path) -> None:
    log = write_log(path, 10)
    anchor = log.head()
    rewrite(path, lines_of(path)[:8])

    assert verify(path).ok
    result = verify(path, anchor=anchor)
    assert not result.ok
    assert result.problem == (
        "anchored record seq 10 is missing: the log ends at seq 8 (records removed from the end?)"
    )


# -- secrets ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "details",
    [
        {"pin": "1234"},
        {"so_pin": "1234"},
        {"userPin": "1234"},
        {"password": "hunter2"},
        {"db_password": "hunter2"},
        {"client_secret": "s"},
        {"private_key": "-----BEGIN"},
        {"privateKey": "-----BEGIN"},
        {"auth": {"user": "a", "pin": "1234"}},
        {"steps": [{"passphrase": "x"}]},
        {"wrapped": b"\x00\x01"},
        {"key": bytearray(b"\x00")},
        {"parts": ["ok", b"\x00"]},
    ],
)
def test_secrets_are_refused_and_nothing_is_written(path: Path, details: dict[str, Any]) -> None:
    log = write_log(path, 3)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="secret|bytes"):
        log.append("alice", "keys.import", "k", **details)
    assert path.read_bytes() == before


def test_fingerprints_and_lookalike_names_are_allowed(path: Path) -> None:
    log = AuditLog(path, clock=FakeClock(T0))
    record = log.append("alice", "keys.import", "k", fingerprint="ab" * 32, pinned=True, spin=1, key_id="k")
    assert record["details"]["fingerprint"] == "ab" * 32
    assert verify(path).ok


def test_values_json_cannot_hold_are_refused(path: Path) -> None:
    log = AuditLog(path, clock=FakeClock(T0))
    with pytest.raises(TypeError, match="when"):
        log.append("alice", "a", "t", when=object())
    with pytest.raises(ValueError, match="nan"):
        log.append("alice", "a", "t", ratio=float("nan"))
    assert not path.exists() or path.read_bytes() == b""


# -- the logging bridge -----------------------------------------------------------




@pytest.fixture
def audit_logger(path: Path) -> Iterator[tuple[logging.Logger, AuditLog]]:
    log = AuditLog(path, clock=FakeClock(T0))
    with _bridged(log) as logger:
        yield logger, log


def test_handler_appends_audit_messages(audit_logger: tuple[logging.Logger, AuditLog], path: Path) -> None:
    logger, _ = audit_logger
    logger.info(
        json.dumps(
            {
                "actor": "mallory",
                "action": "Sign",
                "target": "hr/payroll",
                "outcome": "denied",
                "details": {"reason": "no grant"},
            }
        )
    )
    logger.info(json.dumps({"actor": "bob", "action": "clusters.drain", "target": "eu-1/a"}))

    assert verify(path).ok
    first, second = tail(path, 2)
    assert (first["actor"], first["action"], first["target"], first["outcome"]) == (
        "mallory",
        "Sign",
        "hr/payroll",
        "denied",
    )
    assert first["details"] == {"reason": "no grant"}
    assert (second["actor"], second["outcome"]) == ("bob", "ok")


def test_handler_records_the_gateways_own_denials(audit_logger: tuple[logging.Logger, AuditLog], path: Path) -> None:
    from gateway.auth import audit

    audit(
        "authz.denied",
        identity="mallory",
        method="/hsmgw.v1.CryptoService/Sign",
        operation="Sign",
        peer="ipv4:127.0.0.1:5555",
        message="identity 'mallory' may not Sign keys under 'hr/'",
        resource="hr/pay",
    )

    (record,) = tail(path, 1)
    assert (record["actor"], record["action"], record["target"], record["outcome"]) == (
        "mallory",
        "authz.denied",
        "hr/pay",
        "denied",
    )
    assert record["details"]["operation"] == "Sign"
    assert verify(path).ok


def test_handler_withholds_secrets_but_keeps_the_event(
    audit_logger: tuple[logging.Logger, AuditLog], path: Path
) -> None:
    logger, _ = audit_logger
    logger.info(json.dumps({"actor": "ops", "action": "tokens.login", "target": "eu-1/a", "so_pin": "1234"}))
    logger.info("not json at all")
    logging.getLogger("hsmgw.other").warning(json.dumps({"actor": "x", "action": "y", "target": "z"}))

    login, text = tail(path, 5)
    assert "1234" not in path.read_text()
    assert login["details"] == {"withheld": ["so_pin"]}
    assert text["details"] == {"message": "not json at all"}
    assert AuditLog(path).head()[0] == 2  # the other logger's message is not audit


# -- tail -------------------------------------------------------------------------


def test_tail_returns_the_last_records_oldest_first(path: Path, log_200: AuditLog) -> None:
    assert [r["seq"] for r in tail(path, 3)] == [198, 199, 200]
    assert [r["seq"] for r in tail(path, 1000)] == list(range(1, 201))
    assert tail(path, 0) == []
    assert tail(path, 3)[-1]["target"] == "payments/key-199"


# -- a log that cannot be written ---------------------------------------------------


@pytest.fixture
def unwritable(path: Path) -> Iterator[Callable[[bool], None]]:
    """``unwritable(True)`` puts a directory where the log is (no append can succeed, root's
    included); ``unwritable(False)`` puts the log back."""
    kept = path.with_name("kept.jsonl")

    def switch(on: bool) -> None:
        if on:
            path.rename(kept)
            path.mkdir()
        else:
            path.rmdir()
            kept.rename(path)

    yield switch
    if path.is_dir():
        switch(False)


def test_an_event_the_log_cannot_take_is_one_error_line_counted_and_noted_in_the_next_record(
    path: Path, unwritable: Callable[[bool], None], caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gateway.auth import audit

    failed: list[str] = []
    log = AuditLog(path, clock=FakeClock(T0), on_failure=failed.append)
    with _bridged(log):
        audit("authz.granted", identity="maker", resource="ok/k1")
        unwritable(True)
        with caplog.at_level(logging.ERROR, logger="gateway.audit"):
            audit("key.generated", identity="maker", resource="ok/k2")  # after the fact: goes on
            audit("authz.denied", identity="maker", resource="hr/k3")
        assert failed == ["key.generated", "authz.denied"]
        errors = [r for r in caplog.records if r.name == "gateway.audit" and r.levelno == logging.ERROR]
        assert [getattr(r, "audit_event", None) for r in errors] == ["key.generated", "authz.denied"]
        assert all(r.exc_info is None for r in errors), "a line, not a traceback"
        assert "the key.generated event (actor maker, target ok/k2" in errors[0].getMessage()
        assert "Logging error" not in capsys.readouterr().err
        assert log.unwritten() is not None and log.unwritten().events == 2

        unwritable(False)  # writable again: nothing to restart
        audit("authz.granted", identity="maker", resource="ok/k4")
    first, noting = tail(path, 2)
    assert noting["target"] == "ok/k4"
    note = noting["details"]["unwritten"]
    assert (note["events"], note["actions"]) == (2, {"authz.denied": 1, "key.generated": 1})
    assert "since" in note and note["error"]
    assert log.unwritten() is None
    result = verify(path)
    assert result.ok and (result.unwritten, result.unwritten_noted_at) == (2, (noting["seq"],))


_FLOCK_SYSCALL = {"x86_64": 73, "aarch64": 32}


def _wait_in_flock(threads: list[threading.Thread]) -> None:
    """Until each thread waits for the file lock (Linux: the syscall it is in)."""
    number = _FLOCK_SYSCALL.get(os.uname().machine)
    if number is None or not Path("/proc/self/task").is_dir():
        pytest.skip("needs Linux /proc on x86_64 or aarch64 to see a thread wait for a lock")
    waiting: set[int] = set()
    for _ in range(2000):
        for t in threads:
            try:
                call = Path(f"/proc/self/task/{t.native_id}/syscall").read_text().split()
            except OSError:
                continue
            if call and call[0] == str(number):
                waiting.add(t.native_id or 0)
        if len(waiting) == len(threads):
            return
        time.sleep(0.005)
    raise AssertionError(f"only {len(waiting)} of {len(threads)} writers reached the file lock")


def test_a_gap_is_noted_once_by_writers_racing_after_it(path: Path, unwritable: Callable[[bool], None]) -> None:
    """Two threads write at once after a gap: one record notes it, and verify counts it once."""
    log = AuditLog(path, clock=FakeClock(T0))
    log.append("maker", "authz.granted", "ok/k1")
    unwritable(True)
    with pytest.raises(OSError):
        log.append("maker", "key.generated", "ok/k2")
    unwritable(False)

    holder = os.open(path, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # as another process appending: both threads queue behind it
    try:
        writers = [threading.Thread(target=log.append, args=("maker", "authz.granted", f"ok/r{i}"))
                   for i in range(2)]
        for w in writers:
            w.start()
        _wait_in_flock(writers)  # both have taken what they note, if anything
    finally:
        os.close(holder)
    for w in writers:
        w.join(timeout=30)
    records = tail(path, 10)
    assert sorted(r["target"] for r in records[1:]) == ["ok/r0", "ok/r1"]
    assert [r["details"].get("unwritten", {}).get("events") for r in records[1:]].count(1) == 1, records
    result = verify(path)
    assert result.ok and result.unwritten == 1, result
    assert log.unwritten() is None


def test_a_note_whose_record_fails_is_kept_with_the_new_loss(path: Path, unwritable: Callable[[bool], None]) -> None:
    log = AuditLog(path, clock=FakeClock(T0))
    log.append("maker", "authz.granted", "ok/k")
    unwritable(True)
    for action in ("key.generated", "authz.denied", "key.generated"):
        with pytest.raises(OSError):
            log.append("maker", action, "ok/k")
    lost = log.unwritten()
    assert lost is not None and (lost.events, dict(lost.actions)) == (3, {"key.generated": 2, "authz.denied": 1})
    unwritable(False)
    log.append("maker", "authz.granted", "ok/k")
    record = tail(path, 1)[0]
    assert record["details"]["unwritten"]["events"] == 3 and verify(path).unwritten == 3


def test_a_required_event_the_log_cannot_take_raises(path: Path, unwritable: Callable[[bool], None]) -> None:
    from gateway.auth import AuditUnwritten, audit

    with _bridged(AuditLog(path)):
        audit("authz.granted", required=True, identity="maker")
        unwritable(True)
        with pytest.raises(AuditUnwritten, match="authz.granted"):
            audit("authz.granted", required=True, identity="maker")
        audit("authz.denied", identity="maker")  # not required: no exception
        unwritable(False)
        audit("authz.granted", required=True, identity="maker")
    assert [r["action"] for r in tail(path, 5)] == ["authz.granted", "authz.granted"]


def test_caller_strings_are_clipped_and_escaped_in_events(audit_logger: tuple[logging.Logger, AuditLog],
                                                          path: Path) -> None:
    from gateway.auth import audit

    audit("authz.denied", identity="spiffe://hsmgw/" + "a" * 3000, resource="x\x1b[2J\x9b\u202e" + "k" * 500,
          message="m" * 5000, resources=["r" * 300])
    (record,) = tail(path, 1)
    assert record["actor"] == ("spiffe://hsmgw/" + "a" * 3000)[:200] + "…"
    assert record["target"].startswith("x\\x1b[2J\\x9b\\u202e") and len(record["target"]) == 201
    assert len(record["details"]["message"]) == 1001
    assert record["details"]["resources"] == ["r" * 200 + "…"]
    raw = path.read_bytes()
    assert b"\x1b" not in raw and "\x9b".encode() not in raw and "\u202e".encode() not in raw

"""Quorum changes and operator switches kept in the placement store: two ChangeBooks on one
store are two gateways, each with its own process and its own view."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.quorum import (
    APPLIED,
    EXPIRED,
    FAILED,
    INTERRUPTED,
    PENDING,
    REJECTED,
    RUNNING,
    ChangeBook,
    NotAnotherAdmin,
    running_change,
)
from router.errors import FailedPrecondition, KeyNotFound, Unavailable
from router.placement import SqliteStore, StoreError
from tests.support import FakeClock, wait_for


class Actions:
    """The actions a book may run; records each run."""

    def __init__(self) -> None:
        self.ran: list[dict[str, str]] = []
        self.lock = threading.Lock()

    def drain(self, params: dict[str, str]) -> str:
        with self.lock:
            self.ran.append(params)
        return f"cluster {params['cluster']} drained"


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "placements.db"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


@pytest.fixture
def actions() -> Actions:
    return Actions()


@pytest.fixture
def books(store_path: Path, clock: FakeClock, actions: Actions) -> Iterator[list[ChangeBook]]:
    stores = [SqliteStore(store_path) for _ in range(2)]  # two gateways, one store
    yield [ChangeBook(s, {"drain": actions.drain}, quorum=2, ttl=600, clock=clock) for s in stores]
    for s in stores:
        s.close()


def test_a_change_requested_through_one_gateway_is_approved_through_another_and_runs_once(
    books: list[ChangeBook], actions: Actions
) -> None:
    a, b = books
    change = a.request("alice", "drain", {"cluster": "use1-b"})
    assert change.state == PENDING and actions.ran == []
    assert [c.id for c in b.list()] == [change.id]  # the other gateway lists it

    with pytest.raises(NotAnotherAdmin, match="another admin must approve it"):
        b.approve("alice", change.id)
    done = b.approve("bob", change.id)
    assert (done.state, done.result, done.approved_by) == (APPLIED, "cluster use1-b drained", ["alice", "bob"])
    assert actions.ran == [{"cluster": "use1-b"}]
    assert a.get(change.id).state == APPLIED
    assert a.list() == [] and [c.id for c in a.list(include_done=True)] == [change.id]
    with pytest.raises(FailedPrecondition, match="is applied"):
        a.approve("carol", change.id)
    assert actions.ran == [{"cluster": "use1-b"}]


def test_an_action_runs_knowing_its_changes_id_and_nothing_else_does(store_path: Path, clock: FakeClock) -> None:
    """What an action records names the change that ran it (its audit events); nothing outside
    the action's call sees an id, a failed run's included."""
    seen: list[str] = []

    def drain(params: dict[str, str]) -> str:
        seen.append(running_change())
        if params["cluster"] == "use1-b":
            raise FailedPrecondition("no")
        return "drained"

    book = ChangeBook(SqliteStore(store_path), {"drain": drain}, quorum=1, clock=clock)
    changes = [book.request("alice", "drain", {"cluster": name}) for name in ("use1-a", "use1-b")]
    assert [c.state for c in changes] == [APPLIED, FAILED]
    assert seen == [c.id for c in changes]
    assert running_change() == ""


def test_approvals_through_several_gateways_at_once_all_count_and_the_change_runs_exactly_once(
    store_path: Path, clock: FakeClock, actions: Actions
) -> None:
    admins = [f"admin-{i}" for i in range(6)]
    stores = [SqliteStore(store_path) for _ in admins]
    books = [ChangeBook(s, {"drain": actions.drain}, quorum=len(admins), clock=clock) for s in stores]
    change = books[0].request(admins[0], "drain", {"cluster": "use1-a"})
    barrier = threading.Barrier(len(admins) - 1)
    failures: list[BaseException] = []

    def approve(i: int) -> None:
        barrier.wait()
        try:
            books[i].approve(admins[i], change.id)
        except BaseException as exc:  # noqa: B036 - reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=approve, args=(i,)) for i in range(1, len(admins))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not failures, failures
    final = books[0].get(change.id)
    assert final.state == APPLIED
    assert sorted(final.approved_by) == sorted(admins)
    assert actions.ran == [{"cluster": "use1-a"}]
    for s in stores:
        s.close()


def test_a_rejected_or_expired_change_never_runs(books: list[ChangeBook], actions: Actions, clock: FakeClock) -> None:
    a, b = books
    rejected = a.request("alice", "drain", {"cluster": "use1-a"})
    assert b.reject("bob", rejected.id).state == REJECTED
    with pytest.raises(FailedPrecondition, match="is rejected"):
        a.approve("carol", rejected.id)

    late = a.request("alice", "drain", {"cluster": "use1-b"})
    clock.now += 601
    assert b.get(late.id).state == EXPIRED
    with pytest.raises(FailedPrecondition, match="is expired"):
        b.approve("bob", late.id)
    assert actions.ran == []
    with pytest.raises(KeyNotFound, match="no change 'nope'"):
        a.get("nope")
    with pytest.raises(FailedPrecondition, match="unknown action"):
        a.request("alice", "format_everything", {})


def test_a_switch_set_through_one_gateway_is_seen_by_the_other(books: list[ChangeBook]) -> None:
    a, b = books
    assert b.switches() == {}
    a.set_switch("drained", "use1-b", True)
    a.set_switch("failed_over", "us-east-1", True)
    a.set_switch("drained", "use1-b", True)  # twice is once
    assert b.switches() == {"drained": {"use1-b"}, "failed_over": {"us-east-1"}}
    b.set_switch("drained", "use1-b", False)
    assert a.switches() == {"drained": set(), "failed_over": {"us-east-1"}}


def test_an_unreachable_store_is_unavailable_to_the_admin_not_a_crash(store_path: Path) -> None:
    class Down(SqliteStore):
        def admin_record(self, name: str) -> None:
            raise StoreError("placement store error: disk I/O error")

    book = ChangeBook(Down(store_path), {"drain": Actions().drain}, clock=FakeClock(0.0))
    with pytest.raises(Unavailable, match="placement store is unreachable; admin changes cannot be"):
        book.request("alice", "drain", {"cluster": "use1-a"})
    with pytest.raises(Unavailable):
        book.set_switch("drained", "use1-a", True)
    with pytest.raises(Unavailable):
        book.list()


def _legacy(path: Path) -> None:
    """An admin state file as earlier versions wrote it."""
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE switches (kind TEXT NOT NULL, name TEXT NOT NULL, PRIMARY KEY (kind, name));
        CREATE TABLE changes (id TEXT PRIMARY KEY, action TEXT NOT NULL, params TEXT NOT NULL,
            requested_by TEXT NOT NULL, approved_by TEXT NOT NULL, state TEXT NOT NULL, needed INTEGER NOT NULL,
            created REAL NOT NULL, expires REAL NOT NULL, result TEXT NOT NULL DEFAULT '');
        INSERT INTO switches VALUES ('drained', 'use1-b');
    """)
    rows = [("aaaa0001", "pending"), ("aaaa0002", "applied")]
    for change_id, state in rows:
        db.execute("INSERT INTO changes VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (change_id, "drain", json.dumps({"cluster": "use1-a"}), "alice", json.dumps(["alice"]), state, 2,
                    1_800_000_000.0, 1_800_000_600.0, ""))
    db.commit()
    db.close()


def test_an_earlier_versions_admin_state_file_is_carried_over_once(
    books: list[ChangeBook], tmp_path: Path, actions: Actions
) -> None:
    a, b = books
    legacy = tmp_path / "admin.db"
    _legacy(legacy)
    a.carry_over(legacy)
    assert not legacy.exists() and (tmp_path / "admin.db.migrated").exists()
    assert b.switches() == {"drained": {"use1-b"}}
    assert [c.id for c in b.list()] == ["aaaa0001"]  # the pending one; the applied one is history
    assert b.approve("bob", "aaaa0001").state == APPLIED
    assert actions.ran == [{"cluster": "use1-a"}]

    # The drain is undone later; a second start finds no file and changes nothing.
    b.set_switch("drained", "use1-b", False)
    a.carry_over(legacy)
    b.carry_over(legacy)
    assert a.switches() == {"drained": set()}
    assert not legacy.exists()


def test_approving_an_expired_change_marks_it_expired_once_for_the_audit(store_path: Path, clock: FakeClock) -> None:
    events: list[tuple[str, str, str]] = []
    store = SqliteStore(store_path)
    book = ChangeBook(store, {"drain": Actions().drain}, ttl=60, clock=clock,
                      on_event=lambda actor, event, change: events.append((actor, event, change.state)))
    change = book.request("alice", "drain", {"cluster": "use1-a"})
    clock.now += 61
    with pytest.raises(FailedPrecondition, match="is expired; only pending changes can be approved"):
        book.approve("bob", change.id)
    other = ChangeBook(SqliteStore(store_path), {"drain": Actions().drain}, clock=clock)
    assert other.get(change.id).state == EXPIRED  # recorded, not only seen by this book
    book.get(change.id)
    assert events == [("alice", "change_requested", PENDING), ("-", "change_expired", EXPIRED)]


def test_a_change_that_ran_while_the_store_went_away_says_so_and_is_recorded_once_it_answers(
    store_path: Path, clock: FakeClock
) -> None:
    class Flaky(SqliteStore):
        down = False

        def put_admin_record(self, name: str, body: dict[str, Any], version: int) -> int:
            if self.down:
                raise StoreError("placement store error: database is locked")
            return super().put_admin_record(name, body, version)

    store = Flaky(store_path)
    events: list[str] = []

    def drain(params: dict[str, str]) -> str:
        store.down = True  # the store goes away while the change runs
        return f"cluster {params['cluster']} drained"

    book = ChangeBook(store, {"drain": drain}, clock=clock, on_event=lambda actor, event, change: events.append(event))
    change = book.request("alice", "drain", {"cluster": "use1-a"})
    done = book.approve("bob", change.id)
    assert done.state == APPLIED
    assert done.result.startswith("cluster use1-a drained (not recorded yet: the placement store is unreachable")
    other = ChangeBook(SqliteStore(store_path), {"drain": drain}, clock=clock)
    assert other.get(change.id).state == RUNNING  # never approvable twice meanwhile

    book.record_results()  # still down: kept
    assert other.get(change.id).state == RUNNING
    store.down = False
    book.record_results()
    recorded = other.get(change.id)
    assert (recorded.state, recorded.result) == (APPLIED, "cluster use1-a drained")
    book.record_results()  # nothing left to write
    assert events.count("change_applied") == 1


def test_an_admin_state_file_that_cannot_be_read_or_carried_over_is_left_for_the_next_start(
    store_path: Path, tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"not an SQLite database at all" * 100)
    book = ChangeBook(SqliteStore(store_path), {"drain": Actions().drain}, clock=clock)
    with caplog.at_level(logging.ERROR, logger="gateway.quorum"):
        book.carry_over(broken)
    assert broken.exists() and book.switches() == {}
    assert any("cannot read the admin state file" in r.getMessage() for r in caplog.records)

    class Down(SqliteStore):
        def put_admin_record(self, name: str, body: dict[str, Any], version: int) -> int:
            raise StoreError("placement store error: disk I/O error")

    legacy = tmp_path / "admin.db"
    _legacy(legacy)
    ChangeBook(Down(store_path), {"drain": Actions().drain}, clock=clock).carry_over(legacy)
    assert legacy.exists(), "kept: its switches are not in the store yet"
    book.carry_over(legacy)  # the store answers at the next start
    assert book.switches() == {"drained": {"use1-b"}} and not legacy.exists()


def test_listing_marks_a_change_past_its_expiry_expired_once(store_path: Path, clock: FakeClock) -> None:
    events: list[tuple[str, str]] = []
    book = ChangeBook(SqliteStore(store_path), {"drain": Actions().drain}, ttl=60, clock=clock,
                      on_event=lambda actor, event, change: events.append((event, change.id)))
    old = book.request("alice", "drain", {"cluster": "use1-a"})
    clock.now += 30
    new = book.request("alice", "drain", {"cluster": "use1-b"})
    clock.now += 31  # the first is past its hour, the second is not
    assert [c.id for c in book.list()] == [new.id]
    assert [(c.id, c.state) for c in book.list(include_done=True)] == [(old.id, EXPIRED), (new.id, PENDING)]
    other = ChangeBook(SqliteStore(store_path), {"drain": Actions().drain}, clock=clock)
    assert other.get(old.id).state == EXPIRED  # recorded in the store, not only shown
    assert [e for e in events if e[0] == "change_expired"] == [("change_expired", old.id)]


class Audit:
    """The book's event sink: records events, and fails (as an unwritable audit log) on demand."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.failing: set[str] = set()

    def __call__(self, actor: str, event: str, change: Any) -> None:
        if event in self.failing:
            raise Unavailable("the gateway's audit log cannot be written")
        self.events.append((actor, event, change.state))


def test_a_change_whose_request_or_approval_cannot_be_audited_does_not_count(
        store_path: Path, clock: FakeClock, actions: Actions) -> None:
    audit = Audit()
    book = ChangeBook(SqliteStore(store_path), {"drain": actions.drain}, ttl=600, clock=clock, on_event=audit)
    audit.failing = {"change_requested"}
    with pytest.raises(Unavailable, match="audit log"):
        book.request("alice", "drain", {"cluster": "use1-a"})
    (withdrawn,) = book.list(include_done=True)
    assert (withdrawn.state, withdrawn.result) == ("failed", "withdrawn: its request could not be audited")
    with pytest.raises(FailedPrecondition, match="is failed"):
        book.approve("bob", withdrawn.id)

    audit.failing = set()
    change = book.request("alice", "drain", {"cluster": "use1-b"})
    audit.failing = {"change_approved"}
    with pytest.raises(Unavailable, match="audit log"):
        book.approve("bob", change.id)
    assert book.get(change.id).approved_by == ["alice"] and book.get(change.id).state == PENDING
    assert actions.ran == []
    audit.failing = set()
    assert book.approve("bob", change.id).state == APPLIED
    assert actions.ran == [{"cluster": "use1-b"}]
    assert [e[1] for e in audit.events] == ["change_requested", "change_approved", "change_applied"]


def test_changes_that_lapsed_while_the_audit_log_cannot_be_written_are_still_listed(
        store_path: Path, clock: FakeClock, actions: Actions, caplog: pytest.LogCaptureFixture) -> None:
    """`hsmctl changes list` and `status` are what an operator looks at when the audit log fails:
    a change found expired on the way is listed as expired, not the whole call refused."""
    audit = Audit()
    book = ChangeBook(SqliteStore(store_path), {"drain": actions.drain}, ttl=60, clock=clock, on_event=audit)
    old = book.request("alice", "drain", {"cluster": "use1-a"})
    clock.now += 61
    audit.failing = {"change_expired"}
    with caplog.at_level(logging.WARNING, logger="gateway.quorum"):
        assert [(c.id, c.state) for c in book.list(include_done=True)] == [(old.id, EXPIRED)]
    assert (f"change {old.id} is expired; its change_expired event is not in the audit log: the gateway's audit "
            "log cannot be written") in caplog.text
    assert book.get(old.id).state == EXPIRED
    with pytest.raises(FailedPrecondition, match="is expired"):
        book.approve("bob", old.id)
    assert actions.ran == []


def test_a_rejection_that_cannot_be_audited_stands_and_says_so(
        store_path: Path, clock: FakeClock, actions: Actions) -> None:
    """A veto is not taken back: the change stays rejected (it never runs), and its result says its
    record is not in the audit log. Before, the change was rejected but the caller was told the
    admin changes wait for the audit log, as if nothing had happened."""
    audit = Audit()
    book = ChangeBook(SqliteStore(store_path), {"drain": actions.drain}, ttl=600, clock=clock, on_event=audit)
    change = book.request("alice", "drain", {"cluster": "use1-a"})
    audit.failing = {"change_rejected"}
    rejected = book.reject("bob", change.id)
    assert rejected.state == REJECTED
    assert rejected.result == "rejected by bob (not in the audit log: the gateway's audit log cannot be written)"
    assert book.get(change.id).result == rejected.result
    audit.failing = set()
    with pytest.raises(FailedPrecondition, match="is rejected"):
        book.approve("carol", change.id)
    assert actions.ran == []


def test_the_requester_cannot_run_a_change_whose_completing_approval_is_not_yet_audited(
        store_path: Path, clock: FakeClock, actions: Actions) -> None:
    """Bob's approval meets the quorum and is written; while his audit record is being written (and
    fails), Alice, who asked for the change, approves through another gateway. Before, her call
    found the approvals complete and ran the change: a change approved by its requester alone, in
    the audit log. Now it is refused; Bob's approval is withdrawn and nothing runs."""
    tried: list[BaseException] = []

    def audit(actor: str, event: str, change: Any) -> None:
        if event == "change_approved" and actor == "bob":
            try:
                other.approve("alice", change.id)
            except FailedPrecondition as exc:
                tried.append(exc)
            raise Unavailable("the gateway's audit log cannot be written")

    book = ChangeBook(SqliteStore(store_path), {"drain": actions.drain}, ttl=600, clock=clock, on_event=audit)
    other = ChangeBook(SqliteStore(store_path), {"drain": actions.drain}, ttl=600, clock=clock)
    change = book.request("alice", "drain", {"cluster": "use1-a"})
    with pytest.raises(Unavailable, match="audit log"):
        book.approve("bob", change.id)
    (refused,) = tried
    assert "has its approvals; the admin whose approval completed them starts it" in str(refused)
    after = other.get(change.id)
    assert (after.state, after.approved_by) == (PENDING, ["alice"]) and actions.ran == []
    clock.now += 120  # and long after, alice alone still cannot
    with pytest.raises(NotAnotherAdmin):
        other.approve("alice", change.id)
    assert actions.ran == []


def test_a_change_that_ran_but_could_not_be_audited_is_recorded_and_says_so(
        store_path: Path, clock: FakeClock, actions: Actions) -> None:
    audit = Audit()
    book = ChangeBook(SqliteStore(store_path), {"drain": actions.drain}, ttl=600, clock=clock, on_event=audit)
    change = book.request("alice", "drain", {"cluster": "use1-a"})
    audit.failing = {"change_applied"}
    done = book.approve("bob", change.id)
    assert done.state == APPLIED
    assert done.result == ("cluster use1-a drained (not in the audit log: the gateway's audit log cannot be "
                           "written)")
    assert book.get(change.id).state == APPLIED  # recorded in the store all the same
    assert actions.ran == [{"cluster": "use1-a"}]


def test_a_change_with_its_approvals_that_never_ran_runs_at_the_next_approval(
        store_path: Path, clock: FakeClock, actions: Actions) -> None:
    """The approver's process stopped between recording the last approval and running it."""

    class Stopped(BaseException):
        pass

    def stops(actor: str, event: str, change: Any) -> None:
        if event == "change_approved":
            raise Stopped

    first = ChangeBook(SqliteStore(store_path), {"drain": actions.drain}, ttl=600, clock=clock, on_event=stops)
    change = first.request("alice", "drain", {"cluster": "use1-a"})
    with pytest.raises(Stopped):
        first.approve("bob", change.id)
    other = ChangeBook(SqliteStore(store_path), {"drain": actions.drain}, ttl=600, clock=clock)
    stuck = other.get(change.id)
    assert (stuck.state, stuck.approved_by) == (PENDING, ["alice", "bob"]) and actions.ran == []
    # Until START_GRACE has passed, its approver may still be starting it (or withdrawing an approval
    # its audit log did not take): another approval does not run it.
    with pytest.raises(FailedPrecondition, match=r"has its approvals; .* If it is still pending in 60 s, approve "
                                                  r"it again to run it$"):
        other.approve("alice", change.id)
    clock.now += 60
    assert other.approve("bob", change.id).state == APPLIED  # the approver again, or any admin
    assert actions.ran == [{"cluster": "use1-a"}]
    with pytest.raises(FailedPrecondition, match="is applied"):
        other.approve("carol", change.id)


def test_an_action_the_store_fails_under_is_a_failed_change_that_says_so(store_path: Path, clock: FakeClock) -> None:
    """Not "internal error (StoreError)": the admin learns the store did not answer, and that
    the change may be partly applied."""
    def drain(params: dict) -> str:
        raise StoreError("database is locked")

    store = SqliteStore(store_path)
    book = ChangeBook(store, {"drain": drain}, quorum=2, clock=clock)
    change = book.request("alice", "drain", {"cluster": "use1-b"})
    done = book.approve("bob", change.id)
    assert (done.state, done.result) == (
        "failed", "the placement store did not answer; the change may be partly applied: check, then try again")
    store.close()


class Killed(BaseException):
    """The runner's process dies: nothing after this point of ``_run`` happens."""


def test_a_change_whose_runner_died_ends_interrupted_audited_and_listed(store_path: Path, clock: FakeClock) -> None:
    """The gateway running a change is killed: once its lease lapses, the next reader marks the
    change interrupted (not approvable, not rejectable, and not shown as running forever)."""
    def dies(params: dict[str, str]) -> str:
        raise Killed

    audit = Audit()
    first = ChangeBook(SqliteStore(store_path), {"drain": dies}, clock=clock, lease=60)
    other = ChangeBook(SqliteStore(store_path), {"drain": dies}, clock=clock, lease=60, on_event=audit)
    change = first.request("alice", "drain", {"cluster": "use1-a"})
    with pytest.raises(Killed):
        first.approve("bob", change.id)
    running = other.get(change.id)
    assert running.state == RUNNING and running.result.startswith("running on ")
    assert [c.id for c in other.list()] == [change.id], "a running change is listed with the pending ones"
    with pytest.raises(FailedPrecondition, match="is running .*can no longer be approved"):
        other.approve("carol", change.id)

    clock.now += 61  # the lease lapses: nobody renews it
    [listed] = other.list(include_done=True)
    assert listed.state == INTERRUPTED
    assert "may be partly applied: run hsmctl reconcile" in listed.result and running.runner in listed.result
    assert other.list() == []
    assert first.get(change.id).state == INTERRUPTED  # recorded, not only seen
    for verb in (other.approve, other.reject):
        with pytest.raises(FailedPrecondition, match="is interrupted; only pending changes"):
            verb("carol", change.id)
    assert audit.events == [("-", "change_interrupted", INTERRUPTED)], "audited once"


def test_a_change_still_running_on_another_gateway_keeps_its_lease_and_records_its_result(
    store_path: Path, clock: FakeClock
) -> None:
    other = ChangeBook(SqliteStore(store_path), {}, clock=clock, lease=60)
    seen: list[str] = []

    def slow(params: dict[str, str]) -> str:
        change_id = other.list()[0].id
        for _ in range(5):  # 150 s on the clock, several leases long
            before = other.get(change_id).lease_until
            clock.now += 30
            wait_for(lambda before=before: other.get(change_id).lease_until > before, what="a renewal")
            seen.append(other.get(change_id).state)
        return "done"

    book = ChangeBook(SqliteStore(store_path), {"drain": slow}, clock=clock, lease=60, renew_every=0.01)
    change = book.request("alice", "drain", {"cluster": "use1-a"})
    assert book.approve("bob", change.id).state == APPLIED
    assert seen == [RUNNING] * 5
    assert other.get(change.id).state == APPLIED


def test_a_stuck_action_stops_renewing_its_lease_past_its_run_limit(
    store_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An HSM call that never returns cannot be interrupted: past its run limit the runner's lease
    lapses, so the change shows interrupted (and no longer holds its key) instead of running for good."""
    other = ChangeBook(SqliteStore(store_path), {}, clock=clock, lease=60)
    seen: list[str] = []

    def stuck(params: dict[str, str]) -> str:
        change_id = other.list()[0].id
        for _ in range(3):  # within its limit: renewed
            before = other.get(change_id).lease_until
            clock.now += 30
            wait_for(lambda before=before: other.get(change_id).lease_until > before, what="a renewal")
        seen.append(other.get(change_id).state)
        clock.now += 100  # past the limit (120 s): the runner stops renewing
        wait_for(lambda: "has run past its limit" in caplog.text, what="the runner giving up its lease")
        clock.now = other.get(change_id).lease_until  # the last lease it took, never renewed again
        seen.append(other.list(include_done=True)[0].state)
        return "moved at last"

    book = ChangeBook(SqliteStore(store_path), {"drain": stuck}, clock=clock, lease=60, renew_every=0.01,
                      run_limits={"drain": 120})
    change = book.request("alice", "drain", {"cluster": "use1-a"})
    with caplog.at_level(logging.ERROR, logger="gateway.quorum"):
        assert book.approve("bob", change.id).state == APPLIED  # it did end: its result is the truth
    assert seen == [RUNNING, INTERRUPTED]
    assert f"change {change.id} has run past its limit, stuck" in caplog.text


def test_a_runner_taken_for_gone_writes_its_result_over_the_interruption(store_path: Path, clock: FakeClock) -> None:
    """Its lease lapsed (the store did not answer its renewals) but it finished: the result is the truth."""
    other = ChangeBook(SqliteStore(store_path), {}, clock=clock, lease=60)

    def stalls(params: dict[str, str]) -> str:
        clock.now += 61
        assert other.list(include_done=True)[0].state == INTERRUPTED
        return "cluster use1-a drained"

    book = ChangeBook(SqliteStore(store_path), {"drain": stalls}, clock=clock, lease=60)
    change = book.request("alice", "drain", {"cluster": "use1-a"})
    assert book.approve("bob", change.id).state == APPLIED
    assert (other.get(change.id).state, other.get(change.id).result) == (APPLIED, "cluster use1-a drained")


def test_a_running_change_recorded_without_a_lease_is_interrupted_once_past_its_expiry(
    store_path: Path, clock: FakeClock
) -> None:
    """What an earlier version left behind when it was killed mid-run."""
    store = SqliteStore(store_path)
    book = ChangeBook(store, {"drain": Actions().drain}, ttl=600, clock=clock)
    change = book.request("alice", "drain", {"cluster": "use1-a"})
    [(body, version)] = [store.admin_record(f"change/{change.id}")]
    legacy = {k: v for k, v in body.items() if k not in ("runner", "lease_until")} | {"state": RUNNING}
    store.put_admin_record(f"change/{change.id}", legacy, version)
    assert book.get(change.id).state == RUNNING
    clock.now += 601
    book.settle()
    assert book.list(include_done=True)[0].state == INTERRUPTED


def test_a_runner_whose_renewals_the_store_refuses_warns_shows_interrupted_then_records_its_result(
    store_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The store refuses the runner's lease renewals (each one a warning, and tried again): once
    the lease lapses, other gateways see the change interrupted (it no longer holds its key);
    the runner stops renewing, and the result it records when it ends is the truth."""

    class Refusing(SqliteStore):
        down = False

        def put_admin_record(self, name: str, body: dict[str, Any], version: int) -> int:
            if self.down:
                raise StoreError("placement store error: attempt to write a readonly database")
            return super().put_admin_record(name, body, version)

    store = Refusing(store_path)
    other = ChangeBook(SqliteStore(store_path), {}, clock=clock, lease=60)
    seen: list[str] = []

    def drain(params: dict[str, str]) -> str:
        store.down = True
        clock.now += 30  # a renewal is due, and fails
        wait_for(lambda: "its lease could not be renewed" in caplog.text, what="a refused renewal")
        seen.append(other.list()[0].state)
        clock.now += 31  # past the lease the runner took
        seen.append(other.list(include_done=True)[0].state)
        wait_for(lambda: "while this process still runs it: its lease lapsed" in caplog.text,
                 what="the runner noticing the lapse")
        store.down = False
        return "cluster use1-a drained"

    book = ChangeBook(store, {"drain": drain}, clock=clock, lease=60, renew_every=0.01)
    change = book.request("alice", "drain", {"cluster": "use1-a"})
    with caplog.at_level(logging.WARNING, logger="gateway.quorum"):
        done = book.approve("bob", change.id)
    assert seen == [RUNNING, INTERRUPTED]
    assert (f"change {change.id}: its lease could not be renewed: placement store is unreachable; admin changes "
            "cannot be read or recorded now (placement store error: attempt to write a readonly database)"
            ) in caplog.text
    assert f"change {change.id} is interrupted while this process still runs it" in caplog.text
    assert (done.state, done.result) == (APPLIED, "cluster use1-a drained")
    recorded = other.get(change.id)
    assert (recorded.state, recorded.result) == (APPLIED, "cluster use1-a drained")
    store.close()

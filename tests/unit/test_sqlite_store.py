"""router.placement.sqlite: the embedded placement store every worker process shares."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.model import KeyAlgorithm, KeyState, KeyStorage, KeyUsage
from router.placement import Conflict, PlacementStore, SqliteStore, StoreError, StoreMisconfigured
from tests.support import stored as make


def test_is_a_placement_store(store: SqliteStore) -> None:
    assert isinstance(store, PlacementStore)


def test_create_then_get_returns_every_field(store: SqliteStore) -> None:
    p = make(storage=KeyStorage.EXTERNAL, algorithm=KeyAlgorithm.RSA_3072, usage=KeyUsage.ENCRYPT_DECRYPT)
    store.create(p)
    got = store.get("app/key-1")
    assert got == p
    assert got is not None and got.clusters == ("use1-a", "use1-b", "usw2-a")
    assert got.version == 1


def test_get_and_by_request_of_unknown_ids_are_none(store: SqliteStore) -> None:
    assert store.get("nope") is None
    assert store.by_request("nope") is None


def test_by_request_finds_the_placement_a_request_created(store: SqliteStore) -> None:
    p = make(request_id="idem-42", replicas=())
    store.create(p)
    assert store.by_request("idem-42") == p


def test_duplicate_key_id_conflicts_and_carries_the_existing_record(store: SqliteStore) -> None:
    first = make(request_id="r1")
    store.create(first)
    with pytest.raises(Conflict) as info:
        store.create(make(request_id="r2", primary="usw2-a"))
    assert info.value.existing == first
    assert store.get(first.key_id) == first
    assert store.by_request("r2") is None


def test_duplicate_request_id_conflicts_and_carries_the_existing_record(store: SqliteStore) -> None:
    first = make("app/a", request_id="same")
    store.create(first)
    with pytest.raises(Conflict) as info:
        store.create(make("app/b", request_id="same"))
    assert info.value.existing == first
    assert store.get("app/b") is None


def test_update_bumps_the_version_and_persists(store: SqliteStore) -> None:
    created = make()
    store.create(created)
    enabled = store.update(dataclasses.replace(created, state=KeyState.ENABLED, replicas=("usw2-a",)))
    assert enabled.version == 2
    assert enabled.state is KeyState.ENABLED
    assert store.get(created.key_id) == enabled
    again = store.update(dataclasses.replace(enabled, primary="use1-b"))
    assert again.version == 3
    assert store.get(created.key_id) == again


def test_update_with_a_stale_version_conflicts_and_changes_nothing(store: SqliteStore) -> None:
    created = make()
    store.create(created)
    winner = store.update(dataclasses.replace(created, state=KeyState.ENABLED))
    with pytest.raises(Conflict) as info:
        store.update(dataclasses.replace(created, state=KeyState.DESTROYED))  # still version 1
    assert info.value.existing == winner
    assert store.get(created.key_id) == winner


def test_update_of_a_missing_key_conflicts_with_no_existing_record(store: SqliteStore) -> None:
    with pytest.raises(Conflict) as info:
        store.update(make("ghost"))
    assert info.value.existing is None
    assert store.get("ghost") is None


def test_delete_is_conditional_on_version(store: SqliteStore) -> None:
    created = make()
    store.create(created)
    current = store.update(dataclasses.replace(created, state=KeyState.ENABLED))
    with pytest.raises(Conflict) as info:
        store.delete(created.key_id, created.version)
    assert info.value.existing == current
    assert store.get(created.key_id) == current

    store.delete(current.key_id, current.version)
    assert store.get(created.key_id) is None
    assert store.by_request(created.request_id) is None
    with pytest.raises(Conflict) as gone:
        store.delete(current.key_id, current.version)
    assert gone.value.existing is None


def test_a_deleted_intent_frees_its_key_id_and_request_id(store: SqliteStore) -> None:
    created = make()
    store.create(created)
    store.delete(created.key_id, created.version)
    store.create(created)
    assert store.get(created.key_id) == created


def test_change_counter_grows_on_every_write(store: SqliteStore) -> None:
    seen = [store.change_counter()]
    p = make()
    store.create(p)
    seen.append(store.change_counter())
    p = store.update(dataclasses.replace(p, state=KeyState.ENABLED))
    seen.append(store.change_counter())
    store.create(make("app/key-2"))
    seen.append(store.change_counter())
    store.delete(p.key_id, p.version)
    seen.append(store.change_counter())
    assert seen == sorted(set(seen)), seen


def test_change_counter_does_not_move_on_reads(store: SqliteStore) -> None:
    store.create(make())
    before = store.change_counter()
    store.get("app/key-1")
    store.by_request("req-app/key-1")
    store.list()
    list(store.scan())
    assert store.change_counter() == before


def test_second_store_on_the_same_file_sees_the_first_ones_writes(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    one, two = SqliteStore(path), SqliteStore(path)
    try:
        counter = two.change_counter()
        p = make()
        one.create(p)
        assert two.get(p.key_id) == p
        assert two.change_counter() > counter

        updated = two.update(dataclasses.replace(p, state=KeyState.ENABLED))
        assert one.get(p.key_id) == updated
        with pytest.raises(Conflict):
            one.update(dataclasses.replace(p, state=KeyState.DESTROYED))
        with pytest.raises(Conflict):
            one.create(make(request_id="other"))
    finally:
        one.close()
        two.close()


def test_records_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    first = SqliteStore(path)
    first.create(make())
    counter = first.change_counter()
    first.close()
    reopened = SqliteStore(path)
    try:
        assert reopened.get("app/key-1") == make()
        assert reopened.change_counter() == counter
    finally:
        reopened.close()


def test_scan_returns_every_record_in_id_order(store: SqliteStore) -> None:
    for key_id in ["b/2", "a/1", "c", "a"]:
        store.create(make(key_id))
    assert [p.key_id for p in store.scan()] == ["a", "a/1", "b/2", "c"]


# -- listing ---------------------------------------------------------------------------


def test_list_prefix_is_literal_not_a_like_pattern(store: SqliteStore) -> None:
    for key_id in ["a%b", "axb", "a_c", "azc", "A_c", "a"]:
        store.create(make(key_id))
    assert [p.key_id for p in store.list("a%")] == ["a%b"]
    assert [p.key_id for p in store.list("a_")] == ["a_c"]
    assert [p.key_id for p in store.list("a")] == ["a", "a%b", "a_c", "axb", "azc"]


def test_list_pages_with_after_and_limit(store: SqliteStore) -> None:
    for i in range(7):
        store.create(make(f"team/k{i}"))
    store.create(make("other/k"))
    first = store.list("team/", limit=3)
    assert [p.key_id for p in first] == ["team/k0", "team/k1", "team/k2"]
    second = store.list("team/", after=first[-1].key_id, limit=3)
    assert [p.key_id for p in second] == ["team/k3", "team/k4", "team/k5"]
    third = store.list("team/", after=second[-1].key_id, limit=3)
    assert [p.key_id for p in third] == ["team/k6"]
    assert store.list("team/", after="team/k6", limit=3) == []


_ID_ALPHABET = "ab%_/.-:~é"
_ids = st.text(alphabet=_ID_ALPHABET, min_size=1, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.sets(_ids, max_size=25), data=st.data())
def test_paging_through_a_prefix_returns_exactly_the_sorted_matching_ids(
    tmp_path: Path, ids: set[str], data: st.DataObject
) -> None:
    prefix = data.draw(
        st.one_of(
            st.just(""),
            st.text(alphabet=_ID_ALPHABET, max_size=3),
            st.sampled_from(sorted(ids) or [""]).flatmap(lambda i: st.integers(0, len(i)).map(lambda n: i[:n])),
        ),
        label="prefix",
    )
    store = SqliteStore(tmp_path / f"{uuid.uuid4().hex}.db")
    try:
        for key_id in ids:
            store.create(make(key_id))
        pages: list[list[str]] = []
        after = ""
        while True:
            limit = data.draw(st.integers(1, 7), label="page size")
            page = [p.key_id for p in store.list(prefix, after, limit)]
            assert len(page) <= limit
            if not page:
                break
            pages.append(page)
            after = page[-1]
            assert len(pages) <= len(ids), "paging does not terminate"
        got = [key_id for page in pages for key_id in page]
        assert got == sorted(i for i in ids if i.startswith(prefix))
    finally:
        store.close()


def _made_before(tmp_path: Path, undo: str) -> Path:
    """A placements.db holding the key "app/old", as an older release made it: ``undo`` (SQL) takes
    away what came later."""
    import sqlite3

    path = tmp_path / "old.db"
    SqliteStore(path).create(make(key_id="app/old"))
    with sqlite3.connect(path) as db:
        db.execute(undo)
    return path


def test_a_store_made_before_keys_could_be_held_opens_with_none_held(tmp_path: Path) -> None:
    """An existing placements.db (no ``held`` column) gains the column; its keys are not held."""
    path = _made_before(tmp_path, "ALTER TABLE placements DROP COLUMN held")
    store = SqliteStore(path)
    old = store.get("app/old")
    assert old is not None and old.held is False
    store.update(dataclasses.replace(old, held=True))
    assert SqliteStore(path).get("app/old").held is True  # type: ignore[union-attr]


def test_a_store_made_before_fleet_ids_gets_one_and_keeps_its_keys(tmp_path: Path) -> None:
    """An existing placements.db (no ``meta`` table) gains the table and a fleet id; then keeps that id."""
    path = _made_before(tmp_path, "DROP TABLE meta")
    store = SqliteStore(path)
    assert store.get("app/old") is not None
    fleet = store.fleet_id()
    assert SqliteStore(path).fleet_id() == fleet
    assert [p.key_id for p in SqliteStore(path).scan()] == ["app/old"]


def test_a_file_in_a_missing_directory_is_a_store_that_cannot_be_used_whatever_the_time(tmp_path: Path) -> None:
    """A gateway stops for good on it (EX_CONFIG), rather than being restarted forever."""
    with pytest.raises(StoreMisconfigured, match=f"the directory {tmp_path / 'nope'} does not exist$"):
        SqliteStore(tmp_path / "nope" / "p.db")
    with pytest.raises(StoreMisconfigured, match=f"cannot open placement store {tmp_path}: it is a directory$"):
        SqliteStore(tmp_path)
    with pytest.raises(StoreMisconfigured, match="File name too long$"):  # not an OSError from a look at the path
        SqliteStore(tmp_path / ("p" * 300 + ".db"))


def test_a_new_store_file_and_its_journal_are_owner_only(tmp_path: Path) -> None:
    """Writing the store comes close to holding keys (docs/security.md): a new file is 0600
    whatever the umask, and so are the WAL and shared-memory files SQLite makes beside it. A file
    that exists keeps the mode its operator gave it."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        store = SqliteStore(tmp_path / "new.db")
        store.create(make())
        made = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        store.close()
        (tmp_path / "shared.db").touch(mode=0o640)
        SqliteStore(tmp_path / "shared.db").close()
    finally:
        os.umask(old)
    assert made == {"new.db": 0o600, "new.db-wal": 0o600, "new.db-shm": 0o600}
    assert stat.S_IMODE((tmp_path / "shared.db").stat().st_mode) == 0o640


def test_a_roll_back_that_fails_mid_transaction_reopens_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed write whose ROLLBACK fails too, leaving the connection in the transaction, would
    make every later write in the process fail ("cannot start a transaction within a
    transaction"). SQLite's own interrupt (a progress handler, armed as the ROLLBACK starts)
    stands in for what makes a roll-back fail on a host: an I/O error, memory running out."""
    path = tmp_path / "placements.db"
    store = SqliteStore(path)
    store.create(make("app/first", request_id="r-first"))
    connection = store._db
    armed = False

    def on_statement(sql: str) -> None:
        nonlocal armed
        armed = armed or sql == "ROLLBACK"

    def interrupt() -> int:
        nonlocal armed
        fire, armed = armed, False  # that one statement only
        return int(fire)

    connection.set_trace_callback(on_statement)
    connection.set_progress_handler(interrupt, 1)
    with caplog.at_level(logging.WARNING, logger="router.placement.sqlite"):
        with pytest.raises(Conflict):  # the write's own failure: the key exists
            store.create(make("app/first", request_id="r-again"))
    assert [r.getMessage() for r in caplog.records] == [
        f"placement store {path}: a failed transaction could not be rolled back (interrupted); reopening the store"]

    store.create(make("app/second", request_id="r-second"))
    other = SqliteStore(path)  # another process sees the write: it was committed
    try:
        assert [p.key_id for p in other.scan()] == ["app/first", "app/second"]
    finally:
        other.close()
    store.close()


def _interrupt(connection, statements: set[str]) -> None:
    """SQLite's own interrupt of the next run of each of ``statements`` (as in the test above)."""
    left = set(statements)
    armed = False

    def on_statement(sql: str) -> None:
        nonlocal armed
        if sql in left:
            left.discard(sql)
            armed = True

    def interrupt() -> int:
        nonlocal armed
        fire, armed = armed, False
        return int(fire)

    connection.set_trace_callback(on_statement)
    connection.set_progress_handler(interrupt, 1)


@pytest.mark.parametrize("rollback_fails", [False, True])
def test_a_change_log_read_whose_commit_fails_leaves_no_snapshot_behind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, rollback_fails: bool
) -> None:
    """The cache learns of other processes' writes from ``changes_since``. A read transaction
    left open by a failed COMMIT would pin its snapshot: every later read would miss every
    later write, and every later ``changes_since`` fail. The read fails once, then the store
    sees the writes made since, whether the ROLLBACK after it works or the store is reopened."""
    path = tmp_path / "placements.db"
    store = SqliteStore(path)
    store.create(make("app/first", request_id="r-first"))
    counter = store.change_counter()
    _interrupt(store._db, {"COMMIT", "ROLLBACK"} if rollback_fails else {"COMMIT"})
    with caplog.at_level(logging.WARNING, logger="router.placement.sqlite"):
        with pytest.raises(StoreError, match="interrupted"):
            store.changes_since(counter)
    assert [r.getMessage() for r in caplog.records] == (
        [f"placement store {path}: a failed transaction could not be rolled back (interrupted); reopening the store"]
        if rollback_fails else [])
    assert not store._db.in_transaction

    other = SqliteStore(path)  # another process writes
    try:
        other.create(make("app/second", request_id="r-second"))
    finally:
        other.close()
    assert store.changes_since(counter) == (counter + 1, ("app/second",))
    assert store.get("app/second") is not None
    store.close()


def test_a_column_another_process_adds_between_the_look_and_the_change_is_no_error(tmp_path: Path) -> None:
    """The gateway's worker processes open an older store file at once: each looks at its columns,
    then adds those it lacks. One that adds a column another added since its look opens all the
    same (it failed with "duplicate column name" before, and the worker exited)."""
    import sqlite3

    path = tmp_path / "old.db"
    SqliteStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE placements DROP COLUMN destroyed_material")
    real = sqlite3.connect(path)

    class LookedBefore:  # what this process saw before another process's change
        def execute(self, sql: str, *args: object) -> object:
            rows = real.execute(sql, *args)
            return [row for row in rows if row[1] != "destroyed_material"] if sql.startswith("PRAGMA") else rows

    SqliteStore(path).close()  # the other process: adds the column
    store = SqliteStore(path)
    store._db = LookedBefore()  # type: ignore[assignment]
    store._migrate()
    store._db = real
    store.create(make("app/after", state=KeyState.DESTROYED, destroyed_material=b"\x02" * 32))
    assert store.get("app/after").destroyed_material == b"\x02" * 32  # type: ignore[union-attr]
    store.close()

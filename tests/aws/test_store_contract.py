"""One contract for every placement store: the same assertions run against SqliteStore
(a temporary file) and DynamoStore (a fresh table on ``moto_server``), both opened
by URL through ``make_store`` as the gateway opens them."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.model import KeyAlgorithm, KeyState, KeyStorage, KeyUsage, Placement
from router.placement import Conflict, PlacementStore, Stale
from router.placement.dynamodb import DynamoStore
from router.placement.factory import make_store
from tests.support import stored as make

T = TypeVar("T")


class Backend:
    """Where stores of one kind live: ``fresh()`` is a new empty one, ``open(url)`` a
    new store object (a new connection) on it, as another gateway process would."""

    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.moto = request.getfixturevalue("moto_server") if kind == "dynamodb" else None
        self.opened: list[PlacementStore] = []

    def fresh(self) -> str:
        name = f"placements-{uuid.uuid4().hex[:12]}"
        if self.moto is None:
            return f"sqlite:{self.tmp_path / name}.db"
        url: str = self.moto.store_url(name)
        store = self.open(url)
        assert isinstance(store, DynamoStore)
        assert store.create_table() is True
        return url

    def open(self, url: str) -> PlacementStore:
        store = make_store(url, self.tmp_path)
        self.opened.append(store)
        return store

    def close(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture(params=["sqlite", "dynamodb"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = Backend(request.param, tmp_path, request)
    yield b
    b.close()


@pytest.fixture
def url(backend: Backend) -> str:
    return backend.fresh()


@pytest.fixture
def store(backend: Backend, url: str) -> PlacementStore:
    return backend.open(url)


def test_is_a_placement_store(store: PlacementStore) -> None:
    assert isinstance(store, PlacementStore)


def test_every_placement_field_round_trips(store: PlacementStore) -> None:
    values = {
        "key_id": "payments/ext-1",
        "algorithm": KeyAlgorithm.RSA_3072,
        "usage": KeyUsage.ENCRYPT_DECRYPT,
        "state": KeyState.UNDER_REPLICATED,
        "primary": "use1-b",
        "replicas": ("usw2-a",),
        "create_time": 1_767_225_600.123456,
        "request_id": "idem-7",
        "fingerprint": "payments/ext-1|RSA_3072|ENCRYPT_DECRYPT|3|EXTERNAL|True",
        "storage": KeyStorage.EXTERNAL,
        "version": 4,
        "copies": 3,
        "extractable": False,
        "wrapped": b"\x00\xff wrapped \x00" * 40,
        "public_der": bytes(range(256)),
        "held": True,
        "owner": "fbb57049-dd18-48d7-a805-551c2d0ca1be:4026531836:4026531834:4242:6742648",
        "destroyed_material": bytes(range(64)),
    }
    fields = {f.name for f in dataclasses.fields(Placement) if f.init}
    assert set(values) == fields, "a new Placement field needs a value here and a column/attribute in every store"
    p = Placement(**values)  # type: ignore[arg-type]
    store.create(p)
    got = store.get(p.key_id)
    assert got == p
    assert got is not None and got.clusters == ("use1-b", "usw2-a") and got.version == 4
    assert store.by_request("idem-7") == p
    assert [q.key_id for q in store.list()] == [p.key_id]
    assert list(store.scan()) == [p]


def test_defaults_round_trip_too(store: PlacementStore) -> None:
    bare = Placement("bare", KeyAlgorithm.AES_256, KeyUsage.ENCRYPT_DECRYPT, KeyState.CREATING, "use1-a")
    store.create(bare)
    assert store.get("bare") == bare
    assert store.by_request("") == bare


def _as_an_older_version_wrote(backend: Backend, url: str, store: PlacementStore, key_id: str,
                               field: str) -> PlacementStore:
    """The store with ``key_id``'s record as a gateway from before ``field`` wrote it: a SQLite file
    without the column (added when it is opened again), a DynamoDB item without the attribute."""
    if backend.kind == "sqlite":
        import sqlite3

        store.close()
        with sqlite3.connect(url.removeprefix("sqlite:")) as db:
            db.execute(f"ALTER TABLE placements DROP COLUMN {field}")
        return backend.open(url)
    assert isinstance(store, DynamoStore)
    store._client.update_item(TableName=store.table, Key={"key_id": {"S": key_id}},
                              UpdateExpression="REMOVE #f", ExpressionAttributeNames={"#f": field})
    return store


def test_a_record_from_before_owners_reads_with_none_and_takes_one(backend: Backend, url: str) -> None:
    """Records an older gateway wrote. Each reads as owner "", so a retry waits for
    creation_grace as before; an update writes an owner, and one without drops it."""
    store = backend.open(url)
    store.create(make("app/old", owner="x"))
    store = _as_an_older_version_wrote(backend, url, store, "app/old", "owner")
    old = store.get("app/old")
    assert old is not None and old.owner == ""
    assert store.by_request(old.request_id) == old and list(store.scan()) == [old]
    claimed = store.update(dataclasses.replace(old, owner="boot:1:2:3:4"))
    assert backend.open(url).get("app/old") == claimed and claimed.owner == "boot:1:2:3:4"
    made = store.update(dataclasses.replace(claimed, state=KeyState.ENABLED, owner=""))
    assert backend.open(url).get("app/old") == made and made.owner == ""


def test_a_destroyed_record_from_before_material_digests_reads_with_none_and_takes_them(
        backend: Backend, url: str) -> None:
    """A DESTROYED record an older gateway wrote reads as no digests (its stray copies are swept
    without a comparison, as before); an update keeps them."""
    store = backend.open(url)
    store.create(make("app/gone", state=KeyState.DESTROYED, destroyed_material=b"\x01" * 64))
    store = _as_an_older_version_wrote(backend, url, store, "app/gone", "destroyed_material")
    old = store.get("app/gone")
    assert old is not None and old.destroyed_material == b""
    assert store.by_request(old.request_id) == old and list(store.scan()) == [old]
    kept = store.update(dataclasses.replace(old, destroyed_material=bytes(range(32))))
    assert backend.open(url).get("app/gone") == kept and kept.destroyed_material == bytes(range(32))


def test_get_and_by_request_of_unknown_ids_are_none(store: PlacementStore) -> None:
    assert store.get("nope") is None
    assert store.by_request("nope") is None


def test_by_request_finds_the_placement_a_request_created(store: PlacementStore) -> None:
    p = make(request_id="idem-42", replicas=())
    store.create(p)
    assert store.by_request("idem-42") == p


def test_duplicate_key_id_conflicts_and_carries_the_existing_record(store: PlacementStore) -> None:
    first = make(request_id="r1")
    store.create(first)
    with pytest.raises(Conflict) as info:
        store.create(make(request_id="r2", primary="usw2-a"))
    assert info.value.existing == first
    assert store.get(first.key_id) == first
    assert store.by_request("r2") is None


def test_duplicate_request_id_conflicts_and_carries_the_existing_record(store: PlacementStore) -> None:
    first = make("app/a", request_id="same")
    store.create(first)
    with pytest.raises(Conflict) as info:
        store.create(make("app/b", request_id="same"))
    assert info.value.existing == first
    assert store.get("app/b") is None
    assert [p.key_id for p in store.list()] == ["app/a"]


def test_update_bumps_the_version_and_persists(store: PlacementStore) -> None:
    created = make()
    store.create(created)
    enabled = store.update(dataclasses.replace(created, state=KeyState.ENABLED, replicas=("usw2-a",)))
    assert enabled.version == 2
    assert enabled.state is KeyState.ENABLED
    assert store.get(created.key_id) == enabled
    again = store.update(dataclasses.replace(enabled, primary="use1-b"))
    assert again.version == 3
    assert store.get(created.key_id) == again
    assert store.by_request(created.request_id) == again


def test_an_update_removes_an_external_keys_material(store: PlacementStore) -> None:
    """A destroyed EXTERNAL key's record keeps no wrapped key (nor public key): an update with
    empty material leaves none, read back by key, by request, by listing and by scan."""
    made = make("app/ext-gone", storage=KeyStorage.EXTERNAL, state=KeyState.ENABLED, replicas=(),
                wrapped=b"\x00wrapped\xff" * 20, public_der=b"\x30" * 91)
    store.create(made)
    destroyed = store.update(dataclasses.replace(made, state=KeyState.DESTROYED, wrapped=b"", public_der=b""))
    for read in (store.get(made.key_id), store.by_request(made.request_id), *store.list(), *store.scan()):
        assert read == destroyed
        assert read is not None and (read.wrapped, read.public_der) == (b"", b"")


def test_update_with_a_stale_version_conflicts_and_changes_nothing(store: PlacementStore) -> None:
    created = make()
    store.create(created)
    winner = store.update(dataclasses.replace(created, state=KeyState.ENABLED))
    with pytest.raises(Conflict) as info:
        store.update(dataclasses.replace(created, state=KeyState.DESTROYED))  # still version 1
    assert info.value.existing == winner
    assert store.get(created.key_id) == winner


def test_update_of_a_missing_key_conflicts_with_no_existing_record(store: PlacementStore) -> None:
    with pytest.raises(Conflict) as info:
        store.update(make("ghost"))
    assert info.value.existing is None
    assert store.get("ghost") is None


def test_an_update_from_a_read_of_an_earlier_record_under_the_key_id_conflicts(store: PlacementStore) -> None:
    """The key id was rolled back and made again by another request, whose record starts again at
    version 1: a writer holding the first record must not write it back over the second."""
    first = make(request_id="r1")
    store.create(first)
    store.delete(first.key_id, first.version)
    second = dataclasses.replace(make(request_id="r2"), algorithm=KeyAlgorithm.RSA_2048)
    store.create(second)
    with pytest.raises(Conflict) as info:
        store.update(dataclasses.replace(first, state=KeyState.ENABLED))
    assert info.value.existing == second
    assert store.get(first.key_id) == second and store.by_request("r2") == second


def test_delete_is_conditional_on_version(store: PlacementStore) -> None:
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


def test_a_deleted_intent_frees_its_key_id_and_request_id(store: PlacementStore) -> None:
    created = make()
    store.create(created)
    store.delete(created.key_id, created.version)
    store.create(created)
    assert store.get(created.key_id) == created
    assert store.by_request(created.request_id) == created


def test_change_counter_grows_on_every_write(store: PlacementStore) -> None:
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


def test_change_counter_does_not_move_on_reads(store: PlacementStore) -> None:
    store.create(make())
    before = store.change_counter()
    store.get("app/key-1")
    store.by_request("req-app/key-1")
    store.list()
    list(store.scan())
    assert store.change_counter() == before


def test_second_store_on_the_same_table_sees_the_first_ones_writes(backend: Backend, url: str) -> None:
    one, two = backend.open(url), backend.open(url)
    counter = two.change_counter()
    p = make()
    one.create(p)
    assert two.get(p.key_id) == p
    assert two.by_request(p.request_id) == p
    assert two.change_counter() > counter

    updated = two.update(dataclasses.replace(p, state=KeyState.ENABLED))
    assert one.get(p.key_id) == updated
    with pytest.raises(Conflict) as stale:
        one.update(dataclasses.replace(p, state=KeyState.DESTROYED))
    assert stale.value.existing == updated
    with pytest.raises(Conflict):
        one.create(make(request_id="other"))
    assert [q.key_id for q in two.list()] == [p.key_id]


def test_records_survive_reopening(backend: Backend, url: str) -> None:
    first = backend.open(url)
    first.create(make())
    counter = first.change_counter()
    first.close()
    reopened = backend.open(url)
    assert reopened.get("app/key-1") == make()
    assert reopened.change_counter() == counter


def _at_once(threads: int, call: Callable[[int], T], timeout: float = 30) -> list[T | BaseException]:
    """``call(i)`` for each i in ``range(threads)``, on as many threads released together: what each
    returned or raised, in order of i."""
    barrier = threading.Barrier(threads)
    results: dict[int, T | BaseException] = {}

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = call(i)
        except BaseException as exc:  # noqa: B036 - returned, for the caller's assertions to report
            results[i] = exc

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=timeout)
    assert not any(w.is_alive() for w in workers), f"a thread still running after {timeout} s"
    return [results[i] for i in range(threads)]


def test_concurrent_creates_of_one_key_id_have_exactly_one_winner(backend: Backend, url: str) -> None:
    threads = 8
    stores = [backend.open(url) for _ in range(threads)]  # one per "gateway"
    mine = [make("race/key", request_id=f"req-{i}", primary=f"cluster-{i}") for i in range(threads)]

    def attempt(i: int) -> Placement:
        stores[i].create(mine[i])
        return mine[i]

    results = _at_once(threads, attempt)
    winners = [r for r in results if isinstance(r, Placement)]
    losers = [r for r in results if isinstance(r, Conflict)]
    assert len(winners) == 1 and len(losers) == threads - 1, results
    winner = winners[0]
    assert all(c.existing == winner for c in losers), [c.existing for c in losers]
    assert stores[0].get("race/key") == winner
    for i in range(threads):
        expected = winner if f"req-{i}" == winner.request_id else None
        assert stores[-1].by_request(f"req-{i}") == expected


# -- the fleet id ---------------------------------------------------------------------------


def test_the_fleet_id_is_made_once_and_stays_across_reopening(backend: Backend, url: str) -> None:
    first = backend.open(url).fleet_id()
    assert len(first) == 32 and int(first, 16) >= 0  # 128 random bits, in hex
    assert backend.open(url).fleet_id() == first
    assert backend.open(url).fleet_id("another-fleet") == first  # never replaced
    assert backend.open(backend.fresh()).fleet_id() != first  # another store, another fleet


def test_a_store_with_no_fleet_id_takes_the_one_proposed(store: PlacementStore) -> None:
    assert store.fleet_id("0123456789abcdef0123456789abcdef") == "0123456789abcdef0123456789abcdef"
    assert store.fleet_id() == "0123456789abcdef0123456789abcdef"


def test_looking_up_a_missing_fleet_id_finds_none_and_makes_none(backend: Backend, url: str) -> None:
    """What ``hsmgw store migrate`` asks of its source: a role that may only read it can, and
    the source is left as it was."""
    store = backend.open(url)
    assert store.existing_fleet_id() is None
    assert backend.open(url).existing_fleet_id() is None  # nothing was written for another process to find
    assert store.fleet_id("0123456789abcdef0123456789abcdef") == "0123456789abcdef0123456789abcdef"
    assert store.existing_fleet_id() == "0123456789abcdef0123456789abcdef"
    assert backend.open(url).existing_fleet_id() == "0123456789abcdef0123456789abcdef"


def test_concurrent_first_readers_of_the_fleet_id_agree_on_one(backend: Backend, url: str) -> None:
    threads = 8
    stores = [backend.open(url) for _ in range(threads)]  # one per gateway process
    seen = _at_once(threads, lambda i: stores[i].fleet_id(f"{i:032x}"))  # each proposes its own
    assert len(seen) == threads and len(set(seen)) == 1, seen
    assert seen[0] in {f"{i:032x}" for i in range(threads)}
    assert backend.open(url).fleet_id() == seen[0]


def test_the_fleet_id_is_no_placement_admin_record_or_change(store: PlacementStore) -> None:
    store.create(make("a/1"))
    counter = store.change_counter()
    log = store.change_log()
    store.fleet_id()
    assert [p.key_id for p in store.scan()] == ["a/1"]
    assert [p.key_id for p in store.list()] == ["a/1"]
    assert list(store.admin_records()) == []
    assert store.change_counter() == counter
    assert log is None or log.read() == ()


# -- admin records (pending quorum changes, operator switches) ------------------------------


def test_an_admin_record_is_made_once_then_written_only_by_who_read_its_version(store: PlacementStore) -> None:
    assert store.admin_record("switches") is None
    assert store.put_admin_record("switches", {"drained": ["use1-b"]}, 0) == 1
    with pytest.raises(Stale):
        store.put_admin_record("switches", {"drained": []}, 0)  # it exists now
    assert store.admin_record("switches") == ({"drained": ["use1-b"]}, 1)
    assert store.put_admin_record("switches", {"drained": [], "failed_over": ["us-east-1"]}, 1) == 2
    with pytest.raises(Stale):
        store.put_admin_record("switches", {"drained": ["use1-a"]}, 1)  # read before the last write
    with pytest.raises(Stale):
        store.put_admin_record("nothing-yet", {}, 3)
    assert store.admin_record("switches") == ({"drained": [], "failed_over": ["us-east-1"]}, 2)
    assert store.admin_record("nothing-yet") is None


def test_admin_records_are_not_placements_and_do_not_move_the_change_counter(store: PlacementStore) -> None:
    store.create(make("a/1"))
    counter = store.change_counter()
    store.put_admin_record("change/0a1b2c3d", {"action": "drain", "params": {"cluster": "use1-b"}}, 0)
    assert [p.key_id for p in store.scan()] == ["a/1"]
    assert [p.key_id for p in store.list()] == ["a/1"]
    assert store.get("change/0a1b2c3d") is None
    assert store.change_counter() == counter


def test_concurrent_read_and_write_of_one_admin_record_loses_no_write(backend: Backend, url: str) -> None:
    threads, each = 6, 5
    stores = [backend.open(url) for _ in range(threads)]  # one per gateway

    def add(i: int) -> None:
        for n in range(each):
            while True:
                found = stores[i].admin_record("changes")
                body, version = found if found is not None else ({"ids": []}, 0)
                try:
                    stores[i].put_admin_record("changes", {"ids": [*body["ids"], f"{i}-{n}"]}, version)
                    break
                except Stale:
                    continue

    errors = [r for r in _at_once(threads, add, timeout=60) if r is not None]
    assert not errors, errors
    found = backend.open(url).admin_record("changes")
    assert found is not None
    assert sorted(found[0]["ids"]) == sorted(f"{i}-{n}" for i in range(threads) for n in range(each))
    assert found[1] == threads * each


def test_scan_returns_every_record(store: PlacementStore) -> None:
    made = {key_id: make(key_id) for key_id in ["b/2", "a/1", "c", "a"]}
    for p in made.values():
        store.create(p)
    scanned = list(store.scan())
    # SQLite returns id order; DynamoDB promises no order, so compare as sets.
    assert sorted(p.key_id for p in scanned) == ["a", "a/1", "b/2", "c"]
    assert {p.key_id: p for p in scanned} == made


# -- listing ---------------------------------------------------------------------------


def test_list_prefix_is_literal_not_a_pattern(store: PlacementStore) -> None:
    for key_id in ["a%b", "axb", "a_c", "azc", "A_c", "a", "a*"]:
        store.create(make(key_id))
    assert [p.key_id for p in store.list("a%")] == ["a%b"]
    assert [p.key_id for p in store.list("a_")] == ["a_c"]
    assert [p.key_id for p in store.list("a")] == ["a", "a%b", "a*", "a_c", "axb", "azc"]
    assert [p.key_id for p in store.list()] == ["A_c", "a", "a%b", "a*", "a_c", "axb", "azc"]


def test_list_pages_with_after_and_limit(store: PlacementStore) -> None:
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
    assert [p.key_id for p in store.list(after="other/k", limit=2)] == ["team/k0", "team/k1"]


_ID_ALPHABET = "ab%_/.-:~é"
_ids = st.text(alphabet=_ID_ALPHABET, min_size=1, max_size=6)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.sets(_ids, max_size=15), data=st.data())
def test_paging_through_a_prefix_returns_exactly_the_sorted_matching_ids(
    backend: Backend, ids: set[str], data: st.DataObject
) -> None:
    prefix = data.draw(
        st.one_of(
            st.just(""),
            st.text(alphabet=_ID_ALPHABET, max_size=3),
            st.sampled_from(sorted(ids) or [""]).flatmap(lambda i: st.integers(0, len(i)).map(lambda n: i[:n])),
        ),
        label="prefix",
    )
    store = backend.open(backend.fresh())
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


def test_admin_records_are_read_together_by_name(store: PlacementStore) -> None:
    for n in range(130):  # more than one DynamoDB BatchGetItem takes
        store.put_admin_record(f"change/{n:04d}", {"n": n}, 0)
    store.put_admin_record("change/0007", {"n": 7, "state": "applied"}, 1)
    names = [f"change/{n:04d}" for n in range(0, 140, 7)] + ["change/0007", "switches"]
    found = store.admin_records_named(names)
    assert found == {f"change/{n:04d}": ({"n": n}, 1) for n in range(14, 130, 7)} | {
        "change/0000": ({"n": 0}, 1), "change/0007": ({"n": 7, "state": "applied"}, 2)}
    assert store.admin_records_named([]) == {}

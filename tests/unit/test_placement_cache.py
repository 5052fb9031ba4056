"""router.cache: every key's placement in memory, keys of one shape sharing one entry;
and the SQLite change log that lets a cache follow other processes without rescanning."""

from __future__ import annotations

import dataclasses
import gc
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.cache import VIEWS, PlacementCache
from router.model import KeyState, KeyStorage, Placement
from router.placement.sqlite import SqliteStore
from router.router import Router, Topology
from tests.support import serving as make


def routing_fields(p: Placement) -> dict[str, object]:
    skip = {"create_time", "request_id", "fingerprint", "owner"}
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.name not in skip}


def test_a_cached_key_routes_like_its_record_without_the_creation_record() -> None:
    record = make("app/a")
    cache = PlacementCache([record])
    got = cache.get("app/a")
    assert got is not None
    assert routing_fields(got) == routing_fields(record)
    assert got.clusters == ("use1-a", "usw2-a")
    assert (got.create_time, got.request_id, got.fingerprint) == (0.0, "", "")
    assert cache.get("app/b") is None
    assert "app/a" in cache and "app/b" not in cache


def test_a_cached_key_being_created_carries_no_owner() -> None:
    """The process making a key is the store's business (a retry reads it there): keys being
    created share a shape whoever makes them, and no view carries a process's name."""
    owner = "fbb57049-dd18-48d7-a805-551c2d0ca1be:4026531836:4026531834:4242:6742648"
    records = [make(f"app/{i}", state=KeyState.CREATING, owner=f"{owner[:-1]}{i}") for i in range(3)]
    cache = PlacementCache(records)
    assert cache.shapes == 1
    assert [cache.get(f"app/{i}").owner for i in range(3)] == ["", "", ""]  # type: ignore[union-attr]
    assert records[0].for_key("app/z").owner == ""


def test_for_key_copies_every_field_but_the_creation_record() -> None:
    record = make("app/a", storage=KeyStorage.EXTERNAL, wrapped=b"w" * 40, public_der=b"p" * 91, version=7)
    view = record.for_key("app/z")
    assert routing_fields(view) == {**routing_fields(record), "key_id": "app/z"}
    assert view != record


def test_external_keys_keep_their_own_wrapped_material() -> None:
    a = make("ext/a", storage=KeyStorage.EXTERNAL, wrapped=b"A" * 32, public_der=b"a" * 91, replicas=())
    b = make("ext/b", storage=KeyStorage.EXTERNAL, wrapped=b"B" * 32, public_der=b"b" * 91, replicas=())
    cache = PlacementCache([a, b])
    assert cache.get("ext/a") == a and cache.get("ext/b") == b
    assert cache.shapes == 0


def test_a_token_key_with_material_in_its_record_keeps_its_own_entry_and_counts() -> None:
    odd = make("app/odd", public_der=b"p" * 91)
    cache = PlacementCache([make("app/plain"), odd])
    assert cache.get("app/odd") == odd and cache.get("app/plain").public_der == b""  # type: ignore[union-attr]
    assert cache.counts() == {"use1-a": 2, "usw2-a": 2}
    cache.pop("app/odd")
    assert cache.counts() == {"use1-a": 1, "usw2-a": 1}


def test_keys_that_differ_only_in_id_share_one_entry() -> None:
    cache = PlacementCache(make(f"app/{i}") for i in range(1000))
    assert len(cache) == 1000 and cache.shapes == 1
    cache.put(make("app/7", state=KeyState.UNDER_REPLICATED, version=2))
    assert cache.shapes == 2
    got = cache.get("app/7")
    assert got is not None and got.state is KeyState.UNDER_REPLICATED and got.version == 2
    assert cache.get("app/8") is not None and cache.get("app/8").state is KeyState.ENABLED  # type: ignore[union-attr]
    cache.put(make("app/7", version=3))
    assert cache.shapes == 2, "the shape nobody uses any more is gone"
    cache.pop("app/7")
    assert cache.shapes == 1 and len(cache) == 999


def test_a_key_read_again_gets_its_view_until_its_placement_changes() -> None:
    cache = PlacementCache(make(f"app/{i}") for i in range(3))
    first = cache.get("app/1")
    assert first is not None and first.key_id == "app/1"
    assert cache.get("app/1") is first, "the view is made once"
    assert cache.get("app/2").key_id == "app/2"  # type: ignore[union-attr]
    cache.put(make("app/1", primary="use1-b", replicas=("usw2-a",), version=2))  # moved
    moved = cache.get("app/1")
    assert moved is not None and (moved.primary, moved.clusters, moved.version) == ("use1-b", ("use1-b", "usw2-a"), 2)
    cache.put(make("app/1", primary="use1-b", replicas=("usw2-a",), state=KeyState.DESTROYED, version=3))
    assert cache.get("app/1").state is KeyState.DESTROYED  # type: ignore[union-attr]
    cache.pop("app/1")
    assert cache.get("app/1") is None
    cache.put(make("app/1"))  # back in the shape its old view was of
    assert cache.get("app/1") == first
    assert cache.get("app/0").key_id == "app/0"  # type: ignore[union-attr]


def test_more_keys_than_views_kept_are_each_read_right() -> None:
    n = VIEWS * 2 + 7
    cache = PlacementCache(make(f"app/{i}") for i in range(n))
    for _ in range(2):
        for i in range(n):
            got = cache.get(f"app/{i}")
            assert got is not None and got.key_id == f"app/{i}" and got.clusters == ("use1-a", "usw2-a")


def test_key_counts_follow_puts_and_pops() -> None:
    cache = PlacementCache([make("a"), make("b", primary="use1-b", replicas=()), make("c", state=KeyState.DESTROYED),
                            make("x", storage=KeyStorage.EXTERNAL, replicas=())])
    assert cache.counts() == {"use1-a": 1, "usw2-a": 1, "use1-b": 1}
    cache.put(make("a", primary="use1-b", replicas=("usw2-a",), version=2))  # moved
    assert +cache.counts() == {"usw2-a": 1, "use1-b": 2}
    cache.put(make("b", primary="use1-b", replicas=(), state=KeyState.DESTROYED, version=2))
    cache.pop("a")
    assert +cache.counts() == {}


def test_select_judges_each_shape_once_and_returns_only_matching_keys() -> None:
    placements = [make(f"ok/{i}") for i in range(500)]
    placements += [make(f"short/{i}", state=KeyState.UNDER_REPLICATED, replicas=()) for i in range(3)]
    cache = PlacementCache(placements)
    judged: list[str] = []

    def short(p: Placement) -> bool:
        judged.append(p.key_id)
        return p.state is KeyState.UNDER_REPLICATED

    assert sorted(p.key_id for p in cache.select(short)) == ["short/0", "short/1", "short/2"]
    assert len(judged) == 2, "one call per shape, not per key"
    assert cache.count_state(KeyState.UNDER_REPLICATED) == 3
    assert cache.count_state(KeyState.ENABLED) == 500


def test_a_key_costs_a_dict_slot_not_a_placement() -> None:
    ids = [f"tenant-{i % 97:03d}/signing-key-{i:08d}" for i in range(50_000)]
    template = make("")

    def rows() -> Iterator[Placement]:  # as a store scan yields them: each placement is new
        for key_id in ids:
            yield Placement(key_id, template.algorithm, template.usage, template.state, template.primary,
                            template.replicas, template.create_time, f"req-{key_id}", f"{key_id}|fp",
                            copies=template.copies)

    gc.collect()
    tracemalloc.start()
    try:
        cache = PlacementCache(rows())
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(cache) == len(ids)
    # The ids' strings exist already; what the cache adds is its table. Keeping each
    # placement would cost over 300 bytes a key (the object and its creation record).
    per_key = size / len(ids)
    assert per_key < 100, f"{per_key:.0f} bytes per cached key"


# -- the change log ------------------------------------------------------------------------


def test_changes_since_names_the_keys_written_since(store: SqliteStore) -> None:
    start = store.change_counter()
    a = make("app/a", state=KeyState.CREATING)
    store.create(a)
    store.create(make("app/b", state=KeyState.CREATING))
    middle = store.change_counter()
    store.update(a)
    assert store.changes_since(start) == (start + 3, ("app/a", "app/b"))
    assert store.changes_since(middle) == (middle + 1, ("app/a",))
    assert store.changes_since(middle + 1) == (middle + 1, ())


def test_changes_since_is_none_when_the_log_does_not_reach_back(store: SqliteStore,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import router.placement.sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "_LOG_KEEP", 3)
    start = store.change_counter()
    for i in range(5):
        store.create(make(f"app/{i}"))
    assert store.changes_since(start) is None, "two changes fell out of the log"
    assert store.changes_since(start + 2) == (start + 5, ("app/2", "app/3", "app/4"))
    assert store.changes_since(-1) is None


class CountingStore(SqliteStore):
    scans = 0

    def scan(self) -> Iterator[Placement]:
        self.scans += 1
        return super().scan()


def test_a_router_follows_another_process_writes_from_the_log_without_rescanning(tmp_path: Path) -> None:
    path = tmp_path / "placements.db"
    ours, theirs = CountingStore(path), SqliteStore(path)
    for i in range(50):
        theirs.create(make(f"app/{i}"))
    router = Router(Topology("us-east-1", (), {"us-east-1": ()}), {}, ours)
    assert ours.scans == 1 and router.placement("app/3").primary == "use1-a"

    moved = theirs.update(make("app/3", primary="use1-b"))
    theirs.create(make("app/new", replicas=()))
    assert router.refresh() is True
    assert router.placement("app/3").primary == "use1-b"
    assert router.placement("app/3").version == moved.version
    assert router.placement("app/new").clusters == ("use1-a",)
    assert router.refresh() is False
    assert ours.scans == 1, "followed the log; no rescan"
    assert router.key_counts() == {}  # no backends configured: counts are per configured cluster


def test_a_router_rescans_when_it_fell_behind_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import router.placement.sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "_LOG_KEEP", 2)
    path = tmp_path / "placements.db"
    ours, theirs = CountingStore(path), SqliteStore(path)
    router = Router(Topology("us-east-1", (), {"us-east-1": ()}), {}, ours, rescan_interval=0.0)
    for i in range(5):
        theirs.create(make(f"app/{i}"))
    assert router.refresh() is True
    assert ours.scans == 2
    assert all(router.placement(f"app/{i}").state is KeyState.ENABLED for i in range(5))


class NoLogStore(CountingStore):
    """A store without a change log (as DynamoDB): a change can only be caught by a rescan."""

    def change_log(self) -> None:
        return None


def test_without_a_change_log_the_cache_rescans_at_most_every_rescan_interval(tmp_path: Path) -> None:
    path = tmp_path / "placements.db"
    ours, theirs = NoLogStore(path), SqliteStore(path)
    now = [100.0]
    router = Router(Topology("us-east-1", (), {"us-east-1": ()}), {}, ours, clock=lambda: now[0],
                    rescan_interval=60.0)
    theirs.create(make("app/a", replicas=()))
    assert router.refresh() is False and ours.scans == 1, "the start-up scan was just now"
    assert router.placement("app/a").primary == "use1-a", "an unknown key is read from the store"
    theirs.update(make("app/a", primary="use1-b", replicas=()))
    now[0] += 59
    assert router.refresh() is False and ours.scans == 1
    now[0] += 2
    assert router.refresh() is True and ours.scans == 2
    assert router.placement("app/a").primary == "use1-b"
    assert router.refresh() is False and ours.scans == 2, "nothing changed since"


def test_a_bulk_change_is_one_reload_not_a_read_per_key(tmp_path: Path) -> None:
    path = tmp_path / "placements.db"
    ours, theirs = CountingStore(path), SqliteStore(path)
    router = Router(Topology("us-east-1", (), {"us-east-1": ()}), {}, ours)
    reads: list[str] = []
    real_get = ours.get
    ours.get = lambda key_id: reads.append(key_id) or real_get(key_id)  # type: ignore[method-assign]
    for i in range(1001):
        theirs.create(make(f"bulk/{i:04d}"))
    assert router.refresh() is True
    assert ours.scans == 2 and reads == [], "one scan, no per-key reads"
    assert router.placement("bulk/1000").state is KeyState.ENABLED and reads == []


def test_a_store_error_half_way_through_a_refresh_loses_no_change(tmp_path: Path) -> None:
    from router.placement.store import StoreError

    path = tmp_path / "placements.db"
    ours, theirs = CountingStore(path), SqliteStore(path)
    for key_id in ("app/a", "app/b"):
        theirs.create(make(key_id))
    router = Router(Topology("us-east-1", (), {"us-east-1": ()}), {}, ours)
    for key_id in ("app/a", "app/b"):
        current = theirs.get(key_id)
        assert current is not None
        theirs.update(dataclasses.replace(current, primary="use1-b"))
    real_get = ours.get
    failing = {"app/b"}

    def flaky_get(key_id: str) -> Placement | None:
        if key_id in failing:
            failing.discard(key_id)
            raise StoreError("placement store unreachable")
        return real_get(key_id)

    ours.get = flaky_get  # type: ignore[method-assign]
    with pytest.raises(StoreError):
        router.refresh()
    assert router.placement("app/a").primary == "use1-b"
    assert router.refresh() is True, "the key left unread is read on the next refresh"
    assert router.placement("app/b").primary == "use1-b"
    assert router.refresh() is False and ours.scans == 1


def test_get_key_reads_the_whole_record_and_falls_back_to_the_cache_when_the_store_is_down(tmp_path: Path) -> None:
    from router.errors import KeyNotFound
    from router.placement.store import StoreError

    path = tmp_path / "placements.db"
    ours = CountingStore(path)
    ours.create(make("app/a"))
    router = Router(Topology("us-east-1", (), {"us-east-1": ()}), {}, ours)
    record = router.get_key("app/a")
    assert record.request_id == "req-app/a" and record.create_time == 1_767_225_600.5, "from the store"
    with pytest.raises(KeyNotFound):
        router.get_key("app/none")

    def down(key_id: str) -> Placement | None:
        raise StoreError("placement store unreachable")

    ours.get = down  # type: ignore[method-assign]
    cached = router.get_key("app/a")
    assert cached.primary == "use1-a" and cached.state is KeyState.ENABLED
    assert cached.request_id == "" and cached.create_time == 0.0, "the cache keeps no creation record"
    from gateway import _convert as conv

    assert not conv.key(cached).HasField("create_time"), "shown as unknown, not as 1970"
    assert conv.key(record).create_time.ToNanoseconds() == 1_767_225_600_500_000_000

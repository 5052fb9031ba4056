"""router.placement.ring: which cluster a new key goes to (consistent hashing)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from router.placement import PlacementRing

cluster_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
key_ids = st.text(max_size=40)

KEYS = [f"app{i % 17}/key-{i}" for i in range(10_000)]


@given(nodes=st.lists(cluster_names, min_size=1, max_size=6, unique=True), keys=st.lists(key_ids, max_size=30))
def test_choose_is_deterministic_and_returns_one_of_the_nodes(nodes: list[str], keys: list[str]) -> None:
    ring = PlacementRing(nodes)
    again = PlacementRing(reversed(nodes))  # another process, clusters listed in another order
    for key in keys:
        chosen = ring.choose(key)
        assert chosen in nodes
        assert ring.choose(key) == chosen
        assert again.choose(key) == chosen


def test_ring_ignores_duplicate_cluster_names() -> None:
    assert PlacementRing(["b", "a", "b"]).nodes == ("a", "b")
    with_duplicate, plain = PlacementRing(["a", "b", "a"]), PlacementRing(["a", "b"])
    assert [with_duplicate.choose(k) for k in KEYS[:200]] == [plain.choose(k) for k in KEYS[:200]]


def test_single_node_gets_every_key() -> None:
    ring = PlacementRing(["only"])
    assert {ring.choose(k) for k in KEYS[:500]} == {"only"}


@settings(max_examples=15, deadline=None)
@given(nodes=st.lists(cluster_names, min_size=3, max_size=3, unique=True))
def test_three_nodes_share_10000_keys_evenly(nodes: list[str]) -> None:
    ring = PlacementRing(nodes)
    counts = Counter(ring.choose(k) for k in KEYS)
    assert set(counts) == set(nodes)
    for node in nodes:
        assert 0.20 <= counts[node] / len(KEYS) <= 0.46, counts


@settings(max_examples=15, deadline=None)
@given(nodes=st.lists(cluster_names, min_size=4, max_size=4, unique=True))
def test_adding_a_fourth_node_moves_few_keys_and_only_to_it(nodes: list[str]) -> None:
    *old, new = nodes
    before = PlacementRing(old)
    after = PlacementRing(nodes)
    moved = [k for k in KEYS if before.choose(k) != after.choose(k)]
    assert len(moved) <= 1.5 * len(KEYS) / 4, len(moved)
    assert moved, "the new cluster received no keys"
    assert {after.choose(k) for k in moved} == {new}


@settings(max_examples=25, deadline=None)
@given(nodes=st.lists(cluster_names, min_size=2, max_size=5, unique=True), data=st.data())
def test_without_removes_nodes_and_moves_only_their_keys(nodes: list[str], data: st.DataObject) -> None:
    excluded = data.draw(st.sets(st.sampled_from(nodes), min_size=1, max_size=len(nodes) - 1))
    ring = PlacementRing(nodes)
    smaller = ring.without(excluded)
    assert set(smaller.nodes) == set(nodes) - excluded
    assert ring.nodes == tuple(sorted(nodes)), "without() must not change the original ring"
    for key in KEYS[:300]:
        chosen = smaller.choose(key)
        assert chosen not in excluded
        if ring.choose(key) not in excluded:
            assert chosen == ring.choose(key), "removing a cluster moved a key that was not on it"


def test_without_unknown_name_changes_nothing() -> None:
    ring = PlacementRing(["a", "b", "c"])
    same = ring.without(["zzz"])
    assert same.nodes == ring.nodes
    assert [same.choose(k) for k in KEYS[:300]] == [ring.choose(k) for k in KEYS[:300]]


@given(key=key_ids)
def test_empty_ring_returns_none(key: str) -> None:
    assert PlacementRing([]).choose(key) is None
    assert PlacementRing(["a", "b"]).without(["a", "b"]).choose(key) is None
    assert PlacementRing([]).nodes == ()

"""The placement cache: every key's placement in memory, in little memory.

A gateway serves every key without asking the store, so the cache holds all of
them — a million keys must fit in a worker's few hundred megabytes. Most keys
differ only in their id: same algorithm, usage, state, clusters and version.
Such keys share one *shape* (a placement with an empty key id), and the cache
maps each key id to its shape, so a key costs its id and a dict slot.

The shape leaves out what only the store needs: ``create_time``,
``request_id``, ``fingerprint`` and ``owner``. Readers that show or write those (GetKey,
ListKeys, every store update) read the store. EXTERNAL keys carry their own
wrapped material, so each (and any key with key material in its record) keeps a
placement of its own.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from router.model import KeyState, Placement

_Shape = tuple[object, ...]

VIEWS = 4096
"""Keys whose placement view the cache keeps made (~0.3 KB each)."""


def _shape_of(placement: Placement) -> _Shape:
    return (placement.algorithm, placement.usage, placement.state, placement.primary, placement.replicas,
            placement.storage, placement.version, placement.copies, placement.extractable, placement.held)


def _counted(placement: Placement) -> bool:
    """Whether the key takes a slot on its clusters (``max_keys``)."""
    return placement.state is not KeyState.DESTROYED and not placement.external


class PlacementCache:
    """Key id → placement, and how many keys each cluster holds.

    Reads take no lock (one dict lookup); writes take the cache's lock.
    """

    def __init__(self, placements: Iterable[Placement] = ()) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Placement] = {}
        self._shapes: dict[_Shape, Placement] = {}
        self._users: Counter[_Shape] = Counter()
        self._own: set[str] = set()
        """Keys with an entry of their own (EXTERNAL keys: their wrapped material is theirs alone)."""
        self._views: dict[str, tuple[Placement, Placement]] = {}
        """Key id → (its shape, its view of it), for the keys read lately (at most ``VIEWS``)."""
        for placement in placements:
            self._put(placement)

    def get(self, key_id: str) -> Placement | None:
        entry = self._entries.get(key_id)
        if entry is None or entry.key_id == key_id:
            return entry
        # A key's view of its shape is made once and kept while the key keeps that shape
        # (making one sets every field: ~3 µs of each request). Dict reads and writes need
        # no lock, and a view of an entry that was replaced is never returned.
        seen = self._views.get(key_id)
        if seen is not None and seen[0] is entry:
            return seen[1]
        view = entry.for_key(key_id)
        if len(self._views) >= VIEWS:
            self._views.clear()  # the keys in use now come back within a request each
        self._views[key_id] = (entry, view)
        return view

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def shapes(self) -> int:
        """Distinct shapes in use (what the cache's memory scales with, besides key ids)."""
        return len(self._shapes)

    def put(self, placement: Placement) -> None:
        """Cache ``placement``, replacing what the cache had for its key."""
        with self._lock:
            self._drop(placement.key_id)
            self._put(placement)

    def pop(self, key_id: str) -> None:
        with self._lock:
            self._drop(key_id)

    def counts(self) -> Counter[str]:
        """Keys per cluster (live TOKEN keys: what ``max_keys`` limits), summed per shape."""
        counts: Counter[str] = Counter()
        with self._lock:
            for shape, users in self._users.items():
                entry = self._shapes[shape]
                if _counted(entry):
                    for name in entry.clusters:
                        counts[name] += users
            for key_id in self._own:
                entry = self._entries[key_id]
                if _counted(entry):
                    counts.update(entry.clusters)
        return counts

    def count_state(self, state: KeyState) -> int:
        with self._lock:
            shared = sum(n for shape, n in self._users.items() if self._shapes[shape].state is state)
            own = [self._entries[k] for k in self._own]
        return shared + sum(1 for p in own if p.state is state)

    def select(self, wanted: Callable[[Placement], bool]) -> Iterator[Placement]:
        """The cached placements ``wanted`` accepts.

        ``wanted`` sees each shape once, not each key: with no shape accepted,
        only keys with an entry of their own are walked, so this is cheap when nothing matches.
        """
        with self._lock:
            accepted = {id(shape) for shape in self._shapes.values() if wanted(shape)}
            key_ids = list(self._entries) if accepted else list(self._own)
        for key_id in key_ids:
            entry = self._entries.get(key_id)
            if entry is None:
                continue
            if entry.key_id == key_id:
                if wanted(entry):
                    yield entry
            elif id(entry) in accepted:
                yield entry.for_key(key_id)

    def _put(self, placement: Placement) -> None:
        if placement.external or placement.wrapped or placement.public_der:
            entry = placement
            self._own.add(placement.key_id)
        else:
            shape = _shape_of(placement)
            entry = self._shapes.get(shape) or self._shapes.setdefault(shape, placement.for_key(""))
            self._users[shape] += 1
        self._entries[placement.key_id] = entry

    def _drop(self, key_id: str) -> None:
        entry = self._entries.pop(key_id, None)
        if entry is None:
            return
        if entry.key_id == key_id:
            self._own.discard(key_id)
        else:
            shape = _shape_of(entry)
            self._users[shape] -= 1
            if not self._users[shape]:
                del self._users[shape], self._shapes[shape]

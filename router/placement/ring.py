"""Consistent hashing: which cluster a new key goes to.

Only eligible clusters (healthy, not draining, below their key limit) are on
the ring, so adding a cluster moves few keys in a rebalance.
"""

from __future__ import annotations

from collections.abc import Iterable

from uhashring import HashRing


class PlacementRing:
    def __init__(self, clusters: Iterable[str], *, vnodes: int = 160) -> None:
        self._nodes = tuple(sorted(set(clusters)))
        self._vnodes = vnodes
        self._ring = HashRing(nodes={n: {"vnodes": vnodes} for n in self._nodes}) if self._nodes else None

    @property
    def nodes(self) -> tuple[str, ...]:
        return self._nodes

    def choose(self, key_id: str) -> str | None:
        """The cluster for ``key_id``, or None when the ring is empty."""
        if self._ring is None:
            return None
        return str(self._ring.get_node(key_id))

    def without(self, excluded: Iterable[str]) -> PlacementRing:
        excluded = set(excluded)
        return PlacementRing((n for n in self._nodes if n not in excluded), vnodes=self._vnodes)

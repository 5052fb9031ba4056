"""Placement: the store of key → clusters, and the ring that places new keys."""

from router.placement.factory import make_store
from router.placement.ring import PlacementRing
from router.placement.sqlite import SqliteStore
from router.placement.store import Conflict, PlacementStore, Stale, StoreError, StoreMisconfigured

__all__ = ["Conflict", "PlacementRing", "PlacementStore", "SqliteStore", "Stale", "StoreError", "StoreMisconfigured",
           "make_store"]

"""What /metrics says about the placement cache: its size, full reloads and keys re-read from the change log."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prometheus_client import CollectorRegistry

from gateway.metrics import RouterCollector
from router.placement.sqlite import SqliteStore
from router.router import Router, Topology
from tests.support import serving as make


def test_cache_size_reloads_and_rereads_are_exported(tmp_path: Path) -> None:
    path = tmp_path / "placements.db"
    theirs = SqliteStore(path)
    for i in range(3):
        theirs.create(make(f"app/{i}"))
    router = Router(Topology("us-east-1", (), {"us-east-1": ()}), {}, SqliteStore(path), rescan_interval=0.0)
    registry = CollectorRegistry()
    registry.register(RouterCollector(router))

    def sample(name: str) -> float | None:
        return registry.get_sample_value(name)

    assert sample("hsmgw_placement_cache_keys") == 3
    assert sample("hsmgw_placement_cache_reloads_total") == 1
    assert sample("hsmgw_placement_cache_keys_reread_total") == 0

    theirs.create(make("app/new"))
    current = theirs.get("app/0")
    assert current is not None
    theirs.update(dataclasses.replace(current, primary="use1-b"))
    router.refresh()
    assert sample("hsmgw_placement_cache_keys") == 4
    assert sample("hsmgw_placement_cache_keys_reread_total") == 2
    assert sample("hsmgw_placement_cache_reloads_total") == 1

    router.reload()
    assert sample("hsmgw_placement_cache_reloads_total") == 2

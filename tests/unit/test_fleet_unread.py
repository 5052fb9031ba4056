"""Reconcile when the placement store's fleet id cannot be read.

A token whose fleet marker does not list the fleet id this process read at start is
this store's only if the store's id, read again, is on it (on a DynamoDB global table two
regions' first gateways may each write one, and the table keeps the last). While that read
fails, reconcile cannot tell whose the token is: it destroys nothing there that pass, and
says so (``fleet_unread``). The next pass, with the store answering, does what it found.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.metrics import GatewayMetrics
from gateway.server import report_reconcile
from router.backend import HsmBackend, KeyMaterial, PoolStats
from router.model import ClusterSpec, KeyState
from router.placement.sqlite import SqliteStore
from router.placement.store import StoreError
from router.reconcile import reconcile
from router.router import FLEET_UNREAD, Router, Topology
from tests.support import stored

KEY = {"private key": 1, "public key": 1}
STORES_ID = "f" * 32
"""The store's fleet id once another region's write won: the token's marker lists it."""


class Token(HsmBackend):
    """A token marked with the store's fleet id, holding ``objects``; destroys as asked."""

    def __init__(self, name: str, objects: dict[str, dict[str, int]]) -> None:
        self.spec = ClusterSpec(name, "us-east-1", name)
        self.objects = objects
        self.marked: list[str] = []

    def fleets(self, deadline: float) -> tuple[str, ...] | None:
        return (STORES_ID, *self.marked)

    def mark(self, fleet_id: str, deadline: float) -> None:
        self.marked.append(fleet_id)

    def key_objects(self, deadline: float, *, key_id: str | None = None) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in self.objects.items() if key_id in (None, k)}

    def destroy(self, key_id: str, deadline: float, *, unless: Callable[[], bool] | None = None,
                of: KeyMaterial | None = None) -> int:
        if unless is not None and unless():
            return 0
        return sum(self.objects.pop(key_id, {}).values())

    def stats(self) -> PoolStats:
        return PoolStats(size=1, open=1, in_use=0)

    def close(self) -> None:
        return None


Token.__abstractmethods__ = frozenset()  # the fake implements what reconcile uses


class Store(SqliteStore):
    """A store whose fleet id read fails while ``down`` (a read that times out or is throttled);
    its other reads answer."""

    down = False

    def existing_fleet_id(self) -> str | None:  # fleet_id reads through it too
        if self.down:
            raise StoreError("connection refused")
        return super().existing_fleet_id()


def _fleet(tmp_path: Path) -> tuple[Router, Store, Token]:
    """use1-a holds a destroyed key's objects and those of a creation that stopped half-way an
    hour ago: reconcile destroys both on a token of its store's fleet. This process read the
    store's fleet id before another region's write replaced it with the one the token lists."""
    store = Store(tmp_path / "p.db")
    long_ago = time.time() - 3600
    store.create(stored("k/gone", state=KeyState.DESTROYED, primary="use1-a", replicas=(), create_time=long_ago))
    store.create(stored("k/stale", primary="use1-a", replicas=(), create_time=long_ago))
    token = Token("use1-a", {"k/gone": dict(KEY), "k/stale": dict(KEY)})
    router = Router(Topology("us-east-1", (), {"us-east-1": ("use1-a",)}), {"use1-a": token}, store)
    assert router.fleet_id != STORES_ID
    store._query("UPDATE meta SET value = ? WHERE name = 'fleet_id'", (STORES_ID,))  # the other region's write
    store.down = True
    return router, store, token


def test_fleet_check_names_the_store_read_that_failed(tmp_path: Path) -> None:
    router, store, token = _fleet(tmp_path)
    assert router.fleet_check("use1-a", time.monotonic() + 5) == (
        FLEET_UNREAD, "the placement store's fleet id could not be read (connection refused)")
    assert token.marked == [], "a token whose fleet is not known was marked"


def test_the_periodic_reconcile_destroys_nothing_on_it_and_reports_it(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    router, store, token = _fleet(tmp_path)
    metrics = GatewayMetrics(router)
    caplog.set_level(logging.WARNING)
    report_reconcile(router, metrics)  # what a serving gateway runs: report only, but a destroyed key's objects go
    assert token.objects == {"k/gone": KEY, "k/stale": KEY}, "objects destroyed on a token whose fleet is not known"
    assert metrics.registry.get_sample_value("hsmgw_reconcile_findings", {"kind": "fleet_unread"}) == 1
    said = [(r.levelname, r.name, r.getMessage()) for r in caplog.records]
    assert ("WARNING", "router.reconcile", "reconcile: cluster use1-a: the placement store's fleet id could not be "
            "read (connection refused); nothing is destroyed on it this pass") in said
    [summary] = [m for _, name, m in said if name == "gateway.server"]
    assert "1 clusters whose fleet could not be checked (use1-a; nothing destroyed there)" in summary

    store.down = False  # the next pass: the store's id is the token's
    report_reconcile(router, metrics)
    assert "k/gone" not in token.objects, "the destroyed key's objects stay once the store answers"
    assert metrics.registry.get_sample_value("hsmgw_reconcile_findings", {"kind": "fleet_unread"}) == 0


def test_a_fix_destroys_nothing_on_it_and_rolls_nothing_back(tmp_path: Path) -> None:
    router, store, token = _fleet(tmp_path)
    report = reconcile(router, fix=True, finish_destroys=True)  # hsmctl reconcile --fix
    assert report.fleet_unread == ["use1-a"] and report.other_fleet == []
    assert report.stale_intents == ["k/stale"] and report.rolled_back == []
    assert report.removed == [] and report.finished == []
    assert ("orphan", "use1-a", "k/gone") not in report.fixable
    assert token.objects == {"k/gone": KEY, "k/stale": KEY}
    assert store.get("k/stale") is not None, "the unfinished creation's record was removed"
    assert "1 clusters whose fleet could not be checked (use1-a; nothing destroyed there)" in report.summary()

    store.down = False
    report = reconcile(router, fix=True, finish_destroys=True)
    assert report.fleet_unread == [] and report.rolled_back == ["k/stale"]
    assert ("use1-a", "k/gone") in report.removed
    assert token.objects == {}
    assert store.get("k/stale") is None

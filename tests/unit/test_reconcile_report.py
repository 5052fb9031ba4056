"""The report-only reconcile of a serving gateway when the store or a cluster cannot be read."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gateway.metrics import GatewayMetrics
from gateway.server import report_reconcile
from router.backend import HsmBackend, PoolStats
from router.errors import ClusterDown
from router.model import ClusterSpec, Placement
from router.placement.sqlite import SqliteStore
from router.placement.store import StoreError
from router.reconcile import ReconcileReport
from router.router import Router, Topology


class Token(HsmBackend):
    """A cluster that lists the objects it was given, or fails to (a dead cluster)."""

    def __init__(self, name: str, objects: dict[str, dict[str, int]] | None = None) -> None:
        self.spec = ClusterSpec(name, "us-east-1", name)
        self.objects = objects

    def key_objects(self, deadline: float, *, key_id: str | None = None) -> dict[str, dict[str, int]]:
        if self.objects is None:
            raise ClusterDown(f"cluster {self.spec.name} is not reachable", cluster=self.spec.name)
        return self.objects

    def stats(self) -> PoolStats:
        return PoolStats(size=1, open=1, in_use=0)

    def close(self) -> None:
        return None


Token.__abstractmethods__ = frozenset()  # the fake implements what reconcile uses


class UnreachableStore(SqliteStore):
    """Answers while the gateway starts, then goes away."""

    down = False

    def scan(self) -> list[Placement]:  # type: ignore[override]
        if self.down:
            raise StoreError("connection refused")
        return list(super().scan())


def _gateway(tmp_path: Path, store: SqliteStore, **tokens: Token) -> tuple[Router, GatewayMetrics]:
    router = Router(Topology("us-east-1", (), {"us-east-1": tuple(tokens)}), dict(tokens), store)
    return router, GatewayMetrics(router)


def _sample(metrics: GatewayMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels or None)


def test_an_unreachable_store_publishes_nothing_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = UnreachableStore(tmp_path / "p.db")
    router, metrics = _gateway(tmp_path, store, **{"use1-a": Token("use1-a", {})})
    store.down = True
    caplog.set_level(logging.INFO, logger="gateway.server")
    report_reconcile(router, metrics)  # no exception: the loop goes on
    assert _sample(metrics, "hsmgw_reconcile_last_run_timestamp_seconds") is None
    assert [r.getMessage() for r in caplog.records] == [
        "reconcile (report only): the placement store is unreachable (connection refused); the next pass tries again"
    ]
    assert caplog.records[0].levelname == "WARNING"


def test_a_dead_cluster_is_an_unreachable_finding_and_the_rest_is_checked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = {"use1-a": Token("use1-a", {"stray/k": {"private key": 1}}), "use1-b": Token("use1-b")}
    router, metrics = _gateway(tmp_path, SqliteStore(tmp_path / "p.db"), **tokens)
    caplog.set_level(logging.INFO, logger="gateway.server")
    report_reconcile(router, metrics)
    assert _sample(metrics, "hsmgw_reconcile_findings", kind="unreachable") == 1
    assert _sample(metrics, "hsmgw_reconcile_findings", kind="unknown") == 1  # use1-a was still listed
    assert _sample(metrics, "hsmgw_reconcile_findings", kind="orphan") == 0
    assert _sample(metrics, "hsmgw_reconcile_findings", kind="missing") == 0
    assert (_sample(metrics, "hsmgw_reconcile_last_run_timestamp_seconds") or 0) > 0
    [line] = [r for r in caplog.records if r.name == "gateway.server"]
    assert line.levelname == "WARNING" and line.getMessage() == (
        "reconcile (report only): 0 unfinished creations, 0 orphan objects, 1 objects no record names, 0 missing "
        "copies (0 a fix would drop "
        "from their records), 0 duplicate objects, 1 unreachable clusters; `hsmctl reconcile` lists them "
        "(docs/operations.md)")


def test_a_cluster_whose_fleet_marker_could_not_be_read_is_a_fleet_unread_finding(tmp_path: Path) -> None:
    """Nothing is destroyed on it that pass: an alert on the findings must see it, as it sees other_fleet."""
    router, metrics = _gateway(tmp_path, SqliteStore(tmp_path / "p.db"), **{"use1-a": Token("use1-a", {})})
    metrics.reconciled(ReconcileReport(fleet_unread=["use1-a"], other_fleet=["use1-b", "use1-c"]))
    assert _sample(metrics, "hsmgw_reconcile_findings", kind="fleet_unread") == 1
    assert _sample(metrics, "hsmgw_reconcile_findings", kind="other_fleet") == 2
    metrics.reconciled(ReconcileReport())
    assert _sample(metrics, "hsmgw_reconcile_findings", kind="fleet_unread") == 0

"""What /metrics says about dispatch once every circuit is open: the requests sent anyway."""

from __future__ import annotations

import time
from pathlib import Path

from gateway.metrics import GatewayMetrics
from router.backend import HsmBackend, PoolStats
from router.health import CircuitState
from router.model import ClusterSpec
from router.placement.sqlite import SqliteStore
from router.router import Router, Topology


class _Cluster(HsmBackend):
    def __init__(self, name: str) -> None:
        self.spec = ClusterSpec(name, "us-east-1", name)

    def stats(self) -> PoolStats:
        return PoolStats(size=1, open=1, in_use=0)

    def close(self) -> None:
        return None


_Cluster.__abstractmethods__ = frozenset()  # the fake implements what dispatch and /metrics use


def test_requests_sent_to_an_open_circuit_are_counted(tmp_path: Path) -> None:
    """With every candidate's circuit open, a request goes to the one that answered most of
    its last calls: ``hsmgw_open_circuit_calls_total`` tells an operator it happens."""
    clusters = {name: _Cluster(name) for name in ("use1-a", "use1-b")}
    router = Router(Topology("us-east-1", (), {"us-east-1": tuple(clusters)}), dict(clusters),
                    SqliteStore(tmp_path / "p.db"))
    metrics = GatewayMetrics(router)

    def sent() -> float | None:
        return metrics.registry.get_sample_value("hsmgw_open_circuit_calls_total")

    assert sent() == 0
    for name, answered in (("use1-a", 7), ("use1-b", 5)):
        breaker = router.breakers[name]
        for _ in range(answered):
            breaker.record_success()
        for _ in range(3):
            breaker.record_failure()
        assert breaker.state is CircuitState.OPEN
    deadline = time.monotonic() + 5
    assert router.dispatcher.run(["use1-b", "use1-a"], lambda b: b.spec.name, deadline, "k") == ("use1-a", "use1-a")
    assert sent() == 1

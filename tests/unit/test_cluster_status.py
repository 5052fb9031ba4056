"""What `hsmctl clusters` shows of a cluster's circuit and rate, against grpc.health.v1."""

from __future__ import annotations

from pathlib import Path

from gateway.admin import AdminServicer
from hsmgw.v1 import admin_pb2
from router.health import CircuitBreaker, CircuitState
from router.placement.sqlite import SqliteStore
from router.router import Router, Topology
from tests.support import FakeClock
from tests.unit.test_router_creation import FailingBackend

TOPOLOGY = Topology("us-east-1", (), {"us-east-1": ("use1-a", "use1-b")})


def test_a_half_open_circuit_is_listed_not_serving_as_grpc_health_reports_it(tmp_path: Path) -> None:
    clock = FakeClock()
    router = Router(TOPOLOGY, {name: FailingBackend(name) for name in ("use1-a", "use1-b")},
                    SqliteStore(tmp_path / "p.db"), clock=clock, breaker_cooldown=2.0)
    admin = AdminServicer(router, audit_path=tmp_path / "audit.log", quorum=1)
    for _ in range(3):
        router.breakers["use1-a"].record_failure()
    clock.sleep(2.5)  # past the cooldown: one trial call may go through, every other is refused
    listed = {c.name: c for c in admin.ListClusters(admin_pb2.ListClustersRequest(), None).clusters}  # type: ignore[arg-type]
    assert listed["use1-a"].circuit == CircuitState.HALF_OPEN.value
    assert listed["use1-a"].health == "NOT_SERVING"
    assert (listed["use1-b"].circuit, listed["use1-b"].health) == ("closed", "SERVING")


def test_the_rate_of_a_young_breaker_is_over_the_time_it_has_seen() -> None:
    clock = FakeClock(1000.0)
    breaker = CircuitBreaker("use1-a", clock=clock, failures_to_open=1000, window=1000, max_failure_rate=1.0)
    for second in range(15):
        clock.now = 1000.0 + second
        for _ in range(100):
            breaker.record_success()
    clock.now = 1015.0
    assert breaker.ops_per_second() == 1500 / 15  # not 1500 / 60: the gateway is 15 s old
    clock.now = 1100.0  # older than a minute: the last minute only
    for _ in range(60):
        breaker.record_success()
    assert breaker.ops_per_second() == 60 / 60

"""Drain and failover switches: recorded in the store, applied by every process from it."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.admin import AdminServicer
from gateway.quorum import APPLIED
from router.errors import Unavailable
from router.health import CircuitState
from router.model import ReplicationPolicy
from router.placement.sqlite import SqliteStore
from router.placement.store import StoreError
from router.router import Router, Topology
from tests.unit.test_router_creation import FailingBackend

TOPOLOGY = Topology("us-east-1", ("us-west-2",), {"us-east-1": ("use1-a", "use1-b"), "us-west-2": ("usw2-a",)})


class Store(SqliteStore):
    """A store whose switches record stops answering on demand (``fail_reads_after_write``: once
    it has been written), or that takes no admin write at all (``writes_fail``)."""

    reads_fail = writes_fail = False
    fail_reads_after_write = False

    def admin_record(self, name: str) -> tuple[dict[str, Any], int] | None:
        if self.reads_fail and name == "switches":
            raise StoreError("placement store error: disk I/O error")
        return super().admin_record(name)

    def put_admin_record(self, name: str, body: dict[str, Any], version: int) -> int:
        if self.writes_fail:
            raise StoreError("placement store error: disk I/O error")
        written = super().put_admin_record(name, body, version)
        if name == "switches":
            self.reads_fail = self.fail_reads_after_write
        return written


def _router(tmp_path: Path, store: SqliteStore) -> Router:
    return Router(TOPOLOGY, {name: FailingBackend(name) for name in ("use1-a", "use1-b", "usw2-a")}, store)


def test_switches_apply_exactly_the_given_sets_and_log_each_change_once(tmp_path: Path, caplog) -> None:
    router = _router(tmp_path, SqliteStore(tmp_path / "p.db"))
    with caplog.at_level(logging.WARNING, logger="router.router"):
        router.apply_switches({"use1-b", "gone-cluster"}, {"us-east-1", "mars-1"})  # unknown names: ignored
        router.apply_switches({"use1-b"}, {"us-east-1"})  # no change: no log
        router.apply_switches(set(), {"us-east-1"})
    assert router.dispatcher.drained == frozenset()
    assert router.dispatcher.failed_over == {"us-east-1"}
    assert [r.getMessage() for r in caplog.records] == [
        "cluster use1-b drained", "region us-east-1 failed over", "cluster use1-b back in service"]


def test_a_drain_recorded_while_the_store_stops_answering_is_applied_at_the_next_sync(tmp_path: Path) -> None:
    store = Store(tmp_path / "p.db")
    router = _router(tmp_path, store)
    admin = AdminServicer(router, audit_path=tmp_path / "audit.log", quorum=1)
    store.fail_reads_after_write = True  # the store goes away right after the switch is written
    change = admin.changes.request("alice", "drain", {"cluster": "use1-b"})
    assert (change.state, change.result) == (APPLIED, "cluster use1-b drained")
    assert router.dispatcher.drained == frozenset()  # not applied here yet
    with pytest.raises(StoreError):
        admin.sync_switches()
    store.fail_reads_after_write = store.reads_fail = False
    admin.sync_switches()
    assert router.dispatcher.drained == {"use1-b"}


def test_a_drain_the_store_does_not_take_switches_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "p.db")
    router = _router(tmp_path, store)
    admin = AdminServicer(router, audit_path=tmp_path / "audit.log", quorum=2)
    change = admin.changes.request("alice", "failover", {"region": "us-east-1"})
    store.writes_fail = True
    with pytest.raises(Unavailable, match="placement store is unreachable"):
        admin.changes.approve("bob", change.id)  # the approval itself is not recorded
    store.writes_fail = False
    assert admin.changes.get(change.id).state == "pending"
    assert router.dispatcher.failed_over == frozenset()


class _Aborted(Exception):
    def __init__(self, status: Any) -> None:
        super().__init__(status.details)
        self.status = status


class _Context:
    """What AdminServicer's calls use of a gRPC context: ending the call with a status."""

    def abort_with_status(self, status: Any) -> None:
        raise _Aborted(status)


def test_a_switch_asked_for_while_the_store_cannot_say_the_current_ones_is_unavailable(tmp_path: Path) -> None:
    import grpc

    from hsmgw.v1 import admin_pb2

    store = Store(tmp_path / "p.db")
    admin = AdminServicer(_router(tmp_path, store), audit_path=tmp_path / "audit.log", quorum=2)
    store.reads_fail = True
    for call, request in ((admin.DrainCluster, admin_pb2.DrainClusterRequest(cluster="use1-a", drain=True)),
                          (admin.FailoverRegion, admin_pb2.FailoverRegionRequest(region="us-east-1", failover=True))):
        with pytest.raises(_Aborted) as info:
            call(request, _Context())
        assert info.value.status.code is grpc.StatusCode.UNAVAILABLE
        assert info.value.status.details.startswith("placement store is unreachable; admin changes cannot be checked")
    store.reads_fail = False
    assert admin.changes.list() == [], "nothing was asked for"


class _Unreachable(SqliteStore):
    """A store that answers nothing once ``down``: scans and reads fail as an unreachable DynamoDB's do."""

    down = False

    def scan(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise StoreError("DynamoDB Scan failed: unreachable: Read timeout on endpoint URL")
        return super().scan(*args, **kwargs)

    def admin_record(self, name: str) -> tuple[dict[str, Any], int] | None:
        if self.down:
            raise StoreError("DynamoDB GetItem failed: unreachable: Read timeout on endpoint URL")
        return super().admin_record(name)


def test_status_and_reconcile_while_the_store_is_unreachable_are_not_internal(tmp_path: Path) -> None:
    """What an operator runs first in an outage answered INTERNAL ("the gateway logged the
    details"), exit 1. Status now answers with the clusters and the outage among its warnings;
    the admin calls that need the store say UNAVAILABLE, exit 2."""
    import grpc

    from hsmgw.v1 import admin_pb2

    store = _Unreachable(tmp_path / "p.db")
    admin = AdminServicer(_router(tmp_path, store), audit_path=tmp_path / "audit.log", quorum=2)
    store.down = True
    status = admin.GetStatus(admin_pb2.GetStatusRequest(), _Context())
    assert [c.name for c in status.clusters] and any("placement store is unreachable" in w for w in status.warnings)
    calls = ((admin.Reconcile, admin_pb2.ReconcileRequest()), (admin.PlanRebalance, admin_pb2.PlanRebalanceRequest()))
    for call, request in calls:
        with pytest.raises(_Aborted) as info:
            call(request, _Context())
        assert info.value.status.code is grpc.StatusCode.UNAVAILABLE, call
        assert info.value.status.details.startswith("placement store is unreachable"), info.value.status.details


def _fleet_router(tmp_path: Path, policy: ReplicationPolicy) -> Router:
    backends = {name: FailingBackend(name) for name in ("use1-a", "use1-b", "usw2-a")}
    backends["usw2-a"].spec = dataclasses.replace(backends["usw2-a"].spec, region="us-west-2")
    return Router(TOPOLOGY, backends, SqliteStore(tmp_path / "p.db"), replication=policy)


def test_which_switches_leave_generate_key_no_placement_under_the_policy(tmp_path: Path) -> None:
    router = _fleet_router(tmp_path, ReplicationPolicy(copies=2, require_dr_copy=True))
    assert router.creation_blocked({"use1-b"}, set()) is None
    assert router.creation_blocked(set(), {"us-west-2"}) == (
        "new keys cannot be placed, since each would have no copy in a DR region (us-west-2), which [replication] "
        "require_dr_copy asks for: every GenerateKey fails UNAVAILABLE and creates nothing")
    assert router.creation_blocked({"usw2-a"}, set()) == router.creation_blocked(set(), {"us-west-2"})
    assert router.creation_blocked(set(), {"us-east-1"}) == (
        "new keys cannot be placed, since each would have fewer than the 2 copies its replication policy asks for: "
        "every GenerateKey fails UNAVAILABLE and creates nothing")
    nowhere = "no cluster would take new keys: every GenerateKey would fail UNAVAILABLE"
    assert router.creation_blocked({"use1-a", "use1-b", "usw2-a"}, set()) == nowhere
    assert router.creation_blocked(set(), {"us-east-1", "us-west-2"}) == nowhere
    # A circuit that is open is not a switch: it closes by itself.
    for _ in range(5):
        router.breakers["usw2-a"].record_failure()
    assert router.breakers["usw2-a"].state is CircuitState.OPEN
    assert router.creation_blocked(set(), set()) is None

    lenient = _fleet_router(tmp_path, ReplicationPolicy(copies=2, require_dr_copy=True, ack_local=True))
    assert (lenient.creation_blocked({"usw2-a"}, set()) or "").startswith(
        "new keys would be acknowledged with no copy in a DR region")
    single = _fleet_router(tmp_path, ReplicationPolicy(copies=1, require_dr_copy=False))
    assert single.creation_blocked({"use1-a", "usw2-a"}, {"us-west-2"}) is None


def test_a_forced_failover_approved_by_the_quorum_says_what_becomes_of_new_keys(tmp_path: Path) -> None:
    router = _fleet_router(tmp_path, ReplicationPolicy(copies=2, require_dr_copy=True))
    admin = AdminServicer(router, audit_path=tmp_path / "audit.log", quorum=2)
    unforced = admin.changes.request("alice", "failover", {"region": "us-west-2"})  # as recorded before --force
    done = admin.changes.approve("bob", unforced.id)
    assert done.state == "failed" and done.result.startswith("failing region us-west-2 over would leave no placement")
    assert router.dispatcher.failed_over == frozenset()
    forced = admin.changes.request("alice", "failover", {"region": "us-west-2", "force": "true"})
    done = admin.changes.approve("bob", forced.id)
    assert (done.state, done.result) == ("applied", "region us-west-2 failed over; forced, so new keys cannot be "
                                         "placed, since each would have no copy in a DR region (us-west-2), which "
                                         "[replication] require_dr_copy asks for: every GenerateKey fails "
                                         "UNAVAILABLE and creates nothing")
    assert router.dispatcher.failed_over == {"us-west-2"}


def test_two_drains_approved_at_once_through_two_gateways_cannot_both_pass_the_check(tmp_path: Path) -> None:
    """Each drain alone leaves new keys a home cluster; both together leave none. The second drain's
    check runs on the switches its write finds, the first drain's among them, and is refused."""
    policy = ReplicationPolicy(copies=1, require_dr_copy=False)
    ours, theirs = _fleet_router(tmp_path, policy), _fleet_router(tmp_path, policy)
    ours_admin = AdminServicer(ours, audit_path=tmp_path / "a.log", quorum=2)
    theirs_admin = AdminServicer(theirs, audit_path=tmp_path / "b.log", quorum=2)
    drain_a = ours_admin.changes.request("alice", "drain", {"cluster": "use1-a"})
    drain_b = theirs_admin.changes.request("bob", "drain", {"cluster": "use1-b"})
    drain_usw2 = theirs_admin.changes.request("bob", "drain", {"cluster": "usw2-a"})
    assert theirs_admin.changes.approve("carol", drain_usw2.id).state == APPLIED

    checked: list[set[str]] = []
    check = ours_admin._creation_check

    def theirs_lands_first(kind: str, name: str, force: bool, switches: Any = None) -> Any:
        if switches is not None:
            checked.append(set(switches.get("drained", set())))
            if len(checked) == 1:  # the other gateway's drain is written between our read and our write
                assert theirs_admin.changes.approve("carol", drain_b.id).state == APPLIED
        return check(kind, name, force, switches)

    ours_admin._creation_check = theirs_lands_first  # type: ignore[method-assign]
    done = ours_admin.changes.approve("carol", drain_a.id)
    assert checked == [{"usw2-a"}, {"usw2-a", "use1-b"}], "checked again on the switches the write found"
    assert done.state == "failed" and "no cluster would take new keys" in done.result
    assert ours_admin.changes.switches()["drained"] == {"usw2-a", "use1-b"}


def test_the_check_a_failover_makes_logs_no_key_as_placed(tmp_path: Path, caplog) -> None:
    """The check places no key: the operator's log must not say one went to the DR region."""
    from hsmgw.v1 import admin_pb2

    router = _fleet_router(tmp_path, ReplicationPolicy(copies=2, require_dr_copy=True))
    admin = AdminServicer(router, audit_path=tmp_path / "audit.log", quorum=2)
    with caplog.at_level(logging.DEBUG):
        asked = admin.FailoverRegion(admin_pb2.FailoverRegionRequest(region="us-east-1", failover=True, force=True),
                                     _Context())
        assert admin.changes.approve("bob", asked.id).state == APPLIED
    assert router.dispatcher.failed_over == {"us-east-1"}
    placing = [r.getMessage() for r in caplog.records if "placing" in r.getMessage() or "creation-check" in
               r.getMessage()]
    assert placing == []


def test_generate_key_names_the_switch_that_leaves_it_no_placement(tmp_path: Path) -> None:
    """Every cluster is healthy: the drain or failover is the cause, and the answer says so."""
    from router.model import KeyAlgorithm, KeySpec, KeyUsage

    router = _fleet_router(tmp_path, ReplicationPolicy(copies=2, require_dr_copy=True))

    def refused(i: int) -> str:
        spec = KeySpec(key_id=f"k/{i}", algorithm=KeyAlgorithm.EC_P256, usage=KeyUsage.SIGN_VERIFY,
                       request_id=f"r{i}")
        with pytest.raises(Unavailable) as info:
            router.generate_key(spec, time.monotonic() + 5)
        return info.value.message

    router.apply_switches({"usw2-a"}, set())
    assert refused(1) == ("cannot place 2 copies of 'k/1' with one in a DR region: cluster usw2-a is drained, so too "
                          "few clusters take new keys; nothing was created")
    router.apply_switches(set(), {"us-east-1"})
    assert refused(2) == ("cannot place 2 copies of 'k/2' with one in a DR region: region us-east-1 is failed over, "
                          "so too few clusters take new keys; nothing was created")
    router.apply_switches({"usw2-a"}, {"us-east-1"})
    assert refused(3) == ("no cluster can take new keys: region us-east-1 is failed over; cluster usw2-a is drained")
    router.apply_switches(set(), set())
    for _ in range(5):  # no switch: the clusters' health is the cause
        router.breakers["usw2-a"].record_failure()
    assert refused(4) == ("cannot place 2 copies of 'k/4' with one in a DR region: not enough healthy clusters; "
                          "nothing was created")

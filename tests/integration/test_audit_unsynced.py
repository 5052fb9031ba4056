"""An audit log that takes a record but cannot sync it (fsync fails, as on a failing disk): the
record is in the chain, but a crash may lose it, so what it stands for does not happen. A key
creation is refused by the gateway's interceptor; an admin approval is refused and withdrawn, its
change left pending. Each refusal says the record was written but not synced, and is counted.

The gateway runs in this process (a real gRPC server on the shared fleet's tokens, with a store
of its own) so that its fsyncs of the audit log can be made to fail (``failing_fsync``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway import audit
from gateway.client import error_reason
from gateway.config import MetricsConfig, load
from gateway.fleet import Fleet
from gateway.server import Gateway
from hsmgw.v1 import admin_pb2, admin_pb2_grpc, crypto_pb2, crypto_pb2_grpc
from router.placement.sqlite import SqliteStore
from router.router import Router
from tests.support import TokenInspector, failing_fsync, rpc_error, scrape, unique, value

ALICE = (("x-hsmgw-identity", "alice"),)
BOB = (("x-hsmgw-identity", "bob"),)
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
SYNC_FAILURES = "hsmgw_audit_sync_failures_total"
WRITE_FAILURES = "hsmgw_audit_write_failures_total"


@dataclass
class Served:
    gateway: Gateway
    audit_path: Path
    fail_sync: Callable[[bool], None]
    """``fail_sync(True)``: every fsync of the audit log fails with EIO from then on; False: it works."""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    def counted(self, name: str, event: str) -> float:
        """A metric's value for ``event``, as /metrics serves it."""
        assert self.gateway.metrics_server is not None
        return value(scrape(self.gateway.metrics_server.port), name, event=event)

    def records(self, target: str) -> list[dict[str, Any]]:
        """The audit log's records about ``target``, oldest first."""
        return [r for r in audit.tail(self.audit_path, 50) if r["target"] == target]


@pytest.fixture
def served(fleet: Fleet, make_router: Callable[..., Router], tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    """A gateway serving the shared fleet's tokens, quorum 2, with its own store (its changes and
    switches reach no other test), audit log and /metrics port."""
    gateway = _gateway(fleet, make_router, tmp_path)
    gateway.start()
    try:
        yield Served(gateway, tmp_path / "audit.log", failing_fsync(tmp_path / "audit.log", monkeypatch))
    finally:
        gateway.stop(grace=0.5)


def _gateway(fleet: Fleet, make_router: Callable[..., Router], tmp_path: Path) -> Gateway:
    config = load(fleet.config_path)
    config = dataclasses.replace(
        config,
        admin=dataclasses.replace(config.admin, quorum=2, audit_log=str(tmp_path / "audit.log"),
                                  state_file=str(tmp_path / "admin.db")),
        metrics=MetricsConfig(listen="127.0.0.1:0"),
    )
    return Gateway(config, make_router(store=SqliteStore(tmp_path / "placements.db")), reconciles=False)


def test_a_stopped_gateway_leaves_the_audit_logger_as_it_found_it(
        fleet: Fleet, make_router: Callable[..., Router], tmp_path: Path) -> None:
    """Gateways run inside another program (as tests, or an embedding, run them) turn the audit
    logger on while any of them serves, and give it back as it was once the last one stopped: its
    level and its handlers."""
    logger = logging.getLogger(audit.AUDIT_LOGGER)
    level, handlers = logger.level, list(logger.handlers)
    logger.setLevel(logging.WARNING)
    try:
        (tmp_path / "first").mkdir()
        (tmp_path / "second").mkdir()
        first = _gateway(fleet, make_router, tmp_path / "first")
        second = _gateway(fleet, make_router, tmp_path / "second")
        first.start()
        second.start()
        assert logger.isEnabledFor(logging.INFO)
        first.stop(grace=0.5)
        assert logger.isEnabledFor(logging.INFO), "the second gateway still audits"
        second.stop(grace=0.5)
        assert logger.level == logging.WARNING and logger.handlers == handlers
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def sync_fails_once_granted(operation: str, fail_sync: Callable[[bool], None]) -> Iterator[None]:
    """The disk fails between a call's grant and the record of what it does: once the grant of a
    call to ``operation`` is in the audit log (synced), every later fsync of the log fails."""

    class AfterTheGrant(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            event = json.loads(record.getMessage())
            if (event.get("event"), event.get("operation")) == ("authz.granted", operation):
                fail_sync(True)

    logger = logging.getLogger(audit.AUDIT_LOGGER)
    handler = AfterTheGrant()
    logger.addHandler(handler)  # after the gateway's own: the grant is appended first
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _unsynced_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gateway.audit" and r.levelno == logging.ERROR]


def test_a_key_creation_whose_grant_was_written_but_not_synced_is_refused_and_no_key_is_made(
    served: Served, tokens: TokenInspector, caplog: pytest.LogCaptureFixture,
) -> None:
    key_id = unique("unsynced")
    with grpc.insecure_channel(served.target) as channel:
        crypto = crypto_pb2_grpc.CryptoServiceStub(channel)
        served.fail_sync(True)
        with caplog.at_level(logging.ERROR, logger="gateway.audit"):
            err = rpc_error(crypto.GenerateKey, crypto_pb2.GenerateKeyRequest(
                request_id=key_id, key_id=key_id, algorithm=crypto_pb2.KEY_ALGORITHM_EC_P256), metadata=ALICE,
                timeout=30)
        served.fail_sync(False)
        assert err.code() is UNAVAILABLE
        assert err.details() == ("the gateway's audit log took this call's record but could not sync it to disk "
                                 "(its log says why); GenerateKey waits until it can")
        assert error_reason(err) == "AUDIT_UNAVAILABLE"
        missing = rpc_error(crypto.GetKey, crypto_pb2.GetKeyRequest(key_id=key_id), metadata=ALICE, timeout=10)
        assert missing.code() is grpc.StatusCode.NOT_FOUND

    assert served.gateway.router.store.get(key_id) is None, "no placement was recorded"
    assert not [c for c in served.gateway.router.backends if tokens.objects(c, key_id)], "no HSM holds the key"
    [granted] = served.records(key_id)
    assert (granted["action"], granted["actor"], granted["details"]["operation"]) == (
        "authz.granted", "alice", "GenerateKey")
    assert _unsynced_lines(caplog) == [
        f"audit log {served.audit_path} could not be synced: Input/output error; the authz.granted event (actor "
        f"alice, target {key_id}, outcome ok) is record {granted['seq']}, written but not known to be on disk"]
    result = audit.verify(served.audit_path)
    assert result.ok and result.unwritten == 0, "a record written but not synced is no gap"
    assert served.counted(SYNC_FAILURES, "authz.granted") == 1
    assert served.counted(WRITE_FAILURES, "authz.granted") == 0


def test_an_approval_whose_record_was_written_but_not_synced_is_withdrawn_and_the_drain_not_applied(
    served: Served, caplog: pytest.LogCaptureFixture,
) -> None:
    with grpc.insecure_channel(served.target) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        change = admin.DrainCluster(admin_pb2.DrainClusterRequest(cluster="use1-b", drain=True), metadata=ALICE,
                                    timeout=30)
        assert change.state == "pending"
        with sync_fails_once_granted("ApproveChange", served.fail_sync), \
                caplog.at_level(logging.ERROR, logger="gateway.audit"):
            err = rpc_error(admin.ApproveChange, admin_pb2.ApproveChangeRequest(id=change.id), metadata=BOB,
                            timeout=30)
        served.fail_sync(False)
        assert err.code() is UNAVAILABLE
        assert err.details() == ("the gateway's audit log took the change's record but could not sync it to disk "
                                 "(its log says why); admin changes wait until it can")
        assert error_reason(err) == "AUDIT_UNAVAILABLE"

        [still] = admin.ListChanges(admin_pb2.ListChangesRequest(all=True), metadata=ALICE, timeout=30).changes
        assert (still.id, still.state, list(still.approved_by)) == (change.id, "pending", ["alice"]), \
            "the approval does not count"
        clusters = admin.ListClusters(admin_pb2.ListClustersRequest(), metadata=ALICE, timeout=30).clusters
        assert not [c.name for c in clusters if c.draining]
        assert served.gateway.admin.changes.switches() == {}, "no switch is stored"

        records = served.records(change.id)
        # The log keeps the unsynced record, and says after it that the approval was taken back
        # (unsynced too: the disk still fails), so that it does not read as a change set running.
        assert [(r["action"], r["actor"], r["outcome"]) for r in records] == [
            ("change_requested", "alice", "pending"), ("authz.granted", "bob", "ok"),
            ("change_approved", "bob", "running"), ("change_approval_withdrawn", "bob", "pending")]
        assert records[-1]["details"]["approved_by"] == ["alice"]
        approved, withdrawn = records[-2]["seq"], records[-1]["seq"]
        assert _unsynced_lines(caplog) == [
            f"audit log {served.audit_path} could not be synced: Input/output error; the change_approved event "
            f"(actor bob, target {change.id}, outcome running) is record {approved}, written but not known to be on "
            "disk",
            f"audit log {served.audit_path} could not be synced: Input/output error; the change_approval_withdrawn "
            f"event (actor bob, target {change.id}, outcome pending) is record {withdrawn}, written but not known to "
            "be on disk"]
        assert served.counted(SYNC_FAILURES, "change_approved") == 1
        assert served.counted(SYNC_FAILURES, "authz.granted") == 0, "the grant before it was synced"

        # Withdrawn, not lost: once the log syncs again, the same approval applies the change.
        applied = admin.ApproveChange(admin_pb2.ApproveChangeRequest(id=change.id), metadata=BOB, timeout=60)
        assert applied.state == "applied", applied.result
        clusters = admin.ListClusters(admin_pb2.ListClustersRequest(), metadata=ALICE, timeout=30).clusters
        assert [c.name for c in clusters if c.draining] == ["use1-b"]

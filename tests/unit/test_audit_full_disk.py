"""An audit log on a full disk (ENOSPC): the file still opens and its last line still reads, but
no record is written. `hsmctl status` must say what the gateway does then: refuse what has to be
audited before it runs, until a record is written. And a record written whose fsync fails: in the
chain (no gap to note), but refused all the same, since a crash may lose it."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.admin import AdminServicer
from gateway.audit import tail, verify
from gateway.auth import AuditUnsynced, AuditUnwritten, audit
from hsmgw.v1 import admin_pb2
from router.placement.sqlite import SqliteStore
from router.router import Router, Topology
from tests.support import audit_bridged, failing_fsync
from tests.unit.test_router_creation import FailingBackend

TOPOLOGY = Topology("us-east-1", (), {"us-east-1": ("use1-a",)})
REFUSED = "GenerateKey, DestroyKey and admin changes are refused until a record is written"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


@pytest.fixture
def full_disk(path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """``full_disk(True)``: every write to the log fails with ENOSPC, as on a full filesystem
    (opening and reading it still work); ``full_disk(False)``: there is room again."""
    real = os.write
    full = [False]

    def write(fd: int, data: bytes) -> int:  # type: ignore[override]
        if full[0] and os.readlink(f"/proc/self/fd/{fd}") == str(path.resolve()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return lambda on: full.__setitem__(0, on)


@pytest.fixture
def failing_sync(path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """``failing_sync(True)``: every fsync of the log fails with EIO (its writes go through)."""
    return failing_fsync(path, monkeypatch)


COUNTED: dict[str, list[str]] = {}


@pytest.fixture
def admin(tmp_path: Path, path: Path) -> Iterator[AdminServicer]:
    """An admin servicer whose audit log also takes the ``hsmgw.audit`` events, as the gateway's does;
    ``COUNTED`` holds what it counted (``unwritten``, ``unsynced``), as the metrics do."""
    router = Router(TOPOLOGY, {"use1-a": FailingBackend("use1-a")}, SqliteStore(tmp_path / "p.db"))
    COUNTED.clear()
    COUNTED.update(unwritten=[], unsynced=[])
    servicer = AdminServicer(router, audit_path=path, quorum=1, on_audit_failure=COUNTED["unwritten"].append,
                             on_audit_unsynced=COUNTED["unsynced"].append)
    with audit_bridged(servicer.audit):
        yield servicer


def audit_warnings(admin: AdminServicer) -> list[str]:
    status = admin.GetStatus(admin_pb2.GetStatusRequest(), None)  # type: ignore[arg-type]
    return [w for w in status.warnings if "audit" in w]


def test_status_says_grants_are_refused_while_the_disk_is_full_though_the_file_opens(
    admin: AdminServicer, full_disk: Callable[[bool], None]
) -> None:
    audit("authz.granted", required=True, identity="maker", resource="ok/k1")
    full_disk(True)
    with pytest.raises(AuditUnwritten):
        audit("authz.granted", required=True, identity="maker", resource="ok/k2")
    admin.audit.check()  # opens the file and reads its last line: a full disk passes

    failing = admin.audit.failing()
    assert failing is not None and failing.error == "No space left on device"
    said = audit_warnings(admin)
    assert f"the last audit write failed at {failing.at} (No space left on device): {REFUSED}" in said, said
    assert not any("again" in w for w in said), "the log does not take records yet"
    with pytest.raises(AuditUnwritten):  # and indeed it still refuses
        audit("authz.granted", required=True, identity="maker", resource="ok/k3")
    assert audit_warnings(admin)[0].startswith(f"the last audit write failed at {admin.audit.failing().at} ")  # type: ignore[union-attr]

    full_disk(False)
    assert any(REFUSED in w for w in audit_warnings(admin)), "room again, but only a record written shows it"
    audit("authz.granted", required=True, identity="maker", resource="ok/k4")
    assert admin.audit.failing() is None
    assert audit_warnings(admin) == []
    assert tail(admin.audit_path, 1)[0]["details"]["unwritten"]["events"] == 2
    assert verify(admin.audit_path).unwritten == 2


def test_a_record_written_but_not_synced_is_no_gap_but_its_grant_is_refused(
    admin: AdminServicer, path: Path, full_disk: Callable[[bool], None], failing_sync: Callable[[bool], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    audit("authz.granted", required=True, identity="maker", resource="ok/k1")
    full_disk(True)
    with pytest.raises(AuditUnwritten):
        audit("authz.granted", required=True, identity="maker", resource="ok/lost")
    full_disk(False)
    failing_sync(True)  # the disk takes the line, but cannot say it is on it
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="gateway.audit"), \
            pytest.raises(AuditUnsynced, match="authz.granted was written but could not be synced"):
        audit("authz.granted", required=True, identity="maker", resource="ok/k2")

    written = tail(path, 1)[0]
    assert written["target"] == "ok/k2" and written["details"]["unwritten"]["events"] == 1, "in the file, note too"
    assert admin.audit.unwritten() is None, "nothing left to note: the gap is in the chain once"
    assert COUNTED == {"unwritten": ["authz.granted"], "unsynced": ["authz.granted"]}
    said = [r.getMessage() for r in caplog.records if r.name == "gateway.audit" and r.levelno == logging.ERROR]
    assert len(said) == 1 and "is not in it" not in said[0], said
    assert said[0].endswith(f"is record {written['seq']}, written but not known to be on disk"), said
    failing = admin.audit.failing()
    assert failing is not None and failing.written
    assert audit_warnings(admin) == [f"the last audit record was written at {failing.at} but could not be synced "
                                     f"(Input/output error): {REFUSED}"]

    failing_sync(False)
    audit("authz.granted", required=True, identity="maker", resource="ok/k3")
    assert "unwritten" not in tail(path, 1)[0]["details"], "the written record is not noted as lost"
    result = verify(path)
    assert result.ok and (result.unwritten, result.unwritten_noted_at) == (1, (written["seq"],)), result
    assert audit_warnings(admin) == []

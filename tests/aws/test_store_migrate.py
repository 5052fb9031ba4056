"""``hsmgw store init`` and ``hsmgw store migrate``: a SQLite placement map moves into
DynamoDB unchanged, a re-run changes nothing, and a conflicting record is reported
and never overwritten."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.cli.hsmgw import main as hsmgw
from gateway.quorum import ChangeBook
from router.model import KeyAlgorithm, KeyState, KeyStorage, KeyUsage, Placement
from router.placement import PlacementStore, SqliteStore, StoreError
from router.placement.factory import make_store
from tests.aws.conftest import FAKE_AWS_ENV, REGION, MotoServer
from tests.support import ROOT

_KINDS = [
    (KeyAlgorithm.EC_P256, KeyUsage.SIGN_VERIFY),
    (KeyAlgorithm.RSA_2048, KeyUsage.ENCRYPT_DECRYPT),
    (KeyAlgorithm.AES_256, KeyUsage.ENCRYPT_DECRYPT),
    (KeyAlgorithm.HMAC_SHA256, KeyUsage.MAC),
]


def _placements(count: int) -> list[Placement]:
    rng = random.Random(7)
    made = []
    for i in range(count):
        algorithm, usage = _KINDS[i % len(_KINDS)]
        external = i % 3 == 0
        made.append(
            Placement(
                key_id=f"team-{i % 4}/key-{i:02d}",
                algorithm=algorithm,
                usage=usage,
                state=[KeyState.ENABLED, KeyState.UNDER_REPLICATED, KeyState.CREATING][i % 3],
                primary=["use1-a", "use1-b"][i % 2],
                replicas=(("usw2-a",), ("use1-b", "usw2-a"), ())[i % 3],
                create_time=1_767_225_600 + i / 7,
                request_id=f"req-{i}",
                fingerprint=f"fp-{i}",
                storage=KeyStorage.EXTERNAL if external else KeyStorage.TOKEN,
                copies=1 + i % 3,
                extractable=i % 5 != 0,
                wrapped=rng.randbytes(40 + i * 30) if external else b"",
                public_der=rng.randbytes(91) if external and algorithm.is_asymmetric else b"",
            )
        )
    return made


@pytest.fixture
def source(tmp_path: Path) -> tuple[str, list[Placement]]:
    """A SQLite store with 50 placements, some updated past version 1, and a fleet id (its gateways made it)."""
    path = tmp_path / "placements.db"
    store = SqliteStore(path)
    store.fleet_id()
    final = []
    for p in _placements(50):
        store.create(p)
        for _ in range(int(p.key_id[-1]) % 3):  # versions 1 to 3
            p = store.update(p)
        final.append(p)
    store.close()
    assert sum(p.external for p in final) == 17 and {p.version for p in final} == {1, 2, 3}
    return f"sqlite:{path}", final


def _contents(store: PlacementStore) -> dict[str, Placement]:
    return {p.key_id: p for p in store.scan()}


def test_migrate_copies_everything_and_a_rerun_is_a_no_op(
    moto_server: MotoServer, source: tuple[str, list[Placement]], capsys: pytest.CaptureFixture[str]
) -> None:
    src_url, placements = source
    dst_url = moto_server.store_url(f"migrated-{uuid.uuid4().hex[:8]}")

    hsmgw(["store", "init", "--url", dst_url])
    assert "created" in capsys.readouterr().out
    hsmgw(["store", "init", "--url", dst_url])
    assert "already exists" in capsys.readouterr().out

    hsmgw(["store", "migrate", "--from", src_url, "--to", dst_url])
    _all_copied(capsys.readouterr().out.strip().splitlines()[-1], 50)

    dest = make_store(dst_url)
    src = make_store(src_url)
    try:
        assert _contents(dest) == _contents(src) == {p.key_id: p for p in placements}
        assert all(dest.by_request(p.request_id) == p for p in placements)
        page = dest.list("team-1/", limit=5)
        assert [p.key_id for p in page] == sorted(p.key_id for p in placements if p.key_id.startswith("team-1/"))[:5]

        counter = dest.change_counter()
        hsmgw(["store", "migrate", "--from", src_url, "--to", dst_url, "--output", "json"])
        report = json.loads(capsys.readouterr().out)
        assert report == {"copied": 0, "identical": 50, "differing": 0, "failed": 0, "fleet_id": src.fleet_id(),
                          "fleet_id_from": "source", "differing_keys": [], "failed_records": [], "not_in_source": 0,
                          "not_in_source_keys": []}
        assert dest.change_counter() == counter, "a re-run must not write"
    finally:
        dest.close()
        src.close()


def test_migrate_reports_records_that_differ_and_leaves_them_alone(
    moto_server: MotoServer, source: tuple[str, list[Placement]], capsys: pytest.CaptureFixture[str]
) -> None:
    src_url, placements = source
    dst_url = moto_server.store_url(f"migrated-{uuid.uuid4().hex[:8]}")
    hsmgw(["store", "init", "--url", dst_url])
    dest = make_store(dst_url)
    try:
        # The destination already knows one key, placed elsewhere since.
        first = placements[0]
        dest.create(dataclasses.replace(first, primary="use1-b", replicas=()))
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            hsmgw(["store", "migrate", "--from", src_url, "--to", dst_url])
        assert exit_info.value.code == 1
        out, err = capsys.readouterr()
        assert f"differs: {first.key_id}" in out
        assert out.strip().splitlines()[-1] == "copied 49, identical 0 (skipped), differing 1, failed 0"
        assert err.strip().splitlines()[-1].startswith("error: 1 records differ")
        assert dest.get(first.key_id) == dataclasses.replace(first, primary="use1-b", replicas=())
        assert len(_contents(dest)) == 50
    finally:
        dest.close()


def test_migrate_carries_pending_changes_and_switches_over(
    moto_server: MotoServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src_url = f"sqlite:{tmp_path / 'admin-src.db'}"
    src = make_store(src_url)
    ran: list[dict[str, str]] = []
    book = ChangeBook(src, {"drain": lambda params: ran.append(params) or "drained"})
    change = book.request("alice", "drain", {"cluster": "use1-a"})
    book.set_switch("drained", "use1-b", True)
    src.close()
    dst_url = moto_server.store_url(f"admin-{uuid.uuid4().hex[:8]}")
    hsmgw(["store", "init", "--url", dst_url])
    capsys.readouterr()

    hsmgw(["store", "migrate", "--from", src_url, "--to", dst_url, "--output", "json"])
    assert json.loads(capsys.readouterr().out)["copied"] == 3  # the switches, the change and the list of changes
    dest = make_store(dst_url)
    try:
        moved = ChangeBook(dest, {"drain": lambda params: ran.append(params) or "drained"})
        assert moved.switches() == {"drained": {"use1-b"}}
        assert [c.id for c in moved.list()] == [change.id]
        assert moved.approve("bob", change.id).state == "applied" and ran == [{"cluster": "use1-a"}]
    finally:
        dest.close()
    with pytest.raises(SystemExit):
        hsmgw(["store", "migrate", "--from", src_url, "--to", dst_url, "--output", "json"])
    report = json.loads(capsys.readouterr().out)
    # The approved change now differs from the source's pending one: reported, not overwritten.
    assert report["differing_keys"] == [f"admin record change/{change.id}"], report


def test_migrate_as_a_user_runs_it(
    moto_server: MotoServer, source: tuple[str, list[Placement]], tmp_path: Path
) -> None:
    """The real command line, relative paths resolved against the working directory."""
    src_url, _ = source
    dst_url = moto_server.store_url(f"cli-{uuid.uuid4().hex[:8]}")
    env = {**os.environ, **FAKE_AWS_ENV, "PYTHONPATH": str(ROOT)}
    relative = "sqlite:" + os.path.relpath(src_url.removeprefix("sqlite:"), tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli.hsmgw", *args], cwd=tmp_path, env=env,
            capture_output=True, text=True, timeout=60,
        )

    init = run("store", "init", "--url", dst_url)
    assert init.returncode == 0, init.stderr
    done = run("store", "migrate", "--from", relative, "--to", dst_url)
    assert done.returncode == 0, done.stderr
    fleet_line, copied_line = done.stdout.strip().splitlines()
    assert re.fullmatch(r"fleet id [0-9a-f]{32} \(the tokens' fleet markers name it\)", fleet_line), fleet_line
    _all_copied(copied_line, 50)

    typo = run("store", "migrate", "--from", "sqlite:placement.db", "--to", dst_url)
    assert typo.returncode == 1
    assert typo.stderr.strip().splitlines()[-1].startswith("error: sqlite:placement.db: no such placement store file")
    assert not (tmp_path / "placement.db").exists()

    bad = run("store", "migrate", "--from", relative, "--to", "dynamodb://placements")
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "error: store URL 'dynamodb://placements': the region parameter is required "
        "(expected sqlite:PATH or dynamodb://TABLE?region=REGION[&endpoint=URL])"
    ]


def _all_copied(line: str, total: int) -> None:
    """Every record copied. A write whose answer timed out on a loaded machine is
    retried and then found identical: that counts as copied too."""
    import re

    match = re.fullmatch(r"copied (\d+), identical (\d+) \(skipped\), differing 0, failed 0", line)
    assert match, line
    assert int(match.group(1)) + int(match.group(2)) == total, line


def test_a_record_the_destination_refuses_is_named_and_the_rest_is_still_copied(tmp_path: Path) -> None:
    """A DynamoDB item is at most 400 KB: a record too large for it is refused. The copy names it, goes
    on with the others (the drain and failover switches among them), and says the destination is
    incomplete; a destination that refuses everything stops the copy after a few in a row."""
    from router.placement import StoreError
    from router.placement.factory import FAILURES_IN_A_ROW, CopyReport, copy_placements

    source = SqliteStore(tmp_path / "src.db")
    for placement in _placements(3):
        source.create(placement)
    source.put_admin_record("pins", {"big": "x" * 10}, 0)
    source.put_admin_record("switches", {"drained": ["use1-b"]}, 0)

    class TooLarge(SqliteStore):
        refuse = frozenset({"pins"})

        def put_admin_record(self, name: str, body: dict, version: int) -> int:  # type: ignore[override]
            if name in self.refuse:
                raise StoreError("PutItem failed: ValidationException: Item size has exceeded the maximum")
            return super().put_admin_record(name, body, version)

    dest = TooLarge(tmp_path / "dest.db")
    report = copy_placements(source, dest)
    assert [name for name, _ in report.failed] == ["admin record pins"]
    assert "Item size has exceeded" in report.failed[0][1]
    assert dest.admin_record("switches") is not None and len(list(dest.scan())) == 3

    class Gone(SqliteStore):
        def get(self, key_id: str) -> Placement | None:
            raise StoreError("unreachable")

        def admin_record(self, name: str) -> tuple[dict, int] | None:  # type: ignore[override]
            raise StoreError("unreachable")

    partial = CopyReport()
    with pytest.raises(StoreError):
        copy_placements(source, Gone(tmp_path / "gone.db"), partial)
    assert len(partial.failed) == FAILURES_IN_A_ROW == 5  # 3 placements and 2 admin records


def test_a_source_that_stops_answering_is_named_as_the_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Not "records in a row failed, the destination is incomplete": the source could not be read."""
    from router.placement import StoreError

    src = SqliteStore(tmp_path / "src.db")
    src.create(_placements(1)[0])

    def unreadable(self: SqliteStore) -> Any:
        raise StoreError("placement store error: disk I/O error")

    monkeypatch.setattr(SqliteStore, "scan", unreadable)
    with pytest.raises(SystemExit) as stopped:
        hsmgw(["store", "migrate", "--from", f"sqlite:{tmp_path / 'src.db'}", "--to", f"sqlite:{tmp_path / 'd.db'}"])
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: placement store error: disk I/O error; copied 0 before that: run the same command again "
                   "once it answers (what is there is skipped)")


def test_migrate_gives_the_destination_the_sources_fleet_id(
    moto_server: MotoServer, source: tuple[str, list[Placement]], capsys: pytest.CaptureFixture[str]
) -> None:
    """The tokens' fleet markers name the source's fleet: a gateway switched over to the destination
    must find its store's id there, or its reconcile destroys nothing on them."""
    src_url, _ = source
    fleet = make_store(src_url).fleet_id()
    dst_url = moto_server.store_url(f"fleet-{uuid.uuid4().hex[:8]}")
    hsmgw(["store", "init", "--url", dst_url])
    capsys.readouterr()
    hsmgw(["store", "migrate", "--from", src_url, "--to", dst_url, "--output", "json"])
    assert json.loads(capsys.readouterr().out)["fleet_id"] == fleet
    dest = make_store(dst_url)
    try:
        assert dest.fleet_id() == fleet
        assert len(_contents(dest)) == 50
    finally:
        dest.close()
    hsmgw(["store", "migrate", "--from", src_url, "--to", dst_url])  # a re-run: the same fleet, nothing to copy
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        "copied 0, identical 50 (skipped), differing 0, failed 0"


def test_migrate_into_another_fleets_store_is_refused_and_copies_nothing(
    moto_server: MotoServer, source: tuple[str, list[Placement]], capsys: pytest.CaptureFixture[str]
) -> None:
    """A destination with a fleet id of its own is another fleet's store (a wrong or shared table):
    merging this fleet's records into it would have its gateways act on them against their tokens."""
    src_url, _ = source
    fleet = make_store(src_url).fleet_id()
    dst_url = moto_server.store_url(f"other-{uuid.uuid4().hex[:8]}")
    hsmgw(["store", "init", "--url", dst_url])
    dest = make_store(dst_url)
    try:
        theirs = dest.fleet_id()  # its own gateways made it
        dest.create(dataclasses.replace(_placements(1)[0], key_id="theirs/key", request_id="theirs"))
        counter = dest.change_counter()
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            hsmgw(["store", "migrate", "--from", src_url, "--to", dst_url])
        assert exit_info.value.code == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err.strip().splitlines() == [
            f"error: {dst_url} belongs to fleet {theirs} and {src_url} to fleet {fleet}: the destination is another "
            "fleet's placement store (a shared or wrong table), and a fleet's keys belong with its own store; "
            "nothing was copied. Name an empty store, or this fleet's own"]
        assert [p.key_id for p in dest.scan()] == ["theirs/key"]
        assert list(dest.admin_records()) == []
        assert dest.change_counter() == counter
        assert dest.fleet_id() == theirs
    finally:
        dest.close()


def test_a_source_without_a_fleet_id_is_left_without_one(
    tmp_path: Path, moto_server: MotoServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A migration writes nothing to its source: the destination keeps its own fleet id, or
    is given one, and the output says which."""
    src_url = f"sqlite:{tmp_path / 'no-fleet.db'}"
    src = make_store(src_url)
    for p in _placements(3):
        src.create(p)
    src.close()

    dst_url = moto_server.store_url(f"new-fleet-{uuid.uuid4().hex[:8]}")
    hsmgw(["store", "init", "--url", dst_url])
    capsys.readouterr()
    hsmgw(["store", "migrate", "--from", src_url, "--to", dst_url])
    fleet_line, copied_line = capsys.readouterr().out.strip().splitlines()
    dest = make_store(dst_url)
    src = make_store(src_url)
    try:
        made = dest.existing_fleet_id()
        assert made is not None
        assert fleet_line == f"fleet id {made} (the source has none: the destination was given a new one)"
        _all_copied(copied_line, 3)
        assert src.existing_fleet_id() is None

        hsmgw(["store", "migrate", "--from", src_url, "--to", dst_url, "--output", "json"])
        report = json.loads(capsys.readouterr().out)
        assert (report["fleet_id"], report["fleet_id_from"], report["identical"]) == (made, "destination", 3)
        assert dest.existing_fleet_id() == made
        assert src.existing_fleet_id() is None
    finally:
        dest.close()
        src.close()


def test_migrate_from_dynamodb_needs_only_scan_and_getitem_on_the_source(
    spare_moto_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The source part of the operator's role as deploy/dynamodb/README.md gives it: Scan and
    GetItem. moto enforces IAM from the point it is told to (on every table alike: it checks
    DynamoDB calls against resource "*"), so the destination here is a SQLite file."""
    import urllib.request

    import boto3  # type: ignore[import-untyped]

    server: MotoServer = spare_moto_server()
    src_url = server.store_url(f"src-{uuid.uuid4().hex[:8]}")
    hsmgw(["store", "init", "--url", src_url])
    src = make_store(src_url)
    for p in _placements(4):
        src.create(p)  # no fleet id: no gateway ran on it
    src.close()

    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["dynamodb:Scan", "dynamodb:GetItem"], "Resource": "*"}]}
    iam = boto3.session.Session().client("iam", region_name=REGION, endpoint_url=server.endpoint)
    iam.create_user(UserName="operator")
    iam.put_user_policy(UserName="operator", PolicyName="migrate", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="operator")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    enforce = urllib.request.Request(f"{server.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(enforce, timeout=10) as answer:
        assert answer.status == 200
    capsys.readouterr()

    dst_url = f"sqlite:{tmp_path / 'dest.db'}"
    hsmgw(["store", "migrate", "--from", src_url, "--to", dst_url])
    fleet_line, copied_line = capsys.readouterr().out.strip().splitlines()
    assert fleet_line.endswith("(the source has none: the destination was given a new one)"), fleet_line
    _all_copied(copied_line, 4)
    src = make_store(src_url)
    try:
        with pytest.raises(StoreError, match="AccessDenied"):
            src.fleet_id()  # the role may not write the source, so nothing did
        assert src.existing_fleet_id() is None
    finally:
        src.close()

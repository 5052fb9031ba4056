"""hsmctl against a real gateway: placement, moves, rebalance, switches, quorum, audit."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, ObjectClass

from gateway.admin import MISSING_HELD
from gateway.fleet import init_fleet
from hsmgw.v1 import admin_pb2 as apb
from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from router.model import KeyAlgorithm
from router.pkcs11._keys import public_key_attributes, public_key_der
from router.placement.ring import PlacementRing
from tests.support import ROOT, running, unique


def hsmctl(target: str, *args: str, who: str = "alice", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli.hsmctl", "--target", target, "--as", who, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )


def as_json(target: str, *args: str, who: str = "alice") -> tuple[int, Any]:
    result = hsmctl(target, "--output", "json", *args, who=who)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def approve(target: str, change: dict, who: str = "bob") -> dict:
    code, approved = as_json(target, "changes", "approve", change["id"], who=who)
    return approved


def _key(crypto, prefix: str, algorithm=pb.KEY_ALGORITHM_EC_P256) -> pb.Key:
    key_id = unique(prefix)
    return crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, algorithm=algorithm), timeout=30)


def test_status_and_clusters(gateway) -> None:
    code, status = as_json(gateway.target, "status")
    assert {c["name"] for c in status["clusters"]} == {"use1-a", "use1-b", "usw2-a"}
    assert all(c["circuit"] == "closed" for c in status["clusters"])
    result = hsmctl(gateway.target, "status")
    assert "CLUSTER" in result.stdout and "keys:" in result.stdout


def test_one_admin_cannot_drain_alone_and_a_second_makes_it_happen(gateway, crypto) -> None:
    code, change = as_json(gateway.target, "clusters", "drain", "use1-b")
    assert code == 3 and change["state"] == "pending"
    # The requester cannot approve their own change, and the attempt is audited.
    again = hsmctl(gateway.target, "changes", "approve", change["id"], who="alice")
    assert again.returncode == 1
    assert again.stderr.strip() == (f"error: FAILED_PRECONDITION: alice requested change {change['id']}; another "
                                    "admin must approve it")
    _, records = as_json(gateway.target, "audit", "tail", "-n", "5")
    refused = [(r["actor"], r["target"], r["outcome"]) for r in records if r["action"] == "change_approval_refused"]
    assert refused[-1:] == [("alice", change["id"], "refused")]
    _, clusters = as_json(gateway.target, "clusters")
    assert not any(c["draining"] for c in clusters["clusters"])

    approved = approve(gateway.target, change)
    assert approved["state"] == "applied", approved
    _, clusters = as_json(gateway.target, "clusters")
    assert {c["name"]: c["draining"] for c in clusters["clusters"]}["use1-b"] is True
    # New keys avoid the drained cluster.
    for _ in range(6):
        assert _key(crypto, "drained").primary_cluster == "use1-a"

    _, undrain = as_json(gateway.target, "clusters", "undrain", "use1-b")
    assert approve(gateway.target, undrain)["state"] == "applied"
    _, clusters = as_json(gateway.target, "clusters")
    assert not any(c["draining"] for c in clusters["clusters"])


def test_a_change_requested_into_a_closed_pipe_still_exits_3(gateway) -> None:
    """`hsmctl regions failover X --force | head -0`: the change is recorded and waits for
    approvals. Its exit status says so (3) even though its output could not be written: a script
    that took 141 for "nothing happened" would ask again, or leave a pending change behind."""
    import os

    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli.hsmctl", "--target", gateway.target, "--as", "alice",
             "--output", "json", "regions", "failover", "us-east-1", "--force"],
            cwd=ROOT, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    pending = [c for c in as_json(gateway.target, "changes", "list")[1]
               if c["state"] == "pending" and c["action"] == "failover"]
    for change in pending:
        as_json(gateway.target, "changes", "reject", change["id"], who="bob")
    assert len(pending) == 1 and result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_rejected_change_never_runs(gateway) -> None:
    _, change = as_json(gateway.target, "regions", "failover", "us-east-1", "--force")
    code, rejected = as_json(gateway.target, "changes", "reject", change["id"], who="bob")
    assert rejected["state"] == "rejected"
    late = hsmctl(gateway.target, "changes", "approve", change["id"], who="carol")
    assert late.returncode == 1 and "rejected" in late.stderr
    _, clusters = as_json(gateway.target, "clusters")
    assert not any(c["region_failed_over"] for c in clusters["clusters"])


def test_region_failover_and_failback(gateway, crypto) -> None:
    key = _key(crypto, "failover")
    # The local fleet's one DR cluster cannot hold both copies of a new key on its own.
    refused = hsmctl(gateway.target, "regions", "failover", "us-east-1")
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "error: FAILED_PRECONDITION: failing region us-east-1 over would leave no placement for new keys under the "
        "replication policy: new keys cannot be placed, since each would have fewer than the 2 copies its "
        "replication policy asks for: every GenerateKey fails UNAVAILABLE and creates nothing. Only if that is "
        "meant (an evacuation), ask with force "
        "(hsmctl regions failover us-east-1 --force)")
    _, change = as_json(gateway.target, "regions", "failover", "us-east-1", "--force")
    assert change["params"]["force"] == "true" and "every GenerateKey fails" in change["params"]["consequence"]
    applied = approve(gateway.target, change)
    assert applied["state"] == "applied"
    assert applied["result"].startswith("region us-east-1 failed over; forced, so new keys cannot be placed, since "
                                        "each would have fewer than the 2 copies")
    try:
        signed = crypto.Sign(pb.SignRequest(key_id=key.key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, message=b"m"),
                             timeout=10)
        assert signed.cluster == "usw2-a", "traffic moves to the DR copy"
        _create_fails(crypto, "with one in a DR region: region us-east-1 is failed over, so too few clusters take "
                              "new keys; nothing was created")
        code, status = as_json(gateway.target, "status")
        assert code == 4 and ("region us-east-1 is failed over: calls go to other regions first, and it takes no "
                              "new keys or copies (hsmctl regions failback us-east-1)") in status["warnings"]
        _, dr_out = as_json(gateway.target, "regions", "failover", "us-west-2", "--force")
        assert approve(gateway.target, dr_out)["state"] == "applied"
        _, status = as_json(gateway.target, "status")
        assert ("DR region us-west-2 has no cluster that takes new keys (it is failed over): new keys cannot be made "
                "durable") in status["warnings"]
        _, dr_back = as_json(gateway.target, "regions", "failback", "us-west-2")
        assert approve(gateway.target, dr_back)["state"] == "applied"
    finally:
        _, back = as_json(gateway.target, "regions", "failback", "us-east-1")
        assert approve(gateway.target, back)["state"] == "applied"
    signed = crypto.Sign(pb.SignRequest(key_id=key.key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, message=b"m"),
                         timeout=10)
    assert signed.cluster == key.primary_cluster


def test_keys_list_show_place(gateway, crypto) -> None:
    key = _key(crypto, "cli-keys")
    prefix = key.key_id.rsplit("/", 1)[0] + "/"
    _, listed = as_json(gateway.target, "keys", "list", "--prefix", prefix)
    assert [k["key_id"] for k in listed] == [key.key_id]
    _, shown = as_json(gateway.target, "keys", "show", key.key_id)
    assert shown["primary_cluster"] == key.primary_cluster and shown["replicas"] == list(key.replicas)
    _, on_dr = as_json(gateway.target, "keys", "list", "--prefix", prefix, "--cluster", "usw2-a")
    assert [k["key_id"] for k in on_dr] == [key.key_id]

    pinned_id = unique("pinned")
    other = "use1-b" if key.primary_cluster == "use1-a" else "use1-a"
    _, change = as_json(gateway.target, "keys", "place", pinned_id, "--cluster", other)
    assert approve(gateway.target, change)["state"] == "applied"
    made = crypto.GenerateKey(pb.GenerateKeyRequest(request_id=pinned_id, key_id=pinned_id,
                                                    algorithm=pb.KEY_ALGORITHM_AES_256), timeout=30)
    assert made.primary_cluster == other


def test_keys_placed_lists_placements_until_their_key_is_made_or_the_placement_taken_back(gateway, crypto) -> None:
    made_id, dropped_id = unique("placed"), unique("placed")
    for key_id in (made_id, dropped_id):
        _, change = as_json(gateway.target, "keys", "place", key_id, "--to", "use1-b")
        assert approve(gateway.target, change)["state"] == "applied"
    code, listed = as_json(gateway.target, "keys", "placed")
    assert code == 0 and listed["limit"] == 1000
    assert {"key_id": made_id, "cluster": "use1-b"} in listed["placements"]
    assert {"key_id": dropped_id, "cluster": "use1-b"} in listed["placements"]
    table = hsmctl(gateway.target, "keys", "placed").stdout
    assert re.search(rf"{re.escape(made_id)}\s+use1-b", table), table
    assert f"\n{len(listed['placements'])} of at most 1000\n" in table, table

    made = crypto.GenerateKey(pb.GenerateKeyRequest(request_id=made_id, key_id=made_id,
                                                    algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=30)
    try:
        assert made.primary_cluster == "use1-b" and made.held
        _, change = as_json(gateway.target, "keys", "release", dropped_id)
        released = approve(gateway.target, change)
        assert released["state"] == "applied", released
        assert released["result"] == (f"{dropped_id} is no longer placed on use1-b: created from now on, it goes "
                                      "where any new key goes")
        _, listed = as_json(gateway.target, "keys", "placed")
        assert not [p for p in listed["placements"] if p["key_id"] in (made_id, dropped_id)], listed
        missing = hsmctl(gateway.target, "keys", "release", unique("never-placed"))
        assert missing.returncode == 1 and "not found (nor placed for its creation)" in missing.stderr
    finally:
        crypto.DestroyKey(pb.DestroyKeyRequest(key_id=made_id), timeout=30)


def test_a_placement_made_through_one_worker_holds_for_a_key_made_through_any(tmp_path: Path) -> None:
    """`hsmctl keys place` is approved in one worker process; GenerateKey may reach another
    (each connection goes to a worker of the kernel's choosing)."""
    from hsmgw.v1 import admin_pb2_grpc

    fleet = init_fleet(tmp_path / "f", listen="127.0.0.1:0", copies=1)
    with running(fleet.config_path, workers=2) as gw:
        placed = {}
        for i in range(16):  # with the placement in one worker's memory, ~1 in 4 went wrong
            key_id = unique(f"placed-{i}")
            cluster = ("use1-a", "use1-b")[i % 2]
            with grpc.insecure_channel(gw.target) as channel:
                admin = admin_pb2_grpc.AdminServiceStub(channel)
                change = admin.PlaceKey(apb.PlaceKeyRequest(key_id=key_id, cluster=cluster), timeout=30,
                                        metadata=(("x-hsmgw-identity", "alice"),))
                applied = admin.ApproveChange(apb.ApproveChangeRequest(id=change.id), timeout=30,
                                              metadata=(("x-hsmgw-identity", "bob"),))
            assert applied.state == "applied", applied
            placed[key_id] = cluster
        for key_id, cluster in placed.items():
            with grpc.insecure_channel(gw.target) as channel:  # a connection of its own
                made = crypto_pb2_grpc.CryptoServiceStub(channel).GenerateKey(
                    pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256),
                    timeout=30)
            assert made.primary_cluster == cluster, key_id


def test_move_under_load_has_zero_errors(gateway, crypto, tokens) -> None:
    key = _key(crypto, "move")
    target = "use1-b" if key.primary_cluster == "use1-a" else "use1-a"
    pem = crypto.GetPublicKey(pb.GetPublicKeyRequest(key_id=key.key_id), timeout=10).pem
    public = serialization.load_pem_public_key(pem.encode())
    stop = threading.Event()
    errors: list[str] = []
    signed = [0] * 8

    def client(i: int) -> None:
        with grpc.insecure_channel(gateway.target) as ch:
            stub = crypto_pb2_grpc.CryptoServiceStub(ch)
            while not stop.is_set():
                message = f"{i}-{signed[i]}".encode()
                try:
                    sig = stub.Sign(pb.SignRequest(key_id=key.key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256,
                                                   message=message), timeout=10).signature
                    public.verify(sig, message, ec.ECDSA(hashes.SHA256()))
                    signed[i] += 1
                except Exception as exc:  # noqa: BLE001 - every error is a failure of the test
                    errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    try:  # the clients stop whatever happens: a failure here must not keep the test run alive
        time.sleep(0.5)
        _, change = as_json(gateway.target, "keys", "move", key.key_id, "--to", target)
        assert change["state"] == "pending"
        applied = approve(gateway.target, change)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert applied["state"] == "applied", applied
    assert errors == []
    assert sum(signed) > 50
    moved = crypto.GetKey(pb.GetKeyRequest(key_id=key.key_id), timeout=10)
    assert moved.primary_cluster == target and list(moved.replicas) == list(key.replicas)
    assert tokens.objects(key.primary_cluster, key.key_id) == [], "the old copy must be gone"
    assert len(tokens.objects(target, key.key_id)) == 2
    for replica in moved.replicas:
        assert len(tokens.objects(replica, key.key_id)) == 2


def test_reconcile_reports_and_fix_needs_approval(gateway, crypto, tokens) -> None:
    key = _key(crypto, "drift")
    for obj in tokens.objects(key.replicas[0], key.key_id):
        obj.destroy()
    code, report = as_json(gateway.target, "reconcile")
    assert code == 1
    assert {"kind": "missing", "cluster": key.replicas[0], "key_id": key.key_id,
            "detail": MISSING_HELD} in report["findings"]


def test_reconcile_fix_drops_a_lost_copy_and_the_repairer_copies_the_key_again(gateway, crypto, admin, tokens) -> None:
    """A replica loses the key's objects on its HSM. Reconcile says a fix will drop the name;
    once two admins approve it, the key is UNDER_REPLICATED and the gateway's repairer puts
    a copy back, which signs with the key's public key."""
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
    from pkcs11 import Mechanism

    key = _key(crypto, "lost-copy")
    lost = key.replicas[0]
    for obj in tokens.objects(lost, key.key_id):
        obj.destroy()
    code, report = as_json(gateway.target, "reconcile")
    assert code == 1
    [finding] = [f for f in report["findings"] if f["kind"] == "missing" and f["key_id"] == key.key_id]
    assert finding["cluster"] == lost and "--fix drops this name" in finding["detail"], finding

    change = admin.Reconcile(apb.ReconcileRequest(fix=True), timeout=60,
                             metadata=(("x-hsmgw-identity", "alice"),)).change
    applied = admin.ApproveChange(apb.ApproveChangeRequest(id=change.id), timeout=60,
                                  metadata=(("x-hsmgw-identity", "bob"),))
    assert applied.state == "applied" and "dropped from their records" in applied.result, applied
    dropped = crypto.GetKey(pb.GetKeyRequest(key_id=key.key_id), timeout=10)
    assert lost not in (dropped.primary_cluster, *dropped.replicas)
    assert dropped.state in (pb.KEY_STATE_UNDER_REPLICATED, pb.KEY_STATE_ENABLED)  # the repairer may be done

    end = time.monotonic() + 60  # replication.repair_interval is 10 s
    while True:
        repaired = crypto.GetKey(pb.GetKeyRequest(key_id=key.key_id), timeout=10)
        if repaired.state == pb.KEY_STATE_ENABLED and lost in repaired.replicas:
            break
        assert time.monotonic() < end, f"not repaired: {repaired}"
        time.sleep(0.5)
    [private] = [o for o in tokens.objects(lost, key.key_id) if o.object_class is ObjectClass.PRIVATE_KEY]
    digest = bytes(range(32))
    raw = private.sign(digest, mechanism=Mechanism.ECDSA)
    pem = crypto.GetPublicKey(pb.GetPublicKeyRequest(key_id=key.key_id), timeout=10).pem
    serialization.load_pem_public_key(pem.encode()).verify(
        encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")), digest,
        ec.ECDSA(Prehashed(hashes.SHA256())))


def _fix_leaves_out(admin, key_id: str, *, result: str, note: str) -> None:  # type: ignore[no-untyped-def]
    """A fix requested (as alice) lists nothing of ``key_id``; approved (as bob), its result says
    ``result``. With nothing else to fix, no change is made and the note says ``note``."""
    answer = admin.Reconcile(apb.ReconcileRequest(fix=True), timeout=60, metadata=(("x-hsmgw-identity", "alice"),))
    if answer.HasField("change"):  # other tests' findings; or only this key's, and no change at all
        assert key_id not in answer.change.params["findings"]
        if answer.change.state == "pending":
            applied = admin.ApproveChange(apb.ApproveChangeRequest(id=answer.change.id), timeout=60,
                                          metadata=(("x-hsmgw-identity", "bob"),))
            assert result in applied.result, applied
    else:
        assert note in answer.note, answer


def test_reconcile_reports_a_second_object_for_a_key_and_leaves_it_to_an_operator(
    gateway, crypto, admin, tokens
) -> None:
    key = _key(crypto, "stray")
    [public] = [o for o in tokens.objects(key.primary_cluster, key.key_id) if o.object_class is ObjectClass.PUBLIC_KEY]
    der = public_key_der(public, KeyAlgorithm.EC_P256)
    stray = public_key_attributes(der)
    stray.update({Attribute.TOKEN: True, Attribute.ID: key.key_id.encode(), Attribute.LABEL: key.key_id})
    tokens.session(key.primary_cluster).create_object(stray)
    try:
        code, report = as_json(gateway.target, "reconcile")
        assert code == 1
        assert {"kind": "duplicate", "cluster": key.primary_cluster, "key_id": key.key_id,
                "detail": "2 public key objects"} in report["findings"]
        table = hsmctl(gateway.target, "reconcile").stdout
        assert "DETAIL" in table and "2 public key objects" in table
        # A fix never lists a duplicate, and one that two admins approve removes no object of the key:
        # which one is its own is an operator's call.
        _fix_leaves_out(admin, key.key_id, result="duplicate objects (left for an operator)",
                        note="nothing here is for a fix: duplicates")
        assert len(tokens.objects(key.primary_cluster, key.key_id)) == 3
    finally:
        crypto.DestroyKey(pb.DestroyKeyRequest(key_id=key.key_id), timeout=30)
    assert tokens.objects(key.primary_cluster, key.key_id) == []


def test_reconcile_tells_another_applications_key_under_a_keys_id_from_an_orphan_and_offers_no_fix(
    gateway, crypto, admin, tokens
) -> None:
    """Another application's key pair sits under a key's id on a cluster the key's record does not
    name. Reconcile compares it with the key: a ``foreign`` finding saying what is there, not an
    ``orphan`` that a fix would be asked (and fail) to destroy. A fix request never lists it, and
    an approved fix leaves it."""
    from pkcs11 import KeyType
    from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

    key = _key(crypto, "foreign")
    [other] = [c for c in ("use1-a", "use1-b", "usw2-a") if c not in (key.primary_cluster, *key.replicas)]
    public, _ = tokens.session(other).generate_keypair(
        KeyType.EC, store=True, id=key.key_id.encode(), label=key.key_id,
        public_template={Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")})
    theirs = bytes(encode_ec_public_key(public))
    try:
        code, report = as_json(gateway.target, "reconcile")
        assert code == 1
        [found] = [f for f in report["findings"] if f["key_id"] == key.key_id]
        assert (found["kind"], found["cluster"]) == ("foreign", other), found
        assert found["detail"].startswith(f"cluster {other} holds 2 object(s) under key id {key.key_id!r} that are "
                                          "not this key's"), found
        table = hsmctl(gateway.target, "reconcile").stdout
        assert re.search(rf"foreign\s+{other}\s+{re.escape(key.key_id)}", table), table
        _fix_leaves_out(admin, key.key_id, result="objects under keys' ids that are not the keys' (left alone",
                        note="objects that are not their key's")
        left = tokens.objects(other, key.key_id)
        assert {o.object_class for o in left} == {ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY}
        assert [bytes(encode_ec_public_key(o)) for o in left if o.object_class is ObjectClass.PUBLIC_KEY] == [theirs]
    finally:
        for obj in tokens.objects(other, key.key_id):
            obj.destroy()
        crypto.DestroyKey(pb.DestroyKeyRequest(key_id=key.key_id), timeout=30)


def test_audit_tail_and_verify_on_the_real_log(gateway, fleet) -> None:
    _, change = as_json(gateway.target, "clusters", "drain", "use1-b")
    as_json(gateway.target, "changes", "reject", change["id"], who="bob")
    code, records = as_json(gateway.target, "audit", "tail", "-n", "5")
    assert any(r["action"] == "change_rejected" and r["actor"] == "bob" for r in records)
    result = hsmctl(gateway.target, "audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "intact" in result.stdout


@pytest.mark.parametrize("damage", ["edit", "delete", "swap"])
def test_audit_verify_names_the_tampered_record(tmp_path: Path, damage: str) -> None:
    fleet = init_fleet(tmp_path / "f", listen="127.0.0.1:0", copies=1)
    with running(fleet.config_path) as gw:
        for i in range(4):
            _, change = as_json(gw.target, "clusters", "drain", "use1-a")
            as_json(gw.target, "changes", "reject", change["id"], who=f"admin{i}")
        assert hsmctl(gw.target, "audit", "verify").returncode == 0
        log = fleet.config_path.parent / "audit.log"
        lines = log.read_bytes().splitlines(keepends=True)
        assert len(lines) >= 8
        if damage == "edit":
            line = lines[3]
            i = line.index(b'"actor":"') + len(b'"actor":"')
            lines[3] = line[:i] + bytes([line[i] ^ 1]) + line[i + 1:]
        elif damage == "delete":
            del lines[3]
        else:
            lines[3], lines[4] = lines[4], lines[3]
        log.write_bytes(b"".join(lines))
        result = hsmctl(gw.target, "audit", "verify")
        assert result.returncode == 1
        assert "TAMPERED" in result.stdout and "line 4" in result.stdout, result.stdout


def test_no_admin_change_is_taken_while_the_audit_log_cannot_be_written(tmp_path: Path) -> None:
    fleet = init_fleet(tmp_path / "f", listen="127.0.0.1:0", copies=1)
    log = fleet.config_path.parent / "audit.log"
    with running(fleet.config_path) as gw:
        _, change = as_json(gw.target, "clusters", "drain", "use1-a")
        log.rename(log.with_name("audit.log.kept"))
        log.mkdir()  # the log's path no longer takes appends
        for attempt in (("clusters", "drain", "use1-b"), ("changes", "approve", change["id"])):
            result = hsmctl(gw.target, *attempt, who="bob")
            assert result.returncode == 2  # try again later
            assert result.stderr.strip() == ("error: UNAVAILABLE: the gateway's audit log cannot be written (its "
                                             "log says why); admin changes wait until it can"), result.stderr
        _, changes = as_json(gw.target, "changes", "list", "--all")
        states = {c["params"]["cluster"]: (c["state"], c["approved_by"]) for c in changes}
        # Refused before anything was recorded: the grant of the call could not be audited.
        assert states == {"use1-a": ("pending", ["alice"])}, "an unaudited request or approval does not count"
        _, clusters = as_json(gw.target, "clusters")
        assert not any(c["draining"] for c in clusters["clusters"])
        assert "audit log" in gw.log() and "cannot be written" in gw.log()
        log.rmdir()
        log.with_name("audit.log.kept").rename(log)
        assert approve(gw.target, change)["state"] == "applied"
        assert hsmctl(gw.target, "audit", "verify").returncode == 0


def test_expired_change_does_not_run(tmp_path: Path) -> None:
    fleet = init_fleet(tmp_path / "f", listen="127.0.0.1:0", copies=1)
    with open(fleet.config_path, "a") as f:
        f.write("\n[admin]\nquorum = 2\nchange_ttl = 1\n")
    with running(fleet.config_path) as gw:
        _, change = as_json(gw.target, "clusters", "drain", "use1-a")
        time.sleep(1.5)
        late = hsmctl(gw.target, "changes", "approve", change["id"], who="bob")
        assert late.returncode == 1 and "expired" in late.stderr
        _, clusters = as_json(gw.target, "clusters")
        assert not any(c["draining"] for c in clusters["clusters"])
        _, records = as_json(gw.target, "audit", "tail", "-n", "20")
        (expired,) = [r for r in records if r["action"] == "change_expired"]
        # Nobody expired it: the gateway found it past its time (an approval attempt by bob).
        assert (expired["actor"], expired["details"]["requested_by"]) == ("-", "alice")
        assert "peer" not in expired["details"]


def test_rebalance_after_adding_a_fourth_cluster(tmp_path: Path) -> None:
    topology = (("us-east-1", ("use1-a", "use1-b", "use1-c")), ("us-west-2", ("usw2-a",)))
    fleet = init_fleet(tmp_path / "f", listen="127.0.0.1:0", topology=topology)
    full_config = fleet.config_path.read_text()
    block = '\n[[clusters]]\nname = "use1-c"\n'
    start = full_config.index(block)
    end = full_config.index("[[clusters]]", start + len(block)) if "[[clusters]]" in full_config[start + len(block):] \
        else len(full_config)
    fleet.config_path.write_text(full_config[:start] + "\n" + full_config[end:])  # three clusters to begin with
    keys = 60
    with running(fleet.config_path) as gw, grpc.insecure_channel(gw.target) as ch:
        crypto = crypto_pb2_grpc.CryptoServiceStub(ch)
        for i in range(keys):
            crypto.GenerateKey(pb.GenerateKeyRequest(request_id=f"r{i}", key_id=f"reb/k{i:03d}",
                                                     algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=30)
        _, before = as_json(gw.target, "rebalance", "--plan")
        assert before["moves"] == [], "nothing to move while the topology is unchanged"

    fleet.config_path.write_text(full_config)  # add use1-c
    with running(fleet.config_path) as gw, grpc.insecure_channel(gw.target) as ch:
        crypto = crypto_pb2_grpc.CryptoServiceStub(ch)
        _, plan = as_json(gw.target, "rebalance", "--plan")
        planned = {(m["key_id"], m["from"], m["to"]) for m in plan["moves"]}
        # Primaries live in the home region, now three clusters: the ideal is keys/3 moving to
        # the new one; consistent hashing must stay within 1.5 times that.
        home_clusters = 3
        assert 0 < len(planned) <= 1.5 * keys / home_clusters, len(planned)
        assert all(to == "use1-c" for _, _, to in planned), "only moves onto the new cluster"

        code, change = as_json(gw.target, "rebalance", "--apply")
        assert code == 3
        applied = approve(gw.target, change)
        assert applied["state"] == "applied", applied["result"]

        listed = crypto.ListKeys(pb.ListKeysRequest(prefix="reb/", page_size=1000), timeout=10).keys
        moved = {k.key_id for k in listed if k.primary_cluster == "use1-c"}
        assert moved == {key_id for key_id, _, _ in planned}, "the plan shown is what apply did"
        for key in listed:
            crypto.Sign(pb.SignRequest(key_id=key.key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=b"d" * 32),
                        timeout=10)
        _, after = as_json(gw.target, "rebalance", "--plan")
        assert after["moves"] == []
        code, report = as_json(gw.target, "reconcile")
        assert code == 0, report


def test_rebalance_leaves_keys_an_operator_placed_or_moved_until_released(tmp_path: Path) -> None:
    """A rebalance must not undo an operator's choice: a key moved with `keys move`, or made
    after `keys place`, is held where it was put; `keys release` hands it back."""
    topology = (("us-east-1", ("use1-a", "use1-b", "use1-c")), ("us-west-2", ("usw2-a",)))
    fleet = init_fleet(tmp_path / "f", listen="127.0.0.1:0", topology=topology)
    home = ["use1-a", "use1-b", "use1-c"]
    with running(fleet.config_path) as gw, grpc.insecure_channel(gw.target) as ch:
        crypto = crypto_pb2_grpc.CryptoServiceStub(ch)
        moved = _key(crypto, "held")
        elsewhere = next(c for c in home if c not in (moved.primary_cluster, *moved.replicas))
        _, change = as_json(gw.target, "keys", "move", moved.key_id, "--to", elsewhere)
        assert approve(gw.target, change)["state"] == "applied"
        placed_id = unique("held")
        not_chosen = next(c for c in home if c != PlacementRing(home).choose(placed_id))
        _, change = as_json(gw.target, "keys", "place", placed_id, "--cluster", not_chosen)
        assert approve(gw.target, change)["state"] == "applied"
        placed = crypto.GenerateKey(pb.GenerateKeyRequest(request_id=placed_id, key_id=placed_id,
                                                          algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=30)
        assert placed.primary_cluster == not_chosen and placed.held
        free = _key(crypto, "held")
        assert not free.held

        _, plan = as_json(gw.target, "rebalance", "--plan")
        assert plan["moves"] == [], "held keys stay where the operator put them"
        _, shown = as_json(gw.target, "keys", "show", moved.key_id)
        assert shown["primary_cluster"] == elsewhere and shown["held"] is True
        assert "HELD" in hsmctl(gw.target, "keys", "show", moved.key_id).stdout

        refused = hsmctl(gw.target, "keys", "release", free.key_id)
        assert refused.returncode == 1
        assert f"key {free.key_id!r} is not held" in refused.stderr
        _, pending = as_json(gw.target, "changes", "list")
        assert not [c for c in pending if c["action"] == "release_key"], "a refused release records nothing"

        code, change = as_json(gw.target, "keys", "release", moved.key_id)
        assert code == 3 and change["action"] == "release_key"
        assert approve(gw.target, change)["state"] == "applied"
        _, plan = as_json(gw.target, "rebalance", "--plan")
        assert [(m["key_id"], m["from"], m["to"]) for m in plan["moves"]] == [
            (moved.key_id, elsewhere, moved.primary_cluster)]
        _, records = as_json(gw.target, "audit", "tail", "-n", "20")
        assert ("key_released", moved.key_id) in [(r["action"], r["target"]) for r in records]
        assert crypto.GetKey(pb.GetKeyRequest(key_id=moved.key_id), timeout=10).held is False


def test_switches_survive_a_restart(tmp_path: Path) -> None:
    fleet = init_fleet(tmp_path / "f", listen="127.0.0.1:0", copies=1)
    with running(fleet.config_path) as gw:
        _, change = as_json(gw.target, "clusters", "drain", "use1-a")
        assert approve(gw.target, change)["state"] == "applied"
    with running(fleet.config_path) as gw:
        _, clusters = as_json(gw.target, "clusters")
        assert {c["name"]: c["draining"] for c in clusters["clusters"]} == {
            "use1-a": True, "use1-b": False, "usw2-a": False}


def test_key_lifecycle_events_are_in_the_audit_log(gateway, crypto) -> None:
    key = _key(crypto, "audited")
    crypto.DestroyKey(pb.DestroyKeyRequest(key_id=key.key_id), timeout=30)
    _, records = as_json(gateway.target, "audit", "tail", "-n", "50")
    events = [(r["action"], r["target"]) for r in records]
    assert ("key.generated", key.key_id) in events
    assert ("key.destroyed", key.key_id) in events
    generated = next(r for r in records if r["action"] == "key.generated" and r["target"] == key.key_id)
    assert set(generated["details"]["clusters"]) == {key.primary_cluster, *key.replicas}
    assert hsmctl(gateway.target, "audit", "verify").returncode == 0


def _draining(target: str) -> dict[str, bool]:
    _, clusters = as_json(target, "clusters")
    return {c["name"]: c["draining"] for c in clusters["clusters"]}


def _until(check: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_two_gateways_on_one_store_share_pending_changes_and_switches(tmp_path: Path) -> None:
    """Behind a load balancer each hsmctl call may reach another gateway: a change requested
    through one is approved through the other, and the drain it makes applies to both."""
    fleet = init_fleet(tmp_path / "f", listen="127.0.0.1:0", copies=1)
    home = fleet.config_path.parent
    other = tmp_path / "second"  # its own directory: its own audit log, no shared files but the store
    other.mkdir()
    text = fleet.config_path.read_text()
    assert 'url = "sqlite:placements.db"' in text and 'file = "secrets.toml"' in text
    (other / "hsmgw.toml").write_text(
        text.replace('url = "sqlite:placements.db"', f'url = "sqlite:{home / "placements.db"}"')
        .replace('file = "secrets.toml"', f'file = "{home / "secrets.toml"}"'))
    with running(fleet.config_path) as first, running(other / "hsmgw.toml") as second:
        code, change = as_json(first.target, "clusters", "drain", "use1-b")
        assert code == 3 and change["state"] == "pending"
        _, listed = as_json(second.target, "changes", "list")
        assert [c["id"] for c in listed] == [change["id"]]

        assert approve(second.target, change)["state"] == "applied"
        assert _draining(second.target)["use1-b"] is True
        assert _until(lambda: _draining(first.target)["use1-b"]), "the first gateway did not apply the drain"
        crypto = crypto_pb2_grpc.CryptoServiceStub(grpc.insecure_channel(first.target))
        for _ in range(4):  # new keys avoid the drained cluster on the gateway that did not run the change
            assert _key(crypto, "shared-drain").primary_cluster == "use1-a"

        _, undrain = as_json(second.target, "clusters", "undrain", "use1-b")
        assert approve(first.target, undrain, who="carol")["state"] == "applied"
        assert _until(lambda: not _draining(second.target)["use1-b"])
        # Each gateway's audit log holds what was done through it.
        assert "change_requested" in (home / "audit.log").read_text()
        assert "change_approved" in (other / "audit.log").read_text()


def test_a_change_that_cannot_succeed_is_refused_when_asked_not_after_its_approval(gateway, crypto) -> None:
    key = _key(crypto, "refused")
    holder = key.primary_cluster
    other = "use1-b" if holder == "use1-a" else "use1-a"
    refusals = [
        (("keys", "place", unique("new"), "--cluster", "nosuch"), "no cluster named 'nosuch'"),
        (("keys", "place", key.key_id, "--cluster", other), "already exists; move it instead"),
        (("keys", "move", key.key_id, "--to", holder), f"is already on cluster {holder}"),
        (("clusters", "undrain", "use1-b"), "cluster use1-b is not drained"),
        (("regions", "failback", "us-east-1"), "region us-east-1 is not failed over"),
    ]
    for argv, says in refusals:
        result = hsmctl(gateway.target, *argv)
        assert result.returncode == 1 and says in result.stderr, (argv, result.stderr)
    from hsmgw.v1 import admin_pb2_grpc  # hsmctl applies the plan it has just made; the API takes any id

    with grpc.insecure_channel(gateway.target) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.RpcError) as stale:
            admin.ApplyRebalance(apb.ApplyRebalanceRequest(plan_id="0123456789abcdef"), timeout=10,
                                 metadata=(("x-hsmgw-identity", "alice"),))
        assert stale.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "plan again" in stale.value.details()

    _, first = as_json(gateway.target, "clusters", "drain", "use1-b")
    again = hsmctl(gateway.target, "clusters", "drain", "use1-b", who="carol")
    assert again.returncode == 1
    assert f"change {first['id']} already asks for this; approve that one" in again.stderr
    as_json(gateway.target, "changes", "reject", first["id"], who="bob")
    _, changes = as_json(gateway.target, "changes", "list")
    assert changes == [], "no refused request left a change behind"


def test_a_key_is_not_moved_onto_a_drained_cluster_when_asked_nor_when_approved(gateway, crypto) -> None:
    """Held on a drained cluster, a key would be served from its DR copy, and rebalance would
    never take it off again."""
    key = _key(crypto, "to-drained")
    other = "use1-b" if key.primary_cluster == "use1-a" else "use1-a"
    _, drain = as_json(gateway.target, "clusters", "drain", other)
    assert approve(gateway.target, drain)["state"] == "applied"
    try:
        refused = hsmctl(gateway.target, "keys", "move", key.key_id, "--to", other)
        assert refused.returncode == 1
        assert (f"FAILED_PRECONDITION: key {key.key_id!r} cannot move to {other}: cluster {other} is drained"
                in refused.stderr)
    finally:
        _, undrain = as_json(gateway.target, "clusters", "undrain", other)
        assert approve(gateway.target, undrain)["state"] == "applied"

    _, move = as_json(gateway.target, "keys", "move", key.key_id, "--to", other)  # asked while in service
    _, drain = as_json(gateway.target, "clusters", "drain", other)
    assert approve(gateway.target, drain)["state"] == "applied"
    try:
        late = approve(gateway.target, move)
        assert late["state"] == "failed" and f"cluster {other} is drained" in late["result"], late
    finally:
        _, undrain = as_json(gateway.target, "clusters", "undrain", other)
        assert approve(gateway.target, undrain)["state"] == "applied"
    _, shown = as_json(gateway.target, "keys", "show", key.key_id)
    assert (shown["primary_cluster"], shown["replicas"], shown["held"]) == (key.primary_cluster, ["usw2-a"], False)
    signed = crypto.Sign(pb.SignRequest(key_id=key.key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, message=b"m"),
                         timeout=10)
    assert signed.cluster == key.primary_cluster


def test_a_move_that_would_take_a_key_s_only_dr_copy_out_of_the_dr_region_is_refused(gateway, crypto) -> None:
    key = _key(crypto, "dr-copy")
    assert list(key.replicas) == ["usw2-a"]
    other = "use1-b" if key.primary_cluster == "use1-a" else "use1-a"
    refused = hsmctl(gateway.target, "keys", "move", key.key_id, "--to", other, "--from", "usw2-a")
    assert refused.returncode == 1
    assert (f"FAILED_PRECONDITION: moving key {key.key_id!r} from usw2-a to {other} would leave it with no copy "
            "in a DR region (us-west-2), which [replication] require_dr_copy asks for") in refused.stderr
    _, changes = as_json(gateway.target, "changes", "list")
    assert changes == [], "the refused move left no change behind"
    # Moving the home-region copy keeps the DR one: that move may be asked for.
    _, fine = as_json(gateway.target, "keys", "move", key.key_id, "--to", other)
    assert fine["state"] == "pending"
    as_json(gateway.target, "changes", "reject", fine["id"], who="bob")


def test_a_change_to_a_key_with_a_change_pending_is_refused_naming_that_change(gateway, crypto) -> None:
    """Both would run once approved, and the last approval would silently win."""
    new_id = unique("new")
    _, first = as_json(gateway.target, "keys", "place", new_id, "--cluster", "use1-a")
    second = hsmctl(gateway.target, "keys", "place", new_id, "--cluster", "use1-b", who="carol")
    assert second.returncode == 1
    assert second.stderr.strip() == (f"error: FAILED_PRECONDITION: change {first['id']} (place_key) is pending for "
                                     f"key {new_id!r}; approve or reject that one first (hsmctl changes reject "
                                     f"{first['id']})")
    as_json(gateway.target, "changes", "reject", first["id"], who="bob")
    _, placed = as_json(gateway.target, "keys", "place", new_id, "--cluster", "use1-b", who="carol")
    assert approve(gateway.target, placed)["state"] == "applied"

    key = _key(crypto, "one-change")
    other = "use1-b" if key.primary_cluster == "use1-a" else "use1-a"
    _, move = as_json(gateway.target, "keys", "move", key.key_id, "--to", other)
    refused = hsmctl(gateway.target, "keys", "destroy", key.key_id, who="carol")
    assert refused.returncode == 1 and f"change {move['id']} (move_key) is pending for key" in refused.stderr
    as_json(gateway.target, "changes", "reject", move["id"], who="bob")
    _, changes = as_json(gateway.target, "changes", "list")
    assert changes == []


def _create_fails(crypto, says: str) -> None:
    with pytest.raises(grpc.RpcError) as failed:
        _key(crypto, "nowhere")
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE and says in failed.value.details()


def test_a_drain_that_leaves_new_keys_no_placement_needs_force_when_asked_and_when_approved(gateway, crypto) -> None:
    """Draining the only DR cluster makes every GenerateKey fail: refused unless forced (an
    evacuation), and a forced one says so to the requester and in its result."""
    refused = hsmctl(gateway.target, "clusters", "drain", "usw2-a")
    assert refused.returncode == 1
    assert ("draining cluster usw2-a would leave no placement for new keys under the replication policy: new keys "
            "cannot be placed, since each would have no copy in a DR region (us-west-2), which [replication] "
            "require_dr_copy asks for: every GenerateKey fails UNAVAILABLE and creates nothing") in refused.stderr
    assert "hsmctl clusters drain usw2-a --force" in refused.stderr
    _, changes = as_json(gateway.target, "changes", "list")
    assert changes == []

    forced = hsmctl(gateway.target, "clusters", "drain", "usw2-a", "--force")
    assert forced.returncode == 3
    assert ("warning: once approved, new keys cannot be placed, since each would have no copy in a DR region"
            in forced.stderr)
    _, [change] = as_json(gateway.target, "changes", "list")
    try:
        applied = approve(gateway.target, change)
        assert applied["state"] == "applied", applied
        assert applied["result"].startswith("cluster usw2-a drained; forced, so new keys cannot be placed")
        _create_fails(crypto, "with one in a DR region: cluster usw2-a is drained, so too few clusters take new keys")
        _, status = as_json(gateway.target, "status")
        assert all(c["health"] == "SERVING" for c in status["clusters"])
        assert ("DR region us-west-2 has no cluster that takes new keys (cluster usw2-a is drained): new keys cannot "
                "be made durable") in status["warnings"]
    finally:
        _, undrain = as_json(gateway.target, "clusters", "undrain", "usw2-a")
        assert approve(gateway.target, undrain)["state"] == "applied"

    # Each drain alone leaves room; the second one approved would leave none.
    _, first = as_json(gateway.target, "clusters", "drain", "use1-a")
    _, second = as_json(gateway.target, "clusters", "drain", "use1-b")
    assert approve(gateway.target, second)["state"] == "applied"
    try:
        late = approve(gateway.target, first)
        assert late["state"] == "failed" and late["result"].startswith(
            "draining cluster use1-a would leave no placement for new keys"), late
        assert _draining(gateway.target) == {"use1-a": False, "use1-b": True, "usw2-a": False}
    finally:
        _, undrain = as_json(gateway.target, "clusters", "undrain", "use1-b")
        assert approve(gateway.target, undrain)["state"] == "applied"
def test_a_change_whose_gateway_was_killed_while_it_ran_is_interrupted_at_the_next_start(tmp_path: Path) -> None:
    """A gateway died mid-change (its lease, left in the store, has lapsed): the next gateway to
    start marks it interrupted, audits that, and says how to check what it did."""
    from gateway.quorum import ChangeBook
    from router.placement import SqliteStore

    class Killed(BaseException):
        pass

    def dies(params: dict[str, str]) -> str:
        raise Killed

    fleet = init_fleet(tmp_path / "f", listen="127.0.0.1:0", copies=1)
    store = SqliteStore(fleet.config_path.parent / "placements.db")
    # Its clock is 10 minutes behind: the lease it takes has already lapsed by the time the gateway starts.
    book = ChangeBook(store, {"drain": dies}, clock=lambda: time.time() - 600, lease=60)
    change = book.request("alice", "drain", {"cluster": "use1-a"})
    with pytest.raises(Killed):
        book.approve("bob", change.id)
    store.close()
    with running(fleet.config_path) as gw:
        _, changes = as_json(gw.target, "changes", "list", "--all")
        [listed] = [c for c in changes if c["id"] == change.id]
        assert listed["state"] == "interrupted", listed
        assert "may be partly applied: run hsmctl reconcile" in listed["result"]
        late = hsmctl(gw.target, "changes", "approve", change.id, who="carol")
        assert late.returncode == 1 and f"change {change.id} is interrupted" in late.stderr
        _, records = as_json(gw.target, "audit", "tail", "-n", "50")
        assert [(r["action"], r["outcome"]) for r in records if r["target"] == change.id] == [
            ("change_interrupted", "interrupted"), ("authz.granted", "ok")]  # carol's approval, refused after


def _orphan(tokens, crypto, cluster: str) -> str:
    """A key object on ``cluster`` that its key's record does not put there: a public key of a
    destroyed key, as a stray import leaves. (Objects of keys no record names at all are never
    destroyed: router.reconcile.)"""
    for _ in range(50):  # on a cluster the record names: the destroying process sweeps the others for strays
        key_id = unique("orphan")
        made = crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id,
                                                        algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=30)
        crypto.DestroyKey(pb.DestroyKeyRequest(key_id=key_id), timeout=30)
        if cluster in (made.primary_cluster, *made.replicas):
            break
    else:
        raise AssertionError(f"no key of 50 was placed on {cluster}")
    der = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    attributes = public_key_attributes(der)
    attributes.update({Attribute.TOKEN: True, Attribute.ID: key_id.encode(), Attribute.LABEL: key_id})
    tokens.session(cluster).create_object(attributes)
    return key_id


def test_reconcile_fix_repairs_only_the_findings_its_approvers_were_shown(gateway, crypto, tokens) -> None:
    """Two admins approve what the request showed: an orphan found after it is left for another
    request, one gone since is skipped; a second request meanwhile shows the findings and the
    pending change, and --output json prints one document."""
    _, pending = as_json(gateway.target, "changes", "list")
    for change in pending:  # another test's fix, if any, is not this test's
        if change["action"] in ("reconcile_fix", "reconcile_fix_shown"):
            as_json(gateway.target, "changes", "reject", change["id"], who="bob")
    shown, gone = _orphan(tokens, crypto, "use1-a"), _orphan(tokens, crypto, "use1-b")
    result = hsmctl(gateway.target, "--output", "json", "reconcile", "--fix")
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)  # one JSON document, the change inside
    change = report["change"]
    findings = json.loads(change["params"]["findings"])
    assert ["orphan", "use1-a", shown] in findings and ["orphan", "use1-b", gone] in findings
    assert {"kind": "orphan", "cluster": "use1-a", "key_id": shown, "detail": ""} in report["findings"]

    unseen = _orphan(tokens, crypto, "use1-a")
    for obj in tokens.objects("use1-b", gone):  # resolved by hand before the approval
        obj.destroy()
    try:
        listed = hsmctl(gateway.target, "changes", "list").stdout
        assert f"orphan use1-a/{shown}" in listed and unseen not in listed, listed
        again = hsmctl(gateway.target, "reconcile", "--fix", who="carol")
        assert again.returncode == 1, again.stderr
        assert "FINDING" in again.stdout and unseen in again.stdout, "the findings are shown"
        assert (f"change {change['id']} already asks for a fix, of the findings shown when it was asked: approve "
                f"it (hsmctl changes approve {change['id']})") in again.stdout, again.stdout
        _, still = as_json(gateway.target, "changes", "list")
        assert [c["id"] for c in still if c["action"] == "reconcile_fix_shown"] == [change["id"]], "no second change"

        applied = approve(gateway.target, change)
        assert applied["state"] == "applied", applied
        assert re.search(r"[1-9]\d* of them no longer held \(skipped\); [1-9]\d* findings it does not list left "
                         r"for a new request", applied["result"]), applied["result"]
        assert tokens.objects("use1-a", shown) == [], "the finding shown is fixed"
        assert len(tokens.objects("use1-a", unseen)) == 1, "an orphan nobody was shown is left"
    finally:
        for obj in tokens.objects("use1-a", unseen):
            obj.destroy()


def test_rebalance_apply_with_nothing_to_move_requests_no_change(tmp_path: Path) -> None:
    fleet = init_fleet(tmp_path / "f", listen="127.0.0.1:0", copies=1)
    with running(fleet.config_path) as gw:
        result = hsmctl(gw.target, "rebalance", "--apply")
        assert result.returncode == 0, result.stderr
        assert "nothing to move; no change requested" in result.stdout
        code, plan = as_json(gw.target, "rebalance", "--apply")
        assert code == 0 and plan["moves"] == []
        _, changes = as_json(gw.target, "changes", "list", "--all")
        assert changes == [], "nothing for a second admin to approve, nothing to block a later rebalance"
        from hsmgw.v1 import admin_pb2_grpc

        with grpc.insecure_channel(gw.target) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                admin.ApplyRebalance(apb.ApplyRebalanceRequest(plan_id=plan["plan_id"]), timeout=10,
                                     metadata=(("x-hsmgw-identity", "alice"),))
        assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "moves no key" in refused.value.details()


def test_audit_tail_refuses_a_count_below_one(gateway, admin) -> None:
    for lines in ("0", "-3"):
        result = hsmctl(gateway.target, "audit", "tail", "-n", lines)
        assert result.returncode == 1 and result.stdout == "", result
        assert f"argument -n/--lines: must be 1 or more, not {lines}" in result.stderr
    with pytest.raises(grpc.RpcError) as refused:
        admin.TailAudit(apb.TailAuditRequest(lines=-3), timeout=10, metadata=(("x-hsmgw-identity", "alice"),))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    _, three = as_json(gateway.target, "audit", "tail", "-n", "3")
    assert 1 <= len(three) <= 3


@pytest.mark.parametrize(("kind", "action", "params", "ask"), [
    ("key", "place_key", {"cluster": "use1-a"}, ("keys", "place", "{name}", "--cluster", "use1-b")),
    ("cluster", "drain", {}, ("clusters", "drain", "{name}")),
], ids=["key", "cluster"])
def test_a_change_for_what_a_running_change_holds_is_refused_until_that_one_ends(
    gateway, fleet, kind: str, action: str, params: dict[str, str], ask: tuple[str, ...]
) -> None:
    """A change running through another gateway on the same store (its lease renewed) still holds
    its key or cluster: a request for it is refused, naming that change and how long a stuck one
    can hold it, and is taken once that change has ended."""
    from gateway.quorum import ChangeBook
    from router.placement import SqliteStore

    name = unique("held") if kind == "key" else "use1-b"
    started, finish = threading.Event(), threading.Event()

    def runs_until_told(given: dict[str, str]) -> str:
        started.set()
        finish.wait(60)
        return "done"

    store = SqliteStore(fleet.state_dir / "placements.db")
    other = ChangeBook(store, {action: runs_until_told})
    running_change = other.request("alice", action, {("key_id" if kind == "key" else "cluster"): name, **params})
    runner = threading.Thread(target=other.approve, args=("bob", running_change.id))
    runner.start()
    command = [part.format(name=name) for part in ask]
    try:
        assert started.wait(30), "the other gateway runs the change"
        refused = hsmctl(gateway.target, *command, who="carol")
        assert refused.returncode == 1
        assert refused.stderr.strip() == (
            f"error: FAILED_PRECONDITION: change {running_change.id} ({action}) is running for {kind} {name!r}: "
            f"wait for its result (hsmctl changes list --all); one stuck shows interrupted within 360 s of its "
            f"start, and then no longer holds the {kind}")
        _, listed = as_json(gateway.target, "changes", "list")
        assert [c["id"] for c in listed if name in c["params"].values()] == [running_change.id], "no second change"
    finally:
        finish.set()
        runner.join(30)
        store.close()
    _, taken = as_json(gateway.target, *command, who="carol")
    assert taken["state"] == "pending", taken
    as_json(gateway.target, "changes", "reject", taken["id"], who="bob")


@pytest.mark.parametrize("action", ["reconcile_fix", "reconcile_fix_shown"],
                         ids=["earlier-versions-fix", "fix-without-findings"])
def test_a_fix_that_does_not_list_its_findings_fails_when_approved_and_destroys_nothing(
    gateway, crypto, tokens, fleet, action: str
) -> None:
    """An earlier version's reconcile_fix repaired whatever it found once approved, unseen by its
    approvers: approved through this version it fails, saying to ask again, and the orphan it
    would have destroyed is still there."""
    from gateway.quorum import ChangeBook
    from router.placement import SqliteStore

    orphan = _orphan(tokens, crypto, "use1-a")
    store = SqliteStore(fleet.state_dir / "placements.db")
    try:  # as an earlier version recorded it: no findings
        change = ChangeBook(store, {action: lambda given: "fixed"}).request("alice", action, {})
    finally:
        store.close()
    try:
        _, listed = as_json(gateway.target, "changes", "list")
        assert change.id in [c["id"] for c in listed]
        result = hsmctl(gateway.target, "changes", "approve", change.id, who="bob")
        assert result.returncode == 1, result.stderr
        assert result.stdout.strip() == (
            f"change {change.id} ({action}) failed: this fix was requested without the findings it repairs, so it "
            "cannot say what it would destroy: request it again (hsmctl reconcile --fix)")
        assert len(tokens.objects("use1-a", orphan)) == 1, "nothing was destroyed"
        _, records = as_json(gateway.target, "audit", "tail", "-n", "20")
        assert [(r["action"], r["outcome"]) for r in records if r["target"] == change.id][-1:] == [
            ("change_failed", "failed")]
    finally:
        for obj in tokens.objects("use1-a", orphan):
            obj.destroy()


def test_a_destroyed_key_is_refused_as_destroyed_by_every_key_change(gateway, crypto) -> None:
    """Release, place and move of a destroyed key all say what it is, not that it is missing or
    that it exists and may be moved."""
    key = _key(crypto, "gone")
    crypto.DestroyKey(pb.DestroyKeyRequest(key_id=key.key_id), timeout=30)
    other = "use1-b" if key.primary_cluster == "use1-a" else "use1-a"
    for argv, says in [
        (("keys", "release", key.key_id), f"FAILED_PRECONDITION: key {key.key_id!r} is destroyed"),
        (("keys", "place", key.key_id, "--cluster", other),
         f"FAILED_PRECONDITION: key {key.key_id!r} is destroyed; key ids are never reused"),
        (("keys", "move", key.key_id, "--to", other), f"FAILED_PRECONDITION: key {key.key_id!r} is destroyed"),
    ]:
        result = hsmctl(gateway.target, *argv)
        assert (result.returncode, result.stderr.strip()) == (1, f"error: {says}"), argv
    _, changes = as_json(gateway.target, "changes", "list")
    assert [c for c in changes if c["params"].get("key_id") == key.key_id] == []


def test_a_key_is_not_placed_on_a_drained_cluster_when_asked_nor_when_approved(gateway) -> None:
    """GenerateKey passes over a placement on a drained cluster: accepted, it would say the key
    goes there and then put it elsewhere."""
    new_id = unique("to-drained")
    _, drain = as_json(gateway.target, "clusters", "drain", "use1-a")
    assert approve(gateway.target, drain)["state"] == "applied"
    try:
        refused = hsmctl(gateway.target, "keys", "place", new_id, "--cluster", "use1-a")
        assert refused.returncode == 1
        assert refused.stderr.strip() == (
            f"error: FAILED_PRECONDITION: key {new_id!r} cannot be placed on use1-a: cluster use1-a is drained, so "
            "it takes no keys until an operator puts it back in service")
    finally:
        _, undrain = as_json(gateway.target, "clusters", "undrain", "use1-a")
        assert approve(gateway.target, undrain)["state"] == "applied"

    _, place = as_json(gateway.target, "keys", "place", new_id, "--cluster", "use1-a")  # asked while in service
    _, drain = as_json(gateway.target, "clusters", "drain", "use1-a")
    assert approve(gateway.target, drain)["state"] == "applied"
    try:
        late = approve(gateway.target, place)
        assert late["state"] == "failed" and "cluster use1-a is drained" in late["result"], late
    finally:
        _, undrain = as_json(gateway.target, "clusters", "undrain", "use1-a")
        assert approve(gateway.target, undrain)["state"] == "applied"


def test_a_rebalance_leaves_a_key_destroyed_since_its_plan_and_moves_the_others(tmp_path: Path) -> None:
    """A change to one planned key does not void the plan: that key is left and named, the others
    move. A plan made for other clusters than those that take keys now is refused whole."""
    fleet = init_fleet(tmp_path / "f", listen="127.0.0.1:0")
    with running(fleet.config_path) as gw, grpc.insecure_channel(gw.target) as ch:
        crypto = crypto_pb2_grpc.CryptoServiceStub(ch)
        keys = [_key(crypto, "reb") for _ in range(12)]
        _, drain = as_json(gw.target, "clusters", "drain", "use1-a")
        assert approve(gw.target, drain)["state"] == "applied"
        _, plan = as_json(gw.target, "rebalance", "--plan")
        code, change = as_json(gw.target, "rebalance", "--apply")
        assert code == 3 and change["params"]["plan_id"] == plan["plan_id"], change
        planned = [(m["key_id"], m["from"], m["to"]) for m in plan["moves"]]
        assert {f for _, f, _ in planned} == {"use1-a"} and {t for _, _, t in planned} == {"use1-b"}
        assert len(planned) >= 2, planned
        gone = planned[0][0]
        _, destroy = as_json(gw.target, "keys", "destroy", gone)
        assert approve(gw.target, destroy)["state"] == "applied"

        applied = approve(gw.target, change)
        assert applied["state"] == "applied", applied
        moved = len(planned) - 1
        assert applied["result"] == (f"moved {moved} key{'' if moved == 1 else 's'}, left 1 that changed since the "
                                     f"plan ({gone})")
        after = {k.key_id: crypto.GetKey(pb.GetKeyRequest(key_id=k.key_id), timeout=10) for k in keys
                 if k.key_id != gone}
        assert all(key.primary_cluster == "use1-b" for key in after.values())

        _, undrain = as_json(gw.target, "clusters", "undrain", "use1-a")
        assert approve(gw.target, undrain)["state"] == "applied"
        code, back = as_json(gw.target, "rebalance", "--apply")
        assert code == 3, back
        _, drain = as_json(gw.target, "clusters", "drain", "use1-b")
        assert approve(gw.target, drain)["state"] == "applied"
        late = approve(gw.target, back)
        assert late["state"] == "failed"
        assert late["result"] == ("the home region's clusters that take keys changed since the plan was made "
                                  "(use1-a, use1-b then, use1-a now); nothing was moved: plan again")
        assert {k: crypto.GetKey(pb.GetKeyRequest(key_id=k), timeout=10).primary_cluster for k in after} == {
            k: "use1-b" for k in after}



def test_keys_place_and_move_name_the_target_cluster_with_one_option(gateway, crypto) -> None:
    """`--to CLUSTER` for both (their help shows it alone); `--cluster`, keys place's former
    spelling, still works for both, so scripts written for it go on."""
    new_id = unique("spelled")
    key = _key(crypto, "spelled")
    other = "use1-b" if key.primary_cluster == "use1-a" else "use1-a"
    for command, target, param in ((("keys", "place", new_id), "use1-b", "cluster"),
                                   (("keys", "move", key.key_id), other, "to")):
        for option in ("--to", "--cluster"):
            code, change = as_json(gateway.target, *command, option, target)
            assert (code, change["params"][param]) == (3, target), (command, option, change)
            assert hsmctl(gateway.target, "changes", "reject", change["id"], who="bob").returncode == 0
        both = hsmctl(gateway.target, *command, "--to", target, "--cluster", target)
        assert both.returncode == 1 and "argument --cluster: not allowed with argument --to" in both.stderr
        shown = hsmctl(gateway.target, *command[:2], "--help").stdout
        assert "--to CLUSTER" in shown and "--cluster" not in shown, shown

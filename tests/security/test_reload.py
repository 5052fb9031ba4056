"""SIGHUP reloads the policy and the TLS files, without a restart and without dropping calls."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import queue
import signal
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from gateway import audit as audit_log
from gateway.fleet import Fleet
from gateway.tls import DevCerts, issue_server, load_issuer, write_file
from hsmgw.v1 import crypto_pb2 as pb
from tests.moto import free_port
from tests.security.helpers import (
    POLICY,
    Client,
    certificate_valid,
    sid,
    sighup_and_wait,
    tls_channel,
    write_config,
)
from tests.support import GatewayProcess, rpc_error, running, scrape, unique, value, wait_for

DIGEST = hashlib.sha256(b"reload").digest()
GRANT_NOBODY = f'\n[identities."{sid("nobody")}"]\nroles = ["payments-signer"]\n'


def _policy(gateway: GatewayProcess) -> Path:
    for line in gateway.config_path.read_text().splitlines():
        if line.startswith("policy_file"):
            return Path(line.split('"')[1])
    raise AssertionError("no policy_file")


def _served_fingerprint(target: str, certs: DevCerts, client: str) -> str:
    host, port = target.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(*certs.client(client))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=host) as t:
        der = t.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).fingerprint(hashes.SHA256()).hex()


def _file_fingerprint(path: Path) -> str:
    return x509.load_pem_x509_certificate(path.read_bytes()).fingerprint(hashes.SHA256()).hex()


def test_a_policy_change_takes_effect_on_sighup_without_a_restart(
    gateway: GatewayProcess, own_certs: DevCerts
) -> None:
    policy = _policy(gateway)
    with tls_channel(gateway.target, own_certs, "nobody") as channel:
        stub = Client.of(channel).crypto
        request = pb.GetKeyRequest(key_id="payments/reload/none")
        assert rpc_error(stub.GetKey, request, timeout=5).code() is grpc.StatusCode.PERMISSION_DENIED

        policy.write_text(POLICY + GRANT_NOBODY)
        sighup_and_wait(gateway, "policy reloaded")
        assert rpc_error(stub.GetKey, request, timeout=5).code() is grpc.StatusCode.NOT_FOUND  # authorized now

        # A broken file is refused: the policy in force stays, and the log says why.
        policy.write_text(POLICY + GRANT_NOBODY + '\n[roles.broken]\noperations = ["Sgn"]\nprefixes = ["x/"]\n')
        sighup_and_wait(gateway, "policy reload refused")
        assert "roles.broken.operations[0]: unknown operation 'Sgn'" in gateway.log()
        assert rpc_error(stub.GetKey, request, timeout=5).code() is grpc.StatusCode.NOT_FOUND

        policy.write_text(POLICY)  # revoked
        sighup_and_wait(gateway, "policy reloaded")
        assert rpc_error(stub.GetKey, request, timeout=5).code() is grpc.StatusCode.PERMISSION_DENIED
    assert gateway.proc is not None and gateway.proc.poll() is None


def test_tls_files_reload_on_sighup_without_dropping_a_call_in_flight(
    gateway: GatewayProcess, own_certs: DevCerts
) -> None:
    old = _file_fingerprint(own_certs.server)
    assert _served_fingerprint(gateway.target, own_certs, "payments-app") == old

    with tls_channel(gateway.target, own_certs, "root") as channel:
        crypto = Client.of(channel).crypto
        key_id = unique("payments/reload")
        crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256,
                                                 replication=pb.ReplicationPolicy(copies=1)), timeout=30)
        # A stream opened before the rotation: it must keep working across it.
        outbox: queue.Queue[pb.SignRequest | None] = queue.Queue()
        answers: list[str] = []
        responses = crypto.SignStream(iter(outbox.get, None), timeout=60)
        reader = threading.Thread(target=lambda: answers.extend(r.request_id for r in responses))
        reader.start()
        outbox.put(pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=DIGEST, request_id="a"))

        cert_pem, key_pem = issue_server(load_issuer(own_certs.ca, own_certs.ca_key))
        write_file(own_certs.server_key, key_pem, private=True)
        write_file(own_certs.server, cert_pem)
        new = _file_fingerprint(own_certs.server)
        assert new != old
        sighup_and_wait(gateway, "TLS reloaded")

        outbox.put(pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=DIGEST, request_id="b"))
        outbox.put(None)
        reader.join(timeout=10)
        assert answers == ["a", "b"]
        # The old connection still serves unary calls too.
        assert crypto.GetKey(pb.GetKeyRequest(key_id=key_id), timeout=5).key_id == key_id

    assert _served_fingerprint(gateway.target, own_certs, "payments-app") == new
    with tls_channel(gateway.target, own_certs, "payments-app") as channel:
        assert Client.of(channel).crypto.GetKey(pb.GetKeyRequest(key_id=key_id), timeout=5).key_id == key_id


def test_bad_tls_files_on_reload_are_refused_and_the_current_ones_kept(
    gateway: GatewayProcess, own_certs: DevCerts
) -> None:
    served = _served_fingerprint(gateway.target, own_certs, "payments-app")
    _, other_key = issue_server(load_issuer(own_certs.ca, own_certs.ca_key))
    write_file(own_certs.server_key, other_key, private=True)  # not the certificate's key
    sighup_and_wait(gateway, "TLS reload refused")
    assert "is not the key of the certificate" in gateway.log()

    os.chmod(own_certs.server_key, 0o644)
    sighup_and_wait(gateway, "TLS reload refused")
    assert f"server.tls.key_file: {own_certs.server_key} is open to its group or others" in gateway.log()

    assert _served_fingerprint(gateway.target, own_certs, "payments-app") == served


def test_a_certificate_outside_its_validity_on_reload_is_refused_and_the_current_one_kept(
    gateway: GatewayProcess, own_certs: DevCerts
) -> None:
    """An expired certificate taken on reload failed every new client's handshake."""
    served = _served_fingerprint(gateway.target, own_certs, "payments-app")
    issuer = load_issuer(own_certs.ca, own_certs.ca_key)
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    cases = [(now - 30 * day, now - day, "expired at"), (now + day, now + 30 * day, "not valid before")]
    for not_before, not_after, why in cases:
        cert_pem, key_pem = certificate_valid(issuer, not_before, not_after)
        write_file(own_certs.server_key, key_pem, private=True)
        write_file(own_certs.server, cert_pem)
        sighup_and_wait(gateway, "TLS reload refused")
        assert f"server.tls.cert_file: the certificate in {own_certs.server} " in gateway.log()
        assert why in gateway.log()
        assert _served_fingerprint(gateway.target, own_certs, "payments-app") == served
    assert "TLS reloaded" not in gateway.log()


def test_a_reload_says_which_names_the_new_certificate_dropped_and_how_the_client_cas_changed(
    gateway: GatewayProcess, own_certs: DevCerts, other_ca: DevCerts
) -> None:
    issuer = load_issuer(own_certs.ca, own_certs.ca_key)
    now = datetime.datetime.now(datetime.timezone.utc)
    sighup_and_wait(gateway, "TLS reloaded: ")
    assert "client CAs unchanged" in gateway.log()

    cert_pem, key_pem = certificate_valid(issuer, now - datetime.timedelta(days=1), now + datetime.timedelta(days=30),
                                          hosts=("127.0.0.1", "gw.example"))
    write_file(own_certs.server_key, key_pem, private=True)
    write_file(own_certs.server, cert_pem)
    write_file(own_certs.ca, own_certs.ca.read_bytes() + other_ca.ca.read_bytes())
    sighup_and_wait(gateway, "TLS reloaded: ")
    new = _file_fingerprint(own_certs.server)[:16]
    log = gateway.log()
    assert (f"WARNING gateway.tls: TLS reload: the new server certificate {new} does not name ::1, localhost, which "
            "the previous one") in log
    assert "clients that connect by those names fail the handshake" in log
    added = _file_fingerprint(other_ca.ca)[:16]
    reloaded = log.rsplit("TLS reloaded: ", 1)[1].splitlines()[0]
    assert reloaded.startswith(f"server certificate {new} for 127.0.0.1, gw.example, valid until ")
    assert "client CAs changed (sha256 " in reloaded
    assert f"added 'CN=hsmgw dev CA,O=hsmgw dev' ({added}, until " in reloaded
    assert "removed" not in reloaded

    write_file(own_certs.ca, other_ca.ca.read_bytes())
    sighup_and_wait(gateway, "TLS reloaded: ")
    reloaded = gateway.log().rsplit("TLS reloaded: ", 1)[1].splitlines()[0]
    kept = _file_fingerprint(other_ca.ca)[:16]
    assert f"client CAs from {own_certs.ca} (sha256 " in reloaded and f"({kept}, until " in reloaded
    assert "; client CAs changed (sha256 " in reloaded and "removed 'CN=hsmgw dev CA,O=hsmgw dev' (" in reloaded
    assert "added" not in reloaded


def test_a_certificate_valid_only_from_minutes_ahead_is_taken_and_the_log_says_from_when(
    gateway: GatewayProcess, own_certs: DevCerts
) -> None:
    """Within the 5 minutes of clock skew allowed; clients whose clocks are not as far ahead fail
    the handshake until then, so the line says when it becomes valid."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    not_before = now + datetime.timedelta(minutes=3)
    cert_pem, key_pem = certificate_valid(load_issuer(own_certs.ca, own_certs.ca_key), not_before,
                                          now + datetime.timedelta(days=30))
    write_file(own_certs.server_key, key_pem, private=True)
    write_file(own_certs.server, cert_pem)
    sighup_and_wait(gateway, "TLS reloaded: ")
    reloaded = gateway.log().rsplit("TLS reloaded: ", 1)[1].splitlines()[0]
    assert f", and valid only from {not_before.isoformat()}, " in reloaded
    assert "from now by this host's clock (up to 5 minutes of clock skew are allowed): until then clients may fail " \
           "the handshake" in reloaded


def _tls_reloads(gateway: GatewayProcess, pids: set[int], count: int, path: Path | None = None
                 ) -> list[dict[str, Any]]:
    """Wait for ``count`` ``tls.reload`` records of the processes ``pids`` in the audit log at
    ``path``, by default the fleet's (other tests' gateways write there too)."""
    path = path or gateway.config_path.parent / "audit.log"

    def found() -> list[dict[str, Any]]:
        records = [r for r in audit_log.tail(path, 500) if r["action"] == "tls.reload"
                   and r["details"]["pid"] in pids] if path.exists() else []
        return records if len(records) >= count else []

    return wait_for(found, what=f"{count} tls.reload record(s) of pid(s) {pids}")


def test_a_tls_reload_is_audited_with_what_changed_and_what_is_now_served_and_trusted(
    gateway: GatewayProcess, own_certs: DevCerts, other_ca: DevCerts
) -> None:
    assert gateway.proc is not None
    cert_pem, key_pem = issue_server(load_issuer(own_certs.ca, own_certs.ca_key))
    write_file(own_certs.server_key, key_pem, private=True)
    write_file(own_certs.server, cert_pem)
    bundle = own_certs.ca.read_bytes() + other_ca.ca.read_bytes()
    write_file(own_certs.ca, bundle)
    sighup_and_wait(gateway, "TLS reloaded: ")
    (record,) = _tls_reloads(gateway, {gateway.proc.pid}, 1)

    assert record["actor"] == "-" and record["outcome"] == "ok"
    details = record["details"]
    assert details["changed"] == [str(own_certs.server), str(own_certs.server_key), str(own_certs.ca)]
    served = x509.load_pem_x509_certificate(cert_pem)
    assert details["cert_sha256"] == served.fingerprint(hashes.SHA256()).hex()
    assert details["cert_subject"] == served.subject.rfc4514_string()
    assert details["cert_not_after"] == served.not_valid_after_utc.isoformat()
    assert details["client_ca_sha256"] == hashlib.sha256(bundle).hexdigest()
    assert details["client_cas"] == [ca.fingerprint(hashes.SHA256()).hex()
                                     for ca in x509.load_pem_x509_certificates(bundle)]
    assert key_pem.splitlines()[1].decode() not in (gateway.config_path.parent / "audit.log").read_text()

    # Nothing changed: the reload is recorded all the same, naming no file.
    sighup_and_wait(gateway, "TLS reloaded: ")
    assert _tls_reloads(gateway, {gateway.proc.pid}, 2)[1]["details"]["changed"] == []


def test_a_refused_tls_reload_is_audited_with_the_reason_and_the_certificate_kept(
    gateway: GatewayProcess, own_certs: DevCerts
) -> None:
    assert gateway.proc is not None
    kept = _file_fingerprint(own_certs.server)
    _, other_key = issue_server(load_issuer(own_certs.ca, own_certs.ca_key))
    write_file(own_certs.server_key, other_key, private=True)
    gateway.proc.send_signal(signal.SIGHUP)
    (record,) = _tls_reloads(gateway, {gateway.proc.pid}, 1)

    assert record["outcome"] == "failed"
    assert record["details"]["error"] == (f"server.tls.key_file: {own_certs.server_key} is not the key of the "
                                          f"certificate in {own_certs.server}")
    assert record["details"]["cert_sha256"] == kept
    assert "changed" not in record["details"]


def test_each_worker_audits_its_own_tls_reload(sec_fleet: Fleet, own_certs: DevCerts, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    gateway = GatewayProcess(write_config(sec_fleet, f"workers-{tmp_path.name}", tls=own_certs, policy=policy),
                             workers=2)
    try:
        gateway.start()
        assert gateway.proc is not None
        supervisor = gateway.proc.pid
        workers = _children(supervisor)
        assert len(workers) == 2
        gateway.proc.send_signal(signal.SIGHUP)
        records = _tls_reloads(gateway, workers, 2)
    finally:
        gateway.stop()
    assert {r["details"]["pid"] for r in records} == workers
    assert audit_log.verify(gateway.config_path.parent / "audit.log").ok


def test_a_tls_reload_the_audit_log_cannot_take_stands_and_is_logged_counted_and_noted(
    sec_fleet: Fleet, own_certs: DevCerts, tmp_path: Path
) -> None:
    """As ``policy.reload``: the reload takes effect, and the record it could not write is an ERROR
    line, a count in hsmgw_audit_write_failures_total and a note in the process's next record."""
    from tests.integration.test_cli import _immutable

    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    audit_path, port = tmp_path / "audit.log", free_port()
    config = write_config(sec_fleet, f"unaudited-{tmp_path.name}", tls=own_certs, policy=policy,
                          extra=f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n\n[admin]\naudit_log = "{audit_path}"\n')
    with running(config, env={"HSMGW_LOG_FORMAT": "json"}) as gateway:
        assert gateway.proc is not None and audit_path.exists()
        cert_pem, key_pem = issue_server(load_issuer(own_certs.ca, own_certs.ca_key))
        write_file(own_certs.server_key, key_pem, private=True)
        write_file(own_certs.server, cert_pem)
        writable = _immutable(audit_path)
        try:
            sighup_and_wait(gateway, "TLS reloaded: ")
        finally:
            writable()
        assert _served_fingerprint(gateway.target, own_certs, "payments-app") == _file_fingerprint(own_certs.server)
        entries = [json.loads(line) for line in gateway.log().splitlines() if line.startswith("{")]
        errors = [e for e in entries if e["level"] == "ERROR" and e.get("audit_event") == "tls.reload"]
        assert len(errors) == 1, errors
        assert value(scrape(port), "hsmgw_audit_write_failures_total", event="tls.reload") == 1

        sighup_and_wait(gateway, "TLS reloaded: ")  # written again: the first record notes the gap
        _tls_reloads(gateway, {gateway.proc.pid}, 1, audit_path)
    (noting,) = [r for r in audit_log.tail(audit_path, 100) if "unwritten" in r["details"]]
    assert noting["details"]["unwritten"]["actions"]["tls.reload"] == 1
    verified = audit_log.verify(audit_path)
    assert verified.ok and verified.unwritten >= 1


def _children(pid: int) -> set[int]:
    children: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:  # the field after the state: the parent's pid
            children.add(int(stat.parent.name))
    return children

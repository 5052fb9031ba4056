"""mTLS and authorization against a real gateway: who gets in, and what each identity may do.

The gateway runs as in production: ``[server.tls]`` with a client CA, and the test
policy (``helpers.POLICY``): payments-app may use keys under ``payments/``,
payments-admin may create and destroy them but not use them, nobody is named by the
policy at all.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.fleet import Fleet
from gateway.tls import DevCerts, issue_client, load_issuer, write_file
from hsmgw.v1 import admin_pb2, crypto_pb2
from hsmgw.v1 import crypto_pb2 as pb
from tests.security.helpers import (
    Client,
    audit_events,
    certificate_valid,
    details,
    sid,
    tls_channel,
    wait_for,
    write_config,
)
from tests.support import GatewayProcess, rpc_error, unique

DENIED = grpc.StatusCode.PERMISSION_DENIED
DIGEST = hashlib.sha256(b"mtls").digest()
ECDSA = pb.ALGORITHM_ECDSA_SHA256
DAY = datetime.timedelta(days=1)


def _tls_handshake(target: str, ca: Path, cert_key: tuple[Path, Path] | None, version: ssl.TLSVersion) -> str:
    """A raw TLS handshake (and one read, where TLS 1.3 reports a refused client certificate)."""
    host, port = target.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    if cert_key:
        ctx.load_cert_chain(*cert_key)
    ctx.minimum_version = ctx.maximum_version = version
    ctx.set_ciphers("ALL:@SECLEVEL=0")  # let the client offer old versions: the server must refuse them
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            # A gRPC server speaks first (HTTP/2 SETTINGS) once it accepted the client.
            if not tls.recv(9):
                raise ConnectionError("the server closed the connection")
            return str(tls.version())


# -- who gets in ---------------------------------------------------------------------------------


def test_a_client_without_a_certificate_is_refused(tls_gateway: GatewayProcess, certs: DevCerts) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _tls_handshake(tls_gateway.target, certs.ca, None, ssl.TLSVersion.TLSv1_2)
    with tls_channel(tls_gateway.target, certs, None) as channel:
        err = rpc_error(Client.of(channel).crypto.GenerateRandom, pb.GenerateRandomRequest(length=8), timeout=5)
    assert err.code() is grpc.StatusCode.UNAVAILABLE


def test_a_certificate_from_another_ca_is_refused(
    tls_gateway: GatewayProcess, certs: DevCerts, other_ca: DevCerts
) -> None:
    impostor = other_ca.client("root")  # same name as a real admin, wrong issuer
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _tls_handshake(tls_gateway.target, certs.ca, impostor, ssl.TLSVersion.TLSv1_2)
    with tls_channel(tls_gateway.target, certs, None, cert_key=impostor) as channel:
        err = rpc_error(Client.of(channel).crypto.GenerateRandom, pb.GenerateRandomRequest(length=8), timeout=5)
    assert err.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("operator_level", ["", "ERROR"])
def test_a_refused_handshake_is_in_the_gateways_log_unless_the_operator_quiets_grpc_core(
    sec_fleet: Fleet, certs: DevCerts, other_ca: DevCerts, policy_file: Path, tmp_path: Path, operator_level: str
) -> None:
    """grpcio tells Python nothing of a handshake it refuses: gRPC core logs each, at INFO, without
    the client's address. A gateway serving TLS runs core at INFO unless GRPC_VERBOSITY is set; a
    client let in leaves no line."""
    now = datetime.datetime.now(datetime.timezone.utc)
    cert_pem, key_pem = certificate_valid(load_issuer(certs.ca, certs.ca_key), now - 30 * DAY, now - DAY,
                                          name="expired-app")
    expired = tmp_path / "expired.pem", tmp_path / "expired-key.pem"
    write_file(expired[0], cert_pem)
    write_file(expired[1], key_pem, private=True)
    gateway = GatewayProcess(write_config(sec_fleet, f"deployed-{tmp_path.name}", tls=certs, policy=policy_file),
                             env={"GRPC_VERBOSITY": operator_level})
    try:
        gateway.start()
        for client in (None, other_ca.client("payments-app"), expired):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                _tls_handshake(gateway.target, certs.ca, client, ssl.TLSVersion.TLSv1_3)
        _tls_handshake(gateway.target, certs.ca, certs.client("payments-app"), ssl.TLSVersion.TLSv1_3)
    finally:
        gateway.stop()
    lines = [line for line in gateway.log().splitlines() if "Handshake failed" in line]
    if operator_level:
        assert lines == []
        return
    assert len(lines) == 3, lines  # and none for the client let in
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in lines[0]
    assert "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate" in lines[1]
    assert "CERTIFICATE_VERIFY_FAILED: certificate has expired" in lines[2]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_only_tls_1_2_and_1_3_are_spoken(tls_gateway: GatewayProcess, certs: DevCerts) -> None:
    client = certs.client("payments-app")
    assert _tls_handshake(tls_gateway.target, certs.ca, client, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    assert _tls_handshake(tls_gateway.target, certs.ca, client, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _tls_handshake(tls_gateway.target, certs.ca, client, ssl.TLSVersion.TLSv1_1)


def test_identity_is_the_certificates_uri_san(connect: Callable[[str], Client]) -> None:
    err = rpc_error(connect("nobody").crypto.GetKey, pb.GetKeyRequest(key_id="payments/x"), timeout=5)
    assert err.code() is DENIED
    assert f"identity {sid('nobody')!r}" in err.details()


def test_a_certificate_without_uri_san_is_known_by_its_common_name(
    tls_gateway: GatewayProcess, certs: DevCerts, tmp_path: Path
) -> None:
    cert_pem, key_pem = issue_client(load_issuer(certs.ca, certs.ca_key), "cn-only", uri=False)
    write_file(tmp_path / "cn.pem", cert_pem)
    write_file(tmp_path / "cn-key.pem", key_pem, private=True)
    with tls_channel(tls_gateway.target, certs, None, cert_key=(tmp_path / "cn.pem", tmp_path / "cn-key.pem")) as ch:
        stub = Client.of(ch).crypto
        assert rpc_error(stub.GetKey, pb.GetKeyRequest(key_id="payments/none"), timeout=5).code() is (
            grpc.StatusCode.NOT_FOUND  # 'cn-only' may GetKey under payments/: past authorization
        )
        err = rpc_error(stub.GetKey, pb.GetKeyRequest(key_id="hr/none"), timeout=5)
    assert err.code() is DENIED and "identity 'cn-only' may not GetKey keys under 'hr/'" in err.details()


def test_a_certificate_cannot_pass_for_another_identity_through_its_common_name_or_other_sans(
    tls_gateway: GatewayProcess, certs: DevCerts, tmp_path: Path
) -> None:
    """Only a URI SAN makes a URI identity: a CN, DNS SAN or email SAN spelled like root's
    SPIFFE id once made its holder root (admin calls, every key)."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from gateway.tls import _leaf

    issuer = load_issuer(certs.ca, certs.ca_key)
    root = sid("root")
    forgeries = {
        "cn": _leaf(issuer, root, [], ExtendedKeyUsageOID.CLIENT_AUTH, 30),
        "dns-san": _leaf(issuer, "forger", [x509.DNSName(root)], ExtendedKeyUsageOID.CLIENT_AUTH, 30),
        "email-san": _leaf(issuer, "forger", [x509.RFC822Name(root)], ExtendedKeyUsageOID.CLIENT_AUTH, 30),
    }
    for name, (cert_pem, key_pem) in forgeries.items():
        write_file(tmp_path / f"{name}.pem", cert_pem)
        write_file(tmp_path / f"{name}-key.pem", key_pem, private=True)
        pair = (tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem")
        with tls_channel(tls_gateway.target, certs, None, cert_key=pair) as ch:
            client = Client.of(ch)
            err = rpc_error(client.admin.ListClusters, admin_pb2.ListClustersRequest(), timeout=5)
            assert err.code() in (grpc.StatusCode.UNAUTHENTICATED, DENIED), (name, err.code(), err.details())
            assert root not in err.details() or err.code() is grpc.StatusCode.UNAUTHENTICATED, name


def test_the_development_identity_header_is_ignored_with_tls(connect: Callable[[str], Client]) -> None:
    err = rpc_error(
        connect("nobody").crypto.GenerateRandom, pb.GenerateRandomRequest(length=8), timeout=5,
        metadata=(("x-hsmgw-identity", sid("root")),),
    )
    assert err.code() is DENIED and sid("nobody") in err.details()


# -- what each identity may do -------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(connect: Callable[[str], Client]) -> dict[str, str]:
    admin = connect("root").crypto
    prefix = unique("mtls")
    made = {}
    for name, algorithm, namespace in (
        ("ec", pb.KEY_ALGORITHM_EC_P256, "payments"),
        ("aes", pb.KEY_ALGORITHM_AES_256, "payments"),
        ("hmac", pb.KEY_ALGORITHM_HMAC_SHA256, "payments"),
        ("hr", pb.KEY_ALGORITHM_EC_P256, "hr"),
    ):
        key_id = f"{namespace}/{prefix}/{name}"
        admin.GenerateKey(
            pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, algorithm=algorithm,
                                  replication=pb.ReplicationPolicy(copies=1)),
            timeout=30,
        )
        made[name] = key_id
    return made


def _requests(keys: dict[str, str]) -> dict[str, Any]:
    """One plausible request per CryptoService RPC, all on keys under payments/."""
    ec, aes, hmac = keys["ec"], keys["aes"], keys["hmac"]
    sign = pb.SignRequest(key_id=ec, algorithm=ECDSA, digest=DIGEST)
    return {
        "GenerateKey": pb.GenerateKeyRequest(request_id=unique("r"), key_id=f"{ec}-new",
                                             algorithm=pb.KEY_ALGORITHM_EC_P256),
        "GetKey": pb.GetKeyRequest(key_id=ec),
        "ListKeys": pb.ListKeysRequest(prefix="payments/"),
        "GetPublicKey": pb.GetPublicKeyRequest(key_id=ec),
        "DestroyKey": pb.DestroyKeyRequest(key_id=ec),
        "Sign": sign,
        "Verify": pb.VerifyRequest(key_id=ec, algorithm=ECDSA, digest=DIGEST, signature=b"\x30\x00"),
        "Encrypt": pb.EncryptRequest(key_id=aes, algorithm=pb.ALGORITHM_AES_GCM, plaintext=b"hi"),
        "Decrypt": pb.DecryptRequest(key_id=aes, algorithm=pb.ALGORITHM_AES_GCM, ciphertext=b"x" * 32, iv=b"i" * 12),
        "Mac": pb.MacRequest(key_id=hmac, algorithm=pb.ALGORITHM_HMAC_SHA256, data=b"d"),
        "VerifyMac": pb.VerifyMacRequest(key_id=hmac, algorithm=pb.ALGORITHM_HMAC_SHA256, data=b"d", mac=b"m" * 32),
        "GenerateRandom": pb.GenerateRandomRequest(length=16),
        "BatchSign": pb.BatchSignRequest(requests=[sign]),
        "SignStream": [sign],
    }


def _call(client: Client, method: str, request: Any) -> Any:
    if method == "SignStream":
        return list(client.crypto.SignStream(iter(request), timeout=10))
    return getattr(client.crypto, method)(request, timeout=10)


CRYPTO_METHODS = [m.name for m in crypto_pb2.DESCRIPTOR.services_by_name["CryptoService"].methods]


def test_every_rpc_has_a_request_here(keys: dict[str, str]) -> None:
    assert sorted(_requests(keys)) == sorted(CRYPTO_METHODS)


@pytest.mark.parametrize("method", CRYPTO_METHODS)
def test_an_identity_without_a_grant_is_denied_every_rpc(
    method: str, connect: Callable[[str], Client], keys: dict[str, str]
) -> None:
    err = rpc_error(_call, connect("nobody"), method, _requests(keys)[method])
    assert err.code() is DENIED, (method, err.code(), err.details())
    assert err.details().startswith(f"identity {sid('nobody')!r} may not ")
    info, _ = details(err)
    assert info is not None and info.reason == "PERMISSION_DENIED" and info.domain == "hsmgw"


def test_an_identity_without_an_admin_role_is_denied_admin_calls(connect: Callable[[str], Client]) -> None:
    for name in ("nobody", "payments-app", "payments-admin"):
        err = rpc_error(connect(name).admin.ListClusters, admin_pb2.ListClustersRequest(), timeout=5)
        assert err.code() is DENIED
        assert "may not call AdminService.ListClusters" in err.details()
    clusters = connect("operator").admin.ListClusters(admin_pb2.ListClustersRequest(), timeout=5).clusters
    assert len(clusters) == 3


def test_health_checks_need_a_certificate_but_no_grant(connect: Callable[[str], Client]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    response = health_pb2_grpc.HealthStub(connect("nobody").channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_granted_identities_work_and_only_as_granted(connect: Callable[[str], Client], keys: dict[str, str]) -> None:
    app, admin = connect("payments-app"), connect("payments-admin")
    new_key = f"{keys['ec']}-made-by-admin"
    made = admin.crypto.GenerateKey(
        pb.GenerateKeyRequest(request_id=new_key, key_id=new_key, algorithm=pb.KEY_ALGORITHM_EC_P256,
                              replication=pb.ReplicationPolicy(copies=1)),
        timeout=30,
    )
    assert made.key_id == new_key

    signed = app.crypto.Sign(pb.SignRequest(key_id=new_key, algorithm=ECDSA, digest=DIGEST), timeout=10)
    assert app.crypto.Verify(
        pb.VerifyRequest(key_id=new_key, algorithm=ECDSA, digest=DIGEST, signature=signed.signature), timeout=10
    ).valid
    assert app.crypto.GetPublicKey(pb.GetPublicKeyRequest(key_id=new_key), timeout=10).pem

    # The identity that creates keys does not use them, and the user does not destroy them.
    err = rpc_error(admin.crypto.Sign, pb.SignRequest(key_id=new_key, algorithm=ECDSA, digest=DIGEST), timeout=10)
    assert err.code() is DENIED and err.details() == (
        f"identity {sid('payments-admin')!r} may not Sign keys under {new_key.rsplit('/', 1)[0] + '/'!r}"
    )
    assert rpc_error(app.crypto.DestroyKey, pb.DestroyKeyRequest(key_id=new_key), timeout=10).code() is DENIED
    assert admin.crypto.DestroyKey(pb.DestroyKeyRequest(key_id=new_key), timeout=30).key_id == new_key


def test_a_key_outside_the_granted_prefix_is_denied(connect: Callable[[str], Client], keys: dict[str, str]) -> None:
    app = connect("payments-app").crypto
    hr = keys["hr"]
    err = rpc_error(app.Sign, pb.SignRequest(key_id=hr, algorithm=ECDSA, digest=DIGEST), timeout=10)
    assert err.code() is DENIED
    assert err.details() == f"identity {sid('payments-app')!r} may not Sign keys under {hr.rsplit('/', 1)[0] + '/'!r}"
    # A prefix is a string prefix: path tricks do not climb out of it, they fail validation.
    sneaky = f"payments/../{hr}"
    assert rpc_error(app.Sign, pb.SignRequest(key_id=sneaky, algorithm=ECDSA, digest=DIGEST), timeout=10).code() is (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert rpc_error(app.Sign, pb.SignRequest(key_id="paymentsX/k", algorithm=ECDSA, digest=DIGEST),
                     timeout=10).code() is DENIED


def test_list_keys_needs_a_prefix_inside_a_grant(connect: Callable[[str], Client], keys: dict[str, str]) -> None:
    admin = connect("payments-admin").crypto
    listed = admin.ListKeys(pb.ListKeysRequest(prefix=keys["ec"].rsplit("/", 1)[0] + "/"), timeout=10)
    assert {k.key_id for k in listed.keys} >= {keys["ec"], keys["aes"], keys["hmac"]}
    for prefix in ("", "pay", "secret/"):
        err = rpc_error(admin.ListKeys, pb.ListKeysRequest(prefix=prefix), timeout=10)
        assert err.code() is DENIED
        assert "ask for a prefix inside 'payments/', 'hr/'" in err.details()


def test_batch_items_outside_the_grant_are_refused_one_by_one(
    connect: Callable[[str], Client], keys: dict[str, str]
) -> None:
    app = connect("payments-app").crypto
    items = [pb.SignRequest(key_id=k, algorithm=ECDSA, digest=DIGEST, request_id=str(i))
             for i, k in enumerate([keys["ec"], keys["hr"], keys["ec"], "secret/x"])]
    results = app.BatchSign(pb.BatchSignRequest(requests=items), timeout=10).responses
    assert [r.code for r in results] == [0, DENIED.value[0], 0, DENIED.value[0]]
    assert [r.response.request_id for r in results if r.code == 0] == ["0", "2"]
    assert results[1].reason == "PERMISSION_DENIED" and "may not Sign keys under" in results[1].message


def test_a_stream_ends_with_permission_denied_at_the_first_key_outside_the_grant(
    connect: Callable[[str], Client], keys: dict[str, str]
) -> None:
    app = connect("payments-app").crypto
    items = [pb.SignRequest(key_id=k, algorithm=ECDSA, digest=DIGEST, request_id=str(i))
             for i, k in enumerate([keys["ec"], keys["ec"], keys["hr"], keys["ec"]])]
    answers = []
    with pytest.raises(grpc.RpcError) as info:
        for answer in app.SignStream(iter(items), timeout=10):
            answers.append(answer.request_id)
    assert answers == ["0", "1"]
    assert info.value.code() is DENIED
    denial, _ = details(info.value)
    assert denial is not None and denial.reason == "PERMISSION_DENIED"
    assert dict(denial.metadata) == {"operation": "Sign", "request_id": "2"}


def test_malformed_requests_are_invalid_argument_not_internal(connect: Callable[[str], Client]) -> None:
    channel = connect("payments-app").channel
    raw = channel.unary_unary("/hsmgw.v1.CryptoService/Sign")  # bytes in, bytes out
    err = rpc_error(raw, b"\x0a\x02\xff\xfe", timeout=5)  # key_id that is not UTF-8
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid hsmgw.v1.SignRequest" in err.details()
    unknown = channel.unary_unary("/hsmgw.v1.CryptoService/Nope")
    assert rpc_error(unknown, b"", timeout=5).code() is grpc.StatusCode.UNIMPLEMENTED


def test_denials_are_audited_as_json_lines(
    tls_gateway: GatewayProcess, connect: Callable[[str], Client], keys: dict[str, str]
) -> None:
    marker = unique("hr/audit")
    rpc_error(connect("payments-app").crypto.GetKey, pb.GetKeyRequest(key_id=marker), timeout=5)

    def found() -> list[dict[str, Any]]:
        return [e for e in audit_events(tls_gateway) if e.get("resource") == marker]

    (event,) = wait_for(found, what="the audit event")
    assert event["event"] == "authz.denied"
    assert event["identity"] == sid("payments-app")
    assert event["operation"] == "GetKey" and event["method"] == "GetKey"
    assert event["peer"].startswith("ipv")
    assert "may not GetKey keys under 'hr/audit/'" in event["message"]


def test_denials_land_in_the_hash_chained_audit_log(
    tls_gateway: GatewayProcess, connect: Callable[[str], Client]
) -> None:
    from gateway import audit as audit_log

    marker = unique("hr/chained")
    rpc_error(connect("payments-app").crypto.GetKey, pb.GetKeyRequest(key_id=marker), timeout=5)
    path = tls_gateway.config_path.parent / "audit.log"

    def found() -> list[dict[str, Any]]:
        return [r for r in audit_log.tail(path, 200) if r["target"] == marker] if path.exists() else []

    (record,) = wait_for(found, what="the chained audit record")
    assert record["action"] == "authz.denied" and record["outcome"] == "denied"
    assert record["actor"] == sid("payments-app")
    assert audit_log.verify(path).ok


def test_hsmctl_over_mtls_shows_a_key_by_its_id(
        tls_gateway: GatewayProcess, certs: DevCerts, connect: Callable[[str], Client]) -> None:
    """``hsmctl --key KEYFILE keys show KEY_ID``: the key id must not take the place of the
    private key file (they once shared one argparse destination)."""
    import subprocess
    import sys

    from tests.support import ROOT

    key_id = unique("payments/shown")
    connect("root").crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id,
                                                             algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=30)
    cert, key = certs.client("root")
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli.hsmctl", "--target", tls_gateway.target, "--ca", str(certs.ca),
         "--cert", str(cert), "--key", str(key), "--output", "json", "keys", "show", key_id],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["key_id"] == key_id


def _hsmctl(*args: str) -> Any:
    import subprocess
    import sys

    from tests.support import ROOT

    return subprocess.run([sys.executable, "-m", "gateway.cli.hsmctl", "--timeout", "5", *args, "clusters"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_hsmctl_says_what_to_check_when_tls_does_not_match(
        tls_gateway: GatewayProcess, certs: DevCerts, other_ca: DevCerts) -> None:
    """Each is a local mistake, told in one line with what to check (gRPC's own log lines stay out)."""
    cert, key = certs.client("root")
    _, other_key = certs.client("operator")
    cases = [
        ((), "it may require TLS with a client certificate (--ca, --cert, --key)"),
        (("--ca", str(certs.ca)), "does it accept this client certificate (--cert, --key)"),
        (("--ca", str(certs.ca), "--cert", str(cert), "--key", str(other_key)),
         "--key does not match --cert: they are not one certificate and its private key"),
        (("--ca", str(other_ca.ca), "--cert", str(cert), "--key", str(key)),
         "the gateway's certificate is not signed by the CA given (--ca)"),
    ]
    for options, says in cases:
        result = _hsmctl("--target", tls_gateway.target, *options)
        lines = result.stderr.strip().splitlines()
        # A mistake in how to connect, not an outage: exit 1 (2 tells scripts to try again later).
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert says in lines[0], (options, lines[0])

"""What the audit events say about a caller, against a real mTLS gateway: identities a
terminal could not show are refused, caller strings are clipped, and every event carries
the fields docs/security.md lists."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.auth import shown
from gateway.tls import DevCerts, _leaf, load_issuer, write_file
from hsmgw.v1 import crypto_pb2 as pb
from tests.security.helpers import Client, audit_events, sid, tls_channel
from tests.support import GatewayProcess, rpc_error, unique, wait_for

DIGEST = hashlib.sha256(b"audit fields").digest()


def _client_with(certs: DevCerts, tmp_path: Path, name: str, common_name: str,
                 sans: list[x509.GeneralName]) -> tuple[Path, Path]:
    cert_pem, key_pem = _leaf(load_issuer(certs.ca, certs.ca_key), common_name, sans,
                              ExtendedKeyUsageOID.CLIENT_AUTH, 30)
    write_file(tmp_path / f"{name}.pem", cert_pem)
    write_file(tmp_path / f"{name}-key.pem", key_pem, private=True)
    return tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem"


def _events(gateway: GatewayProcess, **match: Any) -> Callable[[], list[dict[str, Any]]]:
    return lambda: [e for e in audit_events(gateway) if all(e.get(k) == v for k, v in match.items())]


def test_an_identity_with_characters_a_terminal_would_act_on_is_refused_and_audited(
    tls_gateway: GatewayProcess, certs: DevCerts, tmp_path: Path
) -> None:
    """A CN or URI SAN with an escape sequence or a line break could recolour an operator's
    terminal or forge a row of `hsmctl audit tail`: such a certificate has no identity."""
    forgeries = {
        "cn": ("ops\x1b[31m\nFAKE", []),
        "uri": ("forger", [x509.UniformResourceIdentifier("spiffe://hsmgw/x\x1b[2J\r\nFAKE")]),
        "bidi": ("ops\u202eevil", []),
    }
    for name, (common_name, sans) in forgeries.items():
        pair = _client_with(certs, tmp_path, name, common_name, sans)
        with tls_channel(tls_gateway.target, certs, None, cert_key=pair) as channel:
            err = rpc_error(Client.of(channel).crypto.GetKey, pb.GetKeyRequest(key_id="payments/x"), timeout=5)
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED, (name, err.details())
        assert "cannot be shown" in err.details() and "\x1b" not in err.details(), name
    failed = wait_for(lambda: [e for e in _events(tls_gateway, event="authn.failed")()
                               if "cannot be shown" in e.get("error", "")], what="authn.failed events")
    assert len(failed) >= len(forgeries)
    assert not any("\x1b" in str(e) or "\n" in str(e) or "\u202e" in str(e) for e in failed)


def test_a_name_with_a_space_other_than_u0020_is_an_identity(
    tls_gateway: GatewayProcess, certs: DevCerts, tmp_path: Path
) -> None:
    """A no-break or ideographic space forges no line and no escape: a certificate whose CN has
    one authenticates as that name (and is refused only by the policy), while a line or
    paragraph separator still has no identity."""
    for name, common_name in (("nbsp", "Zoë\u00a0Ops"), ("ideographic", "運用\u3000チーム")):
        pair = _client_with(certs, tmp_path, name, common_name, [])
        marker = unique("hr/spaced")
        with tls_channel(tls_gateway.target, certs, None, cert_key=pair) as channel:
            err = rpc_error(Client.of(channel).crypto.GetKey, pb.GetKeyRequest(key_id=marker), timeout=5)
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED, (name, err.code(), err.details())
        (denied,) = wait_for(lambda marker=marker: [e for e in _events(tls_gateway, event="authz.denied")()
                                                    if e.get("resource") == marker], what="the denial")
        assert denied["identity"] == shown(common_name)  # written as before: the space escaped, as \xa0
    for name, common_name in (("line", "ops\u2028FAKE"), ("paragraph", "ops\u2029FAKE")):
        pair = _client_with(certs, tmp_path, name, common_name, [])
        with tls_channel(tls_gateway.target, certs, None, cert_key=pair) as channel:
            err = rpc_error(Client.of(channel).crypto.GetKey, pb.GetKeyRequest(key_id="payments/x"), timeout=5)
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED and "cannot be shown" in err.details(), name


def test_caller_strings_are_clipped_in_audit_events(
    tls_gateway: GatewayProcess, certs: DevCerts, tmp_path: Path
) -> None:
    """The longest identity (200 characters) is recorded whole, a resource is clipped to 200
    characters, and the message that quotes both stays short. A 3,000-character URI SAN has no
    identity: its refusal quotes none of it."""
    long_id = sid("long-")
    long_id += "a" * (200 - len(long_id))
    pair = _client_with(certs, tmp_path, "long", "long", [x509.UniformResourceIdentifier(long_id)])
    marker = unique("hr/clipped")
    with tls_channel(tls_gateway.target, certs, None, cert_key=pair) as channel:
        err = rpc_error(Client.of(channel).crypto.GetKey, pb.GetKeyRequest(key_id=marker + "/" + "k" * 500),
                        timeout=5)
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    (event,) = wait_for(lambda: [e for e in _events(tls_gateway, event="authz.denied")()
                                 if e.get("resource", "").startswith(marker)], what="the denial")
    assert event["identity"] == long_id
    assert len(event["resource"]) == 201
    assert len(event["message"]) < 400, event["message"]
    assert event["message"].startswith(f"identity {long_id[:100] + '…'!r} may not GetKey")

    longer = sid("longer-" + "b" * 3000)
    pair = _client_with(certs, tmp_path, "longer", "longer", [x509.UniformResourceIdentifier(longer)])
    with tls_channel(tls_gateway.target, certs, None, cert_key=pair) as channel:
        err = rpc_error(Client.of(channel).crypto.GetKey, pb.GetKeyRequest(key_id=marker + "/k"), timeout=5)
    said = f"the client certificate's URI SAN is {len(longer)} characters long: an identity has at most 200"
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED and err.details() == said
    (refused,) = wait_for(lambda: [e for e in _events(tls_gateway, event="authn.failed")()
                                   if e.get("error") == said], what="the refusal")
    assert "bbbb" not in json.dumps(refused)


def test_denials_name_what_was_refused(tls_gateway: GatewayProcess, connect: Callable[[str], Client]) -> None:
    """A batch's denial has a message like any other; ListKeys of every key names resource '*'."""
    app = connect("payments-app").crypto
    marker = unique("hr/batch")
    response = app.BatchSign(pb.BatchSignRequest(requests=[
        pb.SignRequest(key_id=f"{marker}/k{i}", algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=DIGEST,
                       request_id=f"r{i}") for i in range(3)]), timeout=10)
    assert all(r.reason == "PERMISSION_DENIED" for r in response.responses)
    (batch,) = wait_for(lambda: [e for e in _events(tls_gateway, event="authz.denied", method="BatchSign")()
                                 if any(r.startswith(marker) for r in e.get("resources", []))], what="batch denial")
    assert batch["message"] == (f"identity {sid('payments-app')!r} may not Sign keys under '{marker}/' "
                                "(and 2 more items)")
    assert batch["items"] == 3

    assert rpc_error(app.ListKeys, pb.ListKeysRequest(prefix=""), timeout=5).code() is grpc.StatusCode.PERMISSION_DENIED
    listed = wait_for(_events(tls_gateway, event="authz.denied", method="ListKeys", identity=sid("payments-app")),
                      what="ListKeys denial")
    assert listed[-1]["resource"] == "*"


def test_admin_grants_name_what_they_act_on(tls_gateway: GatewayProcess, connect: Callable[[str], Client]) -> None:
    from hsmgw.v1 import admin_pb2

    root = connect("root").admin
    err = rpc_error(root.ApproveChange, admin_pb2.ApproveChangeRequest(id="feedbeef"), timeout=10)
    assert err.code() is grpc.StatusCode.NOT_FOUND
    granted = wait_for(_events(tls_gateway, event="authz.granted", method="ApproveChange", resource="feedbeef"),
                       what="the grant naming the change")
    assert granted[-1]["identity"] == sid("root") and granted[-1]["authenticated_by"] == "certificate"


def test_the_gateway_and_the_clis_escape_what_cannot_be_shown_with_one_function() -> None:
    """The audit log, the gateway's log lines and hsmctl's output escape alike: two copies could drift."""
    from gateway.cli._common import shown as cli_shown

    assert cli_shown is shown
    forged = "ok\x1b[2J\u202e\r\nnext"
    assert shown(forged) == "ok\\x1b[2J\\u202e\\r\\nnext"  # one line in a log or an audit event
    assert shown(forged, lines=True) == "ok\\x1b[2J\\u202e\\r\nnext"  # a terminal keeps the line break only

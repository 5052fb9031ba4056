"""Helpers for the security tests: configs, policies, mTLS channels, status details."""

from __future__ import annotations

import datetime
import json
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway.config import TlsConfig
from gateway.fleet import Fleet
from gateway.tls import DevCerts, Issuer, load_issuer, spiffe_id, subject_alt_names, write_dev_certs, write_file
from hsmgw.v1 import admin_pb2_grpc, crypto_pb2_grpc
from tests.support import GatewayProcess, wait_for

CLIENTS = ("payments-app", "payments-admin", "nobody", "root", "operator", "throttled", "single", "fuzzer")


def sid(name: str) -> str:
    return spiffe_id(name)


POLICY = f"""\
# Test policy: the example of docs/security.md, plus identities the tests need.

[roles.payments-signer]
operations = ["Sign", "Verify", "GetKey", "GetPublicKey"]
prefixes = ["payments/"]

[roles.key-admin]
operations = ["GenerateKey", "DestroyKey", "GetKey", "ListKeys"]
prefixes = ["payments/", "hr/"]

[roles.root]
operations = ["*"]
prefixes = ["*"]
admin = ["*"]

[roles.operator]
admin = ["ListClusters"]

[roles.fuzz-use]
operations = ["Sign", "Verify", "Encrypt", "Decrypt", "Mac", "VerifyMac", "GetKey", "GetPublicKey",
              "ListKeys", "GenerateRandom"]
prefixes = ["fuzz/"]

[roles.fuzz-make]
operations = ["GenerateKey", "DestroyKey"]
prefixes = ["fuzz/new/"]

[identities."{sid('payments-app')}"]
roles = ["payments-signer"]

[identities."{sid('payments-admin')}"]
roles = ["key-admin"]

[identities."{sid('root')}"]
roles = ["root"]

[identities."{sid('operator')}"]
roles = ["operator"]

[identities."{sid('throttled')}"]
roles = ["payments-signer"]
rate = 2
burst = 3

[identities."{sid('single')}"]
roles = ["payments-signer"]
concurrency = 1

[identities."{sid('fuzzer')}"]
roles = ["fuzz-use", "fuzz-make"]

[identities."cn-only"]
roles = ["payments-signer"]

# Identities for a development server (x-hsmgw-identity on plaintext loopback).
[identities.payments-admin]
roles = ["key-admin"]

[identities.payments-app]
roles = ["payments-signer"]
"""


def write_config(
    fleet: Fleet,
    name: str,
    *,
    tls: DevCerts | None = None,
    policy: Path | None = None,
    listen: str | None = None,
    plaintext: bool | None = None,
    extra: str = "",
) -> Path:
    """A gateway config for ``fleet`` (same tokens and store) with the given security settings."""
    text = fleet.config_path.read_text()
    if plaintext is None:
        plaintext = tls is None
    assert "insecure_plaintext = true" in text
    text = text.replace("insecure_plaintext = true", f"insecure_plaintext = {str(plaintext).lower()}")
    if listen is not None:
        assert 'listen = "127.0.0.1:0"' in text
        text = text.replace('listen = "127.0.0.1:0"', f'listen = "{listen}"')
    if tls is not None:
        text += (
            f'\n[server.tls]\ncert_file = "{tls.server}"\nkey_file = "{tls.server_key}"\n'
            f'client_ca_file = "{tls.ca}"\n'
        )
    if policy is not None:
        text += f'\n[auth]\npolicy_file = "{policy}"\n'
    path = fleet.config_path.parent / f"{name}.toml"
    path.write_text(text + extra)
    return path


def tls_channel(target: str, certs: DevCerts, client: str | None, *, ca: Path | None = None,
                cert_key: tuple[Path, Path] | None = None) -> grpc.Channel:
    """An mTLS channel as ``client`` (None: no client certificate)."""
    root = (ca or certs.ca).read_bytes()
    if cert_key is None and client is not None:
        cert_key = certs.client(client)
    if cert_key is None:
        credentials = grpc.ssl_channel_credentials(root)
    else:
        cert, key = cert_key
        credentials = grpc.ssl_channel_credentials(root, key.read_bytes(), cert.read_bytes())
    return grpc.secure_channel(target, credentials)


@dataclass
class Client:
    channel: grpc.Channel
    crypto: crypto_pb2_grpc.CryptoServiceStub
    admin: admin_pb2_grpc.AdminServiceStub

    @classmethod
    def of(cls, channel: grpc.Channel) -> Client:
        return cls(channel, crypto_pb2_grpc.CryptoServiceStub(channel), admin_pb2_grpc.AdminServiceStub(channel))


def details(exc: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo | None, error_details_pb2.RetryInfo | None]:
    """The ErrorInfo and RetryInfo of a failed call (None when absent)."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    info = retry = None
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
    return info, retry


_HUMAN_AUDIT = re.compile(r" hsmgw\.audit(?: \[[^\]]*\])?: (\{.*\})$")


def audit_events(gateway: GatewayProcess) -> list[dict[str, Any]]:
    """The JSON audit events in a gateway's log."""
    events = []
    for line in gateway.log().splitlines():
        if line.startswith("{"):  # JSON log lines (the default when stderr is not a terminal)
            entry = json.loads(line)
            if entry.get("logger") == "hsmgw.audit":
                events.append(entry.get("audit") or json.loads(entry["message"]))
            continue
        human = _HUMAN_AUDIT.search(line)  # human log lines: "… hsmgw.audit [request id]: {…}"
        if human:
            events.append(json.loads(human.group(1)))
    return events


def sighup_and_wait(gateway: GatewayProcess, marker: str, timeout: float = 10.0) -> None:
    """Send SIGHUP and wait until ``marker`` appears once more in the log."""
    before = gateway.log().count(marker)
    assert gateway.proc is not None
    gateway.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: gateway.log().count(marker) > before, timeout, f"{marker!r} in the gateway log")


def certificate_valid(
    issuer: Issuer, not_before: datetime.datetime, not_after: datetime.datetime, *, ca: bool = False,
    hosts: tuple[str, ...] = ("127.0.0.1",), name: str | None = None, unparsable_san: bool = False,
) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for ``hosts`` (IPs or DNS names; or a CA called ``name``), valid from
    ``not_before`` to ``not_after``. ``unparsable_san``: its SubjectAlternativeName is DER cut short
    (cryptography raises ValueError reading the certificate's extensions)."""
    key = ec.generate_private_key(ec.SECP256R1())
    common_name = name or ("validity test CA" if ca else hosts[0])
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if ca else issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if unparsable_san:  # a SEQUENCE of 3 bytes holding a dNSName said to be 5 long
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03\x82\x05a"),
            critical=False)
    elif not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(subject_alt_names(hosts)), critical=False)
    cert = builder.sign(key if ca else issuer.key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def tls_valid(directory: Path, not_before: datetime.datetime, not_after: datetime.datetime) -> TlsConfig:
    """Server TLS settings whose certificate (``directory / "server.pem"``, issued by a dev CA in
    ``directory / "dev"``) is valid from ``not_before`` to ``not_after``."""
    certs = write_dev_certs(directory / "dev", days=36500)
    cert_pem, key_pem = certificate_valid(load_issuer(certs.ca, certs.ca_key), not_before, not_after)
    write_file(directory / "server.pem", cert_pem)
    write_file(directory / "server-key.pem", key_pem, private=True)
    return TlsConfig(cert_file=directory / "server.pem", key_file=directory / "server-key.pem",
                     client_ca_file=certs.ca)


def issuer_of(cert_pem: bytes, key_pem: bytes) -> Issuer:
    """The issuer made of a CA certificate and its key, as ``certificate_valid(..., ca=True)`` returns them."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return Issuer(x509.load_pem_x509_certificate(cert_pem), key)

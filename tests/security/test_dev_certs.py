"""``hsmgw dev certs``: a local CA, a server certificate and client certificates, keys owner-only."""

from __future__ import annotations

import ipaddress
import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support import ROOT


def _certs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli.hsmgw", "dev", "certs", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def _load(path: str | Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def test_dev_certs_make_a_ca_a_server_and_clients(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    result = _certs("--out", str(out), "--client", "payments-app", "--client", "ops", "--output", "json")
    assert result.returncode == 0, result.stderr
    made: dict[str, Any] = json.loads(result.stdout)

    ca = _load(made["ca"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = _load(made["server"]["cert_file"])
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    server.verify_directly_issued_by(ca)

    for name in ("payments-app", "ops"):
        entry = made["clients"][name]
        assert entry["identity"] == f"spiffe://hsmgw/{name}"
        cert = _load(entry["cert_file"])
        cert.verify_directly_issued_by(ca)
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://hsmgw/{name}"]
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        assert ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)

    keys = sorted(out.glob("*-key.pem"))
    assert [k.name for k in keys] == ["ca-key.pem", "client-ops-key.pem", "client-payments-app-key.pem",
                                      "server-key.pem"]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert not list(out.glob(".*")), "no temporary files left behind"


def test_dev_certs_are_idempotent_and_new_clients_join_the_same_ca(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    assert _certs("--out", str(out), "--client", "a").returncode == 0
    ca_before = (out / "ca.pem").read_bytes()
    server_before = (out / "server.pem").read_bytes()

    again = _certs("--out", str(out), "--client", "a")
    assert again.returncode == 0 and "already exist; nothing changed" in again.stdout

    more = _certs("--out", str(out), "--client", "a", "--client", "b")
    assert more.returncode == 0
    assert [line for line in more.stdout.splitlines() if line.startswith("created")] == [
        f"created {out / 'client-b.pem'}", f"created {out / 'client-b-key.pem'}"
    ]
    assert (out / "ca.pem").read_bytes() == ca_before and (out / "server.pem").read_bytes() == server_before
    _load(out / "client-b.pem").verify_directly_issued_by(_load(out / "ca.pem"))


def test_a_client_name_that_cannot_be_a_file_or_uri_is_refused(tmp_path: Path) -> None:
    result = _certs("--out", str(tmp_path / "tls"), "--client", "../evil")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: client name '../evil': use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    ]

"""hsmctl against a gateway whose certificate it refuses: each reason has its own hint, and exits 1.

A real gateway serves each crafted certificate in turn (SIGHUP). The gateway never takes an
expired certificate of its own, so the expired case is a valid certificate signed by a CA that
has expired, given to hsmctl as --ca: OpenSSL's error is the same, "certificate has expired".
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

from gateway.tls import DevCerts, issue_server, load_issuer, write_file
from tests.security.helpers import certificate_valid, issuer_of, sighup_and_wait
from tests.support import ROOT, GatewayProcess

DAY = datetime.timedelta(days=1)


def _serve(gateway: GatewayProcess, certs: DevCerts, cert_pem: bytes, key_pem: bytes) -> None:
    write_file(certs.server_key, key_pem, private=True)
    write_file(certs.server, cert_pem)
    sighup_and_wait(gateway, "TLS reloaded: ")


def _hsmctl(gateway: GatewayProcess, certs: DevCerts, ca: Path) -> tuple[int, str]:
    cert, key = certs.client("root")
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli.hsmctl", "--timeout", "5", "--target", gateway.target, "--ca", str(ca),
         "--cert", str(cert), "--key", str(key), "clusters"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return result.returncode, lines[0]


def test_a_gateway_certificate_for_other_names_is_told_naming_the_target_host(
        gateway: GatewayProcess, own_certs: DevCerts) -> None:
    _serve(gateway, own_certs, *issue_server(load_issuer(own_certs.ca, own_certs.ca_key), ["gw.example"]))
    code, line = _hsmctl(gateway, own_certs, own_certs.ca)
    assert "Hostname Verification Check failed" in line
    assert line.endswith("the gateway's certificate does not name 127.0.0.1 among its subject alternative names "
                         "(SANs): use --target with a name the certificate holds, or give the gateway a certificate "
                         "for 127.0.0.1"), line
    assert code == 1  # how hsmctl was asked to connect: trying again later changes nothing


def test_a_gateway_certificate_not_valid_yet_is_told_as_clock_skew(
        gateway: GatewayProcess, own_certs: DevCerts) -> None:
    """The gateway takes a certificate valid from up to 5 minutes ahead of its clock; a client whose
    clock is not as far ahead refuses it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    _serve(gateway, own_certs, *certificate_valid(load_issuer(own_certs.ca, own_certs.ca_key),
                                                  now + datetime.timedelta(minutes=3), now + 30 * DAY))
    code, line = _hsmctl(gateway, own_certs, own_certs.ca)
    assert "certificate is not yet valid" in line
    assert "the gateway's certificate (or a CA certificate of its chain, --ca) is not valid yet by this host's " \
           "clock: is this host's clock behind (clock skew)?" in line
    assert "not signed by the CA" not in line
    assert code == 1


def test_an_expired_certificate_in_the_gateways_chain_is_told_as_expired(
        gateway: GatewayProcess, own_certs: DevCerts, tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_pem, ca_key = certificate_valid(load_issuer(own_certs.ca, own_certs.ca_key), now - 300 * DAY, now - DAY,
                                       ca=True, name="expired CA")
    write_file(tmp_path / "expired-ca.pem", ca_pem)
    _serve(gateway, own_certs, *issue_server(issuer_of(ca_pem, ca_key)))
    code, line = _hsmctl(gateway, own_certs, tmp_path / "expired-ca.pem")
    assert "certificate has expired" in line
    assert "the gateway's certificate (or a CA certificate of its chain, --ca) has expired by this host's clock: the " \
           "gateway needs a new one (then SIGHUP); if it is new, is this host's clock ahead?" in line
    assert "not signed by the CA" not in line
    assert code == 1

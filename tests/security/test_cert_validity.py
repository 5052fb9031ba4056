"""The server certificate must be valid now; a client CA outside its validity is logged."""

from __future__ import annotations

import datetime
import logging
import re
from pathlib import Path

import pytest

from gateway.config import ConfigError, TlsConfig
from gateway.tls import NOT_BEFORE_SKEW, ServerCredentials, load_issuer, load_material, write_file
from tests.security.helpers import certificate_valid, tls_valid

NOW = datetime.datetime(2030, 6, 1, 12, 0, tzinfo=datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def test_an_expired_certificate_is_refused_naming_the_file(tmp_path: Path) -> None:
    tls = tls_valid(tmp_path, NOW - 30 * DAY, NOW - DAY)
    with pytest.raises(ConfigError, match=r"^server\.tls\.cert_file: the certificate in .*server\.pem \(\w{16}\) "
                                          r"expired at 2030-05-31T12:00:00\+00:00$"):
        load_material(tls, now=NOW)


def test_a_certificate_valid_from_a_few_minutes_ahead_is_taken_but_not_further(tmp_path: Path) -> None:
    """Clock skew between the issuing host and this one: up to NOT_BEFORE_SKEW is accepted."""
    tls = tls_valid(tmp_path, NOW + datetime.timedelta(minutes=4), NOW + 30 * DAY)
    assert NOT_BEFORE_SKEW == datetime.timedelta(minutes=5)
    assert load_material(tls, now=NOW).not_after == NOW + 30 * DAY
    with pytest.raises(ConfigError, match=r"is not valid before 2030-06-01T12:04:00\+00:00, and this host's clock "
                                          r"says 2030-06-01T11:58:00\+00:00 \(5 minutes of clock skew"):
        load_material(tls, now=NOW - datetime.timedelta(minutes=2))


def test_a_chain_with_an_expired_intermediate_is_refused_naming_it(tmp_path: Path) -> None:
    """Clients verify the whole chain the server sends: an intermediate past its validity fails
    every handshake as surely as an expired leaf."""
    tls = tls_valid(tmp_path, NOW - DAY, NOW + 30 * DAY)
    intermediate, _ = certificate_valid(load_issuer(tls.client_ca_file, tls.client_ca_file.with_name("ca-key.pem")),
                                        NOW - 30 * DAY, NOW - DAY / 2, ca=True)
    write_file(tls.cert_file, tls.cert_file.read_bytes() + intermediate)
    with pytest.raises(ConfigError, match=r"^server\.tls\.cert_file: intermediate certificate 'CN=validity test CA' "
                                          r"in .*server\.pem expired at 2030-06-01T00:00:00\+00:00$"):
        load_material(tls, now=NOW)
    assert load_material(tls, now=NOW - DAY * 3 / 4).fingerprint  # the same chain while the intermediate was valid


def test_a_reload_with_a_certificate_that_expired_keeps_the_current_one(tmp_path: Path) -> None:
    tls = tls_valid(tmp_path, NOW - DAY, NOW + DAY)
    clock = [NOW]
    credentials = ServerCredentials(tls, clock=lambda: clock[0])
    served = credentials.material.fingerprint
    clock[0] = NOW + 2 * DAY
    assert credentials.reload() is False
    assert credentials.material.fingerprint == served


def test_an_expired_client_ca_is_logged_as_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tls = tls_valid(tmp_path, NOW - DAY, NOW + 30 * DAY)
    ca_pem, _ = certificate_valid(load_issuer(tls.client_ca_file, tls.client_ca_file.with_name("ca-key.pem")),
                                  NOW - 30 * DAY, NOW - DAY, ca=True)
    write_file(tmp_path / "old-ca.pem", ca_pem)
    expired_only = TlsConfig(tls.cert_file, tls.key_file, tmp_path / "old-ca.pem")
    with caplog.at_level(logging.WARNING, logger="gateway.tls"):
        load_material(expired_only, now=NOW)  # served: the gateway's certificate is fine
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    assert caplog.records[0].getMessage().startswith(
        f"server.tls.client_ca_file: no certificate in {tmp_path / 'old-ca.pem'} is valid now "
        "('CN=validity test CA' expired at 2030-05-31T12:00:00+00:00): every client fails the handshake")

    caplog.clear()
    write_file(tmp_path / "bundle.pem", tls.client_ca_file.read_bytes() + ca_pem)
    with caplog.at_level(logging.WARNING, logger="gateway.tls"):
        load_material(TlsConfig(tls.cert_file, tls.key_file, tmp_path / "bundle.pem"), now=NOW)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "CA certificate 'CN=validity test CA' expired at" in caplog.records[0].getMessage()


def test_a_certificate_with_an_extension_that_cannot_be_parsed_is_refused_naming_the_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """cryptography raises ValueError reading such a certificate's extensions: at start-up that was a
    traceback (and workers restarted without end), on SIGHUP a dead reload thread and no "refused" line."""
    tls = tls_valid(tmp_path, NOW - DAY, NOW + 30 * DAY)
    clock = [NOW]
    credentials = ServerCredentials(tls, clock=lambda: clock[0])
    served = credentials.material.fingerprint
    cert_pem, key_pem = certificate_valid(load_issuer(tls.client_ca_file, tls.client_ca_file.with_name("ca-key.pem")),
                                          NOW - DAY, NOW + 30 * DAY, unparsable_san=True)
    write_file(tls.key_file, key_pem, private=True)
    write_file(tls.cert_file, cert_pem)
    refused = (rf"^server\.tls\.cert_file: the certificate in {re.escape(str(tls.cert_file))} \(\w{{16}}\) has an "
               r"extension that cannot be parsed \(.*subject_alternative_name.*\)$")
    with pytest.raises(ConfigError, match=refused):
        load_material(tls, now=NOW)

    caplog.clear()  # the load's INFO line, captured when an earlier test left the loggers at INFO
    with caplog.at_level(logging.ERROR, logger="gateway.tls"):
        assert credentials.reload() is False
    ((record,),) = [[r for r in caplog.records if r.name == "gateway.tls"]]
    message = record.getMessage()
    assert message.startswith(f"TLS reload refused, still serving certificate {served[:16]}: ")
    assert re.match(refused, message.split(": ", 1)[1])
    assert credentials.material.fingerprint == served

"""A certificate that expires while the gateway runs is logged and published, not found out by clients.

The checks run on an injected clock: a certificate "expires" by moving the clock, not by waiting.
A real gateway shows the certificates' expiry on /metrics.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from gateway.config import TlsConfig
from gateway.fleet import Fleet
from gateway.tls import EXPIRY_WARNING, ServerCredentials, load_issuer, write_dev_certs, write_file
from tests.moto import free_port
from tests.security.helpers import certificate_valid, tls_valid, write_config
from tests.support import GatewayProcess, scrape, value

NOW = datetime.datetime(2030, 6, 1, 12, 0, tzinfo=datetime.timezone.utc)
DAY = datetime.timedelta(days=1)
EXPIRY = "hsmgw_tls_certificate_expiry_timestamp_seconds"


def _logged(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "gateway.tls"]
    caplog.clear()
    return lines


def test_a_served_certificate_is_warned_of_before_it_expires_and_an_error_once_it_has(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tls = tls_valid(tmp_path, NOW - DAY, NOW + 30 * DAY)
    clock = [NOW]
    credentials = ServerCredentials(tls, clock=lambda: clock[0])
    fingerprint = credentials.material.fingerprint[:16]
    caplog.set_level(logging.INFO, logger="gateway.tls")
    caplog.clear()  # what the load said

    credentials.check_expiry()
    assert _logged(caplog) == []  # 30 days left

    clock[0] = NOW + 30 * DAY - EXPIRY_WARNING + datetime.timedelta(hours=1)
    credentials.check_expiry()
    assert _logged(caplog) == [("WARNING", f"server.tls.cert_file: the server certificate {fingerprint} (from "
                                           f"{tls.cert_file}) expires at 2030-07-01T12:00:00+00:00, in 13 days: put "
                                           "a new certificate in place and send SIGHUP")]

    clock[0] = NOW + 30 * DAY + datetime.timedelta(minutes=1)
    for _ in range(2):  # every check, as long as it is served
        credentials.check_expiry()
        ((level, message),) = _logged(caplog)
        assert level == "ERROR"
        assert message.startswith(f"server.tls.cert_file: the server certificate {fingerprint} (from {tls.cert_file}) "
                                  "expired at 2030-07-01T12:00:00+00:00 and is still served: every client fails the "
                                  "handshake (CERTIFICATE_VERIFY_FAILED)")


def _with_an_old_ca(tmp_path: Path) -> tuple[ServerCredentials, list[datetime.datetime], Path, bytes]:
    """Credentials whose client CA bundle holds the dev CA and an "old CA" (its PEM) that expires
    in two days; their clock (``clock[0]``), which the test moves; the bundle's path."""
    tls = tls_valid(tmp_path, NOW - DAY, NOW + 300 * DAY)
    issuer = load_issuer(tls.client_ca_file, tls.client_ca_file.with_name("ca-key.pem"))
    old, _ = certificate_valid(issuer, NOW - 300 * DAY, NOW + 2 * DAY, ca=True, name="old CA")
    bundle = tmp_path / "bundle.pem"
    write_file(bundle, tls.client_ca_file.read_bytes() + old)
    clock = [NOW]
    credentials = ServerCredentials(TlsConfig(tls.cert_file, tls.key_file, bundle), clock=lambda: clock[0])
    return credentials, clock, bundle, old


def test_a_client_ca_that_expires_while_served_is_logged_once_and_an_error_when_none_is_left(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    credentials, clock, bundle, old = _with_an_old_ca(tmp_path)
    caplog.set_level(logging.WARNING, logger="gateway.tls")
    caplog.clear()  # what the load said

    credentials.check_expiry()
    assert _logged(caplog) == [("WARNING", f"server.tls.client_ca_file: CA certificate 'CN=old CA' in {bundle} "
                                           "expires at 2030-06-03T12:00:00+00:00, in 2 days")]
    clock[0] = NOW + 3 * DAY
    credentials.check_expiry()
    assert _logged(caplog) == [("WARNING", f"server.tls.client_ca_file: CA certificate 'CN=old CA' in {bundle} "
                                           "expired at 2030-06-03T12:00:00+00:00: client certificates it signed fail "
                                           "the handshake")]
    credentials.check_expiry()
    assert _logged(caplog) == []  # an old CA kept in the bundle is said once, not every hour

    write_file(bundle, old)
    assert credentials.reload()  # a bundle of expired CAs is logged, not refused
    caplog.clear()
    for _ in range(2):
        credentials.check_expiry()
        ((level, message),) = _logged(caplog)
        assert level == "ERROR" and message.startswith(
            f"server.tls.client_ca_file: no certificate in {bundle} is valid now ('CN=old CA' expired at")


def _material_of(gateway: GatewayProcess) -> tuple[x509.Certificate, x509.Certificate]:
    text = gateway.config_path.read_text()
    server = Path(text.split('cert_file = "')[1].split('"')[0])
    ca = Path(text.split('client_ca_file = "')[1].split('"')[0])
    return x509.load_pem_x509_certificate(server.read_bytes()), x509.load_pem_x509_certificate(ca.read_bytes())


def test_a_gateway_publishes_its_certificates_expiry_and_warns_of_one_near_it(
        sec_fleet: Fleet, tmp_path: Path) -> None:
    """The alert of docs/operations.md fires on this series: a certificate 10 days from expiry."""
    certs = write_dev_certs(tmp_path / "certs", ("root",))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert_pem, key_pem = certificate_valid(load_issuer(certs.ca, certs.ca_key), now - DAY, now + 10 * DAY)
    write_file(certs.server_key, key_pem, private=True)
    write_file(certs.server, cert_pem)
    policy = tmp_path / "policy.toml"
    policy.write_text('[identities."spiffe://hsmgw/root"]\nroles = []\n')
    policy.chmod(0o600)
    port = free_port()
    config = write_config(sec_fleet, f"expiry-{tmp_path.name}", tls=certs, policy=policy,
                          extra=f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    gateway = GatewayProcess(config).start()
    try:
        server, ca = _material_of(gateway)
        samples = scrape(port)
        assert value(samples, EXPIRY, cert="server", subject="CN=127.0.0.1") == server.not_valid_after_utc.timestamp()
        assert value(samples, EXPIRY, cert="client_ca", subject=ca.subject.rfc4514_string()) == \
            ca.not_valid_after_utc.timestamp()
        assert [labels for name, labels in samples if name == EXPIRY and ("cert", "server") in labels] == [
            (("cert", "server"), ("fingerprint", server.fingerprint(hashes.SHA256()).hex()[:16]),
             ("subject", "CN=127.0.0.1"))]
        log = gateway.log()
        assert f"WARNING gateway.tls: server.tls.cert_file: the certificate in {certs.server}" in log
        assert f"expires at {server.not_valid_after_utc.isoformat()}" in log
        assert "TLS: server certificate " in log and f"client CAs from {certs.ca}" in log
    finally:
        gateway.stop()



def test_cloudwatch_gets_the_days_left_of_the_served_chain_for_its_alarm(tmp_path: Path) -> None:
    """``TlsCertificateDaysLeft`` below 14 raises ``hsmgw-<region>-tls-certificate-expiring``."""
    from gateway.cloudwatch import GatewaySampler, alarm_specs
    from gateway.metrics import GatewayMetrics
    from router.placement.sqlite import SqliteStore
    from router.router import Router, Topology

    tls = tls_valid(tmp_path, NOW - DAY, NOW + 10 * DAY)
    credentials = ServerCredentials(tls, clock=lambda: NOW)
    router = Router(Topology("us-east-1", (), {"us-east-1": ()}), {}, SqliteStore(tmp_path / "placements.db"))
    sampler = GatewaySampler(router, GatewayMetrics(router), region="us-east-1", clock=NOW.timestamp,
                             tls=lambda: credentials.material)
    (datum,) = [d for d in sampler() if d.name == "TlsCertificateDaysLeft"]
    assert (datum.value, datum.dimensions) == (10.0, (("Region", "us-east-1"),))
    (alarm,) = [a for a in alarm_specs([], ["us-east-1"]) if a.get("MetricName") == "TlsCertificateDaysLeft"]
    assert alarm["AlarmName"] == "hsmgw-us-east-1-tls-certificate-expiring"
    assert (alarm["ComparisonOperator"], alarm["Threshold"], alarm["Statistic"]) == ("LessThanThreshold", 14.0,
                                                                                       "Minimum")
    assert datum.value < alarm["Threshold"]

    assert not [a for a in alarm_specs([], ["us-east-1"], tls=False) if a.get("MetricName") == "TlsCertificateDaysLeft"]
    without = GatewaySampler(router, GatewayMetrics(router), region="us-east-1", clock=NOW.timestamp)
    assert not [d for d in without() if d.name == "TlsCertificateDaysLeft"]  # a gateway without TLS


def test_a_client_ca_near_its_expiry_is_a_warning_at_every_check_and_one_held_twice_one_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An hourly reminder while an expiring CA is in the bundle (gateway.tls's docstring and
    docs/security.md say so); the line for one that expired, once."""
    tls = tls_valid(tmp_path, NOW - DAY, NOW + 300 * DAY)
    issuer = load_issuer(tls.client_ca_file, tls.client_ca_file.with_name("ca-key.pem"))
    old, _ = certificate_valid(issuer, NOW - 300 * DAY, NOW + 2 * DAY, ca=True, name="old CA")
    bundle = tmp_path / "bundle.pem"
    write_file(bundle, tls.client_ca_file.read_bytes() + old + old)  # the same CA twice: one line a check
    clock = [NOW]
    caplog.set_level(logging.WARNING, logger="gateway.tls")
    caplog.clear()
    credentials = ServerCredentials(TlsConfig(tls.cert_file, tls.key_file, bundle), clock=lambda: clock[0])
    ((level, message),) = _logged(caplog)  # at load too, one line for the CA held twice
    assert level == "WARNING" and "CA certificate 'CN=old CA'" in message and "expires at" in message
    caplog.clear()
    for hours in range(3):
        clock[0] = NOW + datetime.timedelta(hours=hours)
        credentials.check_expiry()
        ((level, message),) = _logged(caplog)
        assert (level, message.split(", in ")[0]) == (
            "WARNING", f"server.tls.client_ca_file: CA certificate 'CN=old CA' in {bundle} expires at "
                       "2030-06-03T12:00:00+00:00")
    clock[0] = NOW + 3 * DAY
    credentials.check_expiry()
    credentials.check_expiry()
    assert [level for level, _ in _logged(caplog)] == ["WARNING"]


class _Guarded(set[str]):
    """The set of client CAs whose expiry was logged, refusing a change while its owner's lock is free."""

    def __init__(self, items: set[str], lock: Any) -> None:
        super().__init__(items)
        self.lock = lock

    def _held(self) -> None:
        assert self.lock.locked(), "changed without ServerCredentials._lock, which reload() holds to replace it"

    def add(self, item: str) -> None:
        self._held()
        super().add(item)

    def update(self, *others: Any) -> None:
        self._held()
        super().update(*others)


def test_the_check_of_client_ca_expiry_changes_what_it_logged_under_the_lock_reload_takes(tmp_path: Path) -> None:
    """check_expiry runs on the expiry thread, reload() on the SIGHUP thread: both change the set."""
    credentials, clock, bundle, old = _with_an_old_ca(tmp_path)
    credentials._expired_cas = _Guarded(credentials._expired_cas, credentials._lock)
    clock[0] = NOW + 3 * DAY
    credentials.check_expiry()
    assert len(credentials._expired_cas) == 1  # the old CA, logged


def test_a_client_ca_file_holding_a_ca_twice_publishes_one_series_for_it(tmp_path: Path) -> None:
    """Two samples with the same labels are not a valid exposition."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from gateway.metrics import TlsCollector

    tls = tls_valid(tmp_path, NOW - DAY, NOW + 30 * DAY)
    bundle = tmp_path / "bundle.pem"
    write_file(bundle, tls.client_ca_file.read_bytes() * 2)
    credentials = ServerCredentials(TlsConfig(tls.cert_file, tls.key_file, bundle), clock=lambda: NOW)
    assert len(credentials.material.client_cas) == 1  # each CA loaded once
    registry = CollectorRegistry()
    registry.register(TlsCollector(lambda: credentials.material))
    text = generate_latest(registry).decode()
    samples = [(s.labels["cert"], s.labels["subject"], s.value)
               for family in text_string_to_metric_families(text) for s in family.samples if s.name == EXPIRY]
    ca = x509.load_pem_x509_certificate(tls.client_ca_file.read_bytes())
    assert samples == [("server", "CN=127.0.0.1", (NOW + 30 * DAY).timestamp()),
                       ("client_ca", ca.subject.rfc4514_string(), ca.not_valid_after_utc.timestamp())]


def test_a_bundle_holding_its_only_ca_twice_after_it_expired_is_an_error_at_load(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every client fails the handshake: the ERROR that says so, not a WARNING about one CA of several."""
    tls = tls_valid(tmp_path, NOW - DAY, NOW + 300 * DAY)
    issuer = load_issuer(tls.client_ca_file, tls.client_ca_file.with_name("ca-key.pem"))
    old, _ = certificate_valid(issuer, NOW - 300 * DAY, NOW - DAY, ca=True, name="old CA")
    bundle = tmp_path / "bundle.pem"
    write_file(bundle, old + old)
    caplog.set_level(logging.WARNING, logger="gateway.tls")
    caplog.clear()
    ServerCredentials(TlsConfig(tls.cert_file, tls.key_file, bundle), clock=lambda: NOW)
    ((level, message),) = _logged(caplog)
    assert level == "ERROR" and message.startswith(
        f"server.tls.client_ca_file: no certificate in {bundle} is valid now ('CN=old CA' expired at"), message

"""The gateway refuses to start insecurely, with one clear line naming the setting."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from gateway.fleet import Fleet
from gateway.tls import DevCerts, load_issuer, write_file
from gateway.workers import EXIT_CONFIG
from hsmgw.v1 import crypto_pb2 as pb
from tests.security.helpers import Client, certificate_valid, tls_channel, write_config
from tests.support import ROOT, GatewayProcess, rpc_error


def _serve(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli.hsmgw", "serve", "--config", str(config), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "192.0.2.10:0"])
def test_plaintext_on_a_non_loopback_address_is_refused(sec_fleet: Fleet, listen: str) -> None:
    result = _serve(write_config(sec_fleet, "plain-public", listen=listen))
    assert result.returncode == EXIT_CONFIG  # systemd does not restart it (RestartPreventExitStatus)
    host = listen.rsplit(":", 1)[0].strip("[]")
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {sec_fleet.state_dir / 'plain-public.toml'}: server.listen: plaintext is allowed only "
        f"on a loopback address, not {host!r}"
    )


def test_no_tls_and_no_plaintext_flag_is_refused(sec_fleet: Fleet) -> None:
    result = _serve(write_config(sec_fleet, "no-tls", plaintext=False))
    assert result.returncode == EXIT_CONFIG  # systemd does not restart it (RestartPreventExitStatus)
    assert "server.insecure_plaintext: TLS is not configured" in result.stderr


def test_tls_without_a_policy_is_refused(sec_fleet: Fleet, certs: DevCerts) -> None:
    result = _serve(write_config(sec_fleet, "tls-no-policy", tls=certs))
    assert result.returncode == EXIT_CONFIG  # systemd does not restart it (RestartPreventExitStatus)
    assert "auth.policy_file: a TLS server needs an authorization policy" in result.stderr


def test_tls_and_plaintext_together_are_refused(sec_fleet: Fleet, certs: DevCerts, policy_file: Path) -> None:
    result = _serve(write_config(sec_fleet, "tls-and-plain", tls=certs, policy=policy_file, plaintext=True))
    assert result.returncode == EXIT_CONFIG  # systemd does not restart it (RestartPreventExitStatus)
    assert "server.insecure_plaintext: must be false when [server.tls] is configured" in result.stderr


def test_a_readable_tls_key_is_refused(sec_fleet: Fleet, certs: DevCerts, policy_file: Path, tmp_path: Path) -> None:
    key = tmp_path / "server-key.pem"
    key.write_bytes(certs.server_key.read_bytes())
    os.chmod(key, 0o640)
    config = write_config(sec_fleet, "tls-readable-key", tls=certs, policy=policy_file)
    config.write_text(config.read_text().replace(f'key_file = "{certs.server_key}"', f'key_file = "{key}"'))
    result = _serve(config)
    assert result.returncode == EXIT_CONFIG  # systemd does not restart it (RestartPreventExitStatus)
    assert f"server.tls.key_file: {key} is open to its group or others; run: chmod 600 {key}" in result.stderr
    assert "PRIVATE KEY" not in result.stderr + result.stdout


def test_a_bad_policy_is_refused_naming_the_key(sec_fleet: Fleet, certs: DevCerts, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[roles.app]\noperations = ["Sign"]\nprefixes = ["payments"]\n')
    result = _serve(write_config(sec_fleet, "bad-policy", tls=certs, policy=policy))
    assert result.returncode == EXIT_CONFIG  # systemd does not restart it (RestartPreventExitStatus)
    assert "roles.app.prefixes[0]: a prefix must end with '/'" in result.stderr


def test_a_tls_listener_may_bind_every_address(
    sec_fleet: Fleet, certs: DevCerts, policy_file: Path
) -> None:
    process = GatewayProcess(write_config(sec_fleet, "tls-any", tls=certs, policy=policy_file, listen="0.0.0.0:0"))
    process.start()
    try:
        with tls_channel(process.target, certs, "root") as channel:
            random = Client.of(channel).crypto.GenerateRandom(pb.GenerateRandomRequest(length=8), timeout=5)
            assert len(random.data) == 8
        # Plaintext clients get nowhere on a TLS port.
        with grpc.insecure_channel(process.target) as channel:
            err = rpc_error(Client.of(channel).crypto.GenerateRandom, pb.GenerateRandomRequest(length=8), timeout=3)
        assert err.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        process.stop()


def test_the_development_server_takes_the_identity_from_metadata(
    sec_fleet: Fleet, policy_file: Path
) -> None:
    """Plaintext on loopback with a policy: ``hsmctl --as NAME`` acts as NAME."""
    process = GatewayProcess(write_config(sec_fleet, "dev-policy", policy=policy_file)).start()
    try:
        def hsmctl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "gateway.cli.hsmctl", "--target", process.target, *args],
                capture_output=True, text=True, cwd=ROOT, timeout=60,
            )

        ok = hsmctl("--as", "payments-admin", "--output", "json", "keys", "list", "--prefix", "payments/")
        assert ok.returncode == 0, ok.stderr
        denied = hsmctl("--as", "payments-app", "keys", "list", "--prefix", "payments/")
        assert denied.returncode == 1
        assert denied.stderr.strip() == (
            "error: PERMISSION_DENIED: identity 'payments-app' may not ListKeys keys under 'payments/'"
        )
        anonymous = hsmctl("keys", "list")
        assert anonymous.returncode == 1 and "identity 'dev' may not ListKeys" in anonymous.stderr
    finally:
        process.stop()


def test_hsmctl_speaks_mtls(tls_gateway: GatewayProcess, certs: DevCerts, connect: Callable[[str], Client]) -> None:
    def hsmctl(client: str, *args: str) -> subprocess.CompletedProcess[str]:
        cert, key = certs.client(client)
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli.hsmctl", "--target", tls_gateway.target, "--ca", str(certs.ca),
             "--cert", str(cert), "--key", str(key), *args],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )

    ok = hsmctl("operator", "clusters")
    assert ok.returncode == 0, ok.stderr
    assert "use1-a" in ok.stdout
    denied = hsmctl("payments-app", "clusters")
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr


def _serving(fleet: Fleet, certs: DevCerts, policy: Path, tmp_path: Path, name: str, cert_pem: bytes,
             key_pem: bytes) -> tuple[Path, Path]:
    """A config of ``fleet`` serving TLS with this certificate and key (written under ``tmp_path``);
    the config's path and the certificate's."""
    cert, key = tmp_path / "server.pem", tmp_path / "server-key.pem"
    write_file(cert, cert_pem)
    write_file(key, key_pem, private=True)
    config = write_config(fleet, name, tls=certs, policy=policy)
    config.write_text(config.read_text().replace(f'cert_file = "{certs.server}"', f'cert_file = "{cert}"')
                      .replace(f'key_file = "{certs.server_key}"', f'key_file = "{key}"'))
    return config, cert


@pytest.mark.parametrize("days", [-1, 1], ids=["expired", "not-yet-valid"])
def test_a_certificate_outside_its_validity_is_refused_at_start(
    sec_fleet: Fleet, certs: DevCerts, policy_file: Path, tmp_path: Path, days: int
) -> None:
    """It used to serve with an ERROR line, and every client failed CERTIFICATE_VERIFY_FAILED."""
    now = datetime.datetime.now(datetime.timezone.utc)
    span = (now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)) if days < 0 else (
        now + datetime.timedelta(days=1), now + datetime.timedelta(days=30))
    cert_pem, key_pem = certificate_valid(load_issuer(certs.ca, certs.ca_key), *span)
    config, cert = _serving(sec_fleet, certs, policy_file, tmp_path, f"tls-validity-{days}", cert_pem, key_pem)
    result = _serve(config)
    assert result.returncode == EXIT_CONFIG  # systemd does not restart it (RestartPreventExitStatus)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {config}: server.tls.cert_file: the certificate in {cert} (")
    assert ("expired at" if days < 0 else "not valid before") in last
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("workers", [(), ("--workers", "1")], ids=["one-process", "workers"])
def test_a_certificate_with_an_extension_that_cannot_be_parsed_is_refused_at_start(
    sec_fleet: Fleet, certs: DevCerts, policy_file: Path, tmp_path: Path, workers: tuple[str, ...]
) -> None:
    """It was a traceback and exit status 1: under --workers, a worker restarted again and again."""
    now = datetime.datetime.now(datetime.timezone.utc)
    cert_pem, key_pem = certificate_valid(load_issuer(certs.ca, certs.ca_key), now - datetime.timedelta(days=1),
                                          now + datetime.timedelta(days=30), unparsable_san=True)
    config, cert = _serving(sec_fleet, certs, policy_file, tmp_path, f"tls-unparsable-{len(workers)}", cert_pem,
                            key_pem)
    result = _serve(config, *workers)
    assert result.returncode == EXIT_CONFIG, result.stderr  # systemd does not restart it (RestartPreventExitStatus)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {config}: server.tls.cert_file: the certificate in {cert} ("), last
    assert "has an extension that cannot be parsed" in last
    assert "Traceback" not in result.stderr

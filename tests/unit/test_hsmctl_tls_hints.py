"""hsmctl's hint for each way gRPC reports a gateway certificate it refused.

tests/security/test_hsmctl_tls.py sees these against a real gateway; an expired leaf cannot be
served by one (the gateway refuses it at load), so its message, as gRPC writes it, is here.
"""

from __future__ import annotations

import pytest

from gateway.cli.hsmctl import _hint, _target_host

PREFIX = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:34891: Tls handshake failed "
          "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
          "CERTIFICATE_VERIFY_FAILED: ")


@pytest.mark.parametrize(("reason", "says"), [
    ("certificate has expired: OK", "has expired by this host's clock"),
    ("certificate is not yet valid: OK", "is not valid yet by this host's clock: is this host's clock behind"),
    ("unable to get local issuer certificate: OK", "the gateway's certificate is not signed by the CA given (--ca)"),
])
def test_each_certificate_verification_failure_has_its_hint_and_is_a_mistake_in_how_to_connect(
        reason: str, says: str) -> None:
    hint, misconfigured = _hint(PREFIX + reason, True, False, "127.0.0.1:50051")
    assert says in hint
    assert misconfigured  # exit 1


def test_a_hostname_mismatch_names_the_host_asked_for() -> None:
    details = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.5:50051: Custom verification "
               "check failed with error: UNAUTHENTICATED: Hostname Verification Check failed.")
    hint, misconfigured = _hint(details, True, False, "dns:///gw-1.internal:50051")
    assert "does not name gw-1.internal among its subject alternative names" in hint and misconfigured


@pytest.mark.parametrize(("target", "host"), [
    ("127.0.0.1:50051", "127.0.0.1"), ("[::1]:50051", "::1"), ("gw.example", "gw.example"),
    ("dns:///gw.example:443", "gw.example"), ("::1", "::1"),
])
def test_the_host_of_a_target(target: str, host: str) -> None:
    assert _target_host(target) == host


def test_a_refused_connection_is_not_a_mistake_in_how_to_connect() -> None:
    hint, misconfigured = _hint("failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: "
                                "Connection refused", False, False, "127.0.0.1:1")
    assert "nothing listens there" in hint and not misconfigured  # exit 2: a restarting gateway does this

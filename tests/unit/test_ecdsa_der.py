"""The ECDSA signature encoding of router.pkcs11.cluster against ``cryptography`` (OpenSSL):
what the gateway signs is DER, and Verify takes a signature only in its one DER encoding.

Verify through the gateway, with signatures of every shape: tests/integration/test_algorithms.py.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from hypothesis import example, given
from hypothesis import strategies as st

from router.pkcs11.cluster import _ecdsa_der_to_raw, _ecdsa_raw_to_der

SIZES = st.sampled_from([32, 48])


@given(SIZES, st.integers(0, (1 << 384) - 1), st.integers(0, (1 << 384) - 1))
@example(32, 0, 0)
@example(32, (1 << 256) - 2, (1 << 256) - 2)  # both 32 bytes, top bit set: a leading zero in DER
@example(48, 0x7F, 1 << 383)  # r one byte long
def test_every_r_and_s_round_trip_through_the_der_encoding_openssl_writes(size: int, r: int, s: int) -> None:
    r, s = r % ((1 << (8 * size)) - 1) + 1, s % ((1 << (8 * size)) - 1) + 1
    raw = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    der = _ecdsa_raw_to_der(raw)
    assert der == encode_dss_signature(r, s)
    assert _ecdsa_der_to_raw(der, size) == raw


@given(st.binary(max_size=120), SIZES)
@example(bytes.fromhex("3008020200010202000f"), 32)  # zero-padded r and s
@example(bytes.fromhex("308106020101020101"), 32)  # long-form length
@example(bytes.fromhex("3080020101020101" "0000"), 32)  # indefinite length
@example(bytes.fromhex("3009020101020101020101"), 32)  # a third INTEGER
def test_only_the_der_encoding_of_a_signature_is_taken(der: bytes, size: int) -> None:
    raw = _ecdsa_der_to_raw(der, size)
    if raw is not None:
        r, s = int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big")
        assert der == encode_dss_signature(r, s), "taken, yet not how DER writes this (r, s)"
        assert decode_dss_signature(der) == (r, s)

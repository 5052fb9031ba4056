"""Whether an EXTERNAL key's record matches the key material it wraps.

An EXTERNAL key's placement record holds its wrapped key, its public key, its algorithm
and its usage, and nothing binds them together: the wrap (CKM_AES_KEY_WRAP_PAD) has no
associated data. Whoever can write the store, with no PIN and no key material, could copy
another key's wrapped key into a record, put a public key of their own in it, or relabel
it. So before an unwrapped private key serves (once per session and key: the session keeps
it), it is checked against the record's public key: an EC private key's signature of a fixed
challenge verifies under it; an RSA private key has its modulus and exponent.

A contradiction is ``KeyRecordMismatch``.
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pkcs11 import Attribute, Mechanism

from router.errors import KeyRecordMismatch
from router.model import Placement

_CHALLENGE = hashlib.sha256(b"hsmgw: is this the private key of the record's public key?").digest()
_PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))


def mismatch(placement: Placement, what: str) -> KeyRecordMismatch:
    """The error for a record that contradicts its key material (``what`` says how)."""
    return KeyRecordMismatch(
        f"key {placement.key_id!r}: its record does not match its wrapped key material ({what}); "
        "the placement record was altered or is corrupt, and the key is not used until an operator "
        "restores it (docs/security.md)")


def check_record(placement: Placement) -> Any:
    """The record's public key, parsed (None for a secret key); one that does not parse is refused."""
    if not placement.algorithm.is_asymmetric:
        return None
    try:
        public = serialization.load_der_public_key(placement.public_der)
    except (ValueError, UnsupportedAlgorithm):
        raise mismatch(placement, "its public key does not parse") from None
    if not isinstance(public, ec.EllipticCurvePublicKey if placement.algorithm.is_ec else rsa.RSAPublicKey):
        raise mismatch(placement, f"its public key is not a {placement.algorithm.value} key")
    return public


def check_unwrapped(obj: Any, placement: Placement, public: Any) -> None:
    """Refuse an unwrapped private key that is not the record's (``public``: ``check_record``'s)."""
    algorithm = placement.algorithm
    if algorithm.is_ec:
        # SoftHSM keeps no CKA_EC_POINT on a private key: a signature shows whose key it is.
        raw = bytes(obj.sign(_CHALLENGE, mechanism=Mechanism.ECDSA))
        half = len(raw) // 2
        signature = encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
        try:
            public.verify(signature, _CHALLENGE, _PREHASHED)
        except InvalidSignature:
            raise mismatch(placement, "its public key is not its wrapped private key's") from None
    elif algorithm.is_rsa:
        # The exponent too: a record whose public key kept the modulus with exponent 1 would
        # verify any "signature" that is the encoded message itself.
        numbers = public.public_numbers()
        modulus = int.from_bytes(bytes(obj[Attribute.MODULUS]), "big")
        exponent = int.from_bytes(bytes(obj[Attribute.PUBLIC_EXPONENT]), "big")
        if (modulus, exponent) != (numbers.n, numbers.e):
            raise mismatch(placement, "its public key is not its wrapped private key's")

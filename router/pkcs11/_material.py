"""Whether an EXTERNAL key's record matches the key material it wraps.

An EXTERNAL key's placement record holds its wrapped key, its public key, its algorithm
and its usage, and nothing binds them together: the wrap (CKM_AES_KEY_WRAP_PAD) has no
associated data. Whoever can write the store, with no PIN and no key material, could copy
another key's wrapped key into a record, put a public key of their own in it, or relabel
it. So before an unwrapped key serves (once per session and key: the session keeps it),
the record is checked against what the material itself shows:

- before unwrapping (no HSM call): the usage is one the algorithm has; an asymmetric key's
  public key is of the record's algorithm (curve, modulus size); a secret key's wrapped
  form is as long as a wrapped 256-bit key;
- after: an EC private key is on the record's curve and its signature of a fixed challenge
  verifies under the record's public key; an RSA private key has the record's public
  key's modulus and exponent.

A contradiction is ``KeyRecordMismatch``. What the material cannot show stays open
(docs/security.md): an RSA key's usage, an AES key relabelled HMAC (both are 32 random
bytes), and a record whose wrapped key and public key were both copied from another key.
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pkcs11 import Attribute, Mechanism
from pkcs11 import exceptions as p11
from pkcs11.util.ec import encode_named_curve_parameters

from router.errors import KeyRecordMismatch
from router.model import USAGES, Placement
from router.pkcs11._keys import CURVES, RSA_BITS, SECRET_KEY_BYTES

WRAPPED_SECRET_BYTES = SECRET_KEY_BYTES + 8
"""A 256-bit key wrapped with CKM_AES_KEY_WRAP_PAD: its length rounded up to 8 bytes, plus
the 8-byte integrity block (RFC 5649, section 4.1)."""

_CHALLENGE = hashlib.sha256(b"hsmgw: is this the private key of the record's public key?").digest()
_PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))


def mismatch(placement: Placement, what: str) -> KeyRecordMismatch:
    """The error for a record that contradicts its key material (``what`` says how)."""
    return KeyRecordMismatch(
        f"key {placement.key_id!r}: its record does not match its wrapped key material ({what}); "
        "the placement record was altered or is corrupt, and the key is not used until an operator "
        "restores it (docs/security.md)")


def check_record(placement: Placement) -> Any:
    """Refuse a record that contradicts itself; the parsed public key of an asymmetric one, else None."""
    algorithm = placement.algorithm
    if placement.usage not in USAGES[algorithm]:
        raise mismatch(placement, f"a {algorithm.value} key cannot have usage {placement.usage.value}")
    if not algorithm.is_asymmetric:
        if len(placement.wrapped) != WRAPPED_SECRET_BYTES:
            raise mismatch(placement, f"the wrapped key is {len(placement.wrapped)} bytes; a wrapped "
                                      f"{algorithm.value} key is {WRAPPED_SECRET_BYTES}")
        return None
    try:
        public = serialization.load_der_public_key(placement.public_der)
    except (ValueError, UnsupportedAlgorithm):
        raise mismatch(placement, "its public key does not parse") from None
    if algorithm.is_ec:
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != CURVES[algorithm]:
            raise mismatch(placement, f"its public key is not a {algorithm.value} key")
    elif not isinstance(public, rsa.RSAPublicKey) or public.key_size != RSA_BITS[algorithm]:
        raise mismatch(placement, f"its public key is not a {algorithm.value} key")
    return public


def check_unwrapped(obj: Any, placement: Placement, public: Any) -> None:
    """Refuse an unwrapped private key that is not the record's (``public``: ``check_record``'s)."""
    algorithm = placement.algorithm
    if algorithm.is_ec:
        # SoftHSM keeps no CKA_EC_POINT on a private key: a signature shows whose key it is.
        if bytes(obj[Attribute.EC_PARAMS]) != encode_named_curve_parameters(CURVES[algorithm]):
            raise mismatch(placement, f"the wrapped key is not a {algorithm.value} key")
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
        try:
            exponent = int.from_bytes(bytes(obj[Attribute.PUBLIC_EXPONENT]), "big")
        except p11.PKCS11Error:
            # Optional on a private key (PKCS #11 2.40): a module that keeps none leaves the
            # modulus, and the public key's exponent as cryptography accepted it (odd, >= 3).
            exponent = numbers.e
        if (modulus, exponent) != (numbers.n, numbers.e):
            raise mismatch(placement, "its public key is not its wrapped private key's")

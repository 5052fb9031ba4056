"""RSA-OAEP with SHA-256 and MGF1-SHA-256 (RFC 8017, section 7.1), for modules
that lack it: SoftHSM 2.6 does CKM_RSA_PKCS_OAEP only with SHA-1.

The RSA operation itself still runs in the HSM (CKM_RSA_X_509); only the
padding is done here. Decoding reports every failure the same way (``None``)
so a caller cannot tell which check failed.
"""

from __future__ import annotations

import hashlib
import hmac
import os

HASH_LEN = 32
_EMPTY_LABEL_HASH = hashlib.sha256(b"").digest()


def max_message(modulus_bytes: int) -> int:
    return modulus_bytes - 2 * HASH_LEN - 2


def _mgf1(seed: bytes, length: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def encode(message: bytes, modulus_bytes: int) -> bytes:
    k = modulus_bytes
    if len(message) > max_message(k):
        raise ValueError("message too long")
    db = _EMPTY_LABEL_HASH + b"\x00" * (k - len(message) - 2 * HASH_LEN - 2) + b"\x01" + message
    seed = os.urandom(HASH_LEN)
    masked_db = _xor(db, _mgf1(seed, k - HASH_LEN - 1))
    masked_seed = _xor(seed, _mgf1(masked_db, HASH_LEN))
    return b"\x00" + masked_seed + masked_db


def decode(encoded: bytes, modulus_bytes: int) -> bytes | None:
    k = modulus_bytes
    if len(encoded) > k or k < 2 * HASH_LEN + 2:
        return None
    encoded = encoded.rjust(k, b"\x00")  # raw RSA output may drop leading zeros
    masked_seed, masked_db = encoded[1 : 1 + HASH_LEN], encoded[1 + HASH_LEN :]
    seed = _xor(masked_seed, _mgf1(masked_db, HASH_LEN))
    db = _xor(masked_db, _mgf1(seed, k - HASH_LEN - 1))
    label_ok = hmac.compare_digest(db[:HASH_LEN], _EMPTY_LABEL_HASH)
    rest = db[HASH_LEN:]
    separator = -1
    padding_ok = True
    for index, byte in enumerate(rest):
        if separator < 0:
            if byte == 1:
                separator = index
            elif byte != 0:
                padding_ok = False
    if encoded[0] != 0 or not label_ok or not padding_ok or separator < 0:
        return None
    return rest[separator + 1 :]

"""Checks on caller input that do not need an HSM.

Every check raises ``InvalidArgument`` naming the field, so a caller learns
exactly what to fix.
"""

from __future__ import annotations

import re

from router.errors import InvalidArgument, WrongKeyUsage
from router.model import OPERATION_KEYS, USAGES, KeyAlgorithm, KeyUsage, Operation, Placement

MAX_KEY_ID_LENGTH = 128
MAX_PAYLOAD = 64 * 1024
GCM_TAG_BYTES = 16
"""An AES_GCM ciphertext is the encrypted plaintext and this tag: one of a MAX_PAYLOAD plaintext is longer."""
MAX_RANDOM = 1024
MAX_BATCH = 1000
"""Sign requests in one BatchSign call."""

# Letters, digits and . _ - / : ; starts with a letter or digit; no "..", no "//".
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")


def is_key_id(value: str) -> bool:
    """Whether ``value`` is a well-formed key id (``key_id`` says what is wrong with one that is not)."""
    try:
        key_id(value)
    except InvalidArgument:
        return False
    return True


def key_id(value: str) -> str:
    if not value:
        raise InvalidArgument("key_id is required")
    if len(value) > MAX_KEY_ID_LENGTH:
        raise InvalidArgument(f"key_id is longer than {MAX_KEY_ID_LENGTH} characters")
    if not _KEY_ID.fullmatch(value) or ".." in value or "//" in value or value.endswith("/"):
        raise InvalidArgument(
            "key_id may contain only letters, digits and . _ - / :, must start with a "
            "letter or digit, and may not contain '..' or '//' or end with '/'"
        )
    return value


def key_prefix(value: str) -> str:
    """A ListKeys ``prefix``: empty (every key), or the start of some well-formed key id. One
    that no key id could start with is a mistake (a typo, a path with ".."), not an empty listing."""
    if len(value) > MAX_KEY_ID_LENGTH:
        raise InvalidArgument(f"prefix is longer than {MAX_KEY_ID_LENGTH} characters, the longest a key id is")
    # One that is not a key id itself may still start one when all it lacks is an end: it
    # ends with "/". Then it is one with a character more.
    if value and not (is_key_id(value) or is_key_id(value + "0")):
        raise InvalidArgument(
            "prefix must be the start of a key id: letters, digits and . _ - / :, starting with a "
            "letter or digit, without '..' or '//'"
        )
    return value


def request_id(value: str) -> str:
    if not value:
        raise InvalidArgument("request_id is required (an idempotency token of your choice)")
    if len(value) > 128 or not value.isprintable():
        raise InvalidArgument("request_id must be 1 to 128 printable characters")
    return value


def payload(name: str, value: bytes, *, required: bool = True, limit: int = MAX_PAYLOAD) -> bytes:
    if required and not value:
        raise InvalidArgument(f"{name} is required")
    if len(value) > limit:
        raise InvalidArgument(f"{name} is {len(value)} bytes; the limit is {limit}")
    return value


def usage_for(algorithm: KeyAlgorithm, usage: KeyUsage | None) -> KeyUsage:
    """The usage to create a key with: the requested one if the algorithm allows it."""
    allowed = USAGES[algorithm]
    if usage is None:
        return allowed[0]
    if usage not in allowed:
        names = ", ".join(u.value for u in allowed)
        raise InvalidArgument(f"a {algorithm.value} key supports usage {names}, not {usage.value}")
    return usage


SIGNATURE_OPS = frozenset(op for op in Operation if op.digest_size)
CIPHER_OPS = frozenset({Operation.RSA_OAEP_SHA256, Operation.AES_GCM})
MAC_OPS = frozenset({Operation.HMAC_SHA256})


def operation_kind(operation: Operation, allowed: frozenset[Operation], rpc: str) -> None:
    """Refuse an algorithm the RPC does not perform (AES_GCM for Sign…)."""
    if operation not in allowed:
        names = ", ".join(sorted(op.value for op in allowed))
        raise InvalidArgument(f"{rpc} does not do {operation.value}; use one of {names}")


def operation_fits(placement: Placement, operation: Operation) -> None:
    """Refuse an operation the key was not created for (FAILED_PRECONDITION)."""
    usage, algorithms = OPERATION_KEYS[operation]
    if placement.usage is not usage or placement.algorithm not in algorithms:
        raise WrongKeyUsage(
            f"key {placement.key_id!r} is {placement.algorithm.value} for "
            f"{placement.usage.value}; {operation.value} needs "
            f"{' or '.join(a.value for a in algorithms)} for {usage.value}"
        )

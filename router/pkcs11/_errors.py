"""The one place where PKCS #11 errors become router errors.

The most specific match wins; every translation keeps the original as
``__cause__`` (``raise … from exc``) for the log, while the message shown to
callers names only the cluster and what went wrong.
"""

from __future__ import annotations

import re
from typing import Any

from pkcs11 import exceptions as p11

from router.errors import (
    ClusterDown,
    DecryptionFailed,
    InternalError,
    InvalidArgument,
    KeyNotFound,
    RouterError,
    StaleSession,
    Throttled,
    WrongKeyUsage,
)
from router.model import Operation

_CLUSTER_DOWN = (
    p11.DeviceError,
    p11.DeviceRemoved,
    p11.DeviceMemory,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.SlotIDInvalid,
)
_STALE = (
    p11.SessionHandleInvalid,
    p11.SessionClosed,
    p11.OperationActive,
    p11.ObjectHandleInvalid,
    p11.KeyHandleInvalid,
    p11.UserNotLoggedIn,
)
_THROTTLED = (p11.FunctionFailed, p11.SessionCount, p11.HostMemory)
_BAD_INPUT = (
    p11.DataLenRange,
    p11.DataInvalid,
    p11.SignatureLenRange,
    p11.MechanismParamInvalid,
    p11.ArgumentsBad,
)
_BAD_CIPHERTEXT = (p11.EncryptedDataInvalid, p11.EncryptedDataLenRange)
_WRONG_KEY = (p11.KeyTypeInconsistent, p11.MechanismInvalid)
# Errors that mean the session itself is gone or unusable (reopen it), as opposed to a
# stale object handle (forget the cached handle) or a lost login (log in again). A session
# checked out by one request has no operation of its own in progress: CKR_OPERATION_ACTIVE
# means an earlier one was left unfinished, and closing the session is what ends it.
SESSION_GONE = (p11.SessionHandleInvalid, p11.SessionClosed, p11.OperationActive)
LOGGED_OUT = (p11.UserNotLoggedIn,)


# python-pkcs11 names whose CKR constant is not the plain UPPER_SNAKE of the class name.
_CKR_OVERRIDES = {
    "AnotherUserAlreadyLoggedIn": "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
    "FunctionCancelled": "CKR_FUNCTION_CANCELED",
    "TokenNotRecognised": "CKR_TOKEN_NOT_RECOGNIZED",
}
# Raised by python-pkcs11 itself (a search found nothing or too much), not by the module.
_NOT_CKR = frozenset({"NoSuchKey", "NoSuchToken", "MultipleObjectsReturned", "MultipleTokensReturned"})
_WORD = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def ckr_name(exc_type: type[BaseException]) -> str:
    """``CKR_DEVICE_ERROR`` for python-pkcs11's ``DeviceError`` (its own errors keep their names)."""
    name = exc_type.__name__
    if name in _CKR_OVERRIDES:
        return _CKR_OVERRIDES[name]
    if name in _NOT_CKR or name == "PKCS11Error":
        return name
    return "CKR_" + _WORD.sub("_", name).upper()


def ckr_behind(error: BaseException) -> str:
    """The CKR name of the PKCS #11 error ``error`` was raised from (through any chain of
    ``raise … from``), or ``""`` when no HSM error lies behind it (a timeout, a refusal of our own)."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, p11.PKCS11Error):
        cause = cause.__cause__
    return "" if cause is None else ckr_name(type(cause))


def translate(
    exc: Exception, *, cluster: str, region: str, op: Operation | None = None, decrypting: bool = False
) -> RouterError:
    """The router error for a PKCS #11 failure on ``cluster``."""
    where: dict[str, Any] = {"cluster": cluster, "region": region}
    if isinstance(exc, RouterError):
        return exc
    if isinstance(exc, p11.NoSuchKey):
        return KeyNotFound("key material is missing on the cluster", **where)
    if decrypting and op is Operation.AES_GCM and isinstance(exc, (*_BAD_CIPHERTEXT, p11.GeneralError)):
        # SoftHSM answers a failed GCM tag check with CKR_GENERAL_ERROR; the
        # request, not the cluster, is at fault.
        return DecryptionFailed("decryption failed: ciphertext, iv or aad do not authenticate", **where)
    if isinstance(exc, _BAD_CIPHERTEXT):
        return DecryptionFailed("decryption failed: the ciphertext is not valid for this key", **where)
    if isinstance(exc, _CLUSTER_DOWN):
        return ClusterDown(f"cluster {cluster} is not reachable ({type(exc).__name__})", **where)
    if isinstance(exc, p11.GeneralError):
        # The HSM's own failure, not the caller's nor ours (SoftHSM answers it
        # for a token file left half-written by a killed process): treat it as
        # a cluster fault, so it is retried, failed over or reported UNAVAILABLE.
        return ClusterDown(f"cluster {cluster} reported a general error", **where)
    if isinstance(exc, _STALE):
        return StaleSession(f"session on cluster {cluster} is no longer valid", **where)
    if isinstance(exc, _THROTTLED):
        return Throttled(f"cluster {cluster} is busy", **where)
    if isinstance(exc, _BAD_INPUT):
        return InvalidArgument(f"the HSM rejected the input ({type(exc).__name__})", **where)
    if isinstance(exc, _WRONG_KEY):
        return WrongKeyUsage("the key does not permit this operation", **where)
    return InternalError(f"unexpected PKCS #11 error on cluster {cluster}", **where)

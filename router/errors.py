"""The router's error tree.

Every failure the router reports is one of these; the gateway maps each class
to one gRPC status in a single table (``gateway.status``). Foreign errors
(PKCS #11 return values) are translated in one place, ``router.pkcs11._errors``.

    RouterError
    ├── InvalidArgument        caller sent malformed input          (no retry)
    │   └── DecryptionFailed   ciphertext/tag/AAD do not authenticate
    ├── KeyNotFound            no such key id                        (no retry)
    ├── FailedPrecondition     key exists but cannot do this         (no retry)
    │   ├── WrongKeyUsage      operation does not match the key
    │   ├── RequestConflict    request_id reused with other parameters
    │   ├── KeyChanged         the key's record is not the one a planned change was made for
    │   ├── OtherFleet         the cluster's token holds another placement store's keys
    │   ├── ForeignObjects     objects under the key's id on a cluster are not the key's
    │   └── KeyRecordMismatch  an EXTERNAL key's record does not match its wrapped key material
    │       └── WrappedKeyRefused  a cluster that answers does not unwrap it (fails over)
    ├── AlreadyExists          key id taken (or destroyed: ids are not reused)
    ├── ResourceExhausted      clusters full, limits reached
    │   ├── Throttled          the HSM said it is busy (CKR_FUNCTION_FAILED…)
    │   └── SessionsBusy       no session of the cluster's pool came free in time (fails over)
    ├── Unavailable            no healthy cluster can serve the request
    │   ├── ClusterDown        device error/removed, token gone, timeouts
    │   ├── KeyOutOfReach      the clusters asked lack the key; one that may hold it could not answer
    │   ├── KeyBeingCreated    the key's creation is under way (in this region): retry here shortly
    │   ├── StaleSession       session/object handle invalid, logged out, operation left open
    │   ├── Stopping           the gateway is stopping: the cluster's sessions are closed (no failover)
    │   └── AuditUnavailable   the gateway's audit log cannot record the grant: nothing ran (try another gateway)
    ├── DeadlineExceeded       the caller's deadline passed
    └── InternalError          a bug; details are logged, never returned
        └── AmbiguousKey       a cluster holds two objects of a class for one key (fails over)

Messages are safe to show to callers: they never contain PINs, key material or
internal addresses. ``reason`` is a stable machine-readable code.
"""

from __future__ import annotations


class RouterError(Exception):
    """Base of every error the router raises on purpose."""

    reason = "INTERNAL"
    retryable = False

    def __init__(self, message: str, *, cluster: str = "", region: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.cluster = cluster
        self.region = region


class InvalidArgument(RouterError):
    reason = "INVALID_ARGUMENT"


class DecryptionFailed(InvalidArgument):
    reason = "DECRYPTION_FAILED"


class KeyNotFound(RouterError):
    reason = "KEY_NOT_FOUND"


class FailedPrecondition(RouterError):
    reason = "FAILED_PRECONDITION"


class WrongKeyUsage(FailedPrecondition):
    reason = "WRONG_KEY_USAGE"


class RequestConflict(FailedPrecondition):
    reason = "REQUEST_ID_CONFLICT"


class KeyChanged(FailedPrecondition):
    reason = "KEY_CHANGED"


class OtherFleet(FailedPrecondition):
    """The token's fleet marker lists other placement stores' fleets, not this one's: a key
    written there would make the token this store's too, and its reconcile would then act
    on that store's records against the other's keys."""

    reason = "OTHER_FLEET"

    def __init__(self, message: str, *, fleets: tuple[str, ...] = (), cluster: str = "", region: str = "") -> None:
        super().__init__(message, cluster=cluster, region=region)
        self.fleets = fleets


class ForeignObjects(FailedPrecondition):
    """Objects under a key's id on a cluster its record does not name, that are not the key's
    (other key material, or objects that cannot be compared with it): another application's
    key, or one made with another placement store. A copy of the key there would destroy them
    first, as it does an earlier copy's leftovers: it is refused, nothing destroyed."""

    reason = "FOREIGN_OBJECTS"


class KeyRecordMismatch(FailedPrecondition):
    """An EXTERNAL key's placement record contradicts the key material it wraps: its public key
    is not the wrapped private key's, or its algorithm or usage is not one that material can
    have. Someone altered the record in the store, or it is corrupt: no retry and no replica
    helps (every cluster unwraps the same record), an operator restores the record."""

    reason = "KEY_RECORD_MISMATCH"


class WrappedKeyRefused(KeyRecordMismatch):
    """A cluster that answers otherwise refused to unwrap an EXTERNAL key's wrapped key: the
    record was altered or is corrupt, or that cluster's wrapping key is not the one the key was
    wrapped under. The record's fault, not the cluster's health: other clusters are asked, and
    no circuit opens for it."""


class KeyCreationElsewhere(FailedPrecondition):
    """This gateway does not make new keys ([gateway] creates_keys = false): another region does."""

    reason = "KEY_CREATION_ELSEWHERE"


class AlreadyExists(RouterError):
    reason = "KEY_EXISTS"


class ResourceExhausted(RouterError):
    reason = "RESOURCE_EXHAUSTED"
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        cluster: str = "",
        region: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, cluster=cluster, region=region)
        self.retry_after = retry_after


class Unavailable(RouterError):
    reason = "UNAVAILABLE"
    retryable = True


class Throttled(ResourceExhausted):
    reason = "HSM_BUSY"


class SessionsBusy(ResourceExhausted):
    """Every session this process keeps for the cluster stayed checked out: load, or
    calls the HSM does not answer. Says nothing of the HSM's own health; another
    cluster may have sessions free."""

    reason = "SESSIONS_BUSY"


class ClusterDown(Unavailable):
    reason = "CLUSTER_DOWN"


class KeyOutOfReach(Unavailable):
    """The clusters asked lack the key's material, and another that may hold it (down, its
    circuit open, throttled) could not be asked: not "no such key"."""

    reason = "KEY_OUT_OF_REACH"


class KeyBeingCreated(Unavailable):
    """A creation of the key is under way: its GenerateKey answers soon, and the key serves
    once it has. Says nothing of any cluster's health, so no reason to try another region
    (which learns of the creation from this one)."""

    reason = "KEY_BEING_CREATED"
    # gRPC's own retries (deploy/grpc-service-config.json) make at most 5 attempts and wait
    # this long between them: four waits cover most of GenerateKey's 10 s, which an RSA_4096
    # key with its copies can take on a real HSM.
    retry_after = 2.0


class StaleSession(Unavailable):
    """The session or a cached handle is no longer valid; reopen and retry."""

    reason = "STALE_SESSION"


class Stopping(Unavailable):
    """The gateway is stopping and has closed the cluster's sessions: a call still running
    (one the stop cut off) gets no new session or login. Says nothing of the cluster's
    health, and no other cluster of this gateway serves either: never failed over."""

    reason = "GATEWAY_STOPPING"


class AuditUnavailable(Unavailable):
    """The gateway refused a call whose grant must be audited before it runs (GenerateKey,
    DestroyKey, an admin change): its audit log cannot be written, or did not sync the record.
    Nothing ran, so another gateway, with a log of its own, may serve it: a client sends even a
    key creation there."""

    reason = "AUDIT_UNAVAILABLE"


class DeadlineExceeded(RouterError):
    reason = "DEADLINE_EXCEEDED"


class InternalError(RouterError):
    reason = "INTERNAL"


class AmbiguousKey(InternalError):
    """A cluster holds more than one object of a kind for one key id: which is the key's is not
    for the gateway to guess. The dispatcher tries the key's other clusters; an operator removes
    the stray object (the message names the cluster, the key and the class)."""

    reason = "KEY_AMBIGUOUS"

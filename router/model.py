"""Domain model: key algorithms, operations, usages, placements, clusters.

The enums mirror ``hsmgw.v1`` (without the protobuf prefixes) but the router
never imports generated code; the gateway converts at its edge.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class KeyAlgorithm(enum.Enum):
    EC_P256 = "EC_P256"
    EC_P384 = "EC_P384"
    RSA_2048 = "RSA_2048"
    RSA_3072 = "RSA_3072"
    RSA_4096 = "RSA_4096"
    AES_256 = "AES_256"
    HMAC_SHA256 = "HMAC_SHA256"

    @property
    def is_asymmetric(self) -> bool:
        return self in _ASYMMETRIC

    @property
    def is_ec(self) -> bool:
        return self in (KeyAlgorithm.EC_P256, KeyAlgorithm.EC_P384)

    @property
    def is_rsa(self) -> bool:
        return self in (KeyAlgorithm.RSA_2048, KeyAlgorithm.RSA_3072, KeyAlgorithm.RSA_4096)


_ASYMMETRIC = frozenset(
    {
        KeyAlgorithm.EC_P256,
        KeyAlgorithm.EC_P384,
        KeyAlgorithm.RSA_2048,
        KeyAlgorithm.RSA_3072,
        KeyAlgorithm.RSA_4096,
    }
)


class KeyUsage(enum.Enum):
    SIGN_VERIFY = "SIGN_VERIFY"
    ENCRYPT_DECRYPT = "ENCRYPT_DECRYPT"
    MAC = "MAC"


class Operation(enum.Enum):
    """An algorithm applied with a key (the API's ``Algorithm``)."""

    ECDSA_SHA256 = "ECDSA_SHA256"
    ECDSA_SHA384 = "ECDSA_SHA384"
    RSA_PKCS1_SHA256 = "RSA_PKCS1_SHA256"
    RSA_PSS_SHA256 = "RSA_PSS_SHA256"
    RSA_OAEP_SHA256 = "RSA_OAEP_SHA256"
    AES_GCM = "AES_GCM"
    HMAC_SHA256 = "HMAC_SHA256"

    @property
    def digest_size(self) -> int:
        """Length of the digest a Sign/Verify request carries (0: not a signature)."""
        return _DIGEST_SIZE.get(self, 0)

    @property
    def hash_name(self) -> str:
        return "sha384" if self is Operation.ECDSA_SHA384 else "sha256"


_DIGEST_SIZE = {
    Operation.ECDSA_SHA256: 32,
    Operation.ECDSA_SHA384: 48,
    Operation.RSA_PKCS1_SHA256: 32,
    Operation.RSA_PSS_SHA256: 32,
}


class KeyState(enum.Enum):
    CREATING = "CREATING"
    ENABLED = "ENABLED"
    UNDER_REPLICATED = "UNDER_REPLICATED"
    DESTROYED = "DESTROYED"


class KeyStorage(enum.Enum):
    TOKEN = "TOKEN"
    EXTERNAL = "EXTERNAL"


# Which usages each key algorithm supports; the first is the default.
USAGES: dict[KeyAlgorithm, tuple[KeyUsage, ...]] = {
    KeyAlgorithm.EC_P256: (KeyUsage.SIGN_VERIFY,),
    KeyAlgorithm.EC_P384: (KeyUsage.SIGN_VERIFY,),
    KeyAlgorithm.RSA_2048: (KeyUsage.SIGN_VERIFY, KeyUsage.ENCRYPT_DECRYPT),
    KeyAlgorithm.RSA_3072: (KeyUsage.SIGN_VERIFY, KeyUsage.ENCRYPT_DECRYPT),
    KeyAlgorithm.RSA_4096: (KeyUsage.SIGN_VERIFY, KeyUsage.ENCRYPT_DECRYPT),
    KeyAlgorithm.AES_256: (KeyUsage.ENCRYPT_DECRYPT,),
    KeyAlgorithm.HMAC_SHA256: (KeyUsage.MAC,),
}

_RSA = (KeyAlgorithm.RSA_2048, KeyAlgorithm.RSA_3072, KeyAlgorithm.RSA_4096)

# Which (key algorithm, usage) pairs each operation works with. ECDSA curves are
# paired with their own hash, as AWS KMS and CNSA do.
OPERATION_KEYS: dict[Operation, tuple[KeyUsage, tuple[KeyAlgorithm, ...]]] = {
    Operation.ECDSA_SHA256: (KeyUsage.SIGN_VERIFY, (KeyAlgorithm.EC_P256,)),
    Operation.ECDSA_SHA384: (KeyUsage.SIGN_VERIFY, (KeyAlgorithm.EC_P384,)),
    Operation.RSA_PKCS1_SHA256: (KeyUsage.SIGN_VERIFY, _RSA),
    Operation.RSA_PSS_SHA256: (KeyUsage.SIGN_VERIFY, _RSA),
    Operation.RSA_OAEP_SHA256: (KeyUsage.ENCRYPT_DECRYPT, _RSA),
    Operation.AES_GCM: (KeyUsage.ENCRYPT_DECRYPT, (KeyAlgorithm.AES_256,)),
    Operation.HMAC_SHA256: (KeyUsage.MAC, (KeyAlgorithm.HMAC_SHA256,)),
}


@dataclass(frozen=True)
class ClusterSpec:
    """One HSM cluster: a PKCS #11 token found by its label."""

    name: str
    """Stable cluster name used in placements (``use1-a``)."""
    region: str
    """Region the cluster lives in (``us-east-1``)."""
    token_label: str
    """CKA_LABEL of the token (slot ids change; labels do not). Each cluster names a token of its own."""
    max_keys: int = 3300
    """Keys placement may put on this cluster (CloudHSM hsm1 quota: 3,300)."""
    pool_size: int = 4
    """PKCS #11 sessions kept open for requests, besides the login session."""
    unwrapped_cache: int = 256
    """EXTERNAL keys kept unwrapped (as session objects) on this cluster, LRU."""
    call_timeout: float = 2.0
    """Seconds a request's PKCS #11 call may run, and a request may wait for a session, before
    the cluster counts as hung: the wait gives up and the request goes to a replica, and while
    any call runs past this its circuit stays open. Key creation, copies and scans may run to
    their caller's deadline."""
    serialize_object_changes: bool = True
    """Keep searches and changes (creations, copies, destructions) of the token's objects apart,
    within a process and across the gateway's processes on a host. SoftHSM 2.6 loses or
    duplicates objects without it; a module known to be safe may turn it off for faster
    concurrent key creation. Calls that use a key are never held up by it."""


@dataclass(frozen=True)
class ReplicationPolicy:
    """How many clusters must hold a key before it is acknowledged."""

    copies: int = 2
    """Clusters holding each key, the primary included."""
    require_dr_copy: bool = True
    """At least one copy in a DR region."""
    min_copies: int = 1
    """Fewest copies a caller may ask a TOKEN key to have."""
    ack_local: bool = False
    """When the policy cannot be met at creation: acknowledge with the copies made
    (the key is UNDER_REPLICATED until the repairer finishes) instead of failing."""


@dataclass(frozen=True)
class KeySpec:
    """What a caller asked for when creating a key."""

    key_id: str
    algorithm: KeyAlgorithm
    usage: KeyUsage
    request_id: str
    copies: int = 0
    """Clusters that must hold the key; 0 = the gateway's replication policy."""
    storage: KeyStorage = KeyStorage.TOKEN
    extractable: bool = True
    """False: the key never leaves its HSM, not even wrapped (and cannot be replicated)."""

    def fingerprint(self) -> str:
        """Parameters that must match when a ``request_id`` is retried."""
        return "|".join(
            (self.key_id, self.algorithm.value, self.usage.value, str(self.copies), self.storage.value,
             str(self.extractable))
        )


_CLUSTER_SETS: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a key lives, as recorded in the placement store."""

    key_id: str
    algorithm: KeyAlgorithm
    usage: KeyUsage
    state: KeyState
    primary: str
    replicas: tuple[str, ...] = ()
    create_time: float = 0.0
    request_id: str = ""
    fingerprint: str = ""
    storage: KeyStorage = KeyStorage.TOKEN
    version: int = 1
    copies: int = 1
    """Clusters that should hold the key (its replication policy)."""
    extractable: bool = True
    """Wrappable under a trusted key (CKA_WRAP_WITH_TRUSTED), so it can be replicated."""
    wrapped: bytes = field(default=b"", repr=False)
    """EXTERNAL keys: the private/secret key wrapped under the trusted wrapping key."""
    public_der: bytes = field(default=b"", repr=False)
    """EXTERNAL asymmetric keys: the public key (SubjectPublicKeyInfo DER)."""
    held: bool = False
    """An operator chose its clusters (``keys place``, ``keys move``): rebalance leaves it there."""
    owner: str = ""
    """While CREATING: the process making the key's objects (``router._owner``), so a retry can
    tell that it is gone; "" once the key is made, and on records written before owners were."""
    destroyed_material: bytes = field(default=b"", repr=False)
    """DESTROYED copyable keys: SHA-256 of the key wrapped under the trusted wrapping key, then
    (asymmetric keys) of its public key: what objects found later under its id on clusters the
    record does not name are compared with (``KeyMaterial.recorded``). Empty when the material
    could not be read before the destroy, and on records destroyed before it was kept."""
    clusters: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Shared between placements: a million keys live on a handful of cluster sets.
        key = (self.primary, self.replicas)
        clusters = _CLUSTER_SETS.get(key)
        if clusters is None:
            clusters = _CLUSTER_SETS.setdefault(key, (self.primary, *self.replicas))
        object.__setattr__(self, "clusters", clusters)

    @property
    def external(self) -> bool:
        return self.storage is KeyStorage.EXTERNAL

    def for_key(self, key_id: str) -> Placement:
        """This placement's route under ``key_id``, without its creation record.

        ``create_time``, ``request_id``, ``fingerprint`` and ``owner`` come back empty:
        the placement cache shares one route between many keys (router.cache).
        """
        view = object.__new__(Placement)
        put = object.__setattr__
        put(view, "key_id", key_id)
        for name in _ROUTE_FIELDS:
            put(view, name, getattr(self, name))
        put(view, "create_time", 0.0)
        put(view, "request_id", "")
        put(view, "fingerprint", "")
        put(view, "owner", "")
        put(view, "destroyed_material", b"")
        return view

    @property
    def usable(self) -> bool:
        return self.state in (KeyState.ENABLED, KeyState.UNDER_REPLICATED)


_ROUTE_FIELDS = ("algorithm", "usage", "state", "primary", "replicas", "storage", "version", "copies",
                 "extractable", "wrapped", "public_der", "held", "clusters")

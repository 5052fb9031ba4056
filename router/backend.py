"""The interface between the router and one HSM cluster.

``router.pkcs11.Pkcs11Cluster`` implements it on a pooled PKCS #11 token; tests
of pure routing logic may use a small in-memory fake. Every method takes an
absolute ``deadline`` on the ``time.monotonic`` clock and raises only
``router.errors`` classes.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from router.errors import DeadlineExceeded, RouterError, SessionsBusy, Unavailable
from router.model import ClusterSpec, Operation, Placement

MARK_AGAIN = (Unavailable, DeadlineExceeded, SessionsBusy)
"""Failures of ``HsmBackend.mark`` that are a moment's (the cluster down, no session free, the
deadline): the marker is written at the next key there, not after a pause."""

MARK_RETRY = 600.0
"""Seconds after any other failed write of a token's fleet marker before a key written there
tries again."""


@dataclass(frozen=True)
class KeyMaterial:
    """What a key's objects on a token are compared with before objects under its id there are
    destroyed or replaced (``HsmBackend.destroy(of=…)``, ``import_wrapped(own_leftovers=…)``), by
    digest only: kept after a DestroyKey until its sweep, it holds nothing that unwraps the key."""

    key: Placement
    wrapped_sha256: bytes
    """SHA-256 of the private or secret key wrapped by the fleet's trusted wrapping key
    (``export_wrapped``); empty: no private or secret key is the key's."""
    public_sha256: bytes
    """SHA-256 of the public key (SubjectPublicKeyInfo DER); empty for a secret key."""

    @classmethod
    def of(cls, key: Placement, wrapped: bytes, public_der: bytes) -> KeyMaterial:
        """The key's, from its export."""
        return cls(key, hashlib.sha256(wrapped).digest(), hashlib.sha256(public_der).digest() if public_der else b"")

    @classmethod
    def recorded(cls, key: Placement) -> KeyMaterial | None:
        """A DESTROYED key's, from its record (``Placement.destroyed_material``); None when the
        record keeps none."""
        if not key.destroyed_material:
            return None
        return cls(key, key.destroyed_material[:32], key.destroyed_material[32:])

    @property
    def digests(self) -> bytes:
        """What ``recorded`` reads back: ``Placement.destroyed_material``."""
        return self.wrapped_sha256 + self.public_sha256

    @classmethod
    def never_copied(cls, key: Placement) -> KeyMaterial:
        """One no object matches: for a key that is never copied (EXTERNAL, non-extractable), on a
        cluster where it was not made."""
        return cls(key, b"", b"")


@dataclass(frozen=True)
class PoolStats:
    size: int
    """Sessions the pool is configured to keep."""
    open: int
    """Sessions currently open (excluding the login session)."""
    in_use: int
    """Sessions checked out by requests right now."""
    hung: int = 0
    """Of those, sessions whose call is past its time (the cluster's ``call_timeout``)."""


class HsmBackend(abc.ABC):
    """One cluster's HSM operations, addressed by key id."""

    spec: ClusterSpec

    @property
    def name(self) -> str:
        return self.spec.name

    @abc.abstractmethod
    def generate(self, key: Placement, deadline: float, *, unless: Callable[[], bool] | None = None) -> None:
        """Create the key's token objects (CKA_ID = CKA_LABEL = key id); with ``unless``, asked
        while the token's objects are held still, nothing is touched when it is true.

        Objects an earlier attempt left under this id (a crashed or failed creation) do not
        remain beside the new ones: the caller holds the key's intent, so they are no key's.
        """

    @abc.abstractmethod
    def generate_external(self, key: Placement, deadline: float) -> tuple[bytes, bytes]:
        """Create the key in the HSM, wrap it under the trusted wrapping key, destroy it.

        Returns (wrapped key, public key DER or b"" for symmetric keys).
        """

    @abc.abstractmethod
    def export_wrapped(self, key: Placement, deadline: float) -> tuple[bytes, bytes]:
        """The key wrapped under the trusted wrapping key, and its public key DER (b"" if none)."""

    @abc.abstractmethod
    def import_wrapped(self, key: Placement, wrapped: bytes, public_der: bytes, deadline: float, *,
                       unless: Callable[[], bool] | None = None, own_leftovers: bool = False) -> None:
        """Unwrap a copy as token objects with the key's id, label and attributes (replaces leftovers);
        with ``unless``, asked while the token's objects are held still, nothing is touched when it is true.
        ``own_leftovers``: the leftovers replaced must be this key's (the same material as ``wrapped``
        and ``public_der``), else ``ForeignObjects`` and nothing is touched: for a copy to a cluster
        that was not searched for other objects under the key's id before its record was written."""

    @abc.abstractmethod
    def probe(self, deadline: float) -> None:
        """A cheap call that succeeds only if the cluster works."""

    @abc.abstractmethod
    def destroy(self, key_id: str, deadline: float, *, unless: Callable[[], bool] | None = None,
                of: KeyMaterial | None = None) -> int:
        """Remove every token object of the key; returns how many were removed.

        ``unless`` is asked first, while nothing else that this host runs can change the
        token's objects: if it returns True, nothing is destroyed (0 is returned). With
        ``unless``, only the objects there before it was asked are destroyed: one that a
        process on another host makes meanwhile stays. ``of``: the key's material, which
        every object found must be, else ``ForeignObjects`` and nothing is destroyed.
        """

    def check_foreign(self, material: KeyMaterial, deadline: float) -> None:
        """``ForeignObjects`` if objects under the key's id here are not its ``material`` (its own
        leftovers are). A backend without token objects has none: this one does nothing."""
        return None

    def forget_key(self, key_id: str) -> None:
        """Drop what this process keeps of the key beside its token objects: an EXTERNAL key's
        unwrapped session objects (gone from each session before its next use). A backend that
        keeps none has nothing to do."""
        return None

    def fleets(self, deadline: float) -> tuple[str, ...] | None:
        """The fleet ids the token's fleet marker lists (``router.pkcs11._fleet``), oldest first;
        None when the token has no marker (no gateway has marked it yet). A backend that keeps
        no marker has none."""
        return None

    def mark(self, fleet_id: str, deadline: float, *, also: frozenset[str] = frozenset()) -> None:
        """Add ``fleet_id`` to the token's fleet marker if it lacks it: called before a key object
        is written there. Once per process: later calls cost nothing. ``OtherFleet`` when the
        marker lists only fleets that are neither ``fleet_id`` nor in ``also`` (nothing written).
        A backend that keeps no marker has nothing to do."""
        return None

    @abc.abstractmethod
    def key_objects(self, deadline: float, *, key_id: str | None = None) -> dict[str, dict[str, int]]:
        """For each key id with token objects on this cluster (only ``key_id``'s, if given): how
        many objects of each class ("private key", "public key", "secret key"). For
        reconciliation: a key has one of each."""

    @abc.abstractmethod
    def public_key(self, key: Placement, deadline: float) -> bytes:
        """The public key as DER SubjectPublicKeyInfo."""

    @abc.abstractmethod
    def sign(self, key: Placement, op: Operation, digest: bytes, deadline: float) -> bytes:
        """Sign a digest; ECDSA signatures come back DER-encoded."""

    def sign_many(
        self, key: Placement, op: Operation, digests: Sequence[bytes], deadline: float
    ) -> list[bytes | RouterError]:
        """Sign several digests with one key (BatchSign), in order.

        An item the deadline left unsigned is a ``DeadlineExceeded`` in its place; any other
        failure raises, for the whole call. This default signs one by one; a backend
        overrides it to hold one session for the lot.
        """
        return [self.sign(key, op, digest, deadline) for digest in digests]

    @abc.abstractmethod
    def verify(self, key: Placement, op: Operation, digest: bytes, signature: bytes, deadline: float) -> bool: ...

    @abc.abstractmethod
    def encrypt(
        self, key: Placement, op: Operation, plaintext: bytes, aad: bytes, deadline: float
    ) -> tuple[bytes, bytes]:
        """Returns (ciphertext, iv); iv is empty where the operation has none."""

    @abc.abstractmethod
    def decrypt(
        self, key: Placement, op: Operation, ciphertext: bytes, iv: bytes, aad: bytes, deadline: float
    ) -> bytes: ...

    @abc.abstractmethod
    def mac(self, key: Placement, op: Operation, data: bytes, deadline: float) -> bytes: ...

    @abc.abstractmethod
    def verify_mac(self, key: Placement, op: Operation, data: bytes, mac: bytes, deadline: float) -> bool: ...

    @abc.abstractmethod
    def random(self, length: int, deadline: float) -> bytes: ...

    @abc.abstractmethod
    def stats(self) -> PoolStats: ...

    def hung_calls(self) -> tuple[int, float]:
        """HSM calls past their time: how many, and how long the oldest has run (seconds).

        A call into a hung HSM cannot be interrupted; the health monitor keeps the
        cluster's circuit open while this reports any. A backend that cannot hang
        reports none.
        """
        return 0, 0.0

    def fault_name(self, error: RouterError) -> str:
        """The name of the HSM's own error behind ``error``, one of this backend's failures
        (``CKR_DEVICE_ERROR``…), or ``""``. The router names it when the failure opens the
        cluster's circuit. A backend with no such names reports none."""
        return ""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every session, the login session last."""

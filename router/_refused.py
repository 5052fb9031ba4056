"""EXTERNAL key records the clusters refused to unwrap, remembered for a short time.

Before a cluster blames a record whose wrapped key it does not unwrap, its session shows
that it unwraps a key of its own (``PooledSession._unwraps_its_own``: a key generated,
wrapped, unwrapped and destroyed), then asks the record's again; and the router asks every
other cluster too. A client that retries such a key in a loop would cost each cluster that
work on every call. Once every cluster asked has refused a record, calls on it are refused
(KEY_RECORD_MISMATCH) without an HSM call for ``REFUSED_FOR`` seconds.

- An entry is for the record's material: a digest of its wrapped key, algorithm and usage
  (what the unwrap is asked with). A record restored, or rewritten with other material, is
  used at once; one rewritten with the same material is the same corrupt record.
- Only a refusal the router took as the record's is kept (``WrappedKeyRefused`` from every
  cluster asked). A cluster that failed its own check, or that could not be asked, made the
  call fail another way (RESOURCE_EXHAUSTED, UNAVAILABLE), and nothing is kept for it.
- At most ``REFUSALS_KEPT`` keys; beyond, the oldest entry goes (its next call asks the
  clusters again).
"""

from __future__ import annotations

import collections
import hashlib
import threading
from typing import Callable, NamedTuple

from router.errors import WrappedKeyRefused
from router.model import Placement

REFUSED_FOR = 30.0
"""Seconds a record every cluster refused is refused again without asking them."""

REFUSALS_KEPT = 1024
"""Keys whose refused records are remembered at once."""


class _Refusal(NamedTuple):
    material: bytes
    """Digest of what the clusters were asked to unwrap (``_material``)."""
    until: float
    cluster: str
    """The last cluster that refused it, and its region."""
    region: str


def _material(placement: Placement) -> bytes:
    return hashlib.sha256(b"%s\0%s\0%s" % (placement.algorithm.value.encode(), placement.usage.value.encode(),
                                           placement.wrapped)).digest()


class RefusedRecords:
    """EXTERNAL key records every cluster asked refused to unwrap, by key id (see the module docstring)."""

    def __init__(self, clock: Callable[[], float], *, refused_for: float = REFUSED_FOR,
                 kept: int = REFUSALS_KEPT) -> None:
        self._clock = clock
        self._refused_for = refused_for
        self._kept = kept
        self._lock = threading.Lock()
        self._refusals: collections.OrderedDict[str, _Refusal] = collections.OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._refusals)

    def check(self, placement: Placement) -> None:
        """Raise ``WrappedKeyRefused`` if this record's material was refused by every cluster
        asked less than ``refused_for`` seconds ago. Costs a dict look-up for any other key."""
        refusal = self._refusals.get(placement.key_id)
        if refusal is None:
            return
        now = self._clock()
        if now >= refusal.until or _material(placement) != refusal.material:
            with self._lock:  # expired, or the record was rewritten: its calls ask the clusters again
                if self._refusals.get(placement.key_id) is refusal:
                    del self._refusals[placement.key_id]
            return
        raise WrappedKeyRefused(
            f"key {placement.key_id!r}: no cluster unwrapped the wrapped key in its record when last asked; the "
            "placement record was altered or is corrupt, or the clusters' replication wrapping key is not the one "
            f"it was wrapped under; they are asked again in {refusal.until - now:.0f} s, or once the record "
            "changes (docs/security.md)",
            cluster=refusal.cluster, region=refusal.region)

    def add(self, placement: Placement, refused: WrappedKeyRefused) -> None:
        """Remember that every cluster asked refused ``placement``'s wrapped key (``refused``: the last)."""
        refusal = _Refusal(_material(placement), self._clock() + self._refused_for, refused.cluster, refused.region)
        with self._lock:
            self._refusals.pop(placement.key_id, None)
            self._refusals[placement.key_id] = refusal
            while len(self._refusals) > self._kept:
                self._refusals.popitem(last=False)

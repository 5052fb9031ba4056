"""The placement store: which clusters hold each key. Every process sees it.

Records are created in state CREATING before any HSM object exists (an intent),
then switched to ENABLED once the objects exist. A crash in between leaves a
CREATING record that the reconciler resolves; never an object nobody knows.
Updates are conditional on the record's ``version`` so two gateways never
overwrite each other's placement.

The store also keeps the operators' state that every gateway must share: pending
quorum changes and the drain and failover switches (``admin_record``), under the
same rule: a write names the version it read.

Each store has a fleet id (``fleet_id``): made once, then stable for good. The gateway
writes it on every token it puts keys on (``router.pkcs11._fleet``), and reconcile
destroys nothing on a token that lists other stores' ids but not its own: a gateway
whose ``[store] url`` names another fleet's store must not take that store's records
for the keys on its tokens.
"""

from __future__ import annotations

import abc
import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from router.model import Placement


class StoreError(Exception):
    """The store is unreachable or failed; callers map it to UNAVAILABLE."""


class StoreMisconfigured(StoreError):
    """The store the URL names cannot be used as it is, and waiting will not change that.

    A SQLite file whose directory does not exist or that this user cannot write, a
    DynamoDB table that does not exist. A gateway starting on one stops for good
    (a configuration error) instead of being restarted; other store errors (an
    endpoint unreachable, throttling) may pass.
    """


class Conflict(Exception):
    """A conditional write lost: the record exists or changed meanwhile."""

    def __init__(self, existing: Placement | None) -> None:
        super().__init__("placement changed concurrently")
        self.existing = existing


class Stale(Exception):
    """A conditional write of an admin record lost: it was written (or made) meanwhile."""

    def __init__(self, name: str) -> None:
        super().__init__(f"admin record {name!r} changed concurrently")
        self.name = name


def new_fleet_id() -> str:
    """A fleet id for a store that has none: 128 random bits, in hex."""
    return secrets.token_hex(16)


class PlacementStore(abc.ABC):
    @abc.abstractmethod
    def fleet_id(self, proposed: str | None = None) -> str:
        """The store's fleet id. A store that has none is given ``proposed`` (else
        ``new_fleet_id()``) with a conditional write: of concurrent callers one wins, and
        every one of them gets its value. Never changed by the store once made, except on a
        DynamoDB global table, whose regions may each take a first write before they replicate:
        the table then keeps the last (``Router.fleet_check`` follows it)."""

    @abc.abstractmethod
    def existing_fleet_id(self) -> str | None:
        """The store's fleet id, or None when it has none yet. Only reads (one ``GetItem`` on
        DynamoDB): a role that may not write the store can call it, and it gives none."""

    @abc.abstractmethod
    def get(self, key_id: str) -> Placement | None: ...

    @abc.abstractmethod
    def by_request(self, request_id: str) -> Placement | None:
        """The placement created by ``request_id``, if any."""

    @abc.abstractmethod
    def create(self, placement: Placement) -> None:
        """Insert; raises ``Conflict`` if the key id or request id exists."""

    @abc.abstractmethod
    def update(self, placement: Placement) -> Placement:
        """Replace the record whose version is ``placement.version`` and whose request id is
        ``placement.request_id``; returns it with version + 1. Anything else is a ``Conflict``
        with the record as it is: versions start again at 1 when a key id is rolled back and made
        again, so the request id tells that record from the one a writer read before."""

    @abc.abstractmethod
    def delete(self, key_id: str, version: int) -> None:
        """Remove a record (only used to roll back an intent that never took effect)."""

    @abc.abstractmethod
    def list(self, prefix: str = "", after: str = "", limit: int = 100) -> list[Placement]:
        """Keys with ``prefix``, ordered by id, strictly after ``after``."""

    @abc.abstractmethod
    def scan(self) -> Iterator[Placement]:
        """Every record (for cache warm-up and reconciliation)."""

    @abc.abstractmethod
    def change_counter(self) -> int:
        """A number that grows whenever any record changes (for caches)."""

    @abc.abstractmethod
    def admin_record(self, name: str) -> tuple[dict[str, Any], int] | None:
        """An admin record (a JSON object) and its version; None if there is none."""

    @abc.abstractmethod
    def put_admin_record(self, name: str, body: dict[str, Any], version: int) -> int:
        """Write an admin record whose version is still ``version`` (0: it must not exist);
        returns its new version. Raises ``Stale`` when the condition does not hold."""

    def admin_records_named(self, names: Sequence[str]) -> dict[str, tuple[dict[str, Any], int]]:
        """The admin records of these names that exist, by name, with their versions: one
        read per record here; a store that can read several in one request does so."""
        found = {}
        for name in dict.fromkeys(names):
            record = self.admin_record(name)
            if record is not None:
                found[name] = record
        return found

    @abc.abstractmethod
    def admin_records(self) -> Iterator[tuple[str, dict[str, Any], int]]:
        """Every admin record: (name, body, version), in no particular order (for copying a store)."""

    def change_log(self) -> ChangeLog | None:
        """A reader of the store's changes from now on, or None if the store keeps no log.

        Take it *before* scanning the store for a cache: what changes during the
        scan then shows up in the log's first read.
        """
        return None

    def close(self) -> None:
        return None


def edit_admin_record(
    store: PlacementStore, name: str, edit: Callable[[dict[str, Any] | None], dict[str, Any] | None],
    *, attempts: int = 20,
) -> dict[str, Any] | None:
    """Read the admin record ``name``, pass it to ``edit`` and write what it returns (None:
    leave it); again from the read when another writer came first. Returns what was written."""
    for _ in range(attempts):
        found = store.admin_record(name)
        body, version = found if found is not None else (None, 0)
        new = edit(body)
        if new is None:
            return None
        try:
            store.put_admin_record(name, new, version)
            return new
        except Stale:
            continue
    raise StoreError(f"admin record {name!r} kept changing under {attempts} attempts to write it")


class ChangeLog(abc.ABC):
    """Follows one store's writes, so a cache re-reads only the keys that changed."""

    @abc.abstractmethod
    def read(self) -> tuple[str, ...] | None:
        """Ids of the keys written since the last read (or since the log was taken).

        May name more keys than changed, never fewer. None when the log cannot tell
        (it no longer reaches back that far, or it lost count): the caller reloads
        everything and takes a new log; this one stays None.
        """

"""The fleet marker: which placement stores' gateways have put keys on a token.

One private data object per token (``CKO_DATA``, ``CKA_APPLICATION`` "hsmgw", ``CKA_LABEL``
"hsmgw-fleet") whose ``CKA_VALUE`` lists fleet ids (``PlacementStore.fleet_id``), one per
line, newest last, at most ``KEPT``. A gateway adds its store's id before it writes a key
object there; reconcile destroys nothing on a token whose marker lists other ids but not
its store's (``router.reconcile``). It has no ``CKA_ID``, so no search for a key's objects
finds it, and it is of no key class: never counted as a key's object.

A marker is replaced, never edited: the new one is made first, then the old ones go, so a
process stopped in between leaves two, which read as one (their ids together).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pkcs11 import Attribute, ObjectClass

APPLICATION = "hsmgw"
LABEL = "hsmgw-fleet"
KEPT = 16
"""Fleet ids a marker keeps: a token that more fleets wrote to forgets the oldest."""

MARKER: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True,
                                Attribute.APPLICATION: APPLICATION, Attribute.LABEL: LABEL}
"""The search that finds a token's marker."""


def listed(markers: Sequence[Any]) -> tuple[str, ...] | None:
    """The fleet ids the marker objects list, oldest first; None when there is no marker."""
    if not markers:
        return None
    ids: dict[str, None] = {}
    for marker in markers:
        ids.update(dict.fromkeys(bytes(marker[Attribute.VALUE]).decode("ascii", "replace").split()))
    return tuple(ids)


def add(session: Any, markers: Sequence[Any], fleet_id: str) -> bool:
    """Make the token's marker list ``fleet_id`` (``markers``: the ones there now, found under the
    token's lock); whether it was written."""
    ids = listed(markers) or ()
    if fleet_id in ids and len(markers) == 1:
        return False
    if fleet_id not in ids:
        ids = (*ids, fleet_id)[-KEPT:]
    session.create_object({**MARKER, Attribute.PRIVATE: True, Attribute.VALUE: "\n".join(ids).encode()})
    for old in markers:
        old.destroy()
    return True

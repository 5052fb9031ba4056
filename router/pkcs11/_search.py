"""Object searches that end for good whether or not the module answers.

python-pkcs11's ``Session.get_objects`` takes the session's operation lock and marks its
search active before ``C_FindObjectsInit``. When that call fails (a device error, a
session the HSM dropped, a lost login) it raises with the search still marked active and
the lock held: nothing ends it but the search object's finalizer, which calls
``C_FindObjectsFinal`` on a search the module never began, and its error
(``CKR_OPERATION_NOT_INITIALIZED``, ``CKR_SESSION_HANDLE_INVALID``) is printed on stderr as
an ``Exception ignored in`` traceback: raw lines in a JSON log stream, during every HSM
fault. ``find`` ends such a search itself, at once, and keeps the error it began with,
as it does when ``C_FindObjects`` fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pkcs11 import Attribute
from pkcs11 import exceptions as p11
from pkcs11._pkcs11 import SearchIter  # type: ignore[attr-defined]

_BATCH = 10
"""Handles asked for per ``C_FindObjects`` (python-pkcs11's default)."""


def find(session: Any, template: Mapping[Attribute, Any]) -> list[Any]:
    """Every object of ``session`` matching ``template``, the search read to its end.

    Not a ``with`` block: when ``C_FindObjects`` fails, its ``__exit__`` would call
    ``C_FindObjectsFinal`` and raise that call's error instead, if it fails too (a module
    that ended the search itself answers ``CKR_OPERATION_NOT_INITIALIZED``), and a device
    error would be reported as an unexpected one. The search ends itself once read to its end."""
    search = SearchIter(session, dict(template), _BATCH)
    try:
        search.__enter__()  # C_FindObjectsInit
        return [obj for batch in search for obj in batch]
    except p11.PKCS11Error:
        _end(search)
        raise


def _end(search: Any) -> None:
    """Mark a search that failed as ended and give its session's lock back; nothing is left
    for its finalizer. A search that ended already (read to its end, or ended by its failure
    in ``C_FindObjects``) is left as it is: python-pkcs11 then does nothing here."""
    try:
        search._finalize()
    except p11.PKCS11Error:
        pass  # the module never began it (C_FindObjectsInit failed): nothing to end there

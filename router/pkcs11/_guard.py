"""The replication wrapping key's unwrap template: what every key unwrapped with it must be.

Keys leave an HSM only wrapped under the trusted wrapping key (``_keys``: extractable
only with ``CKA_WRAP_WITH_TRUSTED``). That alone does not keep them in: whoever holds
the crypto user's PIN can wrap a key with the trusted key and unwrap it again with a
template of their own, ``CKA_SENSITIVE = false``, and read its value. A
``CKA_UNWRAP_TEMPLATE`` on the wrapping key closes that: the token refuses an unwrap
whose template does not match it (``CKR_TEMPLATE_INCONSISTENT``). ``GUARD`` is the
template: every unwrapped key is private, sensitive, and again wrappable only with a trusted
key. Private matters because the wrapping key itself is a public object (its security officer
can create no other kind), so a session that never logged in can use it: without
``CKA_PRIVATE = true`` in the template, such a session could unwrap an ``EXTERNAL`` key's
stored blob as a public session object and sign or decrypt with it, no PIN asked.
AWS CloudHSM asks trusted unwrapping keys for one too.

python-pkcs11 cannot write or read attributes whose value is a template (an array of
attributes), so this calls ``C_CreateObject`` and ``C_GetAttributeValue`` through the
module's function list, on python-pkcs11's session and object handles.
"""

from __future__ import annotations

import ctypes
from typing import Any

from pkcs11 import Attribute
from pkcs11 import exceptions as p11

from router.pkcs11._signer import _ULONG, error

_CREATE_OBJECT = 20
_GET_ATTRIBUTE_VALUE = 24
"""Indexes among CK_FUNCTION_LIST's function pointers (PKCS #11 2.40 and 3.0 alike)."""
_UNAVAILABLE = _ULONG(-1).value  # CK_UNAVAILABLE_INFORMATION: the attribute is not there
CKA_UNWRAP_TEMPLATE = 0x40000212
_MOST_ENTRIES = 64
_LONGEST_VALUE = 1024
"""Bounds on a template read back: a module's lengths are not trusted to size buffers."""

GUARD: dict[int, bool] = {
    int(Attribute.PRIVATE): True,
    int(Attribute.SENSITIVE): True,
    int(Attribute.WRAP_WITH_TRUSTED): True,
}
"""The wrapping key's unwrap template."""


class _Attribute(ctypes.Structure):
    _fields_ = [("type", _ULONG), ("value", ctypes.c_void_p), ("length", _ULONG)]


_CreateObject = ctypes.CFUNCTYPE(_ULONG, _ULONG, ctypes.POINTER(_Attribute), _ULONG, ctypes.POINTER(_ULONG))
_GetAttributeValue = ctypes.CFUNCTYPE(_ULONG, _ULONG, _ULONG, ctypes.POINTER(_Attribute), _ULONG)


class _Template:
    """A CK_ATTRIBUTE array for ``attributes`` (bool, int, bytes, str or a nested dict), kept alive
    with every buffer it points to."""

    def __init__(self, attributes: dict[int, Any]) -> None:
        self._buffers: list[Any] = []
        self.array = (_Attribute * len(attributes))(*(self._one(t, v) for t, v in attributes.items()))

    def _one(self, kind: int, value: Any) -> _Attribute:
        buffer: Any
        if isinstance(value, bool):
            buffer = ctypes.c_ubyte(value)
        elif isinstance(value, int):
            buffer = _ULONG(value)
        elif isinstance(value, (bytes, str)):
            data = value.encode() if isinstance(value, str) else value
            buffer = ctypes.create_string_buffer(data, len(data))
        elif isinstance(value, dict):
            buffer = _Template(value)
            self._buffers.append(buffer)
            return _Attribute(kind, ctypes.cast(buffer.array, ctypes.c_void_p), ctypes.sizeof(buffer.array))
        else:
            raise TypeError(f"cannot encode attribute 0x{kind:x} from {type(value).__name__}")
        self._buffers.append(buffer)
        return _Attribute(kind, ctypes.cast(ctypes.pointer(buffer), ctypes.c_void_p), ctypes.sizeof(buffer))


class UnwrapGuard:
    """Creates and reads wrapping keys' unwrap templates through one module's function list."""

    def __init__(self, function_list: int) -> None:
        pointers = ctypes.cast(function_list, ctypes.POINTER(ctypes.c_void_p))
        create, get = pointers[1 + _CREATE_OBJECT], pointers[1 + _GET_ATTRIBUTE_VALUE]
        if not create or not get:
            raise ValueError("the module's function list has no C_CreateObject or C_GetAttributeValue")
        self._create = _CreateObject(create)
        self._get = _GetAttributeValue(get)

    def create(self, session: Any, attributes: dict[Any, Any]) -> int:
        """C_CreateObject in python-pkcs11's ``session`` (values as ``_Template`` takes them): the handle."""
        template = _Template({int(kind): value for kind, value in attributes.items()})
        handle = _ULONG()
        rv = self._create(session.handle, template.array, len(template.array), ctypes.byref(handle))
        if rv:
            raise error(rv)
        return int(handle.value)

    def unwrap_template(self, key: Any) -> dict[int, bytes] | None:
        """The CKA_UNWRAP_TEMPLATE of python-pkcs11's ``key`` (attribute type → raw value), or None
        if it has none (or one no gateway wrote: too many entries, or values too long). Another
        failure of the module raises its python-pkcs11 exception."""
        session = key.session.handle
        outer = _Attribute(CKA_UNWRAP_TEMPLATE, None, 0)
        rv = self._get(session, key.handle, ctypes.byref(outer), 1)
        if rv:
            failure = error(rv)
            if isinstance(failure, p11.AttributeTypeInvalid):
                return None  # no such attribute
            raise failure
        if outer.length in (0, _UNAVAILABLE):
            return None  # an empty template
        count = outer.length // ctypes.sizeof(_Attribute)
        if not 0 < count <= _MOST_ENTRIES:
            return None  # not a template this gateway could have written: as good as none
        entries = (_Attribute * count)()
        outer.value = ctypes.cast(entries, ctypes.c_void_p)
        rv = self._get(session, key.handle, ctypes.byref(outer), 1)  # the lengths of each entry
        if rv:
            raise error(rv)
        if any(entry.length > _LONGEST_VALUE for entry in entries):  # CK_UNAVAILABLE_INFORMATION among them
            return None
        buffers = [ctypes.create_string_buffer(entry.length) for entry in entries]
        for entry, buffer in zip(entries, buffers, strict=True):
            entry.value = ctypes.cast(buffer, ctypes.c_void_p)
        rv = self._get(session, key.handle, ctypes.byref(outer), 1)
        if rv:
            raise error(rv)
        return {int(entry.type): buffer.raw[: entry.length] for entry, buffer in zip(entries, buffers, strict=True)}

    def missing(self, key: Any) -> frozenset[int]:
        """The attribute types of ``GUARD`` that wrapping key ``key``'s unwrap template does not
        hold with ``GUARD``'s value: all of them when it has no template."""
        template = self.unwrap_template(key) or {}
        return frozenset(kind for kind, value in GUARD.items() if template.get(kind, b"") != bytes([value]))

    def guards(self, key: Any) -> bool:
        """Whether wrapping key ``key``'s unwrap template holds ``GUARD``."""
        return not self.missing(key)

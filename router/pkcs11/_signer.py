"""``C_SignInit`` and ``C_Sign`` called straight through the module's function list.

Signing is the gateway's hot path, and python-pkcs11's ``Key.sign`` costs the
process more than the call into the module: a mechanism object, an operation
object with its buffer, and a ``C_Sign`` that asks for the length before the
one that signs. On the development machine (SoftHSM2, one CPU, min of 7 rounds)
a P-256 signature took 62.9 µs of CPU that way against 56.5 µs here, and an
RSA-2048 one 584 against 574 µs: ~10 % of a ``BatchSign`` item.

Only ECDSA and RSA PKCS #1 v1.5 (mechanisms without a parameter) are signed
here; the others stay on python-pkcs11, as does every signature when the module
gave this function list sessions of its own (``Signer.sees``). The module's
return values become the exceptions python-pkcs11 raises for them, so
``_errors.translate`` remains the one place where PKCS #11 failures become
router errors.

The same function list also reads the few fixed-size attributes a key look-up needs
(``read_number``): python-pkcs11 reports an attribute read as ``CKR_FUNCTION_FAILED`` when
it lost the module's own error (``pool.read_attribute``).
"""

from __future__ import annotations

import ctypes
from typing import Any

from pkcs11 import Mechanism
from pkcs11 import exceptions as p11

_ULONG = ctypes.c_ulong
_GET_SESSION_INFO = 15
"""Index of C_GetSessionInfo among CK_FUNCTION_LIST's function pointers (PKCS #11 2.40 and 3.0 alike)."""
_GET_ATTRIBUTE_VALUE = 24
_SIGN_INIT = 42
_SIGN = 43
_FIRST_BUFFER = 1024
"""Bytes offered for a signature: RSA-8192 and every EC curve fit; a longer one is asked for again."""
CKR_BUFFER_TOO_SMALL = 0x150

# Every return value python-pkcs11 raises an exception of its own for (its map_rv_to_error),
# with the same class; the rest become its generic PKCS11Error, as there.
_ERRORS: dict[int, type[p11.PKCS11Error]] = {
    0x2: p11.HostMemory,  # HOST_MEMORY
    0x3: p11.SlotIDInvalid,  # SLOT_ID_INVALID
    0x5: p11.GeneralError,  # GENERAL_ERROR
    0x6: p11.FunctionFailed,  # FUNCTION_FAILED
    0x7: p11.ArgumentsBad,  # ARGUMENTS_BAD
    0x8: p11.NoEvent,  # NO_EVENT
    0x10: p11.AttributeReadOnly,  # ATTRIBUTE_READ_ONLY
    0x11: p11.AttributeSensitive,  # ATTRIBUTE_SENSITIVE
    0x12: p11.AttributeTypeInvalid,  # ATTRIBUTE_TYPE_INVALID
    0x13: p11.AttributeValueInvalid,  # ATTRIBUTE_VALUE_INVALID
    0x20: p11.DataInvalid,  # DATA_INVALID
    0x21: p11.DataLenRange,  # DATA_LEN_RANGE
    0x30: p11.DeviceError,  # DEVICE_ERROR
    0x31: p11.DeviceMemory,  # DEVICE_MEMORY
    0x32: p11.DeviceRemoved,  # DEVICE_REMOVED
    0x40: p11.EncryptedDataInvalid,  # ENCRYPTED_DATA_INVALID
    0x41: p11.EncryptedDataLenRange,  # ENCRYPTED_DATA_LEN_RANGE
    0x50: p11.FunctionCancelled,  # FUNCTION_CANCELED
    0x54: p11.FunctionNotSupported,  # FUNCTION_NOT_SUPPORTED
    0x60: p11.KeyHandleInvalid,  # KEY_HANDLE_INVALID
    0x62: p11.KeySizeRange,  # KEY_SIZE_RANGE
    0x63: p11.KeyTypeInconsistent,  # KEY_TYPE_INCONSISTENT
    0x64: p11.KeyNotNeeded,  # KEY_NOT_NEEDED
    0x66: p11.KeyNeeded,  # KEY_NEEDED
    0x67: p11.KeyIndigestible,  # KEY_INDIGESTIBLE
    0x69: p11.KeyNotWrappable,  # KEY_NOT_WRAPPABLE
    0x6A: p11.KeyUnextractable,  # KEY_UNEXTRACTABLE
    0x70: p11.MechanismInvalid,  # MECHANISM_INVALID
    0x71: p11.MechanismParamInvalid,  # MECHANISM_PARAM_INVALID
    0x82: p11.ObjectHandleInvalid,  # OBJECT_HANDLE_INVALID
    0x90: p11.OperationActive,  # OPERATION_ACTIVE
    0x91: p11.OperationNotInitialized,  # OPERATION_NOT_INITIALIZED
    0xA0: p11.PinIncorrect,  # PIN_INCORRECT
    0xA1: p11.PinInvalid,  # PIN_INVALID
    0xA2: p11.PinLenRange,  # PIN_LEN_RANGE
    0xA3: p11.PinExpired,  # PIN_EXPIRED
    0xA4: p11.PinLocked,  # PIN_LOCKED
    0xB0: p11.SessionClosed,  # SESSION_CLOSED
    0xB1: p11.SessionCount,  # SESSION_COUNT
    0xB3: p11.SessionHandleInvalid,  # SESSION_HANDLE_INVALID
    0xB5: p11.SessionReadOnly,  # SESSION_READ_ONLY
    0xB6: p11.SessionExists,  # SESSION_EXISTS
    0xB7: p11.SessionReadOnlyExists,  # SESSION_READ_ONLY_EXISTS
    0xB8: p11.SessionReadWriteSOExists,  # SESSION_READ_WRITE_SO_EXISTS
    0xC0: p11.SignatureInvalid,  # SIGNATURE_INVALID
    0xC1: p11.SignatureLenRange,  # SIGNATURE_LEN_RANGE
    0xD0: p11.TemplateIncomplete,  # TEMPLATE_INCOMPLETE
    0xD1: p11.TemplateInconsistent,  # TEMPLATE_INCONSISTENT
    0xE0: p11.TokenNotPresent,  # TOKEN_NOT_PRESENT
    0xE1: p11.TokenNotRecognised,  # TOKEN_NOT_RECOGNIZED
    0xE2: p11.TokenWriteProtected,  # TOKEN_WRITE_PROTECTED
    0xF0: p11.UnwrappingKeyHandleInvalid,  # UNWRAPPING_KEY_HANDLE_INVALID
    0xF1: p11.UnwrappingKeySizeRange,  # UNWRAPPING_KEY_SIZE_RANGE
    0xF2: p11.UnwrappingKeyTypeInconsistent,  # UNWRAPPING_KEY_TYPE_INCONSISTENT
    0x100: p11.UserAlreadyLoggedIn,  # USER_ALREADY_LOGGED_IN
    0x101: p11.UserNotLoggedIn,  # USER_NOT_LOGGED_IN
    0x102: p11.UserPinNotInitialized,  # USER_PIN_NOT_INITIALIZED
    0x104: p11.AnotherUserAlreadyLoggedIn,  # USER_ANOTHER_ALREADY_LOGGED_IN
    0x105: p11.UserTooManyTypes,  # USER_TOO_MANY_TYPES
    0x110: p11.WrappedKeyInvalid,  # WRAPPED_KEY_INVALID
    0x112: p11.WrappedKeyLenRange,  # WRAPPED_KEY_LEN_RANGE
    0x113: p11.WrappingKeyHandleInvalid,  # WRAPPING_KEY_HANDLE_INVALID
    0x114: p11.WrappingKeySizeRange,  # WRAPPING_KEY_SIZE_RANGE
    0x115: p11.WrappingKeyTypeInconsistent,  # WRAPPING_KEY_TYPE_INCONSISTENT
    0x120: p11.RandomSeedNotSupported,  # RANDOM_SEED_NOT_SUPPORTED
    0x121: p11.RandomNoRNG,  # RANDOM_NO_RNG
    0x130: p11.DomainParamsInvalid,  # DOMAIN_PARAMS_INVALID
    0x1B5: p11.ExceededMaxIterations,  # EXCEEDED_MAX_ITERATIONS
    0x1B8: p11.PinTooWeak,  # PIN_TOO_WEAK
    0x1B9: p11.PublicKeyInvalid,  # PUBLIC_KEY_INVALID
    0x200: p11.FunctionRejected,  # FUNCTION_REJECTED
}


def error(rv: int) -> p11.PKCS11Error:
    """The python-pkcs11 exception for return value ``rv`` (its generic one when it has none)."""
    kind = _ERRORS.get(rv)
    return kind() if kind is not None else p11.PKCS11Error(f"Unmapped error code {hex(rv)}")


class _Mechanism(ctypes.Structure):
    _fields_ = [("mechanism", _ULONG), ("parameter", ctypes.c_void_p), ("parameter_len", _ULONG)]


class _Attribute(ctypes.Structure):
    _fields_ = [("type", _ULONG), ("value", ctypes.c_void_p), ("value_len", _ULONG)]


class _SessionInfo(ctypes.Structure):
    _fields_ = [("slot", _ULONG), ("state", _ULONG), ("flags", _ULONG), ("device_error", _ULONG)]


_USER_STATES = frozenset({1, 3})  # CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS
_GetSessionInfo = ctypes.CFUNCTYPE(_ULONG, _ULONG, ctypes.POINTER(_SessionInfo))
_GetAttributeValue = ctypes.CFUNCTYPE(_ULONG, _ULONG, _ULONG, ctypes.POINTER(_Attribute), _ULONG)
_SignInit = ctypes.CFUNCTYPE(_ULONG, _ULONG, ctypes.POINTER(_Mechanism), _ULONG)
_Sign = ctypes.CFUNCTYPE(_ULONG, _ULONG, ctypes.c_char_p, _ULONG, ctypes.c_char_p, ctypes.POINTER(_ULONG))


class Signer:
    """Signs with a python-pkcs11 key object's session and handle, without python-pkcs11."""

    MECHANISMS = frozenset({Mechanism.ECDSA, Mechanism.RSA_PKCS})

    def __init__(self, function_list: int) -> None:
        """``function_list``: the address of the module's CK_FUNCTION_LIST (from C_GetFunctionList)."""
        pointers = ctypes.cast(function_list, ctypes.POINTER(ctypes.c_void_p))
        # Entry 0 is the CK_VERSION, padded to a pointer; the functions follow it.
        info, init, sign = pointers[1 + _GET_SESSION_INFO], pointers[1 + _SIGN_INIT], pointers[1 + _SIGN]
        if not info or not init or not sign:
            raise ValueError("the module's function list has no C_GetSessionInfo, C_SignInit or C_Sign")
        self._info = _GetSessionInfo(info)
        self._init = _SignInit(init)
        self._sign = _Sign(sign)
        read = pointers[1 + _GET_ATTRIBUTE_VALUE]
        self._read = _GetAttributeValue(read) if read else None
        self._mechanisms = {m: ctypes.byref(_Mechanism(int(m), None, 0)) for m in self.MECHANISMS}

    def sees(self, session: Any) -> bool:
        """Whether python-pkcs11's ``session`` is one this function list knows.

        A module may hand each C_GetFunctionList caller an instance of its own, with its own
        sessions (p11-kit's proxy does); signing here would then fail on every session.
        """
        return int(self._info(session.handle, ctypes.byref(_SessionInfo()))) == 0

    def logged_out(self, session: Any) -> bool:
        """Whether python-pkcs11's ``session`` is open without the user's login (False if the
        module cannot say: the caller then goes on as if it were logged in)."""
        info = _SessionInfo()
        if int(self._info(session.handle, ctypes.byref(info))):
            return False
        return int(info.state) not in _USER_STATES

    def read_number(self, obj: Any, attribute: int, size: int = ctypes.sizeof(_ULONG)) -> int:
        """python-pkcs11 object ``obj``'s ``attribute``, a CK_ULONG (or a CK_BBOOL: ``size`` 1),
        read in one call: the exception for the module's own answer if it is an error."""
        if self._read is None:
            raise p11.FunctionNotSupported()
        value: ctypes.c_ulong | ctypes.c_ubyte = _ULONG() if size > 1 else ctypes.c_ubyte()
        template = _Attribute(attribute, ctypes.cast(ctypes.byref(value), ctypes.c_void_p), ctypes.sizeof(value))
        rv = int(self._read(obj.session.handle, obj.handle, ctypes.byref(template), 1))
        if rv:
            raise error(rv)
        return int(value.value)

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
            if rv == CKR_BUFFER_TOO_SMALL:
                # The module wants more than it said it would: the operation is still active, and
                # only closing the session ends it. OperationActive has the cluster replace the session.
                raise p11.OperationActive()
        if rv:
            raise error(rv)
        return ctypes.string_at(out, size.value)


def sign_with(signer: Signer | None, key: Any, mechanism: Mechanism, param: Any, data: bytes) -> bytes:
    """A signature by ``key``: through ``signer`` if there is one and it takes ``mechanism``,
    else by python-pkcs11's ``Key.sign`` (with ``param``)."""
    if signer is not None and mechanism in Signer.MECHANISMS:
        return signer.sign(key, mechanism, data)
    return bytes(key.sign(data, mechanism=mechanism, mechanism_param=param))

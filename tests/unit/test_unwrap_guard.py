"""router.pkcs11._guard against a module that answers badly: a check that only warns must never
size a buffer from a length it cannot trust, nor take a failure for "no template".

The real module's answers are tested in tests/integration/test_wrapping_guard.py.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace
from typing import Any

import pytest
from pkcs11 import exceptions as p11

from router.pkcs11 import _guard

UNAVAILABLE = ctypes.c_ulong(-1).value


def _module(answer: Any) -> tuple[_guard.UnwrapGuard, list[Any]]:
    """An UnwrapGuard on a function list whose C_GetAttributeValue is ``answer(call, attribute)``."""
    calls: list[int] = []

    def get(session: int, handle: int, template: Any, count: int) -> int:
        calls.append(len(calls))
        return int(answer(len(calls), template[0]))

    def create(*_args: Any) -> int:
        return 0

    keep = [_guard._GetAttributeValue(get), _guard._CreateObject(create)]
    table = (ctypes.c_void_p * 80)()
    table[1 + _guard._GET_ATTRIBUTE_VALUE] = ctypes.cast(keep[0], ctypes.c_void_p)
    table[1 + _guard._CREATE_OBJECT] = ctypes.cast(keep[1], ctypes.c_void_p)
    guard = _guard.UnwrapGuard(ctypes.addressof(table))
    return guard, [keep, table, calls]


KEY = SimpleNamespace(handle=7, session=SimpleNamespace(handle=3))


def test_no_such_attribute_is_no_template() -> None:
    guard, _ = _module(lambda call, attribute: 0x12)  # CKR_ATTRIBUTE_TYPE_INVALID
    assert guard.unwrap_template(KEY) is None and not guard.guards(KEY)


@pytest.mark.parametrize("length", [UNAVAILABLE, 1 << 40, 65 * ctypes.sizeof(_guard._Attribute)])
def test_a_template_length_no_gateway_wrote_sizes_no_buffer(length: int) -> None:
    def answer(call: int, attribute: Any) -> int:
        attribute.length = length
        return 0

    guard, _ = _module(answer)
    assert guard.unwrap_template(KEY) is None


@pytest.mark.parametrize("length", [UNAVAILABLE, 1 << 40])
def test_an_entry_length_no_gateway_wrote_sizes_no_buffer(length: int) -> None:
    size = ctypes.sizeof(_guard._Attribute)

    def answer(call: int, attribute: Any) -> int:
        if call == 1:
            attribute.length = 2 * size
        else:
            entries = ctypes.cast(attribute.value, ctypes.POINTER(_guard._Attribute))
            entries[0].type, entries[0].length = 0x103, 1
            entries[1].type, entries[1].length = 0x210, length
        return 0

    guard, _ = _module(answer)
    assert guard.unwrap_template(KEY) is None


def test_a_failing_module_is_an_error_not_a_missing_template() -> None:
    guard, _ = _module(lambda call, attribute: 0x30)  # CKR_DEVICE_ERROR
    with pytest.raises(p11.DeviceError):
        guard.unwrap_template(KEY)

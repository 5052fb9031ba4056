"""router.pkcs11._material on a module that keeps no CKA_PUBLIC_EXPONENT on an RSA private key
(it is optional there): the modulus still says whose key it is."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import Attribute
from pkcs11 import exceptions as p11

from router.errors import KeyRecordMismatch
from router.model import KeyAlgorithm
from router.pkcs11._material import check_unwrapped
from tests.support import placement


class _PrivateKey:
    """An unwrapped RSA private key object whose module answers no public exponent."""

    def __init__(self, modulus: int) -> None:
        self._modulus = modulus

    def __getitem__(self, attribute: Attribute) -> Any:
        if attribute is Attribute.MODULUS:
            return self._modulus.to_bytes(256, "big")
        raise p11.AttributeTypeInvalid()


def test_an_rsa_key_without_its_exponent_is_judged_by_its_modulus() -> None:
    ours = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    record = placement("app/rsa", KeyAlgorithm.RSA_2048)
    check_unwrapped(_PrivateKey(ours.public_numbers().n), record, ours)
    with pytest.raises(KeyRecordMismatch, match="its public key is not its wrapped private key's"):
        check_unwrapped(_PrivateKey(other.public_numbers().n), record, ours)

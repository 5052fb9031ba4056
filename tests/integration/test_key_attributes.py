"""Least privilege, read back from the token: what a key created through the gateway may do.

The gateway promises (``router/pkcs11/_keys.py``) that a key gets only the
capabilities of its usage, that private and secret keys are sensitive and never
extractable, and that every object carries CKA_ID = CKA_LABEL = the key id. An
operator with the user PIN and any PKCS #11 tool sees exactly what these tests
read with python-pkcs11, bypassing the gateway.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11

from hsmgw.v1 import crypto_pb2 as pb
from router.model import USAGES, KeyAlgorithm, KeyUsage
from tests.support import unique

GENERATE_TIMEOUT = 120
CLUSTERS = ("use1-a", "use1-b", "usw2-a")

KeyName = str
KEY_SPECS: dict[KeyName, tuple[KeyAlgorithm, KeyUsage]] = {
    f"{algorithm.value}/{usage.value}": (algorithm, usage) for algorithm in KeyAlgorithm for usage in USAGES[algorithm]
}
ASYMMETRIC = [name for name, (algorithm, _) in KEY_SPECS.items() if algorithm.is_asymmetric]
SIGNING = [name for name in ASYMMETRIC if KEY_SPECS[name][1] is KeyUsage.SIGN_VERIFY]
ENCRYPTING = [name for name in ASYMMETRIC if KEY_SPECS[name][1] is KeyUsage.ENCRYPT_DECRYPT]
AES_KEY = f"{KeyAlgorithm.AES_256.value}/{KeyUsage.ENCRYPT_DECRYPT.value}"
HMAC_KEY = f"{KeyAlgorithm.HMAC_SHA256.value}/{KeyUsage.MAC.value}"

_TRANSIENT = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _generate(crypto, key_id: str, algorithm: KeyAlgorithm, usage: KeyUsage) -> pb.Key:
    """GenerateKey as a careful client does it: a busy gateway gets a retry with the same request_id."""
    request = pb.GenerateKeyRequest(
        request_id=key_id,
        key_id=key_id,
        algorithm=pb.KeyAlgorithm.Value("KEY_ALGORITHM_" + algorithm.value),
        usage=pb.KeyUsage.Value("KEY_USAGE_" + usage.value),
    )
    for _ in range(10):
        try:
            return crypto.GenerateKey(request, timeout=GENERATE_TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() not in _TRANSIENT:
                raise
            time.sleep(1.0)
    return crypto.GenerateKey(request, timeout=GENERATE_TIMEOUT)


@pytest.fixture(scope="module")
def keys(crypto) -> dict[KeyName, pb.Key]:
    """One key of every (algorithm, usage) the model allows, created through the gateway."""
    prefix = unique("attrs")

    def generate(name: KeyName) -> pb.Key:
        algorithm, usage = KEY_SPECS[name]
        return _generate(crypto, f"{prefix}/{name.lower().replace('_', '-')}", algorithm, usage)

    names = sorted(KEY_SPECS, key=lambda n: "4096" not in n)  # slowest first
    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(names, pool.map(generate, names)))


def _objects(tokens, key: pb.Key) -> dict[ObjectClass, Any]:
    """The key's objects on its primary cluster, one per class."""
    found = tokens.objects(key.primary_cluster, key.key_id)
    by_class = {obj.object_class: obj for obj in found}
    assert len(by_class) == len(found), f"duplicate objects for {key.key_id}: {found}"
    return by_class


def _attributes(obj: Any, names: list[Attribute]) -> dict[Attribute, Any]:
    return {name: obj[name] for name in names}


def _assert_attributes(obj: Any, expected: dict[Attribute, Any], what: str) -> None:
    actual = _attributes(obj, list(expected))
    wrong = {attr.name: (actual[attr], want) for attr, want in expected.items() if actual[attr] != want}
    assert not wrong, f"{what}: attribute (actual, expected): {wrong}"


@pytest.mark.parametrize("name", list(KEY_SPECS))
def test_objects_are_token_objects_named_by_the_key_id(keys, tokens, name: KeyName) -> None:
    key = keys[name]
    algorithm, _ = KEY_SPECS[name]
    objects = _objects(tokens, key)
    expected_classes = (
        {ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY} if algorithm.is_asymmetric else {ObjectClass.SECRET_KEY}
    )
    assert set(objects) == expected_classes
    for cls, obj in objects.items():
        assert bytes(obj[Attribute.ID]) == key.key_id.encode(), cls
        assert obj[Attribute.LABEL] == key.key_id, cls
        assert obj[Attribute.TOKEN] is True, f"{cls} is a session object: it would vanish"

    # Found by CKA_ID alone, as the gateway and every replica look keys up.
    by_id = list(tokens.session(key.primary_cluster).get_objects({Attribute.ID: key.key_id.encode()}))
    assert {obj.object_class for obj in by_id} == expected_classes


_KEY_TYPE = {
    KeyAlgorithm.EC_P256: KeyType.EC,
    KeyAlgorithm.EC_P384: KeyType.EC,
    KeyAlgorithm.RSA_2048: KeyType.RSA,
    KeyAlgorithm.RSA_3072: KeyType.RSA,
    KeyAlgorithm.RSA_4096: KeyType.RSA,
    KeyAlgorithm.AES_256: KeyType.AES,
    KeyAlgorithm.HMAC_SHA256: KeyType.GENERIC_SECRET,
}

# What every private or secret key must say, whatever its usage.
_NEVER_LEAVES = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.ALWAYS_SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.NEVER_EXTRACTABLE: True,
    Attribute.DERIVE: False,
    Attribute.UNWRAP: False,
    Attribute.MODIFIABLE: False,
}


@pytest.mark.parametrize("name", SIGNING)
def test_signing_key_can_only_sign_and_verify(keys, tokens, name: KeyName) -> None:
    objects = _objects(tokens, keys[name])
    algorithm, _ = KEY_SPECS[name]
    _assert_attributes(objects[ObjectClass.PRIVATE_KEY], {
        **_NEVER_LEAVES,
        Attribute.KEY_TYPE: _KEY_TYPE[algorithm],
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
    }, f"{name} private key")
    _assert_attributes(objects[ObjectClass.PUBLIC_KEY], {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.KEY_TYPE: _KEY_TYPE[algorithm],
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: False,
        Attribute.WRAP: False,
        Attribute.DERIVE: False,
        Attribute.MODIFIABLE: False,
    }, f"{name} public key")


@pytest.mark.parametrize("name", ENCRYPTING)
def test_rsa_encryption_key_can_only_encrypt_and_decrypt(keys, tokens, name: KeyName) -> None:
    objects = _objects(tokens, keys[name])
    _assert_attributes(objects[ObjectClass.PRIVATE_KEY], {
        **_NEVER_LEAVES,
        Attribute.KEY_TYPE: KeyType.RSA,
        Attribute.DECRYPT: True,
        Attribute.SIGN: False,
    }, f"{name} private key")
    _assert_attributes(objects[ObjectClass.PUBLIC_KEY], {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.KEY_TYPE: KeyType.RSA,
        Attribute.ENCRYPT: True,
        Attribute.VERIFY: False,
        Attribute.WRAP: False,
        Attribute.DERIVE: False,
        Attribute.MODIFIABLE: False,
    }, f"{name} public key")


@pytest.mark.parametrize("name", ASYMMETRIC)
def test_asymmetric_key_size_matches_the_algorithm(keys, tokens, name: KeyName) -> None:
    objects = _objects(tokens, keys[name])
    algorithm, _ = KEY_SPECS[name]
    public = objects[ObjectClass.PUBLIC_KEY]
    if algorithm.is_rsa:
        bits = int(algorithm.value.removeprefix("RSA_"))
        assert public[Attribute.MODULUS_BITS] == bits
        assert len(public[Attribute.MODULUS]) * 8 == bits
        assert int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big") == 65537
    else:
        from pkcs11.util.ec import encode_named_curve_parameters

        curve = {KeyAlgorithm.EC_P256: "secp256r1", KeyAlgorithm.EC_P384: "secp384r1"}[algorithm]
        assert bytes(public[Attribute.EC_PARAMS]) == encode_named_curve_parameters(curve)
        assert bytes(objects[ObjectClass.PRIVATE_KEY][Attribute.EC_PARAMS]) == encode_named_curve_parameters(curve)


def test_aes_key_can_only_encrypt_and_decrypt(keys, tokens) -> None:
    objects = _objects(tokens, keys[AES_KEY])
    _assert_attributes(objects[ObjectClass.SECRET_KEY], {
        **_NEVER_LEAVES,
        Attribute.KEY_TYPE: KeyType.AES,
        Attribute.VALUE_LEN: 32,
        Attribute.ENCRYPT: True,
        Attribute.DECRYPT: True,
        Attribute.SIGN: False,
        Attribute.VERIFY: False,
        Attribute.WRAP: False,
    }, "AES key")


def test_hmac_key_can_only_sign_and_verify(keys, tokens) -> None:
    objects = _objects(tokens, keys[HMAC_KEY])
    _assert_attributes(objects[ObjectClass.SECRET_KEY], {
        **_NEVER_LEAVES,
        Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
        Attribute.VALUE_LEN: 32,
        Attribute.SIGN: True,
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: False,
        Attribute.DECRYPT: False,
        Attribute.WRAP: False,
    }, "HMAC key")


_SECRET_PARTS = {
    KeyType.RSA: (Attribute.PRIVATE_EXPONENT, Attribute.PRIME_1, Attribute.PRIME_2),
    KeyType.EC: (Attribute.VALUE,),
    KeyType.AES: (Attribute.VALUE,),
    KeyType.GENERIC_SECRET: (Attribute.VALUE,),
}


@pytest.mark.parametrize("name", list(KEY_SPECS))
def test_key_material_cannot_be_read_from_the_token(keys, tokens, name: KeyName) -> None:
    objects = _objects(tokens, keys[name])
    secret = objects.get(ObjectClass.PRIVATE_KEY) or objects[ObjectClass.SECRET_KEY]
    for attribute in _SECRET_PARTS[secret[Attribute.KEY_TYPE]]:
        with pytest.raises(p11.AttributeSensitive):
            secret[attribute]


@pytest.mark.parametrize("name", [SIGNING[0], ENCRYPTING[0], AES_KEY, HMAC_KEY])
def test_capabilities_cannot_be_widened_later(keys, tokens, name: KeyName) -> None:
    """CKA_MODIFIABLE false: nobody with the user PIN can turn a signing key into a decryption key."""
    objects = _objects(tokens, keys[name])
    secret = objects.get(ObjectClass.PRIVATE_KEY) or objects[ObjectClass.SECRET_KEY]
    usage = KEY_SPECS[name][1]
    forbidden = Attribute.DECRYPT if usage is not KeyUsage.ENCRYPT_DECRYPT else Attribute.SIGN
    with pytest.raises(p11.PKCS11Error):
        secret[forbidden] = True
    assert secret[forbidden] is False
    with pytest.raises(p11.PKCS11Error):
        secret[Attribute.EXTRACTABLE] = True
    assert secret[Attribute.EXTRACTABLE] is False


@pytest.mark.parametrize("name", list(KEY_SPECS))
def test_key_lives_only_on_its_primary_cluster(keys, tokens, name: KeyName) -> None:
    key = keys[name]
    assert key.primary_cluster in CLUSTERS and list(key.replicas) == []
    for cluster in CLUSTERS:
        if cluster != key.primary_cluster:
            assert tokens.objects(cluster, key.key_id) == [], f"{key.key_id} also on {cluster}"

"""Least privilege, read back from the token: what a key created through the gateway may do.

Keys are created through the real gateway, then read with python-pkcs11 straight
from the SoftHSM token, as an operator with the user PIN and any PKCS #11 tool
would see them. A key gets only the capabilities of its usage; private and secret
keys are sensitive; a key may leave its HSM only wrapped under the cluster's
trusted wrapping key (for replication), or never, if created ``non_extractable``;
every object carries CKA_ID = CKA_LABEL = the key id.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.util.ec import encode_named_curve_parameters

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

# The default key may leave its HSM wrapped under the trusted replication key;
# a non_extractable one never leaves it.
REPLICABLE, NON_EXTRACTABLE = "replicable", "non-extractable"
VARIANTS = (REPLICABLE, NON_EXTRACTABLE)

_KEY_TYPE = {
    KeyAlgorithm.EC_P256: KeyType.EC,
    KeyAlgorithm.EC_P384: KeyType.EC,
    KeyAlgorithm.RSA_2048: KeyType.RSA,
    KeyAlgorithm.RSA_3072: KeyType.RSA,
    KeyAlgorithm.RSA_4096: KeyType.RSA,
    KeyAlgorithm.AES_256: KeyType.AES,
    KeyAlgorithm.HMAC_SHA256: KeyType.GENERIC_SECRET,
}

_TRANSIENT = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _generate(crypto, key_id: str, algorithm: KeyAlgorithm, usage: KeyUsage, non_extractable: bool) -> pb.Key:
    """GenerateKey as a careful client does it: a busy gateway gets a retry with the same request_id."""
    request = pb.GenerateKeyRequest(
        request_id=key_id,
        key_id=key_id,
        algorithm=pb.KeyAlgorithm.Value("KEY_ALGORITHM_" + algorithm.value),
        usage=pb.KeyUsage.Value("KEY_USAGE_" + usage.value),
        non_extractable=non_extractable,
        # A key that never leaves its HSM cannot be replicated: ask for one copy.
        replication=pb.ReplicationPolicy(copies=1 if non_extractable else 0),
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
def keys(crypto) -> dict[tuple[KeyName, str], pb.Key]:
    """One key of every (algorithm, usage) the model allows, in both variants, made through the gateway."""
    prefix = unique("attrs")
    wanted = [(name, variant) for name in KEY_SPECS for variant in VARIANTS]

    def generate(item: tuple[KeyName, str]) -> pb.Key:
        name, variant = item
        algorithm, usage = KEY_SPECS[name]
        key_id = f"{prefix}/{variant}/{name.lower().replace('_', '-')}"
        return _generate(crypto, key_id, algorithm, usage, non_extractable=variant == NON_EXTRACTABLE)

    wanted.sort(key=lambda item: "4096" not in item[0])  # slowest first
    with ThreadPoolExecutor(max_workers=3) as pool:
        created = dict(zip(wanted, pool.map(generate, wanted), strict=True))
    for (name, variant), key in created.items():
        assert key.non_extractable == (variant == NON_EXTRACTABLE), (name, variant)
    return created


def _holders(key: pb.Key) -> tuple[str, ...]:
    return (key.primary_cluster, *key.replicas)


def _objects(tokens, cluster: str, key: pb.Key) -> dict[ObjectClass, Any]:
    """The key's objects on one cluster, by class."""
    found = tokens.objects(cluster, key.key_id)
    by_class = {obj.object_class: obj for obj in found}
    assert len(by_class) == len(found), f"duplicate objects for {key.key_id} on {cluster}: {found}"
    return by_class


def _every_copy(tokens, key: pb.Key) -> Iterator[tuple[str, dict[ObjectClass, Any]]]:
    """Each cluster holding the key, with its objects there: every replica must be as tight."""
    for cluster in _holders(key):
        yield cluster, _objects(tokens, cluster, key)


def _assert_attributes(obj: Any, expected: dict[Attribute, Any], what: str) -> None:
    actual = {attr: obj[attr] for attr in expected}
    wrong = {attr.name: (actual[attr], want) for attr, want in expected.items() if actual[attr] != want}
    assert not wrong, f"{what}: attribute (actual, expected): {wrong}"


def _private_base(variant: str) -> dict[Attribute, Any]:
    """What every private or secret key must say, whatever its usage."""
    base = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.DERIVE: False,
        Attribute.UNWRAP: False,
        Attribute.MODIFIABLE: False,
    }
    if variant == NON_EXTRACTABLE:
        # Never replicated, so its only copy was generated in the HSM.
        return {**base, Attribute.EXTRACTABLE: False, Attribute.NEVER_EXTRACTABLE: True,
                Attribute.ALWAYS_SENSITIVE: True}
    # Extractable only under a trusted wrapping key, never in the clear.
    return {**base, Attribute.EXTRACTABLE: True, Attribute.WRAP_WITH_TRUSTED: True}


def _public_base(algorithm: KeyAlgorithm) -> dict[Attribute, Any]:
    return {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.KEY_TYPE: _KEY_TYPE[algorithm],
        Attribute.WRAP: False,
        Attribute.DERIVE: False,
        Attribute.MODIFIABLE: False,
    }


def _cases(names: list[KeyName]) -> list[Any]:
    return [pytest.param(name, variant, id=f"{name}-{variant}") for name in names for variant in VARIANTS]


@pytest.mark.parametrize(("name", "variant"), _cases(list(KEY_SPECS)))
def test_objects_are_token_objects_named_by_the_key_id(keys, tokens, name: KeyName, variant: str) -> None:
    key = keys[name, variant]
    algorithm, _ = KEY_SPECS[name]
    expected_classes = (
        {ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY} if algorithm.is_asymmetric else {ObjectClass.SECRET_KEY}
    )
    for cluster, objects in _every_copy(tokens, key):
        assert set(objects) == expected_classes, cluster
        for cls, obj in objects.items():
            assert bytes(obj[Attribute.ID]) == key.key_id.encode(), (cluster, cls)
            assert obj[Attribute.LABEL] == key.key_id, (cluster, cls)
            assert obj[Attribute.TOKEN] is True, f"{cls} on {cluster} is a session object: it would vanish"
        # Found by CKA_ID alone, as the gateway and every replica look keys up.
        by_id = list(tokens.session(cluster).get_objects({Attribute.ID: key.key_id.encode()}))
        assert {obj.object_class for obj in by_id} == expected_classes, cluster
    for cluster in set(CLUSTERS) - set(_holders(key)):
        assert tokens.objects(cluster, key.key_id) == [], f"{key.key_id} also on {cluster}"


@pytest.mark.parametrize(("name", "variant"), _cases(SIGNING))
def test_signing_key_can_only_sign_and_verify(keys, tokens, name: KeyName, variant: str) -> None:
    algorithm, _ = KEY_SPECS[name]
    for cluster, objects in _every_copy(tokens, keys[name, variant]):
        _assert_attributes(objects[ObjectClass.PRIVATE_KEY], {
            **_private_base(variant),
            Attribute.KEY_TYPE: _KEY_TYPE[algorithm],
            Attribute.SIGN: True,
            Attribute.DECRYPT: False,
        }, f"{name} private key on {cluster}")
        _assert_attributes(objects[ObjectClass.PUBLIC_KEY], {
            **_public_base(algorithm),
            Attribute.VERIFY: True,
            Attribute.ENCRYPT: False,
        }, f"{name} public key on {cluster}")


@pytest.mark.parametrize(("name", "variant"), _cases(ENCRYPTING))
def test_rsa_encryption_key_can_only_encrypt_and_decrypt(keys, tokens, name: KeyName, variant: str) -> None:
    algorithm, _ = KEY_SPECS[name]
    for cluster, objects in _every_copy(tokens, keys[name, variant]):
        _assert_attributes(objects[ObjectClass.PRIVATE_KEY], {
            **_private_base(variant),
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.DECRYPT: True,
            Attribute.SIGN: False,
        }, f"{name} private key on {cluster}")
        _assert_attributes(objects[ObjectClass.PUBLIC_KEY], {
            **_public_base(algorithm),
            Attribute.ENCRYPT: True,
            Attribute.VERIFY: False,
        }, f"{name} public key on {cluster}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_aes_key_can_only_encrypt_and_decrypt(keys, tokens, variant: str) -> None:
    for cluster, objects in _every_copy(tokens, keys[AES_KEY, variant]):
        _assert_attributes(objects[ObjectClass.SECRET_KEY], {
            **_private_base(variant),
            Attribute.KEY_TYPE: KeyType.AES,
            # SoftHSM 2.6 reports VALUE_LEN 0 on an unwrapped copy (and refuses it on unwrap).
            **({Attribute.VALUE_LEN: 32} if cluster == keys[AES_KEY, variant].primary_cluster else {}),
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
            Attribute.SIGN: False,
            Attribute.VERIFY: False,
            Attribute.WRAP: False,
        }, f"AES key on {cluster}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_hmac_key_can_only_sign_and_verify(keys, tokens, variant: str) -> None:
    for cluster, objects in _every_copy(tokens, keys[HMAC_KEY, variant]):
        _assert_attributes(objects[ObjectClass.SECRET_KEY], {
            **_private_base(variant),
            Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
            **({Attribute.VALUE_LEN: 32} if cluster == keys[HMAC_KEY, variant].primary_cluster else {}),
            Attribute.SIGN: True,
            Attribute.VERIFY: True,
            Attribute.ENCRYPT: False,
            Attribute.DECRYPT: False,
            Attribute.WRAP: False,
        }, f"HMAC key on {cluster}")


@pytest.mark.parametrize("name", ASYMMETRIC)
def test_asymmetric_key_size_matches_the_algorithm(keys, tokens, name: KeyName) -> None:
    algorithm, _ = KEY_SPECS[name]
    objects = _objects(tokens, keys[name, REPLICABLE].primary_cluster, keys[name, REPLICABLE])
    public = objects[ObjectClass.PUBLIC_KEY]
    if algorithm.is_rsa:
        bits = int(algorithm.value.removeprefix("RSA_"))
        assert public[Attribute.MODULUS_BITS] == bits
        assert len(public[Attribute.MODULUS]) * 8 == bits
        assert int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big") == 65537
    else:
        curve = {KeyAlgorithm.EC_P256: "secp256r1", KeyAlgorithm.EC_P384: "secp384r1"}[algorithm]
        for obj in objects.values():
            assert bytes(obj[Attribute.EC_PARAMS]) == encode_named_curve_parameters(curve)


_SECRET_PARTS = {
    KeyType.RSA: (Attribute.PRIVATE_EXPONENT, Attribute.PRIME_1, Attribute.PRIME_2),
    KeyType.EC: (Attribute.VALUE,),
    KeyType.AES: (Attribute.VALUE,),
    KeyType.GENERIC_SECRET: (Attribute.VALUE,),
}


def _secret(objects: dict[ObjectClass, Any]) -> Any:
    return objects.get(ObjectClass.PRIVATE_KEY) or objects[ObjectClass.SECRET_KEY]


@pytest.mark.parametrize(("name", "variant"), _cases(list(KEY_SPECS)))
def test_key_material_cannot_be_read_from_the_token(keys, tokens, name: KeyName, variant: str) -> None:
    for _, objects in _every_copy(tokens, keys[name, variant]):
        secret = _secret(objects)
        for attribute in _SECRET_PARTS[secret[Attribute.KEY_TYPE]]:
            with pytest.raises(p11.AttributeSensitive):
                secret[attribute]


@pytest.fixture(scope="module")
def untrusted_wrapping_keys(tokens) -> Iterator[dict[str, Any]]:
    """An AES wrapping key per cluster that anyone with the user PIN could make (not CKA_TRUSTED)."""
    made = {
        cluster: tokens.session(cluster).generate_key(
            KeyType.AES, 256, store=False, label="untrusted-wrapper",
            capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP | MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
        )
        for cluster in CLUSTERS
    }
    yield made
    for key in made.values():
        key.destroy()


@pytest.mark.parametrize(("name", "variant"), _cases(list(KEY_SPECS)))
def test_key_cannot_be_wrapped_by_an_untrusted_key(
    keys, tokens, untrusted_wrapping_keys, name: KeyName, variant: str
) -> None:
    """Export under a key of one's own choosing would hand the key material to whoever holds the PIN."""
    refusal = p11.KeyUnextractable if variant == NON_EXTRACTABLE else p11.KeyNotWrappable
    for cluster, objects in _every_copy(tokens, keys[name, variant]):
        with pytest.raises(refusal):
            untrusted_wrapping_keys[cluster].wrap_key(_secret(objects), mechanism=Mechanism.AES_KEY_WRAP_PAD)


@pytest.mark.parametrize(("name", "variant"), _cases([SIGNING[0], ENCRYPTING[0], AES_KEY, HMAC_KEY]))
def test_capabilities_cannot_be_widened_later(keys, tokens, name: KeyName, variant: str) -> None:
    """CKA_MODIFIABLE false: nobody with the user PIN turns a signing key into a decryption key."""
    usage = KEY_SPECS[name][1]
    forbidden = Attribute.SIGN if usage is KeyUsage.ENCRYPT_DECRYPT else Attribute.DECRYPT
    # The one attribute a PIN holder would flip to get the key out.
    exportable, locked = (
        (Attribute.EXTRACTABLE, False) if variant == NON_EXTRACTABLE else (Attribute.WRAP_WITH_TRUSTED, True)
    )
    for cluster, objects in _every_copy(tokens, keys[name, variant]):
        secret = _secret(objects)
        with pytest.raises(p11.PKCS11Error):
            secret[forbidden] = True
        assert secret[forbidden] is False, cluster
        with pytest.raises(p11.PKCS11Error):
            secret[exportable] = not locked
        assert secret[exportable] is locked, cluster
        # Nor through a copy made with wider attributes (C_CopyObject).
        for widened in ({forbidden: True}, {exportable: not locked}):
            try:
                copy = secret.copy({**widened, Attribute.TOKEN: False, Attribute.LABEL: "widened-copy"})
            except p11.PKCS11Error:
                continue
            copy.destroy()
            pytest.fail(f"{name} on {cluster}: a copy with {widened} was allowed")


@pytest.mark.parametrize("name", ASYMMETRIC)
def test_recovery_operations_are_off(keys, tokens, name: KeyName) -> None:
    """C_SignRecover with CKM_RSA_X_509 is a raw private-key operation: a signature from a decryption key."""
    enabled = _recovery_enabled(tokens, [keys[name, variant] for variant in VARIANTS])
    assert not enabled, f"recovery operations left on: {enabled}"


def _recovery_enabled(tokens, keys: list[pb.Key]) -> list[str]:
    # Plain strings out, so a failure's traceback keeps no PKCS #11 objects alive.
    found = []
    for key in keys:
        for cluster, objects in _every_copy(tokens, key):
            if objects[ObjectClass.PRIVATE_KEY][Attribute.SIGN_RECOVER]:
                found.append(f"{key.key_id} private key on {cluster}: CKA_SIGN_RECOVER")
            if objects[ObjectClass.PUBLIC_KEY][Attribute.VERIFY_RECOVER]:
                found.append(f"{key.key_id} public key on {cluster}: CKA_VERIFY_RECOVER")
    return found


def test_non_extractable_key_with_replication_is_refused(crypto) -> None:
    import grpc

    from tests.support import rpc_error, unique

    key_id = unique("nx-repl")
    err = rpc_error(crypto.GenerateKey, pb.GenerateKeyRequest(
        request_id=key_id, key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256, non_extractable=True,
        replication=pb.ReplicationPolicy(copies=2)), timeout=30)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot be replicated" in err.details()


@pytest.mark.parametrize(("name", "variant"), [(n, "replicable") for n in (*SIGNING, AES_KEY, HMAC_KEY)])
def test_primary_was_born_sensitive_and_replicas_came_wrapped(keys, tokens, name, variant) -> None:
    """PKCS #11 marks an unwrapped copy as not ALWAYS_SENSITIVE: it once left an HSM, wrapped."""
    key = keys[name, variant]
    assert key.replicas, "the default policy replicates"
    secret_class = ObjectClass.PRIVATE_KEY if KEY_SPECS[name][0].is_asymmetric else ObjectClass.SECRET_KEY
    primary = _objects(tokens, key.primary_cluster, key)[secret_class]
    assert primary[Attribute.ALWAYS_SENSITIVE] is True
    for replica in key.replicas:
        copy = _objects(tokens, replica, key)[secret_class]
        assert copy[Attribute.SENSITIVE] is True
        assert copy[Attribute.ALWAYS_SENSITIVE] is False

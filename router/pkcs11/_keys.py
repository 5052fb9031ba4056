"""Key templates and mechanisms: what each algorithm and usage means in PKCS #11.

Least privilege: a key gets only the capabilities of its usage; private and
secret keys are sensitive and never extractable. Token objects carry
CKA_ID = CKA_LABEL = the key id, so every replica can be found the same way.
"""

from __future__ import annotations

from typing import Any

from asn1crypto import keys as asn1_keys
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from router.model import KeyAlgorithm, KeyUsage, Operation

CURVES = {KeyAlgorithm.EC_P256: "secp256r1", KeyAlgorithm.EC_P384: "secp384r1"}
RSA_BITS = {KeyAlgorithm.RSA_2048: 2048, KeyAlgorithm.RSA_3072: 3072, KeyAlgorithm.RSA_4096: 4096}

# DER DigestInfo prefix for SHA-256 (RFC 8017, section 9.2, note 1).
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")

_PRIVATE_BASE = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.DERIVE: False,
    Attribute.UNWRAP: False,
    Attribute.MODIFIABLE: False,
}
# Secret keys may carry WRAP too (private keys may not: SoftHSM refuses it).
_SECRET_BASE = {**_PRIVATE_BASE, Attribute.WRAP: False}

_PUBLIC_BASE = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.WRAP: False,
    Attribute.DERIVE: False,
    Attribute.MODIFIABLE: False,
}


def _private_template(usage: KeyUsage) -> dict[Attribute, Any]:
    signs = usage is KeyUsage.SIGN_VERIFY
    return {**_PRIVATE_BASE, Attribute.SIGN: signs, Attribute.DECRYPT: not signs}


def _public_template(usage: KeyUsage) -> dict[Attribute, Any]:
    signs = usage is KeyUsage.SIGN_VERIFY
    return {**_PUBLIC_BASE, Attribute.VERIFY: signs, Attribute.ENCRYPT: not signs}


def _capabilities(usage: KeyUsage) -> MechanismFlag:
    if usage is KeyUsage.SIGN_VERIFY or usage is KeyUsage.MAC:
        return MechanismFlag.SIGN | MechanismFlag.VERIFY
    return MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT


def generate(session: Any, key_id: str, algorithm: KeyAlgorithm, usage: KeyUsage) -> None:
    """Create the key's token objects in ``session``."""
    ident = key_id.encode()
    caps = _capabilities(usage)
    if algorithm.is_ec:
        params = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters(CURVES[algorithm])},
            local=True,
        )
        params.generate_keypair(
            id=ident,
            label=key_id,
            store=True,
            capabilities=caps,
            public_template=_public_template(usage),
            private_template=_private_template(usage),
        )
    elif algorithm.is_rsa:
        session.generate_keypair(
            KeyType.RSA,
            RSA_BITS[algorithm],
            id=ident,
            label=key_id,
            store=True,
            capabilities=caps,
            public_template=_public_template(usage),
            private_template=_private_template(usage),
        )
    elif algorithm is KeyAlgorithm.AES_256:
        session.generate_key(
            KeyType.AES,
            256,
            id=ident,
            label=key_id,
            store=True,
            capabilities=caps,
            template={
                **_SECRET_BASE,
                Attribute.ENCRYPT: True,
                Attribute.DECRYPT: True,
                Attribute.SIGN: False,
                Attribute.VERIFY: False,
            },
        )
    elif algorithm is KeyAlgorithm.HMAC_SHA256:
        session.generate_key(
            KeyType.GENERIC_SECRET,
            256,
            id=ident,
            label=key_id,
            store=True,
            capabilities=caps,
            mechanism=Mechanism.GENERIC_SECRET_KEY_GEN,
            template={
                **_SECRET_BASE,
                Attribute.ENCRYPT: False,
                Attribute.DECRYPT: False,
                Attribute.SIGN: True,
                Attribute.VERIFY: True,
            },
        )
    else:  # pragma: no cover - the enum is closed
        raise ValueError(f"unknown algorithm {algorithm}")


def public_key_der(public_key: Any, algorithm: KeyAlgorithm) -> bytes:
    """SubjectPublicKeyInfo DER of a public key object."""
    if algorithm.is_ec:
        return bytes(encode_ec_public_key(public_key))
    modulus = int.from_bytes(public_key[Attribute.MODULUS], "big")
    exponent = int.from_bytes(public_key[Attribute.PUBLIC_EXPONENT], "big")
    info = asn1_keys.PublicKeyInfo(
        {
            "algorithm": {"algorithm": "rsa", "parameters": None},
            "public_key": asn1_keys.RSAPublicKey({"modulus": modulus, "public_exponent": exponent}),
        }
    )
    return bytes(info.dump())


def signature_mechanism(op: Operation, digest: bytes) -> tuple[Mechanism, Any, bytes]:
    """(mechanism, parameter, data to sign) for signing a precomputed digest."""
    if op in (Operation.ECDSA_SHA256, Operation.ECDSA_SHA384):
        return Mechanism.ECDSA, None, digest
    if op is Operation.RSA_PKCS1_SHA256:
        return Mechanism.RSA_PKCS, None, SHA256_DIGEST_INFO + digest
    if op is Operation.RSA_PSS_SHA256:
        return Mechanism.RSA_PKCS_PSS, (Mechanism.SHA256, MGF.SHA256, len(digest)), digest
    raise ValueError(f"{op} is not a signature operation")


OAEP_SHA256 = (Mechanism.SHA256, MGF.SHA256, None)

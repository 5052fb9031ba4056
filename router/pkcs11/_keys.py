"""Key templates and mechanisms: what each algorithm and usage means in PKCS #11.

Least privilege: a key gets only the capabilities of its usage; private and
secret keys are sensitive, and extractable only wrapped under a trusted key
(CKA_WRAP_WITH_TRUSTED, for replication) — or never, for non-extractable keys. Token objects carry
CKA_ID = CKA_LABEL = the key id, so every replica can be found the same way.
"""

from __future__ import annotations

from typing import Any

from asn1crypto import core as asn1_core
from asn1crypto import keys as asn1_keys
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.constants import DEFAULT
from pkcs11.util import biginteger
from pkcs11.util.ec import decode_ec_public_key, encode_ec_public_key, encode_named_curve_parameters

from router.model import KeyAlgorithm, KeyUsage, Operation

CURVES = {KeyAlgorithm.EC_P256: "secp256r1", KeyAlgorithm.EC_P384: "secp384r1"}
RSA_BITS = {KeyAlgorithm.RSA_2048: 2048, KeyAlgorithm.RSA_3072: 3072, KeyAlgorithm.RSA_4096: 4096}
SECRET_KEY_BYTES = 32
"""Length of every AES and HMAC key the gateway makes."""

# DER DigestInfo prefix for SHA-256 (RFC 8017, section 9.2, note 1).
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")

_PRIVATE_BASE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.DERIVE: False,
    Attribute.UNWRAP: False,
    Attribute.MODIFIABLE: False,
    # Raw RSA "recover" operations would let any RSA key do raw private-key math.
    Attribute.SIGN_RECOVER: False,
}
# Secret keys may carry WRAP too (private keys may not: SoftHSM refuses it).
_SECRET_BASE: dict[Attribute, Any] = {
    **{k: v for k, v in _PRIVATE_BASE.items() if k is not Attribute.SIGN_RECOVER},
    Attribute.WRAP: False,
}

_PUBLIC_BASE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.WRAP: False,
    Attribute.DERIVE: False,
    Attribute.MODIFIABLE: False,
    Attribute.VERIFY_RECOVER: False,
}


WRAP_MECHANISM = Mechanism.AES_KEY_WRAP_PAD


def _modifiable_last(template: dict[Attribute, Any]) -> dict[Attribute, Any]:
    # SoftHSM applies a template in order and refuses any attribute that comes
    # after CKA_MODIFIABLE = false (AttributeReadOnly) when unwrapping.
    modifiable = template.pop(Attribute.MODIFIABLE, None)
    if modifiable is not None:
        template[Attribute.MODIFIABLE] = modifiable
    return template


def _exportability(extractable: bool) -> dict[Attribute, Any]:
    # Extractable only under a trusted wrapping key: replication, never plaintext. A key that is
    # not extractable carries CKA_WRAP_WITH_TRUSTED too (it changes nothing for it): the wrapping
    # key's unwrap template asks every key unwrapped with it for that value (_guard.GUARD).
    return {Attribute.EXTRACTABLE: extractable, Attribute.WRAP_WITH_TRUSTED: True}


def _private_template(usage: KeyUsage, token: bool, extractable: bool) -> dict[Attribute, Any]:
    signs = usage is KeyUsage.SIGN_VERIFY
    return _modifiable_last({
        **_PRIVATE_BASE,
        **_exportability(extractable),
        Attribute.TOKEN: token,
        Attribute.SIGN: signs,
        Attribute.DECRYPT: not signs,
    })


def public_template(usage: KeyUsage, token: bool) -> dict[Attribute, Any]:
    signs = usage is KeyUsage.SIGN_VERIFY
    return _modifiable_last(
        {**_PUBLIC_BASE, Attribute.TOKEN: token, Attribute.VERIFY: signs, Attribute.ENCRYPT: not signs}
    )


def _secret_template(algorithm: KeyAlgorithm, token: bool, extractable: bool) -> dict[Attribute, Any]:
    mac = algorithm is KeyAlgorithm.HMAC_SHA256
    return _modifiable_last({
        **_SECRET_BASE,
        **_exportability(extractable),
        Attribute.TOKEN: token,
        Attribute.ENCRYPT: not mac,
        Attribute.DECRYPT: not mac,
        Attribute.SIGN: mac,
        Attribute.VERIFY: mac,
    })


def _capabilities(usage: KeyUsage) -> MechanismFlag:
    if usage is KeyUsage.SIGN_VERIFY or usage is KeyUsage.MAC:
        return MechanismFlag.SIGN | MechanismFlag.VERIFY
    return MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT


def secret_class(algorithm: KeyAlgorithm) -> ObjectClass:
    """The class of the object that holds a key's secret: its private key, or the secret key itself."""
    return ObjectClass.PRIVATE_KEY if algorithm.is_asymmetric else ObjectClass.SECRET_KEY


def key_type(algorithm: KeyAlgorithm) -> KeyType:
    if algorithm.is_ec:
        return KeyType.EC
    if algorithm.is_rsa:
        return KeyType.RSA
    return KeyType.AES if algorithm is KeyAlgorithm.AES_256 else KeyType.GENERIC_SECRET


def generate(
    session: Any,
    key_id: str,
    algorithm: KeyAlgorithm,
    usage: KeyUsage,
    *,
    token: bool = True,
    extractable: bool = True,
) -> tuple[Any, Any | None]:
    """Create the key in ``session``: (private or secret key, public key or None)."""
    ident = key_id.encode()
    caps = _capabilities(usage)
    if algorithm.is_asymmetric:
        kwargs = dict(
            id=ident,
            label=key_id,
            store=token,
            capabilities=caps,
            public_template=public_template(usage, token),
            private_template=_private_template(usage, token, extractable),
        )
        if algorithm.is_ec:
            params = session.create_domain_parameters(
                KeyType.EC,
                {Attribute.EC_PARAMS: encode_named_curve_parameters(CURVES[algorithm])},
                local=True,
            )
            public, private = params.generate_keypair(**kwargs)
        else:
            public, private = session.generate_keypair(KeyType.RSA, RSA_BITS[algorithm], **kwargs)
        return private, public
    mechanism = Mechanism.GENERIC_SECRET_KEY_GEN if algorithm is KeyAlgorithm.HMAC_SHA256 else None
    secret = session.generate_key(
        key_type(algorithm),
        SECRET_KEY_BYTES * 8,
        id=ident,
        label=key_id,
        store=token,
        capabilities=caps,
        mechanism=mechanism,
        template=_secret_template(algorithm, token, extractable),
    )
    return secret, None


def unwrap_template(
    algorithm: KeyAlgorithm, usage: KeyUsage, *, token: bool = False, extractable: bool = False
) -> dict[Attribute, Any]:
    """Attributes for unwrapping a key as a session object with least privilege.

    Private keys must not carry ENCRYPT/VERIFY/WRAP at all (SoftHSM answers
    AttributeTypeInvalid), so those defaults are dropped.
    """
    if algorithm.is_asymmetric:
        template = _private_template(usage, token=token, extractable=extractable)
        template.update({Attribute.ENCRYPT: DEFAULT, Attribute.VERIFY: DEFAULT, Attribute.WRAP: DEFAULT})
        return _modifiable_last(template)
    # (SoftHSM 2.6 reports CKA_VALUE_LEN 0 on an unwrapped secret key and
    # refuses it in the unwrap template; the key itself is whole.)
    return _secret_template(algorithm, token=token, extractable=extractable)


def public_key_attributes(spki_der: bytes) -> dict[Attribute, Any]:
    """Attributes to import a SubjectPublicKeyInfo as a public key object."""
    info = asn1_keys.PublicKeyInfo.load(spki_der)
    if info.algorithm == "ec":
        return decode_ec_public_key(spki_der)
    rsa = info["public_key"].parsed
    return {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.KEY_TYPE: KeyType.RSA,
        Attribute.MODULUS: biginteger(rsa["modulus"].native),
        Attribute.PUBLIC_EXPONENT: biginteger(rsa["public_exponent"].native),
    }


def public_key_der(public_key: Any, algorithm: KeyAlgorithm) -> bytes:
    """SubjectPublicKeyInfo DER of a public key object."""
    if algorithm.is_ec:
        return bytes(encode_ec_public_key(public_key))
    modulus = int.from_bytes(public_key[Attribute.MODULUS], "big")
    exponent = int.from_bytes(public_key[Attribute.PUBLIC_EXPONENT], "big")
    info = asn1_keys.PublicKeyInfo(
        {
            # RFC 3279 2.3.1: the parameters of rsaEncryption MUST be NULL.
            "algorithm": {"algorithm": "rsa", "parameters": asn1_core.Null()},
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

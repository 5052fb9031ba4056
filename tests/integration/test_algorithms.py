"""Every key algorithm with every operation it supports, through the real gRPC server.

Signatures and OAEP ciphertexts are checked against an independent implementation
(``cryptography``) wherever the math allows it: the private and secret keys never
leave the HSM, so the other direction is checked through the gateway itself.
Every (key, operation) pair the model does not allow is refused as
FAILED_PRECONDITION, and an algorithm the RPC does not perform as INVALID_ARGUMENT:
never INTERNAL, never NOT_FOUND.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature, encode_dss_signature
from pkcs11 import MGF, Mechanism, ObjectClass
from pkcs11 import exceptions as p11

from hsmgw.v1 import crypto_pb2 as pb
from router.model import OPERATION_KEYS, USAGES, KeyAlgorithm, KeyUsage, Operation
from tests.support import rpc_error, unique

# RSA-4096 generation on SoftHSM takes seconds; everything else is quick.
GENERATE_TIMEOUT = 120
TIMEOUT = 30

# Which operations each RPC performs, written out from the API docs rather than
# imported, so that the test does not mirror the code it checks.
SIGN_OPS = (Operation.ECDSA_SHA256, Operation.ECDSA_SHA384, Operation.RSA_PKCS1_SHA256, Operation.RSA_PSS_SHA256)
CIPHER_OPS = (Operation.RSA_OAEP_SHA256, Operation.AES_GCM)
MAC_OPS = (Operation.HMAC_SHA256,)
RPC_OPS: dict[str, tuple[Operation, ...]] = {
    "Sign": SIGN_OPS,
    "Verify": SIGN_OPS,
    "Encrypt": CIPHER_OPS,
    "Decrypt": CIPHER_OPS,
    "Mac": MAC_OPS,
    "VerifyMac": MAC_OPS,
}

RSA_BITS = {KeyAlgorithm.RSA_2048: 2048, KeyAlgorithm.RSA_3072: 3072, KeyAlgorithm.RSA_4096: 4096}
CURVES = {KeyAlgorithm.EC_P256: ec.SECP256R1, KeyAlgorithm.EC_P384: ec.SECP384R1}

# One key per (algorithm, usage) the model allows, named "RSA_2048/SIGN_VERIFY".
KeyName = str
KEY_SPECS: dict[KeyName, tuple[KeyAlgorithm, KeyUsage]] = {
    f"{algorithm.value}/{usage.value}": (algorithm, usage) for algorithm in KeyAlgorithm for usage in USAGES[algorithm]
}


def _allowed(name: KeyName, op: Operation) -> bool:
    usage, algorithms = OPERATION_KEYS[op]
    algorithm, key_usage = KEY_SPECS[name]
    return key_usage is usage and algorithm in algorithms


def _pb_op(op: Operation) -> int:
    return int(pb.Algorithm.Value("ALGORITHM_" + op.value))


def _pb_key_algorithm(algorithm: KeyAlgorithm) -> int:
    return int(pb.KeyAlgorithm.Value("KEY_ALGORITHM_" + algorithm.value))


def _pb_usage(usage: KeyUsage) -> int:
    return int(pb.KeyUsage.Value("KEY_USAGE_" + usage.value))


def _hash(op: Operation) -> hashes.HashAlgorithm:
    return hashes.SHA384() if op is Operation.ECDSA_SHA384 else hashes.SHA256()


def _flip(data: bytes, index: int = -1) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


_TRANSIENT = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _generate(crypto, key_id: str, algorithm: KeyAlgorithm, usage: KeyUsage) -> pb.Key:
    """GenerateKey as a careful client does it: a busy gateway gets a retry with the same request_id."""
    request = pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, algorithm=_pb_key_algorithm(algorithm),
                                    usage=_pb_usage(usage))
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
    """Every kind of key, created once for the module (a few at a time: RSA-4096 is slow)."""
    prefix = unique("alg")

    def generate(name: KeyName) -> pb.Key:
        algorithm, usage = KEY_SPECS[name]
        return _generate(crypto, f"{prefix}/{name.lower().replace('_', '-')}", algorithm, usage)

    names = sorted(KEY_SPECS, key=lambda n: "4096" not in n)  # slowest first
    with ThreadPoolExecutor(max_workers=3) as pool:
        created = dict(zip(names, pool.map(generate, names), strict=True))
    for name, key in created.items():
        algorithm, usage = KEY_SPECS[name]
        assert key.state == pb.KEY_STATE_ENABLED, name
        assert key.algorithm == _pb_key_algorithm(algorithm), name
        assert key.usage == _pb_usage(usage), name
    return created


def _public_key(crypto, key: pb.Key) -> Any:
    resp = crypto.GetPublicKey(pb.GetPublicKeyRequest(key_id=key.key_id), timeout=TIMEOUT)
    assert resp.key_id == key.key_id
    assert resp.algorithm == key.algorithm
    from_pem = serialization.load_pem_public_key(resp.pem.encode())
    from_der = serialization.load_der_public_key(resp.der)
    assert from_pem.public_numbers() == from_der.public_numbers(), "pem and der describe different keys"
    return from_pem


# -- signatures ---------------------------------------------------------------

SIGNATURE_CASES = [
    pytest.param(name, op, id=f"{name}-{op.value}")
    for op in SIGN_OPS
    for name in KEY_SPECS
    if _allowed(name, op)
]


def _verify_locally(public: Any, op: Operation, signature: bytes, message: bytes) -> None:
    """Raises InvalidSignature unless ``signature`` is good for ``message``."""
    if op in (Operation.ECDSA_SHA256, Operation.ECDSA_SHA384):
        public.verify(signature, message, ec.ECDSA(_hash(op)))
    elif op is Operation.RSA_PKCS1_SHA256:
        public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    elif op is Operation.RSA_PSS_SHA256:
        # Salt length = digest length, MGF1 with the same hash: what the gateway promises.
        public.verify(signature, message, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                      hashes.SHA256())
    else:  # pragma: no cover
        raise AssertionError(op)


def _verify_locally_prehashed(public: Any, op: Operation, signature: bytes, digest: bytes) -> None:
    if op in (Operation.ECDSA_SHA256, Operation.ECDSA_SHA384):
        public.verify(signature, digest, ec.ECDSA(Prehashed(_hash(op))))
    elif op is Operation.RSA_PKCS1_SHA256:
        public.verify(signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    else:
        public.verify(signature, digest, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                      Prehashed(hashes.SHA256()))


def test_signature_cases_cover_the_model() -> None:
    covered = {(KEY_SPECS[name][0], op) for name, op in (p.values for p in SIGNATURE_CASES)}
    expected = {(alg, op) for op in SIGN_OPS for alg in OPERATION_KEYS[op][1]}
    assert covered == expected
    assert set(RPC_OPS["Sign"]) | set(RPC_OPS["Encrypt"]) | set(RPC_OPS["Mac"]) == set(Operation)


@pytest.mark.parametrize("name", [n for n, (alg, _) in KEY_SPECS.items() if alg.is_asymmetric])
def test_public_key_matches_the_algorithm(crypto, keys, name: KeyName) -> None:
    algorithm, _ = KEY_SPECS[name]
    public = _public_key(crypto, keys[name])
    if algorithm.is_ec:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(public.curve, CURVES[algorithm])
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.key_size == RSA_BITS[algorithm]
        assert public.public_numbers().e == 65537


ASYMMETRIC_KEYS = [name for name in KEY_SPECS if KEY_SPECS[name][0].is_asymmetric]


@pytest.mark.parametrize("name", ASYMMETRIC_KEYS)
def test_public_key_der_is_canonical_subject_public_key_info(crypto, keys, name: KeyName) -> None:
    """Byte-for-byte what OpenSSL writes: strict parsers (Go, Java, X.509 CAs) accept nothing else."""
    resp = crypto.GetPublicKey(pb.GetPublicKeyRequest(key_id=keys[name].key_id), timeout=TIMEOUT)
    public = serialization.load_der_public_key(resp.der)
    canonical = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert resp.der == canonical
    assert resp.pem == public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.mark.parametrize(("name", "op"), SIGNATURE_CASES)
def test_gateway_signatures_verify_with_cryptography(crypto, keys, name: KeyName, op: Operation) -> None:
    key = keys[name]
    public = _public_key(crypto, key)
    message = f"transfer 250 EUR, signed by {key.key_id} with {op.value}".encode()
    digest = hashlib.new(op.hash_name, message).digest()

    by_message = crypto.Sign(
        pb.SignRequest(key_id=key.key_id, algorithm=_pb_op(op), message=message, request_id="m"), timeout=TIMEOUT
    )
    by_digest = crypto.Sign(
        pb.SignRequest(key_id=key.key_id, algorithm=_pb_op(op), digest=digest, request_id="d"), timeout=TIMEOUT
    )
    assert by_message.key_id == key.key_id and by_message.request_id == "m" and by_digest.request_id == "d"
    assert by_message.cluster == key.primary_cluster

    for signed in (by_message, by_digest):
        _verify_locally(public, op, signed.signature, message)
        _verify_locally_prehashed(public, op, signed.signature, digest)
        with pytest.raises(InvalidSignature):
            _verify_locally(public, op, signed.signature, message + b".")

    if isinstance(public, rsa.RSAPublicKey):
        assert len(by_message.signature) == public.key_size // 8
        if op is Operation.RSA_PKCS1_SHA256:
            assert by_message.signature == by_digest.signature, "PKCS #1 v1.5 signatures are deterministic"
        else:
            assert by_message.signature != by_digest.signature, "PSS signatures use a random salt"
    else:
        r, s = decode_dss_signature(by_message.signature)  # DER, not raw r||s
        assert 0 < r and 0 < s


@functools.cache
def _stranger_rsa(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@pytest.mark.parametrize(("name", "op"), SIGNATURE_CASES)
def test_gateway_verify_accepts_good_and_refuses_bad_signatures(
    crypto, keys, name: KeyName, op: Operation
) -> None:
    key = keys[name]
    algorithm, _ = KEY_SPECS[name]
    message = f"invoice 42 for {key.key_id}".encode()
    digest = hashlib.new(op.hash_name, message).digest()
    signature = crypto.Sign(
        pb.SignRequest(key_id=key.key_id, algorithm=_pb_op(op), message=message), timeout=TIMEOUT
    ).signature

    def verify(sig: bytes, **payload: bytes) -> bool:
        return crypto.Verify(
            pb.VerifyRequest(key_id=key.key_id, algorithm=_pb_op(op), signature=sig, **payload), timeout=TIMEOUT
        ).valid

    assert verify(signature, message=message)
    assert verify(signature, digest=digest)
    assert not verify(signature, message=message + b"!"), "tampered message accepted"
    assert not verify(signature, digest=_flip(digest)), "tampered digest accepted"
    assert not verify(_flip(signature), message=message), "tampered signature accepted"
    assert not verify(_flip(signature, len(signature) // 2), message=message), "tampered signature accepted"
    assert not verify(signature[:-1], message=message), "truncated signature accepted"
    assert not verify(signature + b"\x00", message=message), "padded signature accepted"

    # A well-formed signature by another key of the same kind is not this key's.
    if algorithm.is_ec:
        stranger = ec.generate_private_key(CURVES[algorithm]())
        foreign = stranger.sign(message, ec.ECDSA(_hash(op)))
    else:
        stranger_rsa = _stranger_rsa(RSA_BITS[algorithm])
        pad: padding.AsymmetricPadding = (
            padding.PKCS1v15()
            if op is Operation.RSA_PKCS1_SHA256
            else padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        )
        foreign = stranger_rsa.sign(message, pad, hashes.SHA256())
    assert not verify(foreign, message=message), "a stranger's signature was accepted"


# The order of each curve's base point: (r, n - s) is as good a signature as (r, s).
ORDERS = {
    KeyAlgorithm.EC_P256: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    KeyAlgorithm.EC_P384: int("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77A"
                              "ECEC196ACCC52973", 16),
}
ECDSA_CASES = [case for case in SIGNATURE_CASES if case.values[1] in (Operation.ECDSA_SHA256, Operation.ECDSA_SHA384)]


def _der(tag: int, body: bytes, *, long_form: bool = False) -> bytes:
    return bytes((tag, 0x81, len(body)) if long_form else (tag, len(body))) + body


def _der_integer(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))  # a leading 0 where the top bit is set


def _ber_variants(r: int, s: int) -> dict[str, bytes]:
    """(r, s) encoded in ways BER allows and DER does not: each one a different byte string
    for the same signature."""
    ri, si = _der_integer(r), _der_integer(s)
    return {
        "r padded with 0x00": _der(0x30, _der(0x02, b"\0" + ri[2:]) + si),
        "s padded with two 0x00": _der(0x30, ri + _der(0x02, b"\0\0" + si[2:])),
        "long-form SEQUENCE length": _der(0x30, ri + si, long_form=True),
        "two-byte SEQUENCE length": bytes((0x30, 0x82, 0, len(ri + si))) + ri + si,
        "long-form INTEGER length": _der(0x30, _der(0x02, ri[2:], long_form=True) + si),
        "an INTEGER after s": _der(0x30, ri + si + _der_integer(1)),
        "indefinite length": b"\x30\x80" + ri + si + b"\0\0",
        "a byte after the SEQUENCE": _der(0x30, ri + si) + b"\0",
    }


@pytest.mark.parametrize(("name", "op"), ECDSA_CASES)
def test_ecdsa_verify_takes_only_the_der_encoding(crypto, keys, name: KeyName, op: Operation) -> None:
    """An ECDSA signature has one DER encoding; Verify refuses every other encoding of it, as
    OpenSSL does, so a signature cannot be re-encoded into another valid one. Canonical ones
    verify whatever their shape: an r or s with its top bit set (a leading zero byte in DER),
    or shorter than the curve's size."""
    key = keys[name]
    algorithm, _ = KEY_SPECS[name]
    size, order = {KeyAlgorithm.EC_P256: 32, KeyAlgorithm.EC_P384: 48}[algorithm], ORDERS[algorithm]
    public = _public_key(crypto, key)
    digest = hashlib.new(op.hash_name, f"malleable? {key.key_id}".encode()).digest()

    def verify(signature: bytes) -> bool:
        return crypto.Verify(pb.VerifyRequest(key_id=key.key_id, algorithm=_pb_op(op), digest=digest,
                                              signature=signature), timeout=TIMEOUT).valid

    def openssl(signature: bytes) -> bool:
        try:
            _verify_locally_prehashed(public, op, signature, digest)
        except (InvalidSignature, ValueError):
            return False
        return True

    # Enough signatures (and their (r, n - s) twins) that some r or s is a byte short:
    # 1 in 256 for each number, 1000 signatures.
    batch = crypto.BatchSign(pb.BatchSignRequest(requests=[
        pb.SignRequest(key_id=key.key_id, algorithm=_pb_op(op), digest=digest) for _ in range(1000)
    ]), timeout=120)
    signed = [decode_dss_signature(result.response.signature) for result in batch.responses]
    pairs = signed + [(r, order - s) for r, s in signed]
    short = next((r, s) for r, s in pairs if min(r, s) < 1 << (8 * size - 8))
    top_bit = next((r, s) for r, s in pairs if r >> (8 * size - 1) and s >> (8 * size - 1))
    low_bits = next((r, s) for r, s in pairs if not r >> (8 * size - 1) and not s >> (8 * size - 1))
    for r, s in (short, top_bit, low_bits):
        canonical = encode_dss_signature(r, s)
        assert openssl(canonical)
        assert verify(canonical), f"canonical signature refused: {canonical.hex()}"
        for variant, encoded in _ber_variants(r, s).items():
            assert encoded != canonical
            assert not openssl(encoded), variant
            assert not verify(encoded), f"{variant} accepted: {encoded.hex()}"


@pytest.mark.parametrize("op", SIGN_OPS, ids=lambda op: op.value)
def test_sign_refuses_a_digest_of_the_wrong_length(crypto, keys, op: Operation) -> None:
    name = next(n for n in KEY_SPECS if _allowed(n, op))
    for length in (0, op.digest_size - 1, op.digest_size + 1, 64 if op.digest_size != 64 else 32):
        err = rpc_error(crypto.Sign, pb.SignRequest(
            key_id=keys[name].key_id, algorithm=_pb_op(op), digest=b"\x11" * length), timeout=TIMEOUT)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (length, err.details())


# -- RSA-OAEP -----------------------------------------------------------------

OAEP_KEYS = [name for name in KEY_SPECS if _allowed(name, Operation.RSA_OAEP_SHA256)]
OAEP_PADDING = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
OAEP = _pb_op(Operation.RSA_OAEP_SHA256)


@pytest.fixture(scope="module")
def token_has_oaep_sha256(keys, tokens) -> bool:
    """Whether the token itself does OAEP with SHA-256 (SoftHSM 2.6 does OAEP with SHA-1 only)."""
    key = keys[OAEP_KEYS[0]]
    public = tokens.session(key.primary_cluster).get_key(object_class=ObjectClass.PUBLIC_KEY, id=key.key_id.encode())
    try:
        public.encrypt(b"probe", mechanism=Mechanism.RSA_PKCS_OAEP,
                       mechanism_param=(Mechanism.SHA256, MGF.SHA256, None))
    except (p11.ArgumentsBad, p11.MechanismParamInvalid, p11.MechanismInvalid):
        return False
    return True


@pytest.fixture
def oaep_sha256() -> None:
    """OAEP-SHA256 works whether or not the token has it: the gateway pads over raw RSA if not."""


def _oaep_max(public: rsa.RSAPublicKey) -> int:
    return public.key_size // 8 - 2 * 32 - 2


@pytest.mark.usefixtures("oaep_sha256")
@pytest.mark.parametrize("name", OAEP_KEYS)
def test_oaep_decrypts_what_cryptography_encrypted(crypto, keys, name: KeyName) -> None:
    key = keys[name]
    public = _public_key(crypto, key)
    assert isinstance(public, rsa.RSAPublicKey)
    for plaintext in (b"\x00wrapped data key\xff" * 2, b"x", b"\xa5" * _oaep_max(public)):
        ciphertext = public.encrypt(plaintext, OAEP_PADDING)
        dec = crypto.Decrypt(pb.DecryptRequest(key_id=key.key_id, algorithm=OAEP, ciphertext=ciphertext),
                             timeout=TIMEOUT)
        assert dec.plaintext == plaintext


@pytest.mark.usefixtures("oaep_sha256")
@pytest.mark.parametrize("name", OAEP_KEYS)
def test_oaep_round_trip_through_the_gateway(crypto, keys, name: KeyName) -> None:
    key = keys[name]
    modulus_bytes = RSA_BITS[KEY_SPECS[name][0]] // 8
    plaintext = b"session key 0123456789abcdef"
    first = crypto.Encrypt(pb.EncryptRequest(key_id=key.key_id, algorithm=OAEP, plaintext=plaintext),
                           timeout=TIMEOUT)
    second = crypto.Encrypt(pb.EncryptRequest(key_id=key.key_id, algorithm=OAEP, plaintext=plaintext),
                            timeout=TIMEOUT)
    assert first.cluster == key.primary_cluster and first.iv == b""
    assert len(first.ciphertext) == modulus_bytes
    assert first.ciphertext != second.ciphertext, "OAEP is randomised"
    for enc in (first, second):
        dec = crypto.Decrypt(pb.DecryptRequest(key_id=key.key_id, algorithm=OAEP, ciphertext=enc.ciphertext),
                             timeout=TIMEOUT)
        assert dec.plaintext == plaintext

    longest = b"\x5a" * (modulus_bytes - 66)
    enc = crypto.Encrypt(pb.EncryptRequest(key_id=key.key_id, algorithm=OAEP, plaintext=longest), timeout=TIMEOUT)
    dec = crypto.Decrypt(pb.DecryptRequest(key_id=key.key_id, algorithm=OAEP, ciphertext=enc.ciphertext),
                         timeout=TIMEOUT)
    assert dec.plaintext == longest
    err = rpc_error(crypto.Encrypt, pb.EncryptRequest(
        key_id=key.key_id, algorithm=OAEP, plaintext=longest + b"\x5a"), timeout=TIMEOUT)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, "one byte over the OAEP limit"


@pytest.mark.usefixtures("oaep_sha256")
@pytest.mark.parametrize("name", OAEP_KEYS)
def test_oaep_refuses_a_tampered_ciphertext(crypto, keys, name: KeyName) -> None:
    key = keys[name]
    good = crypto.Encrypt(pb.EncryptRequest(key_id=key.key_id, algorithm=OAEP, plaintext=b"secret"),
                          timeout=TIMEOUT).ciphertext
    for label, bad in (("flipped last byte", _flip(good)), ("flipped middle byte", _flip(good, len(good) // 2)),
                       ("truncated", good[:-1])):
        err = rpc_error(crypto.Decrypt, pb.DecryptRequest(key_id=key.key_id, algorithm=OAEP, ciphertext=bad),
                        timeout=TIMEOUT)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (label, err.code(), err.details())
    dec = crypto.Decrypt(pb.DecryptRequest(key_id=key.key_id, algorithm=OAEP, ciphertext=good), timeout=TIMEOUT)
    assert dec.plaintext == b"secret", "the failures above broke the key's session"


@pytest.mark.parametrize("name", OAEP_KEYS)
def test_oaep_refuses_gcm_only_fields(crypto, keys, name: KeyName) -> None:
    key = keys[name]
    public = _public_key(crypto, key)
    ciphertext = public.encrypt(b"secret", OAEP_PADDING)
    cases: dict[str, tuple[Callable[..., Any], Any]] = {
        "aad with OAEP": (crypto.Encrypt, pb.EncryptRequest(
            key_id=key.key_id, algorithm=OAEP, plaintext=b"secret", aad=b"ctx")),
        "iv with OAEP": (crypto.Decrypt, pb.DecryptRequest(
            key_id=key.key_id, algorithm=OAEP, ciphertext=ciphertext, iv=b"\x00" * 12)),
        "aad on decrypt": (crypto.Decrypt, pb.DecryptRequest(
            key_id=key.key_id, algorithm=OAEP, ciphertext=ciphertext, aad=b"ctx")),
        "empty ciphertext": (crypto.Decrypt, pb.DecryptRequest(key_id=key.key_id, algorithm=OAEP)),
    }
    for label, (method, request) in cases.items():
        err = rpc_error(method, request, timeout=TIMEOUT)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (label, err.code(), err.details())


def test_oaep_works_on_a_token_without_sha256_oaep(crypto, keys, token_has_oaep_sha256: bool) -> None:
    """SoftHSM 2.6 does OAEP with SHA-1 only; the gateway must still serve OAEP-SHA256."""
    if token_has_oaep_sha256:
        pytest.skip("the token does RSA-OAEP with SHA-256 itself")
    key = keys[OAEP_KEYS[0]]
    public = _public_key(crypto, key)
    dec = crypto.Decrypt(pb.DecryptRequest(key_id=key.key_id, algorithm=OAEP,
                                           ciphertext=public.encrypt(b"secret", OAEP_PADDING)), timeout=TIMEOUT)
    assert dec.plaintext == b"secret"
    enc = crypto.Encrypt(pb.EncryptRequest(key_id=key.key_id, algorithm=OAEP, plaintext=b"secret"), timeout=TIMEOUT)
    again = crypto.Decrypt(pb.DecryptRequest(key_id=key.key_id, algorithm=OAEP, ciphertext=enc.ciphertext),
                           timeout=TIMEOUT)
    assert again.plaintext == b"secret"


# -- AES-GCM ------------------------------------------------------------------

GCM = _pb_op(Operation.AES_GCM)
AES_KEY = f"{KeyAlgorithm.AES_256.value}/{KeyUsage.ENCRYPT_DECRYPT.value}"
HMAC_KEY = f"{KeyAlgorithm.HMAC_SHA256.value}/{KeyUsage.MAC.value}"


@pytest.mark.parametrize(
    ("plaintext", "aad"),
    [
        pytest.param(b"card 4111 1111 1111 1111", b"order-7", id="with-aad"),
        pytest.param(b"card 4111 1111 1111 1111", b"", id="empty-aad"),
        pytest.param(bytes(range(256)) * 64, b"\x00" * 100, id="16KiB-binary-aad"),
        pytest.param(b"", b"header only", id="empty-plaintext"),
    ],
)
def test_aes_gcm_round_trip(crypto, keys, plaintext: bytes, aad: bytes) -> None:
    key = keys[AES_KEY]
    first = crypto.Encrypt(pb.EncryptRequest(key_id=key.key_id, algorithm=GCM, plaintext=plaintext, aad=aad),
                           timeout=TIMEOUT)
    second = crypto.Encrypt(pb.EncryptRequest(key_id=key.key_id, algorithm=GCM, plaintext=plaintext, aad=aad),
                            timeout=TIMEOUT)
    assert first.cluster == key.primary_cluster
    assert len(first.iv) == 12 and first.iv != second.iv, "every encryption needs a fresh IV"
    assert len(first.ciphertext) == len(plaintext) + 16
    assert first.ciphertext != second.ciphertext
    for enc in (first, second):
        dec = crypto.Decrypt(pb.DecryptRequest(key_id=key.key_id, algorithm=GCM, ciphertext=enc.ciphertext,
                                               iv=enc.iv, aad=aad), timeout=TIMEOUT)
        assert dec.plaintext == plaintext


def test_aes_gcm_refuses_anything_that_does_not_authenticate(crypto, keys) -> None:
    key = keys[AES_KEY]
    plaintext = b"transfer 900 EUR to account 12"
    with_aad = crypto.Encrypt(pb.EncryptRequest(key_id=key.key_id, algorithm=GCM, plaintext=plaintext,
                                                aad=b"order-7"), timeout=TIMEOUT)
    without_aad = crypto.Encrypt(pb.EncryptRequest(key_id=key.key_id, algorithm=GCM, plaintext=plaintext),
                                 timeout=TIMEOUT)
    ct, iv = with_aad.ciphertext, with_aad.iv

    cases = {
        "wrong aad": (ct, iv, b"order-8"),
        "aad dropped": (ct, iv, b""),
        "aad added": (without_aad.ciphertext, without_aad.iv, b"order-7"),
        "wrong iv": (ct, _flip(iv), b"order-7"),
        "other message's iv": (ct, without_aad.iv, b"order-7"),
        "tampered tag": (_flip(ct), iv, b"order-7"),
        "tampered ciphertext": (_flip(ct, 0), iv, b"order-7"),
        "truncated tag": (ct[:-1], iv, b"order-7"),
        "tag only": (ct[-16:], iv, b"order-7"),
    }
    for label, (ciphertext, nonce, aad) in cases.items():
        err = rpc_error(crypto.Decrypt, pb.DecryptRequest(
            key_id=key.key_id, algorithm=GCM, ciphertext=ciphertext, iv=nonce, aad=aad), timeout=TIMEOUT)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (label, err.code(), err.details())
        assert "decryption failed" in err.details(), label

    malformed = {
        "short iv": (ct, iv[:-1]),
        "long iv": (ct, iv + b"\x00"),
        "no iv": (ct, b""),
        "shorter than a tag": (ct[:15], iv),
    }
    for label, (ciphertext, nonce) in malformed.items():
        err = rpc_error(crypto.Decrypt, pb.DecryptRequest(
            key_id=key.key_id, algorithm=GCM, ciphertext=ciphertext, iv=nonce, aad=b"order-7"), timeout=TIMEOUT)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (label, err.code(), err.details())

    dec = crypto.Decrypt(pb.DecryptRequest(key_id=key.key_id, algorithm=GCM, ciphertext=ct, iv=iv,
                                           aad=b"order-7"), timeout=TIMEOUT)
    assert dec.plaintext == plaintext, "the failures above broke the key's session"


# -- HMAC ---------------------------------------------------------------------

HMAC = _pb_op(Operation.HMAC_SHA256)


@pytest.mark.parametrize("data", [b"GET /v1/accounts/12 2026-01-01T00:00:00Z", b"", b"\x00\xff" * 20000],
                         ids=["text", "empty", "40KB-binary"])
def test_hmac_mac_and_verify(crypto, keys, data: bytes) -> None:
    key_id = keys[HMAC_KEY].key_id
    mac = crypto.Mac(pb.MacRequest(key_id=key_id, algorithm=HMAC, data=data), timeout=TIMEOUT).mac
    assert len(mac) == 32
    again = crypto.Mac(pb.MacRequest(key_id=key_id, algorithm=HMAC, data=data), timeout=TIMEOUT).mac
    assert again == mac, "HMAC is deterministic"
    other = crypto.Mac(pb.MacRequest(key_id=key_id, algorithm=HMAC, data=data + b"x"), timeout=TIMEOUT).mac
    assert other != mac
    # Not a bare hash: the key is in it.
    assert mac != hashlib.sha256(data).digest()

    def verify(d: bytes, m: bytes) -> bool:
        return crypto.VerifyMac(pb.VerifyMacRequest(key_id=key_id, algorithm=HMAC, data=d, mac=m),
                                timeout=TIMEOUT).valid

    assert verify(data, mac)
    assert not verify(data + b"x", mac), "tampered data accepted"
    if data:
        assert not verify(_flip(data, 0), mac), "tampered data accepted"
    assert not verify(data, _flip(mac)), "tampered mac accepted"
    for wrong_length in (mac[:-1], mac[:16], mac + b"\x00", mac * 2):
        assert not verify(data, wrong_length), f"{len(wrong_length)}-byte mac accepted"


def test_verify_mac_requires_a_mac(crypto, keys) -> None:
    err = rpc_error(crypto.VerifyMac, pb.VerifyMacRequest(key_id=keys[HMAC_KEY].key_id, algorithm=HMAC,
                                                          data=b"data"), timeout=TIMEOUT)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- keys without a public half, and pairs the model does not allow -----------


@pytest.mark.parametrize("name", [AES_KEY, HMAC_KEY])
def test_symmetric_keys_have_no_public_key(crypto, keys, name: KeyName) -> None:
    err = rpc_error(crypto.GetPublicKey, pb.GetPublicKeyRequest(key_id=keys[name].key_id), timeout=TIMEOUT)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert "no public key" in err.details()


def _call(crypto, rpc: str, key_id: str, op: Operation) -> None:
    """One well-formed request of ``rpc`` with ``op``, as a caller would send it."""
    alg = _pb_op(op)
    if rpc == "Sign":
        crypto.Sign(pb.SignRequest(key_id=key_id, algorithm=alg, message=b"message"), timeout=TIMEOUT)
    elif rpc == "Verify":
        crypto.Verify(pb.VerifyRequest(key_id=key_id, algorithm=alg, message=b"message", signature=b"\x01" * 64),
                      timeout=TIMEOUT)
    elif rpc == "Encrypt":
        crypto.Encrypt(pb.EncryptRequest(key_id=key_id, algorithm=alg, plaintext=b"plaintext"), timeout=TIMEOUT)
    elif rpc == "Decrypt":
        iv = b"\x00" * 12 if op is Operation.AES_GCM else b""
        crypto.Decrypt(pb.DecryptRequest(key_id=key_id, algorithm=alg, ciphertext=b"\x01" * 64, iv=iv),
                       timeout=TIMEOUT)
    elif rpc == "Mac":
        crypto.Mac(pb.MacRequest(key_id=key_id, algorithm=alg, data=b"data"), timeout=TIMEOUT)
    elif rpc == "VerifyMac":
        crypto.VerifyMac(pb.VerifyMacRequest(key_id=key_id, algorithm=alg, data=b"data", mac=b"\x01" * 32),
                         timeout=TIMEOUT)
    else:  # pragma: no cover
        raise AssertionError(rpc)


# Every RPC with every key its own operations do not allow (ECDSA_SHA384 with
# P-256, RSA_OAEP with a signing key, Mac with an AES key…).
WRONG_KEY_CASES = [
    pytest.param(rpc, name, op, id=f"{rpc}-{name}-{op.value}")
    for rpc, ops in RPC_OPS.items()
    for op in ops
    for name in KEY_SPECS
    if not _allowed(name, op)
]


@pytest.mark.parametrize(("rpc", "name", "op"), WRONG_KEY_CASES)
def test_wrong_key_for_the_operation_is_refused(crypto, keys, rpc: str, name: KeyName, op: Operation) -> None:
    err = rpc_error(_call, crypto, rpc, keys[name].key_id, op)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, (err.code(), err.details())
    assert op.value in err.details()


def test_wrong_key_cases_cover_every_refused_pair() -> None:
    allowed = {(name, op) for op in Operation for name in KEY_SPECS if _allowed(name, op)}
    assert len(KEY_SPECS) == 10 and len(allowed) == 1 + 1 + 3 + 3 + 3 + 1 + 1
    per_rpc = {
        rpc: len(KEY_SPECS) * len(ops) - sum(1 for _, op in allowed if op in ops) for rpc, ops in RPC_OPS.items()
    }
    assert per_rpc == {"Sign": 32, "Verify": 32, "Encrypt": 16, "Decrypt": 16, "Mac": 9, "VerifyMac": 9}
    assert len(WRONG_KEY_CASES) == sum(per_rpc.values())


# An algorithm the RPC does not perform, with any key (Sign with AES_GCM, Mac with
# ECDSA_SHA256, Encrypt with HMAC_SHA256…): the request itself is malformed.
WRONG_RPC_CASES = [
    pytest.param(rpc, name, op, id=f"{rpc}-{name}-{op.value}")
    for rpc, ops in RPC_OPS.items()
    for op in Operation
    if op not in ops
    for name in KEY_SPECS
]


@pytest.mark.parametrize(("rpc", "name", "op"), WRONG_RPC_CASES)
def test_algorithm_the_rpc_does_not_perform_is_refused(
    crypto, keys, rpc: str, name: KeyName, op: Operation
) -> None:
    err = rpc_error(_call, crypto, rpc, keys[name].key_id, op)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert op.value in err.details() and rpc in err.details()


@pytest.mark.parametrize("refusal", [p11.MechanismInvalid, p11.MechanismParamInvalid, p11.ArgumentsBad])
def test_oaep_falls_back_to_padding_in_the_gateway_whatever_a_module_without_it_answers(
    make_router, monkeypatch, refusal: type[Exception]
) -> None:
    """A module without native OAEP-SHA256 answers CKR_MECHANISM_INVALID (or a parameter error):
    the gateway then pads over raw RSA itself, instead of calling the key unfit."""
    import time

    from cryptography.hazmat.primitives.serialization import load_der_public_key

    import router.pkcs11.cluster as cluster_module
    from router.model import KeySpec

    router = make_router()
    key_id = unique("oaep-fallback")
    router.generate_key(KeySpec(key_id=key_id, algorithm=KeyAlgorithm.RSA_2048, usage=KeyUsage.ENCRYPT_DECRYPT,
                                request_id=f"r-{key_id}"), time.monotonic() + 60)

    def refuses(*_: object) -> bytes:
        raise refusal()

    monkeypatch.setattr(cluster_module, "_oaep_native", refuses)
    for backend in router.backends.values():
        backend._native_oaep = True
    _, der = router.public_key(key_id, time.monotonic() + 10)
    public = load_der_public_key(der)
    assert isinstance(public, rsa.RSAPublicKey)
    ciphertext = public.encrypt(b"data key", OAEP_PADDING)
    assert router.decrypt(key_id, Operation.RSA_OAEP_SHA256, ciphertext, b"", b"", time.monotonic() + 10) == \
        b"data key"
    assert any(backend._native_oaep is False for backend in router.backends.values())

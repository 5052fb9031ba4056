"""Bad input through the real gRPC server: the documented status and reason, and no harm done.

Every refusal carries a ``google.rpc.Status`` whose ``ErrorInfo`` has domain
``hsmgw`` and a stable reason, so callers can branch on it. None of them may look
like a gateway bug (INTERNAL, UNKNOWN), and a flood of them must leave every
cluster's session pool exactly as it was.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pkcs11 import Attribute, KeyType

from hsmgw.v1 import admin_pb2
from hsmgw.v1 import crypto_pb2 as pb
from tests.support import rpc_error, unique, wait_for

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXISTS = grpc.StatusCode.ALREADY_EXISTS
BUG_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

MISSING = "bad-input/no-such-key"
NEVER_MADE = "bad-input/never-made"  # every refused GenerateKey below names this id
LIMIT = 64 * 1024
ECDSA = pb.ALGORITHM_ECDSA_SHA256
GCM = pb.ALGORITHM_AES_GCM
HMAC = pb.ALGORITHM_HMAC_SHA256
OAEP = pb.ALGORITHM_RSA_OAEP_SHA256
DIGEST = hashlib.sha256(b"bad input").digest()


@dataclass(frozen=True)
class Keys:
    ec: str
    ec_request_id: str
    aes: str
    hmac: str
    ec_gone: str
    """Placed and enabled, but its material was deleted from the token behind the gateway's back."""
    hmac_on_aes: str
    """Placed as an HMAC key, but the token holds an AES key under its id."""
    ciphertext: bytes
    iv: bytes
    aad: bytes


def _generate(crypto: Any, key_id: str, algorithm: int, request_id: str | None = None, **kw: Any) -> pb.Key:
    request = pb.GenerateKeyRequest(request_id=request_id or key_id, key_id=key_id, algorithm=algorithm, **kw)
    return crypto.GenerateKey(request, timeout=30)


@pytest.fixture(scope="module")
def keys(crypto: Any, tokens: Any) -> Keys:
    prefix = unique("bad-input")
    ec_key = _generate(crypto, f"{prefix}/ec", pb.KEY_ALGORITHM_EC_P256)
    aes = _generate(crypto, f"{prefix}/aes", pb.KEY_ALGORITHM_AES_256)
    hmac = _generate(crypto, f"{prefix}/hmac", pb.KEY_ALGORITHM_HMAC_SHA256)

    # The public API refuses a wrong usage before any HSM call. Only drift between
    # the placement and the token lets one reach the HSM, so make that drift.
    gone = _generate(crypto, f"{prefix}/ec-gone", pb.KEY_ALGORITHM_EC_P256)
    for cluster in (gone.primary_cluster, *gone.replicas):
        for obj in tokens.objects(cluster, gone.key_id):
            obj.destroy()
    drifted = _generate(crypto, f"{prefix}/hmac-on-aes", pb.KEY_ALGORITHM_HMAC_SHA256)
    for obj in tokens.objects(drifted.primary_cluster, drifted.key_id):
        obj.destroy()
    tokens.session(drifted.primary_cluster).generate_key(
        KeyType.AES, 256, id=drifted.key_id.encode(), label=drifted.key_id, store=True,
        template={Attribute.SIGN: True, Attribute.VERIFY: True},
    )

    aad = b"invoice-42"
    enc = crypto.Encrypt(pb.EncryptRequest(key_id=aes.key_id, algorithm=GCM, plaintext=b"secret", aad=aad), timeout=10)
    return Keys(
        ec=ec_key.key_id, ec_request_id=ec_key.key_id, aes=aes.key_id, hmac=hmac.key_id, ec_gone=gone.key_id,
        hmac_on_aes=drifted.key_id, ciphertext=enc.ciphertext, iv=enc.iv, aad=aad,
    )


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    request: Callable[[Keys], Any]
    code: grpc.StatusCode
    reason: str
    says: str = ""
    """A word the message must contain: the field the caller has to fix."""


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def _sign(key: str, **kw: Any) -> Callable[[Keys], pb.SignRequest]:
    return lambda k: pb.SignRequest(key_id=getattr(k, key, key), **{"algorithm": ECDSA, "digest": DIGEST, **kw})


CASES: tuple[Case, ...] = (
    # -- unknown keys: NOT_FOUND / KEY_NOT_FOUND -------------------------------------------
    Case("sign-unknown-key", "Sign", _sign(MISSING), NOT_FOUND, "KEY_NOT_FOUND", MISSING),
    Case("verify-unknown-key", "Verify",
         lambda k: pb.VerifyRequest(key_id=MISSING, algorithm=ECDSA, digest=DIGEST, signature=b"\x30\x00"),
         NOT_FOUND, "KEY_NOT_FOUND"),
    Case("get-unknown-key", "GetKey", lambda k: pb.GetKeyRequest(key_id=MISSING), NOT_FOUND, "KEY_NOT_FOUND"),
    Case("public-key-unknown-key", "GetPublicKey", lambda k: pb.GetPublicKeyRequest(key_id=MISSING),
         NOT_FOUND, "KEY_NOT_FOUND"),
    Case("encrypt-unknown-key", "Encrypt", lambda k: pb.EncryptRequest(key_id=MISSING, algorithm=GCM, plaintext=b"x"),
         NOT_FOUND, "KEY_NOT_FOUND"),
    Case("decrypt-unknown-key", "Decrypt",
         lambda k: pb.DecryptRequest(key_id=MISSING, algorithm=GCM, ciphertext=k.ciphertext, iv=k.iv),
         NOT_FOUND, "KEY_NOT_FOUND"),
    Case("mac-unknown-key", "Mac", lambda k: pb.MacRequest(key_id=MISSING, algorithm=HMAC, data=b"x"),
         NOT_FOUND, "KEY_NOT_FOUND"),
    Case("destroy-unknown-key", "DestroyKey", lambda k: pb.DestroyKeyRequest(key_id=MISSING),
         NOT_FOUND, "KEY_NOT_FOUND"),
    Case("sign-key-material-gone-from-token", "Sign", _sign("ec_gone"), NOT_FOUND, "KEY_NOT_FOUND"),
    # -- the key exists but was made for something else: FAILED_PRECONDITION / WRONG_KEY_USAGE
    Case("encrypt-with-ec-key", "Encrypt", lambda k: pb.EncryptRequest(key_id=k.ec, algorithm=GCM, plaintext=b"x"),
         PRECONDITION, "WRONG_KEY_USAGE"),
    Case("decrypt-with-ec-key", "Decrypt",
         lambda k: pb.DecryptRequest(key_id=k.ec, algorithm=GCM, ciphertext=k.ciphertext, iv=k.iv),
         PRECONDITION, "WRONG_KEY_USAGE"),
    Case("sign-with-aes-key", "Sign", _sign("aes"), PRECONDITION, "WRONG_KEY_USAGE"),
    Case("sign-with-hmac-key", "Sign", _sign("hmac"), PRECONDITION, "WRONG_KEY_USAGE"),
    Case("mac-with-ec-key", "Mac", lambda k: pb.MacRequest(key_id=k.ec, algorithm=HMAC, data=b"x"),
         PRECONDITION, "WRONG_KEY_USAGE"),
    Case("verify-mac-with-aes-key", "VerifyMac",
         lambda k: pb.VerifyMacRequest(key_id=k.aes, algorithm=HMAC, data=b"x", mac=b"m" * 32),
         PRECONDITION, "WRONG_KEY_USAGE"),
    Case("ecdsa-sha384-with-p256-key", "Sign",
         _sign("ec", algorithm=pb.ALGORITHM_ECDSA_SHA384, digest=b"\x00" * 48), PRECONDITION, "WRONG_KEY_USAGE"),
    Case("rsa-oaep-with-aes-key", "Encrypt",
         lambda k: pb.EncryptRequest(key_id=k.aes, algorithm=OAEP, plaintext=b"x"), PRECONDITION, "WRONG_KEY_USAGE"),
    Case("mac-with-aes-object-on-token", "Mac",
         lambda k: pb.MacRequest(key_id=k.hmac_on_aes, algorithm=HMAC, data=b"x"), PRECONDITION, "WRONG_KEY_USAGE"),
    # -- malformed input: INVALID_ARGUMENT -----------------------------------------------------
    Case("digest-31-bytes", "Sign", _sign("ec", digest=b"\x00" * 31), INVALID, "INVALID_ARGUMENT", "digest"),
    Case("digest-33-bytes", "Sign", _sign("ec", digest=b"\x00" * 33), INVALID, "INVALID_ARGUMENT", "digest"),
    Case("digest-empty", "Sign", _sign("ec", digest=b""), INVALID, "INVALID_ARGUMENT", "digest"),
    Case("verify-digest-31-bytes", "Verify",
         lambda k: pb.VerifyRequest(key_id=k.ec, algorithm=ECDSA, digest=b"\x00" * 31, signature=b"\x30\x00"),
         INVALID, "INVALID_ARGUMENT", "digest"),
    Case("sign-empty-key-id", "Sign", _sign(""), INVALID, "INVALID_ARGUMENT", "key_id"),
    Case("encrypt-empty-key-id", "Encrypt", lambda k: pb.EncryptRequest(key_id="", algorithm=GCM, plaintext=b"x"),
         INVALID, "INVALID_ARGUMENT", "key_id"),
    Case("get-empty-key-id", "GetKey", lambda k: pb.GetKeyRequest(key_id=""), INVALID, "INVALID_ARGUMENT", "key_id"),
    Case("destroy-empty-key-id", "DestroyKey", lambda k: pb.DestroyKeyRequest(key_id=""),
         INVALID, "INVALID_ARGUMENT", "key_id"),
    *(
        Case(f"sign-key-id-{label}", "Sign", _sign(bad), INVALID, "INVALID_ARGUMENT", "key_id")
        for label, bad in (
            ("space", "has space"), ("dotdot", "../etc/passwd"), ("double-slash", "a//b"),
            ("trailing-slash", "payments/"), ("leading-dash", "-flag"), ("non-ascii", "clé"),
            ("nul", "a\x00b"), ("too-long", "k" * 129),
        )
    ),
    Case("get-key-id-bad-chars", "GetKey", lambda k: pb.GetKeyRequest(key_id="drop table;"),
         INVALID, "INVALID_ARGUMENT", "key_id"),
    Case("sign-algorithm-99", "Sign", _sign("ec", algorithm=99), INVALID, "INVALID_ARGUMENT", "algorithm"),
    Case("encrypt-algorithm-99", "Encrypt", lambda k: pb.EncryptRequest(key_id=k.aes, algorithm=99, plaintext=b"x"),
         INVALID, "INVALID_ARGUMENT", "algorithm"),
    Case("mac-algorithm-99", "Mac", lambda k: pb.MacRequest(key_id=k.hmac, algorithm=99, data=b"x"),
         INVALID, "INVALID_ARGUMENT", "algorithm"),
    Case("sign-algorithm-unspecified", "Sign", _sign("ec", algorithm=pb.ALGORITHM_UNSPECIFIED),
         INVALID, "INVALID_ARGUMENT", "algorithm"),
    Case("decrypt-algorithm-unspecified", "Decrypt",
         lambda k: pb.DecryptRequest(key_id=k.aes, ciphertext=k.ciphertext, iv=k.iv, aad=k.aad),
         INVALID, "INVALID_ARGUMENT", "algorithm"),
    Case("sign-neither-digest-nor-message", "Sign", lambda k: pb.SignRequest(key_id=k.ec, algorithm=ECDSA),
         INVALID, "INVALID_ARGUMENT", "digest"),
    Case("verify-neither-digest-nor-message", "Verify",
         lambda k: pb.VerifyRequest(key_id=k.ec, algorithm=ECDSA, signature=b"\x30\x00"),
         INVALID, "INVALID_ARGUMENT", "digest"),
    Case("sign-message-over-64k", "Sign",
         lambda k: pb.SignRequest(key_id=k.ec, algorithm=ECDSA, message=b"m" * (LIMIT + 1)),
         INVALID, "INVALID_ARGUMENT", "message"),
    Case("verify-message-over-64k", "Verify",
         lambda k: pb.VerifyRequest(key_id=k.ec, algorithm=ECDSA, message=b"m" * (LIMIT + 1), signature=b"\x30\x00"),
         INVALID, "INVALID_ARGUMENT", "message"),
    Case("verify-empty-signature", "Verify",
         lambda k: pb.VerifyRequest(key_id=k.ec, algorithm=ECDSA, digest=DIGEST),
         INVALID, "INVALID_ARGUMENT", "signature"),
    Case("encrypt-plaintext-over-64k", "Encrypt",
         lambda k: pb.EncryptRequest(key_id=k.aes, algorithm=GCM, plaintext=b"p" * (LIMIT + 1)),
         INVALID, "INVALID_ARGUMENT", "plaintext"),
    Case("encrypt-aad-over-64k", "Encrypt",
         lambda k: pb.EncryptRequest(key_id=k.aes, algorithm=GCM, plaintext=b"p", aad=b"a" * (LIMIT + 1)),
         INVALID, "INVALID_ARGUMENT", "aad"),
    Case("decrypt-gcm-ciphertext-over-64k-and-a-tag", "Decrypt",
         lambda k: pb.DecryptRequest(key_id=k.aes, algorithm=GCM, ciphertext=b"c" * (LIMIT + 17), iv=k.iv),
         INVALID, "INVALID_ARGUMENT", "ciphertext"),
    Case("mac-data-over-64k", "Mac", lambda k: pb.MacRequest(key_id=k.hmac, algorithm=HMAC, data=b"d" * (LIMIT + 1)),
         INVALID, "INVALID_ARGUMENT", "data"),
    *(
        Case(f"gcm-iv-{n}-bytes", "Decrypt",
             lambda k, n=n: pb.DecryptRequest(key_id=k.aes, algorithm=GCM, ciphertext=k.ciphertext, iv=b"\x00" * n,
                                              aad=k.aad),
             INVALID, "INVALID_ARGUMENT", "iv")
        for n in (0, 11, 13)
    ),
    Case("gcm-ciphertext-15-bytes", "Decrypt",
         lambda k: pb.DecryptRequest(key_id=k.aes, algorithm=GCM, ciphertext=b"c" * 15, iv=k.iv, aad=k.aad),
         INVALID, "INVALID_ARGUMENT", "ciphertext"),
    Case("gcm-ciphertext-empty", "Decrypt",
         lambda k: pb.DecryptRequest(key_id=k.aes, algorithm=GCM, iv=k.iv, aad=k.aad),
         INVALID, "INVALID_ARGUMENT", "ciphertext"),
    # These reach the HSM: only the token can tell that the tag does not authenticate.
    Case("gcm-wrong-aad", "Decrypt",
         lambda k: pb.DecryptRequest(key_id=k.aes, algorithm=GCM, ciphertext=k.ciphertext, iv=k.iv, aad=b"other"),
         INVALID, "DECRYPTION_FAILED", "decryption failed"),
    Case("gcm-tampered-ciphertext", "Decrypt",
         lambda k: pb.DecryptRequest(key_id=k.aes, algorithm=GCM, ciphertext=_flip(k.ciphertext, 0), iv=k.iv,
                                     aad=k.aad),
         INVALID, "DECRYPTION_FAILED", "decryption failed"),
    Case("gcm-wrong-iv", "Decrypt",
         lambda k: pb.DecryptRequest(key_id=k.aes, algorithm=GCM, ciphertext=k.ciphertext, iv=_flip(k.iv, 11),
                                     aad=k.aad),
         INVALID, "DECRYPTION_FAILED", "decryption failed"),
    Case("gcm-truncated-tag", "Decrypt",
         lambda k: pb.DecryptRequest(key_id=k.aes, algorithm=GCM, ciphertext=k.ciphertext[:-1], iv=k.iv, aad=k.aad),
         INVALID, "DECRYPTION_FAILED", "decryption failed"),
    *(
        Case(f"random-length-{n}", "GenerateRandom", lambda k, n=n: pb.GenerateRandomRequest(length=n),
             INVALID, "INVALID_ARGUMENT", "length")
        for n in (0, -1, 1025, 5000)
    ),
    Case("list-keys-negative-page-size", "ListKeys", lambda k: pb.ListKeysRequest(page_size=-1),
         INVALID, "INVALID_ARGUMENT", "page_size"),
    Case("list-keys-page-token-not-a-key-id", "ListKeys", lambda k: pb.ListKeysRequest(page_token="garbage!"),
         INVALID, "INVALID_ARGUMENT", "page_token"),
    Case("list-keys-page-token-of-another-prefix", "ListKeys",
         lambda k: pb.ListKeysRequest(prefix="bad-input/", page_token="zzz/last"),
         INVALID, "INVALID_ARGUMENT", "page_token"),
    Case("list-keys-prefix-longer-than-a-key-id", "ListKeys", lambda k: pb.ListKeysRequest(prefix="x" * 200),
         INVALID, "INVALID_ARGUMENT", "prefix"),
    Case("list-keys-prefix-with-a-space", "ListKeys", lambda k: pb.ListKeysRequest(prefix="bad prefix"),
         INVALID, "INVALID_ARGUMENT", "prefix"),
    Case("list-keys-prefix-with-dot-dot", "ListKeys", lambda k: pb.ListKeysRequest(prefix="bad-input/../"),
         INVALID, "INVALID_ARGUMENT", "prefix"),
    Case("batch-sign-empty", "BatchSign", lambda k: pb.BatchSignRequest(), INVALID, "INVALID_ARGUMENT", "batch"),
    Case("batch-sign-1001", "BatchSign",
         lambda k: pb.BatchSignRequest(requests=[pb.SignRequest(key_id=k.ec, algorithm=ECDSA, digest=DIGEST)] * 1001),
         INVALID, "INVALID_ARGUMENT", "batch"),
    # -- GenerateKey ------------------------------------------------------------------------------
    *(
        Case(f"generate-{label}", "GenerateKey",
             lambda k, kw=kw: pb.GenerateKeyRequest(**{"request_id": "bad-input-req", "key_id": NEVER_MADE,
                                                       "algorithm": pb.KEY_ALGORITHM_EC_P256, **kw}),
             INVALID, "INVALID_ARGUMENT", says)
        for label, kw, says in (
            ("algorithm-99", {"algorithm": 99}, "algorithm"),
            ("algorithm-unspecified", {"algorithm": pb.KEY_ALGORITHM_UNSPECIFIED}, "algorithm"),
            ("usage-99", {"usage": 99}, "usage"),
            ("storage-99", {"storage": 99}, "storage"),
            ("missing-request-id", {"request_id": ""}, "request_id"),
            ("request-id-with-newline", {"request_id": "a\nb"}, "request_id"),
            ("request-id-too-long", {"request_id": "r" * 129}, "request_id"),
            ("empty-key-id", {"key_id": ""}, "key_id"),
            ("bad-key-id", {"key_id": "no spaces allowed"}, "key_id"),
            ("ec-for-encryption", {"usage": pb.KEY_USAGE_ENCRYPT_DECRYPT}, "usage"),
            ("aes-for-signing", {"algorithm": pb.KEY_ALGORITHM_AES_256, "usage": pb.KEY_USAGE_SIGN_VERIFY}, "usage"),
            ("hmac-for-encryption",
             {"algorithm": pb.KEY_ALGORITHM_HMAC_SHA256, "usage": pb.KEY_USAGE_ENCRYPT_DECRYPT}, "usage"),
        )
    ),
    Case("generate-more-copies-than-clusters", "GenerateKey",
         lambda k: pb.GenerateKeyRequest(request_id="bad-input-copies", key_id=NEVER_MADE,
                                         algorithm=pb.KEY_ALGORITHM_EC_P256,
                                         replication=pb.ReplicationPolicy(copies=4)),
         PRECONDITION, "FAILED_PRECONDITION", "replication.copies = 4, but this gateway has 3 clusters"),
    Case("generate-copies-uint32-max", "GenerateKey",
         lambda k: pb.GenerateKeyRequest(request_id="bad-input-copies", key_id=NEVER_MADE,
                                         algorithm=pb.KEY_ALGORITHM_EC_P256,
                                         replication=pb.ReplicationPolicy(copies=2**32 - 1)),
         PRECONDITION, "FAILED_PRECONDITION", "clusters"),
    Case("generate-external-with-copies", "GenerateKey",
         lambda k: pb.GenerateKeyRequest(request_id="bad-input-copies", key_id=NEVER_MADE,
                                         algorithm=pb.KEY_ALGORITHM_EC_P256, storage=pb.KEY_STORAGE_EXTERNAL,
                                         replication=pb.ReplicationPolicy(copies=2)),
         INVALID, "INVALID_ARGUMENT", "EXTERNAL"),
    Case("generate-existing-key-id-new-request", "GenerateKey",
         lambda k: pb.GenerateKeyRequest(request_id=unique("fresh"), key_id=k.ec, algorithm=pb.KEY_ALGORITHM_EC_P256),
         EXISTS, "KEY_EXISTS", "already exists"),
    Case("generate-request-id-reused-other-params", "GenerateKey",
         lambda k: pb.GenerateKeyRequest(request_id=k.ec_request_id, key_id=k.ec, algorithm=pb.KEY_ALGORITHM_EC_P384),
         PRECONDITION, "REQUEST_ID_CONFLICT", "request_id"),
    Case("generate-request-id-reused-other-key", "GenerateKey",
         lambda k: pb.GenerateKeyRequest(request_id=k.ec_request_id, key_id=NEVER_MADE,
                                         algorithm=pb.KEY_ALGORITHM_EC_P256),
         PRECONDITION, "REQUEST_ID_CONFLICT", "request_id"),
)


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The one ErrorInfo of the call's google.rpc.Status details."""
    status = rpc_status.from_call(err)  # also checks that code and message agree with the call's
    assert status is not None, f"{err.code().name} carries no google.rpc.Status: {err.details()!r}"
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    assert len(infos) == 1, f"expected one ErrorInfo, got {infos}"
    return infos[0]


def outcome(crypto: Any, case: Case, keys: Keys) -> tuple[grpc.StatusCode, str, str]:
    """(code, reason, message) of the call; it must fail."""
    err = rpc_error(getattr(crypto, case.method), case.request(keys), timeout=15)
    info = error_info(err)
    assert info.domain == "hsmgw", info
    return err.code(), info.reason, err.details() or ""


def _check(crypto: Any, case: Case, keys: Keys) -> None:
    code, reason, message = outcome(crypto, case, keys)
    assert code not in BUG_CODES, f"{case.name}: {code.name} {message!r}"
    assert (code, reason) == (case.code, case.reason), f"{case.name}: {code.name}/{reason}: {message!r}"
    assert case.says.lower() in message.lower(), f"{case.name}: message {message!r} does not mention {case.says!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_its_status_and_reason(crypto: Any, keys: Keys, case: Case) -> None:
    _check(crypto, case, keys)


def test_refused_key_creations_leave_nothing_behind(crypto: Any, tokens: Any, keys: Keys) -> None:
    for case in CASES:
        if case.method == "GenerateKey":
            _check(crypto, case, keys)
    err = rpc_error(crypto.GetKey, pb.GetKeyRequest(key_id=NEVER_MADE), timeout=10)
    assert err.code() == NOT_FOUND
    for cluster in ("use1-a", "use1-b", "usw2-a"):
        assert tokens.objects(cluster, NEVER_MADE) == [], cluster


def test_limits_are_inclusive(crypto: Any, keys: Keys) -> None:
    """Exactly 64 KiB (and a GCM ciphertext of it), a 12-byte IV and 1,024 random bytes are fine: the refusals
    above are not off by one."""
    message = b"m" * LIMIT
    signed = crypto.Sign(pb.SignRequest(key_id=keys.ec, algorithm=ECDSA, message=message), timeout=10)
    assert crypto.Verify(pb.VerifyRequest(key_id=keys.ec, algorithm=ECDSA, message=message,
                                          signature=signed.signature), timeout=10).valid
    enc = crypto.Encrypt(pb.EncryptRequest(key_id=keys.aes, algorithm=GCM, plaintext=message, aad=b"a" * LIMIT),
                         timeout=10)
    assert len(enc.iv) == 12
    assert len(enc.ciphertext) == LIMIT + 16  # the tag comes on top, and what Encrypt returns decrypts
    assert crypto.Decrypt(pb.DecryptRequest(key_id=keys.aes, algorithm=GCM, ciphertext=enc.ciphertext, iv=enc.iv,
                                            aad=b"a" * LIMIT), timeout=10).plaintext == message
    assert len(crypto.GenerateRandom(pb.GenerateRandomRequest(length=1024), timeout=10).data) == 1024
    assert len(crypto.Mac(pb.MacRequest(key_id=keys.hmac, algorithm=HMAC, data=message), timeout=10).mac) == 32


def test_malformed_signature_or_mac_is_invalid_not_an_error(crypto: Any, keys: Keys) -> None:
    for signature in (b"\x30\x00", b"not der at all", b"\x30\x06\x02\x01\x00\x02\x01\x00", b"\xff" * 200):
        resp = crypto.Verify(pb.VerifyRequest(key_id=keys.ec, algorithm=ECDSA, digest=DIGEST, signature=signature),
                             timeout=10)
        assert not resp.valid, signature
    for mac in (b"m", b"m" * 32, b"m" * 100):
        resp = crypto.VerifyMac(pb.VerifyMacRequest(key_id=keys.hmac, algorithm=HMAC, data=b"x", mac=mac), timeout=10)
        assert not resp.valid, mac


def test_generate_key_is_idempotent_by_request_id(crypto: Any, tokens: Any) -> None:
    key_id = unique("bad-input-idem")
    request = pb.GenerateKeyRequest(request_id=f"req-{key_id}", key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256)
    first = crypto.GenerateKey(request, timeout=30)
    again = crypto.GenerateKey(request, timeout=30)
    assert again == first  # same cluster, same create_time: the same key, not a second one
    assert len(tokens.objects(first.primary_cluster, key_id)) == 2, "a retry must not make another key pair"

    err = rpc_error(crypto.GenerateKey, pb.GenerateKeyRequest(
        request_id=f"other-{key_id}", key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=30)
    assert (err.code(), error_info(err).reason) == (EXISTS, "KEY_EXISTS")

    err = rpc_error(crypto.GenerateKey, pb.GenerateKeyRequest(
        request_id=f"req-{key_id}", key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P384), timeout=30)
    assert (err.code(), error_info(err).reason) == (PRECONDITION, "REQUEST_ID_CONFLICT")

    assert crypto.GetKey(pb.GetKeyRequest(key_id=key_id), timeout=10) == first
    assert len(tokens.objects(first.primary_cluster, key_id)) == 2


def test_destroyed_key_is_refused_and_its_id_never_reused(crypto: Any) -> None:
    key_id = unique("bad-input-destroyed")
    crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256),
                       timeout=30)
    crypto.DestroyKey(pb.DestroyKeyRequest(key_id=key_id), timeout=10)
    err = rpc_error(crypto.Sign, pb.SignRequest(key_id=key_id, algorithm=ECDSA, digest=DIGEST), timeout=10)
    assert err.code() == PRECONDITION and error_info(err).domain == "hsmgw"
    err = rpc_error(crypto.GenerateKey, pb.GenerateKeyRequest(
        request_id=unique("again"), key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=30)
    assert (err.code(), error_info(err).reason) == (EXISTS, "KEY_EXISTS")


def test_bad_batch_items_fail_alone_with_their_reason(crypto: Any, keys: Keys) -> None:
    items = [
        pb.SignRequest(key_id=keys.ec, algorithm=ECDSA, digest=DIGEST, request_id="ok"),
        pb.SignRequest(key_id=MISSING, algorithm=ECDSA, digest=DIGEST, request_id="missing"),
        pb.SignRequest(key_id=keys.ec, algorithm=ECDSA, digest=DIGEST[:31], request_id="short"),
        pb.SignRequest(key_id=keys.aes, algorithm=ECDSA, digest=DIGEST, request_id="usage"),
        pb.SignRequest(key_id=keys.ec, algorithm=99, digest=DIGEST, request_id="algorithm"),
        pb.SignRequest(key_id=keys.ec_gone, algorithm=ECDSA, digest=DIGEST, request_id="gone"),
    ]
    results = crypto.BatchSign(pb.BatchSignRequest(requests=items), timeout=30).responses
    got = [(grpc.StatusCode.OK.value[0] if r.code == 0 else r.code, r.reason) for r in results]
    assert got == [
        (0, ""),
        (NOT_FOUND.value[0], "KEY_NOT_FOUND"),
        (INVALID.value[0], "INVALID_ARGUMENT"),
        (PRECONDITION.value[0], "WRONG_KEY_USAGE"),
        (INVALID.value[0], "INVALID_ARGUMENT"),
        (NOT_FOUND.value[0], "KEY_NOT_FOUND"),
    ]
    assert [r.request_id for r in results] == [i.request_id for i in items]  # failed items name theirs too
    assert results[0].response.request_id == "ok"
    assert results[0].response.request_id == "ok" and results[0].response.signature


def test_a_stream_its_client_cancels_or_lets_expire_is_no_gateway_error(crypto: Any, gateway: Any, keys: Keys) -> None:
    """Cancelling a stream, or letting its deadline pass while the gateway waits for the next
    message, is the client's right: no ERROR line and no traceback in the gateway's log."""
    before = gateway.log().count("internal error")
    request = pb.SignRequest(key_id=keys.ec, algorithm=ECDSA, digest=DIGEST, request_id="1")
    for ends in ("cancel", "deadline"):
        held = threading.Event()

        def one_then_wait(held: threading.Event = held) -> Iterator[pb.SignRequest]:
            yield request
            held.wait(10)  # the client sends nothing more

        stream = crypto.SignStream(one_then_wait(), timeout=1.0 if ends == "deadline" else 15)
        assert next(stream).request_id == "1"
        if ends == "cancel":
            stream.cancel()
        with pytest.raises(grpc.RpcError) as caught:
            next(stream)
        held.set()
        assert caught.value.code() is (grpc.StatusCode.CANCELLED if ends == "cancel"
                                       else grpc.StatusCode.DEADLINE_EXCEEDED)
    time.sleep(0.5)  # the gateway notices the stream's end
    assert gateway.log().count("internal error") == before, gateway.log_digest()
    signature = crypto.Sign(request, timeout=10).signature  # and serves on
    assert signature


def test_caller_strings_of_any_length_never_hide_the_error(crypto: Any, admin: Any, keys: Keys) -> None:
    """A message that quotes what the caller sent is clipped: gRPC refuses trailers over
    16 KiB, and the caller would get RESOURCE_EXHAUSTED "Stream removed" instead."""
    long_id = "r" * 20_000
    bad = pb.SignRequest(key_id=keys.ec, algorithm=ECDSA, digest=DIGEST[:31], request_id=long_id)
    with pytest.raises(grpc.RpcError) as caught:
        list(crypto.SignStream(iter([bad]), timeout=15))
    assert (caught.value.code(), error_info(caught.value).reason) == (INVALID, "INVALID_ARGUMENT")
    assert caught.value.details() == "request_id must be at most 128 printable characters"
    batch = crypto.BatchSign(pb.BatchSignRequest(requests=[bad]), timeout=15)
    assert (batch.responses[0].code, batch.responses[0].message) == (
        INVALID.value[0], "request_id must be at most 128 printable characters")
    for call, request in (
        (admin.ApproveChange, admin_pb2.ApproveChangeRequest(id="c" * 10_000)),
        (admin.DrainCluster, admin_pb2.DrainClusterRequest(cluster="x" * 10_000, drain=True)),
    ):
        err = rpc_error(call, request, timeout=15)
        assert err.code() in (INVALID, NOT_FOUND), err.details()
        assert error_info(err).reason in ("INVALID_ARGUMENT", "KEY_NOT_FOUND")
        assert 100 < len(err.details()) <= 500 and err.details().endswith("…")


def test_bad_stream_item_ends_the_stream_with_its_status(crypto: Any, keys: Keys) -> None:
    requests = [
        pb.SignRequest(key_id=keys.ec, algorithm=ECDSA, digest=DIGEST, request_id="1"),
        pb.SignRequest(key_id=keys.ec, algorithm=ECDSA, digest=DIGEST[:31], request_id="2"),
    ]
    answers = []
    with pytest.raises(grpc.RpcError) as caught:
        for resp in crypto.SignStream(iter(requests), timeout=15):
            answers.append(resp.request_id)
    assert answers == ["1"]
    assert caught.value.code() == INVALID
    info = error_info(caught.value)
    assert info.reason == "INVALID_ARGUMENT"
    assert info.metadata["request_id"] == "2"  # the caller learns which message ended the stream


def _pools(admin: Any) -> dict[str, tuple[int, int, int]]:
    clusters = admin.ListClusters(admin_pb2.ListClustersRequest(), timeout=10).clusters
    return {c.name: (c.sessions_open, c.sessions_in_use, c.pool_size) for c in clusters}


def test_a_thousand_bad_requests_leave_the_pools_as_they_were(crypto: Any, admin: Any, gateway: Any,
                                                               keys: Keys) -> None:
    before = _pools(admin)
    assert set(before) == {"use1-a", "use1-b", "usw2-a"}
    assert all(in_use == 0 for _, in_use, _ in before.values()), before
    log_start = gateway.log_path.stat().st_size

    # Rotate through every kind, concurrently. Six kinds reach the HSM (wrong AAD, wrong IV,
    # tampered or truncated tag, missing material, a wrong key type on the token): ~75 calls.
    flood = [CASES[i % len(CASES)] for i in range(1000)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        outcomes = list(pool.map(lambda case: (case, *outcome(crypto, case, keys)), flood))

    bugs = [(case.name, code.name, message) for case, code, _, message in outcomes if code in BUG_CODES]
    assert not bugs, bugs[:5]
    wrong = Counter((case.name, code.name, reason) for case, code, reason, _ in outcomes
                    if (code, reason) != (case.code, case.reason))
    assert not wrong, wrong

    # The gateway's own probes and repairs take a session for a moment now and then: a leaked
    # session never comes back, one of theirs does within a second.
    def idle() -> dict[str, tuple[int, int, int]] | None:
        pools = _pools(admin)
        return pools if all(in_use == 0 for _, in_use, _ in pools.values()) else None

    after = wait_for(idle, timeout=10, what="every session back in its pool")
    assert {n: (open_, size) for n, (open_, _, size) in after.items()} == \
        {n: (open_, size) for n, (open_, _, size) in before.items()}

    new_log = gateway.log_path.read_bytes()[log_start:].decode(errors="replace")
    assert "internal error" not in new_log and "Traceback" not in new_log, new_log[-3000:]

    # Still serving, on every session: signatures verify and the real ciphertext still opens.
    public = serialization.load_pem_public_key(
        crypto.GetPublicKey(pb.GetPublicKeyRequest(key_id=keys.ec), timeout=10).pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)

    def good(i: int) -> None:
        message = f"still serving {i}".encode()
        signed = crypto.Sign(pb.SignRequest(key_id=keys.ec, algorithm=ECDSA, message=message), timeout=10)
        public.verify(signed.signature, message, ec.ECDSA(hashes.SHA256()))  # raises if invalid
        dec = crypto.Decrypt(pb.DecryptRequest(key_id=keys.aes, algorithm=GCM, ciphertext=keys.ciphertext, iv=keys.iv,
                                               aad=keys.aad), timeout=10)
        assert dec.plaintext == b"secret"

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(good, range(32)))
    assert wait_for(lambda: _pools(admin) == after, timeout=10, what="the pools as they were")


def test_wrong_usage_found_only_by_the_token_is_wrong_key_usage(crypto: Any, tokens: Any) -> None:
    key = _generate(crypto, unique("bad-input-noenc"), pb.KEY_ALGORITHM_AES_256)
    for obj in tokens.objects(key.primary_cluster, key.key_id):
        obj.destroy()
    # The token's key under this id may not encrypt (say, an operator restricted it).
    tokens.session(key.primary_cluster).generate_key(
        KeyType.AES, 256, id=key.key_id.encode(), label=key.key_id, store=True,
        template={Attribute.ENCRYPT: False, Attribute.DECRYPT: False, Attribute.SIGN: False, Attribute.VERIFY: False},
    )
    err = rpc_error(crypto.Encrypt, pb.EncryptRequest(key_id=key.key_id, algorithm=GCM, plaintext=b"x"), timeout=10)
    assert (err.code(), error_info(err).reason) == (PRECONDITION, "WRONG_KEY_USAGE"), err.details()


def test_valid_rsa_oaep_request_is_not_blamed_on_the_caller(crypto: Any) -> None:
    key = _generate(crypto, unique("bad-input-oaep"), pb.KEY_ALGORITHM_RSA_2048, usage=pb.KEY_USAGE_ENCRYPT_DECRYPT)
    request = pb.EncryptRequest(key_id=key.key_id, algorithm=OAEP, plaintext=os.urandom(32))
    try:
        enc = crypto.Encrypt(request, timeout=10)
    except grpc.RpcError as err:
        assert err.code() not in BUG_CODES | {INVALID}, f"a valid request got {err.code().name}: {err.details()}"
        return
    dec = crypto.Decrypt(pb.DecryptRequest(key_id=key.key_id, algorithm=OAEP, ciphertext=enc.ciphertext), timeout=10)
    assert dec.plaintext == request.plaintext


@pytest.mark.parametrize("storage", [pb.KEY_STORAGE_TOKEN, pb.KEY_STORAGE_EXTERNAL])
def test_an_rsa_ciphertext_beyond_the_modulus_is_the_callers_fault_and_opens_no_circuit(
        crypto: Any, admin: Any, storage: int) -> None:
    """Raw RSA answers a number not below the modulus with CKR_GENERAL_ERROR; taken for the
    HSM's failure, a few such requests would open the circuit of every cluster holding the key
    (of every cluster, for an EXTERNAL key)."""
    key = _generate(crypto, unique("bad-input-oaep-big"), pb.KEY_ALGORITHM_RSA_2048, usage=pb.KEY_USAGE_ENCRYPT_DECRYPT,
                    storage=storage)
    for ciphertext in [b"\xff" * 256] * 6 + [bytes.fromhex("ff" * 128 + "00" * 128)]:  # 3 failures open a circuit
        err = rpc_error(crypto.Decrypt, pb.DecryptRequest(key_id=key.key_id, algorithm=OAEP, ciphertext=ciphertext),
                        timeout=15)
        assert (err.code(), error_info(err).reason, err.details()) == (
            INVALID, "DECRYPTION_FAILED", "decryption failed: the ciphertext is not valid for this key")
    circuits = {c.name: c.circuit for c in admin.ListClusters(admin_pb2.ListClustersRequest(), timeout=10).clusters}
    assert circuits == {"use1-a": "closed", "use1-b": "closed", "usw2-a": "closed"}
    enc = crypto.Encrypt(pb.EncryptRequest(key_id=key.key_id, algorithm=OAEP, plaintext=b"still served"), timeout=10)
    dec = crypto.Decrypt(pb.DecryptRequest(key_id=key.key_id, algorithm=OAEP, ciphertext=enc.ciphertext), timeout=10)
    assert dec.plaintext == b"still served"

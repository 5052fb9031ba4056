"""BatchSign: items spread over sessions, each with its own status, in request order."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Executor
from types import SimpleNamespace

import grpc
import pytest
from asn1crypto.algos import DSASignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

from gateway.servicer import BATCH_CHUNK_MAX, CryptoServicer
from hsmgw.v1 import crypto_pb2 as pb
from router.pkcs11.cluster import _ecdsa_raw_to_der
from tests.support import unique

OK = grpc.StatusCode.OK.value[0]
EC = pb.ALGORITHM_ECDSA_SHA256


def _key(crypto, algorithm=pb.KEY_ALGORITHM_EC_P256):
    key_id = unique("batch")
    crypto.GenerateKey(pb.GenerateKeyRequest(request_id=unique("req"), key_id=key_id, algorithm=algorithm))
    der = crypto.GetPublicKey(pb.GetPublicKeyRequest(key_id=key_id)).der
    return key_id, serialization.load_der_public_key(der)


def _digest(i: int) -> bytes:
    return hashlib.sha256(f"item {i}".encode()).digest()


def test_items_keep_their_order_and_their_own_status(crypto) -> None:
    ec_key, ec_public = _key(crypto)
    rsa_key, rsa_public = _key(crypto, pb.KEY_ALGORITHM_RSA_2048)
    plan = []  # (request, expected code)
    for i in range(80):  # long enough to be cut into chunks run on several threads
        kind = i % 8
        if kind == 3:
            plan.append((pb.SignRequest(key_id="batch/no-such-key", algorithm=EC, digest=_digest(i)),
                         grpc.StatusCode.NOT_FOUND))
        elif kind == 5:
            plan.append((pb.SignRequest(key_id=ec_key, algorithm=EC, digest=b"short"),
                         grpc.StatusCode.INVALID_ARGUMENT))
        elif kind == 6:
            plan.append((pb.SignRequest(key_id=ec_key, algorithm=pb.ALGORITHM_RSA_PKCS1_SHA256, digest=_digest(i)),
                         grpc.StatusCode.FAILED_PRECONDITION))
        elif kind == 7:
            plan.append((pb.SignRequest(key_id=ec_key, algorithm=EC), grpc.StatusCode.INVALID_ARGUMENT))
        elif kind == 2:
            plan.append((pb.SignRequest(key_id=rsa_key, algorithm=pb.ALGORITHM_RSA_PKCS1_SHA256,
                                        digest=_digest(i), request_id=f"r{i}"), grpc.StatusCode.OK))
        else:
            plan.append((pb.SignRequest(key_id=ec_key, algorithm=EC, digest=_digest(i), request_id=f"r{i}"),
                         grpc.StatusCode.OK))
    response = crypto.BatchSign(pb.BatchSignRequest(requests=[r for r, _ in plan]), timeout=60)
    assert len(response.responses) == len(plan)
    by_value = {c.value[0]: c for c in grpc.StatusCode}
    codes = [by_value[item.code] for item in response.responses]
    assert codes == [code for _, code in plan]
    for i, ((request, code), item) in enumerate(zip(plan, response.responses, strict=True)):
        if code is not grpc.StatusCode.OK:
            assert item.message and item.reason, f"item {i} says why it failed"
            continue
        assert item.response.key_id == request.key_id and item.response.request_id == request.request_id
        assert item.response.cluster
        if request.key_id == ec_key:
            ec_public.verify(item.response.signature, request.digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        else:
            rsa_public.verify(item.response.signature, request.digest, padding.PKCS1v15(),
                              utils.Prehashed(hashes.SHA256()))


def test_a_thousand_valid_items_all_verify(crypto) -> None:
    keys = [_key(crypto) for _ in range(3)]
    requests = [pb.SignRequest(key_id=keys[i % 3][0], algorithm=EC, digest=_digest(i)) for i in range(1000)]
    response = crypto.BatchSign(pb.BatchSignRequest(requests=requests), timeout=60)
    assert [item.code for item in response.responses] == [OK] * 1000
    for i, (request, item) in enumerate(zip(requests, response.responses, strict=True)):
        assert item.response.key_id == request.key_id, f"item {i} answered out of order"
        public = keys[i % 3][1]
        public.verify(item.response.signature, request.digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_batch_size_limits(crypto) -> None:
    for size in (0, 1001):
        with pytest.raises(grpc.RpcError) as err:
            crypto.BatchSign(pb.BatchSignRequest(requests=[pb.SignRequest(key_id="k", algorithm=EC)] * size))
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT


class _Router:
    """Just enough router for cutting a batch into chunks (no HSM)."""

    def __init__(self, where: dict[str, str], pool_size: int) -> None:
        self.where = where
        self.backends = {c: SimpleNamespace(spec=SimpleNamespace(pool_size=pool_size)) for c in set(where.values())}

    def placement(self, key_id: str):
        if key_id not in self.where:
            raise KeyError(key_id)
        return SimpleNamespace(primary=self.where[key_id])

    def sign_many(self, items, deadline: float):
        return [(f"sig-{key_id}".encode(), self.where[key_id]) for key_id, *_ in items]


class _NoThreads(Executor):
    def submit(self, *args, **kwargs):
        raise AssertionError("a one-CPU worker must not hand chunks to other threads")


def test_on_one_cpu_a_large_batch_is_signed_in_the_request_thread() -> None:
    router = _Router({"a": "use1-a", "b": "use1-b"}, pool_size=4)
    servicer = CryptoServicer(router, batch_executor=_NoThreads(), cpus=1)  # type: ignore[arg-type]
    items = [pb.SignRequest(key_id="ab"[i % 2], algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=bytes(32),
                            request_id=f"r{i}") for i in range(300)]
    assert len(servicer._chunks(items)[0]) >= 2, "still cut into chunks, so a session is never held for 300 items"
    context = SimpleNamespace(time_remaining=lambda: 5.0, is_active=lambda: True)
    response = servicer.BatchSign(pb.BatchSignRequest(requests=items), context)
    assert [r.code for r in response.responses] == [0] * 300
    assert [r.response.request_id for r in response.responses] == [f"r{i}" for i in range(300)]
    assert {r.response.cluster for r in response.responses} == {"use1-a", "use1-b"}


def test_a_batch_after_the_executor_stopped_is_signed_in_the_request_thread() -> None:
    """The gateway closes the executor as it stops: a batch still running, or arriving just
    then, is signed by its own thread rather than failed."""
    router = _Router({"a": "use1-a", "b": "use1-b"}, pool_size=4)
    servicer = CryptoServicer(router, cpus=2)  # type: ignore[arg-type]
    servicer.close()
    items = [pb.SignRequest(key_id="ab"[i % 2], algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=bytes(32),
                            request_id=f"r{i}") for i in range(300)]
    assert servicer._chunks(items)[1] >= 2, "more than one runner would be asked for"
    context = SimpleNamespace(time_remaining=lambda: 5.0, is_active=lambda: True)
    response = servicer.BatchSign(pb.BatchSignRequest(requests=items), context)
    assert [r.code for r in response.responses] == [0] * 300
    assert [r.response.request_id for r in response.responses] == [f"r{i}" for i in range(300)]


class _ShortRouter(_Router):
    """A router with a bug: one result too few for any chunk that holds key "b"."""

    def sign_many(self, items, deadline: float):
        signed = super().sign_many(items, deadline)
        return signed[:-1] if any(key_id == "b" for key_id, *_ in items) else signed


@pytest.mark.parametrize("cpus", [1, 2], ids=["request-thread", "helpers"])
def test_a_chunk_that_fails_on_a_bug_says_internal_and_the_rest_is_signed(cpus: int, caplog) -> None:
    """Wherever the chunk runs (the request thread alone on one CPU, or a helper), its items say
    INTERNAL with no detail, the error is logged, and the other clusters' items are answered."""
    router = _ShortRouter({"a": "use1-a", "b": "use1-b"}, pool_size=4)
    servicer = CryptoServicer(router, cpus=cpus)  # type: ignore[arg-type]
    try:
        items = [pb.SignRequest(key_id="ab"[i // 100], algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=bytes(32),
                                request_id=f"r{i}") for i in range(200)]
        context = SimpleNamespace(time_remaining=lambda: 5.0, is_active=lambda: True)
        response = servicer.BatchSign(pb.BatchSignRequest(requests=items), context)
    finally:
        servicer.close()
    assert [r.code for r in response.responses[:100]] == [0] * 100
    assert [r.response.request_id for r in response.responses[:100]] == [f"r{i}" for i in range(100)]
    assert {r.code for r in response.responses[100:]} == {grpc.StatusCode.INTERNAL.value[0]}
    assert {r.reason for r in response.responses[100:]} == {"INTERNAL"}
    assert "strict" not in response.responses[150].message  # no internals reach the caller
    assert "internal error in batch item" in caplog.text


@pytest.mark.parametrize("size", [1, 31, 64, 200, 1000])
def test_chunks_cover_every_item_once_per_cluster_within_bounds(size: int) -> None:
    router = _Router({"a": "use1-a", "b": "use1-b"}, pool_size=4)
    servicer = CryptoServicer(router, cpus=4)  # type: ignore[arg-type]
    try:
        items = [pb.SignRequest(key_id=("a", "b", "missing")[i % 3]) for i in range(size)]
        chunks, at_once = servicer._chunks(items)
        assert 1 <= at_once <= min(len(chunks), 4 + 4 + 1)  # two clusters of 4 sessions; unknown keys: 1
        flat = sorted(i for chunk in chunks for i in chunk)
        assert flat == list(range(size))
        for chunk in chunks:
            assert chunk == sorted(chunk)
            if size >= 32:
                assert len({items[i].key_id for i in chunk} - {"missing"}) <= 1 or len(chunks) == 1
                assert len(chunk) <= BATCH_CHUNK_MAX
        if size >= 200:
            assert len(chunks) >= 2 * 2, "a large batch is spread over several sessions per cluster"
    finally:
        servicer.close()


@pytest.mark.parametrize("size", [32, 48, 66, 64, 96, 132])  # P-256, P-384, P-521 r||s: 64, 96, 132
def test_ecdsa_der_encoding_matches_asn1crypto(size: int) -> None:
    half = size // 2
    samples = [os.urandom(size) for _ in range(200)]
    samples += [b"\0" * half + b"\x80" + os.urandom(half - 1), b"\x80" * size, b"\0" * (size - 1) + b"\x01"]
    for raw in samples:
        expected = DSASignature({"r": int.from_bytes(raw[:half], "big"), "s": int.from_bytes(raw[half:], "big")})
        assert _ecdsa_raw_to_der(raw) == expected.dump()

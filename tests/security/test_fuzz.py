"""Fuzzing the public API over mTLS: no input crashes the gateway, leaks a key or loses one.

Hypothesis generates arbitrary and adversarial requests for every CryptoService RPC —
random bytes on the wire, fields up to 1 MiB, unknown enum numbers, algorithms that do
not fit the key, unicode and path-like key ids, empty fields, oversized batches — and
sends them, one at a time, as three identities: ``fuzzer`` (may use keys under
``fuzz/`` and create/destroy keys under ``fuzz/new/``), ``payments-app`` (a grant
elsewhere) and ``nobody`` (no grant).

Every answer must be a documented status carrying the gateway's ``ErrorInfo`` (never
UNKNOWN or INTERNAL, never a dropped connection); nothing outside an identity's grant
may succeed; afterwards the server is up, every pool holds as many sessions as before,
and the only keys created or destroyed are those the fuzzer was told it created or
destroyed.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsmgw.v1 import admin_pb2, crypto_pb2
from hsmgw.v1 import crypto_pb2 as pb
from tests.security.helpers import Client, details
from tests.support import GatewayProcess

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Generating overly large repr")]

EXAMPLES = 2200
MAX_MESSAGE = 4 * 1024 * 1024  # server.max_message_bytes (default)
RUN = "k"  # keys made for the fuzzer live under fuzz/k/
FIXED = {
    "ec256": pb.KEY_ALGORITHM_EC_P256,
    "ec384": pb.KEY_ALGORITHM_EC_P384,
    "rsa": pb.KEY_ALGORITHM_RSA_2048,
    "aes": pb.KEY_ALGORITHM_AES_256,
    "hmac": pb.KEY_ALGORITHM_HMAC_SHA256,
}
FIXED_IDS = [f"fuzz/{RUN}/{name}" for name in FIXED] + [f"fuzz/{RUN}/aes-external", "secret/k/ec", "payments/k/ec"]
C = grpc.StatusCode
DOCUMENTED = {
    C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.ALREADY_EXISTS, C.PERMISSION_DENIED,
    C.RESOURCE_EXHAUSTED, C.UNAVAILABLE, C.DEADLINE_EXCEEDED,
}
AMBIGUOUS = {C.UNAVAILABLE, C.DEADLINE_EXCEEDED}  # a GenerateKey/DestroyKey may or may not have happened
CRYPTO = crypto_pb2.DESCRIPTOR.services_by_name["CryptoService"]


# -- strategies ----------------------------------------------------------------------------------

SIZES = [0, 1, 11, 12, 13, 16, 31, 32, 33, 48, 64, 65, 255, 256, 257, 1024, 1025, 4096,
         65535, 65536, 65537, 1 << 20]


def _fill(seed: bytes, size: int) -> bytes:
    return (seed * (size // len(seed) + 1))[:size]


payloads = st.one_of(
    st.binary(max_size=80),
    st.builds(_fill, st.binary(min_size=1, max_size=8), st.sampled_from(SIZES)),
)


def _enum(values: list[int]) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(values), st.integers(-(2**31), 2**31 - 1))


key_algorithms = _enum(list(pb.KeyAlgorithm.values()))
algorithms = _enum(list(pb.Algorithm.values()))
usages = _enum(list(pb.KeyUsage.values()))
storages = _enum(list(pb.KeyStorage.values()))
int32s = st.one_of(st.sampled_from([0, 1, -1, 100, 1000, 1001, 1024, 1025, 2**31 - 1, -(2**31)]),
                   st.integers(-(2**31), 2**31 - 1))

ADVERSARIAL_IDS = [
    "", "/", "fuzz/", "fuzz", "fuzz/new/", "fuzz/../secret/k/ec", f"fuzz/{RUN}/../../secret/k/ec",
    f"fuzz//{RUN}/ec256", f"fuzz/{RUN}/ec256/", f"fuzz/{RUN}/ec256\x00", f" fuzz/{RUN}/ec256", f"fuzz/{RUN}/ec256\n",
    f"FUZZ/{RUN}/ec256", "fuzz\\k\\ec256", "../../etc/passwd", "/etc/passwd", "fuzz/new/%2e%2e/secret",
    "fuzz/new/\u202egnp.exe", "fuzz/new/é", "fuzz/new/" + "a" * 200, "a" * 129, "fuzz/new/*", "*", "fuzz/new/..",
    "fuzz/new/.", f"fuzz/{RUN}/ec256'; DROP TABLE placements; --", "fuzz/new/\x7f", "secret/k/", "secret/k/ec",
    "fuzz/new/" + "x" * (1 << 20),
]
VALID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-/"

NEW_IDS = [f"fuzz/new/{name}" for name in "abcdefghijkl"]  # few, so creations, retries and destroys collide

key_ids = st.one_of(
    st.sampled_from(NEW_IDS),
    st.sampled_from(FIXED_IDS),
    st.sampled_from(FIXED_IDS),
    st.sampled_from(ADVERSARIAL_IDS),
    st.text(max_size=40),
    st.text(alphabet=VALID_CHARS, min_size=1, max_size=24).map(lambda s: "fuzz/new/" + s),
    st.text(alphabet=VALID_CHARS, max_size=12).map(lambda s: f"fuzz/{RUN}/" + s),
)
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", "a" * 129, "\x00", "r" * 5000]))


@st.composite
def sign_requests(draw: st.DrawFn) -> pb.SignRequest:
    request = pb.SignRequest(key_id=draw(key_ids), algorithm=draw(algorithms), request_id=draw(texts))
    which = draw(st.sampled_from(["digest", "message", "none", "digest32"]))
    if which == "digest":
        request.digest = draw(payloads)
    elif which == "digest32":
        request.digest = draw(st.binary(min_size=32, max_size=32))
    elif which == "message":
        request.message = draw(payloads)
    return request


@st.composite
def verify_requests(draw: st.DrawFn) -> pb.VerifyRequest:
    signed = draw(sign_requests())
    request = pb.VerifyRequest(key_id=signed.key_id, algorithm=signed.algorithm, signature=draw(payloads))
    if signed.HasField("digest"):
        request.digest = signed.digest
    elif signed.HasField("message"):
        request.message = signed.message
    return request


@dataclass(frozen=True)
class Call:
    method: str
    request: Any
    """A message, bytes (raw wire bytes), or a list of either for SignStream."""
    identity: str

    @property
    def size(self) -> int:
        items = self.request if isinstance(self.request, list) else [self.request]
        return max((len(i) if isinstance(i, bytes) else i.ByteSize() for i in items), default=0)


def _unary(method: str, strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[str, Any]]:
    return strategy.map(lambda r: (method, r))


def _decrypt(ciphertext: bytes, iv: bytes) -> st.SearchStrategy[pb.DecryptRequest]:
    tampered = st.builds(lambda c, i: c[:i] + bytes([c[i % len(c)] ^ 1]) + c[i + 1:], st.just(ciphertext),
                         st.integers(0, len(ciphertext) - 1))
    return st.builds(
        pb.DecryptRequest, key_id=st.one_of(st.just(f"fuzz/{RUN}/aes"), key_ids), algorithm=algorithms,
        ciphertext=st.one_of(st.just(ciphertext), tampered, payloads), iv=st.one_of(st.just(iv), payloads),
        aad=st.one_of(st.just(b"fuzz"), payloads),
    )


def requests(ciphertext: bytes, iv: bytes) -> st.SearchStrategy[tuple[str, Any]]:
    batch_items = st.one_of(
        st.lists(sign_requests(), max_size=6),
        st.integers(1001, 1003).map(lambda n: [pb.SignRequest(key_id=f"fuzz/{RUN}/ec256")] * n),
        st.just([pb.SignRequest(key_id=f"fuzz/{RUN}/ec256", algorithm=pb.ALGORITHM_ECDSA_SHA256,
                                digest=b"\x01" * 32)] * 1000),
    )
    raw_method = st.sampled_from([m.name for m in CRYPTO.methods])
    return st.one_of(
        _unary("GenerateKey", st.builds(  # plausible: gets past validation often
            pb.GenerateKeyRequest, request_id=st.sampled_from(["r1", "r2", "r3"]), key_id=st.sampled_from(NEW_IDS),
            algorithm=st.sampled_from(list(pb.KeyAlgorithm.values())),
            usage=st.sampled_from(list(pb.KeyUsage.values())),
            replication=st.builds(pb.ReplicationPolicy, copies=st.integers(0, 3)),
            storage=st.sampled_from(list(pb.KeyStorage.values())), non_extractable=st.booleans(),
        )),
        _unary("GenerateKey", st.builds(
            pb.GenerateKeyRequest, request_id=texts, key_id=key_ids, algorithm=key_algorithms, usage=usages,
            replication=st.builds(pb.ReplicationPolicy, copies=st.one_of(st.integers(0, 4),
                                                                        st.integers(0, 2**32 - 1))),
            storage=storages, non_extractable=st.booleans(),
        )),
        _unary("GetKey", st.builds(pb.GetKeyRequest, key_id=key_ids)),
        _unary("ListKeys", st.builds(
            pb.ListKeysRequest, page_size=int32s, page_token=st.one_of(texts, st.just("AAAA"), st.just("0")),
            prefix=st.one_of(st.sampled_from(["", "fuzz/", f"fuzz/{RUN}/", "fuzz", "secret/", "fuzz/new/"]), texts),
        )),
        _unary("GetPublicKey", st.builds(pb.GetPublicKeyRequest, key_id=key_ids)),
        _unary("DestroyKey", st.builds(pb.DestroyKeyRequest, key_id=st.one_of(st.sampled_from(NEW_IDS), key_ids))),
        _unary("Sign", sign_requests()),
        _unary("Verify", verify_requests()),
        _unary("Encrypt", st.builds(pb.EncryptRequest, key_id=key_ids, algorithm=algorithms, plaintext=payloads,
                                    aad=payloads)),
        _unary("Decrypt", _decrypt(ciphertext, iv)),
        _unary("Mac", st.builds(pb.MacRequest, key_id=key_ids, algorithm=algorithms, data=payloads)),
        _unary("VerifyMac", st.builds(pb.VerifyMacRequest, key_id=key_ids, algorithm=algorithms, data=payloads,
                                      mac=payloads)),
        _unary("GenerateRandom", st.builds(pb.GenerateRandomRequest, length=int32s)),
        _unary("BatchSign", batch_items.map(lambda items: pb.BatchSignRequest(requests=items))),
        _unary("SignStream", st.lists(sign_requests(), max_size=4)),
        # Bytes that may not even parse, to every method.
        st.tuples(raw_method, st.one_of(st.binary(max_size=200), payloads)).map(
            lambda t: (t[0], [t[1]] if t[0] == "SignStream" else t[1])
        ),
    )


def calls(ciphertext: bytes, iv: bytes) -> st.SearchStrategy[Call]:
    identities = st.sampled_from(["fuzzer"] * 6 + ["nobody", "payments-app"])
    return st.builds(lambda mr, who: Call(mr[0], mr[1], who), requests(ciphertext, iv), identities)


# -- sending and judging --------------------------------------------------------------------------


@dataclass
class Ledger:
    sent: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    methods: Counter[str] = field(default_factory=Counter)
    created: set[str] = field(default_factory=set)
    destroyed: set[str] = field(default_factory=set)
    maybe: set[str] = field(default_factory=set)


def _send(client: Client, call: Call) -> tuple[Any, grpc.RpcError | None, list[Any]]:
    """(response, error, stream responses received before the error)."""
    path = f"/{CRYPTO.full_name}/{call.method}"
    streamed: list[Any] = []
    items = call.request if isinstance(call.request, list) else None
    raw = isinstance(call.request, bytes) or (items is not None and items and isinstance(items[0], bytes))
    try:
        if call.method == "SignStream":
            assert items is not None
            stub = (client.channel.stream_stream(path) if raw else client.crypto.SignStream)
            for response in stub(iter(items), timeout=20):
                streamed.append(response)
            return streamed, None, streamed
        if raw:
            return client.channel.unary_unary(path)(call.request, timeout=20), None, streamed
        return getattr(client.crypto, call.method)(call.request, timeout=20), None, streamed
    except grpc.RpcError as exc:
        return None, exc, streamed


def _granted(identity: str, operation: str, key_id: str) -> bool:
    if identity == "fuzzer":
        prefix = "fuzz/new/" if operation in ("GenerateKey", "DestroyKey") else "fuzz/"
        return key_id.startswith(prefix)
    if identity == "payments-app":
        return operation in ("Sign", "Verify", "GetKey", "GetPublicKey") and key_id.startswith("payments/")
    return False


def _judge(call: Call, response: Any, error: grpc.RpcError | None, streamed: list[Any], ledger: Ledger) -> None:
    raw = isinstance(call.request, bytes) or (
        isinstance(call.request, list) and call.request and isinstance(call.request[0], bytes)
    )
    code = error.code() if error is not None else C.OK
    ledger.codes[code.name] += 1
    what = f"{call.method} as {call.identity}: {code.name} {error.details() if error else ''}"[:400]
    assert code in DOCUMENTED, what
    if error is not None and code is not C.DEADLINE_EXCEEDED:
        info, retry = details(error)
        if info is None:
            # Only gRPC's own message-size refusal comes without the gateway's ErrorInfo.
            assert code is C.RESOURCE_EXHAUSTED and call.size > MAX_MESSAGE, what
        else:
            assert info.domain == "hsmgw", what
            if code is C.RESOURCE_EXHAUSTED:
                assert retry is not None, what
    if call.identity == "nobody":
        refused = {C.PERMISSION_DENIED, C.INVALID_ARGUMENT} if raw else {C.PERMISSION_DENIED}
        if call.size > MAX_MESSAGE:  # gRPC refuses an oversized message before anyone is asked
            refused.add(C.RESOURCE_EXHAUSTED)
        assert code in refused, what
    if raw:
        return

    operation = "Sign" if call.method in ("BatchSign", "SignStream") else call.method
    if call.method == "BatchSign":
        if response is None:
            if code is C.PERMISSION_DENIED:  # the whole batch: only for an identity that may sign nothing
                assert call.identity == "nobody", what
            return
        for item, result in zip(call.request.requests, response.responses, strict=True):
            assert result.code in {c.value[0] for c in DOCUMENTED}, (what, result)
            if result.code == 0:
                assert _granted(call.identity, "Sign", item.key_id), (what, item.key_id)
            elif result.code == C.PERMISSION_DENIED.value[0]:
                assert not _granted(call.identity, "Sign", item.key_id), (what, item.key_id)
        return
    if call.method == "SignStream":
        for item in call.request[: len(streamed)]:
            assert _granted(call.identity, "Sign", item.key_id), what
        return
    if call.method == "ListKeys":
        if code is C.OK:
            assert _granted(call.identity, "ListKeys", call.request.prefix), what
            assert all(k.key_id.startswith(call.request.prefix) for k in response.keys), what
        return
    if call.method == "GenerateRandom":
        if code is C.OK:
            assert call.identity == "fuzzer" and len(response.data) == call.request.length, what
        return
    key_id = call.request.key_id
    if code is C.OK:
        assert _granted(call.identity, operation, key_id), what
    if code is C.PERMISSION_DENIED:
        assert not _granted(call.identity, operation, key_id), what
    if call.method == "GenerateKey":
        if code is C.OK:
            ledger.created.add(key_id)
        elif code in AMBIGUOUS:
            ledger.maybe.add(key_id)
    if call.method == "DestroyKey":
        if code is C.OK:
            ledger.destroyed.add(key_id)
        elif code in AMBIGUOUS:
            ledger.maybe.add(key_id)


# -- the test ----------------------------------------------------------------------------------------


def _all_keys(root: Client) -> dict[str, int]:
    keys: dict[str, int] = {}
    token = ""
    while True:
        page = root.crypto.ListKeys(pb.ListKeysRequest(page_size=1000, page_token=token), timeout=30)
        keys.update((k.key_id, k.state) for k in page.keys)
        token = page.next_page_token
        if not token:
            return keys


def _sessions(root: Client) -> dict[str, tuple[int, int]]:
    clusters = root.admin.ListClusters(admin_pb2.ListClustersRequest(), timeout=10).clusters
    return {c.name: (c.sessions_open, c.sessions_in_use) for c in clusters}


@pytest.fixture(scope="module")
def fixed_keys(connect: Callable[[str], Client]) -> tuple[bytes, bytes]:
    """The keys the fuzzer aims at (one per algorithm), and a real AES-GCM ciphertext to tamper with."""
    root = connect("root").crypto

    def make(key_id: str, algorithm: int, **kw: Any) -> None:
        root.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, algorithm=algorithm,
                                               replication=pb.ReplicationPolicy(copies=1), **kw), timeout=60)

    for name, algorithm in FIXED.items():
        make(f"fuzz/{RUN}/{name}", algorithm)
    make(f"fuzz/{RUN}/aes-external", pb.KEY_ALGORITHM_AES_256, storage=pb.KEY_STORAGE_EXTERNAL)
    make("secret/k/ec", pb.KEY_ALGORITHM_EC_P256)
    make("payments/k/ec", pb.KEY_ALGORITHM_EC_P256)
    sealed = root.Encrypt(pb.EncryptRequest(key_id=f"fuzz/{RUN}/aes", algorithm=pb.ALGORITHM_AES_GCM,
                                            plaintext=b"fuzzing", aad=b"fuzz"), timeout=10)
    return sealed.ciphertext, sealed.iv


def test_generated_requests_get_documented_statuses_and_change_nothing_they_should_not(
    tls_gateway: GatewayProcess, connect: Callable[[str], Client], fixed_keys: tuple[bytes, bytes]
) -> None:
    root = connect("root")
    clients = {name: connect(name) for name in ("fuzzer", "nobody", "payments-app")}
    keys_before = _all_keys(root)
    sessions_before = _sessions(root)
    ledger = Ledger()
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(call=calls(*fixed_keys))
    def fuzz(call: Call) -> None:
        response, error, streamed = _send(clients[call.identity], call)
        ledger.sent += 1
        ledger.methods[call.method] += 1
        _judge(call, response, error, streamed, ledger)

    fuzz()
    elapsed = time.monotonic() - started
    print(f"\nfuzz: {ledger.sent} requests in {elapsed:.1f}s; {dict(ledger.codes)}; "
          f"created {len(ledger.created)}, destroyed {len(ledger.destroyed)}, ambiguous {len(ledger.maybe)}; "
          f"{dict(ledger.methods)}")

    assert ledger.sent >= 2000
    assert set(ledger.methods) == {m.name for m in CRYPTO.methods}, "every RPC was fuzzed"

    # The server is up and healthy, on the same connections.
    assert tls_gateway.proc is not None and tls_gateway.proc.poll() is None
    health = health_pb2_grpc.HealthStub(root.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "Exception calling application" not in tls_gateway.log()
    assert "Exception deserializing" not in tls_gateway.log()

    # Every pool holds the sessions it held, none left checked out.
    assert _sessions(root) == sessions_before

    # No key appeared or vanished but those the fuzzer was told about (or could not be told about).
    keys_after = _all_keys(root)
    destroyed = pb.KEY_STATE_DESTROYED
    appeared = set(keys_after) - set(keys_before)
    assert appeared <= ledger.created | ledger.maybe, sorted(appeared - ledger.created - ledger.maybe)[:10]
    gone = {k for k, state in keys_before.items()
            if state != destroyed and keys_after.get(k, destroyed) == destroyed}
    assert gone <= ledger.destroyed | ledger.maybe, sorted(gone)[:10]
    assert all(k.startswith("fuzz/new/") for k in appeared | gone)
    for key_id in FIXED_IDS:
        assert keys_after[key_id] == keys_before[key_id] != destroyed, key_id
    digest = hashlib.sha256(b"still here").digest()
    assert root.crypto.Sign(pb.SignRequest(key_id="secret/k/ec", algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=digest),
                            timeout=10).signature

"""Per-identity rate limits and concurrency caps: RESOURCE_EXHAUSTED with RetryInfo, others unaffected."""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable

import grpc
import pytest

from gateway.auth import Limits
from gateway.interceptors import ConcurrencyLimited, Limiter, RateLimited
from gateway.server import KEEPALIVE_OPTIONS
from gateway.tls import DevCerts
from hsmgw.v1 import crypto_pb2 as pb
from tests.security.helpers import Client, details
from tests.support import FakeClock, GatewayProcess, rpc_error, unique

DIGEST = hashlib.sha256(b"limits").digest()
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


# -- the limiter, on an injected clock ---------------------------------------------------------


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    clock = FakeClock(100.0)
    limiter = Limiter(clock)
    limits = Limits(rate=2, burst=3)
    for _ in range(3):
        limiter.charge("a", limits)
    with pytest.raises(RateLimited) as info:
        limiter.charge("a", limits)
    assert info.value.retry_after == pytest.approx(0.5)
    clock.now += 0.5
    limiter.charge("a", limits)
    with pytest.raises(RateLimited):
        limiter.charge("a", limits)
    limiter.charge("b", limits)  # buckets are per identity


def test_a_batch_costs_one_token_per_item_and_may_go_into_debt() -> None:
    clock = FakeClock(100.0)
    limiter = Limiter(clock)
    limits = Limits(rate=10, burst=5)
    limiter.charge("a", limits, cost=50)  # a full bucket admits a batch bigger than the bucket...
    with pytest.raises(RateLimited) as info:
        limiter.charge("a", limits)  # ...and the debt is paid off at the rate
    assert info.value.retry_after == pytest.approx(4.6)  # 45 tokens of debt + 1, at 10/s
    clock.now += 4.6
    limiter.charge("a", limits)


def test_no_rate_means_unlimited() -> None:
    limiter = Limiter(FakeClock(100.0))
    for _ in range(10_000):
        limiter.charge("a", Limits())


def test_concurrency_cap_counts_calls_in_flight() -> None:
    limiter = Limiter(FakeClock(100.0))
    limits = Limits(concurrency=2)
    limiter.enter("a", limits)
    limiter.enter("a", limits)
    with pytest.raises(ConcurrencyLimited) as info:
        limiter.enter("a", limits)
    assert info.value.retry_after and info.value.retry_after > 0
    limiter.enter("b", limits)
    limiter.leave("a")
    limiter.enter("a", limits)
    assert limiter.in_flight("a") == 2


def test_idle_identities_are_forgotten_when_there_are_too_many() -> None:
    limiter = Limiter(FakeClock(100.0), max_identities=100)
    limiter.enter("busy", Limits())
    for i in range(1000):
        limiter.charge(f"id-{i}", Limits(rate=1))
    assert limiter.in_flight("busy") == 1
    assert len(limiter._usage) <= 100


def test_keepalive_options_resist_ping_floods() -> None:
    options = dict(KEEPALIVE_OPTIONS)
    assert options["grpc.keepalive_permit_without_calls"] == 0
    assert options["grpc.http2.min_ping_interval_without_data_ms"] >= 10_000
    assert 0 < options["grpc.http2.max_ping_strikes"] <= 3


def test_a_client_flooding_pings_is_sent_away(
    tls_gateway: GatewayProcess, certs: DevCerts, capfd: pytest.CaptureFixture[str]
) -> None:
    abusive = [("grpc.keepalive_time_ms", 100), ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]
    cert, key = certs.client("payments-app")
    credentials = grpc.ssl_channel_credentials(certs.ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    with grpc.secure_channel(tls_gateway.target, credentials, options=abusive) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        deadline = time.monotonic() + 10
        seen = ""
        while "too_many_pings" not in seen and time.monotonic() < deadline:
            time.sleep(0.2)
            seen += capfd.readouterr().err  # gRPC core logs the GOAWAY it received
    assert "too_many_pings" in seen


# -- through the real server ----------------------------------------------------------------------


def test_over_the_rate_limit_is_resource_exhausted_with_retry_info(connect: Callable[[str], Client]) -> None:
    throttled = connect("throttled").crypto  # rate 2/s, burst 3
    request = pb.GetKeyRequest(key_id="payments/limits/none")
    codes = [rpc_error(throttled.GetKey, request, timeout=5).code() for _ in range(3)]
    assert codes == [grpc.StatusCode.NOT_FOUND] * 3
    err = rpc_error(throttled.GetKey, request, timeout=5)
    assert err.code() is EXHAUSTED
    assert "over its rate limit (2/s, burst 3)" in err.details()
    info, retry = details(err)
    assert info is not None and info.reason == "RATE_LIMITED"
    assert retry is not None
    delay = retry.retry_delay.ToTimedelta().total_seconds()
    assert 0 < delay <= 0.5
    # Others are not slowed down by it.
    for _ in range(10):
        assert rpc_error(connect("payments-app").crypto.GetKey, request, timeout=5).code() is grpc.StatusCode.NOT_FOUND
    time.sleep(delay + 0.05)
    assert rpc_error(throttled.GetKey, request, timeout=5).code() is grpc.StatusCode.NOT_FOUND


def test_a_stream_over_the_rate_limit_ends_at_the_message_that_exceeded_it(
    connect: Callable[[str], Client],
) -> None:
    root = connect("root").crypto
    key_id = f"payments/{unique('limits')}"
    root.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256,
                                           replication=pb.ReplicationPolicy(copies=1)), timeout=30)
    throttled = connect("throttled").crypto  # rate 2/s, burst 3: each message costs a token
    time.sleep(1.6)  # whatever an earlier test took from the bucket is back
    items = [pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=DIGEST, request_id=f"m{i}")
             for i in range(6)]
    answers = []
    with pytest.raises(grpc.RpcError) as caught:
        for answer in throttled.SignStream(iter(items), timeout=10):
            answers.append(answer.request_id)
    # The burst is answered (a slow machine may refill a token meanwhile), the rest is not.
    assert answers[:3] == ["m0", "m1", "m2"] and len(answers) < len(items)
    assert caught.value.code() is EXHAUSTED
    info, retry = details(caught.value)
    assert info is not None and info.reason == "RATE_LIMITED"
    assert info.metadata["request_id"] == f"m{len(answers)}"  # the first message not answered
    assert retry is not None and retry.retry_delay.ToTimedelta().total_seconds() > 0


def test_over_the_concurrency_cap_is_resource_exhausted_with_retry_info(connect: Callable[[str], Client]) -> None:
    single = connect("single").crypto  # concurrency 1
    outbox: queue.Queue[pb.SignRequest | None] = queue.Queue()
    stream = single.SignStream(iter(outbox.get, None), timeout=30)
    drained = threading.Thread(target=lambda: list(stream))  # the open stream holds the one slot
    drained.start()
    request = pb.GetKeyRequest(key_id="payments/limits/none")
    try:
        def refused() -> grpc.RpcError:
            err = rpc_error(single.GetKey, request, timeout=5)
            return err if err.code() is EXHAUSTED else None

        deadline = time.monotonic() + 5
        err = None
        while err is None and time.monotonic() < deadline:  # until the stream has reached the server
            err = refused()
        assert err is not None
        assert "calls in flight, its limit" in err.details()
        info, retry = details(err)
        assert info is not None and info.reason == "CONCURRENCY_LIMITED"
        assert retry is not None and retry.retry_delay.ToTimedelta().total_seconds() > 0
        # A request that does not decode is answered for what it is: it never takes a slot.
        raw = connect("single").channel.unary_unary("/hsmgw.v1.CryptoService/GetKey")
        assert rpc_error(raw, b"\x0a\x02\xff\xfe", timeout=5).code() is grpc.StatusCode.INVALID_ARGUMENT
    finally:
        outbox.put(None)
        drained.join(timeout=10)
    time.sleep(0.1)
    assert rpc_error(single.GetKey, request, timeout=5).code() is grpc.StatusCode.NOT_FOUND


def test_requests_that_do_not_decode_are_throttled_too(connect: Callable[[str], Client]) -> None:
    """A flood of undecodable requests costs tokens like any other call: after the burst it is
    refused by the limit, before any decoding error is reported."""
    raw = connect("throttled").channel.unary_unary("/hsmgw.v1.CryptoService/GetKey")  # rate 2/s, burst 3
    time.sleep(1.6)  # whatever an earlier test took from the bucket is back
    codes = [rpc_error(raw, b"\x0a\x02\xff\xfe", timeout=5).code() for _ in range(5)]  # key_id not UTF-8
    assert codes[:3] == [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert EXHAUSTED in codes[3:], codes


def test_stream_messages_that_do_not_decode_are_throttled_too(connect: Callable[[str], Client]) -> None:
    streams = connect("throttled").channel.stream_stream("/hsmgw.v1.CryptoService/SignStream")  # rate 2/s, burst 3
    time.sleep(1.6)  # whatever an earlier test took from the bucket is back
    codes = []
    for _ in range(5):
        with pytest.raises(grpc.RpcError) as caught:
            list(streams(iter([b"\x0a\x02\xff\xfe"]), timeout=5))  # key_id not UTF-8
        codes.append(caught.value.code())
    assert codes[:3] == [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert EXHAUSTED in codes[3:], codes

"""gateway.client.Client: which answers move a call to the next endpoint, against real gRPC servers.

Each endpoint is a gRPC server on a free port whose Sign answers with a chosen status, so
the status the client sees is exactly the one a gateway would send.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from gateway.client import Client, error_reason
from gateway.status import to_rpc_status
from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from router.errors import KeyBeingCreated, KeyCreationElsewhere, KeyNotFound, RouterError, Unavailable


class _Endpoint(crypto_pb2_grpc.CryptoServiceServicer):
    """Sign and GenerateKey answer ``code`` (naming this endpoint when it is OK), after ``delay`` s."""

    def __init__(self, name: str, code: grpc.StatusCode) -> None:
        self.name = name
        self.code = code
        self.delay = 0.0
        self.times: int | None = None
        """How many calls answer ``code`` before the rest answer OK (None: all of them)."""
        self.calls = 0
        self.error: RouterError | None = None
        """Answered as a gateway would (status, ErrorInfo, RetryInfo) instead of ``code``."""
        self.health: _Health
        self.sign_error: RouterError | None = None
        """Sign's answer instead of ``code`` and ``error``, when set."""

    def _answer(self, context: grpc.ServicerContext) -> None:
        self.calls += 1
        time.sleep(self.delay)
        if self.times is not None and self.calls > self.times:
            return
        if self.error is not None:
            context.abort_with_status(rpc_status.to_status(to_rpc_status(self.error)))
        if self.code is not grpc.StatusCode.OK:
            context.abort(self.code, f"{self.name} answers {self.code.name}")

    def Sign(self, request: pb.SignRequest, context: grpc.ServicerContext) -> pb.SignResponse:  # noqa: N802
        if self.sign_error is not None:
            self.calls += 1
            context.abort_with_status(rpc_status.to_status(to_rpc_status(self.sign_error)))
        self._answer(context)
        return pb.SignResponse(key_id=request.key_id, signature=self.name.encode())

    def GenerateKey(self, request: pb.GenerateKeyRequest, context: grpc.ServicerContext) -> pb.Key:  # noqa: N802
        self._answer(context)
        return pb.Key(key_id=request.key_id, primary_cluster=self.name)


class _Health(health.HealthServicer):
    """grpc.health.v1 as a gateway serves it; counts the checks."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = 0
        self.set("hsmgw.v1.CryptoService", health_pb2.HealthCheckResponse.SERVING)

    def Check(self, request, context):  # noqa: N802
        self.checks += 1
        return super().Check(request, context)


@pytest.fixture
def endpoints() -> Iterator[list[tuple[str, _Endpoint]]]:
    servers, made = [], []
    for name in ("first", "second"):
        endpoint = _Endpoint(name, grpc.StatusCode.OK)
        server = grpc.server(ThreadPoolExecutor(max_workers=2))
        crypto_pb2_grpc.add_CryptoServiceServicer_to_server(endpoint, server)
        endpoint.health = _Health()
        health_pb2_grpc.add_HealthServicer_to_server(endpoint.health, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        made.append((f"127.0.0.1:{port}", endpoint))
    yield made
    for server in servers:
        server.stop(0).wait()


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
def test_a_call_the_first_gateway_could_not_answer_is_answered_by_the_next(endpoints, code) -> None:
    (first_target, first), (second_target, second) = endpoints
    first.code = code
    with Client([first_target, second_target], timeout=5) as client:
        response = client.sign("k", bytes(32))
        assert response.signature == b"second"
        assert (first.calls, second.calls) == (1, 1)
        assert client.failovers == 1 and client.endpoint == second_target
        client.sign("k", bytes(32))  # sticks to the endpoint that answered
        assert (first.calls, second.calls) == (1, 2)


@pytest.mark.parametrize("code", [
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
])
def test_an_answer_about_the_request_is_not_sent_to_another_gateway(endpoints, code) -> None:
    (first_target, first), (second_target, second) = endpoints
    first.code = code
    with Client([first_target, second_target], timeout=5) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.sign("k", bytes(32))
    assert caught.value.code() is code
    assert "first answers" in (caught.value.details() or "")
    assert (first.calls, second.calls) == (1, 0)


def test_when_every_gateway_cancels_the_caller_sees_the_last_answer(endpoints) -> None:
    (first_target, first), (second_target, second) = endpoints
    first.code = second.code = grpc.StatusCode.CANCELLED
    with Client([first_target, second_target], timeout=5) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.sign("k", bytes(32))
    assert caught.value.code() is grpc.StatusCode.CANCELLED
    assert "second answers" in (caught.value.details() or "")
    assert (first.calls, second.calls) == (2, 2), "each endpoint twice, then the caller hears of it"


def test_one_address_is_tried_again_after_a_pause(endpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    """One address in front of several gateways: the one that answered "shutting down" is not the
    one the next connection reaches."""
    (target, endpoint), _ = endpoints
    endpoint.code, endpoint.times = grpc.StatusCode.UNAVAILABLE, 1
    pauses: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr(time, "sleep", lambda seconds: (pauses.append(seconds), real_sleep(seconds)))
    with Client([target], timeout=5) as client:
        assert client.sign("k", bytes(32)).signature == b"first"
        between = [p for p in pauses if p > 0]  # the call's pauses, not the close's
    assert endpoint.calls == 2
    assert between and all(0.025 <= p <= 0.075 for p in between)
    endpoint.calls, endpoint.times = 0, None
    with Client([target], timeout=5) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.sign("k", bytes(32))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE and endpoint.calls == 2


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
def test_a_key_creation_the_first_gateway_may_have_run_is_asked_of_it_again(endpoints, code) -> None:
    """A gateway killed mid-creation (UNAVAILABLE "Stream removed"), or one whose stop cut the
    creation off (UNAVAILABLE, GATEWAY_STOPPING; CANCELLED), may have made the key; another region
    may not know the request_id yet and would make it a second time."""
    (first_target, first), (second_target, second) = endpoints
    first.code, first.times = code, 2
    with Client([first_target, second_target], timeout=5) as client:
        assert client.generate_key("k1", "EC_P256", request_id="r1").primary_cluster == "first"
        assert client.endpoint == first_target and client.failovers == 0
    assert (first.calls, second.calls) == (3, 0)

    first.calls, first.times = 0, None  # it never answers: the caller hears of it, no other region is asked
    with Client([first_target, second_target], timeout=1) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.generate_key("k2", "EC_P256", request_id="r2")
    assert caught.value.code() is code and first.calls >= 2 and second.calls == 0


def test_a_key_creation_whose_gateway_is_slow_to_fail_ends_with_its_reason_not_the_deadline(endpoints) -> None:
    """A gateway whose placement store does not answer takes seconds to say so (UNAVAILABLE,
    naming the store). Asking it again with less time left than that would only end the call
    DEADLINE_EXCEEDED; the caller hears the gateway's reason instead."""
    (first_target, first), (second_target, second) = endpoints
    first.error = Unavailable("placement store dynamodb://placements unreachable: read timeout")
    first.delay = 1.2
    with Client([first_target, second_target], timeout=2.0) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.generate_key("k", "EC_P256", request_id="r")
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "placement store dynamodb://placements unreachable" in caught.value.details()
    assert (first.calls, second.calls) == (1, 0)


def test_a_key_creation_moves_on_when_the_first_gateway_never_had_it(endpoints) -> None:
    (target, endpoint), _ = endpoints
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent_target = f"127.0.0.1:{silent.getsockname()[1]}"
        with Client([silent_target, target], timeout=5, connect_timeout=0.5) as client:
            assert client.generate_key("k", "EC_P256", request_id="r").primary_cluster == "first"
    assert endpoint.calls == 1


def test_a_key_being_created_is_answered_at_once_and_by_no_other_gateway(endpoints) -> None:
    """Every region says the same of a key whose creation is under way: moving on would only
    make the client stick to another region for no fault of the first."""
    (first_target, first), (second_target, second) = endpoints
    first.error = KeyBeingCreated("key 'k' is being created; retry shortly")
    with Client([first_target, second_target], timeout=5) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.sign("k", bytes(32))
        assert (caught.value.code(), error_reason(caught.value)) == (grpc.StatusCode.UNAVAILABLE, "KEY_BEING_CREATED")
        assert (first.calls, second.calls) == (1, 0)
        assert client.failovers == 0 and client.endpoint == first_target


def test_a_key_creation_another_attempt_runs_is_awaited_on_the_same_gateway(
    endpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another attempt with the request_id is making the key there; another region may not know the
    request_id yet, and would make a second key under the same id."""
    (first_target, first), (second_target, second) = endpoints
    pauses: list[float] = []
    sleep = time.sleep

    def pause(seconds: float) -> None:
        if seconds:
            pauses.append(seconds)
        sleep(seconds)

    monkeypatch.setattr(time, "sleep", pause)
    first.error = KeyBeingCreated("key 'k' is being created; retry shortly")
    first.times = 2  # then the other attempt has made the key, and the same request returns it
    with Client([first_target, second_target]) as client:  # GenerateKey's own 10 s
        assert client.generate_key("k", "EC_P256", request_id="r").primary_cluster == "first"
    assert (first.calls, second.calls) == (3, 0)
    # Asked again after the delay the gateway's RetryInfo asks for (2 s): never hammered.
    assert pauses == [KeyBeingCreated.retry_after] * 2

    first.calls, first.times = 0, None  # never finishes within the caller's deadline
    with Client([first_target, second_target], timeout=1) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.generate_key("k", "EC_P256", request_id="r")
    assert error_reason(caught.value) == "KEY_BEING_CREATED"
    assert second.calls == 0 and first.calls == 1, "asked again only when the answer could come in time"


def test_key_lifecycle_calls_get_the_gateways_deadline_unless_told_otherwise(endpoints) -> None:
    """GenerateKey and DestroyKey may take as long as the gateway allows them (10 s): a creation
    of a key and its copies on a real HSM takes seconds, and a client deadline of 5 s would cut
    off what the gateway still runs."""
    from gateway.client import DEFAULT_TIMEOUT, LIFECYCLE_TIMEOUT
    from gateway.config import ServerConfig

    assert LIFECYCLE_TIMEOUT == ServerConfig.default_deadline and DEFAULT_TIMEOUT < LIFECYCLE_TIMEOUT
    (first_target, first), _ = endpoints
    first.delay = DEFAULT_TIMEOUT + 0.5
    with Client([first_target]) as client:
        assert client.generate_key("slow", "EC_P256").primary_cluster == "first"
        with pytest.raises(grpc.RpcError) as caught:
            client.sign("k", bytes(32))  # every other call: 5 s
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    first.delay = 1.5
    with Client([first_target], timeout=1) as client:  # a client's own timeout applies to every call
        with pytest.raises(grpc.RpcError) as caught:
            client.generate_key("fast", "EC_P256")
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def _closed_under_a_sign(client: Client) -> list[BaseException]:
    """What a Sign running in another thread ends with when ``client`` is closed 0.3 s into it."""
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            client.sign("k", bytes(32))
        except BaseException as exc:  # noqa: BLE001 - what the caller sees is the point
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.3)
    client.close()
    caller.join(5)
    return outcome


def test_closing_the_client_ends_its_calls_without_sending_them_elsewhere(endpoints) -> None:
    (first_target, first), (second_target, second) = endpoints
    first.delay = 1.0  # the call is in the first endpoint's servicer when the client closes
    client = Client([first_target, second_target], timeout=5)
    outcome = _closed_under_a_sign(client)
    assert len(outcome) == 1 and isinstance(outcome[0], grpc.RpcError)
    assert outcome[0].code() is grpc.StatusCode.CANCELLED
    assert second.calls == 0 and client.endpoint == first_target and client.failovers == 0
    with pytest.raises(ValueError, match="closed"):
        client.sign("k", bytes(32))


def test_a_deadline_that_passes_before_any_endpoint_connects_is_deadline_exceeded(endpoints) -> None:
    """Every endpoint silent (packets dropped): the caller gets a grpc.RpcError with
    DEADLINE_EXCEEDED saying why, as from a gateway, not a Python TimeoutError its gRPC error
    handling would miss."""
    with socket.create_server(("127.0.0.1", 0)) as one, socket.create_server(("127.0.0.1", 0)) as two:
        silent = [f"127.0.0.1:{s.getsockname()[1]}" for s in (one, two)]
        with Client(silent, timeout=1.2, connect_timeout=0.5) as client:
            with pytest.raises(grpc.RpcError) as raised:
                client.sign("k", bytes(32))
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    details = raised.value.details()
    assert details.startswith("deadline passed before any endpoint could be sent the call ("), details
    assert all(f"{target} did not connect within 0.5 s" in details for target in silent), details
    assert error_reason(raised.value) == ""


def test_a_call_waiting_for_a_connection_when_the_client_closes_is_cancelled() -> None:
    with socket.create_server(("127.0.0.1", 0)) as one, socket.create_server(("127.0.0.1", 0)) as two:
        silent = [f"127.0.0.1:{s.getsockname()[1]}" for s in (one, two)]
        # closed while it waits for the first endpoint's connection
        outcome = _closed_under_a_sign(Client(silent, timeout=5, connect_timeout=2))
    assert len(outcome) == 1 and isinstance(outcome[0], grpc.RpcError), outcome
    assert (outcome[0].code(), outcome[0].details()) == (grpc.StatusCode.CANCELLED, "the client is closed")


def test_an_endpoint_that_never_connects_is_passed_over_within_connect_timeout(endpoints) -> None:
    """A region whose packets are dropped: TCP may connect (here the kernel completes it), but no
    gateway ever speaks. The client moves on after connect_timeout, not the caller's deadline."""
    (target, first), _ = endpoints
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent_target = f"127.0.0.1:{silent.getsockname()[1]}"
        with Client([silent_target, target], timeout=5, connect_timeout=0.5) as client:
            started = time.monotonic()
            assert client.sign("k", bytes(32)).signature == b"first"
            assert time.monotonic() - started < 3, "waited out the caller's deadline on the silent endpoint"
            assert client.endpoint == target and client.failovers == 1


def test_with_attempt_timeout_a_connected_endpoint_that_does_not_answer_leaves_time_for_the_next(
    endpoints,
) -> None:
    (first_target, first), (second_target, second) = endpoints
    first.delay = 3.0  # connected, and silent past the caller's deadline
    with Client([first_target, second_target], timeout=2, attempt_timeout=0.5) as client:
        assert client.sign("k", bytes(32)).signature == b"second"
        assert client.endpoint == second_target and client.failovers == 1


def test_a_slow_gateway_that_answers_within_the_deadline_is_waited_for(endpoints) -> None:
    """Without attempt_timeout no call is abandoned while its deadline lasts: a gateway slow
    under load answers, and is neither left nor sent the same call by way of its neighbours."""
    (first_target, first), (second_target, second) = endpoints
    first.delay = 2.5  # more than half the deadline: more than an even share between the two
    with Client([first_target, second_target], timeout=4) as client:
        assert client.sign("k", bytes(32)).signature == b"first"
        assert client.endpoint == first_target and client.failovers == 0
    assert second.calls == 0, "the call was sent to another endpoint as well"


def test_a_key_made_elsewhere_whose_maker_is_down_gets_the_current_endpoints_answer(endpoints) -> None:
    (first_target, first), (second_target, second) = endpoints
    first.error = KeyCreationElsewhere("this region does not create keys")
    first.sign_error = KeyNotFound("key 'new' not found")
    with Client([first_target, second_target], timeout=5) as client:
        assert client.generate_key("new", "EC_P256").primary_cluster == "second"
        second.sign_error = Unavailable("the gateway is stopping")
        with pytest.raises(grpc.RpcError) as caught:
            client.sign("new", bytes(32))
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND


def test_the_client_stays_when_only_another_endpoint_failed(endpoints) -> None:
    """The first endpoint does not create keys (it refused, and serves everything else); the
    second failed once on the way. Neither is a reason to leave the first."""
    (first_target, first), (second_target, second) = endpoints
    first.error = KeyCreationElsewhere("this region does not create keys")
    second.code, second.times = grpc.StatusCode.UNAVAILABLE, 1
    with Client([first_target, second_target], timeout=5) as client:
        assert client.generate_key("k", "EC_P256", request_id="r").primary_cluster == "second"
        assert client.endpoint == first_target and client.failovers == 0


@pytest.mark.parametrize("inputs", [{}, {"digest": bytes(32), "message": b"m"}])
def test_sign_and_verify_take_exactly_one_input(endpoints, inputs) -> None:
    """Neither would sign the empty message; both would drop one without a word."""
    (target, endpoint), _ = endpoints
    with Client([target], timeout=5) as client:
        with pytest.raises(ValueError, match="exactly one of digest and message"):
            client.sign("k", **inputs)
        with pytest.raises(ValueError, match="exactly one of digest and message"):
            client.verify("k", b"signature", **inputs)
        assert client.sign("k", message=b"").signature == b"first"  # the empty message, asked for
    assert endpoint.calls == 1


def test_the_client_goes_back_to_its_first_endpoint_once_it_serves_again(endpoints) -> None:
    """A rolling restart of the home region: the client moves to the next region while it is
    down, and back once it serves, asking at most every 30 s and never when already home."""
    (first_target, first), (second_target, second) = endpoints
    now = [1000.0]
    first.code = grpc.StatusCode.UNAVAILABLE
    with Client([first_target, second_target], timeout=5, clock=lambda: now[0]) as client:
        assert client.sign("k", bytes(32)).signature == b"second" and client.endpoint == second_target
        first.code = grpc.StatusCode.OK  # restarted
        now[0] += 29
        for _ in range(5):
            client.sign("k", bytes(32))
        time.sleep(0.5)
        assert first.health.checks == 0 and client.endpoint == second_target, "asked before 30 s"
        now[0] += 2
        client.sign("k", bytes(32))  # asks, and goes on where it is meanwhile
        waited = time.monotonic() + 5
        while client.endpoint != first_target and time.monotonic() < waited:
            time.sleep(0.05)
        assert client.endpoint == first_target and first.health.checks == 1
        assert client.sign("k", bytes(32)).signature == b"first"
        now[0] += 100
        client.sign("k", bytes(32))
        time.sleep(0.3)
    assert first.health.checks == 1 and second.health.checks == 0, "asked while on the first endpoint"


def test_the_client_stays_while_its_first_endpoint_does_not_serve(endpoints) -> None:
    (first_target, first), (second_target, second) = endpoints
    now = [1000.0]
    first.code = grpc.StatusCode.UNAVAILABLE
    first.health.set("hsmgw.v1.CryptoService", health_pb2.HealthCheckResponse.NOT_SERVING)
    with Client([first_target, second_target], timeout=5, clock=lambda: now[0]) as client:
        client.sign("k", bytes(32))
        now[0] += 31
        client.sign("k", bytes(32))
        waited = time.monotonic() + 5
        while first.health.checks == 0 and time.monotonic() < waited:
            time.sleep(0.05)
        time.sleep(0.3)
        assert first.health.checks == 1 and client.endpoint == second_target


def test_a_key_just_made_in_another_region_is_used_there_until_the_client_region_has_it(endpoints) -> None:
    """One region creates keys; the client's does not, and its replica of the placement table
    learns of a new key about a second later. A NOT_FOUND for that key meanwhile is asked again of
    the endpoint that made it, for 10 s; other NOT_FOUNDs are the caller's."""
    (first_target, first), (second_target, second) = endpoints
    now = [1000.0]
    first.error = KeyCreationElsewhere("this region does not create keys")
    first.sign_error = KeyNotFound("key 'new' not found")
    with Client([first_target, second_target], timeout=5, clock=lambda: now[0]) as client:
        assert client.generate_key("new", "EC_P256").primary_cluster == "second"
        assert client.sign("new", bytes(32)).signature == b"second"
        assert client.endpoint == first_target and (first.calls, second.calls) == (2, 2)
        with pytest.raises(grpc.RpcError) as caught:
            client.sign("other", bytes(32))
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND and second.calls == 2
        now[0] += 11
        with pytest.raises(grpc.RpcError) as caught:
            client.sign("new", bytes(32))
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND and second.calls == 2


def test_names_are_taken_in_any_case_and_a_wrong_one_lists_the_valid_ones(endpoints) -> None:
    (target, endpoint), _ = endpoints
    with Client([target], timeout=5) as client:
        assert client.generate_key("k", "ec_p256", usage="sign_verify").primary_cluster == "first"
        assert client.sign("k", bytes(32), algorithm="ecdsa_sha256").signature == b"first"
        assert client.sign("k", bytes(32), algorithm="ALGORITHM_ECDSA_SHA256").signature == b"first"
        with pytest.raises(ValueError, match=r"unknown KeyAlgorithm 'ec_p521'; valid names: EC_P256, EC_P384, "
                                             r"RSA_2048, RSA_3072, RSA_4096, AES_256, HMAC_SHA256"):
            client.generate_key("k", "ec_p521")
        with pytest.raises(ValueError, match=r"unknown KeyUsage 'signing'; valid names: SIGN_VERIFY, "
                                             r"ENCRYPT_DECRYPT, MAC"):
            client.generate_key("k", "EC_P256", usage="signing")
        with pytest.raises(ValueError, match=r"unknown Algorithm 'UNSPECIFIED'; valid names: ECDSA_SHA256, "):
            client.sign("k", bytes(32), algorithm="UNSPECIFIED")
    assert endpoint.calls == 3, "a call with a wrong name was sent"


@pytest.mark.parametrize("timeout", [0, 0.0, -1, float("nan")])
def test_a_timeout_that_leaves_no_time_is_refused_not_taken_for_the_default(endpoints, timeout) -> None:
    (target, endpoint), _ = endpoints
    with Client([target], timeout=5) as client:
        with pytest.raises(ValueError, match=r"timeout must be more than 0 seconds.*None, the default"):
            client.sign("k", bytes(32), timeout=timeout)
        assert client.sign("k", bytes(32), timeout=None).signature == b"first"
    assert endpoint.calls == 1
    for option in ("timeout", "connect_timeout", "attempt_timeout"):
        with pytest.raises(ValueError, match=f"^{option} must be more than 0 seconds"):
            Client([target], **{option: timeout})


@pytest.fixture
def closed_port() -> Iterator[str]:
    """A loopback address whose port is taken and not listening: connections are refused at once."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{bound.getsockname()[1]}"


def test_a_refused_connection_moves_the_call_on_without_waiting_out_connect_timeout(
    endpoints, closed_port, caplog: pytest.LogCaptureFixture
) -> None:
    """A new process whose first endpoint is down. connect_timeout is far longer than the call's
    deadline: the call is answered only if the refusal itself moves it on."""
    (target, endpoint), _ = endpoints
    with caplog.at_level(logging.WARNING, logger="gateway.client"):
        with Client([closed_port, target], timeout=3, connect_timeout=60) as client:
            assert client.sign("k", bytes(32)).signature == b"first"
            assert client.endpoint == target and client.failovers == 1
    assert endpoint.calls == 1
    [line] = [r.getMessage() for r in caplog.records]
    # gRPC's own reason ("failed to connect to all addresses; last error: … Connection refused").
    assert line.startswith(f"endpoint {closed_port} unreachable (") and line.endswith("); trying the next"), line
    assert "Connection refused" in line


def test_a_new_client_whose_first_endpoint_refuses_goes_to_the_next_for_a_key_creation(
    endpoints, closed_port, caplog: pytest.LogCaptureFixture
) -> None:
    """The refused endpoint never had the request: another may make the key."""
    (target, endpoint), _ = endpoints
    with caplog.at_level(logging.WARNING, logger="gateway.client"):
        with Client([closed_port, target], timeout=3, connect_timeout=60) as client:
            assert client.generate_key("k", "EC_P256").primary_cluster == "first"
    assert endpoint.calls == 1
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"endpoint {closed_port} unreachable"]

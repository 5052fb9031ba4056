"""A Python client for hsmgw with regional failover.

    client = Client(["gw.us-east-1.example:443", "gw.us-west-2.example:443"],
                    credentials=grpc.ssl_channel_credentials(...))
    key = client.generate_key("payments/signing-2026", "EC_P256", request_id="create-1")
    signature = client.sign("payments/signing-2026", hashlib.sha256(msg).digest())

One method per unary call of ``hsmgw.v1.CryptoService``: ``generate_key``, ``get_key``,
``list_keys`` (one page) and ``iter_keys`` (every page), ``public_key_pem``,
``destroy_key``, ``sign``, ``verify``, ``encrypt``, ``decrypt``, ``mac``, ``verify_mac``,
``generate_random`` and ``batch_sign`` (``SignItem`` in, ``SignResult`` out, one per item,
in order). Options are keyword-only; names of algorithms, usages and storage are taken in
any case ("ec_p256"), and an unknown one is a ValueError naming the valid ones. Each call
takes ``timeout`` (seconds, for the whole call with its failover; None: the client's, by
default 5 s, and 10 s for ``generate_key`` and ``destroy_key``; 0 or less is a ValueError).
SignStream has no method: a stream cannot move to another endpoint half-way through;
``batch_sign`` sends many signatures in one call that can, and the raw stub
(``crypto_pb2_grpc.CryptoServiceStub``) has the stream.

Endpoints are tried in order: the client sticks to the first that works and
moves to the next when one is unreachable: UNAVAILABLE (but see below), a call the gateway
cancelled as it shut down, a connection that fails (refused, no route, a name that
does not resolve: at once, with gRPC's reason in the warning) or that does not come
within ``connect_timeout`` (1 s: a host that drops the packets), or, with
``attempt_timeout`` set, no answer to an idempotent call within it. A
connection whose packets are dropped stays open until keepalive gives up on it
(up to about a minute: 60 s in a drill against a gateway that froze);
``attempt_timeout`` lets a call leave such a connection sooner, at the price of
abandoning a call that a slow but working gateway would have answered
and sending it to the next: set it above the slowest answer you expect (off by
default; the last attempt of a call always gets all the time left). Every
gateway serves every replicated key, so the next region answers the same request. Idempotent calls
(everything but GenerateKey: DestroyKey too, which finishes what an earlier attempt began)
are retried on the next endpoint within the caller's deadline, and once more on each after
a short pause (one address behind a load balancer reaches another gateway that way).

An UNAVAILABLE about the call's key (reason UNAVAILABLE, CLUSTER_DOWN, KEY_OUT_OF_REACH or
STALE_SESSION, naming a cluster: the clusters holding that key failed it) sends that call to the next
endpoint, but the client stays where it is: one key whose clusters fail does not send
every other call to another region. It asks that endpoint, in the background, whether it
serves (grpc.health.v1, ``hsmgw.v1.CryptoService``), and moves on if it does not (none
of the clusters it knows serving) or does not answer.

Each move is logged (``gateway.client``, WARNING), naming the endpoint left and why:
``endpoint 127.0.0.1:50051 unreachable (failed to connect to all addresses; …)``,
``… did not connect within 1.0 s``, ``… unavailable (<the gateway's message>)`` or
``… did not answer within 1.5 s``, each followed by ``; trying the next``.

The client goes back: 30 s after it moved, and every 30 s while it is not on its
first endpoint, a call asks the endpoints before the current one, in the
background, whether they serve (grpc.health.v1, ``hsmgw.v1.CryptoService``); the
client moves to the first that says SERVING. A rolling restart of the home region
sends it to the next region for that long, not for good.

GenerateKey changes endpoint only when the endpoint never had its request (no
connection within ``connect_timeout``), refused it because its region does not
create keys (``[gateway] creates_keys = false``: FAILED_PRECONDITION, reason
KEY_CREATION_ELSEWHERE) or refused it before it ran because its audit log cannot
record the grant (UNAVAILABLE, reason AUDIT_UNAVAILABLE); the client's other calls
stay where they were. Any other
UNAVAILABLE or CANCELLED (a gateway killed, or one that cut the creation off as it
stopped) may come after the key was made, and another region, whose copy of the
placement table may not have the creation's record yet, would make a second key under
the same id: GenerateKey asks the same endpoint again with the same request_id,
pausing 0.1 s and doubling to 1 s, until it is answered or its deadline passes. When
less time is left than the last failed attempt took to fail (a gateway whose placement store
does not answer takes seconds to say so), the caller gets that failure's status and
message instead of DEADLINE_EXCEEDED.
A key made through another endpoint than the current one (the current region does
not create keys) may be unknown to the current region for a moment, until its copy
of the placement table has the key's record (about a second on a DynamoDB global
table): for 10 s, a NOT_FOUND for that key is asked again, once, of the endpoint
that made it.

A call on a key whose creation is under way (UNAVAILABLE, reason KEY_BEING_CREATED)
is answered at once, on no other endpoint: every region says the same. GenerateKey
meets it when another attempt with its request_id is creating the key, and asks the
same endpoint again after the delay the answer's RetryInfo asks for (2 s), while its
deadline allows. GenerateKey's and DestroyKey's deadline is 10 s unless the call or the
client names one (``LIFECYCLE_TIMEOUT``, the gateway's own): a key and its copies can
take seconds to make on a real HSM.

A call whose deadline passes before any endpoint could be sent it (each silent or
refusing connections) ends with DEADLINE_EXCEEDED, saying why each was passed over; one
under way when the client is closed ends CANCELLED. Both are ``ClientError``, a
``grpc.RpcError`` like the gateways' answers. A call made after ``close()`` is a
ValueError, as on a closed gRPC channel.

Other languages: ``deploy/grpc-service-config.json`` carries the same retry
policy for gRPC's built-in retries (one endpoint per channel).
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import _pbenum
from gateway._channels import close_watched
from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from router import errors

log = logging.getLogger(__name__)

T = TypeVar("T")

# Codes that mean "this endpoint cannot answer now", not "the request is wrong".
# CANCELLED: this client never cancels a call of its own, so a call that ends CANCELLED
# was ended by the gateway or the connection. gRPC core does that to calls that reach a
# gateway after its shutdown began, before the client has read its GOAWAY: a handful of
# calls in every restart under load.
# Either may come after the gateway did the work, though (a gateway killed, or a creation cut
# off as it stopped, answers UNAVAILABLE too): a key creation, whose request_id another region
# may not know yet, is asked again of the endpoint it reached, never sent to another.
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
CREATION_ELSEWHERE = errors.KeyCreationElsewhere.reason
"""The ErrorInfo reason of a GenerateKey refused by a gateway whose region does not create keys."""
AUDIT_UNAVAILABLE = errors.AuditUnavailable.reason
"""The ErrorInfo reason (UNAVAILABLE) of a call refused before it ran because the gateway's audit log
cannot record its grant: a GenerateKey may go to the next endpoint, whose log is its own."""
KEY_SCOPED = frozenset({errors.Unavailable.reason, errors.ClusterDown.reason, errors.KeyOutOfReach.reason,
                        errors.StaleSession.reason})
"""ErrorInfo reasons of an UNAVAILABLE that, naming a cluster, is about the clusters of the call's
key, not the endpoint ("no cluster could serve key …"): the call goes on to the next endpoint, but
the client stays where it is unless the endpoint says it serves no more (``_ask_serving``). One key
whose clusters fail must not send every other call to another region. Without a cluster (the
placement store down) it is the endpoint's."""
ASK_EVERY = 1.0
"""Seconds between two background asks of one endpoint whether it serves (``_ask_serving``)."""
BEING_CREATED = errors.KeyBeingCreated.reason
"""The ErrorInfo reason (UNAVAILABLE) of a call on a key whose creation is under way, and of a
GenerateKey whose request_id another attempt is creating: a fact about the key, not the endpoint.
GenerateKey waits for it on the same endpoint (another region may not know the request_id yet);
other calls get it at once."""
CREATION_WAIT = (0.1, 1.0)
"""GenerateKey's first and longest pause between asking again about a creation under way (seconds),
after a call that failed for want of an answer; one refused with KEY_BEING_CREATED waits the delay
its RetryInfo asks for."""
DEFAULT_TIMEOUT = 5.0
"""A call's deadline (seconds, with its failover) when neither the call nor the client names one."""
LIFECYCLE_TIMEOUT = 10.0
"""GenerateKey's and DestroyKey's, likewise: the gateway's own (``[server] default_deadline``). A
key and its copies can take seconds to make on a real HSM; 5 s would cut off a creation the
gateway still runs."""
ROUNDS = 2
"""Times each endpoint is tried for one call. One address in front of several gateways (a load
balancer) is tried again too: a gateway that is shutting down sends its callers elsewhere."""
RETRY_PAUSE = 0.05
"""Seconds (±50 %) between one round of the endpoints and the next."""
FAILBACK_INTERVAL = 30.0
"""Seconds between asks, while the client is not on its first endpoint, whether a more preferred
endpoint serves again (the first ask comes this long after the client moved)."""
MADE_ELSEWHERE = 10.0
"""Seconds after a GenerateKey that another endpoint than the current one answered (the current
one's region does not create keys) during which a NOT_FOUND for that key is asked again of the
endpoint that made it: the current region's copy of the placement table may not have its record yet."""
_SETTLED = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE)
"""Channel states that end a wait for a connection: it came, or the attempt failed."""
SERVING_CHECK = "hsmgw.v1.CryptoService"
"""The grpc.health.v1 service a gateway reports SERVING while it can serve keys."""
CHANNEL_OPTIONS = (
    # A connection whose packets are dropped stays open, and READY, until a ping goes
    # unanswered: ping every 30 s while a call is open (the least the gateway allows; more
    # often and it closes the connection), and give up on it 5 s after a ping.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # A gateway that went away is asked again at most this long apart (gRPC's default backs
    # off to 120 s): a region that is back is seen by the next failback check or call, not
    # minutes later. Each endpoint has one channel, so this is one connection attempt a
    # client every 10 s at most, while the gateway is down.
    ("grpc.initial_reconnect_backoff_ms", 1_000),
    ("grpc.max_reconnect_backoff_ms", 10_000),
)


class ClientError(grpc.RpcError):  # type: ignore[misc]
    """A call this client ended itself, as a ``grpc.RpcError`` with a status code like the
    gateway's: DEADLINE_EXCEEDED when its deadline passed before any endpoint could be sent it
    (each unreachable: ``details()`` says why), CANCELLED when the client was closed under it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


def error_reason(exc: grpc.RpcError) -> str:
    """The ``ErrorInfo`` reason a gateway sent with a failed call ("" if none)."""
    info = _error_info(exc)
    return str(info.reason) if info is not None else ""


def _key_scoped(exc: grpc.RpcError) -> bool:
    """An UNAVAILABLE about the call's key's clusters (``KEY_SCOPED``), not the endpoint."""
    info = _error_info(exc) if exc.code() is grpc.StatusCode.UNAVAILABLE else None
    return info is not None and info.reason in KEY_SCOPED and bool(info.metadata.get("cluster"))


def _error_info(exc: grpc.RpcError) -> Any:
    from gateway.status import error_info

    status = _status(exc)
    return error_info(status) if status is not None else None


def _retry_delay(exc: grpc.RpcError) -> float | None:
    """The delay a failed call's ``RetryInfo`` asks for (seconds), if it came with one."""
    from gateway.status import retry_delay

    status = _status(exc)
    return retry_delay(status) if status is not None else None


def _status(exc: grpc.RpcError) -> Any:
    from grpc_status import rpc_status

    try:
        return rpc_status.from_call(exc)
    except ValueError:  # details that do not match the code and message: not a gateway's
        return None


E = TypeVar("E", pb.Algorithm, pb.KeyAlgorithm, pb.KeyStorage, pb.KeyUsage)


def _enum(enum_pb: type[E], name: str) -> E:
    """The value of ``enum_pb`` called ``name``, in any case and with or without the enum's prefix
    ("ec_p256", "EC_P256" or "KEY_ALGORITHM_EC_P256"). ValueError naming the valid names otherwise:
    protobuf's own error names only the prefixed name it was made from."""
    prefix = enum_pb.Name(0).removesuffix("UNSPECIFIED")  # every enum's 0 is its <PREFIX>_UNSPECIFIED
    valid = [n.removeprefix(prefix) for n in enum_pb.keys() if n != enum_pb.Name(0)]
    wanted = name.upper().removeprefix(prefix) if isinstance(name, str) else ""
    if wanted not in valid:
        raise ValueError(f"unknown {enum_pb.DESCRIPTOR.name} {name!r}; valid names: {', '.join(valid)}")
    return _pbenum.value(enum_pb, prefix + wanted)


def _positive(name: str, seconds: float, hint: str = "") -> None:
    """A time limit must leave time for an answer: 0 is not "no limit", nor "the default"."""
    if not seconds > 0:  # NaN too
        raise ValueError(f"{name} must be more than 0 seconds, not {seconds!r}{hint}")


def _set_input(request: pb.SignRequest | pb.VerifyRequest, digest: bytes | None, message: bytes | None) -> None:
    """What is signed or verified: a digest or a message, exactly one (an empty message is one)."""
    if (digest is None) == (message is None):
        raise ValueError("give exactly one of digest and message")
    if digest is not None:
        request.digest = digest
    elif message is not None:
        request.message = message


_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class SignItem:
    """One signature of a ``Client.batch_sign``: a ``digest`` or a ``message``, exactly one."""

    key_id: str
    digest: bytes | None = None
    """The hash of the message, of ``algorithm``'s hash length."""
    message: bytes | None = None
    """The message itself (at most 64 KiB); the gateway hashes it. An empty message is one."""
    algorithm: str = "ECDSA_SHA256"
    request_id: str = ""
    """Echoed in the item's result (at most 128 printable characters)."""

    def __post_init__(self) -> None:
        self.request()  # a wrong name or input is the caller's at once, not the batch's

    def request(self) -> pb.SignRequest:
        request = pb.SignRequest(key_id=self.key_id, algorithm=_enum(pb.Algorithm, self.algorithm),
                                 request_id=self.request_id)
        _set_input(request, self.digest, self.message)
        return request


@dataclass(frozen=True)
class SignResult:
    """The outcome of one ``SignItem``: ``response`` when ``code`` is OK, else the item's error."""

    request_id: str
    code: grpc.StatusCode
    message: str = ""
    reason: str = ""
    """The ErrorInfo reason, as a failed call has it (``error_reason``)."""
    response: pb.SignResponse | None = None

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK

    @classmethod
    def of(cls, result: pb.BatchSignResult) -> SignResult:
        return cls(
            request_id=result.request_id,
            code=_CODES.get(result.code, grpc.StatusCode.UNKNOWN),
            message=result.message,
            reason=result.reason,
            response=result.response if result.HasField("response") else None,
        )


class Client:
    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = None,
        connect_timeout: float = 1.0,
        attempt_timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint is required")
        if timeout is not None:
            _positive("timeout", timeout)
        _positive("connect_timeout", connect_timeout)
        if attempt_timeout is not None:
            _positive("attempt_timeout", attempt_timeout)
        self._endpoints = list(endpoints)
        self._credentials = credentials
        self._timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self._lifecycle_timeout = LIFECYCLE_TIMEOUT if timeout is None else timeout
        """GenerateKey's and DestroyKey's deadline unless the call names one."""
        self._connect_timeout = connect_timeout
        self._attempt_timeout = attempt_timeout
        self._metadata = tuple(metadata)
        self._lock = threading.Lock()
        self._current = 0
        self._clock = clock
        self._next_check = 0.0
        """When (``clock``) to ask next whether a more preferred endpoint serves again."""
        self._asked: dict[int, float] = {}
        """Endpoint → when (``clock``) it may next be asked whether it serves (``_ask_serving``)."""
        self._made_at: dict[str, tuple[int, float]] = {}
        """Key id → the endpoint that made it, and until when (``clock``) to ask it (MADE_ELSEWHERE)."""
        self._channels: dict[int, grpc.Channel] = {}
        self._watches: dict[int, Callable[[grpc.ChannelConnectivity], None]] = {}
        """Each channel's subscription, taken back before it is closed (``close_watched``)."""
        self._state: dict[int, grpc.ChannelConnectivity] = {}
        """Each channel's state as last reported (a subscription keeps it current)."""
        self._changed = threading.Condition(self._lock)
        """Notified when a channel's state changes, and when the client closes."""
        self._closed = False
        self.failovers = 0

    # -- plumbing ---------------------------------------------------------------

    def _channel(self, index: int) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise ClientError(grpc.StatusCode.CANCELLED, "the client is closed")
            channel = self._channels.get(index)
            if channel is None:
                target = self._endpoints[index]
                channel = (
                    grpc.secure_channel(target, self._credentials, options=CHANNEL_OPTIONS)
                    if self._credentials is not None
                    else grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
                )
                self._channels[index] = channel
                self._state.pop(index, None)
                watch = self._watches[index] = functools.partial(self._watch, index, channel)
                channel.subscribe(watch, try_to_connect=True)
            return channel

    def _watch(self, index: int, channel: grpc.Channel, state: grpc.ChannelConnectivity) -> None:
        with self._changed:
            if self._channels.get(index) is channel:
                self._state[index] = state
                self._changed.notify_all()

    def _unreachable(self, index: int, wait: float) -> str | None:
        """Why endpoint ``index`` cannot be sent a call now, or None when it has a connection.

        Waits up to ``wait`` s for the channel's connection attempt to end. One that fails
        (TRANSIENT_FAILURE: refused, no route, a name that does not resolve) ends the wait at
        once: gRPC tries again only after a backoff of 1 s or more, so waiting would only
        delay the next endpoint."""
        channel = self._channel(index)
        with self._changed:
            state = self._state.get(index)
        if state not in _SETTLED:
            ready = grpc.channel_ready_future(channel)  # asks the channel to connect if it is idle
            try:
                end = time.monotonic() + wait
                with self._changed:
                    while (state := self._state.get(index)) not in _SETTLED and not self._closed:
                        left = end - time.monotonic()
                        if left <= 0:
                            break
                        self._changed.wait(left)
            finally:
                ready.cancel()
        if state is grpc.ChannelConnectivity.READY:
            return None
        if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            return self._failure(channel, wait)
        return f"did not connect within {self._connect_timeout:.1f} s"

    def _failure(self, channel: grpc.Channel, wait: float) -> str | None:
        """Why a channel in TRANSIENT_FAILURE did not connect, as gRPC tells a call that does not
        wait for a connection ("failed to connect to all addresses; … Connection refused"): such a
        call fails in the client, and nothing is sent. None if the channel connected meanwhile
        and a gateway answered, whatever it answered."""
        try:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVING_CHECK),
                timeout=max(wait, 0.001), metadata=self._metadata, wait_for_ready=False,
            )
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return f"unreachable ({exc.details()})"
        return None

    @property
    def endpoint(self) -> str:
        return self._endpoints[self._current]

    def _call(
        self,
        invoke: Callable[[crypto_pb2_grpc.CryptoServiceStub, float], T],
        timeout: float | None,
        *,
        creating: bool = False,
        key_id: str = "",
    ) -> T:
        if self._closed:  # as gRPC's own closed channel: a call made after close() is the caller's mistake
            raise ValueError("the client is closed")
        if timeout is not None:
            _positive("timeout", timeout, f" (None, the default: the client's {self._timeout} s)")
        self._fail_back()
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        last: grpc.RpcError | None = None
        whys: list[str] = []  # why endpoints could not be sent the call, latest last
        unreachable = False  # the current endpoint failed: the client moves to the one that answers
        start = self._current
        count = len(self._endpoints)
        steps = count * ROUNDS
        for step in range(steps):
            index = (start + step) % count
            if step and step % count == 0:  # every endpoint failed once: wait a little, then again
                time.sleep(min(RETRY_PAUSE * random.uniform(0.5, 1.5), max(0.0, deadline - time.monotonic())))
                if self._closed:
                    break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # An endpoint whose connection fails, or does not come within connect_timeout, is
            # unreachable; the last attempt is sent all the same, so the caller hears gRPC's own answer.
            why = self._unreachable(index, min(self._connect_timeout, remaining)) if step < steps - 1 else None
            if why is not None:
                log.warning("endpoint %s %s; trying the next", self._endpoints[index], why)
                unreachable |= index == start
                whys.append(f"{self._endpoints[index]} {why}")
                continue
            remaining = deadline - time.monotonic()
            # With attempt_timeout, an idempotent call leaves a connection that does not answer
            # (packets dropped: READY until keepalive gives up on it) in time for the next
            # endpoint. Never by default: a slow gateway's calls would be abandoned and sent to
            # every endpoint, failing calls it would have answered and multiplying its load.
            limited = (self._attempt_timeout is not None and not creating and step < steps - 1
                       and self._attempt_timeout < remaining)
            attempt = self._attempt_timeout if limited and self._attempt_timeout is not None else remaining
            stub = crypto_pb2_grpc.CryptoServiceStub(self._channel(index))
            sent = time.monotonic()
            try:
                result = invoke(stub, attempt)
            except grpc.RpcError as exc:
                if self._closed:  # closed under the call: it ends here
                    raise
                if exc.code() is grpc.StatusCode.UNAVAILABLE and error_reason(exc) == BEING_CREATED:
                    raise  # the key's state, the same through every endpoint
                if creating:
                    if exc.code() is grpc.StatusCode.FAILED_PRECONDITION and error_reason(exc) == CREATION_ELSEWHERE:
                        log.info("endpoint %s does not create keys; trying the next", self._endpoints[index])
                        last = exc
                        continue
                    if exc.code() is grpc.StatusCode.UNAVAILABLE and error_reason(exc) == AUDIT_UNAVAILABLE:
                        # Refused before anything ran: no key under this request_id to find there.
                        log.warning("endpoint %s cannot audit a key creation (%s); trying the next",
                                    self._endpoints[index], exc.details())
                        last = exc
                        continue
                    if exc.code() in FAILOVER_CODES:
                        made = self._create_again(index, invoke, deadline, exc, time.monotonic() - sent)
                        self._made(key_id, index)
                        return made
                    raise
                if exc.code() is grpc.StatusCode.NOT_FOUND:
                    maker = self._maker(key_id)
                    if maker is None or maker == index:
                        raise
                    log.info("key %s was made through %s moments ago; asking it there",
                             key_id, self._endpoints[maker])
                    try:
                        return invoke(crypto_pb2_grpc.CryptoServiceStub(self._channel(maker)),
                                      deadline - time.monotonic())
                    except grpc.RpcError:
                        raise exc from None  # the caller's answer is this endpoint's, not the maker's outage
                if exc.code() in FAILOVER_CODES:
                    log.warning("endpoint %s unavailable (%s); trying the next", self._endpoints[index], exc.details())
                    if _key_scoped(exc):
                        self._ask_serving(index)
                    else:
                        unreachable |= index == start
                elif exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED and limited:
                    log.warning("endpoint %s did not answer within %.1f s; trying the next",
                                self._endpoints[index], attempt)
                    unreachable |= index == start
                else:
                    raise
                last = exc
                continue
            if index != start and unreachable:
                with self._lock:
                    if self._current == start:  # another call may have moved it meanwhile
                        self._current = index
                        self.failovers += 1
                        self._next_check = self._clock() + FAILBACK_INTERVAL
            if creating:
                self._made(key_id, index)
            return result
        if last is not None:
            raise last
        if self._closed:
            raise ClientError(grpc.StatusCode.CANCELLED, "the client is closed")
        raise ClientError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before any endpoint could be sent "
                          f"the call ({'; '.join(whys[-len(self._endpoints):]) or 'none was tried'})")

    def _made(self, key_id: str, index: int) -> None:
        """Remember a key made through another endpoint than the current one (MADE_ELSEWHERE)."""
        if index == self._current:
            return
        with self._lock:
            now = self._clock()
            self._made_at = {k: made for k, made in self._made_at.items() if made[1] > now}
            self._made_at[key_id] = (index, now + MADE_ELSEWHERE)

    def _maker(self, key_id: str) -> int | None:
        """The endpoint through which this client made ``key_id`` moments ago, if another."""
        with self._lock:
            made = self._made_at.get(key_id)
            return made[0] if made is not None and made[1] > self._clock() else None

    def _fail_back(self) -> None:
        """Every FAILBACK_INTERVAL while not on the first endpoint, ask the endpoints before the
        current one whether they serve; the client moves back to one that does (``_checked``).
        The calls go on meanwhile: nothing waits for the answers."""
        if self._current == 0:  # on the first endpoint: nothing to go back to, and no lock to take
            return
        now = self._clock()
        with self._lock:
            current = self._current
            if current == 0 or self._closed or now < self._next_check:
                return
            self._next_check = now + FAILBACK_INTERVAL
        request = health_pb2.HealthCheckRequest(service=SERVING_CHECK)
        for index in range(current):
            check = health_pb2_grpc.HealthStub(self._channel(index)).Check.future(
                request, timeout=self._connect_timeout, metadata=self._metadata, wait_for_ready=True
            )
            check.add_done_callback(functools.partial(self._checked, index))

    def _ask_serving(self, index: int) -> None:
        """Ask endpoint ``index``, in the background, whether it serves (grpc.health.v1,
        ``hsmgw.v1.CryptoService``), after it failed a call for its key's clusters (``KEY_SCOPED``);
        the client moves on from it if it is its current endpoint and says it does not (every
        cluster it knows failing). At most once per ``ASK_EVERY`` an endpoint."""
        now = self._clock()
        with self._lock:
            if self._closed or index != self._current or len(self._endpoints) < 2 or self._asked.get(index, 0.0) > now:
                return  # an endpoint the client is not on is not moved from
            self._asked[index] = now + ASK_EVERY
        try:
            channel = self._channel(index)
        except ClientError:  # closed since
            return
        check = health_pb2_grpc.HealthStub(channel).Check.future(
            health_pb2.HealthCheckRequest(service=SERVING_CHECK), timeout=self._connect_timeout,
            metadata=self._metadata)
        check.add_done_callback(functools.partial(self._not_serving, index))

    def _not_serving(self, index: int, check: grpc.Future) -> None:
        try:
            if check.result().status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.FutureCancelledError:  # the client closed
            return
        except grpc.RpcError:
            pass  # no answer either: as an unreachable endpoint, left
        with self._lock:
            if self._closed or self._current != index:
                return
            self._current = (index + 1) % len(self._endpoints)
            self.failovers += 1
            self._next_check = self._clock() + FAILBACK_INTERVAL
            moved_to = self._endpoints[self._current]
        log.warning("endpoint %s serves no more (grpc.health.v1); moving to %s", self._endpoints[index], moved_to)

    def _checked(self, index: int, check: grpc.Future) -> None:
        try:
            serving = check.result().status == health_pb2.HealthCheckResponse.SERVING
        except (grpc.RpcError, grpc.FutureCancelledError):  # not serving yet, or the client closed
            return
        if not serving:
            return
        with self._lock:
            if self._closed or index >= self._current:
                return
            self._current = index
        log.info("endpoint %s serves again; moving back to it", self._endpoints[index])

    def _create_again(
        self,
        index: int,
        invoke: Callable[[crypto_pb2_grpc.CryptoServiceStub, float], T],
        deadline: float,
        last: grpc.RpcError,
        took: float,
    ) -> T:
        """A key creation that reached endpoint ``index`` and failed there as an endpoint fails: it
        may have run, so it is asked again there (its request_id finds the key or the attempt),
        pausing 0.1 s and doubling to 1 s, until it is answered or the deadline passes.

        An attempt that could not fail as the last one did before the deadline (a gateway whose
        placement store does not answer takes a few seconds to say so) is not made: the caller
        hears why the endpoint failed, not only that time ran out. ``took``: how long the failed
        attempt took to be answered."""
        log.warning("endpoint %s failed a key creation (%s); asking it again", self._endpoints[index], last.details())
        pause = CREATION_WAIT[0]
        while not self._closed and time.monotonic() + pause + took < deadline:
            time.sleep(pause * random.uniform(0.8, 1.2))
            pause = min(pause * 2, CREATION_WAIT[1])
            if self._unreachable(index, min(self._connect_timeout, deadline - time.monotonic())) is not None:
                continue
            stub = crypto_pb2_grpc.CryptoServiceStub(self._channel(index))
            sent = time.monotonic()
            try:
                return invoke(stub, deadline - sent)
            except grpc.RpcError as exc:
                if self._closed or exc.code() not in FAILOVER_CODES:
                    raise
                last, took = exc, time.monotonic() - sent
        raise last

    def close(self) -> None:
        """Close every channel; calls still running end with CANCELLED and are not sent elsewhere."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()  # a call waiting for a connection ends its wait
        with self._lock:
            for index, channel in self._channels.items():
                close_watched(channel, self._watches[index])
            self._channels.clear()
            self._watches.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- typed helpers ------------------------------------------------------------

    def _kw(self, remaining: float) -> dict[str, Any]:
        return {"timeout": remaining, "metadata": self._metadata, "wait_for_ready": False}

    def generate_key(
        self,
        key_id: str,
        algorithm: str,
        *,
        usage: str = "",
        storage: str = "",
        copies: int = 0,
        non_extractable: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.Key:
        """Create ``key_id``. ``request_id`` is the creation's idempotency key: the same request sent
        again, by this client or by the application retrying a call whose answer it lost, returns
        the same key. It defaults to ``key_id`` itself (key ids are never reused, so one key id is
        one creation); give your own only to tie the creation to something of yours. A different
        request_id for an existing key is ALREADY_EXISTS.

        ``usage``: SIGN_VERIFY, ENCRYPT_DECRYPT or MAC ("": the first the algorithm allows).
        ``storage``: TOKEN (the default) or EXTERNAL (wrapped in the placement store, unwrapped on
        use). ``copies``: how many clusters hold the key (0: the gateway's default; an EXTERNAL key
        takes 0 or 1). ``non_extractable``: the key never leaves its HSM, not even wrapped: TOKEN
        storage and ``copies=1`` (FAILED_PRECONDITION with more, the gateway's default included)."""
        if copies < 0:
            raise ValueError(f"copies must be 0 (the gateway's default) or more, not {copies}")
        request = pb.GenerateKeyRequest(
            request_id=request_id or key_id,
            key_id=key_id,
            algorithm=_enum(pb.KeyAlgorithm, algorithm),
            usage=_enum(pb.KeyUsage, usage) if usage else pb.KEY_USAGE_UNSPECIFIED,
            storage=_enum(pb.KeyStorage, storage) if storage else pb.KEY_STORAGE_UNSPECIFIED,
            replication=pb.ReplicationPolicy(copies=copies),
            non_extractable=non_extractable,
        )

        def create(stub: crypto_pb2_grpc.CryptoServiceStub, remaining: float) -> pb.Key:
            end = time.monotonic() + remaining
            pause = CREATION_WAIT[0]
            while True:
                try:
                    key: pb.Key = stub.GenerateKey(request, **self._kw(end - time.monotonic()))
                    return key  # the generated gRPC stub is untyped: name what it answers
                except grpc.RpcError as exc:
                    # An attempt with this request_id is under way here: its key comes from here.
                    if self._closed or exc.code() is not grpc.StatusCode.UNAVAILABLE \
                            or error_reason(exc) != BEING_CREATED:
                        raise
                    asked = _retry_delay(exc)  # the gateway's word for when to ask again
                    wait = asked if asked is not None else pause * random.uniform(0.8, 1.2)
                    if time.monotonic() + wait >= end:
                        raise
                time.sleep(wait)
                pause = min(pause * 2, CREATION_WAIT[1])

        return self._call(create, self._lifecycle(timeout), creating=True, key_id=key_id)

    def _lifecycle(self, timeout: float | None) -> float:
        """A GenerateKey's or DestroyKey's deadline: the call's, else the client's if one was given,
        else ``LIFECYCLE_TIMEOUT``."""
        return timeout if timeout is not None else self._lifecycle_timeout

    def public_key_pem(self, key_id: str, *, timeout: float | None = None) -> str:
        request = pb.GetPublicKeyRequest(key_id=key_id)
        public: pb.PublicKey = self._call(
            lambda stub, t: stub.GetPublicKey(request, **self._kw(t)), timeout, key_id=key_id
        )
        return public.pem

    def sign(
        self,
        key_id: str,
        digest: bytes | None = None,
        *,
        message: bytes | None = None,
        algorithm: str = "ECDSA_SHA256",
        timeout: float | None = None,
    ) -> pb.SignResponse:
        """Sign ``digest`` (the hash of the message, as ``algorithm`` names it) or ``message``:
        exactly one of them (ValueError otherwise)."""
        request = pb.SignRequest(key_id=key_id, algorithm=_enum(pb.Algorithm, algorithm))
        _set_input(request, digest, message)
        response: pb.SignResponse = self._call(
            lambda stub, t: stub.Sign(request, **self._kw(t)), timeout, key_id=key_id
        )
        return response

    def verify(
        self,
        key_id: str,
        signature: bytes,
        digest: bytes | None = None,
        *,
        message: bytes | None = None,
        algorithm: str = "ECDSA_SHA256",
        timeout: float | None = None,
    ) -> bool:
        """Whether ``signature`` is ``key_id``'s over ``digest`` or ``message``: exactly one of
        them (ValueError otherwise)."""
        request = pb.VerifyRequest(
            key_id=key_id, algorithm=_enum(pb.Algorithm, algorithm), signature=signature
        )
        _set_input(request, digest, message)
        response: pb.VerifyResponse = self._call(
            lambda stub, t: stub.Verify(request, **self._kw(t)), timeout, key_id=key_id
        )
        return response.valid

    def get_key(self, key_id: str, *, timeout: float | None = None) -> pb.Key:
        """``key_id``'s record: algorithm, usage, state, the clusters that hold it."""
        request = pb.GetKeyRequest(key_id=key_id)
        key: pb.Key = self._call(lambda stub, t: stub.GetKey(request, **self._kw(t)), timeout, key_id=key_id)
        return key

    def list_keys(
        self,
        *,
        prefix: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListKeysResponse:
        """One page of the keys whose id starts with ``prefix``, in key id order: at most
        ``page_size`` (0: the gateway's 100; at most 1,000). Pass the answer's
        ``next_page_token`` for the next page (empty after the last); ``iter_keys`` does that."""
        request = pb.ListKeysRequest(prefix=prefix, page_size=page_size, page_token=page_token)
        page: pb.ListKeysResponse = self._call(lambda stub, t: stub.ListKeys(request, **self._kw(t)), timeout)
        return page

    def iter_keys(self, *, prefix: str = "", page_size: int = 0, timeout: float | None = None) -> Iterator[pb.Key]:
        """Every key whose id starts with ``prefix``, a page at a time; ``timeout`` is each page's.
        A page token is opaque and carries all a gateway needs to go on (the prefix and where
        the page ended), so the pages may come from different endpoints after a failover."""
        token = ""
        while True:
            page = self.list_keys(prefix=prefix, page_size=page_size, page_token=token, timeout=timeout)
            yield from page.keys
            token = page.next_page_token
            if not token:
                return

    def destroy_key(self, key_id: str, *, timeout: float | None = None) -> pb.Key:
        """Destroy ``key_id`` on every cluster; its id is never used again. Idempotent: an
        UNAVAILABLE naming a cluster whose copy could not be removed yet is answered by calling
        again (the key already serves no more)."""
        request = pb.DestroyKeyRequest(key_id=key_id)
        key: pb.Key = self._call(lambda stub, t: stub.DestroyKey(request, **self._kw(t)), self._lifecycle(timeout),
                                 key_id=key_id)
        return key

    def encrypt(
        self,
        key_id: str,
        plaintext: bytes,
        *,
        aad: bytes = b"",
        algorithm: str = "AES_GCM",
        timeout: float | None = None,
    ) -> pb.EncryptResponse:
        """Encrypt ``plaintext`` (at most 64 KiB). AES_GCM: the answer's ``ciphertext`` ends with the
        16-byte tag and its ``iv`` is the 12 bytes the gateway drew, both needed to decrypt, with
        the same ``aad``. RSA_OAEP_SHA256 (SHA-256, MGF1 with SHA-256, empty label) takes no aad."""
        request = pb.EncryptRequest(key_id=key_id, algorithm=_enum(pb.Algorithm, algorithm), plaintext=plaintext,
                                    aad=aad)
        response: pb.EncryptResponse = self._call(
            lambda stub, t: stub.Encrypt(request, **self._kw(t)), timeout, key_id=key_id
        )
        return response

    def decrypt(
        self,
        key_id: str,
        ciphertext: bytes,
        *,
        iv: bytes = b"",
        aad: bytes = b"",
        algorithm: str = "AES_GCM",
        timeout: float | None = None,
    ) -> bytes:
        """The plaintext of ``ciphertext`` as ``encrypt`` returned it: for AES_GCM with its tag, its
        ``iv`` and the same ``aad``; for RSA_OAEP_SHA256 neither."""
        request = pb.DecryptRequest(key_id=key_id, algorithm=_enum(pb.Algorithm, algorithm), ciphertext=ciphertext,
                                    iv=iv, aad=aad)
        response: pb.DecryptResponse = self._call(
            lambda stub, t: stub.Decrypt(request, **self._kw(t)), timeout, key_id=key_id
        )
        return response.plaintext

    def mac(self, key_id: str, data: bytes, *, algorithm: str = "HMAC_SHA256", timeout: float | None = None) -> bytes:
        """``key_id``'s MAC of ``data`` (at most 64 KiB): 32 bytes for HMAC_SHA256."""
        request = pb.MacRequest(key_id=key_id, algorithm=_enum(pb.Algorithm, algorithm), data=data)
        response: pb.MacResponse = self._call(lambda stub, t: stub.Mac(request, **self._kw(t)), timeout, key_id=key_id)
        return response.mac

    def verify_mac(
        self,
        key_id: str,
        data: bytes,
        mac: bytes,
        *,
        algorithm: str = "HMAC_SHA256",
        timeout: float | None = None,
    ) -> bool:
        """Whether ``mac`` is ``key_id``'s MAC of ``data``; a truncated or longer one is not."""
        request = pb.VerifyMacRequest(key_id=key_id, algorithm=_enum(pb.Algorithm, algorithm), data=data, mac=mac)
        response: pb.VerifyMacResponse = self._call(
            lambda stub, t: stub.VerifyMac(request, **self._kw(t)), timeout, key_id=key_id
        )
        return response.valid

    def generate_random(self, length: int, *, timeout: float | None = None) -> bytes:
        """``length`` (1 to 1,024) random bytes from an HSM."""
        request = pb.GenerateRandomRequest(length=length)
        response: pb.GenerateRandomResponse = self._call(
            lambda stub, t: stub.GenerateRandom(request, **self._kw(t)), timeout
        )
        return response.data

    def batch_sign(self, items: Sequence[SignItem], *, timeout: float | None = None) -> list[SignResult]:
        """Sign 1 to 1,000 items in one call: one result per item, in order, each with its own
        status; one item's failure (a key not found, a wrong digest length) fails no other.
        The whole batch goes to the next endpoint when one is unreachable, as a sign does."""
        request = pb.BatchSignRequest(requests=[item.request() for item in items])
        response: pb.BatchSignResponse = self._call(
            lambda stub, t: stub.BatchSign(request, **self._kw(t)), timeout
        )
        return [SignResult.of(result) for result in response.responses]

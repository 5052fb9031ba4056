"""Server interceptors: authentication, per-identity limits and authorization, before any servicer.

Every call goes through :class:`SecurityInterceptor`, in this order:

1. the request must decode (a request that does not parse is INVALID_ARGUMENT, not
   gRPC's generic INTERNAL "Exception deserializing request!");
2. authenticate: the identity from the client certificate (``gateway.auth``), else
   UNAUTHENTICATED;
3. limits: the identity's concurrency cap, then its token-bucket rate, else
   RESOURCE_EXHAUSTED with a ``google.rpc.RetryInfo`` saying when to retry (checked
   before authorization, so a flood of refused calls is throttled too);
4. authorize the operation on the request's key id(s), else PERMISSION_DENIED naming the
   missing permission, and an audit event. ``BatchSign`` items are checked one by one
   (a refused item gets its own PERMISSION_DENIED result); each ``SignStream`` message
   is checked as it arrives;
5. the grant of an operation that must be audited before it runs (GenerateKey,
   DestroyKey, an admin call that changes something) is written to the audit log, else
   UNAVAILABLE, reason AUDIT_UNAVAILABLE, and nothing runs. Other admin calls are audited too, but served when the
   log cannot take their grant: an operator needs them to see what is wrong.

Deadlines are the servicer's (``server.default_deadline`` is both the default and the
cap). Health checks and reflection need an authenticated identity but no grant; any
method the policy does not know is denied.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.rpc import error_details_pb2, status_pb2

from gateway import status
from gateway.auth import (
    SIGN_VIA,
    AuditUnsynced,
    AuditUnwritten,
    Authenticator,
    Limits,
    PermissionDenied,
    Policy,
    PolicyStore,
    Principal,
    Unauthenticated,
    audit,
)
from hsmgw.v1 import admin_pb2, crypto_pb2
from router import errors
from router.validation import MAX_BATCH

log = logging.getLogger(__name__)

class Caller:
    """Who is calling, from where, and how that was established. Made for every call, so
    cheaply: the peer address is read from the call only when something asks for it (an
    audited call, a change's origin)."""

    __slots__ = ("identity", "authenticated_by", "_context", "_peer")

    def __init__(self, identity: str, context: grpc.ServicerContext, authenticated_by: str) -> None:
        self.identity = identity
        self.authenticated_by = authenticated_by
        """``certificate``, ``header`` (a development server's ``x-hsmgw-identity``) or ``default``."""
        self._context = context
        self._peer: str | None = None

    @property
    def peer(self) -> str:
        """gRPC's peer address (``ipv4:10.0.0.5:51234``)."""
        if self._peer is None:
            self._peer = self._context.peer()
        return self._peer


_CURRENT: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("hsmgw_caller", default=None)

OPEN_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)
"""Any authenticated caller may use these."""
AUDITED_GRANTS = frozenset({"GenerateKey", "DestroyKey"})
"""Operations whose grants are audited too (admin calls always are), and must be before they run."""
READ_ONLY_ADMIN = frozenset({"ListClusters", "GetStatus", "PlanRebalance", "ListChanges", "ListPlacements",
                             "TailAudit", "VerifyAudit"})
"""Admin calls that change nothing (and Reconcile without ``fix``): served when their grant cannot be audited."""
RESOURCE_FIELDS = ("key_id", "id", "cluster", "region", "plan_id")
"""Request fields naming what a call acts on (a key, a change, a cluster…): its grant's resource."""
CONCURRENCY_RETRY = 0.05


def current_identity() -> str | None:
    """The identity of the call this thread is serving (for servicers and other interceptors)."""
    caller = _CURRENT.get()
    return caller.identity if caller is not None else None


def current_caller() -> Caller | None:
    """The caller of the call this thread is serving: identity, peer address and how it was established."""
    return _CURRENT.get()


def must_audit_grant(rule: Rule, request: Any) -> bool:
    """Whether the call may run only once its grant is in the audit log."""
    if rule.kind == "admin":
        if rule.operation == "Reconcile":
            return bool(getattr(request, "fix", False))
        return rule.operation not in READ_ONLY_ADMIN
    return rule.operation in AUDITED_GRANTS


def granted_resource(request: Any) -> str:
    """What a granted call names: its key id, change id, cluster, region or plan id ("" if none)."""
    for name in RESOURCE_FIELDS:
        value = getattr(request, name, "")
        if isinstance(value, str) and value:
            return value
    return ""


# -- limits ---------------------------------------------------------------------------------


class RateLimited(errors.ResourceExhausted):
    reason = "RATE_LIMITED"


class ConcurrencyLimited(errors.ResourceExhausted):
    reason = "CONCURRENCY_LIMITED"


@dataclass
class _Usage:
    tokens: float
    stamp: float
    in_flight: int = 0


class Limiter:
    """Per-identity token buckets and in-flight counts. Thread-safe; the clock is injected."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, max_identities: int = 10_000) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = {}
        self._max = max_identities

    def _get(self, identity: str, limits: Limits, now: float) -> _Usage:
        usage = self._usage.get(identity)
        if usage is None:
            if len(self._usage) >= self._max:
                # Identities come from certificates our CA issued (or loopback dev callers):
                # forgetting the idle ones only refills their buckets.
                self._usage = {k: u for k, u in self._usage.items() if u.in_flight}
            usage = self._usage[identity] = _Usage(tokens=limits.bucket, stamp=now)
        return usage

    def enter(self, identity: str, limits: Limits) -> None:
        """Count a call in flight, or raise ConcurrencyLimited."""
        with self._lock:
            usage = self._get(identity, limits, self._clock())
            if limits.concurrency and usage.in_flight >= limits.concurrency:
                raise ConcurrencyLimited(
                    f"identity {identity!r} already has {usage.in_flight} calls in flight, its limit",
                    retry_after=CONCURRENCY_RETRY,
                )
            usage.in_flight += 1

    def admit(self, identity: str, limits: Limits, cost: int = 1) -> None:
        """``enter``, then ``charge`` ``cost`` tokens; if either refuses, nothing is counted."""
        self.enter(identity, limits)
        try:
            self.charge(identity, limits, cost)
        except RateLimited:
            self.leave(identity)
            raise

    def leave(self, identity: str) -> None:
        with self._lock:
            usage = self._usage.get(identity)
            if usage is not None and usage.in_flight > 0:
                usage.in_flight -= 1

    def charge(self, identity: str, limits: Limits, cost: int = 1) -> None:
        """Take ``cost`` tokens (a batch may go into debt), or raise RateLimited."""
        if limits.rate <= 0:
            return
        with self._lock:
            now = self._clock()
            usage = self._get(identity, limits, now)
            bucket = limits.bucket
            usage.tokens = min(bucket, usage.tokens + (now - usage.stamp) * limits.rate)
            usage.stamp = now
            need = min(float(cost), bucket)
            if usage.tokens + 1e-9 < need:  # retrying after exactly retry_after must succeed
                wait = (need - usage.tokens) / limits.rate
                raise RateLimited(
                    f"identity {identity!r} is over its rate limit ({limits.rate:g}/s, burst {bucket:g}); "
                    f"retry in {wait:.3f}s",
                    retry_after=wait,
                )
            usage.tokens -= cost

    def sync(self, limits_of: Callable[[str], Limits]) -> None:
        """The policy changed (``limits_of``: an identity's limits now). Nothing to do here;
        limiters shared between processes publish the calls in flight that now count."""

    def in_flight(self, identity: str) -> int:
        with self._lock:
            usage = self._usage.get(identity)
            return usage.in_flight if usage else 0


# -- rules: what each method needs ------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    kind: str
    """key | batch | list | some | every | admin | open | deny"""
    operation: str
    method: str


def rule_for(full_method: str) -> Rule:
    """The authorization rule of ``/package.Service/Method``."""
    service, _, name = full_method.lstrip("/").partition("/")
    crypto = crypto_pb2.DESCRIPTOR.services_by_name["CryptoService"]
    admin = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
    if service == crypto.full_name and name in crypto.methods_by_name:
        fields = crypto.methods_by_name[name].input_type.fields_by_name
        operation = SIGN_VIA.get(name, name)
        if name == "BatchSign":
            return Rule("batch", operation, name)
        if name == "ListKeys":
            return Rule("list", operation, name)
        if name == "GenerateRandom":
            return Rule("some", operation, name)
        if "key_id" in fields:
            return Rule("key", operation, name)
        return Rule("every", operation, name)  # a method whose keys we cannot see needs them all
    if service == admin.full_name and name in admin.methods_by_name:
        return Rule("admin", name, name)
    if service in OPEN_SERVICES:
        return Rule("open", name, name)
    return Rule("deny", full_method, full_method)


class _Malformed:
    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _safe_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    type_name = getattr(descriptor, "full_name", "request")

    def load(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - any undecodable input is the caller's mistake
            return _Malformed(type_name)

    return load


def _status(code: grpc.StatusCode, message: str, reason: str, **metadata: str) -> status_pb2.Status:
    result = status_pb2.Status(code=code.value[0], message=message)
    info = error_details_pb2.ErrorInfo(reason=reason, domain=status.DOMAIN, metadata=metadata)
    result.details.add().Pack(info)
    return result


def deny(context: grpc.ServicerContext, exc: PermissionDenied) -> NoReturn:
    """End a call with PERMISSION_DENIED that a servicer refused once it knew more than the
    interceptor did (which change an approval is for)."""
    _abort(context, exc)


def _abort(context: grpc.ServicerContext, exc: BaseException, request_id: str = "") -> NoReturn:
    """End the call with ``exc``'s status; ``request_id``: the stream message it refused."""
    named = {"request_id": request_id} if request_id else {}
    if isinstance(exc, PermissionDenied):
        result = _status(grpc.StatusCode.PERMISSION_DENIED, exc.message, "PERMISSION_DENIED",
                         operation=exc.operation, **named)
    elif isinstance(exc, Unauthenticated):
        result = _status(grpc.StatusCode.UNAUTHENTICATED, str(exc), "UNAUTHENTICATED")
    else:
        result = status.to_rpc_status(exc, request_id)
    context.abort_with_status(status.to_grpc_status(result, exc))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


# -- the interceptor -----------------------------------------------------------------------------


class SecurityInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Authenticate, limit and authorize every call (see the module docstring)."""

    def __init__(self, authenticator: Authenticator, policies: PolicyStore, limiter: Limiter | None = None) -> None:
        self.authenticator = authenticator
        self.policies = policies
        self.limiter = limiter or Limiter()
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None  # UNIMPLEMENTED, before anything else
        cached = self._cache.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, rule_for(details.method))
        self._cache[details.method] = (handler, wrapped)
        return wrapped

    # -- stages --

    def _authenticate(self, context: grpc.ServicerContext, rule: Rule) -> tuple[Policy, Principal, Caller]:
        try:
            identity, how = self.authenticator.authenticate(context)
        except Unauthenticated as exc:
            audit("authn.failed", method=rule.method, peer=context.peer(), error=str(exc))
            _abort(context, exc)
        policy = self.policies.current
        return policy, policy.principal(identity), Caller(identity, context, how)

    def _deny(self, context: grpc.ServicerContext, rule: Rule, exc: PermissionDenied, **extra: Any) -> None:
        fields: dict[str, Any] = {"identity": exc.identity, "method": rule.method, "operation": exc.operation,
                                  "peer": context.peer(), "message": exc.message}
        if exc.resource or rule.kind == "list":
            fields["resource"] = exc.resource or "*"  # ListKeys of every key: the policy's word for it
        audit("authz.denied", **fields, **extra)

    def _authorize(self, policy: Policy, principal: Principal, rule: Rule, request: Any) -> None:
        """Raise PermissionDenied unless ``principal`` may make this call (batch: see _batch)."""
        kind = rule.kind
        if kind == "key":
            policy.check_key(principal, rule.operation, request.key_id)
        elif kind == "list":
            policy.check_list(principal, rule.operation, request.prefix)
        elif kind in ("some", "batch"):
            policy.check_some(principal, rule.operation)
        elif kind == "every":
            policy.check_every_key(principal, rule.operation)
        elif kind == "admin":
            policy.check_admin(principal, rule.operation)
        elif kind == "deny":
            raise PermissionDenied(
                f"no policy covers {rule.method}", identity=principal.identity, operation=rule.method
            )

    def _granted(self, context: grpc.ServicerContext, rule: Rule, caller: Caller, request: Any) -> None:
        """Audit the grant of a call that is audited; ``AuditUnwritten`` if it must be and was not."""
        if rule.kind == "admin" or rule.operation in AUDITED_GRANTS:
            resource = granted_resource(request)
            audit("authz.granted", required=must_audit_grant(rule, request), identity=caller.identity,
                  method=rule.method, operation=rule.operation, peer=caller.peer,
                  authenticated_by=caller.authenticated_by, **({"resource": resource} if resource else {}))

    # -- wrapping --

    def _wrap(self, handler: grpc.RpcMethodHandler, rule: Rule) -> grpc.RpcMethodHandler:
        deserializer = _safe_deserializer(handler.request_deserializer)
        serializer = handler.response_serializer
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(handler.stream_stream, rule, streaming_response=True), deserializer, serializer
            )
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                self._streaming(handler.stream_unary, rule, streaming_response=False), deserializer, serializer
            )
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._unary(handler.unary_stream, rule, streaming_response=True), deserializer, serializer
            )
        return grpc.unary_unary_rpc_method_handler(
            self._unary(handler.unary_unary, rule, streaming_response=False), deserializer, serializer
        )

    def _unary(self, behavior: Callable[..., Any], rule: Rule, *, streaming_response: bool) -> Callable[..., Any]:
        def guard(request: Any, context: grpc.ServicerContext) -> tuple[Principal, Caller, Any]:
            """Everything before the servicer runs; returns the request to serve (a batch may shrink)."""
            policy, principal, caller = self._authenticate(context, rule)
            identity, limits = principal.identity, principal.limits
            malformed = isinstance(request, _Malformed)
            try:
                if malformed:  # a request that does not decode costs a token too: floods of them are throttled
                    self.limiter.charge(identity, limits)
                else:
                    self.limiter.admit(identity, limits, max(1, len(request.requests)) if rule.kind == "batch" else 1)
            except errors.ResourceExhausted as exc:
                _abort(context, exc)
            if malformed:  # never counted in flight: it is answered here
                _abort(context, errors.InvalidArgument(f"the request is not a valid {request.type_name}"))
            try:
                self._authorize(policy, principal, rule, request)
            except PermissionDenied as exc:
                self.limiter.leave(identity)
                self._deny(context, rule, exc)
                _abort(context, exc)
            try:
                self._granted(context, rule, caller, request)
            except AuditUnwritten as exc:
                self.limiter.leave(identity)
                what = "admin changes wait" if rule.kind == "admin" else f"{rule.method} waits"
                # Fail closed: a record a crash may lose is no better a record of the grant.
                state = ("took this call's record but could not sync it to disk" if isinstance(exc, AuditUnsynced)
                         else "cannot be written")
                _abort(context, errors.AuditUnavailable(
                    f"the gateway's audit log {state} (its log says why); {what} until it can"))
            return principal, caller, request

        if rule.kind == "batch":
            def batch(request: Any, context: grpc.ServicerContext) -> Any:
                principal, caller, request = guard(request, context)
                token = _CURRENT.set(caller)
                try:
                    return self._batch(behavior, request, context, rule, principal)
                finally:
                    _CURRENT.reset(token)
                    self.limiter.leave(principal.identity)

            return batch

        if streaming_response:
            def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                principal, caller, request = guard(request, context)
                token = _CURRENT.set(caller)
                try:
                    yield from behavior(request, context)
                finally:
                    _CURRENT.reset(token)
                    self.limiter.leave(principal.identity)

            return unary_stream

        def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            principal, caller, request = guard(request, context)
            token = _CURRENT.set(caller)
            try:
                return behavior(request, context)
            finally:
                _CURRENT.reset(token)
                self.limiter.leave(principal.identity)

        return unary_unary

    def _batch(
        self, behavior: Callable[..., Any], request: Any, context: grpc.ServicerContext, rule: Rule,
        principal: Principal,
    ) -> Any:
        items = request.requests
        if not 1 <= len(items) <= MAX_BATCH:
            return behavior(request, context)  # the servicer says what is wrong with its size
        denied: dict[int, str] = {}
        policy = self.policies.current
        for i, item in enumerate(items):
            if not principal.may(rule.operation, item.key_id):
                try:
                    policy.check_key(principal, rule.operation, item.key_id)
                except PermissionDenied as exc:
                    denied[i] = exc.message
        if not denied:
            return behavior(request, context)
        refused = sorted({items[i].key_id for i in denied})
        first = denied[min(denied)]
        message = first if len(denied) == 1 else f"{first} (and {len(denied) - 1} more items)"
        audit("authz.denied", identity=principal.identity, method=rule.method, operation=rule.operation,
              peer=context.peer(), items=len(denied), resources=refused[:100], message=message)
        code = grpc.StatusCode.PERMISSION_DENIED.value[0]

        def refusal(i: int) -> Any:
            return crypto_pb2.BatchSignResult(code=code, message=denied[i], reason="PERMISSION_DENIED",
                                              request_id=items[i].request_id)

        if len(denied) == len(items):
            return crypto_pb2.BatchSignResponse(responses=[refusal(i) for i in range(len(items))])
        allowed = crypto_pb2.BatchSignRequest(requests=[item for i, item in enumerate(items) if i not in denied])
        served = iter(behavior(allowed, context).responses)
        return crypto_pb2.BatchSignResponse(
            responses=[refusal(i) if i in denied else next(served) for i in range(len(items))]
        )

    def _streaming(
        self, behavior: Callable[..., Any], rule: Rule, *, streaming_response: bool
    ) -> Callable[..., Any]:
        def start(context: grpc.ServicerContext) -> tuple[Principal, Caller]:
            policy, principal, caller = self._authenticate(context, rule)
            try:
                self.limiter.enter(principal.identity, principal.limits)
            except errors.ResourceExhausted as exc:
                _abort(context, exc)
            try:
                # A stream the identity could never use is refused before its first message.
                whole = Rule("some", rule.operation, rule.method) if rule.kind in ("key", "list", "batch") else rule
                self._authorize(policy, principal, whole, None)
            except PermissionDenied as exc:
                self.limiter.leave(principal.identity)
                self._deny(context, rule, exc)
                _abort(context, exc)
            return principal, caller

        def checked(requests: Iterator[Any], context: grpc.ServicerContext, identity: str,
                    failure: list[tuple[BaseException, str]]) -> Iterator[Any]:
            """The stream's messages while each passes; the first that does not ends it, and
            ``failure`` holds why and the message's request id."""
            for request in requests:
                policy = self.policies.current  # a reload applies to open streams too
                principal = policy.principal(identity)
                try:
                    self.limiter.charge(identity, principal.limits)  # one that does not decode too
                    if isinstance(request, _Malformed):
                        failure.append((errors.InvalidArgument(f"a message is not a valid {request.type_name}"), ""))
                        return
                    if rule.kind == "key":
                        policy.check_key(principal, rule.operation, request.key_id)
                except PermissionDenied as exc:
                    self._deny(context, rule, exc)
                    failure.append((exc, getattr(request, "request_id", "")))
                    return
                except errors.ResourceExhausted as exc:
                    failure.append((exc, getattr(request, "request_id", "")))
                    return
                yield request

        if streaming_response:
            def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                principal, caller = start(context)
                failure: list[tuple[BaseException, str]] = []
                token = _CURRENT.set(caller)
                try:
                    yield from behavior(checked(requests, context, principal.identity, failure), context)
                    if failure:
                        _abort(context, *failure[0])
                finally:
                    _CURRENT.reset(token)
                    self.limiter.leave(principal.identity)

            return stream_stream

        def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            principal, caller = start(context)
            failure: list[tuple[BaseException, str]] = []
            token = _CURRENT.set(caller)
            try:
                response = behavior(checked(requests, context, principal.identity, failure), context)
                if failure:
                    _abort(context, *failure[0])
                return response
            finally:
                _CURRENT.reset(token)
                self.limiter.leave(principal.identity)

        return stream_unary

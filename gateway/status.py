"""The one table from router errors to gRPC status, with google.rpc details.

Anything that is not a ``RouterError`` is a bug: it is logged with its
traceback and the caller gets INTERNAL with a generic message.
"""

from __future__ import annotations

import collections
import datetime
import logging
from typing import NoReturn, TypeVar

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from gateway.auth import clip
from router import errors

log = logging.getLogger(__name__)

DOMAIN = "hsmgw"
PUSHBACK = "grpc-retry-pushback-ms"
"""The trailing metadata gRPC's own retries wait for (gRFC A6), in milliseconds."""

# Most specific first: the first matching class wins.
_TABLE: tuple[tuple[type[errors.RouterError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.KeyNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.InternalError, grpc.StatusCode.INTERNAL),
)

GENERIC_INTERNAL = "internal error; the gateway logged the details"

MAX_MESSAGE = 500
"""Characters of a status message, and of an ErrorInfo value, sent at most. Messages may
quote what the caller sent (a cluster name, a change id); gRPC refuses trailers over
16 KiB, and the caller would get RESOURCE_EXHAUSTED instead of the error."""


def past_deadline(context: grpc.ServicerContext) -> bool:
    """Whether the call's deadline has passed: its client has its DEADLINE_EXCEEDED by now."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _clip(text: str) -> str:
    return clip(text, MAX_MESSAGE - 1)


def code_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


D = TypeVar("D", error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo)


def _detail(status: status_pb2.Status, kind: type[D]) -> D | None:
    """The first detail of type ``kind`` among a status's details, if it has one."""
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            found = kind()
            detail.Unpack(found)
            return found
    return None


def error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo | None:
    """The ``ErrorInfo`` among a status's details, if it has one."""
    return _detail(status, error_details_pb2.ErrorInfo)


def retry_delay(status: status_pb2.Status) -> float | None:
    """The delay (seconds) a status's ``RetryInfo`` asks for, if it has one."""
    retry = _detail(status, error_details_pb2.RetryInfo)
    return retry.retry_delay.ToTimedelta().total_seconds() if retry is not None else None


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """(code, message, reason) for an error; INTERNAL hides its details."""
    code = code_for(exc)
    if isinstance(exc, errors.RouterError) and code is not grpc.StatusCode.INTERNAL:
        return code, _clip(exc.message), exc.reason
    return grpc.StatusCode.INTERNAL, GENERIC_INTERNAL, "INTERNAL"


def to_rpc_status(exc: BaseException, request_id: str = "") -> status_pb2.Status:
    """The status for ``exc``; ``request_id`` names the stream message that ended the call."""
    code, message, reason = status_for(exc)
    metadata = {"request_id": _clip(request_id)} if request_id else {}
    if isinstance(exc, errors.RouterError) and code is not grpc.StatusCode.INTERNAL:
        if exc.cluster:
            metadata["cluster"] = exc.cluster
        if exc.region:
            metadata["region"] = exc.region
    status = status_pb2.Status(code=code.value[0], message=message)
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)
    status.details.add().Pack(info)
    delay = _retry_after(exc)
    if delay is not None:
        duration = duration_pb2.Duration()
        duration.FromTimedelta(datetime.timedelta(seconds=delay))
        retry = error_details_pb2.RetryInfo(retry_delay=duration)
        status.details.add().Pack(retry)
    return status


def _retry_after(exc: BaseException) -> float | None:
    """Seconds after which a retry of a call that failed with ``exc`` may succeed; None: it cannot."""
    if isinstance(exc, (errors.ResourceExhausted, errors.Unavailable)):
        return getattr(exc, "retry_after", None) or 0.1
    return None


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):  # type: ignore[misc]
    pass


def to_grpc_status(result: status_pb2.Status, exc: BaseException) -> grpc.Status:
    """``result`` as gRPC sends it. With a RetryInfo, also ``grpc-retry-pushback-ms``: clients
    that retry through a service config's retryPolicy read no status details, but wait that long
    instead of their own backoff (a key being created, a busy pool)."""
    sent = rpc_status.to_status(result)
    delay = _retry_after(exc)
    if delay is None:
        return sent
    pushback = (PUSHBACK, str(max(1, round(delay * 1000))))
    return _Status(sent.code, sent.details, (*sent.trailing_metadata, pushback))


def abort(context: grpc.ServicerContext, exc: BaseException, request_id: str = "") -> NoReturn:
    """End the RPC with the status for ``exc`` (logs unexpected errors)."""
    if code_for(exc) is grpc.StatusCode.INTERNAL:
        log.error("internal error", exc_info=exc)
    context.abort_with_status(to_grpc_status(to_rpc_status(exc, request_id), exc))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


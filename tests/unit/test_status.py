"""gateway.status: the one table from router errors to gRPC status, with google.rpc details."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from gateway import status
from router import errors

# The documented mapping (router/errors.py tree, DESIGN.md failure model).
EXPECTED_CODES: dict[type[errors.RouterError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.DecryptionFailed: grpc.StatusCode.INVALID_ARGUMENT,
    errors.KeyNotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.WrongKeyUsage: grpc.StatusCode.FAILED_PRECONDITION,
    errors.RequestConflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.KeyChanged: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OtherFleet: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ForeignObjects: grpc.StatusCode.FAILED_PRECONDITION,
    errors.KeyCreationElsewhere: grpc.StatusCode.FAILED_PRECONDITION,
    errors.KeyRecordMismatch: grpc.StatusCode.FAILED_PRECONDITION,  # the store was altered: an operator's
    errors.WrappedKeyRefused: grpc.StatusCode.FAILED_PRECONDITION,  # when no cluster unwraps it
    errors.KeyOutOfReach: grpc.StatusCode.UNAVAILABLE,
    errors.KeyBeingCreated: grpc.StatusCode.UNAVAILABLE,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Throttled: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.SessionsBusy: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ClusterDown: grpc.StatusCode.UNAVAILABLE,
    errors.StaleSession: grpc.StatusCode.UNAVAILABLE,
    errors.Stopping: grpc.StatusCode.UNAVAILABLE,
    errors.AuditUnavailable: grpc.StatusCode.UNAVAILABLE,  # nothing ran: another gateway may serve it
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.InternalError: grpc.StatusCode.INTERNAL,
    errors.AmbiguousKey: grpc.StatusCode.INTERNAL,  # the gateway's side to sort out; failed over first
}

RETRY_HINTED = (errors.ResourceExhausted, errors.Unavailable)


def details(st: status_pb2.Status) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo | None]:
    info, retry = None, None
    for any_ in st.details:
        if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            assert info is None, "more than one ErrorInfo"
            info = error_details_pb2.ErrorInfo()
            any_.Unpack(info)
        elif any_.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            assert retry is None, "more than one RetryInfo"
            retry = error_details_pb2.RetryInfo()
            any_.Unpack(retry)
        else:
            pytest.fail(f"unexpected detail {any_.type_url}")
    assert info is not None, "every error carries an ErrorInfo"
    return info, retry


def test_every_router_error_class_has_a_documented_code() -> None:
    classes = {
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, errors.RouterError) and obj is not errors.RouterError
    }
    assert classes == set(EXPECTED_CODES), "a router error class was added or removed: document its gRPC code"


@pytest.mark.parametrize(("cls", "code"), list(EXPECTED_CODES.items()), ids=lambda v: getattr(v, "__name__", str(v)))
def test_router_error_maps_to_its_grpc_code(cls: type[errors.RouterError], code: grpc.StatusCode) -> None:
    exc = cls("what went wrong", cluster="use1-a", region="us-east-1")
    assert status.code_for(exc) is code
    st = status.to_rpc_status(exc)
    assert st.code == code.value[0]


@pytest.mark.parametrize("cls", [c for c, code in EXPECTED_CODES.items() if code is not grpc.StatusCode.INTERNAL],
                         ids=lambda c: c.__name__)
def test_caller_sees_message_reason_domain_and_where(cls: type[errors.RouterError]) -> None:
    exc = cls("key 'pay/k1' is not for signing", cluster="use1-a", region="us-east-1")
    st = status.to_rpc_status(exc)
    assert st.message == "key 'pay/k1' is not for signing"
    info, retry = details(st)
    assert info.reason == cls.reason
    assert info.domain == "hsmgw"
    assert dict(info.metadata) == {"cluster": "use1-a", "region": "us-east-1"}
    assert (retry is not None) == issubclass(cls, RETRY_HINTED)


def test_metadata_is_omitted_when_no_cluster_is_known() -> None:
    info, _ = details(status.to_rpc_status(errors.KeyNotFound("no key 'x'")))
    assert dict(info.metadata) == {}
    assert info.reason == "KEY_NOT_FOUND"


def test_reasons_are_distinct_for_distinct_failures() -> None:
    # A record no cluster unwraps is a record that does not match its material, to the caller
    # and to the alert on hsmgw_errors{reason="KEY_RECORD_MISMATCH"}: one reason.
    same = {errors.InternalError, errors.WrappedKeyRefused}
    reasons = [cls.reason for cls in EXPECTED_CODES if cls not in same]
    assert len(reasons) == len(set(reasons))
    assert errors.WrappedKeyRefused.reason == errors.KeyRecordMismatch.reason


def test_retry_info_carries_retry_after() -> None:
    _, retry = details(status.to_rpc_status(errors.ResourceExhausted("pool busy", retry_after=2.5)))
    assert retry is not None
    assert retry.retry_delay.ToTimedelta().total_seconds() == 2.5


@pytest.mark.parametrize(
    "cls", [errors.Throttled, errors.SessionsBusy, errors.Unavailable, errors.ClusterDown, errors.ResourceExhausted]
)
def test_retry_info_has_a_positive_default_delay(cls: type[errors.RouterError]) -> None:
    _, retry = details(status.to_rpc_status(cls("busy")))
    assert retry is not None
    assert retry.retry_delay.ToTimedelta().total_seconds() > 0


@pytest.mark.parametrize(
    "cls",
    [
        errors.InvalidArgument,
        errors.KeyNotFound,
        errors.WrongKeyUsage,
        errors.AlreadyExists,
        errors.DeadlineExceeded,
        errors.RequestConflict,
        errors.DecryptionFailed,
    ],
)
def test_no_retry_info_where_a_retry_cannot_help(cls: type[errors.RouterError]) -> None:
    _, retry = details(status.to_rpc_status(cls("nope")))
    assert retry is None


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("secret detail"),
        KeyError("secret detail"),
        RuntimeError("secret detail at /var/lib/hsm/pin"),
        errors.InternalError("secret detail", cluster="use1-a", region="us-east-1"),
        errors.AmbiguousKey("secret detail", cluster="use1-a", region="us-east-1"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_unexpected_errors_become_internal_with_a_generic_message(exc: BaseException) -> None:
    st = status.to_rpc_status(exc)
    assert st.code == grpc.StatusCode.INTERNAL.value[0]
    assert st.message == status.GENERIC_INTERNAL
    info, retry = details(st)
    assert info.reason == "INTERNAL"
    assert info.domain == "hsmgw"
    assert dict(info.metadata) == {}, "internal addresses/cluster names are not returned for a bug"
    assert retry is None
    assert b"secret detail" not in st.SerializeToString()
    assert b"use1-a" not in st.SerializeToString()
    assert status.status_for(exc) == (grpc.StatusCode.INTERNAL, status.GENERIC_INTERNAL, "INTERNAL")
    # A stream's failure names the caller's own request id, and still nothing of the gateway's.
    named = status.to_rpc_status(exc, "req-7")
    assert dict(details(named)[0].metadata) == {"request_id": "req-7"}
    assert b"use1-a" not in named.SerializeToString()


class _AbortCalled(Exception):
    pass


class FakeContext:
    """Just enough of grpc.ServicerContext to capture what abort sends."""

    def __init__(self) -> None:
        self.status: Any = None

    def abort_with_status(self, st: Any) -> None:
        self.status = st
        raise _AbortCalled


def test_abort_sends_code_message_and_details_and_logs_bugs(caplog: pytest.LogCaptureFixture) -> None:
    ctx = FakeContext()
    with caplog.at_level(logging.ERROR, logger="gateway.status"), pytest.raises(_AbortCalled):
        status.abort(ctx, ValueError("secret detail"))  # type: ignore[arg-type]
    assert ctx.status.code is grpc.StatusCode.INTERNAL
    assert ctx.status.details == status.GENERIC_INTERNAL
    trailers = dict(ctx.status.trailing_metadata)
    sent = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert sent.code == grpc.StatusCode.INTERNAL.value[0]
    assert b"secret detail" not in trailers["grpc-status-details-bin"]
    # The operator, not the caller, gets the detail and the traceback.
    assert any(r.exc_info and "secret detail" in str(r.exc_info[1]) for r in caplog.records)


def test_abort_does_not_log_caller_errors_as_bugs(caplog: pytest.LogCaptureFixture) -> None:
    ctx = FakeContext()
    with caplog.at_level(logging.ERROR, logger="gateway.status"), pytest.raises(_AbortCalled):
        status.abort(ctx, errors.KeyNotFound("no key 'x'"))  # type: ignore[arg-type]
    assert ctx.status.code is grpc.StatusCode.NOT_FOUND
    assert ctx.status.details == "no key 'x'"
    assert not caplog.records


def test_a_retryable_status_tells_grpcs_own_retries_how_long_to_wait() -> None:
    """Clients that retry through a service config (deploy/grpc-service-config.json) read no
    status details: the RetryInfo delay goes out as grpc-retry-pushback-ms too."""
    ctx = FakeContext()
    with pytest.raises(_AbortCalled):
        status.abort(ctx, errors.KeyBeingCreated("key 'k' is being created"))  # type: ignore[arg-type]
    trailers = dict(ctx.status.trailing_metadata)
    assert trailers[status.PUSHBACK] == str(round(errors.KeyBeingCreated.retry_after * 1000))
    _, retry = details(status_pb2.Status.FromString(trailers["grpc-status-details-bin"]))
    assert retry is not None and retry.retry_delay.ToTimedelta().total_seconds() == errors.KeyBeingCreated.retry_after

    ctx = FakeContext()
    with pytest.raises(_AbortCalled):
        status.abort(ctx, errors.InvalidArgument("bad digest"))  # type: ignore[arg-type]
    assert status.PUSHBACK not in dict(ctx.status.trailing_metadata), "a retry cannot help: no pushback"

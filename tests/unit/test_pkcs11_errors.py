"""router.pkcs11._errors.translate: the one place PKCS #11 failures become router errors."""

from __future__ import annotations

import grpc
import pytest
from pkcs11 import exceptions as p11

from gateway.status import code_for
from router import errors
from router.model import Operation
from router.pkcs11._errors import ckr_behind, translate

WHERE = {"cluster": "use1-a", "region": "us-east-1"}

FAMILIES: list[tuple[type[p11.PKCS11Error], type[errors.RouterError], grpc.StatusCode]] = [
    # cluster down: fail over, UNAVAILABLE only if no replica is healthy
    (p11.DeviceError, errors.ClusterDown, grpc.StatusCode.UNAVAILABLE),
    (p11.DeviceRemoved, errors.ClusterDown, grpc.StatusCode.UNAVAILABLE),
    (p11.DeviceMemory, errors.ClusterDown, grpc.StatusCode.UNAVAILABLE),
    (p11.TokenNotPresent, errors.ClusterDown, grpc.StatusCode.UNAVAILABLE),
    (p11.TokenNotRecognised, errors.ClusterDown, grpc.StatusCode.UNAVAILABLE),
    (p11.SlotIDInvalid, errors.ClusterDown, grpc.StatusCode.UNAVAILABLE),
    # stale session or handle: reopen, refresh, retry
    (p11.SessionHandleInvalid, errors.StaleSession, grpc.StatusCode.UNAVAILABLE),
    (p11.SessionClosed, errors.StaleSession, grpc.StatusCode.UNAVAILABLE),
    (p11.ObjectHandleInvalid, errors.StaleSession, grpc.StatusCode.UNAVAILABLE),
    (p11.KeyHandleInvalid, errors.StaleSession, grpc.StatusCode.UNAVAILABLE),
    (p11.UserNotLoggedIn, errors.StaleSession, grpc.StatusCode.UNAVAILABLE),
    # an operation an earlier call left open: the session is closed and replaced
    (p11.OperationActive, errors.StaleSession, grpc.StatusCode.UNAVAILABLE),
    # throttled: back off, try another replica
    (p11.FunctionFailed, errors.Throttled, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (p11.SessionCount, errors.Throttled, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (p11.HostMemory, errors.Throttled, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # caller's input: no retry
    (p11.DataLenRange, errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (p11.DataInvalid, errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (p11.SignatureLenRange, errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (p11.MechanismParamInvalid, errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (p11.ArgumentsBad, errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    # bad ciphertext
    (p11.EncryptedDataInvalid, errors.DecryptionFailed, grpc.StatusCode.INVALID_ARGUMENT),
    (p11.EncryptedDataLenRange, errors.DecryptionFailed, grpc.StatusCode.INVALID_ARGUMENT),
    # the key cannot do this
    (p11.KeyTypeInconsistent, errors.WrongKeyUsage, grpc.StatusCode.FAILED_PRECONDITION),
    (p11.MechanismInvalid, errors.WrongKeyUsage, grpc.StatusCode.FAILED_PRECONDITION),
    # key material gone
    (p11.NoSuchKey, errors.KeyNotFound, grpc.StatusCode.NOT_FOUND),
]


@pytest.mark.parametrize(("foreign", "ours", "code"), FAMILIES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("op", [None, Operation.ECDSA_SHA256, Operation.RSA_OAEP_SHA256], ids=str)
def test_each_family_becomes_its_router_error(
    foreign: type[p11.PKCS11Error], ours: type[errors.RouterError], code: grpc.StatusCode, op: Operation | None
) -> None:
    err = translate(foreign(), op=op, **WHERE)
    assert type(err) is ours
    assert (err.cluster, err.region) == ("use1-a", "us-east-1")
    assert code_for(err) is code


@pytest.mark.parametrize(("foreign", "ours", "code"), FAMILIES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_only_transient_cluster_problems_are_retryable(
    foreign: type[p11.PKCS11Error], ours: type[errors.RouterError], code: grpc.StatusCode
) -> None:
    err = translate(foreign(), **WHERE)
    transient = issubclass(ours, (errors.ClusterDown, errors.StaleSession, errors.Throttled))
    assert err.retryable is transient, "a client mistake or a missing key must never be retried"


@pytest.mark.parametrize("foreign", [p11.GeneralError, p11.EncryptedDataInvalid, p11.EncryptedDataLenRange])
def test_gcm_authentication_failure_is_decryption_failed(foreign: type[p11.PKCS11Error]) -> None:
    err = translate(foreign(), op=Operation.AES_GCM, decrypting=True, **WHERE)
    assert type(err) is errors.DecryptionFailed
    assert "ciphertext, iv or aad" in err.message
    assert code_for(err) is grpc.StatusCode.INVALID_ARGUMENT
    assert err.retryable is False


def test_general_error_while_gcm_encrypting_is_not_blamed_on_the_caller() -> None:
    err = translate(p11.GeneralError(), op=Operation.AES_GCM, decrypting=False, **WHERE)
    assert type(err) is errors.ClusterDown
    assert code_for(err) is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "op", [None, Operation.RSA_OAEP_SHA256, Operation.ECDSA_SHA256, Operation.HMAC_SHA256], ids=str
)
def test_general_error_outside_gcm_is_a_cluster_fault_not_a_decryption_failure(op: Operation | None) -> None:
    """CKR_GENERAL_ERROR is the HSM's failure: retried and failed over, never blamed on the caller."""
    err = translate(p11.GeneralError(), op=op, **WHERE)
    assert type(err) is errors.ClusterDown
    assert err.retryable
    assert code_for(err) is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "foreign",
    [p11.PinIncorrect, p11.FunctionNotSupported, p11.TemplateInconsistent, p11.AttributeTypeInvalid, p11.PKCS11Error],
    ids=lambda c: c.__name__,
)
def test_unknown_pkcs11_errors_are_internal(foreign: type[p11.PKCS11Error]) -> None:
    err = translate(foreign(), **WHERE)
    assert type(err) is errors.InternalError
    assert err.retryable is False
    assert "use1-a" in err.message


@pytest.mark.parametrize("foreign", [f for f, _, _ in FAMILIES] + [p11.GeneralError], ids=lambda c: c.__name__)
def test_message_never_repeats_the_foreign_details(foreign: type[p11.PKCS11Error]) -> None:
    err = translate(foreign("vendor detail: handle 0x7f3a at /opt/cloudhsm/secret"), op=Operation.AES_GCM, **WHERE)
    assert "vendor detail" not in err.message
    assert "/opt/cloudhsm" not in str(err)


def test_router_errors_pass_through_unchanged() -> None:
    original = errors.KeyNotFound("no key 'x'", cluster="use1-b")
    assert translate(original, **WHERE) is original


def test_the_hsm_error_behind_a_router_error_is_found_through_its_chain() -> None:
    def raised(make):
        try:
            make()
        except errors.RouterError as exc:
            return exc
        raise AssertionError("nothing raised")

    def down() -> None:
        raise errors.ClusterDown("down", **WHERE) from p11.DeviceError()

    def again() -> None:
        try:
            down()
        except errors.ClusterDown as exc:
            raise errors.Unavailable("no cluster could serve it") from exc

    assert ckr_behind(raised(down)) == "CKR_DEVICE_ERROR"
    assert ckr_behind(raised(again)) == "CKR_DEVICE_ERROR"
    assert ckr_behind(errors.DeadlineExceeded("deadline exceeded before the HSM call")) == ""
    assert ckr_behind(p11.FunctionFailed()) == "CKR_FUNCTION_FAILED"

"""router.validation: caller input checks that need no HSM."""

from __future__ import annotations

import itertools
import re
import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from router import validation
from router.errors import FailedPrecondition, InvalidArgument, WrongKeyUsage
from router.model import OPERATION_KEYS, KeyAlgorithm, KeyState, KeyUsage, Operation, Placement

# The charset as documented to callers: letters, digits and . _ - / :
DOCUMENTED_CHARS = frozenset(string.ascii_letters + string.digits + "._-/:")
ALNUM = frozenset(string.ascii_letters + string.digits)


def placement(algorithm: KeyAlgorithm, usage: KeyUsage, key_id: str = "app/key-1") -> Placement:
    return Placement(key_id=key_id, algorithm=algorithm, usage=usage, state=KeyState.ENABLED, primary="use1-a")


# -- key_id -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "a",
        "0",
        "payments/signing-2026",
        "team.app:key_1/v2",
        "A-Z.a_z:0/9",
        "x" * 128,
        "a/b/c/d",
        "a.b",
        "a:/b",
    ],
)
def test_key_id_accepts_documented_forms(value: str) -> None:
    assert validation.key_id(value) == value


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "required"),
        ("x" * 129, "longer than 128"),
        ("-leading-dash", "start with a letter or digit"),
        (".hidden", "start with a letter or digit"),
        ("/abs/path", "start with a letter or digit"),
        ("_under", "start with a letter or digit"),
        (":colon", "start with a letter or digit"),
        ("has space", "may contain only"),
        ("tab\tkey", "may contain only"),
        ("line\n", "may contain only"),
        ("nul\x00byte", "may contain only"),
        ("per%cent", "may contain only"),
        ("star*", "may contain only"),
        ("back\\slash", "may contain only"),
        ("quote'", "may contain only"),
        ("a..b", "'..'"),
        ("a/../b", "'..'"),
        ("a/..", "'..'"),
        ("a//b", "'//'"),
        ("a/", "end with '/'"),
        ("ключ", "may contain only"),
        ("café", "may contain only"),
        ("ｆｕｌｌｗｉｄｔｈ", "may contain only"),
        ("١٢٣", "may contain only"),  # Arabic-Indic digits are digits to str.isdigit, not to us
        ("key\u200b", "may contain only"),  # zero-width space
        ("emoji🔑", "may contain only"),
    ],
)
def test_key_id_refuses_malformed_ids_and_says_why(value: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match="key_id") as info:
        validation.key_id(value)
    assert why in info.value.message
    assert info.value.retryable is False


def _documented(value: str) -> bool:
    return (
        1 <= len(value) <= 128
        and set(value) <= DOCUMENTED_CHARS
        and value[0] in ALNUM
        and ".." not in value
        and "//" not in value
        and not value.endswith("/")
    )


_near_key_ids = st.text(alphabet=sorted(DOCUMENTED_CHARS) + ["é", " ", "%", "\n", "\u0660", "ß"], max_size=140)


@given(st.one_of(st.text(max_size=140), _near_key_ids))
@example("a\n")
@example("\u212a")  # KELVIN SIGN: matches [A-Za-z] only under re.IGNORECASE
def test_every_accepted_key_id_matches_the_documented_charset(value: str) -> None:
    try:
        validation.key_id(value)
    except InvalidArgument:
        return
    assert _documented(value), value


@given(st.from_regex(re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}", re.ASCII), fullmatch=True))
def test_every_documented_key_id_is_accepted(value: str) -> None:
    if ".." in value or "//" in value or value.endswith("/"):
        return
    assert validation.key_id(value) == value


# -- key_prefix (ListKeys) --------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "p", "payments/", "payments/signing-", "t1a/", "a.", "a:", "x" * 128])
def test_key_prefix_accepts_the_start_of_any_key_id(value: str) -> None:
    assert validation.key_prefix(value) == value


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("x" * 129, "longer than 128"),
        ("x" * 200, "longer than 128"),
        ("bad prefix", "start of a key id"),
        ("t1a/../", "start of a key id"),
        ("t1a//", "start of a key id"),
        ("/abs", "start of a key id"),
        (".hidden", "start of a key id"),
        ("%", "start of a key id"),
        ("x" * 127 + "/", "start of a key id"),  # a key id after it would be 129 characters
    ],
)
def test_key_prefix_refuses_one_no_key_id_starts_with(value: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match="prefix") as info:
        validation.key_prefix(value)
    assert why in str(info.value)


@given(st.one_of(st.text(max_size=140), _near_key_ids))
def test_a_prefix_is_accepted_exactly_when_some_key_id_starts_with_it(value: str) -> None:
    some_key_id = value == "" or _documented(value) or _documented(value + "0")
    try:
        validation.key_prefix(value)
    except InvalidArgument:
        assert not some_key_id, value
    else:
        assert some_key_id, value


@given(st.from_regex(re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}", re.ASCII), fullmatch=True))
def test_every_start_of_a_key_id_is_a_prefix(value: str) -> None:
    if not _documented(value):
        return
    for end in range(len(value) + 1):
        assert validation.key_prefix(value[:end]) == value[:end]


# -- request_id ------------------------------------------------------------------------


def test_request_id_rules() -> None:
    assert validation.request_id("9b2f1c3e-retry") == "9b2f1c3e-retry"
    assert validation.request_id("r" * 128) == "r" * 128
    for bad in ("", "r" * 129, "has\nnewline", "nul\x00"):
        with pytest.raises(InvalidArgument, match="request_id"):
            validation.request_id(bad)


# -- payloads --------------------------------------------------------------------------


def test_payload_up_to_64_kib_is_accepted() -> None:
    assert validation.MAX_PAYLOAD == 64 * 1024
    data = b"\x00" * (64 * 1024)
    assert validation.payload("plaintext", data) is data


def test_payload_over_64_kib_is_refused_naming_the_field_and_limit() -> None:
    with pytest.raises(InvalidArgument) as info:
        validation.payload("plaintext", b"\x00" * (64 * 1024 + 1))
    assert info.value.message == "plaintext is 65537 bytes; the limit is 65536"


def test_empty_payload_is_refused_only_when_required() -> None:
    with pytest.raises(InvalidArgument, match="^data is required$"):
        validation.payload("data", b"")
    assert validation.payload("aad", b"", required=False) == b""
    with pytest.raises(InvalidArgument, match="aad is 65537 bytes"):
        validation.payload("aad", b"x" * (64 * 1024 + 1), required=False)


# -- usage_for -------------------------------------------------------------------------

# What each key algorithm can be created for (first: the default), as the API documents.
EXPECTED_USAGES = {
    KeyAlgorithm.EC_P256: [KeyUsage.SIGN_VERIFY],
    KeyAlgorithm.EC_P384: [KeyUsage.SIGN_VERIFY],
    KeyAlgorithm.RSA_2048: [KeyUsage.SIGN_VERIFY, KeyUsage.ENCRYPT_DECRYPT],
    KeyAlgorithm.RSA_3072: [KeyUsage.SIGN_VERIFY, KeyUsage.ENCRYPT_DECRYPT],
    KeyAlgorithm.RSA_4096: [KeyUsage.SIGN_VERIFY, KeyUsage.ENCRYPT_DECRYPT],
    KeyAlgorithm.AES_256: [KeyUsage.ENCRYPT_DECRYPT],
    KeyAlgorithm.HMAC_SHA256: [KeyUsage.MAC],
}


def test_expected_usages_cover_every_algorithm() -> None:
    assert set(EXPECTED_USAGES) == set(KeyAlgorithm)


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm), ids=lambda a: a.value)
def test_usage_for_defaults_to_the_algorithms_first_usage(algorithm: KeyAlgorithm) -> None:
    assert validation.usage_for(algorithm, None) is EXPECTED_USAGES[algorithm][0]


@pytest.mark.parametrize(("algorithm", "usage"), list(itertools.product(KeyAlgorithm, KeyUsage)), ids=lambda v: v.value)
def test_usage_for_accepts_exactly_the_supported_usages(algorithm: KeyAlgorithm, usage: KeyUsage) -> None:
    if usage in EXPECTED_USAGES[algorithm]:
        assert validation.usage_for(algorithm, usage) is usage
    else:
        with pytest.raises(InvalidArgument) as info:
            validation.usage_for(algorithm, usage)
        assert algorithm.value in info.value.message and usage.value in info.value.message


# -- operation_fits --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "algorithm", "usage"),
    [
        (Operation.ECDSA_SHA256, KeyAlgorithm.RSA_2048, KeyUsage.SIGN_VERIFY),
        (Operation.ECDSA_SHA256, KeyAlgorithm.EC_P384, KeyUsage.SIGN_VERIFY),  # curve paired with its own hash
        (Operation.ECDSA_SHA384, KeyAlgorithm.EC_P256, KeyUsage.SIGN_VERIFY),
        (Operation.AES_GCM, KeyAlgorithm.HMAC_SHA256, KeyUsage.MAC),
        (Operation.AES_GCM, KeyAlgorithm.RSA_2048, KeyUsage.ENCRYPT_DECRYPT),
        (Operation.RSA_OAEP_SHA256, KeyAlgorithm.RSA_2048, KeyUsage.SIGN_VERIFY),
        (Operation.RSA_PSS_SHA256, KeyAlgorithm.RSA_3072, KeyUsage.ENCRYPT_DECRYPT),
        (Operation.RSA_PKCS1_SHA256, KeyAlgorithm.EC_P256, KeyUsage.SIGN_VERIFY),
        (Operation.HMAC_SHA256, KeyAlgorithm.AES_256, KeyUsage.ENCRYPT_DECRYPT),
    ],
    ids=lambda v: v.value,
)
def test_mismatched_operation_and_key_is_wrong_key_usage(
    operation: Operation, algorithm: KeyAlgorithm, usage: KeyUsage
) -> None:
    with pytest.raises(WrongKeyUsage) as info:
        validation.operation_fits(placement(algorithm, usage, "pay/k1"), operation)
    # FAILED_PRECONDITION, not INVALID_ARGUMENT: the request is well-formed, the key is not for it.
    assert isinstance(info.value, FailedPrecondition) and not isinstance(info.value, InvalidArgument)
    message = info.value.message
    assert "'pay/k1'" in message and algorithm.value in message and operation.value in message


@pytest.mark.parametrize(
    ("operation", "algorithm", "usage"),
    [
        (Operation.ECDSA_SHA256, KeyAlgorithm.EC_P256, KeyUsage.SIGN_VERIFY),
        (Operation.ECDSA_SHA384, KeyAlgorithm.EC_P384, KeyUsage.SIGN_VERIFY),
        (Operation.RSA_PKCS1_SHA256, KeyAlgorithm.RSA_2048, KeyUsage.SIGN_VERIFY),
        (Operation.RSA_PSS_SHA256, KeyAlgorithm.RSA_4096, KeyUsage.SIGN_VERIFY),
        (Operation.RSA_OAEP_SHA256, KeyAlgorithm.RSA_3072, KeyUsage.ENCRYPT_DECRYPT),
        (Operation.AES_GCM, KeyAlgorithm.AES_256, KeyUsage.ENCRYPT_DECRYPT),
        (Operation.HMAC_SHA256, KeyAlgorithm.HMAC_SHA256, KeyUsage.MAC),
    ],
    ids=lambda v: v.value,
)
def test_matched_operation_and_key_passes(operation: Operation, algorithm: KeyAlgorithm, usage: KeyUsage) -> None:
    validation.operation_fits(placement(algorithm, usage), operation)


def test_operation_table_covers_every_operation() -> None:
    assert set(OPERATION_KEYS) == set(Operation)


@pytest.mark.parametrize(
    ("operation", "algorithm", "usage"),
    list(itertools.product(Operation, KeyAlgorithm, KeyUsage)),
    ids=lambda v: v.value,
)
def test_operation_fits_follows_the_whole_table(operation: Operation, algorithm: KeyAlgorithm, usage: KeyUsage) -> None:
    wanted_usage, algorithms = OPERATION_KEYS[operation]
    fits = usage is wanted_usage and algorithm in algorithms
    if fits:
        # Every pair the table allows can also be created (no operation needs an impossible key).
        assert usage in EXPECTED_USAGES[algorithm]
        validation.operation_fits(placement(algorithm, usage), operation)
    else:
        with pytest.raises(WrongKeyUsage):
            validation.operation_fits(placement(algorithm, usage), operation)


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm), ids=lambda a: a.value)
def test_every_creatable_key_can_do_some_operation(algorithm: KeyAlgorithm) -> None:
    for usage in EXPECTED_USAGES[algorithm]:
        assert any(usage is u and algorithm in algs for u, algs in OPERATION_KEYS.values()), (
            f"a {algorithm.value} key for {usage.value} could be created but never used"
        )

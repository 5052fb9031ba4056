"""router.pkcs11._signer: C_SignInit/C_Sign through the module's function list, on real SoftHSM2 keys.

Signatures are checked with ``cryptography``; failures must be the exceptions python-pkcs11
raises for the same call, since ``_errors.translate`` decides retries and failover by them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism
from pkcs11 import exceptions as p11
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from router.pkcs11 import _errors, _signer
from router.pkcs11._keys import SHA256_DIGEST_INFO
from router.pkcs11._signer import Signer, error

DIGEST = bytes(range(32))
CLUSTER = "use1-a"


@pytest.fixture(scope="module")
def session(tokens: Any) -> Iterator[Any]:
    """A session of its own on a fleet token; its keys are session objects, gone when it closes."""
    tokens.session(CLUSTER)  # holds the login
    opened = tokens.module.token(CLUSTER).open(rw=True)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def signer(tokens: Any) -> Signer:
    assert tokens.module.signer is not None, "SoftHSM2's function list has C_SignInit and C_Sign"
    return tokens.module.signer


def _ec_pair(session: Any, curve: str) -> tuple[Any, Any]:
    params = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)}, local=True)
    return params.generate_keypair(store=False)


@pytest.fixture(scope="module")
def rsa_pair(session: Any) -> tuple[Any, Any]:
    return session.generate_keypair(KeyType.RSA, 2048, store=False)


def _rsa_public(public: Any) -> rsa.RSAPublicKey:
    numbers = rsa.RSAPublicNumbers(int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
                                   int.from_bytes(public[Attribute.MODULUS], "big"))
    return numbers.public_key()


@pytest.mark.parametrize(("curve", "hash_", "size"), [
    ("secp256r1", hashes.SHA256(), 32),
    ("secp384r1", hashes.SHA384(), 48),
])
def test_ecdsa_signatures_verify_with_cryptography(session: Any, signer: Signer, curve: str, hash_: Any,
                                                   size: int) -> None:
    public, private = _ec_pair(session, curve)
    digest = bytes(range(size))
    raw = signer.sign(private, Mechanism.ECDSA, digest)
    assert len(raw) == 2 * size
    der = encode_dss_signature(int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big"))
    key = serialization.load_der_public_key(encode_ec_public_key(public))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(der, digest, ec.ECDSA(Prehashed(hash_)))
    with pytest.raises(InvalidSignature):
        key.verify(der, bytes(size), ec.ECDSA(Prehashed(hash_)))


def test_rsa_signatures_are_the_bytes_python_pkcs11_makes(signer: Signer, rsa_pair: tuple[Any, Any]) -> None:
    public, private = rsa_pair
    data = SHA256_DIGEST_INFO + DIGEST
    signature = signer.sign(private, Mechanism.RSA_PKCS, data)
    assert signature == private.sign(data, mechanism=Mechanism.RSA_PKCS)  # PKCS #1 v1.5 is deterministic
    _rsa_public(public).verify(signature, DIGEST, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def test_a_signature_longer_than_the_first_buffer_is_asked_for_again(
    signer: Signer, rsa_pair: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    public, private = rsa_pair
    monkeypatch.setattr(_signer, "_FIRST_BUFFER", 16)
    signature = signer.sign(private, Mechanism.RSA_PKCS, SHA256_DIGEST_INFO + DIGEST)
    assert len(signature) == 256
    _rsa_public(public).verify(signature, DIGEST, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def test_a_module_that_asks_for_more_room_twice_leaves_a_session_the_cluster_replaces(
    tokens: Any, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module whose second answer is CKR_BUFFER_TOO_SMALL again keeps the operation active:
    the error must be one that has the cluster close the session, not put it back."""
    tokens.session(CLUSTER)
    own = tokens.module.token(CLUSTER).open(rw=True)
    try:
        _, private = _ec_pair(own, "secp256r1")
        real = signer._sign
        answers: list[int] = []

        def lying(session: int, data: bytes, size: int, out: Any, out_size: Any) -> int:
            if not answers:  # the first answer is the module's own
                answers.append(int(real(session, data, size, out, out_size)))
            else:  # then it asks again for room it was given
                answers.append(_signer.CKR_BUFFER_TOO_SMALL)
            return answers[-1]

        monkeypatch.setattr(_signer, "_FIRST_BUFFER", 16)
        monkeypatch.setattr(signer, "_sign", lying)
        raised = _raised(lambda: signer.sign(private, Mechanism.ECDSA, DIGEST))
        assert answers == [_signer.CKR_BUFFER_TOO_SMALL] * 2
        assert issubclass(raised, _errors.SESSION_GONE)  # the cluster closes and reopens the session
        monkeypatch.undo()
        # The module still holds the operation active: this session could not sign again.
        assert _raised(lambda: signer.sign(private, Mechanism.ECDSA, DIGEST)) is p11.OperationActive
    finally:
        own.close()


def _raised(call: Callable[[], object]) -> type[BaseException]:
    with pytest.raises(p11.PKCS11Error) as caught:
        call()
    return type(caught.value)


def test_input_the_module_refuses_raises_what_python_pkcs11_raises_and_leaves_the_session_usable(
    signer: Signer, rsa_pair: tuple[Any, Any]
) -> None:
    public, private = rsa_pair
    too_long = bytes(300)  # more than a 2048-bit modulus holds (SoftHSM answers CKR_GENERAL_ERROR)
    expected = _raised(lambda: private.sign(too_long, mechanism=Mechanism.RSA_PKCS))
    assert _raised(lambda: signer.sign(private, Mechanism.RSA_PKCS, too_long)) is expected
    # C_Sign ended the operation: the next one on the session starts cleanly.
    signature = signer.sign(private, Mechanism.RSA_PKCS, SHA256_DIGEST_INFO + DIGEST)
    _rsa_public(public).verify(signature, DIGEST, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def test_a_destroyed_key_raises_what_python_pkcs11_raises(session: Any, signer: Signer) -> None:
    _, private = _ec_pair(session, "secp256r1")
    private.destroy()
    expected = _raised(lambda: private.sign(DIGEST, mechanism=Mechanism.ECDSA))
    assert expected in (p11.ObjectHandleInvalid, p11.KeyHandleInvalid)  # a stale handle: refresh and retry
    assert _raised(lambda: signer.sign(private, Mechanism.ECDSA, DIGEST)) is expected


def test_a_closed_session_raises_what_python_pkcs11_raises(tokens: Any, signer: Signer) -> None:
    tokens.session(CLUSTER)
    closing = tokens.module.token(CLUSTER).open(rw=True)
    _, private = _ec_pair(closing, "secp256r1")
    closing.close()
    expected = _raised(lambda: private.sign(DIGEST, mechanism=Mechanism.ECDSA))
    assert expected is p11.SessionHandleInvalid  # the pool reopens the session
    assert _raised(lambda: signer.sign(private, Mechanism.ECDSA, DIGEST)) is expected


def test_the_signer_sees_the_sessions_python_pkcs11_opens(tokens: Any, signer: Signer) -> None:
    """A module that gave the signer an instance of its own would fail here: the cluster then signs
    through python-pkcs11 (router.pkcs11.cluster)."""
    tokens.session(CLUSTER)
    opened = tokens.module.token(CLUSTER).open(rw=True)
    assert signer.sees(opened)
    opened.close()
    assert not signer.sees(opened)


def test_a_return_value_without_an_exception_of_its_own_is_named_in_hex() -> None:
    unknown = error(0x8000_0001)
    assert type(unknown) is p11.PKCS11Error
    assert "0x80000001" in str(unknown)


# PKCS #11 2.40's values where p11-kit's header, read below for the others, has other numbers.
_OASIS = {"CKR_EXCEEDED_MAX_ITERATIONS": 0x1B5, "CKR_PIN_TOO_WEAK": 0x1B8, "CKR_PUBLIC_KEY_INVALID": 0x1B9}


def test_every_return_value_becomes_the_exception_python_pkcs11_raises_for_it() -> None:
    """Read python-pkcs11's own table (map_rv_to_error in its _pkcs11.pxd) and compare, code by code."""
    import re
    from pathlib import Path

    import pkcs11

    pxd = Path(pkcs11.__file__).with_name("_pkcs11.pxd")
    header = Path("/usr/include/p11-kit-1/p11-kit/pkcs11.h")  # libp11-kit-dev, installed by `make setup`
    if not pxd.exists() or not header.exists():
        pytest.skip("python-pkcs11's _pkcs11.pxd or p11-kit's pkcs11.h is not installed")
    source = pxd.read_text()
    theirs = re.findall(r"rv == (CKR_\w+):\s*\n\s*exc = (\w+)\(", source[source.index("map_rv_to_error"):])
    values = {name: int(value, 0) for name, value in
              re.findall(r"#define\s+(CKR_\w+)\s+\(?(0x[0-9a-fA-F]+|\d+)UL", header.read_text())}
    values.update(_OASIS)
    assert len(theirs) > 60, "python-pkcs11's table was not found"
    for name, kind in theirs:
        assert type(error(values[name])) is getattr(p11, kind), f"{name} (0x{values[name]:x})"


def test_a_gateway_on_p11_kits_proxy_makes_and_signs_with_keys(tmp_path: Any) -> None:
    """p11-kit's proxy hands each C_GetFunctionList caller an instance of its own. The gateway once
    failed to start on it; now python-pkcs11 initialises its own instance, calls are serialised,
    and signing stays on python-pkcs11 (the signer's instance knows none of its sessions)."""
    import glob

    import grpc

    from gateway.fleet import init_fleet
    from hsmgw.v1 import crypto_pb2 as pb
    from hsmgw.v1 import crypto_pb2_grpc
    from tests.support import running

    proxies = glob.glob("/usr/lib/*/p11-kit-proxy.so") + glob.glob("/usr/lib/p11-kit-proxy.so")
    if not proxies:
        pytest.skip("p11-kit-proxy.so is not installed (Debian: p11-kit)")
    fleet = init_fleet(tmp_path / "fleet", listen="127.0.0.1:0")
    text = fleet.config_path.read_text()
    assert 'module = "/usr/lib/softhsm/libsofthsm2.so"' in text
    fleet.config_path.write_text(text.replace("/usr/lib/softhsm/libsofthsm2.so", proxies[0]))
    with running(fleet.config_path) as gateway, grpc.insecure_channel(gateway.target) as channel:
        stub = crypto_pb2_grpc.CryptoServiceStub(channel)
        for algorithm, op in ((pb.KEY_ALGORITHM_EC_P256, pb.ALGORITHM_ECDSA_SHA256),
                              (pb.KEY_ALGORITHM_RSA_2048, pb.ALGORITHM_RSA_PKCS1_SHA256)):
            key_id = f"proxy/{algorithm}"
            stub.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, algorithm=algorithm), timeout=60)
            signature = stub.Sign(pb.SignRequest(key_id=key_id, algorithm=op, digest=DIGEST), timeout=10).signature
            public = serialization.load_der_public_key(stub.GetPublicKey(pb.GetPublicKeyRequest(key_id=key_id)).der)
            if isinstance(public, ec.EllipticCurvePublicKey):
                public.verify(signature, DIGEST, ec.ECDSA(Prehashed(hashes.SHA256())))
            else:
                assert isinstance(public, rsa.RSAPublicKey)
                public.verify(signature, DIGEST, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        assert "gives each caller an instance of its own" in gateway.log_path.read_text()


def test_a_cluster_whose_signer_does_not_see_its_sessions_signs_through_python_pkcs11(
    fleet: Any, tokens: Any
) -> None:
    """A function list from another instance of a module (p11-kit's proxy gives every caller a new
    one) knows none of python-pkcs11's sessions: the cluster notices at start and keeps signing."""
    import ctypes
    import dataclasses
    import glob
    import time
    import tomllib

    from gateway.config import load
    from router.model import KeyAlgorithm, KeyState, KeyUsage, Operation, Placement
    from router.pkcs11 import Pkcs11Cluster
    from router.secret import Secret

    proxies = glob.glob("/usr/lib/*/p11-kit-proxy.so") + glob.glob("/usr/lib/p11-kit-proxy.so")
    if not proxies:
        pytest.skip("p11-kit-proxy.so is not installed (Debian: p11-kit)")
    get = ctypes.CDLL(proxies[0]).C_GetFunctionList
    get.restype, get.argtypes = ctypes.c_ulong, [ctypes.POINTER(ctypes.c_void_p)]
    functions = ctypes.c_void_p()
    assert get(ctypes.byref(functions)) == 0
    foreign = Signer(functions.value)  # an instance no one initialised: it knows no session
    assert not foreign.sees(tokens.session(CLUSTER))

    config = load(fleet.config_path)
    spec = next(s for s in config.clusters if s.name == CLUSTER)
    pin = tomllib.loads(fleet.secrets_path.read_text())["clusters"][CLUSTER]["user_pin"]
    cluster = Pkcs11Cluster(dataclasses.replace(tokens.module, signer=foreign), spec, Secret(pin))
    try:
        key_id = f"foreign-signer/{time.monotonic_ns()}"
        public, private = tokens.session(CLUSTER).generate_keypair(
            KeyType.RSA, 2048, store=False, id=key_id.encode(), label=key_id)  # seen by the process's sessions
        placement = Placement(key_id, KeyAlgorithm.RSA_2048, KeyUsage.SIGN_VERIFY, KeyState.ENABLED, CLUSTER)
        signature = cluster.sign(placement, Operation.RSA_PKCS1_SHA256, DIGEST, time.monotonic() + 10)
        _rsa_public(public).verify(signature, DIGEST, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    finally:
        cluster.close()

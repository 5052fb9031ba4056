"""A PKCS #11 module that cannot use the OS's locks (C_Initialize answers CKR_CANT_LOCK).

The gateway then initialises it without locking and serialises every call into it.
A gateway on such a module once hung at start: the lock that serialises was not
re-entrant, and building a session pool took it twice. faultmod plays that module in
front of SoftHSM (``FAULTMOD_CANT_LOCK``).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from tests.chaos.conftest import faulty_fleet
from tests.support import GatewayProcess, unique


def _verify(public: object, signature: bytes, digest: bytes) -> None:
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def test_a_module_that_cannot_lock_serves_concurrent_calls_serialised(tmp_path: Path, faultmod: Path) -> None:
    fleet, control = faulty_fleet(tmp_path / "fleet", faultmod)
    text = fleet.config_path.read_text()
    assert "FAULTMOD_CONTROL = " in text
    fleet.config_path.write_text(text.replace("FAULTMOD_CONTROL = ", 'FAULTMOD_CANT_LOCK = "1", FAULTMOD_CONTROL = '))
    gateway = GatewayProcess(fleet.config_path, workers=2).start(timeout=60)  # hung here before
    try:
        with grpc.insecure_channel(gateway.target) as channel:
            crypto = crypto_pb2_grpc.CryptoServiceStub(channel)
            keys = {}
            for algorithm, op in ((pb.KEY_ALGORITHM_EC_P256, pb.ALGORITHM_ECDSA_SHA256),
                                  (pb.KEY_ALGORITHM_RSA_2048, pb.ALGORITHM_RSA_PKCS1_SHA256)):
                key_id = unique("cantlock")
                crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, algorithm=algorithm),
                                   timeout=60)
                der = crypto.GetPublicKey(pb.GetPublicKeyRequest(key_id=key_id), timeout=10).der
                keys[key_id] = (op, serialization.load_der_public_key(der))

            def sign(n: int) -> None:
                digest = hashlib.sha256(str(n).encode()).digest()
                for key_id, (op, public) in keys.items():
                    response = crypto.Sign(pb.SignRequest(key_id=key_id, algorithm=op, digest=digest), timeout=30)
                    _verify(public, response.signature, digest)

            with ThreadPoolExecutor(8) as pool:  # more calls at once than either worker has CPUs
                list(pool.map(sign, range(64)))
            key_id, (op, public) = next(iter(keys.items()))
            digests = [hashlib.sha256(bytes([i])).digest() for i in range(100)]
            batch = crypto.BatchSign(pb.BatchSignRequest(requests=[
                pb.SignRequest(key_id=key_id, algorithm=op, digest=d) for d in digests]), timeout=60)
            assert [item.code for item in batch.responses] == [0] * 100
            for item, digest in zip(batch.responses, digests, strict=True):
                _verify(public, item.response.signature, digest)
        assert "cannot use OS locking; serialising calls" in gateway.log()
    finally:
        control.clear()
        gateway.stop()

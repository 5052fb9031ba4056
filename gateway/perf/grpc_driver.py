"""Driving a gateway over gRPC: one connection and one thread per call in flight."""

from __future__ import annotations

import hashlib
import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gateway import _pbenum
from gateway.perf.workload import Workload
from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from router.model import Operation

Call = Callable[[], tuple[int, dict[str, int] | None]]
"""One call: (operations that succeeded, failures by status or None)."""

_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def algorithm_pb(op: Operation) -> pb.Algorithm:
    """The ``hsmgw.v1.Algorithm`` value of an operation."""
    return _pbenum.value(pb.Algorithm, "ALGORITHM_" + op.value)


def digest_for(op: Operation, payload: bytes) -> bytes:
    return hashlib.new(op.hash_name, payload).digest()


@dataclass(frozen=True)
class GatewayTarget:
    """Where the gateway is and how to reach it (picklable: it crosses into client processes)."""

    target: str
    ca: str = ""
    cert: str = ""
    key: str = ""
    metadata: tuple[tuple[str, str], ...] = ()

    def channel(self, *, own_connection: bool = True) -> grpc.Channel:
        # A local subchannel pool gives each channel its own TCP connection, so the kernel
        # spreads them over a gateway's worker processes (SO_REUSEPORT hashes connections).
        options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
        if self.ca:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(self.ca).read_bytes(),
                private_key=Path(self.key).read_bytes() if self.key else None,
                certificate_chain=Path(self.cert).read_bytes() if self.cert else None,
            )
            return grpc.secure_channel(self.target, credentials, options=options)
        return grpc.insecure_channel(self.target, options=options)

    # -- the driver protocol (see gateway.perf.runner) ---------------------------------------

    def open(self, workload: Workload, process: int) -> _Client:
        return _Client([_Slot(self, workload, process * workload.in_flight + j) for j in range(workload.in_flight)])


class _Client:
    def __init__(self, slots: list[_Slot]) -> None:
        self.slots = slots
        self.calls: list[Call] = [slot.call for slot in slots]

    def close(self) -> None:
        for slot in self.slots:
            slot.close()


class _Slot:
    """One call in flight: its own channel and pre-built requests."""

    def __init__(self, target: GatewayTarget, workload: Workload, number: int) -> None:
        self.w = workload
        self.metadata = target.metadata
        self.channel = target.channel()
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.stub = crypto_pb2_grpc.CryptoServiceStub(self.channel)
        self.next = number  # slots start on different keys
        payload = bytes(range(256)) * (workload.payload // 256 + 1)
        self.payload = payload[: workload.payload]
        self.requests = [self._request(key_id) for key_id in workload.key_ids]
        self.call: Call = getattr(self, f"_{workload.mode}_{workload.op}" if workload.mode != "unary"
                                  else f"_unary_{workload.op}")
        if workload.mode == "batch":
            signs = [self._sign_request(workload.key_ids[(number + i) % len(workload.key_ids)])
                     for i in range(workload.batch_size)]
            self.batch = pb.BatchSignRequest(requests=signs)
        if workload.mode == "stream":
            self._outbox: queue.Queue[pb.SignRequest | None] = queue.Queue()
            self._responses = self.stub.SignStream(self._feed(), timeout=None, metadata=self.metadata)
        ok, errors = self.call()  # fail fast: a wrong key or target is reported before the run
        if errors:
            code, _ = next(iter(errors.items()))
            raise RuntimeError(f"the first {workload.op} call failed: {code}{self._detail}")

    _detail = ""

    def _pick(self) -> Any:
        self.next += 1
        return self.requests[self.next % len(self.requests)]

    def _failed(self, exc: grpc.RpcError) -> tuple[int, dict[str, int]]:
        self._detail = f" ({exc.details()})" if exc.details() else ""
        return 0, {exc.code().name: self.w.ops_per_call}

    # -- requests ---------------------------------------------------------------------------

    def _sign_request(self, key_id: str) -> pb.SignRequest:
        return pb.SignRequest(key_id=key_id, algorithm=algorithm_pb(self.w.algorithm),
                              digest=digest_for(self.w.algorithm, self.payload))

    def _request(self, key_id: str) -> Any:
        alg = algorithm_pb(self.w.algorithm)
        op = self.w.op
        if op == "sign":
            return self._sign_request(key_id)
        if op == "verify":
            sign = self._sign_request(key_id)
            signature = self.stub.Sign(sign, timeout=self.w.timeout, metadata=self.metadata).signature
            return pb.VerifyRequest(key_id=key_id, algorithm=alg, digest=sign.digest, signature=signature)
        if op == "encrypt":
            return pb.EncryptRequest(key_id=key_id, algorithm=alg, plaintext=self.payload)
        if op == "decrypt":
            sealed = self.stub.Encrypt(pb.EncryptRequest(key_id=key_id, algorithm=alg, plaintext=self.payload),
                                       timeout=self.w.timeout, metadata=self.metadata)
            return pb.DecryptRequest(key_id=key_id, algorithm=alg, ciphertext=sealed.ciphertext, iv=sealed.iv)
        return pb.MacRequest(key_id=key_id, algorithm=alg, data=self.payload)

    # -- calls ------------------------------------------------------------------------------

    def _unary(self, method: Any) -> Any:
        return method(self._pick(), timeout=self.w.timeout, metadata=self.metadata)

    def _unary_sign(self) -> tuple[int, dict[str, int] | None]:
        try:
            self._unary(self.stub.Sign)
        except grpc.RpcError as exc:
            return self._failed(exc)
        return 1, None

    def _unary_verify(self) -> tuple[int, dict[str, int] | None]:
        try:
            valid = self._unary(self.stub.Verify).valid
        except grpc.RpcError as exc:
            return self._failed(exc)
        return (1, None) if valid else (0, {"INVALID_SIGNATURE": 1})

    def _unary_encrypt(self) -> tuple[int, dict[str, int] | None]:
        try:
            self._unary(self.stub.Encrypt)
        except grpc.RpcError as exc:
            return self._failed(exc)
        return 1, None

    def _unary_decrypt(self) -> tuple[int, dict[str, int] | None]:
        try:
            plaintext = self._unary(self.stub.Decrypt).plaintext
        except grpc.RpcError as exc:
            return self._failed(exc)
        return (1, None) if plaintext == self.payload else (0, {"WRONG_PLAINTEXT": 1})

    def _unary_mac(self) -> tuple[int, dict[str, int] | None]:
        try:
            self._unary(self.stub.Mac)
        except grpc.RpcError as exc:
            return self._failed(exc)
        return 1, None

    def _batch_sign(self) -> tuple[int, dict[str, int] | None]:
        try:
            response = self.stub.BatchSign(self.batch, timeout=self.w.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            return self._failed(exc)
        ok = 0
        errors: dict[str, int] = {}
        for item in response.responses:
            if item.code == 0:
                ok += 1
            else:
                name = _CODE_NAMES.get(item.code, str(item.code))
                errors[name] = errors.get(name, 0) + 1
                self._detail = f" ({item.message})"
        return ok, errors or None

    def _feed(self) -> Iterator[pb.SignRequest]:
        while True:
            request = self._outbox.get()
            if request is None:
                return
            yield request

    def _stream_sign(self) -> tuple[int, dict[str, int] | None]:
        self._outbox.put(self._pick())
        try:
            next(self._responses)
        except grpc.RpcError as exc:
            return self._failed(exc)
        except StopIteration:
            return 0, {"STREAM_ENDED": 1}
        return 1, None

    def close(self) -> None:
        if self.w.mode == "stream":
            self._outbox.put(None)
        self.channel.close()


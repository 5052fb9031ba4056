"""``hsmgw.v1.CryptoService``: protobuf in, router call, protobuf out.

Servicers stay thin: convert, call the router, convert back. Errors go through
``gateway.status`` (one table), so every method fails the same way.
"""

from __future__ import annotations

import base64
import functools
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, TypeVar

import grpc

from gateway import _convert as conv
from gateway import status
from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from router.errors import InvalidArgument, Unavailable
from router.model import KeySpec
from router.router import Router
from router.validation import usage_for

log = logging.getLogger(__name__)

MAX_BATCH = 1000

R = TypeVar("R")


def _deadline(context: grpc.ServicerContext, default: float) -> float:
    remaining = context.time_remaining()
    if remaining is None:
        remaining = default
    return time.monotonic() + min(remaining, default)


def unary(method: Callable[..., R]) -> Callable[..., R]:
    """Give the method a deadline and turn any failure into its gRPC status."""

    @functools.wraps(method)
    def wrapper(self: CryptoServicer, request: Any, context: grpc.ServicerContext) -> R:
        try:
            if self.draining.is_set():
                raise Unavailable("the gateway is shutting down; retry on another gateway")
            return method(self, request, context, _deadline(context, self.default_deadline))
        except Exception as exc:  # noqa: BLE001 - every failure gets a status
            status.abort(context, exc)

    return wrapper


def _input(request: pb.SignRequest | pb.VerifyRequest) -> tuple[bytes | None, bytes | None]:
    which = request.WhichOneof("input")
    if which == "digest":
        return request.digest, None
    if which == "message":
        return None, request.message
    raise InvalidArgument("one of digest or message is required")


class CryptoServicer(crypto_pb2_grpc.CryptoServiceServicer):
    def __init__(
        self, router: Router, *, default_deadline: float = 10.0, draining: threading.Event | None = None
    ) -> None:
        self.router = router
        self.default_deadline = default_deadline
        # Set when the gateway stops: new calls are refused with UNAVAILABLE.
        self.draining = draining or threading.Event()

    @unary
    def GenerateKey(self, request: pb.GenerateKeyRequest, context: grpc.ServicerContext, deadline: float) -> pb.Key:
        algorithm = conv.key_algorithm(request.algorithm)
        spec = KeySpec(
            key_id=request.key_id,
            algorithm=algorithm,
            usage=usage_for(algorithm, conv.usage(request.usage)),
            request_id=request.request_id,
            copies=request.replication.copies,
            storage=conv.storage(request.storage),
            extractable=not request.non_extractable,
        )
        return conv.key(self.router.generate_key(spec, deadline))

    @unary
    def GetKey(self, request: pb.GetKeyRequest, context: grpc.ServicerContext, deadline: float) -> pb.Key:
        return conv.key(self.router.get_key(request.key_id))

    @unary
    def ListKeys(
        self, request: pb.ListKeysRequest, context: grpc.ServicerContext, deadline: float
    ) -> pb.ListKeysResponse:
        keys, token = self.router.list_keys(request.prefix, request.page_size, request.page_token)
        return pb.ListKeysResponse(keys=[conv.key(k) for k in keys], next_page_token=token)

    @unary
    def GetPublicKey(
        self, request: pb.GetPublicKeyRequest, context: grpc.ServicerContext, deadline: float
    ) -> pb.PublicKey:
        placement, der = self.router.public_key(request.key_id, deadline)
        return pb.PublicKey(
            key_id=placement.key_id, der=der, pem=_pem(der), algorithm=conv.key_algorithm_pb(placement.algorithm)
        )

    @unary
    def DestroyKey(self, request: pb.DestroyKeyRequest, context: grpc.ServicerContext, deadline: float) -> pb.Key:
        return conv.key(self.router.destroy_key(request.key_id, deadline))

    @unary
    def Sign(self, request: pb.SignRequest, context: grpc.ServicerContext, deadline: float) -> pb.SignResponse:
        return self._sign(request, deadline)

    def _sign(self, request: pb.SignRequest, deadline: float) -> pb.SignResponse:
        digest, message = _input(request)
        signature, cluster = self.router.sign(
            request.key_id, conv.operation(request.algorithm), digest, message, deadline
        )
        return pb.SignResponse(
            signature=signature, key_id=request.key_id, cluster=cluster, request_id=request.request_id
        )

    @unary
    def Verify(self, request: pb.VerifyRequest, context: grpc.ServicerContext, deadline: float) -> pb.VerifyResponse:
        digest, message = _input(request)
        valid = self.router.verify(
            request.key_id, conv.operation(request.algorithm), digest, message, request.signature, deadline
        )
        return pb.VerifyResponse(valid=valid)

    @unary
    def Encrypt(
        self, request: pb.EncryptRequest, context: grpc.ServicerContext, deadline: float
    ) -> pb.EncryptResponse:
        ciphertext, iv, cluster = self.router.encrypt(
            request.key_id, conv.operation(request.algorithm), request.plaintext, request.aad, deadline
        )
        return pb.EncryptResponse(ciphertext=ciphertext, iv=iv, cluster=cluster)

    @unary
    def Decrypt(
        self, request: pb.DecryptRequest, context: grpc.ServicerContext, deadline: float
    ) -> pb.DecryptResponse:
        plaintext = self.router.decrypt(
            request.key_id,
            conv.operation(request.algorithm),
            request.ciphertext,
            request.iv,
            request.aad,
            deadline,
        )
        return pb.DecryptResponse(plaintext=plaintext)

    @unary
    def Mac(self, request: pb.MacRequest, context: grpc.ServicerContext, deadline: float) -> pb.MacResponse:
        return pb.MacResponse(
            mac=self.router.mac(request.key_id, conv.operation(request.algorithm), request.data, deadline)
        )

    @unary
    def VerifyMac(
        self, request: pb.VerifyMacRequest, context: grpc.ServicerContext, deadline: float
    ) -> pb.VerifyMacResponse:
        valid = self.router.verify_mac(
            request.key_id, conv.operation(request.algorithm), request.data, request.mac, deadline
        )
        return pb.VerifyMacResponse(valid=valid)

    @unary
    def GenerateRandom(
        self, request: pb.GenerateRandomRequest, context: grpc.ServicerContext, deadline: float
    ) -> pb.GenerateRandomResponse:
        return pb.GenerateRandomResponse(data=self.router.random(request.length, deadline))

    @unary
    def BatchSign(
        self, request: pb.BatchSignRequest, context: grpc.ServicerContext, deadline: float
    ) -> pb.BatchSignResponse:
        if not 1 <= len(request.requests) <= MAX_BATCH:
            raise InvalidArgument(f"a batch holds 1 to {MAX_BATCH} requests, not {len(request.requests)}")
        results = []
        for item in request.requests:
            try:
                results.append(pb.BatchSignResult(response=self._sign(item, deadline)))
            except Exception as exc:  # noqa: BLE001 - one bad item does not fail the batch
                code, message, reason = status.status_for(exc)
                if code is grpc.StatusCode.INTERNAL:
                    log.error("internal error in batch item", exc_info=exc)
                results.append(pb.BatchSignResult(code=code.value[0], message=message, reason=reason))
        return pb.BatchSignResponse(responses=results)

    def SignStream(
        self, request_iterator: Iterator[pb.SignRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.SignResponse]:
        try:
            for request in request_iterator:
                if self.draining.is_set():
                    raise Unavailable("the gateway is shutting down; retry on another gateway")
                yield self._sign(request, _deadline(context, self.default_deadline))
        except Exception as exc:  # noqa: BLE001 - every failure gets a status
            status.abort(context, exc)


def _pem(der: bytes) -> str:
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines) + "\n-----END PUBLIC KEY-----\n"

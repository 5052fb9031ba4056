"""``hsmgw.v1.CryptoService``: protobuf in, router call, protobuf out.

Servicers stay thin: convert, call the router, convert back. Errors go through
``gateway.status`` (one table), so every method fails the same way.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import contextvars
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import CancelledError, Executor, Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import grpc

from gateway import _convert as conv
from gateway import status
from gateway.auth import audit
from gateway.interceptors import current_identity
from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from router.errors import InvalidArgument, Unavailable
from router.model import KeySpec, Operation
from router.router import Router
from router.validation import MAX_BATCH, key_prefix, usage_for

log = logging.getLogger(__name__)


BATCH_CHUNK = 16
"""Fewest items worth a thread hop: smaller batches (and cluster groups) are signed in the request thread."""
BATCH_CHUNK_MAX = 64
"""Most items one chunk holds a session for, so unary calls get sessions between chunks."""

R = TypeVar("R")
_Result = dict[str, Any]
"""The fields of one ``BatchSignResult`` (BatchSign builds its response from them in place)."""


def _deadline(context: grpc.ServicerContext, default: float) -> float:
    remaining: float | None = context.time_remaining()
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


def _caller() -> str:
    """The authenticated identity of this call, for the audit log."""
    return current_identity() or "-"


def _sign_input(request: pb.SignRequest) -> tuple[bytes | None, bytes | None]:
    """``_input``, and the optional ``request_id`` a Sign echoes (Verify has none)."""
    request_id = request.request_id
    if len(request_id) > 128 or not request_id.isprintable():
        raise InvalidArgument("request_id must be at most 128 printable characters")
    return _input(request)


def _input(request: pb.SignRequest | pb.VerifyRequest) -> tuple[bytes | None, bytes | None]:
    which = request.WhichOneof("input")
    if which == "digest":
        return request.digest, None
    if which == "message":
        return None, request.message
    raise InvalidArgument("one of digest or message is required")


PAGE_TOKEN_MARK = "~"
"""First character of a ListKeys page token. No key id starts with it: a gateway of an earlier
version, whose tokens were bare key ids, refuses such a token instead of listing after it."""


def _page_token(prefix: str, last: str) -> str:
    """The next_page_token after the page that ended with key ``last`` ("" for none): it names
    the prefix too, so that a later page of another listing is refused rather than mixed in."""
    if not last:
        return ""
    return PAGE_TOKEN_MARK + base64.urlsafe_b64encode(f"{prefix}\n{last}".encode()).decode().rstrip("=")


def _page_after(prefix: str, token: str) -> str:
    """The key id a page token says to list after ("" for no token); INVALID_ARGUMENT for one
    that no listing returned, or one a listing of another prefix returned."""
    if not token:
        return ""
    not_a_token = InvalidArgument("page_token is not one ListKeys returned; list again without it")
    if not token.startswith(PAGE_TOKEN_MARK):
        raise not_a_token
    body = token[len(PAGE_TOKEN_MARK):]
    try:
        text = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True).decode()
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise not_a_token from None
    listed, newline, last = text.partition("\n")
    if not newline:
        raise not_a_token
    if listed != prefix:
        raise InvalidArgument("page_token is from a listing of another prefix; list again without it, "
                              "or with the prefix it came with")
    return last  # the router checks it is a key id with that prefix


class CryptoServicer(crypto_pb2_grpc.CryptoServiceServicer):
    def __init__(
        self, router: Router, *, default_deadline: float = 10.0, draining: threading.Event | None = None,
        batch_executor: Executor | None = None, cpus: int | None = None,
    ) -> None:
        self.router = router
        self.default_deadline = default_deadline
        # Set when the gateway stops: new calls are refused with UNAVAILABLE.
        self.draining = draining or threading.Event()
        # BatchSign spreads a batch over its clusters' sessions on this bounded executor, shared by
        # every call: never more threads than the pools have sessions.
        # On one CPU (a pinned worker) a second thread only adds switches: a batch runs in its request thread.
        self._cpus = cpus or len(os.sched_getaffinity(0))
        self._owns_executor = batch_executor is None
        self._batch_executor = batch_executor or ThreadPoolExecutor(
            max_workers=max(1, sum(b.spec.pool_size for b in router.backends.values())),
            thread_name_prefix="batch",
        )

    def close(self) -> None:
        """Stop the batch threads (after the server stopped)."""
        if self._owns_executor:
            self._batch_executor.shutdown(wait=False, cancel_futures=True)

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
        placement = self.router.generate_key(spec, deadline)
        audit("key.generated", identity=_caller(), resource=placement.key_id,
              request_id=spec.request_id, algorithm=placement.algorithm.value, clusters=list(placement.clusters),
              state=placement.state.value, storage=placement.storage.value)
        return conv.key(placement)

    @unary
    def GetKey(self, request: pb.GetKeyRequest, context: grpc.ServicerContext, deadline: float) -> pb.Key:
        return conv.key(self.router.get_key(request.key_id))

    @unary
    def ListKeys(
        self, request: pb.ListKeysRequest, context: grpc.ServicerContext, deadline: float
    ) -> pb.ListKeysResponse:
        prefix = key_prefix(request.prefix)
        keys, last = self.router.list_keys(prefix, request.page_size, _page_after(prefix, request.page_token))
        return pb.ListKeysResponse(keys=[conv.key(k) for k in keys], next_page_token=_page_token(prefix, last))

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
        placement = self.router.destroy_key(request.key_id, deadline)
        audit("key.destroyed", identity=_caller(), resource=placement.key_id,
              clusters=list(placement.clusters))
        return conv.key(placement)

    @unary
    def Sign(self, request: pb.SignRequest, context: grpc.ServicerContext, deadline: float) -> pb.SignResponse:
        return self._sign(request, deadline)

    def _sign(self, request: pb.SignRequest, deadline: float) -> pb.SignResponse:
        digest, message = _sign_input(request)
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
        items = request.requests
        if not 1 <= len(items) <= MAX_BATCH:
            raise InvalidArgument(f"a batch holds 1 to {MAX_BATCH} requests, not {len(items)}")
        results: list[_Result | None] = [None] * len(items)
        chunks, runners = self._chunks(items)
        todo = collections.deque(enumerate(chunks))

        def run() -> None:
            """Sign chunks until none is left. A chunk is taken only when it can start, so the
            check of the call at its start is current: a cancelled batch stops within a chunk."""
            while todo:
                try:
                    position, chunk = todo.popleft()
                except IndexError:  # another thread took the last one
                    return
                ended = _unwanted(context) if position else None  # the call has just begun
                if ended is not None:  # no one reads these
                    for index in chunk:
                        results[index] = ended
                    continue
                try:
                    self._sign_chunk(items, chunk, results, deadline)
                except Exception as exc:  # noqa: BLE001 - a bug: the chunk's items say INTERNAL (logged), in any thread
                    failure = _failed_item(exc)
                    for index in chunk:
                        results[index] = failure

        # The request thread signs too (alone on one CPU, where another thread only adds
        # switches): a busy executor delays a batch, never stalls it. Each runner works in a
        # copy of this call's context: its log lines keep the request id.
        helpers: list[Future[None]] = []
        try:
            for _ in range(runners - 1):
                helpers.append(self._batch_executor.submit(contextvars.copy_context().run, run))
        except RuntimeError:  # the executor is shut down (the gateway is stopping): this thread signs alone
            pass
        try:
            run()
        finally:  # no helper outlives the call, nor is waited for if it has nothing left to do
            todo.clear()
            for helper in helpers:
                helper.cancel()
                with contextlib.suppress(CancelledError):  # never started: this thread signed its share
                    helper.result()
        for ended, how in ((_CANCELLED, "cancelled by its client"), (_PAST_DEADLINE, "past its deadline")):
            left = sum(result is ended for result in results)
            if left:
                log.info("BatchSign %s: %d of %d items left unsigned", how, left, len(items))
        # Built in place, in request order: a BatchSignResult made per item and then copied
        # into the response cost ~1.5 µs an item.
        response = pb.BatchSignResponse()
        add = response.responses.add
        for item, fields in zip(items, results, strict=True):
            add(request_id=item.request_id, **fields)  # type: ignore[arg-type] # every item is set by now
        return response

    def _chunks(self, items: Sequence[pb.SignRequest]) -> tuple[list[list[int]], int]:
        """Item indexes grouped by the cluster that serves their key first; each group cut into
        chunks of BATCH_CHUNK to BATCH_CHUNK_MAX items, in turn from each cluster; and how many
        chunks to sign at once: as many as the clusters have sessions, or this process CPUs if fewer
        (one on one CPU)."""
        if len(items) < 2 * BATCH_CHUNK:
            return [list(range(len(items)))], 1
        groups: dict[str, list[int]] = {}
        first: dict[str, str] = {}
        for index, item in enumerate(items):
            cluster = first.get(item.key_id)
            if cluster is None:
                cluster = first[item.key_id] = self._first_cluster(item.key_id)
            groups.setdefault(cluster, []).append(index)
        cut: list[list[list[int]]] = []
        at_once = 0
        for cluster, indexes in groups.items():
            backend = self.router.backends.get(cluster)
            sessions = min(backend.spec.pool_size if backend else 1, self._cpus)
            at_once += sessions
            parts = max(1, min(sessions, len(indexes) // BATCH_CHUNK), -(-len(indexes) // BATCH_CHUNK_MAX))
            size = -(-len(indexes) // parts)
            cut.append([indexes[i : i + size] for i in range(0, len(indexes), size)])
        chunks = [chunk for turn in itertools.zip_longest(*cut) for chunk in turn if chunk is not None]
        return chunks, 1 if self._cpus == 1 else min(len(chunks), at_once)

    def _first_cluster(self, key_id: str) -> str:
        try:
            return self.router.placement(key_id).primary
        except Exception:  # noqa: BLE001 - the item reports its own error when it is signed
            return ""

    def _sign_chunk(
        self, items: Sequence[pb.SignRequest], chunk: list[int], results: list[_Result | None], deadline: float,
    ) -> None:
        asked: list[tuple[str, Operation, bytes | None, bytes | None]] = []
        named: list[tuple[int, str]] = []  # (index, request id) of each item asked
        for index in chunk:
            item = items[index]
            try:
                digest, message = _sign_input(item)
                asked.append((item.key_id, conv.operation(item.algorithm), digest, message))
                named.append((index, item.request_id))
            except Exception as exc:  # noqa: BLE001 - one bad item does not fail the batch
                results[index] = _failed_item(exc)
        try:
            outcomes: list[Any] = list(self.router.sign_many(asked, deadline))
        except Exception as exc:  # noqa: BLE001 - a bug: every item of the chunk says INTERNAL
            outcomes = [exc] * len(asked)
        for (index, request_id), (key_id, *_), outcome in zip(named, asked, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                results[index] = _failed_item(outcome)
                continue
            signature, cluster = outcome
            results[index] = {"response": {"signature": signature, "key_id": key_id, "cluster": cluster,
                                           "request_id": request_id}}

    def SignStream(
        self, request_iterator: Iterator[pb.SignRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.SignResponse]:
        request_id = ""  # the message being answered: its error's ErrorInfo names it
        try:
            for request in request_iterator:
                request_id = request.request_id
                if self.draining.is_set():
                    raise Unavailable("the gateway is shutting down; retry on another gateway")
                yield self._sign(request, _deadline(context, self.default_deadline))
                request_id = ""
        except grpc.RpcError:
            # Raised by the request iterator alone: the client cancelled the stream, or its
            # deadline passed, while this waited for the next message. No one is left to answer.
            log.debug("a SignStream ended by its client or its deadline")
        except Exception as exc:  # noqa: BLE001 - every failure gets a status
            status.abort(context, exc, request_id)


def _failed_item(exc: BaseException) -> _Result:
    code, message, reason = status.status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("internal error in batch item", exc_info=exc)
    return {"code": code.value[0], "message": message, "reason": reason}


_CANCELLED: _Result = {"code": grpc.StatusCode.CANCELLED.value[0], "reason": "CANCELLED",
                       "message": "the call was cancelled before this item was signed"}
_PAST_DEADLINE: _Result = {"code": grpc.StatusCode.DEADLINE_EXCEEDED.value[0], "reason": "DEADLINE_EXCEEDED",
                           "message": "the call's deadline passed before this item was signed"}
"""An item of a batch whose call ended (cancelled, or past its deadline) before it was signed."""


def _unwanted(context: grpc.ServicerContext) -> _Result | None:
    """What an item of a call no one waits for any more says (its deadline passed, or its client
    cancelled it); None while the call is live."""
    if status.past_deadline(context):
        return _PAST_DEADLINE
    if context.is_active():
        return None
    # Core may have ended the call at its deadline just now.
    return _PAST_DEADLINE if status.past_deadline(context) else _CANCELLED


def _pem(der: bytes) -> str:
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines) + "\n-----END PUBLIC KEY-----\n"

"""Unary calls served by the thread that takes them from gRPC core: no hand-off per call.

grpcio's server polls one completion queue in one thread and hands each call to its
thread pool. The pool thread then waits for the polling thread twice: once for the
request message and once more before it may finish. On this machine that costs about
200 µs of CPU per call, more than a P-256 signature. Here, ``threads`` threads wait on
one notification queue for calls of the chosen unary methods. Each call's own events
go to a completion queue that only the thread serving the call polls, so that thread
receives the request, runs the interceptors and the servicer, and sends the answer
itself. A bare call costs about 50 µs this way.

Only unary-unary methods can be served here; streaming methods, health and reflection
stay on the grpcio server, which shares the port, the channel options and the core
server with this. ``FastPath.attach`` registers the methods with gRPC core before the
server starts; core then hands those calls only to this. If this grpcio lacks the core
calls it needs, ``attach`` returns ``None`` and the caller serves those methods on
grpcio's pool as usual.

Behaviour matches grpcio's for what a client sees: status codes and details for an
abort, an exception in the servicer (``UNKNOWN``, ``Exception calling application``),
a request that does not parse (``INTERNAL``), a call with no request message
(``UNIMPLEMENTED``), trailing metadata, deadlines. On a ``FastPath`` made with
``watch_cancel=True`` (BatchSign's), ``is_active`` turns false as soon as the client
cancels or the deadline passes, as on grpcio's pool: its first call asks core to
report the call's end. That costs one more core batch and event, so the unary
methods, whose calls are too short to stop half way, are not watched: there a
cancelled call is noticed when its handler finishes (``is_active`` stays true until
then), as grpcio does for a servicer that does not poll ``is_active``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import grpc

try:
    from grpc._cython import cygrpc
except ImportError:  # pragma: no cover - grpcio always ships it; attach() then declines
    cygrpc = None

log = logging.getLogger(__name__)

_NO_FLAGS = 0
# Tags of a call's batches on its slot's queue: a watched call has two outstanding at times.
_RECEIVE, _SEND, _INITIAL, _CLOSE = "receive", "send", "initial metadata", "close"
_CALL_OK = 0  # grpc_call_error GRPC_CALL_OK: a batch was started
_CORE_CALLS = ("register_method", "register_completion_queue", "request_registered_call")
_STATUS = {code: code.value[0] for code in grpc.StatusCode}


class _CallDetails(grpc.HandlerCallDetails):  # type: ignore[misc]
    __slots__ = ("method", "invocation_metadata")

    def __init__(self, method: str, invocation_metadata: Sequence[tuple[str, Any]]) -> None:
        self.method = method
        self.invocation_metadata = invocation_metadata


class _Context(grpc.ServicerContext):  # type: ignore[misc]
    """What a servicer sees of a call served here (grpc.ServicerContext)."""

    def __init__(self, event: Any, queue: Any) -> None:
        self._event = event
        self.call = event.call
        self.queue = queue
        self.code_: grpc.StatusCode | None = None
        self.details_: str | None = None
        self.trailing: Sequence[tuple[str, Any]] | None = None
        self.initial_sent = False
        self.callbacks: list[Callable[[], None]] = []
        self.aborted = False
        self.over = False

    # -- the call --
    def is_active(self) -> bool:
        return not self.over

    def time_remaining(self) -> float | None:
        remaining: float = self._event.call_details.deadline - time.time()
        return max(remaining, 0.0)

    def cancel(self) -> None:
        self.call.cancel()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        if self.over:
            return False
        self.callbacks.append(callback)
        return True

    def invocation_metadata(self) -> Sequence[tuple[str, Any]]:
        return self._event.invocation_metadata  # type: ignore[no-any-return]

    def peer(self) -> str:
        peer = self.call.peer()
        return peer.decode() if isinstance(peer, bytes) else str(peer)

    def peer_identities(self) -> Sequence[bytes] | None:
        return cygrpc.peer_identities(self.call)  # type: ignore[no-any-return]

    def peer_identity_key(self) -> str | None:
        key = cygrpc.peer_identity_key(self.call)
        return key.decode() if isinstance(key, bytes) else key

    def auth_context(self) -> Mapping[str, Sequence[bytes]]:
        properties = cygrpc.auth_context(self.call) or {}
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in properties.items()}

    def wait(self, tag: str) -> Any:
        """The event of this call's batch ``tag``: the only one outstanding here."""
        return self.queue.poll()

    def seal(self) -> bool:
        """Before the answer goes: whether a receive-close batch already runs (else it goes with it)."""
        return False

    def settle(self) -> None:
        """After the answer, or a failure on its way (a bug): a call whose answer never went is
        cancelled, or its client would wait for its deadline."""
        if not self.over:
            self.call.cancel()

    # -- what goes back --
    def set_compression(self, compression: grpc.Compression) -> None:
        raise NotImplementedError("per-call compression is not supported on the fast path")

    def disable_next_message_compression(self) -> None:
        pass  # nothing is compressed here

    def send_initial_metadata(self, initial_metadata: Sequence[tuple[str, Any]]) -> None:
        if self.initial_sent:
            raise ValueError("Initial metadata no longer allowed!")
        self.initial_sent = True
        self.call.start_server_batch((cygrpc.SendInitialMetadataOperation(tuple(initial_metadata), _NO_FLAGS),),
                                     _INITIAL)
        self.wait(_INITIAL)

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, Any]]) -> None:
        self.trailing = trailing_metadata

    def trailing_metadata(self) -> Sequence[tuple[str, Any]] | None:
        return self.trailing

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        if code is grpc.StatusCode.OK:
            log.error("abort() called with StatusCode.OK; returning UNKNOWN")
            code, details = grpc.StatusCode.UNKNOWN, ""
        self.code_ = code
        self.details_ = details
        self.aborted = True
        # A bare Exception, as grpcio raises: code that reads the exception chain
        # (gateway.metrics) skips it to find the error behind the abort.
        raise Exception()  # noqa: TRY002

    def abort_with_status(self, status: grpc.Status) -> NoReturn:
        self.trailing = status.trailing_metadata
        self.abort(status.code, status.details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code_ = code

    def set_details(self, details: str) -> None:
        self.details_ = details

    def code(self) -> grpc.StatusCode | None:
        return self.code_

    def details(self) -> str | None:
        return self.details_


class _WatchedContext(_Context):
    """A call whose end core reports as soon as it happens: ``is_active`` sees a cancel at once.

    The first ``is_active`` starts a receive-close batch (a call no one asks about costs
    nothing more). Its event may come before the answer is sent (the client cancelled, or
    the deadline passed) or with it; ``wait`` notes it whichever batch it waits for, and
    the thread that sends the answer drains it. ``is_active`` may be called from any
    thread while the servicer runs.
    """

    def __init__(self, event: Any, queue: Any) -> None:
        super().__init__(event, queue)
        self._asked = False  # the receive-close batch was asked for
        self.watching = False  # ... and started
        self.closed = False  # ... and core reported the call's end
        self._sealed = False  # the answer is being sent: no batch starts any more
        self._seen: dict[str, Any] = {}  # events polled before their batch's thread waited for them
        self._polling = threading.Lock()

    def is_active(self) -> bool:
        if self.over or self.closed:
            return False
        if self._polling.acquire(blocking=False):  # else another thread polls, and notes the close
            try:
                if not self._sealed:  # once sealed, the serving thread alone uses the queue
                    if not self._asked:
                        self._asked = True
                        self.watching = self.call.start_server_batch(
                            (cygrpc.ReceiveCloseOnServerOperation(_NO_FLAGS),), _CLOSE) == _CALL_OK
                    if self.watching:
                        event = self.queue.poll(deadline=time.time())  # answers at once
                        if event.completion_type == cygrpc.CompletionType.operation_complete:
                            self._take(event)
            finally:
                self._polling.release()
        return not self.closed

    def seal(self) -> bool:
        with self._polling:
            self._sealed = True
            return self.watching

    def settle(self) -> None:
        """As for any call, and none of its events is left on the queue, which serves the slot's next call."""
        watching = self.seal()
        if self.over:
            return
        self.call.cancel()
        if watching:
            self.wait(_CLOSE)

    def wait(self, tag: str) -> Any:
        if not self.watching and (tag == _RECEIVE or self._sealed):  # no other batch, nor one to come
            return self.queue.poll()
        with self._polling:
            while True:
                if tag == _CLOSE and self.closed:
                    return None
                if tag in self._seen:
                    return self._seen.pop(tag)
                self._take(self.queue.poll())

    def _take(self, event: Any) -> None:
        if event.tag == _CLOSE:
            self.closed = True
        else:  # a batch another thread started and has yet to wait for
            self._seen[event.tag] = event


class _Slot:
    """One outstanding request for a call of ``method``, with the queue its call's events go to."""

    __slots__ = ("method", "queue")

    def __init__(self, method: str) -> None:
        self.method = method
        self.queue = cygrpc.CompletionQueue()


class FastPath:
    """Serves the given unary-unary methods of a grpcio server on threads of its own."""

    @classmethod
    def attach(cls, server: grpc.Server, handlers: Mapping[str, grpc.RpcMethodHandler],
               interceptors: Sequence[grpc.ServerInterceptor], *, threads: int,
               watch_cancel: bool = False) -> FastPath | None:
        """Take ``handlers`` (full method name → unary-unary handler) off ``server``'s pool.

        Call before ``server.start()`` and do not give grpcio these methods as registered
        methods. ``None`` when this grpcio does not offer what this needs. With
        ``watch_cancel``, a servicer's ``context.is_active()`` turns false as soon as its
        call is cancelled or its deadline passes (from its first call on, which costs one
        more core batch: for long calls).
        """
        core = getattr(server, "_cy_server", None)
        if cygrpc is None or core is None or not all(hasattr(core, name) for name in _CORE_CALLS):
            log.warning("this grpcio offers no per-thread completion queues; unary calls use its thread pool")
            return None
        return cls(core, handlers, interceptors, threads=threads, watch_cancel=watch_cancel)

    def __init__(self, core: Any, handlers: Mapping[str, grpc.RpcMethodHandler],
                 interceptors: Sequence[grpc.ServerInterceptor], *, threads: int,
                 watch_cancel: bool = False) -> None:
        for method, handler in handlers.items():
            if handler.request_streaming or handler.response_streaming:
                raise ValueError(f"{method} is a streaming method; only unary calls are served here")
        self._core = core
        self._handlers = dict(handlers)
        self._context = _WatchedContext if watch_cancel else _Context
        # The interceptor chain, built once: interceptors[0] is outermost, as in grpcio.
        resolve: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None] = self._lookup
        for interceptor in reversed(interceptors):
            resolve = functools.partial(interceptor.intercept_service, resolve)
        self._resolve = resolve
        self._notices = cygrpc.CompletionQueue()
        core.register_completion_queue(self._notices)
        for method in self._handlers:
            core.register_method(method)
        # One outstanding request per thread and method: a burst of one method can use every thread.
        self._slots = [_Slot(method) for method in self._handlers for _ in range(threads)]
        # One lock per thread, which only ``shut`` contends: a thread asks core for its next
        # call under its own, and ``shut`` takes them all.
        self._requesting = [threading.Lock() for _ in range(threads)]
        self._threads = [threading.Thread(target=self._serve, args=(lock,), name=f"rpc-fast-{i}", daemon=True)
                         for i, lock in enumerate(self._requesting)]
        self._stopping = False

    def _lookup(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(details.method)

    @property
    def methods(self) -> frozenset[str]:
        return frozenset(self._handlers)

    def start(self) -> None:
        """Call after the grpcio server has started."""
        for slot in self._slots:  # before the threads start: no lock is contended
            self._request(slot, self._requesting[0])
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Call after the grpcio server has stopped: core has failed the outstanding requests.

        Waits up to ``timeout`` seconds for calls still in a servicer (one stuck in an
        HSM call cannot be interrupted); their threads are then left to end with the process.
        (``shut`` and ``wait``, for several fast paths that share one timeout.)
        """
        started = time.monotonic()
        self.shut()
        self.wait(started + timeout, since=started)

    def shut(self) -> None:
        """Take no more calls: each thread that is not serving one ends at once."""
        with contextlib.ExitStack() as held:  # no thread asks core for a call on the queue once it is shut down
            for lock in self._requesting:
                held.enter_context(lock)
            self._stopping = True
            self._notices.shutdown()

    def wait(self, until: float, *, since: float) -> None:
        """After ``shut``: wait until ``until`` (monotonic) at most for the calls still being
        served; a WARNING says how many still are, and how long the stop waited since ``since``,
        the stop's start."""
        for thread in self._threads:
            if thread.ident is not None:  # started (stop may follow a failed start)
                thread.join(max(0.0, until - time.monotonic()))
        busy = self.serving()
        if busy:
            log.warning("%d fast-path call(s) still running after %.1f s; not waiting for them", busy,
                        time.monotonic() - since)
            return
        for slot in self._slots:
            slot.queue.shutdown()
            while slot.queue.poll().completion_type != cygrpc.CompletionType.queue_shutdown:
                pass

    def serving(self) -> int:
        """After ``shut``: the threads still serving a call (the others have ended)."""
        return sum(thread.is_alive() for thread in self._threads)

    # -- serving --

    def _request(self, slot: _Slot, lock: threading.Lock) -> None:
        # Under the lock ``shut`` takes: a thread that finished its call just as the stop began
        # would otherwise ask core for the next one on a queue being shut down, which crashes it.
        with lock:  # its thread's (``start``: the first's, before any thread runs)
            if self._stopping:
                return
            try:
                self._core.request_registered_call(slot.queue, self._notices, slot.method, slot)
            except ValueError:  # "server must be started and not shutting down": no more calls come
                self._stopping = True

    def _serve(self, lock: threading.Lock) -> None:
        notices = self._notices
        while True:
            event = notices.poll()
            kind = event.completion_type
            if kind == cygrpc.CompletionType.queue_shutdown:
                return
            if kind != cygrpc.CompletionType.operation_complete:
                continue
            slot: _Slot = event.tag
            if not event.success:  # the server is shutting down
                continue
            try:
                self._handle(event, slot)
            except Exception:  # never lose the thread; the call's status is already sent or lost
                log.exception("unexpected failure serving %s", slot.method)
            finally:
                event = None
                self._request(slot, lock)

    def _handle(self, event: Any, slot: _Slot) -> None:
        context = self._context(event, slot.queue)
        try:
            self._finish(context, *self._answer(event, slot, context))
        finally:
            context.settle()

    def _answer(self, event: Any, slot: _Slot, context: _Context) -> tuple[bytes | None, grpc.StatusCode, str]:
        """Receive the request, run the interceptors and the servicer: (response body, status, details)."""
        try:
            handler = self._resolve(_CallDetails(slot.method, event.invocation_metadata))
        except Exception as exc:
            log.exception("an interceptor failed on %s", slot.method)
            return None, grpc.StatusCode.UNKNOWN, f"Exception servicing handler: {exc}"
        if handler is None:
            return None, grpc.StatusCode.UNIMPLEMENTED, "Method not found!"
        context.call.start_server_batch((cygrpc.ReceiveMessageOperation(_NO_FLAGS),), _RECEIVE)
        received = context.wait(_RECEIVE)
        payload = received.batch_operations[0].message() if received.success else None
        if payload is None:  # cancelled, or the client closed without a request
            return None, grpc.StatusCode.UNIMPLEMENTED, f'"{slot.method}" requires exactly one request message.'
        try:
            request = handler.request_deserializer(payload) if handler.request_deserializer else payload
        except Exception:
            log.exception("cannot deserialize a request for %s", slot.method)
            return None, grpc.StatusCode.INTERNAL, "Exception deserializing request!"
        try:
            response = handler.unary_unary(request, context)
        except Exception as exc:
            if context.aborted:
                return None, context.code_ or grpc.StatusCode.UNKNOWN, context.details_ or ""
            log.exception("Exception calling application: %s", exc)
            return None, grpc.StatusCode.UNKNOWN, f"Exception calling application: {exc}"
        try:
            body = handler.response_serializer(response) if handler.response_serializer else response
        except Exception:
            log.exception("cannot serialize a response of %s", slot.method)
            return None, grpc.StatusCode.INTERNAL, "Failed to serialize response!"
        return body, context.code_ or grpc.StatusCode.OK, context.details_ or ""

    def _finish(self, context: _Context, body: bytes | None, code: grpc.StatusCode, details: str) -> None:
        """Send what is left of the answer in one batch, and wait for it and the client's close."""
        operations = [cygrpc.SendStatusFromServerOperation(
            tuple(context.trailing or ()), _STATUS[code], details.encode(), _NO_FLAGS)]
        if not context.initial_sent:
            operations.append(cygrpc.SendInitialMetadataOperation((), _NO_FLAGS))
        if body is not None:
            operations.append(cygrpc.SendMessageOperation(body, _NO_FLAGS))
        watched = context.seal()
        if not watched:
            operations.append(cygrpc.ReceiveCloseOnServerOperation(_NO_FLAGS))
        context.call.start_server_batch(tuple(operations), _SEND)
        context.wait(_SEND)
        if watched:  # if not seen yet, it comes with the status: leave the queue empty for the next call
            context.wait(_CLOSE)
        context.over = True
        for callback in context.callbacks:
            try:
                callback()
            except Exception:
                log.exception("a call's callback failed")

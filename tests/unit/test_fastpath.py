"""The fast path: unary calls served by the thread that takes them from gRPC core.

A real grpcio server on a free loopback port with a real client; what is checked is
what a client sees (codes, details, metadata, deadlines), and that the calls really
ran on the fast path's threads while other methods stayed on grpcio's pool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from gateway.fastpath import FastPath
from tests.support import wait_for

SERVICE = "test.Echo"


def _method(name: str) -> str:
    return f"/{SERVICE}/{name}"


class Recorder(grpc.ServerInterceptor):
    """Notes each call's method and lets ``refuse`` name methods to answer with no handler."""

    def __init__(self, tag: str, seen: list[str], refuse: set[str] | None = None) -> None:
        self.tag, self.seen, self.refuse = tag, seen, refuse or set()

    def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        self.seen.append(f"{self.tag}:{details.method.rsplit('/', 1)[1]}")
        if details.method in self.refuse:
            return None
        return continuation(details)


class Server:
    """A grpcio server whose unary methods ``fast`` serves on the fast path, the rest on its pool."""

    def __init__(self, behaviours: dict[str, Callable[[bytes, grpc.ServicerContext], bytes]], *,
                 slow: dict[str, Callable[[bytes, grpc.ServicerContext], bytes]] | None = None,
                 threads: int = 2, interceptors: list[grpc.ServerInterceptor] | None = None,
                 deserializer: Callable[[bytes], Any] | None = None,
                 serializer: Callable[[Any], bytes] | None = None,
                 options: list[tuple[str, Any]] | None = None, watch_cancel: bool = False) -> None:
        self.interceptors = interceptors or []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="pool"),
                                  interceptors=self.interceptors, options=options or [])
        fast = {_method(name): grpc.unary_unary_rpc_method_handler(b, deserializer, serializer)
                for name, b in behaviours.items()}
        self.fast = FastPath.attach(self.server, fast, self.interceptors, threads=threads, watch_cancel=watch_cancel)
        assert self.fast is not None
        pool = {name: grpc.unary_unary_rpc_method_handler(b) for name, b in (slow or {}).items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, pool),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.fast.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")

    def call(self, name: str, body: bytes = b"", **kwargs: Any) -> Any:
        return self.channel.unary_unary(_method(name)).with_call(body, timeout=kwargs.pop("timeout", 10), **kwargs)

    def future(self, name: str, body: bytes = b"", timeout: float = 10) -> grpc.Future:
        return self.channel.unary_unary(_method(name)).future(body, timeout=timeout)

    def stop(self, grace: float | None = 1.0) -> None:
        self.channel.close()
        self.server.stop(grace).wait()
        assert self.fast is not None
        self.fast.stop()


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(*args: Any, **kwargs: Any) -> Server:
        started.append(Server(*args, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.stop(grace=None)


def _thread_name(_request: bytes, _context: grpc.ServicerContext) -> bytes:
    return threading.current_thread().name.encode()


class Gate:
    """A servicer that holds each call until ``open()``, then answers with its thread's name."""

    def __init__(self) -> None:
        self._inside = threading.Semaphore(0)
        self._open = threading.Event()
        self.active_at_end: list[bool] = []

    def __call__(self, _request: bytes, context: grpc.ServicerContext) -> bytes:
        self._inside.release()
        self._open.wait(30)
        self.active_at_end.append(context.is_active())
        return threading.current_thread().name.encode()

    def entered(self, calls: int = 1) -> bool:
        """True once ``calls`` more calls are inside (held at once)."""
        return all(self._inside.acquire(timeout=10) for _ in range(calls))

    def open(self) -> None:
        self._open.set()


def test_unary_calls_run_on_the_fast_path_threads_and_others_on_the_pool(serve) -> None:
    server = serve({"Fast": _thread_name}, slow={"Slow": _thread_name})
    fast, call = server.call("Fast")
    assert fast.startswith(b"rpc-fast-") and call.code() is grpc.StatusCode.OK
    slow, _ = server.call("Slow")
    assert slow.startswith(b"pool")


def test_metadata_peer_and_deadline_reach_the_servicer_and_trailers_reach_the_client(serve) -> None:
    def behaviour(request: bytes, context: grpc.ServicerContext) -> bytes:
        metadata = dict(context.invocation_metadata())
        context.set_trailing_metadata((("x-echo", metadata["x-tag"]), ("x-left-bin", b"\x00\x01")))
        return f"{context.peer()}|{context.time_remaining():.1f}|{request.decode()}".encode()

    server = serve({"Echo": behaviour})
    response, call = server.call("Echo", b"hello", metadata=(("x-tag", "t-42"),), timeout=7)
    peer, remaining, echoed = response.decode().split("|")
    assert peer.startswith("ipv4:127.0.0.1:")
    assert 5.0 < float(remaining) <= 7.0
    assert echoed == "hello"
    assert dict(call.trailing_metadata()) == {"x-echo": "t-42", "x-left-bin": b"\x00\x01"}


def test_abort_with_status_sends_code_details_and_rich_status(serve) -> None:
    def behaviour(_request: bytes, context: grpc.ServicerContext) -> bytes:
        status = status_pb2.Status(code=code_pb2.NOT_FOUND, message="no key 'k1'")
        context.abort_with_status(rpc_status.to_status(status))
        raise AssertionError("abort returned")

    server = serve({"Abort": behaviour})
    with pytest.raises(grpc.RpcError) as caught:
        server.call("Abort")
    err = caught.value
    assert err.code() is grpc.StatusCode.NOT_FOUND and err.details() == "no key 'k1'"
    assert rpc_status.from_call(err).message == "no key 'k1'"


def test_set_code_with_a_response_sends_that_code(serve) -> None:
    def behaviour(_request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        context.set_details("not yet")
        return b"ignored by the client"

    server = serve({"Code": behaviour})
    with pytest.raises(grpc.RpcError) as caught:
        server.call("Code")
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION and caught.value.details() == "not yet"


def test_a_servicer_exception_is_unknown_and_the_thread_serves_on(serve) -> None:
    def boom(_request: bytes, _context: grpc.ServicerContext) -> bytes:
        raise RuntimeError("boom")

    server = serve({"Boom": boom, "Name": _thread_name}, threads=1)
    with pytest.raises(grpc.RpcError) as caught:
        server.call("Boom")
    assert caught.value.code() is grpc.StatusCode.UNKNOWN
    assert caught.value.details() == "Exception calling application: boom"
    assert server.call("Name")[0] == b"rpc-fast-0"


def test_a_request_that_does_not_parse_is_internal(serve) -> None:
    def strict(data: bytes) -> bytes:
        if not data.startswith(b"ok"):
            raise ValueError("bad bytes")
        return data

    server = serve({"Echo": lambda request, _context: request}, deserializer=strict)
    assert server.call("Echo", b"ok then")[0] == b"ok then"
    with pytest.raises(grpc.RpcError) as caught:
        server.call("Echo", b"\xff garbage")
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    assert caught.value.details() == "Exception deserializing request!"


def test_a_response_that_does_not_serialize_is_internal(serve) -> None:
    server = serve({"Echo": lambda _request, _context: object()}, serializer=lambda value: value.missing)
    with pytest.raises(grpc.RpcError) as caught:
        server.call("Echo")
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    assert caught.value.details() == "Failed to serialize response!"


def test_interceptors_run_in_order_and_no_handler_is_unimplemented(serve) -> None:
    seen: list[str] = []
    interceptors: list[grpc.ServerInterceptor] = [Recorder("outer", seen), Recorder("inner", seen, {_method("Gone")})]
    server = serve({"Echo": lambda request, _context: request, "Gone": _thread_name}, interceptors=interceptors)
    assert server.call("Echo", b"x")[0] == b"x"
    assert seen == ["outer:Echo", "inner:Echo"]
    with pytest.raises(grpc.RpcError) as caught:
        server.call("Gone")
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_calls_run_concurrently_up_to_the_thread_count(serve) -> None:
    gate = Gate()
    server = serve({"Hold": gate}, threads=3)
    calls = [server.future("Hold") for _ in range(3)]
    assert gate.entered(3), "three calls did not run at once on three threads"
    gate.open()
    assert sorted(c.result() for c in calls) == [b"rpc-fast-0", b"rpc-fast-1", b"rpc-fast-2"]


def test_a_call_of_another_method_is_not_held_behind_a_slow_one(serve) -> None:
    gate = Gate()
    server = serve({"Hold": gate, "Quick": _thread_name}, threads=2)
    held = server.future("Hold")
    assert gate.entered()
    for _ in range(20):  # every one is answered while the first thread is busy
        assert server.call("Quick", timeout=5)[0].startswith(b"rpc-fast-")
    gate.open()
    assert held.result().startswith(b"rpc-fast-")


def test_deadline_and_cancellation_free_the_thread(serve) -> None:
    gate = Gate()
    server = serve({"Hold": gate, "Name": _thread_name}, threads=1)
    with pytest.raises(grpc.RpcError) as caught:
        server.call("Hold", timeout=0.3)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    cancelled = server.future("Hold")
    time.sleep(0.2)
    assert cancelled.cancel()
    gate.open()
    assert server.call("Name")[0] == b"rpc-fast-0"
    wait_for(lambda: len(gate.active_at_end) == 2, what="both held calls to finish")


class Watcher:
    """A servicer that works until its call is no longer active (at most ``limit`` s), then says how long it ran."""

    def __init__(self, limit: float = 10) -> None:
        self.limit = limit
        self.inside = threading.Event()
        self.stopped_after: list[float] = []

    def __call__(self, _request: bytes, context: grpc.ServicerContext) -> bytes:
        started = time.monotonic()
        self.inside.set()
        while context.is_active() and time.monotonic() - started < self.limit:
            time.sleep(0.005)
        self.stopped_after.append(time.monotonic() - started)
        return b"done"


@pytest.mark.parametrize("watch", [True, False], ids=["watched", "unwatched"])
def test_a_watched_call_sees_its_cancel_at_once_and_the_thread_serves_on(serve, watch) -> None:
    watcher = Watcher(limit=10 if watch else 2)
    server = serve({"Work": watcher, "Name": _thread_name}, threads=1, watch_cancel=watch)
    if not watch:  # unary methods: is_active stays true until the handler returns, as before
        call = server.future("Work", timeout=0.5)
        with pytest.raises(grpc.RpcError):
            call.result(timeout=15)
        wait_for(lambda: watcher.stopped_after, what="the servicer to return", timeout=15)
        assert watcher.stopped_after[0] >= 2
        return
    call = server.future("Work")
    assert watcher.inside.wait(10)
    assert call.cancel()
    wait_for(lambda: watcher.stopped_after, what="the servicer to notice the cancel")
    assert watcher.stopped_after[0] < 5
    # The deadline ends a watched call too.
    watcher.inside.clear()
    with pytest.raises(grpc.RpcError) as caught:
        server.call("Work", timeout=0.3)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: len(watcher.stopped_after) == 2, what="the servicer to notice the deadline")
    assert watcher.stopped_after[1] < 5
    # The one thread's queue was left clean: it answers what comes next.
    assert server.call("Name")[0] == b"rpc-fast-0"


def test_watched_calls_answer_like_the_others(serve) -> None:
    def behaviour(request: bytes, context: grpc.ServicerContext) -> bytes:
        assert context.is_active()
        context.send_initial_metadata((("early", "yes"),))
        assert context.is_active()
        context.set_trailing_metadata((("late", "yes"),))
        return request

    server = serve({"Echo": behaviour, "Fail": lambda _r, c: c.abort(grpc.StatusCode.NOT_FOUND, "no such key")},
                   threads=2, watch_cancel=True)
    for index in range(50):  # each call leaves its slot's queue empty for the next
        body, call = server.call("Echo", str(index).encode())
        assert body == str(index).encode()
        assert ("early", "yes") in tuple(call.initial_metadata())
        assert ("late", "yes") in tuple(call.trailing_metadata())
        with pytest.raises(grpc.RpcError) as caught:
            server.call("Fail")
        assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.NOT_FOUND, "no such key")


@pytest.mark.parametrize(("watch", "asks"), [(True, True), (True, False), (False, True)],
                         ids=["watched", "watched-never-asked", "unwatched"])
def test_a_call_that_fails_on_its_way_out_ends_and_leaves_its_thread_clean(serve, caplog, watch, asks) -> None:
    """The answer cannot be sent (trailing metadata gRPC cannot encode; a servicer's bug): the
    call is cancelled at once, not left to its deadline, and a watched call's events are
    drained, so the thread's next calls get their own requests and answers."""
    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        if asks:
            assert context.is_active()  # starts the watch, if watched
        if request == b"break":
            context.set_trailing_metadata((("late", object()),))
        return request

    server = serve({"Echo": echo}, threads=1, watch_cancel=watch)  # one thread: one queue for Echo
    with pytest.raises(grpc.RpcError) as caught:
        server.call("Echo", b"break", timeout=5)
    assert caught.value.code() is grpc.StatusCode.CANCELLED  # DEADLINE_EXCEEDED after 5 s before
    for index in range(5):
        assert server.call("Echo", f"request {index}".encode(), timeout=5)[0] == f"request {index}".encode()
    assert "unexpected failure serving" in caplog.text


def test_stop_lets_a_call_in_flight_finish_and_ends_the_threads(serve) -> None:
    gate = Gate()
    server = Server({"Slow": gate}, threads=2)
    call = server.future("Slow")
    assert gate.entered()
    stopped = server.server.stop(5)
    gate.open()
    assert call.result(timeout=10).startswith(b"rpc-fast-")
    stopped.wait(10)
    assert server.fast is not None
    server.fast.stop()
    server.channel.close()
    assert not any(t.name.startswith("rpc-fast-") and t.is_alive() for t in threading.enumerate())


def test_a_request_over_the_size_limit_is_resource_exhausted(serve) -> None:
    server = serve({"Echo": lambda request, _context: request, "Name": _thread_name}, threads=1,
                   options=[("grpc.max_receive_message_length", 1024)])
    assert server.call("Echo", b"x" * 1000)[0] == b"x" * 1000
    with pytest.raises(grpc.RpcError) as caught:
        server.call("Echo", b"x" * 2000)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.call("Name")[0] == b"rpc-fast-0"


def test_stop_does_not_wait_forever_for_a_stuck_call(caplog) -> None:
    gate = Gate()
    server = Server({"Hang": gate}, threads=1)
    pending = server.future("Hang", timeout=30)
    assert gate.entered()
    server.server.stop(0.1).wait(10)
    assert server.fast is not None
    started = time.monotonic()
    server.fast.stop(timeout=0.5)
    assert time.monotonic() - started < 5
    assert "1 fast-path call(s) still running" in caplog.text
    gate.open()
    pending.cancel()
    server.channel.close()


def test_stop_after_a_start_that_never_happened() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    fast = FastPath.attach(server, {_method("Echo"): grpc.unary_unary_rpc_method_handler(lambda r, c: r)}, [],
                           threads=2)
    assert fast is not None
    server.stop(None).wait(10)
    fast.stop(timeout=1)  # a gateway whose start failed is still stopped cleanly


def test_a_call_with_no_request_message_is_unimplemented(serve) -> None:
    server = serve({"Echo": lambda request, _context: request, "Name": _thread_name}, threads=1)
    no_message = server.channel.stream_unary(_method("Echo"))  # a client that half-closes at once
    with pytest.raises(grpc.RpcError) as caught:
        no_message(iter(()), timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert caught.value.details() == f'"{_method("Echo")}" requires exactly one request message.'
    assert server.call("Name")[0] == b"rpc-fast-0"


def test_an_interceptor_that_fails_is_unknown_and_the_thread_serves_on(serve) -> None:
    class Broken(grpc.ServerInterceptor):
        def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
            if details.method == _method("Broken"):
                raise RuntimeError("policy store unreadable")
            return continuation(details)

    server = serve({"Broken": _thread_name, "Name": _thread_name}, threads=1, interceptors=[Broken()])
    with pytest.raises(grpc.RpcError) as caught:
        server.call("Broken")
    assert caught.value.code() is grpc.StatusCode.UNKNOWN
    assert caught.value.details() == "Exception servicing handler: policy store unreadable"
    assert server.call("Name")[0] == b"rpc-fast-0"


def test_streaming_methods_are_refused() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    stream = grpc.unary_stream_rpc_method_handler(lambda request, context: iter(()))
    with pytest.raises(ValueError, match="streaming"):
        FastPath.attach(server, {_method("Stream"): stream}, [], threads=1)


def test_a_grpcio_without_the_core_calls_falls_back_to_the_pool(caplog) -> None:
    class OtherServer:  # a grpcio whose server object does not expose its core server
        pass

    handler = grpc.unary_unary_rpc_method_handler(lambda request, _context: request)
    assert FastPath.attach(OtherServer(), {_method("Echo"): handler}, [], threads=1) is None  # type: ignore[arg-type]
    assert "unary calls use its thread pool" in caplog.text

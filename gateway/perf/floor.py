"""The floor under the gateway's unary figure: a Python gRPC server that only signs.

``hsmgw bench`` runs this beside the gateway and drives it with the same h2load
requests. Each process is what a gateway worker would be with nothing of its own
left: the same grpcio, fast path (``gateway.fastpath``), thread count and one
process per CPU (pinned, one port with ``SO_REUSEPORT``), and a ``Sign`` that
parses the request, runs one
``C_Sign`` on a pooled session of the key's primary cluster (through the same
binding as the gateway) and returns the
HSM's signature — no authentication, limits, routing, failover, metrics or
request ids. The gateway's unary throughput over this server's is how much of
what Python gRPC and the HSM allow the gateway's own work leaves.

Not a product: ``python -m gateway.perf.floor --config C --key K --port P --cpu N --ready F``.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from gateway.config import SCHEDULING, load, load_pins
from gateway.fastpath import FastPath
from gateway.workers import apply_scheduling
from hsmgw.v1 import crypto_pb2 as pb
from router.model import Operation
from router.pkcs11 import load_module
from router.pkcs11._signer import Signer, sign_with
from router.placement.factory import make_store

SERVICE = "hsmgw.v1.CryptoService"


def _sessions(config_path: str, key_id: str, count: int) -> tuple[Any, queue.SimpleQueue[Any], Signer | None]:
    """The login session (keep it: closing it logs out), ``count`` sessions' key objects and the signer."""
    from pkcs11 import ObjectClass

    from gateway.perf.direct import _login, _token

    config = load(config_path)
    os.environ.update(config.pkcs11.env)
    store = make_store(config.store.url, config.base_dir)
    try:
        placement = store.get(key_id)
    finally:
        store.close()
    if placement is None:
        raise SystemExit(f"key {key_id!r} is not in the placement store")
    label = next(spec.token_label for spec in config.clusters if spec.name == placement.primary)
    module = load_module(config.pkcs11.module)
    token = _token(module.lib, label, module=module)
    login = _login(token, load_pins(config)[placement.primary].reveal())
    pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
    for _ in range(count):
        session = token.open(rw=True)
        pool.put(session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=key_id.encode()))
    return login, pool, module.signer


def _sign_handler(pool: queue.SimpleQueue[Any], signer: Signer | None) -> grpc.RpcMethodHandler:
    from gateway._convert import operation
    from router.pkcs11._keys import signature_mechanism

    def sign(request: pb.SignRequest, context: grpc.ServicerContext) -> pb.SignResponse:
        op: Operation = operation(request.algorithm)
        mechanism, param, data = signature_mechanism(op, request.digest)
        key = pool.get()
        try:
            signature = sign_with(signer, key, mechanism, param, data)  # as the gateway signs
        finally:
            pool.put(key)
        return pb.SignResponse(signature=signature, key_id=request.key_id)

    return grpc.unary_unary_rpc_method_handler(
        sign, request_deserializer=pb.SignRequest.FromString, response_serializer=pb.SignResponse.SerializeToString)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cpu", type=int, default=-1, help="pin to this CPU (-1: no pinning)")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--scheduling", choices=SCHEDULING, default="inherit",
                        help="as [server] scheduling (the bench passes the gateway's)")
    parser.add_argument("--no-fast-path", dest="fast_path", action="store_false",
                        help="serve Sign on grpcio's thread pool, as with [server] fast_path = false")
    parser.add_argument("--ready", required=True, help="file written once serving")
    args = parser.parse_args()
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    apply_scheduling(args.scheduling)
    login, pool, signer = _sessions(args.config, args.key, args.threads)
    server = grpc.server(ThreadPoolExecutor(max_workers=args.threads), options=[("grpc.so_reuseport", 1)])
    handler = _sign_handler(pool, signer)
    fast = FastPath.attach(server, {f"/{SERVICE}/Sign": handler}, [], threads=args.threads) if args.fast_path else None
    if fast is None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Sign": handler}),))
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    if fast is not None:
        fast.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    Path(args.ready).write_text("ready")
    stop.wait()
    server.stop(0).wait()
    if fast is not None:
        fast.stop()
    login.close()


if __name__ == "__main__":
    main()

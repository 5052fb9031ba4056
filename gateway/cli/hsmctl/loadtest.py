"""hsmctl loadtest: drive a gateway (or, with --direct, the PKCS #11 module) and measure it."""

from __future__ import annotations

import argparse
import sys
import uuid

from gateway import _convert as conv
from gateway.cli._common import fail
from gateway.cli.hsmctl._app import App
from hsmgw.v1 import crypto_pb2 as pb
from router.model import Operation

EXAMPLES = """Examples:
  hsmctl loadtest --op sign --create 4 --processes 2 --in-flight 8 --duration 10
  hsmctl loadtest --op sign --algorithm RSA_PKCS1_SHA256 --mode batch --batch-size 64
  hsmctl loadtest --op encrypt --keys payments/aes-1 --rate 500 --duration 60 --output json
  hsmctl loadtest --op sign --keys bench/ec --direct --config .hsmgw/hsmgw.toml   # the module alone

The report: throughput (operations per second; a batch of 64 is 64 operations),
p50/p95/p99/max latency per call, and failed operations by status. Exit status 1
when any operation failed. --direct runs the same operations, keys and concurrency
straight against the fleet's PKCS #11 module (no gateway): the baseline. Keys made
with --create stay (pass --cleanup to destroy them afterwards).
"""


def _create_keys(app: App, args: argparse.Namespace, algorithm: Operation) -> list[str]:
    from gateway.perf import KEY_FOR

    key_algorithm, usage = KEY_FOR[algorithm]
    run = uuid.uuid4().hex[:8]
    keys = []
    for i in range(args.create):
        key_id = f"{args.key_prefix}{run}-{i}"
        app.call(app.crypto.GenerateKey, pb.GenerateKeyRequest(
            request_id=f"loadtest-{run}-{i}", key_id=key_id,
            algorithm=conv.key_algorithm_pb(key_algorithm),
            usage=conv.key_usage_pb(usage),
        ))
        keys.append(key_id)
    return keys


def _loadtest(app: App, args: argparse.Namespace) -> int:
    from gateway.perf import DEFAULT_ALGORITHM, DirectTarget, GatewayTarget, RunError, Workload, WorkloadError, run

    try:
        algorithm = Operation(args.algorithm) if args.algorithm else DEFAULT_ALGORITHM[args.op]
    except ValueError:
        fail(f"unknown algorithm {args.algorithm!r}; one of {', '.join(o.value for o in Operation)}")
    if args.direct and not args.config:
        fail("--direct needs --config (the fleet's gateway TOML file: module, tokens, PINs, store)")
    keys = [k for k in args.keys.split(",") if k] if args.keys else []
    created: list[str] = []
    if not keys:
        created = keys = _create_keys(app, args, algorithm)
    workload = Workload(
        op=args.op, algorithm=algorithm, key_ids=tuple(keys), mode=args.mode, processes=args.processes,
        in_flight=args.in_flight, rate=args.rate, duration=args.duration, warmup=args.warmup,
        batch_size=args.batch_size, payload=args.payload, timeout=app.timeout,
    )
    driver: DirectTarget | GatewayTarget
    if args.direct:
        driver = DirectTarget(args.config)
    else:
        driver = GatewayTarget(args.target, ca=args.tls_ca or "", cert=args.tls_cert or "", key=args.tls_key or "",
                               metadata=tuple(app.metadata))
    label = ("direct PKCS #11: " if args.direct else "gateway: ") + workload.describe()
    try:
        report = run(workload.check(), driver, label=label,
                     progress=sys.stderr if sys.stderr.isatty() and app.output != "json" else None)
    except (WorkloadError, RunError) as exc:
        fail(str(exc))
    finally:
        if args.cleanup:
            for key_id in created:
                app.call(app.crypto.DestroyKey, pb.DestroyKeyRequest(key_id=key_id))
    app.emit(report.as_dict() | {"direct": bool(args.direct), "created_keys": created}, report.table())
    return 1 if report.error_count else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from gateway.perf import MODES, OPS

    p = sub.add_parser("loadtest", help="drive the gateway at a chosen load and report throughput and latency",
                       description=__doc__ + "\n\n" + EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=OPS, default="sign", help="operation (default: %(default)s)")
    p.add_argument("--algorithm", default="",
                   help="ECDSA_SHA256, ECDSA_SHA384, RSA_PKCS1_SHA256, RSA_PSS_SHA256, RSA_OAEP_SHA256, AES_GCM, "
                        "HMAC_SHA256 (default: ECDSA_SHA256 to sign/verify, AES_GCM to encrypt/decrypt)")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--keys", default="", help="comma-separated key ids to use (round robin)")
    keys.add_argument("--create", type=int, default=1, help="create this many keys first (default: %(default)s)")
    p.add_argument("--key-prefix", default="loadtest/", help="id prefix of created keys (default: %(default)s)")
    p.add_argument("--cleanup", action="store_true", help="destroy the created keys afterwards")
    p.add_argument("--mode", choices=MODES, default="unary",
                   help="unary calls, BatchSign batches or one SignStream per call in flight (default: unary)")
    p.add_argument("--batch-size", type=int, default=64, help="operations per BatchSign (default: %(default)s)")
    p.add_argument("--processes", type=int, default=1, help="client processes (default: %(default)s)")
    p.add_argument("--in-flight", type=int, default=4, help="calls in flight per process (default: %(default)s)")
    p.add_argument("--rate", type=float, default=0.0, help="target operations/s overall; 0: as fast as possible")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (default: %(default)s)")
    p.add_argument("--payload", type=int, default=32, help="bytes of message/plaintext/data (default: %(default)s)")
    p.add_argument("--direct", action="store_true", help="bypass the gateway: the PKCS #11 module itself")
    p.add_argument("--config", default="", help="with --direct: the gateway TOML file of the fleet")
    p.set_defaults(func=_loadtest)

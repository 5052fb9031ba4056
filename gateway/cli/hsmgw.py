"""``hsmgw``: run the gateway and manage the local fleet.

Examples:
  hsmgw fleet init --state-dir .hsmgw          # SoftHSM2 tokens, config, store
  hsmgw serve --config .hsmgw/hsmgw.toml       # serve until SIGTERM (SIGHUP reloads policy and TLS)
  hsmgw serve --config .hsmgw/hsmgw.toml --workers 2   # N processes on one port (default: one per core)
  hsmgw bench --duration 5                     # gateway vs direct PKCS #11; writes docs/performance.md
  hsmgw dev certs --out .hsmgw/tls --client payments-app   # local CA, server and client certificates
  hsmgw store init --url 'dynamodb://hsmgw-placements?region=us-east-1'
  hsmgw store migrate --from sqlite:.hsmgw/placements.db \
      --to 'dynamodb://hsmgw-placements?region=us-east-1'
  hsmgw discover --cluster-id cluster-1234abcd --region us-east-1   # CloudHSM HSMs, AZs, best-practice warnings
  hsmgw alarms install --config hsmgw.toml     # CloudWatch alarms: key/session limits, health, replicas
  hsmgw alarms check --config hsmgw.toml       # are they still as install makes them? (exit 1 if not)

Logs are JSON lines unless the stream is a terminal (--log-format or HSMGW_LOG_FORMAT
choose); `serve` logs to stdout, the other commands to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.cli._common import at_least_one, fail, setup_logging
from gateway.config import ConfigError

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.server import Gateway
    from router.placement import PlacementStore

log = logging.getLogger("hsmgw")


def _fleet_init(args: argparse.Namespace) -> None:
    from gateway.fleet import FleetError, init_fleet

    try:
        fleet = init_fleet(Path(args.state_dir), force=args.force, listen=args.listen or "127.0.0.1:50051")
    except FleetError as exc:
        fail(str(exc))
    if fleet.created:
        for item in fleet.created:
            print(f"created {item}")
    else:
        print(f"fleet in {fleet.state_dir} is already set up; nothing changed")
    if args.listen and str(fleet.config_path) not in fleet.created:
        from gateway.config import load

        kept = load(fleet.config_path).server.listen
        if kept != args.listen:
            print(f"note: the existing config keeps listen = {kept!r}; edit [server] listen there, or serve with "
                  f"--listen {args.listen}", file=sys.stderr)
    print(f"config: {fleet.config_path}")


def _serve(args: argparse.Namespace) -> None:
    # A reload (SIGHUP, `systemctl reload`) before the gateway serves would end the process:
    # ignore it until serve() (or the supervisor) takes it over. The workers the supervisor
    # starts inherit this, so one that is starting (or restarting) is not killed either; the
    # configuration they read as they start is the current one anyway.
    import signal

    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from gateway import config as config_mod
    from gateway.logs import HANDSHAKES_GRPC_VERBOSITY, QUIET_GRPC_VERBOSITY, capture_unraisable, quiet_grpc_core

    try:  # before grpc is first imported, which reads it; a bad file is reported below
        serves_tls = config_mod.load(args.config).server.tls is not None
    except ConfigError:
        serves_tls = False
    quiet_grpc_core(level=HANDSHAKES_GRPC_VERBOSITY if serves_tls else QUIET_GRPC_VERBOSITY)
    from gateway.server import serve
    from gateway.workers import EXIT_CONFIG, Supervisor, WorkerError, worker_metrics_listen

    capture_unraisable()  # a finalizer's error is one log line, not a traceback in the JSON stream

    try:
        config = config_mod.load(args.config)
        if args.listen:
            config_mod.check_address(args.listen)
            config = dataclasses.replace(config, server=dataclasses.replace(config.server, listen=args.listen))
        if args.worker_index is not None:
            listen = worker_metrics_listen(config.metrics.listen, args.worker_index)
            config = dataclasses.replace(config, metrics=dataclasses.replace(config.metrics, listen=listen))
        config_mod.check_security(config)
        # Fail before the HSM pools open: a bad policy or TLS file is the commonest mistake.
        if config.auth.policy_file is not None:
            from gateway.auth import load_policy

            load_policy(config.auth.policy_file)
        if config.server.tls is not None:
            from gateway.tls import load_material

            load_material(config.server.tls)
        # Every admin change is audited: a gateway that cannot write its audit log takes none.
        from gateway.audit import AuditLog, AuditLogError

        try:
            AuditLog(config.base_dir / config.admin.audit_log).check()
        except AuditLogError as exc:
            raise ConfigError(f"admin.audit_log: {exc}") from None
    except ConfigError as exc:  # the file, named once; restarting does not help (EX_CONFIG)
        fail(str(exc) if str(args.config) in str(exc) else f"{args.config}: {exc}", code=EXIT_CONFIG)
    if args.port_file:  # written once the gateway serves: too late to find it cannot be
        problem = _port_file_problem(Path(args.port_file))
        if problem:
            fail(f"--port-file: {problem}", code=EXIT_CONFIG)
    if args.workers > 1:
        # The supervisor never opens the PKCS #11 module: each worker does, after it starts.
        flags = ("--log-format", args.log_format, *(("-v",) if args.verbose else ()))
        try:
            supervisor = Supervisor(args.config, config, args.workers, grace=args.grace, port_file=args.port_file,
                                    cli_flags=flags)
            raise SystemExit(supervisor.run())
        except WorkerError as exc:
            fail(str(exc))
    try:
        gateway = _start(args, config)
    except KeyboardInterrupt:
        # Ctrl-C while one process logs in and reconciles (a worker leaves SIGINT to its supervisor
        # until it serves): nothing serves yet, and what a start-up reconcile did is in the store
        # and the audit log. The threads a half-built router started are not waited for.
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C: this is the way out already
        log.warning("signal SIGINT while starting: stopped before serving")
        logging.shutdown()
        os._exit(0)
    serve(gateway, grace=args.grace, port_file=args.port_file, heartbeat=args.worker_index is not None)


def _start(args: argparse.Namespace, config: GatewayConfig) -> Gateway:
    """The gateway of ``hsmgw serve``'s process, logged in and reconciled, not yet serving."""
    from gateway.app import build_router, start_reconcile
    from gateway.server import Gateway
    from gateway.sharedlimits import SharedLimiter, SharedLimitsError
    from gateway.workers import EXIT_CONFIG, WorkerError, apply_scheduling, start_progress

    if args.worker_index is None:  # one process: is the port free, before the HSM pools open?
        from gateway.workers import reserve_port

        try:
            reserve_port(config.server.host, config.server.port).close()
        except WorkerError as exc:
            fail(str(exc))
    from router.pkcs11 import LoginRefused
    from router.placement import StoreError

    apply_scheduling(config.server.scheduling)  # before the pools and the server start their threads
    # A worker's supervisor kills one whose start shows no progress for a while (gateway.workers).
    progress = start_progress(args.progress_file)
    try:
        router = build_router(config, reconcile_at_start=False)
        progress()
        # Workers share one store and one fleet: the first one reconciles for all.
        first_reconcile = None if args.worker_index else start_reconcile(router, progress)
    except (ConfigError, LoginRefused) as exc:  # a refused PIN tried again and again locks the user out
        fail(str(exc), code=EXIT_CONFIG)
    except StoreError as exc:  # unreachable or throttled: it may answer when the gateway is started again
        fail(f"store.url: {exc}")
    except (RuntimeError, FileNotFoundError) as exc:
        fail(str(exc))
    try:
        limiter = None
        if args.limits_fd is not None and args.worker_index is not None:
            try:
                limiter = SharedLimiter(args.limits_fd, args.worker_index)  # on an open file of its own
            except SharedLimitsError as exc:  # serve, with limits that hold per worker, rather than not at all
                logging.getLogger("gateway.sharedlimits").error(
                    "%s; this worker keeps per-identity limits of its own: an identity may get more than its "
                    "limits across the gateway's workers", exc)
            try:
                os.close(args.limits_fd)  # the inherited descriptor: nothing this process starts gets it
            except OSError:
                pass
        # The report of the start-up reconcile names every finding (a million keys missing on a
        # token they were never made on is a few hundred MB): the gateway keeps its counts, and
        # the report goes with this frame.
        return Gateway(config, router, reuse_port=args.worker_index is not None,
                       reconciles=not args.worker_index, first_reconcile=first_reconcile, limiter=limiter)
    except (ConfigError, OSError) as exc:
        router.close()
        fail(str(exc))
    except RuntimeError as exc:  # grpc could not bind: the port was taken since the check above
        router.close()
        fail(f"server.listen: cannot listen on {config.server.listen}: {exc}")


def _port_file_problem(path: Path) -> str:
    """Why the port file cannot be written at ``path`` (through a temporary file beside it); "" if it can."""
    directory = path.absolute().parent
    if not directory.exists():
        return f"cannot write {path}: the directory {directory} does not exist"
    if not directory.is_dir():
        return f"cannot write {path}: {directory} is not a directory"
    if path.is_dir():
        return f"cannot write {path}: it is a directory"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"cannot write {path}: no permission to create files in {directory}"
    return ""


def _bench(args: argparse.Namespace) -> None:
    from gateway.perf.bench import BenchError, run_bench

    try:
        run_bench(args)
    except BenchError as exc:
        fail(str(exc))


def _open_store(url: str, *, must_exist: bool = False) -> PlacementStore:
    from router.placement import StoreError
    from router.placement.factory import make_store, sqlite_path

    try:
        # Opening a SQLite URL creates the file: a typo must not become an empty source.
        if must_exist and url.startswith("sqlite:") and not sqlite_path(url, Path.cwd()).is_file():
            fail(f"{url}: no such placement store file ({sqlite_path(url, Path.cwd())})")
        return make_store(url, Path.cwd())
    except (ValueError, StoreError) as exc:
        fail(str(exc))


def _store_init(args: argparse.Namespace) -> None:
    from router.placement import StoreError
    from router.placement.dynamodb import DynamoStore

    store = _open_store(args.url)
    try:
        if isinstance(store, DynamoStore):
            created = store.create_table()
            print(f"table {store.table} {'created' if created else 'already exists'} in {store.region}")
        else:
            store.change_counter()  # opening a SQLite store creates its schema
            print(f"store {args.url} ready")
    except StoreError as exc:
        fail(str(exc))
    finally:
        store.close()


def _store_migrate(args: argparse.Namespace) -> None:
    import json

    from router.placement import StoreError
    from router.placement.factory import FAILURES_IN_A_ROW, CopyReport, copy_placements, sqlite_path

    def where(url: str) -> str:
        return str(sqlite_path(url, Path.cwd()).resolve()) if url.startswith("sqlite:") else url

    if where(args.source) == where(args.dest):
        fail(f"--from and --to name the same store ({args.dest}): nothing to copy")
    source = _open_store(args.source, must_exist=True)
    report = CopyReport()
    foreign: list[str] = []
    try:
        dest = _open_store(args.dest)
        try:
            # The fleet id goes first: the tokens' fleet markers name it, and a gateway on the
            # destination must find its id there, or its reconcile destroys nothing on them.
            # Only read from the source: a migration writes nothing there (its role may only read).
            fleet = source.existing_fleet_id()
            if fleet is None:
                # No token's fleet marker names a store without one: the destination's id serves.
                fleet_from = "new" if dest.existing_fleet_id() is None else "destination"
                fleet = dest.fleet_id()
            else:
                fleet_from = "source"
                took = dest.fleet_id(fleet)
                if took != fleet:
                    fail(f"{args.dest} belongs to fleet {took} and {args.source} to fleet {fleet}: the destination "
                         "is another fleet's placement store (a shared or wrong table), and a fleet's keys belong "
                         "with its own store; nothing was copied. Name an empty store, or this fleet's own")
            copy_placements(source, dest, report)
            # Records the destination holds that the source does not: another fleet's (a shared or
            # wrong table), or keys made there since a switch-over. Left alone, and named.
            known = {p.key_id for p in source.scan()}
            foreign = [p.key_id for p in dest.scan() if p.key_id not in known]
        except StoreError as exc:
            if len(report.failed) < FAILURES_IN_A_ROW:  # the source failed, not the destination
                fail(f"{exc}; copied {len(report.copied)} before that: run the same command again once it answers "
                     "(what is there is skipped)")
            fail(f"{exc}; stopped after {FAILURES_IN_A_ROW} records in a row failed, having copied "
                 f"{len(report.copied)} and found {len(report.identical)} already there: the destination is "
                 "incomplete; run the same command again once it answers (what is there is skipped)")
        finally:
            dest.close()
    finally:
        source.close()
    counts = {name: len(getattr(report, name)) for name in ("copied", "identical", "differing", "failed")}
    if args.output == "json":
        print(json.dumps({**counts, "fleet_id": fleet, "fleet_id_from": fleet_from,
                          "differing_keys": report.differing,
                          "failed_records": [{"record": name, "error": why} for name, why in report.failed],
                          "not_in_source": len(foreign), "not_in_source_keys": foreign[:20]}))
    else:
        for key_id in report.differing:
            print(f"differs: {key_id} (destination left unchanged)")
        for name, why in report.failed:
            print(f"not copied: {name}: {why}")
        print(f"fleet id {fleet} " + {
            "source": "(the tokens' fleet markers name it)",
            "destination": "(the source has none: the destination keeps its own)",
            "new": "(the source has none: the destination was given a new one)",
        }[fleet_from])
        print(f"copied {counts['copied']}, identical {counts['identical']} (skipped), differing {counts['differing']}, "
              f"failed {counts['failed']}")
        if foreign:
            shown = ", ".join(repr(k) for k in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                                                else "")
            print(f"note: the destination also holds {len(foreign)} key record(s) the source does not ({shown}), "
                  "left as they are: keys made there since the switch-over, or another fleet's if the table is "
                  "shared (a gateway on it would take them for its own)")
    if report.failed:
        fail(f"{len(report.failed)} records were not copied: the destination is incomplete; fix what each says, "
             "then run the same command again (what is there is skipped)")
    if report.differing:
        fail(f"{len(report.differing)} records differ between {args.source} and {args.dest}; resolve them by hand")


def main(argv: list[str] | None = None) -> None:
    from gateway.cpus import default_workers
    from gateway.logs import quiet_grpc_core

    parser = argparse.ArgumentParser(
        prog="hsmgw", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--log-format", choices=("auto", "json", "human"), default="auto",
                        help="auto: human on a terminal, else JSON lines (default; HSMGW_LOG_FORMAT overrides)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="gateway TOML file")
    serve.add_argument("--grace", type=float, default=5.0, help="seconds to finish requests on SIGTERM")
    serve.add_argument("--port-file", help="write the bound port here once serving (for listen port 0)")
    serve.add_argument("--workers", type=at_least_one, default=default_workers(),
                       help="server processes sharing the port (SO_REUSEPORT); default: one per core (%(default)s)")
    serve.add_argument("--listen", help="host:port to serve on, instead of the config's server.listen")
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by the supervisor for its workers
    serve.add_argument("--limits-fd", type=int, help=argparse.SUPPRESS)  # the supervisor's, shared by its workers
    serve.add_argument("--progress-file", help=argparse.SUPPRESS)  # touched as a worker's start moves on
    serve.set_defaults(func=_serve)

    bench = sub.add_parser("bench", help="measure the gateway against direct PKCS #11 (writes docs/performance.md)",
                           description="On a throw-away SoftHSM2 fleet, runs a gateway (--workers 2) and measures "
                                       "side by side: direct python-pkcs11, the gateway driven by h2load, BatchSign "
                                       "and unary from Python clients, a p11-kit peer forwarder, the floor (bare "
                                       "Python gRPC doing only the HSM call) and direct signing through the "
                                       "gateway's binding; then the "
                                       "latency added at concurrency 1 and the routing cost with 1,000,000 "
                                       "placements.\n\nExample: hsmgw bench --duration 5",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default: %(default)s)")
    bench.add_argument("--workers", type=at_least_one, default=2, help="gateway worker processes (default: 2)")
    bench.add_argument("--rounds", type=at_least_one, default=3,
                       help="paired rounds of direct, h2load, BatchSign and floor per algorithm; each ratio is "
                            "the median of the rounds' (default: %(default)s)")
    bench.add_argument("--only", default="", help="comma-separated subset of: ecdsa, rsa, latency, routing")
    bench.add_argument("--placements", type=int, default=1_000_000,
                       help="placements for the routing-cost run (default: %(default)s; 0 skips it)")
    bench.add_argument("--markdown", default="docs/performance.md", help="report to update ('' for none)")
    bench.add_argument(
        "--json", dest="json_path", default="docs/performance.json", help="results as JSON ('' for none)"
    )
    bench.set_defaults(func=_bench)

    fleet = sub.add_parser("fleet", help="the local SoftHSM2 fleet")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True)
    init = fleet_sub.add_parser("init", help="create tokens, PINs, config and store (idempotent)")
    init.add_argument("--state-dir", default=".hsmgw", help="where the fleet lives (default: .hsmgw)")
    init.add_argument("--force", action="store_true", help="rebuild from scratch, destroying every key")
    init.add_argument("--listen", help="address written into a new config (default: 127.0.0.1:50051)")
    init.set_defaults(func=_fleet_init)

    store = sub.add_parser("store", help="the placement store")
    store_sub = store.add_subparsers(dest="store_command", required=True)
    store_init = store_sub.add_parser("init", help="create the store (a DynamoDB table: on-demand) if missing")
    store_init.add_argument("--url", required=True, help="sqlite:PATH or dynamodb://TABLE?region=R[&endpoint=URL]")
    store_init.set_defaults(func=_store_init)
    migrate = store_sub.add_parser("migrate", help="copy every placement into another store (idempotent)")
    migrate.add_argument("--from", dest="source", required=True, help="source store URL (sqlite:PATH, dynamodb://…)")
    migrate.add_argument("--to", dest="dest", required=True, help="destination store URL")
    migrate.add_argument("--output", choices=("text", "json"), default="text")
    migrate.set_defaults(func=_store_migrate)

    from gateway.cli import dev_certs

    dev = sub.add_parser("dev", help="development helpers")
    dev_certs.add_parser(dev.add_subparsers(dest="dev_command", required=True))

    from gateway.cli import alarms, discover

    discover.add_parser(sub)
    alarms.add_parser(sub)

    args = parser.parse_args(argv)
    if args.command != "serve":  # which reads its configuration first (``_serve``)
        quiet_grpc_core()  # before grpc is first imported, which reads it
    try:
        setup_logging(args.verbose, fmt=args.log_format, stream=sys.stdout if args.command == "serve" else None)
    except ValueError as exc:  # a bad HSMGW_LOG_FORMAT
        fail(str(exc))
    args.func(args)


if __name__ == "__main__":
    main()

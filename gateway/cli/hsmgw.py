"""``hsmgw``: run the gateway and manage the local fleet.

Examples:
  hsmgw fleet init --state-dir .hsmgw          # SoftHSM2 tokens, config, store
  hsmgw serve --config .hsmgw/hsmgw.toml       # serve until SIGTERM
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gateway.cli._common import fail, setup_logging
from gateway.config import ConfigError

log = logging.getLogger("hsmgw")


def _fleet_init(args: argparse.Namespace) -> None:
    from gateway.fleet import FleetError, init_fleet

    try:
        fleet = init_fleet(Path(args.state_dir), force=args.force, listen=args.listen)
    except FleetError as exc:
        fail(str(exc))
    if fleet.created:
        for item in fleet.created:
            print(f"created {item}")
    else:
        print(f"fleet in {fleet.state_dir} is already set up; nothing changed")
    print(f"config: {fleet.config_path}")


def _serve(args: argparse.Namespace) -> None:
    from gateway import config as config_mod
    from gateway.app import build_router
    from gateway.server import Gateway, serve

    try:
        config = config_mod.load(args.config)
        config_mod.check_listen(config.server)
    except ConfigError as exc:
        fail(f"{args.config}: {exc}")
    try:
        router = build_router(config)
    except (ConfigError, RuntimeError, FileNotFoundError) as exc:
        fail(str(exc))
    try:
        gateway = Gateway(config, router)
    except (ConfigError, OSError) as exc:
        router.close()
        fail(str(exc))
    serve(gateway, grace=args.grace, port_file=args.port_file)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hsmgw", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="gateway TOML file")
    serve.add_argument("--grace", type=float, default=5.0, help="seconds to finish requests on SIGTERM")
    serve.add_argument("--port-file", help="write the bound port here once serving (for listen port 0)")
    serve.set_defaults(func=_serve)

    fleet = sub.add_parser("fleet", help="the local SoftHSM2 fleet")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True)
    init = fleet_sub.add_parser("init", help="create tokens, PINs, config and store (idempotent)")
    init.add_argument("--state-dir", default=".hsmgw", help="where the fleet lives (default: .hsmgw)")
    init.add_argument("--force", action="store_true", help="rebuild from scratch, destroying every key")
    init.add_argument("--listen", default="127.0.0.1:50051", help="address written into the config")
    init.set_defaults(func=_fleet_init)

    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    args.func(args)


if __name__ == "__main__":
    main()

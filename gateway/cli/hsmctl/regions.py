"""hsmctl regions failover R | failback R"""

from __future__ import annotations

import argparse

from gateway.cli.hsmctl._app import App
from gateway.cli.hsmctl.clusters import switch_change
from hsmgw.v1 import admin_pb2 as apb


def _switch(app: App, args: argparse.Namespace) -> int:
    change = app.call(app.admin.FailoverRegion, apb.FailoverRegionRequest(region=args.region, failover=args.failover,
                                                                          force=getattr(args, "force", False)))
    return switch_change(app, change)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    regions = sub.add_parser("regions", help="move traffic away from a region and back")
    rsub = regions.add_subparsers(dest="regions_command", required=True, metavar="ACTION")
    over = rsub.add_parser(
        "failover",
        help="serve from other regions' replicas (quorum)",
        description="Example: hsmctl regions failover us-east-1",
    )
    over.add_argument("region")
    over.add_argument("--force", action="store_true",
                      help="fail it over even if new keys can then not be placed under the replication policy")
    over.set_defaults(func=_switch, failover=True)
    back = rsub.add_parser(
        "failback",
        help="serve from the region again (quorum)",
        description="Example: hsmctl regions failback us-east-1",
    )
    back.add_argument("region")
    back.set_defaults(func=_switch, failover=False)

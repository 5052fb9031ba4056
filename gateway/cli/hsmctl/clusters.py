"""hsmctl status | clusters [drain C | undrain C]"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gateway.cli._common import plural
from gateway.cli.hsmctl._app import DEGRADED, DOWN, App
from hsmgw.v1 import admin_pb2 as apb


def _rows(clusters: Any) -> list[list[Any]]:
    return [
        [
            c.name,
            c.region,
            c.health,
            c.circuit,
            f"{c.keys}/{c.max_keys}",
            f"{c.sessions_in_use}/{c.sessions_open}/{c.pool_size}",
            f"{c.ops_per_second:.1f}",
            f"{100 * c.error_rate:.1f}%",
            _note(c),
        ]
        for c in clusters
    ]


def _note(c: Any) -> str:
    notes = ["drained" if c.draining else ("failed-over" if c.region_failed_over else "")]
    if c.calls_hung:
        notes.append(f"{plural(c.calls_hung, 'call')} hung")
    return ", ".join(n for n in notes if n)


HEADER = ["CLUSTER", "REGION", "HEALTH", "CIRCUIT", "KEYS", "SESSIONS(use/open/size)", "OPS/S", "ERRORS", "NOTE"]


def _list(app: App, args: argparse.Namespace) -> int:
    resp = app.call(app.admin.ListClusters, apb.ListClustersRequest())
    app.emit(
        app.as_dict(resp) | {"clusters": [app.as_dict(c) for c in resp.clusters]},
        app.table(_rows(resp.clusters), HEADER),
    )
    return 0


def _drain(app: App, args: argparse.Namespace) -> int:
    change = app.call(app.admin.DrainCluster, apb.DrainClusterRequest(cluster=args.cluster, drain=args.drain,
                                                                      force=getattr(args, "force", False)))
    return switch_change(app, change)


def switch_change(app: App, change: apb.Change) -> int:
    """``app.change``, and on stderr what a forced drain or failover does to new keys."""
    code = app.change(change)
    if change.state == "pending" and change.params.get("consequence"):
        print(f"warning: once approved, {change.params['consequence']}", file=sys.stderr)
    return code


def _status(app: App, args: argparse.Namespace) -> int:
    resp = app.call(app.admin.GetStatus, apb.GetStatusRequest())
    lines = [
        app.table(_rows(resp.clusters), HEADER),
        "",
        f"keys: {resp.keys}   under-replicated: {resp.under_replicated_keys}   pending changes: {resp.pending_changes}",
    ]
    lines += [f"WARNING: {w}" for w in resp.warnings] or ["no warnings"]
    app.emit(app.as_dict(resp), "\n".join(lines))
    if any(c.health != "SERVING" for c in resp.clusters):
        return DOWN
    return DEGRADED if resp.warnings else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser(
        "status",
        help=f"one-screen summary with warnings (exit 0 all well, {DEGRADED} warnings, {DOWN} a cluster down)",
        description="Clusters, key counts and warnings: clusters near their key limit, "
        "a DR region without healthy capacity, under-replicated keys, drained clusters, failed-over "
        "regions, changes waiting for approval.\n\n"
        f"Exit status: 0 no warnings; {DEGRADED} degraded: warnings, every cluster serving; {DOWN} down: a "
        "cluster is not serving (circuit open or half-open); 1 and 2 as for every hsmctl command (refused "
        "or a usage error; the gateway could not be reached).\n\n"
        "Example: hsmctl status --output json",
    )
    status.set_defaults(func=_status)
    clusters = sub.add_parser(
        "clusters",
        help="health, circuit, keys/limit, sessions, ops/s, errors per cluster",
        description="Sessions, ops/s and errors are those of the gateway process that answers (with "
                    "--workers N, one worker's; the hsmgw_pool_* and request metrics give every worker's).\n\n"
                    "Example: hsmctl clusters; hsmctl clusters drain use1-a",
    )
    clusters.set_defaults(func=_list)
    csub = clusters.add_subparsers(dest="clusters_command", metavar="ACTION")
    drain = csub.add_parser(
        "drain",
        help="stop placing keys on a cluster and move traffic to replicas (quorum)",
        description="Example: hsmctl clusters drain use1-a",
    )
    drain.add_argument("cluster")
    drain.add_argument("--force", action="store_true",
                       help="drain it even if new keys can then not be placed under the replication policy "
                       "(the only DR cluster, the last cluster): to evacuate a failing cluster")
    drain.set_defaults(func=_drain, drain=True)
    undrain = csub.add_parser(
        "undrain",
        help="put a drained cluster back in service (quorum)",
        description="Example: hsmctl clusters undrain use1-a",
    )
    undrain.add_argument("cluster")
    undrain.set_defaults(func=_drain, drain=False)

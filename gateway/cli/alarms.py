"""``hsmgw alarms install``: the CloudWatch alarms for a gateway's clusters (idempotent).

Examples:
  hsmgw alarms install --config hsmgw.toml --alarm-action arn:aws:sns:us-east-1:123456789012:hsm-oncall
  hsmgw alarms install --config hsmgw.toml --cloudhsm use1-a=cluster-1234abcd   # plus AWS/CloudHSM alarms

Alarms on the gateway's metrics go to the region it publishes to
(``[cloudwatch] region``, default the home region); alarms on a CloudHSM
cluster's own metrics go to that cluster's region. Re-run after an HSM is
replaced: the per-HSM alarms name HSM ids.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gateway.cli._common import fail


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    alarms = sub.add_parser("alarms", help="CloudWatch alarms")
    alarms_sub = alarms.add_subparsers(dest="alarms_command", required=True)
    install = alarms_sub.add_parser(
        "install", help="create or update the recommended alarms", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    install.add_argument("--config", type=Path, required=True, help="gateway TOML file (clusters, [cloudwatch])")
    install.add_argument("--region", help="region of the gateway alarms (default: [cloudwatch] region or home region)")
    install.add_argument("--endpoint-url", help="CloudWatch (and cloudhsmv2) endpoint (default: [cloudwatch])")
    install.add_argument("--namespace", help="namespace the gateways publish to (default: [cloudwatch] namespace)")
    install.add_argument("--prefix", default="hsmgw", help="alarm name prefix (default: hsmgw)")
    install.add_argument("--alarm-action", action="append", default=[], metavar="ARN",
                         help="SNS topic (or other action) notified on ALARM and OK; repeatable")
    install.add_argument("--cloudhsm", action="append", default=[], metavar="NAME=CLUSTER_ID",
                         help="also alarm on the AWS/CloudHSM metrics of the cluster behind NAME; repeatable")
    install.add_argument("--threshold", type=float, default=80.0, help="percent for the limit alarms (default: 80)")
    install.add_argument("--output", choices=("text", "json"), default="text")
    install.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

    from gateway import config as config_mod
    from gateway.cloudwatch import CloudHsmTarget, alarm_specs, install_alarms, make_client
    from gateway.discover import DiscoveryError, discover

    try:
        config = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        fail(f"{args.config}: {exc}")
    if not 0 < args.threshold <= 100:
        fail("--threshold: expected a percentage in (0, 100]")
    region = args.region or config.cloudwatch.region or config.home_region
    endpoint = args.endpoint_url or config.cloudwatch.endpoint_url or None
    namespace = args.namespace or config.cloudwatch.namespace
    regions_of = {c.name: c.region for c in config.clusters}

    targets: list[tuple[str, CloudHsmTarget]] = []
    for item in args.cloudhsm:
        name, sep, cluster_id = item.partition("=")
        if not sep or not name or not cluster_id:
            fail(f"--cloudhsm {item!r}: expected NAME=CLUSTER_ID")
        if name not in regions_of:
            fail(f"--cloudhsm {item!r}: no cluster named {name!r} in {args.config}")
        try:
            found = discover(cluster_id, regions_of[name], endpoint)
        except DiscoveryError as exc:
            fail(str(exc))
        targets.append((regions_of[name], CloudHsmTarget(name, cluster_id, tuple(h.hsm_id for h in found.hsms))))

    plan: dict[str, list[dict[str, Any]]] = {
        region: alarm_specs([(c.name, c.region) for c in config.clusters], [config.home_region],
                            namespace=namespace, prefix=args.prefix, actions=args.alarm_action,
                            threshold_percent=args.threshold),
    }
    for target_region, target in targets:
        plan.setdefault(target_region, []).extend(
            alarm_specs([], [], prefix=args.prefix, actions=args.alarm_action, cloudhsm=[target],
                        threshold_percent=args.threshold)
        )
    installed: list[dict[str, str]] = []
    for alarm_region, specs in plan.items():
        try:
            names = install_alarms(make_client("cloudwatch", alarm_region, endpoint), specs)
        except (BotoCoreError, ClientError) as exc:
            fail(f"installing alarms in {alarm_region} failed: {exc}")
        installed += [{"name": name, "region": alarm_region} for name in names]
    if args.output == "json":
        print(json.dumps({"alarms": installed}, indent=2))
        return
    for alarm in installed:
        print(f"alarm {alarm['name']} ({alarm['region']})")
    print(f"{len(installed)} alarms created or updated")

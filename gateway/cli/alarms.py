"""``hsmgw alarms install``: the CloudWatch alarms for a gateway's clusters (idempotent);
``hsmgw alarms check``: whether the installed ones are still those (read-only).

Examples:
  hsmgw alarms install --config hsmgw.toml --alarm-action arn:aws:sns:us-east-1:123456789012:hsm-oncall
  hsmgw alarms install --config hsmgw.toml --cloudhsm use1-a=cluster-1234abcd   # plus AWS/CloudHSM alarms
  hsmgw alarms check --config hsmgw.toml --cloudhsm use1-a=cluster-1234abcd     # exit 1 if any is missing or stale

Alarms on the gateway's metrics go to the region it publishes to
(``[cloudwatch] region``, default the home region); alarms on a CloudHSM
cluster's own metrics go to that cluster's region. The per-HSM alarms name HSM
ids: after AWS replaces an HSM they watch one that is gone. ``check``, with the
arguments ``install`` was given, finds that (and any alarm changed or deleted by
hand); run it from a timer, and ``install`` again when it fails. It exits 1 when
an alarm is missing or differs, or when the config or an argument's value is refused
(a cluster id CloudHSM does not know); 2 when it could not run: the command line
does not parse, or CloudWatch or CloudHSM cannot be read.
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
    check = alarms_sub.add_parser(
        "check", help="whether the installed alarms are those install would make now (exit 1 if not)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for parser in (install, check):
        parser.add_argument("--config", type=Path, required=True, help="gateway TOML file (clusters, [cloudwatch])")
        parser.add_argument("--region",
                            help="region of the gateway alarms (default: [cloudwatch] region or home region)")
        parser.add_argument("--endpoint-url",
                            help="one endpoint for CloudWatch and CloudHSM's API both (a local mock); default: "
                                 "[cloudwatch] endpoint_url for CloudWatch, the region's own for CloudHSM")
        parser.add_argument("--namespace", help="namespace the gateways publish to (default: [cloudwatch] namespace)")
        parser.add_argument("--prefix", default="hsmgw", help="alarm name prefix (default: hsmgw)")
        parser.add_argument("--alarm-action", action="append", default=[], metavar="ARN",
                            help="SNS topic (or other action) notified on ALARM and OK; repeatable")
        parser.add_argument("--cloudhsm", action="append", default=[], metavar="NAME=CLUSTER_ID",
                            help="also alarm on the AWS/CloudHSM metrics of the cluster behind NAME; repeatable")
        parser.add_argument("--threshold", type=float, default=80.0,
                            help="percent for the limit alarms (default: 80)")
        parser.add_argument("--output", choices=("text", "json"), default="text")
    install.set_defaults(func=run)
    check.set_defaults(func=run_check)


def _plan(args: argparse.Namespace) -> tuple[dict[str, list[dict[str, Any]]], str | None]:
    """The alarms install makes, by the region they go to; and the endpoint to reach it."""
    from gateway import config as config_mod
    from gateway.cloudwatch import CloudHsmTarget, alarm_specs
    from gateway.discover import DiscoveryError, DiscoveryUnavailable, discover

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
            # [cloudwatch] endpoint_url is CloudWatch's alone; --endpoint-url serves both (a mock).
            found = discover(cluster_id, regions_of[name], args.endpoint_url or None)
        except DiscoveryError as exc:  # a check that could not ask CloudHSM has found nothing (2)
            checking = args.alarms_command == "check"
            fail(str(exc), code=2 if checking and isinstance(exc, DiscoveryUnavailable) else 1)
        targets.append((regions_of[name], CloudHsmTarget(name, cluster_id, tuple(h.hsm_id for h in found.hsms))))

    plan: dict[str, list[dict[str, Any]]] = {
        region: alarm_specs([(c.name, c.region) for c in config.clusters], [config.home_region],
                            namespace=namespace, prefix=args.prefix, actions=args.alarm_action,
                            threshold_percent=args.threshold, tls=config.server.tls is not None),
    }
    for target_region, target in targets:
        plan.setdefault(target_region, []).extend(
            alarm_specs([], [], prefix=args.prefix, actions=args.alarm_action, cloudhsm=[target],
                        threshold_percent=args.threshold)
        )
    return plan, endpoint


def run(args: argparse.Namespace) -> None:
    from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

    from gateway.cloudwatch import install_alarms, make_client

    plan, endpoint = _plan(args)
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


def run_check(args: argparse.Namespace) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    from gateway.cloudwatch import alarm_drift, installed_alarms, make_client

    plan, endpoint = _plan(args)
    report: list[dict[str, Any]] = []
    for alarm_region, specs in plan.items():
        try:
            found = installed_alarms(make_client("cloudwatch", alarm_region, endpoint),
                                     [str(spec["AlarmName"]) for spec in specs])
        except (BotoCoreError, ClientError) as exc:  # 2: not known to be stale, but not checked
            fail(f"reading the alarms in {alarm_region} failed: {exc}", code=2)
        for spec in specs:
            name = str(spec["AlarmName"])
            alarm = found.get(name)
            differs = [] if alarm is None else alarm_drift(spec, alarm)
            state = "missing" if alarm is None else "differs" if differs else "ok"
            report.append({"name": name, "region": alarm_region, "state": state, "differs": differs})
    stale = [entry for entry in report if entry["state"] != "ok"]
    if args.output == "json":
        print(json.dumps({"alarms": report, "stale": len(stale)}, indent=2))
    else:
        for entry in report:
            detail = f": {', '.join(entry['differs'])}" if entry["differs"] else ""
            print(f"{entry['state']:8} {entry['name']} ({entry['region']}){detail}")
        print(f"{len(report) - len(stale)} of {len(report)} alarms as install makes them"
              + (f"; {len(stale)} missing or out of date: run `hsmgw alarms install` with the same arguments"
                 if stale else ""))
    if stale:
        raise SystemExit(1)

"""``hsmgw discover``: describe a CloudHSM cluster, warn where it falls short, check the config.

Examples:
  hsmgw discover --cluster-id cluster-1234abcd --region us-east-1
  hsmgw discover --cluster-id cluster-1234abcd --config hsmgw.toml --name use1-c --write
  hsmgw discover --cluster-id cluster-1234abcd --output json --strict   # exit 1 on any warning
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gateway.cli._common import fail


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "discover", help="describe a CloudHSM cluster and check it against CloudHSM's best practices",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cluster-id", required=True, help="CloudHSM cluster id (cluster-…)")
    parser.add_argument("--region", help="AWS region of the cluster (default: the AWS SDK's, e.g. AWS_REGION)")
    parser.add_argument("--endpoint-url", help="cloudhsmv2 endpoint (a VPC endpoint or a local mock)")
    parser.add_argument("--config", type=Path, help="gateway TOML file whose [[clusters]] entry to check")
    parser.add_argument("--name", help="the cluster's name in the gateway config (default: the cluster id)")
    parser.add_argument("--token-label",
                        help="the PKCS #11 token label of the cluster's slot (default: the cluster id)")
    parser.add_argument("--write", action="store_true", help="append the entry to --config when it has none")
    parser.add_argument("--strict", action="store_true", help="exit 1 when there is any warning")
    parser.add_argument("--output", choices=("text", "json"), default="text")
    parser.set_defaults(func=run)


def _region(args: argparse.Namespace) -> str:
    if args.region:
        return str(args.region)
    import boto3  # type: ignore[import-untyped]

    region = boto3.session.Session().region_name
    if not region:
        fail("no region: pass --region or set AWS_REGION")
    return str(region)


def run(args: argparse.Namespace) -> None:
    from gateway.discover import DiscoveryError, append_entry, check_entry, discover

    if args.write and args.config is None:
        fail("--write needs --config")
    region = _region(args)
    name = args.name or args.cluster_id
    try:
        found = discover(args.cluster_id, region, args.endpoint_url)
    except DiscoveryError as exc:
        fail(str(exc))
    result = found.to_json()
    problem = None
    if args.config is not None:
        try:
            check = check_entry(args.config, found, name, args.token_label)
            if check.index is None and args.write:
                append_entry(args.config, found, name, args.token_label)
                result["config"] = {"path": str(args.config), "name": name, "status": "appended"}
            elif check.index is None:
                result["config"] = {"path": str(args.config), "name": name, "status": "missing"}
                problem = f"{args.config} has no [[clusters]] entry named {name!r}; add it with --write"
            else:
                status = "matches" if check.matches else "differs"
                result["config"] = {"path": str(args.config), "name": name, "status": status, "index": check.index,
                                    "differences": list(check.differences)}
                if check.differences:
                    problem = f"{args.config}: clusters[{check.index}] ({name}) differs from the cluster"
        except DiscoveryError as exc:
            fail(str(exc))

    if args.output == "json":
        print(json.dumps(result, indent=2))
    else:
        _print_text(found, result.get("config"), args)
    if problem:
        fail(problem)
    if args.strict and found.warnings:
        fail(f"{len(found.warnings)} best-practice warning{'s' if len(found.warnings) != 1 else ''} "
             f"for cluster {found.cluster_id}")


def _print_text(found: object, config: dict[str, object] | None, args: argparse.Namespace) -> None:
    from gateway.discover import Discovery, config_entry

    assert isinstance(found, Discovery)
    count = len(found.hsms)
    print(f"cluster {found.cluster_id} ({found.region}): {found.state}, {found.hsm_type or 'unknown HSM type'}, "
          f"{count} HSM{'s' if count != 1 else ''}, max_keys {found.max_keys}")
    if found.hsms:
        rows = [("HSM", "AZ", "IP", "STATE")] + [(h.hsm_id, h.availability_zone, h.eni_ip, h.state) for h in found.hsms]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            print("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    for warning in found.warnings:
        print(f"warning {warning.code}: {warning.message}")
    if not found.warnings:
        print("ok: the cluster follows CloudHSM's availability and durability advice")
    if config is None:
        return
    status = config["status"]
    if status == "matches":
        print(f"config: clusters[{config['index']}] ({config['name']}) in {config['path']} matches")
    elif status == "appended":
        print(f"config: appended [[clusters]] {config['name']!r} to {config['path']}")
    elif status == "missing":
        print(f"config: no entry named {config['name']!r} in {config['path']}; it would be:")
        print(config_entry(found, str(config["name"]), args.token_label).strip())
    else:
        differences = config.get("differences")
        for difference in differences if isinstance(differences, list) else ():
            print(f"config: {difference}")

"""hsmctl audit tail | verify"""

from __future__ import annotations

import argparse
import json

from gateway.cli._common import at_least_one, plural
from gateway.cli.hsmctl._app import App
from hsmgw.v1 import admin_pb2 as apb


def _tail(app: App, args: argparse.Namespace) -> int:
    resp = app.call(app.admin.TailAudit, apb.TailAuditRequest(lines=args.lines))
    records = [json.loads(r.json) for r in resp.records]
    rows = [
        [r.get("seq"), r.get("time"), r.get("actor"), r.get("action"), r.get("target"), r.get("outcome")]
        for r in records
    ]
    app.emit(records, App.table(rows, ["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME"]) if rows else "empty")
    return 0


def _verify(app: App, args: argparse.Namespace) -> int:
    resp = app.call(app.admin.VerifyAudit, apb.VerifyAuditRequest())
    human = f"audit log intact: {plural(resp.records, 'record')}" if resp.ok else f"audit log TAMPERED: {resp.problem}"
    app.emit(app.as_dict(resp), human)
    return 0 if resp.ok else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="the hash-chained audit log")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    tail = asub.add_parser(
        "tail",
        help="the last records",
        description="With --output json, each record whole: its details name a change's action, params and "
                    "approvals; a param too long to repeat in each event (a rebalance's moves) is given by its "
                    "size and the params' SHA-256 instead (docs/security.md).\n\nExample: hsmctl audit tail -n 50",
    )
    tail.add_argument("-n", "--lines", type=at_least_one, default=20, help="how many (default: %(default)s)")
    tail.set_defaults(func=_tail)
    verify = asub.add_parser(
        "verify",
        help="check the hash chain (exit 1 names the first bad record)",
        description="Example: hsmctl audit verify",
    )
    verify.set_defaults(func=_verify)

"""hsmctl audit tail | verify"""

from __future__ import annotations

import argparse
import json
from typing import Any

from gateway.cli._common import at_least_one, plural
from gateway.cli.hsmctl._app import App
from hsmgw.v1 import admin_pb2 as apb


def _tail(app: App, args: argparse.Namespace) -> int:
    resp = app.call(app.admin.TailAudit, apb.TailAuditRequest(lines=args.lines))
    records = [json.loads(r.json) for r in resp.records]
    rows = [
        [r.get("seq"), r.get("time"), _actor(r), r.get("action"), r.get("target"), r.get("outcome")]
        for r in records
    ]
    human = App.table(rows, ["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME"]) if rows else "empty"
    for record in records:
        lost = _details(record).get("unwritten")
        if isinstance(lost, dict) and lost.get("events"):
            actions = lost.get("actions")
            which = ", ".join(f"{a} {n}" for a, n in sorted(actions.items())) if isinstance(actions, dict) else ""
            human += (f"\nrecord {record.get('seq')}: {lost['events']} event(s) before it could not be written "
                      f"({which}; since {lost.get('since')}: {lost.get('error')})")
    app.emit(records, human)
    return 0


def _details(record: dict[str, Any]) -> dict[str, Any]:
    details = record.get("details")
    return details if isinstance(details, dict) else {}


def _actor(record: dict[str, Any]) -> str:
    """The actor, and how it called when that was not a certificate: ``alice (header)`` was
    taken on its word by a plaintext development gateway."""
    actor = str(record.get("actor"))
    how = _details(record).get("authenticated_by")
    return f"{actor} ({how})" if how and how != "certificate" else actor


def _verify(app: App, args: argparse.Namespace) -> int:
    resp = app.call(app.admin.VerifyAudit, apb.VerifyAuditRequest())
    if not resp.ok:
        human = f"audit log TAMPERED: {resp.problem}"
    else:
        human = f"audit log intact: {plural(resp.records, 'record')}"
        if resp.unwritten:
            seqs = ", ".join(str(s) for s in resp.unwritten_noted_at[:10])
            more = ", …" if len(resp.unwritten_noted_at) > 10 else ""
            human += (f", but {plural(resp.unwritten, 'event')} could not be written (noted at seq {seqs}{more}): "
                      "the gateway's log names each (docs/security.md)")
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

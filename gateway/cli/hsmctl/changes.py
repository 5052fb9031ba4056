"""hsmctl changes list | approve ID | reject ID"""

from __future__ import annotations

import argparse

from gateway.cli.hsmctl._app import App
from hsmgw.v1 import admin_pb2 as apb


def _list(app: App, args: argparse.Namespace) -> int:
    resp = app.call(app.admin.ListChanges, apb.ListChangesRequest(all=args.all))
    rows = [
        [
            c.id,
            c.action,
            App.params(c),
            App.who(c, c.requested_by),
            f"{len(c.approved_by)}/{c.approvals_needed}",
            c.state,
            c.result,
        ]
        for c in resp.changes
    ]
    human = App.table(rows, ["ID", "ACTION", "PARAMS", "BY", "APPROVALS", "STATE", "RESULT"]) if rows else "no changes"
    app.emit([app.as_dict(c) for c in resp.changes], human)
    return 0


def _approve(app: App, args: argparse.Namespace) -> int:
    return app.change(app.call(app.admin.ApproveChange, apb.ApproveChangeRequest(id=args.id)))


def _reject(app: App, args: argparse.Namespace) -> int:
    change = app.call(app.admin.RejectChange, apb.RejectChangeRequest(id=args.id))
    app.change(change)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    changes = sub.add_parser("changes", help="pending admin changes and their approvals")
    csub = changes.add_subparsers(dest="changes_command", required=True, metavar="ACTION")
    lst = csub.add_parser(
        "list", help="pending changes (--all: every change)", description="Example: hsmctl changes list --all"
    )
    lst.add_argument("--all", action="store_true")
    lst.set_defaults(func=_list)
    approve = csub.add_parser(
        "approve",
        help="approve a change; it runs when the quorum is reached",
        description="Example: hsmctl --as bob changes approve 3f2a9c1e",
    )
    approve.add_argument("id")
    approve.set_defaults(func=_approve)
    reject = csub.add_parser(
        "reject", help="reject a pending change", description="Example: hsmctl changes reject 3f2a9c1e"
    )
    reject.add_argument("id")
    reject.set_defaults(func=_reject)

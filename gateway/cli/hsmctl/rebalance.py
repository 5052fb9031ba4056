"""hsmctl rebalance --plan | --apply | reconcile [--fix]"""

from __future__ import annotations

import argparse

from gateway.cli._common import plural
from gateway.cli.hsmctl._app import App, progress, write_out
from hsmgw.v1 import admin_pb2 as apb


def _rebalance(app: App, args: argparse.Namespace) -> int:
    plan = app.call(app.admin.PlanRebalance, apb.PlanRebalanceRequest())
    rows = [[m.key_id, getattr(m, "from"), m.to] for m in plan.moves]
    human = f"{len(plan.moves)} of {plural(plan.keys_considered, 'key')} would move (plan {plan.plan_id})\n" + (
        App.table(rows, ["KEY", "FROM", "TO"]) if rows else "nothing to move"
    )
    if not args.apply or not plan.moves:  # nothing to move: no change to ask anyone to approve
        app.emit(app.as_dict(plan) | {"moves": [app.as_dict(m) for m in plan.moves]},
                 human + ("; no change requested" if args.apply else ""))
        return 0
    if app.output != "json":
        write_out(human)
    progress(0, len(plan.moves), "requesting")
    change = app.call(app.admin.ApplyRebalance, apb.ApplyRebalanceRequest(plan_id=plan.plan_id))
    if change.state == "applied":
        progress(len(plan.moves), len(plan.moves), "moved")
    return app.change(change)


def _reconcile(app: App, args: argparse.Namespace) -> int:
    resp = app.call(app.admin.Reconcile, apb.ReconcileRequest(fix=args.fix))
    rows = [[f.kind, f.cluster or "-", f.key_id or "-", f.detail or "-"] for f in resp.findings]
    human = App.table(rows, ["FINDING", "CLUSTER", "KEY", "DETAIL"]) if rows else "placement store and tokens agree"
    made = args.fix and resp.HasField("change") and not resp.note  # a change this request made
    if args.fix and resp.note:
        human += f"\n{resp.note}"
    elif made:
        human += f"\n{App.change_line(resp.change)}"
    if args.fix and resp.findings_left:
        human += (f"\n{plural(resp.findings_left, 'more finding')} for a fix not in this change (one change holds "
                  "only so many): ask again once it is applied")
    # One document: the change, or why none was made, is in it.
    app.emit(app.as_dict(resp) | {"findings": [app.as_dict(f) for f in resp.findings]}, human)
    if made:
        return App.change_code(resp.change)
    return 1 if rows else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    reb = sub.add_parser(
        "rebalance",
        help="move the keys consistent hashing says should move",
        description="Show the plan, then apply it (a change needing approval).\n\n"
        "Examples: hsmctl rebalance --plan; hsmctl rebalance --apply",
    )
    mode = reb.add_mutually_exclusive_group(required=True)
    mode.add_argument("--plan", action="store_true", help="show what would move")
    mode.add_argument("--apply", action="store_true", help="request the moves (quorum)")
    reb.set_defaults(func=_rebalance)
    rec = sub.add_parser(
        "reconcile",
        help="compare the placement store with every token (exit 1 if they differ)",
        description="Reports stale intents, orphan objects, objects under a key's id that are not the key's "
        "(foreign: another application's, never destroyed), missing copies, keys with duplicate objects, "
        "unreachable clusters and clusters whose keys were made with another placement store (other_fleet: "
        "nothing is destroyed there); --fix requests a repair (quorum) of all but foreign objects, duplicates "
        "and keys that no named cluster holds, which an operator resolves (docs/operations.md). A missing copy's "
        "name is dropped from its record, and the repairer makes a real copy. The change lists the "
        "findings shown; once approved it repairs those that still hold, and nothing else.\n\n"
        "Example: hsmctl reconcile --fix",
    )
    rec.add_argument("--fix", action="store_true")
    rec.set_defaults(func=_reconcile)

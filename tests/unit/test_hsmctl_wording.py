"""What hsmctl prints for people when a count is one: "1 key", not "1 keys"."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from gateway.cli.hsmctl import audit, clusters, rebalance
from gateway.cli.hsmctl._app import App
from hsmgw.v1 import admin_pb2 as apb


class _Admin:
    """Answers in place of a gateway's AdminService: the wording is the CLI's alone."""

    def PlanRebalance(self, request: apb.PlanRebalanceRequest, **_: Any) -> apb.RebalancePlan:
        return apb.RebalancePlan(moves=[apb.KeyMove(key_id="k1", to="use1-b")], keys_considered=1, plan_id="p1")

    def VerifyAudit(self, request: apb.VerifyAuditRequest, **_: Any) -> apb.VerifyAuditResponse:
        return apb.VerifyAuditResponse(ok=True, records=1)

    def Reconcile(self, request: apb.ReconcileRequest, **_: Any) -> apb.ReconcileResponse:
        change = apb.Change(id="c1", action="reconcile_fix_shown", state="pending", approvals_needed=2,
                            approved_by=["alice"], params={"findings": '[["orphan", "use1-a", "k1"]]'})
        return apb.ReconcileResponse(findings=[apb.ReconcileFinding(kind="orphan", cluster="use1-a", key_id="k1")],
                                     change=change, findings_left=self.left)

    left = 0


@pytest.fixture
def app() -> Iterator[App]:
    with App(grpc.insecure_channel("127.0.0.1:1"), output="table", timeout=1.0, identity=None) as made:
        made.admin = _Admin()
        yield made


def test_one_key_one_record_one_hung_call_are_singular(app: App, capsys: pytest.CaptureFixture[str]) -> None:
    assert rebalance._rebalance(app, argparse.Namespace(apply=False)) == 0
    assert capsys.readouterr().out.startswith("1 of 1 key would move (plan p1)\n")
    assert audit._verify(app, argparse.Namespace()) == 0
    assert capsys.readouterr().out == "audit log intact: 1 record\n"
    assert clusters._note(apb.ClusterStatus(calls_hung=1)) == "1 call hung"
    assert clusters._note(apb.ClusterStatus(calls_hung=2, draining=True)) == "drained, 2 calls hung"


@pytest.mark.parametrize("left, says", [(0, ""), (1, "1 more finding"), (2500, "2500 more findings")])
def test_a_fix_that_could_not_list_every_finding_says_how_many_it_left(
    app: App, capsys: pytest.CaptureFixture[str], left: int, says: str
) -> None:
    app.admin.left = left  # type: ignore[attr-defined]
    assert rebalance._reconcile(app, argparse.Namespace(fix=True)) == 3
    out = capsys.readouterr().out
    assert "change c1 (reconcile_fix_shown) is pending" in out
    if says:
        assert out.endswith(f"\n{says} for a fix not in this change (one change holds only so many): ask again "
                            "once it is applied\n"), out
    else:
        assert "for a fix not in this change" not in out


def test_a_rebalances_moves_are_shown_as_their_count() -> None:
    """A rebalance's change records each of up to 2,000 moves; `changes list` and `changes show`
    print a column of parameters, which one such change would make as wide as the whole plan."""
    import json

    moves = json.dumps([[f"k{i}", "use1-a", "use1-b", 3] for i in range(1500)])
    change = apb.Change(action="apply_rebalance", params={"plan_id": "p1", "layout": "use1-a,use1-b",
                                                           "moves": moves})
    assert App.params(change) == "layout=use1-a,use1-b moves=1500 plan_id=p1"
    assert App.params(apb.Change(action="move_key", params={"key_id": "k", "to": "use1-b"})) == "key_id=k to=use1-b"


def test_what_a_terminal_would_act_on_is_escaped_in_every_table_cell_and_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A certificate's name or a URI SAN reaches `audit tail` and `changes list`: an escape
    sequence must not recolour or clear the operator's terminal, nor a line break forge a row."""
    from gateway.cli.hsmctl._app import write_out

    table = App.table([["ops\x1b[31m\nFAKE", "spiffe://x\x1b[2J\r\n3  00:00  root", "ok\u202elive"]],
                      ["ACTOR", "TARGET", "NOTE"])
    assert table.count("\n") == 1, "one header, one row"
    assert "ops\\x1b[31m\\nFAKE" in table and "\\x1b[2J\\r\\n3" in table and "ok\\u202elive" in table
    write_out("first line\nsecond \x1b]0;title\x07 line\r")
    assert capsys.readouterr().out == "first line\nsecond \\x1b]0;title\\x07 line\\r\n"


def test_verify_says_when_the_chain_notes_events_it_could_not_take(
    app: App, capsys: pytest.CaptureFixture[str]
) -> None:
    app.admin.VerifyAudit = lambda request, **_: apb.VerifyAuditResponse(  # type: ignore[method-assign]
        ok=True, records=9, unwritten=3, unwritten_noted_at=[7])
    assert audit._verify(app, argparse.Namespace()) == 0
    assert capsys.readouterr().out == ("audit log intact: 9 records, but 3 events could not be written (noted at "
                                       "seq 7): the gateway's log names each (docs/security.md)\n")

"""What the audit log keeps of an admin change's params: each event of a change repeats them,
so a long one (a rebalance's planned moves) is given by size and digest, not copied."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import grpc

from gateway.admin import AUDIT_PARAM_CHARS, audited_params
from gateway.fleet import init_fleet
from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from tests.integration.test_admin import approve, as_json, hsmctl
from tests.support import running, unique

LINE_BOUND = 2048
"""Bytes an audit line of a change may take whatever its params' length."""


def _canonical_sha256(params: dict[str, str]) -> str:
    """As docs/security.md tells operators to compute it from `hsmctl changes list --output json`."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode()).hexdigest()


def test_small_params_are_recorded_as_they_are() -> None:
    params = {"key_id": "payments/k1", "to": "use1-b", "from": "use1-a"}
    assert audited_params(params) == {"params": params}
    exactly = {"findings": "x" * AUDIT_PARAM_CHARS}
    assert audited_params(exactly) == {"params": exactly}


def test_a_long_param_is_given_by_its_size_and_the_params_digest() -> None:
    moves = json.dumps([["k" * 120, "use1-a", "use1-b", 3]] * 10)
    params = {"plan_id": "0123456789abcdef", "layout": "use1-a,use1-b", "moves": moves}
    assert audited_params(params) == {
        "params": {"plan_id": "0123456789abcdef", "layout": "use1-a,use1-b"},
        "params_left_out": {"moves": {"chars": len(moves), "items": 10}},
        "params_sha256": _canonical_sha256(params),
    }
    assert audited_params({"note": "n" * 2000})["params_left_out"] == {"note": {"chars": 2000}}  # not a list


def test_a_rebalance_of_many_moves_writes_bounded_audit_lines_naming_its_change_and_plan(tmp_path: Path) -> None:
    fleet = init_fleet(tmp_path / "f", listen="127.0.0.1:0")
    with running(fleet.config_path) as gw, grpc.insecure_channel(gw.target) as ch:
        crypto = crypto_pb2_grpc.CryptoServiceStub(ch)
        on_drained = 0  # keys the drain below makes the plan move: enough for a plan worth bounding
        for _ in range(400):
            key_id = unique("audited-plan").ljust(128, "x")  # the longest ids: the largest plan per move
            key = crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id[:64], key_id=key_id,
                                                           algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=60)
            on_drained += "use1-a" in (key.primary_cluster, *key.replicas)
            if on_drained == 40:
                break
        _, drain = as_json(gw.target, "clusters", "drain", "use1-a")
        assert approve(gw.target, drain)["state"] == "applied"
        _, plan = as_json(gw.target, "rebalance", "--plan")
        code, change = as_json(gw.target, "rebalance", "--apply")
        assert code == 3, change
        assert approve(gw.target, change)["state"] == "applied"

        _, changes = as_json(gw.target, "changes", "list", "--all")
        [stored] = [c for c in changes if c["id"] == change["id"]]
        moves = stored["params"]["moves"]
        assert len(json.loads(moves)) == len(plan["moves"]) and len(moves) > 2 * LINE_BOUND, "a plan worth bounding"

        lines = [line for line in (fleet.config_path.parent / "audit.log").read_bytes().splitlines()
                 if json.loads(line)["target"] == change["id"] and json.loads(line)["action"].startswith("change_")]
        events = [json.loads(line) for line in lines]
        assert [e["action"] for e in events] == ["change_requested", "change_approved", "change_applied"]
        for line, event in zip(lines, events, strict=True):
            assert len(line) < LINE_BOUND, event["action"]
            details = event["details"]
            assert details["change_action"] == "apply_rebalance"
            assert details["params"] == {"plan_id": plan["plan_id"], "layout": stored["params"]["layout"]}
            assert details["params_left_out"] == {"moves": {"chars": len(moves), "items": len(plan["moves"])}}
            assert details["params_sha256"] == _canonical_sha256(stored["params"])
        _, tail = as_json(gw.target, "audit", "tail", "-n", "500")
        assert [r for r in tail if r["target"] == change["id"] and r["action"].startswith("change_")] == events
        assert hsmctl(gw.target, "audit", "verify").returncode == 0


def test_each_event_of_a_change_names_who_caused_it_and_how_they_called(tmp_path: Path) -> None:
    """The actor of an event is who caused it (the approval that met the quorum ran the change),
    the requester stays a field of its own, and a development gateway's header identity is
    never mistaken for a certificate's."""
    fleet = init_fleet(tmp_path / "f", listen="127.0.0.1:0", copies=1)
    with running(fleet.config_path) as gw:
        _, change = as_json(gw.target, "clusters", "drain", "use1-a", who="alice")
        assert approve(gw.target, change, who="bob")["state"] == "applied"

        records = [json.loads(line) for line in (fleet.config_path.parent / "audit.log").read_bytes().splitlines()]
        events = {r["action"]: r for r in records if r["target"] == change["id"] and r["action"].startswith("change_")}
        assert [(e["action"], e["actor"], e["outcome"]) for e in events.values()] == [
            ("change_requested", "alice", "pending"),
            ("change_approved", "bob", "running"),  # the approval that met the quorum
            ("change_applied", "bob", "applied"),
        ]
        for event in events.values():
            assert event["details"]["requested_by"] == "alice"
            assert event["details"]["authenticated_by"] == "header"
            assert event["details"]["peer"].startswith("ipv4:127.0.0.1:")
        grants = [r for r in records
                  if r["action"] == "authz.granted" and r["details"].get("method") == "ApproveChange"]
        assert grants[-1]["target"] == change["id"] and grants[-1]["actor"] == "bob"
        assert grants[-1]["details"]["authenticated_by"] == "header"

        _, changes = as_json(gw.target, "changes", "list", "--all")
        (listed,) = [c for c in changes if c["id"] == change["id"]]
        assert {who: o["authenticated_by"] for who, o in listed["origins"].items()} == {"alice": "header",
                                                                                       "bob": "header"}
        table = hsmctl(gw.target, "changes", "list", "--all").stdout
        assert "alice (header, ipv4:127.0.0.1:" in table, table
        tail = hsmctl(gw.target, "audit", "tail", "-n", "30").stdout
        assert "bob (header)" in tail, tail


def test_a_key_moved_by_a_change_names_that_change(tmp_path: Path) -> None:
    """The gateway records the move it ran (actor "-"): its change_id ties it to the change's own
    records, which name who asked for it and who approved it."""
    fleet = init_fleet(tmp_path / "f", listen="127.0.0.1:0", copies=1)
    with running(fleet.config_path) as gw, grpc.insecure_channel(gw.target) as ch:
        crypto = crypto_pb2_grpc.CryptoServiceStub(ch)
        key_id = unique("audited-move")
        key = crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id,
                                                       algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=30)
        to = next(c for c in ("use1-a", "use1-b") if c != key.primary_cluster)
        _, change = as_json(gw.target, "keys", "move", key_id, "--to", to, who="alice")
        assert approve(gw.target, change, who="bob")["state"] == "applied"

        records = [json.loads(line) for line in (fleet.config_path.parent / "audit.log").read_bytes().splitlines()]
        (approved,) = [r for r in records if r["action"] == "change_approved"]
        (moved,) = [r for r in records if r["action"] == "key_moved"]
        assert (moved["actor"], moved["target"], moved["details"]["clusters"]) == ("-", key_id, [to])
        assert moved["details"]["change_id"] == approved["target"] == change["id"]
        assert (approved["actor"], approved["details"]["requested_by"]) == ("bob", "alice")

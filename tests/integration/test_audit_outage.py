"""An audit log that becomes unwritable while the gateway runs: what must be audited before it
happens is refused, what happened anyway is logged, counted and noted in the chain, and the
gateway takes records again by itself once the log is writable."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway import audit as audit_log
from gateway.fleet import init_fleet
from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from tests.integration.test_admin import approve, as_json, hsmctl
from tests.integration.test_cli import _immutable
from tests.security.helpers import write_config
from tests.support import rpc_error, running, scrape, unique, value

POLICY = """\
[roles.maker]
operations = ["GenerateKey", "DestroyKey", "GetKey"]
prefixes = ["ok/"]

[roles.admin]
operations = ["*"]
prefixes = ["*"]
admin = ["*"]

[identities.maker]
roles = ["maker"]

[identities.alice]
roles = ["admin"]

[identities.bob]
roles = ["admin"]
"""
MAKER = (("x-hsmgw-identity", "maker"),)
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def _two_free_ports() -> int:
    """A port that is free, and the next one too (worker i serves /metrics on the port + i)."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return int(port)
    raise AssertionError("no two free ports in a row")


def _generate(key_id: str) -> pb.GenerateKeyRequest:
    return pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, algorithm=pb.KEY_ALGORITHM_EC_P256)


def _error_lines(log: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("level") == "ERROR" and "audit_event" in e]


def test_what_must_be_audited_waits_for_an_unwritable_log_and_the_gateway_recovers_by_itself(tmp_path: Path) -> None:
    fleet = init_fleet(tmp_path / "f", listen="127.0.0.1:0", copies=1)
    policy = fleet.state_dir / "policy.toml"
    policy.write_text(POLICY)
    metrics = _two_free_ports()
    config = write_config(fleet, "outage", policy=policy, extra=f'\n[metrics]\nlisten = "127.0.0.1:{metrics}"\n')
    log = config.parent / "audit.log"
    with running(config, workers=2, env={"HSMGW_LOG_FORMAT": "json"}) as gw, \
            grpc.insecure_channel(gw.target) as channel:
        crypto = crypto_pb2_grpc.CryptoServiceStub(channel)  # one connection: one worker serves all its calls
        kept = unique("ok")
        crypto.GenerateKey(_generate(kept), metadata=MAKER, timeout=60)
        _, drain = as_json(gw.target, "clusters", "drain", "use1-a")

        writable = _immutable(log)
        try:
            made = unique("ok")
            err = rpc_error(crypto.GenerateKey, _generate(made), metadata=MAKER, timeout=60)
            assert err.code() is UNAVAILABLE
            assert err.details() == ("the gateway's audit log cannot be written (its log says why); GenerateKey "
                                     "waits until it can")
            assert rpc_error(crypto.GetKey, pb.GetKeyRequest(key_id=made), metadata=MAKER,
                             timeout=10).code() is grpc.StatusCode.NOT_FOUND, "no key was made"
            err = rpc_error(crypto.DestroyKey, pb.DestroyKeyRequest(key_id=kept), metadata=MAKER, timeout=60)
            assert err.code() is UNAVAILABLE and "DestroyKey waits until it can" in err.details()
            assert crypto.GetKey(pb.GetKeyRequest(key_id=kept), metadata=MAKER, timeout=10).key_id == kept
            denied = rpc_error(crypto.GenerateKey, _generate(unique("hr")), metadata=MAKER, timeout=10)
            assert denied.code() is grpc.StatusCode.PERMISSION_DENIED, "a denial stays a denial"

            for attempt in (("clusters", "drain", "use1-b"), ("changes", "approve", drain["id"])):
                refused = hsmctl(gw.target, *attempt, who="bob")
                assert refused.returncode == 2, refused.stderr
                assert refused.stderr.strip() == ("error: UNAVAILABLE: the gateway's audit log cannot be written "
                                                  "(its log says why); admin changes wait until it can")
            # What an operator needs to see what is wrong is served.
            assert hsmctl(gw.target, "audit", "verify", who="bob").returncode == 0
            _, changes = as_json(gw.target, "changes", "list", "--all")
            assert [(c["id"], c["approved_by"]) for c in changes] == [(drain["id"], ["alice"])]
        finally:
            writable()

        text = gw.log()
        assert "Logging error" not in text and "Traceback" not in text
        lost = {e["audit_event"] for e in _error_lines(text)}
        assert {"authz.granted", "authz.denied"} <= lost, lost
        failures = {event: sum(value(scrape(port), "hsmgw_audit_write_failures_total", event=event)
                               for port in (metrics, metrics + 1)) for event in ("authz.granted", "authz.denied")}
        assert failures["authz.granted"] >= 4 and failures["authz.denied"] >= 1, failures

        # Writable again: nothing to restart.
        crypto.GenerateKey(_generate(made), metadata=MAKER, timeout=60)
        crypto.DestroyKey(pb.DestroyKeyRequest(key_id=kept), metadata=MAKER, timeout=60)
        assert approve(gw.target, drain)["state"] == "applied"

        # The worker that served the crypto calls noted what it lost in its next record.
        noting = [r for r in audit_log.tail(log, 100) if "unwritten" in r["details"]]
        assert noting, "no record notes the events the log could not take"
        actions = noting[0]["details"]["unwritten"]["actions"]
        assert actions.get("authz.granted", 0) >= 2 and actions.get("authz.denied", 0) >= 1, actions
        code, verified = as_json(gw.target, "audit", "verify")
        assert code == 0 and verified["ok"] and int(verified["unwritten"]) >= 3, verified
        assert noting[0]["seq"] in [int(s) for s in verified["unwritten_noted_at"]]
        said = hsmctl(gw.target, "audit", "verify").stdout
        assert "could not be written (noted at seq" in said, said


def test_a_key_creation_a_gateway_cannot_audit_is_made_through_the_next_endpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The refusal has its own reason (AUDIT_UNAVAILABLE): nothing ran, so the client sends the
    creation to its next endpoint at once instead of asking the broken gateway until its deadline."""
    from gateway.client import Client, error_reason

    fleet = init_fleet(tmp_path / "f", listen="127.0.0.1:0", copies=1)
    policy = fleet.state_dir / "policy.toml"
    policy.write_text(POLICY)
    configs = {name: write_config(fleet, name, policy=policy, extra=f'\n[admin]\naudit_log = "{name}-audit.log"\n')
               for name in ("broken", "healthy")}
    env = {"HSMGW_LOG_FORMAT": "json"}
    with running(configs["broken"], env=env) as broken, running(configs["healthy"], env=env) as healthy:
        writable = _immutable(configs["broken"].parent / "broken-audit.log")
        try:
            with grpc.insecure_channel(broken.target) as channel:
                err = rpc_error(crypto_pb2_grpc.CryptoServiceStub(channel).GenerateKey, _generate(unique("ok")),
                                metadata=MAKER, timeout=30)
            assert (err.code(), error_reason(err)) == (UNAVAILABLE, "AUDIT_UNAVAILABLE")

            key_id = unique("ok")
            with Client([broken.target, healthy.target], metadata=MAKER, timeout=20) as client, \
                    caplog.at_level(logging.WARNING, logger="gateway.client"):
                started = time.monotonic()
                key = client.generate_key(key_id, "EC_P256", request_id=key_id)
                took = time.monotonic() - started
                assert key.key_id == key_id
                assert client.get_key(key_id).key_id == key_id
        finally:
            writable()
        assert took < 10, f"{took:.1f} s: the broken gateway was asked again"
        moves = [r.getMessage() for r in caplog.records if r.name == "gateway.client"]
        assert moves == [f"endpoint {broken.target} cannot audit a key creation (the gateway's audit log cannot be "
                         "written (its log says why); GenerateKey waits until it can); trying the next"], moves
        refused = [e for e in _error_lines(broken.log()) if e["audit_event"] == "authz.granted"]
        assert [e["audit_target"] for e in refused].count(key_id) == 1, "the broken gateway was asked once"
        assert [r["target"] for r in audit_log.tail(configs["healthy"].parent / "healthy-audit.log", 100)
                if r["action"] == "authz.granted"].count(key_id) == 1

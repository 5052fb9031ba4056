"""A real gateway, scraped: traffic, caller mistakes and injected HSM faults, seen in /metrics,
in CloudWatch (moto_server) and in its JSON log lines.

The gateway loads faultmod in front of real SoftHSM tokens (a fleet of our own), serves
``/metrics`` on a free port and publishes to moto's CloudWatch every second. One module
scenario drives the traffic; each test checks one thing an operator relies on.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.fleet import Fleet, find_module
from hsmgw.v1 import admin_pb2, admin_pb2_grpc, crypto_pb2_grpc
from hsmgw.v1 import crypto_pb2 as pb
from tests.faults import FaultControl
from tests.moto import FAKE_AWS_ENV, free_port
from tests.observability.conftest import MotoProcess, boto
from tests.support import ROOT, GatewayProcess, Samples, rpc_error, scrape, value, wait_for

NAMESPACE = "HSMGW-test"
DIGEST = bytes(range(32))


def observed_config(fleet: Fleet, faultmod: Path, control: FaultControl, metrics_port: int, moto: str) -> Path:
    """The fleet's config with faultmod as the module, /metrics and CloudWatch on."""
    text = fleet.config_path.read_text()
    text = re.sub(r"^module = .*$", f'module = "{faultmod}"', text, count=1, flags=re.M)
    env = {"SOFTHSM2_CONF": str(fleet.softhsm_conf), "FAULTMOD_TARGET": find_module(), **control.env()}
    text = re.sub(r"^env = .*$", "env = { " + ", ".join(f'{k} = "{v}"' for k, v in env.items()) + " }",
                  text, count=1, flags=re.M)
    # Keys made while the DR cluster is down are acknowledged and left under-replicated.
    text = text.replace("require_dr_copy = true\n",
                        'require_dr_copy = true\non_unavailable = "ack-local"\nrepair_interval = 3600.0\n', 1)
    text += (
        f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
        f'\n[cloudwatch]\nenabled = true\nnamespace = "{NAMESPACE}"\nendpoint_url = "{moto}"\ninterval = 1.0\n'
    )
    path = fleet.state_dir / "observed.toml"
    path.write_text(text)
    return path


@dataclass
class Scenario:
    gateway: GatewayProcess
    metrics_port: int
    config_path: Path
    moto: MotoProcess
    primary: str = ""
    """Primary of the replicated key (use1-a or use1-b); its replica is usw2-a."""
    replica: str = ""
    single: str = ""
    """Cluster of the single-copy key, made busy (CKR_FUNCTION_FAILED) once."""
    generate_request_id: str = ""
    generate_metadata: dict[str, str] = field(default_factory=dict)
    sign_metadata: dict[str, str] = field(default_factory=dict)
    error_metadata: dict[str, str | bytes] = field(default_factory=dict)
    error_request_id: str = ""
    during_fault: Samples = field(default_factory=dict)
    final: Samples = field(default_factory=dict)
    clusters: list[Any] = field(default_factory=list)
    under_replicated: str = ""


@pytest.fixture(scope="module")
def scenario(obs_fleet: Fleet, faultmod: Path, moto_process: MotoProcess) -> Iterator[Scenario]:
    control = FaultControl(obs_fleet.state_dir / "faults")
    control.clear()
    port = free_port()
    config = observed_config(obs_fleet, faultmod, control, port, moto_process.endpoint)
    gateway = GatewayProcess(config, env={"HSMGW_LOG_FORMAT": "auto", **FAKE_AWS_ENV}).start()
    run = Scenario(gateway, port, config, moto_process)
    try:
        with grpc.insecure_channel(gateway.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            _drive(run, crypto_pb2_grpc.CryptoServiceStub(channel), admin_pb2_grpc.AdminServiceStub(channel),
                   control)
        yield run
    finally:
        control.clear()
        gateway.stop()


def _sign(key_id: str, **kw: Any) -> pb.SignRequest:
    return pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, **({"digest": DIGEST} | kw))


def _circuit(run: Scenario, cluster: str) -> float:
    return value(scrape(run.metrics_port), "hsmgw_circuit_state", cluster=cluster)


def _drive(run: Scenario, crypto: crypto_pb2_grpc.CryptoServiceStub, admin: admin_pb2_grpc.AdminServiceStub,
           control: FaultControl) -> None:
    suffix = uuid.uuid4().hex[:10]
    single = crypto.GenerateKey(pb.GenerateKeyRequest(
        request_id=f"single-{suffix}", key_id=f"obs/single-{suffix}", algorithm=pb.KEY_ALGORITHM_EC_P256,
        replication=pb.ReplicationPolicy(copies=1)), timeout=30)
    run.single = single.primary_cluster
    run.generate_request_id = f"obs-generate-{suffix}"
    key, call = crypto.GenerateKey.with_call(
        pb.GenerateKeyRequest(request_id=f"key-{suffix}", key_id=f"obs/key-{suffix}",
                              algorithm=pb.KEY_ALGORITHM_EC_P256),
        metadata=(("x-request-id", run.generate_request_id),), timeout=30)
    run.generate_metadata = dict(call.trailing_metadata())
    run.primary, (run.replica,) = key.primary_cluster, key.replicas

    for i in range(5):
        response, call = crypto.Sign.with_call(_sign(key.key_id), timeout=10)
        assert response.cluster == run.primary
        if i == 0:
            run.sign_metadata = dict(call.trailing_metadata())
    missing = rpc_error(crypto.Sign, _sign(f"obs/missing-{suffix}"), timeout=10,
                        metadata=(("x-request-id", f"obs-missing-{suffix}"),))
    assert missing.code() is grpc.StatusCode.NOT_FOUND
    run.error_metadata = dict(missing.trailing_metadata())
    run.error_request_id = f"obs-missing-{suffix}"
    bad = _sign(key.key_id, digest=DIGEST[:31])
    assert rpc_error(crypto.Sign, bad, timeout=10).code() is grpc.StatusCode.INVALID_ARGUMENT
    batch = crypto.BatchSign(pb.BatchSignRequest(requests=[_sign(key.key_id), _sign(f"obs/missing-{suffix}")]),
                             timeout=10)
    assert [r.code for r in batch.responses] == [0, grpc.StatusCode.NOT_FOUND.value[0]]

    # The primary's HSM fails: every sign is served by the DR replica, after the retry budget allows.
    control.set(run.primary, "device_error")
    for _ in range(3):
        assert crypto.Sign(_sign(key.key_id), timeout=10).cluster == run.replica
    run.during_fault = scrape(run.metrics_port)
    control.clear(run.primary)
    wait_for(lambda: _circuit(run, run.primary) == 0, 15, f"the circuit of {run.primary} to close")

    # The single-copy key's HSM is busy: nowhere else to go, the caller sees RESOURCE_EXHAUSTED.
    control.set(run.single, "function_failed")
    try:
        error = rpc_error(crypto.Sign, _sign(single.key_id), timeout=10)
    finally:
        control.clear(run.single)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    wait_for(lambda: _circuit(run, run.single) == 0, 15, f"the circuit of {run.single} to close")

    # The DR cluster is down while a key is made: acknowledged locally (ack-local), under-replicated
    # (the repairer is slowed down in this config, so it stays so).
    control.set(run.replica, "device_error")
    try:
        under = crypto.GenerateKey(pb.GenerateKeyRequest(
            request_id=f"under-{suffix}", key_id=f"obs/under-{suffix}", algorithm=pb.KEY_ALGORITHM_EC_P256),
            timeout=30)
    finally:
        control.clear(run.replica)
    assert under.state == pb.KEY_STATE_UNDER_REPLICATED
    run.under_replicated = under.key_id
    wait_for(lambda: _circuit(run, run.replica) == 0, 15, f"the circuit of {run.replica} to close")

    # The single-copy key's HSM is slow: the sign succeeds after its caller's deadline passed. The
    # caller saw DEADLINE_EXCEEDED, and so do the metrics, not an OK that no one received.
    control.set(run.single, "latency", 150)  # each of C_SignInit and C_Sign
    try:
        late = rpc_error(crypto.Sign, _sign(single.key_id), timeout=0.2)
        assert late.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: value(scrape(run.metrics_port), "hsmgw_requests_total", rpc="Sign",
                               code="DEADLINE_EXCEEDED") == 1, 10, "the late sign to be counted")
    finally:
        control.clear(run.single)

    # At rest: the pool gauges must equal what the admin API reports (a probe may hold a
    # session for a moment, so compare until they agree).
    def agree() -> bool:
        listed = admin.ListClusters(admin_pb2.ListClustersRequest(), timeout=10).clusters
        samples = scrape(run.metrics_port)
        run.clusters, run.final = list(listed), samples
        return all(
            value(samples, "hsmgw_pool_sessions_in_use", cluster=c.name) == c.sessions_in_use
            and value(samples, "hsmgw_pool_sessions_open", cluster=c.name) == c.sessions_open
            for c in listed
        )

    wait_for(agree, 10, "pool gauges to match ListClusters")


# -- /metrics ---------------------------------------------------------------------------------------


def test_requests_are_counted_by_rpc_code_and_cluster(scenario: Scenario) -> None:
    s = scenario.final
    rpc = {"service": "hsmgw.v1.CryptoService", "rpc": "Sign"}
    assert value(s, "hsmgw_requests_total", **rpc, code="OK", cluster=scenario.primary) == 5
    assert value(s, "hsmgw_requests_total", **rpc, code="OK", cluster=scenario.replica) == 3
    assert value(s, "hsmgw_requests_total", **rpc, code="OK") == 8
    assert value(s, "hsmgw_requests_total", **rpc, code="NOT_FOUND") == 1
    assert value(s, "hsmgw_requests_total", **rpc, code="INVALID_ARGUMENT") == 1
    assert value(s, "hsmgw_requests_total", **rpc, code="RESOURCE_EXHAUSTED", cluster=scenario.single) == 1
    # Answered after its deadline, by the slow cluster.
    assert value(s, "hsmgw_requests_total", **rpc, code="DEADLINE_EXCEEDED", cluster=scenario.single) == 1
    assert value(s, "hsmgw_requests_total", rpc="GenerateKey", code="OK") == 3
    assert value(s, "hsmgw_requests_total", rpc="BatchSign", code="OK") == 1
    assert value(s, "hsmgw_request_duration_seconds_count", rpc="Sign") == 12
    assert value(s, "hsmgw_request_duration_seconds_bucket", rpc="Sign", le="+Inf") == 12
    assert value(s, "hsmgw_requests_in_flight") == 0
    assert value(s, "hsmgw_batch_items_total", code="OK", cluster=scenario.primary) == 1
    assert value(s, "hsmgw_batch_items_total", code="NOT_FOUND") == 1


def test_errors_carry_reason_class_and_ckr(scenario: Scenario) -> None:
    s = scenario.final
    assert value(s, "hsmgw_errors_total", reason="KEY_NOT_FOUND", error_class="KeyNotFound") == 1
    assert value(s, "hsmgw_errors_total", reason="INVALID_ARGUMENT", error_class="InvalidArgument") == 1
    assert value(s, "hsmgw_errors_total", reason="HSM_BUSY", error_class="Throttled", cluster=scenario.single) == 1
    # The sign answered after its deadline is an error its caller saw, on the cluster that was slow.
    assert value(s, "hsmgw_errors_total", reason="DEADLINE_EXCEEDED", error_class="DeadlineExceeded",
                 cluster=scenario.single) == 1
    assert value(s, "hsmgw_errors_total") == 4
    # The device errors were absorbed by failover, and the busy HSM's reached the caller; each
    # circuit the faults opened is counted with the CKR of the failure that opened it.
    opened = {c: value(s, "hsmgw_circuit_changes_total", cluster=c, state="open")
              for c in ("use1-a", "use1-b", "usw2-a")}
    # A busy answer never opens a closed circuit. The slow HSM's circuit may open (a health probe
    # past its time); a timeout names no CKR, even one on the heels of the busy answer.
    assert value(s, "hsmgw_pkcs11_errors_total", ckr="CKR_FUNCTION_FAILED", cluster=scenario.single) == 1
    assert value(s, "hsmgw_pkcs11_errors_total", ckr="CKR_DEVICE_ERROR", cluster=scenario.primary) == \
        opened[scenario.primary] >= 1
    assert value(s, "hsmgw_pkcs11_errors_total") == 1 + opened[scenario.primary] + sum(
        n for c, n in opened.items() if c not in (scenario.single, scenario.primary))
    assert value(s, "hsmgw_store_errors_total") == 0


def test_failover_retries_and_circuit_state(scenario: Scenario) -> None:
    during, final = scenario.during_fault, scenario.final
    assert value(during, "hsmgw_circuit_state", cluster=scenario.primary) >= 1  # open, or half-open on trial
    assert value(during, "hsmgw_circuit_state", cluster=scenario.replica) == 0
    assert value(final, "hsmgw_failovers_total") == 3  # each faulted sign served by the replica
    assert value(final, "hsmgw_retries_total") >= 1
    assert value(final, "hsmgw_retry_budget_refusals_total") == 0
    assert value(final, "hsmgw_circuit_changes_total", cluster=scenario.primary, state="open") >= 1
    assert value(final, "hsmgw_circuit_changes_total", cluster=scenario.primary, state="closed") >= 1
    for cluster in ("use1-a", "use1-b", "usw2-a"):
        assert value(final, "hsmgw_circuit_state", cluster=cluster) == 0


def test_cluster_gauges_match_the_admin_api(scenario: Scenario) -> None:
    s = scenario.final
    assert {c.name for c in scenario.clusters} == {"use1-a", "use1-b", "usw2-a"}
    for c in scenario.clusters:
        labels = {"cluster": c.name, "region": c.region}
        assert value(s, "hsmgw_pool_size", **labels) == c.pool_size
        assert value(s, "hsmgw_pool_sessions_open", **labels) == c.sessions_open
        assert value(s, "hsmgw_pool_sessions_in_use", **labels) == c.sessions_in_use
        assert value(s, "hsmgw_pool_calls_hung", **labels) == c.calls_hung == 0
        assert value(s, "hsmgw_keys", **labels) == c.keys
        assert value(s, "hsmgw_max_keys", **labels) == c.max_keys
        assert value(s, "hsmgw_cluster_draining", **labels) == int(c.draining)
    assert value(s, "hsmgw_keys", cluster=scenario.replica) >= 1
    assert value(s, "hsmgw_keys_under_replicated") == 1
    assert value(s, "hsmgw_region_failed_over", region="us-west-2") == 0


# -- CloudWatch ------------------------------------------------------------------------------------


def _statistic(cw: Any, name: str, dims: dict[str, str], stat: str) -> list[float]:
    now = time.time()
    points = cw.get_metric_statistics(
        Namespace=NAMESPACE, MetricName=name, Dimensions=[{"Name": k, "Value": v} for k, v in dims.items()],
        StartTime=now - 900, EndTime=now + 300, Period=60, Statistics=[stat],
    )["Datapoints"]
    return [p[stat] for p in points]


def test_cloudwatch_receives_the_core_metrics(scenario: Scenario) -> None:
    cw = boto("cloudwatch", scenario.moto.endpoint)
    expected = {"Keys", "KeyUtilization", "SessionsInUse", "SessionUtilization", "CircuitState", "Requests",
                "ServerErrors", "Latency", "Failovers", "Retries", "RetryBudgetRefusals", "UnderReplicatedKeys",
                "UnhealthyClusters"}

    def names() -> set[str]:
        return {m["MetricName"] for m in cw.list_metrics(Namespace=NAMESPACE)["Metrics"]}

    wait_for(lambda: expected <= names(), 15, f"{sorted(expected - names())} in CloudWatch")
    total = value(scenario.final, "hsmgw_requests_total")  # every RPC, admin calls included
    region = {"Region": "us-east-1"}
    wait_for(lambda: sum(_statistic(cw, "Requests", region, "Sum")) == total, 15,
             f"CloudWatch Requests to add up to {total}")
    assert sum(_statistic(cw, "Failovers", region, "Sum")) == 3
    assert sum(_statistic(cw, "ServerErrors", region, "Sum")) == 2  # the busy HSM, the slow one
    keys = {c.name: c.keys for c in scenario.clusters}
    for cluster, count in keys.items():
        assert max(_statistic(cw, "Keys", {"Cluster": cluster}, "Maximum")) == count
    assert max(_statistic(cw, "CircuitState", {"Cluster": scenario.primary}, "Maximum")) >= 1
    assert max(_statistic(cw, "UnderReplicatedKeys", region, "Maximum")) == 1
    s = scrape(scenario.metrics_port)
    assert value(s, "hsmgw_cloudwatch_datums_sent_total") > 0
    assert value(s, "hsmgw_cloudwatch_datums_dropped_total") == 0
    assert value(s, "hsmgw_cloudwatch_errors_total") == 0


def test_alarms_install_creates_the_alarms_idempotently(scenario: Scenario) -> None:
    topic = "arn:aws:sns:us-east-1:123456789012:hsm-oncall"
    command = [sys.executable, "-m", "gateway.cli.hsmgw", "alarms", "install", "--config", str(scenario.config_path),
               "--alarm-action", topic, "--output", "json"]
    env = {**FAKE_AWS_ENV, "PATH": "/usr/bin:/bin"}
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    installed = {a["name"] for a in json.loads(first.stdout)["alarms"]}
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr

    cw = boto("cloudwatch", scenario.moto.endpoint)
    alarms = {a["AlarmName"]: a for a in cw.describe_alarms(AlarmNamePrefix="hsmgw-")["MetricAlarms"]}
    expected = {f"hsmgw-{c}-{kind}" for c in ("use1-a", "use1-b", "usw2-a")
                for kind in ("keys-near-limit", "sessions-near-limit", "unhealthy")}
    expected |= {"hsmgw-us-east-1-under-replicated-keys", "hsmgw-us-east-1-retry-budget-spent"}
    assert set(alarms) == installed == expected  # the second run replaced, not duplicated

    keys = alarms[f"hsmgw-{scenario.primary}-keys-near-limit"]
    assert (keys["Namespace"], keys["MetricName"], keys["Statistic"]) == (NAMESPACE, "KeyUtilization", "Maximum")
    assert keys["Dimensions"] == [{"Name": "Cluster", "Value": scenario.primary}]
    assert (keys["Threshold"], keys["ComparisonOperator"]) == (80.0, "GreaterThanOrEqualToThreshold")
    assert keys["AlarmActions"] == [topic] and keys["OKActions"] == [topic]
    sessions = alarms[f"hsmgw-{scenario.primary}-sessions-near-limit"]
    assert (sessions["MetricName"], sessions["Threshold"]) == ("SessionUtilization", 80.0)
    unhealthy = alarms[f"hsmgw-{scenario.replica}-unhealthy"]
    assert (unhealthy["MetricName"], unhealthy["Threshold"]) == ("CircuitState", 2.0)
    under = alarms["hsmgw-us-east-1-under-replicated-keys"]
    assert under["MetricName"] == "UnderReplicatedKeys" and under["Dimensions"] == [
        {"Name": "Region", "Value": "us-east-1"}]
    # Each alarm watches a metric the gateway really publishes.
    published = {(m["MetricName"], tuple((d["Name"], d["Value"]) for d in m["Dimensions"]))
                 for m in cw.list_metrics(Namespace=NAMESPACE)["Metrics"]}
    for alarm in alarms.values():
        watched = (alarm["MetricName"], tuple((d["Name"], d["Value"]) for d in alarm["Dimensions"]))
        assert watched in published, alarm["AlarmName"]


# -- logs -----------------------------------------------------------------------------------------------


def _log_lines(gateway: GatewayProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gateway.log().splitlines() if line.startswith("{")]


def test_log_lines_are_json_and_carry_the_request_id(scenario: Scenario) -> None:
    text = scenario.gateway.log()
    human = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")
    assert not [line for line in text.splitlines() if human.match(line)]
    lines = _log_lines(scenario.gateway)
    assert any(line["message"].startswith("serving on") for line in lines)
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)

    rid = scenario.generate_request_id
    mine = [line for line in lines if line.get("request_id") == rid]
    loggers = {line["logger"] for line in mine}
    assert {"hsmgw.audit", "router.router"} <= loggers, mine  # the grant and the creation, one request
    audit = next(line for line in mine if line["logger"] == "hsmgw.audit")["audit"]
    assert audit["event"] == "authz.granted" and audit["method"] == "GenerateKey"
    assert scenario.generate_metadata.get("x-request-id") == rid  # echoed to the caller

    # An error's status carries it too, beside the error details.
    assert scenario.error_metadata.get("x-request-id") == scenario.error_request_id
    assert "grpc-status-details-bin" in scenario.error_metadata
    generated = scenario.sign_metadata.get("x-request-id", "")
    assert re.fullmatch(r"[0-9a-f]{32}", generated)  # none sent: the gateway made one
    # Lines logged outside any request (start-up) carry none.
    assert "request_id" not in next(line for line in lines if line["message"].startswith("serving on"))


# -- start-up --------------------------------------------------------------------------------------------


def test_a_taken_metrics_port_fails_start_with_one_line(obs_fleet: Fleet, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = obs_fleet.state_dir / "taken.toml"
        config.write_text(obs_fleet.config_path.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli.hsmgw", "serve", "--config", str(config)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    expected = f"error: metrics.listen: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert errors == [expected], result.stderr

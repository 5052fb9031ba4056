"""``hsmgw discover`` and the CloudHSM alarms, against moto's cloudhsmv2 and CloudWatch.

moto's ``CreateHsm`` is unimplemented, so the HSMs are added to moto's backend directly:
moto serves here from a thread of the test process (``threaded_moto``: real HTTP on a free
port) whose in-memory backend the test can reach. The CLI runs as a user runs it, in its
own process, over HTTP.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway import config as config_mod
from tests.deploy.test_k8s import OVERLAYS, alarms_check_args, needs_kubectl, one, render
from tests.moto import FAKE_AWS_ENV
from tests.observability.conftest import boto
from tests.support import ROOT

REGION = "us-east-1"


def make_cluster(endpoint: str, zones: list[str], *, state: str = "ACTIVE", hsm_type: str = "hsm2m.medium",
                 hsm_state: str = "ACTIVE", region: str = REGION) -> tuple[str, list[str]]:
    """A cluster with one HSM per entry of ``zones``; returns (cluster id, HSM ids)."""
    from moto.cloudhsmv2.models import cloudhsmv2_backends
    from moto.core import DEFAULT_ACCOUNT_ID

    client = boto("cloudhsmv2", endpoint, region)
    cluster_id = client.create_cluster(HsmType=hsm_type, SubnetIds=[f"subnet-{z[-1]}" for z in zones] or ["subnet-a"]
                                       )["Cluster"]["ClusterId"]
    cluster = cloudhsmv2_backends[DEFAULT_ACCOUNT_ID][region].clusters[cluster_id]
    cluster.state = state
    hsm_ids = []
    for i, zone in enumerate(zones):
        hsm_id = f"hsm-{uuid.uuid4().hex[:11]}"
        hsm_ids.append(hsm_id)
        cluster.hsms.append({
            "AvailabilityZone": zone, "ClusterId": cluster_id, "SubnetId": f"subnet-{zone[-1]}",
            "EniId": f"eni-{uuid.uuid4().hex[:8]}", "EniIp": f"10.0.{i}.{10 + i}", "HsmId": hsm_id,
            "State": hsm_state, "StateMessage": "",
        })
    return cluster_id, hsm_ids


def hsmgw(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**FAKE_AWS_ENV, "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "gateway.cli.hsmgw", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def discover(endpoint: str, cluster_id: str, *args: str) -> subprocess.CompletedProcess[str]:
    return hsmgw("discover", "--cluster-id", cluster_id, "--region", REGION, "--endpoint-url", endpoint, *args)


def codes(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    return [w["code"] for w in json.loads(result.stdout)["warnings"]]


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    return errors[0]


def test_one_hsm_has_no_redundancy_and_no_new_key_durability(threaded_moto: str) -> None:
    cluster_id, (hsm,) = make_cluster(threaded_moto, ["us-east-1a"])
    text = discover(threaded_moto, cluster_id)
    assert text.returncode == 0, text.stderr
    assert f"cluster {cluster_id} (us-east-1): ACTIVE, hsm2m.medium, 1 HSM" in text.stdout
    row = next(line.split() for line in text.stdout.splitlines() if hsm in line)
    assert row == [hsm, "us-east-1a", "10.0.0.10", "ACTIVE"]
    assert "warning NO_REDUNDANCY: 1 active HSM: no +1 redundancy" in text.stdout
    assert "warning NEW_KEY_DURABILITY:" in text.stdout

    as_json = json.loads(discover(threaded_moto, cluster_id, "--output", "json").stdout)
    assert [h["hsm_id"] for h in as_json["hsms"]] == [hsm]
    assert [w["code"] for w in as_json["warnings"]] == ["NO_REDUNDANCY", "NEW_KEY_DURABILITY"]
    assert as_json["max_keys"] == 16666

    strict = discover(threaded_moto, cluster_id, "--strict")
    assert one_error_line(strict) == f"error: 2 best-practice warnings for cluster {cluster_id}"


def test_two_hsms_in_one_zone(threaded_moto: str) -> None:
    cluster_id, hsms = make_cluster(threaded_moto, ["us-east-1b", "us-east-1b"])
    result = discover(threaded_moto, cluster_id, "--output", "json")
    assert codes(result) == ["NEW_KEY_DURABILITY", "SAME_AZ"]
    assert sorted(h["hsm_id"] for h in json.loads(result.stdout)["hsms"]) == sorted(hsms)
    text = discover(threaded_moto, cluster_id)
    assert "warning SAME_AZ: 2 HSMs in 1 Availability Zone (us-east-1b: 2)" in text.stdout
    assert "NO_REDUNDANCY" not in text.stdout


def test_three_hsms_in_three_zones_is_healthy(threaded_moto: str) -> None:
    cluster_id, hsms = make_cluster(threaded_moto, ["us-east-1c", "us-east-1a", "us-east-1b"])
    result = discover(threaded_moto, cluster_id, "--strict")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stdout
    assert "ok: the cluster follows CloudHSM's availability and durability advice" in result.stdout
    zones = [line.split()[1] for line in result.stdout.splitlines() if line.strip().startswith("hsm-")]
    assert zones == ["us-east-1a", "us-east-1b", "us-east-1c"]


def test_a_cluster_or_hsm_that_is_not_active_is_reported(threaded_moto: str) -> None:
    cluster_id, _ = make_cluster(threaded_moto, ["us-east-1a", "us-east-1b", "us-east-1c"], state="UNINITIALIZED")
    assert codes(discover(threaded_moto, cluster_id, "--output", "json")) == ["CLUSTER_NOT_ACTIVE"]
    replacing, _ = make_cluster(threaded_moto, ["us-east-1a", "us-east-1b"], hsm_state="CREATE_IN_PROGRESS")
    assert codes(discover(threaded_moto, replacing, "--output", "json")) == [
        "HSM_NOT_ACTIVE", "HSM_NOT_ACTIVE", "NO_REDUNDANCY", "NEW_KEY_DURABILITY"]


def test_an_unknown_cluster_is_one_error_line(threaded_moto: str) -> None:
    result = discover(threaded_moto, "cluster-doesnotexist")
    assert one_error_line(result) == "error: no CloudHSM cluster cluster-doesnotexist in us-east-1"


MINIMAL_CONFIG = """\
# operator's comment, kept
[gateway]
home_region = "us-east-1"

[pkcs11]
module = "/usr/lib/softhsm/libsofthsm2.so"

[store]
url = "sqlite:placements.db"

[replication]
copies = 1

[[clusters]]
name = "local"
region = "us-east-1"
"""


def test_discover_writes_and_then_checks_the_config_entry(threaded_moto: str, tmp_path: Path) -> None:
    cluster_id, hsms = make_cluster(threaded_moto, ["us-east-1a", "us-east-1b", "us-east-1c"])
    path = tmp_path / "hsmgw.toml"
    path.write_text(MINIMAL_CONFIG)

    missing = discover(threaded_moto, cluster_id, "--config", str(path), "--name", "use1-hsm")
    assert one_error_line(missing).endswith("has no [[clusters]] entry named 'use1-hsm'; add it with --write")
    assert f'token_label = "{cluster_id}"' in missing.stdout  # what it would write
    assert path.read_text() == MINIMAL_CONFIG

    written = discover(threaded_moto, cluster_id, "--config", str(path), "--name", "use1-hsm", "--write")
    assert written.returncode == 0, written.stderr
    assert f"config: appended [[clusters]] 'use1-hsm' to {path}" in written.stdout
    assert path.read_text().startswith(MINIMAL_CONFIG)  # comments and order kept
    assert all(hsm in path.read_text() for hsm in hsms)  # listed in a comment
    loaded = config_mod.load(path)  # still a valid gateway config
    entry = next(c for c in loaded.clusters if c.name == "use1-hsm")
    assert (entry.region, entry.token_label, entry.max_keys) == ("us-east-1", cluster_id, 16666)

    again = discover(threaded_moto, cluster_id, "--config", str(path), "--name", "use1-hsm", "--write",
                     "--output", "json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["config"]["status"] == "matches"
    assert path.read_text().count("[[clusters]]") == 2  # not appended twice

    # An entry that disagrees with the cluster is reported, not rewritten.
    data = tomllib.loads(path.read_text())
    assert data["clusters"][1]["name"] == "use1-hsm"
    path.write_text(path.read_text().replace("max_keys = 16666", "max_keys = 20000"))
    differs = discover(threaded_moto, cluster_id, "--config", str(path), "--name", "use1-hsm")
    assert "config: clusters[1].max_keys is 20000; a hsm2m.medium cluster holds at most 16666" in differs.stdout
    assert one_error_line(differs) == f"error: {path}: clusters[1] (use1-hsm) differs from the cluster"


def _cloudhsm_alarms(endpoint: str, prefix: str) -> dict[str, Any]:
    cw = boto("cloudwatch", endpoint, REGION)
    return {a["AlarmName"]: a for a in cw.describe_alarms(AlarmNamePrefix=prefix)["MetricAlarms"]}


def test_alarms_install_watches_the_hsms_of_a_cloudhsm_cluster(threaded_moto: str, tmp_path: Path) -> None:
    cluster_id, hsms = make_cluster(threaded_moto, ["us-east-1a", "us-east-1b", "us-east-1c"])
    path = tmp_path / "hsmgw.toml"
    path.write_text(MINIMAL_CONFIG + f'\n[cloudwatch]\nendpoint_url = "{threaded_moto}"\n')
    prefix = f"t{uuid.uuid4().hex[:6]}"
    result = hsmgw("alarms", "install", "--config", str(path), "--prefix", prefix,
                   "--cloudhsm", f"local={cluster_id}", "--endpoint-url", threaded_moto)
    assert result.returncode == 0, result.stderr
    alarms = _cloudhsm_alarms(threaded_moto, prefix)
    assert f"{len(alarms)} alarms created or updated" in result.stdout
    assert {f"{prefix}-local-keys-near-limit", f"{prefix}-local-hsm-unhealthy", f"{prefix}-local-hsm-key-sync",
            f"{prefix}-local-hsm-users-near-limit"} <= set(alarms)

    sync = alarms[f"{prefix}-local-hsm-key-sync"]
    queries = {q["Id"]: q for q in sync["Metrics"]}
    assert queries["spread"]["Expression"] == "MAX([h0,h1,h2]) - MIN([h0,h1,h2])"
    watched = sorted(
        {d["Name"]: d["Value"] for d in q["MetricStat"]["Metric"]["Dimensions"]}["HsmId"]
        for q in sync["Metrics"] if "MetricStat" in q
    )
    assert watched == sorted(hsms)
    assert all(q["MetricStat"]["Metric"]["MetricName"] == "HsmKeysTokenOccupied"
               for q in sync["Metrics"] if "MetricStat" in q)
    assert (sync["Threshold"], sync["ComparisonOperator"]) == (0.0, "GreaterThanThreshold")
    unhealthy = alarms[f"{prefix}-local-hsm-unhealthy"]
    assert {q["MetricStat"]["Metric"]["Namespace"] for q in unhealthy["Metrics"] if "MetricStat" in q} == {
        "AWS/CloudHSM"}

    # One HSM: nothing to compare, so no key-sync alarm (but it is unhealthy-watched).
    lone, _ = make_cluster(threaded_moto, ["us-east-1a"])
    prefix2 = f"t{uuid.uuid4().hex[:6]}"
    assert hsmgw("alarms", "install", "--config", str(path), "--prefix", prefix2,
                 "--cloudhsm", f"local={lone}", "--endpoint-url", threaded_moto).returncode == 0
    names = set(_cloudhsm_alarms(threaded_moto, prefix2))
    assert f"{prefix2}-local-hsm-unhealthy" in names and f"{prefix2}-local-hsm-key-sync" not in names


def _check(*args: str) -> tuple[int, dict[str, dict[str, Any]]]:
    result = hsmgw("alarms", "check", *args, "--output", "json")
    assert "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout)
    alarms = {a["name"]: a for a in report["alarms"]}
    assert report["stale"] == sum(a["state"] != "ok" for a in alarms.values())
    return result.returncode, alarms


def test_alarms_check_finds_what_an_hsm_replacement_or_a_hand_left_stale(threaded_moto: str, tmp_path: Path) -> None:
    from moto.cloudhsmv2.models import cloudhsmv2_backends
    from moto.core import DEFAULT_ACCOUNT_ID

    cluster_id, hsms = make_cluster(threaded_moto, ["us-east-1a", "us-east-1b"])
    path = tmp_path / "hsmgw.toml"
    path.write_text(MINIMAL_CONFIG + f'\n[cloudwatch]\nendpoint_url = "{threaded_moto}"\n')
    prefix = f"t{uuid.uuid4().hex[:6]}"
    args = ("--config", str(path), "--prefix", prefix, "--cloudhsm", f"local={cluster_id}",
            "--endpoint-url", threaded_moto)
    per_hsm = {f"{prefix}-local-hsm-unhealthy", f"{prefix}-local-hsm-key-sync", f"{prefix}-local-hsm-users-near-limit"}

    code, alarms = _check(*args)  # nothing installed yet
    assert code == 1 and per_hsm <= set(alarms) and {a["state"] for a in alarms.values()} == {"missing"}
    assert hsmgw("alarms", "install", *args).returncode == 0
    code, alarms = _check(*args)
    assert code == 0 and {a["state"] for a in alarms.values()} == {"ok"}, alarms

    # AWS replaces the HSM in us-east-1a: the alarms still watch its id, and only the per-HSM ones are stale.
    cluster = cloudhsmv2_backends[DEFAULT_ACCOUNT_ID][REGION].clusters[cluster_id]
    gone = cluster.hsms.pop(0)
    cluster.hsms.append({**gone, "HsmId": f"hsm-{uuid.uuid4().hex[:11]}", "EniIp": "10.0.9.9"})
    code, alarms = _check(*args)
    assert code == 1
    assert {name for name, a in alarms.items() if a["state"] != "ok"} == per_hsm
    assert all(alarms[name]["differs"] == ["Metrics"] for name in per_hsm)
    text = hsmgw("alarms", "check", *args)
    assert text.returncode == 1
    assert f"differs  {prefix}-local-hsm-unhealthy ({REGION}): Metrics" in text.stdout
    assert text.stdout.rstrip().endswith(f"{len(alarms) - 3} of {len(alarms)} alarms as install makes them; 3 missing "
                                         "or out of date: run `hsmgw alarms install` with the same arguments")
    assert hsmgw("alarms", "install", *args).returncode == 0
    assert _check(*args)[0] == 0

    # Changed and deleted by hand.
    cw = boto("cloudwatch", threaded_moto, REGION)
    limit = cw.describe_alarms(AlarmNames=[f"{prefix}-local-keys-near-limit"])["MetricAlarms"][0]
    cw.put_metric_alarm(**{k: limit[k] for k in ("AlarmName", "ComparisonOperator", "EvaluationPeriods", "Namespace",
                                                  "MetricName", "Statistic", "Period", "Dimensions")}, Threshold=95.0)
    cw.delete_alarms(AlarmNames=[f"{prefix}-local-hsm-key-sync"])
    code, alarms = _check(*args)
    assert code == 1
    assert {name: a["state"] for name, a in alarms.items() if a["state"] != "ok"} == {
        f"{prefix}-local-keys-near-limit": "differs", f"{prefix}-local-hsm-key-sync": "missing"}
    assert "Threshold" in alarms[f"{prefix}-local-keys-near-limit"]["differs"]
    assert hsmgw("alarms", "install", *args).returncode == 0
    assert _check(*args)[0] == 0


def test_alarms_check_that_cannot_read_cloudwatch_says_so_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "hsmgw.toml"
    path.write_text(MINIMAL_CONFIG + '\n[cloudwatch]\nendpoint_url = "http://127.0.0.1:1"\n')
    result = hsmgw("alarms", "check", "--config", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: reading the alarms in {REGION} failed: Could not connect"), result.stderr


def test_alarms_check_that_cannot_reach_cloudhsm_exits_2_and_install_1(tmp_path: Path) -> None:
    """A check that could not ask CloudHSM for the HSMs has found nothing stale: 2, as for
    CloudWatch. For install it is a failure like any other."""
    path = tmp_path / "hsmgw.toml"
    path.write_text(MINIMAL_CONFIG)
    args = ("--config", str(path), "--cloudhsm", "local=cluster-1234abcd", "--endpoint-url", "http://127.0.0.1:1")
    check = hsmgw("alarms", "check", *args)
    assert check.returncode == 2 and "Traceback" not in check.stderr, check.stderr
    assert check.stderr.startswith(f"error: describing cluster cluster-1234abcd in {REGION} failed: Could not connect")
    assert one_error_line(hsmgw("alarms", "install", *args)).startswith("error: describing cluster cluster-1234abcd")


def test_alarms_check_of_a_cluster_cloudhsm_does_not_know_exits_1(threaded_moto: str, tmp_path: Path) -> None:
    """A wrong cluster id is a finding about the arguments, not an outage."""
    path = tmp_path / "hsmgw.toml"
    path.write_text(MINIMAL_CONFIG)
    result = hsmgw("alarms", "check", "--config", str(path), "--cloudhsm", "local=cluster-doesnotexist",
                   "--endpoint-url", threaded_moto)
    assert one_error_line(result) == f"error: no CloudHSM cluster cluster-doesnotexist in {REGION}"


@pytest.mark.parametrize("flag", [None, "http://127.0.0.1:4566"])
def test_the_configs_cloudwatch_endpoint_is_not_used_for_cloudhsm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str | None
) -> None:
    """[cloudwatch] endpoint_url may be a VPC endpoint of CloudWatch's: CloudHSM's API is not
    there. Only --endpoint-url (one mock for both) sends CloudHSM's calls elsewhere."""
    from gateway import discover as discover_mod
    from gateway.cli.hsmgw import main

    asked: list[str | None] = []

    def record(cluster_id: str, region: str, endpoint_url: str | None = None) -> Any:
        asked.append(endpoint_url)
        raise discover_mod.DiscoveryError("stop here")

    monkeypatch.setattr(discover_mod, "discover", record)
    path = tmp_path / "hsmgw.toml"
    path.write_text(MINIMAL_CONFIG + '\n[cloudwatch]\nendpoint_url = "https://vpce-1.monitoring.example"\n')
    with pytest.raises(SystemExit):
        main(["alarms", "check", "--config", str(path), "--cloudhsm", "local=cluster-1234abcd",
              *(("--endpoint-url", flag) if flag else ())])
    assert asked == [flag]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cloudhsm", "nope=cluster-x"], "error: --cloudhsm 'nope=cluster-x': no cluster named 'nope' in"),
        (["--cloudhsm", "local"], "error: --cloudhsm 'local': expected NAME=CLUSTER_ID"),
        (["--threshold", "0"], "error: --threshold: expected a percentage in (0, 100]"),
    ],
)
@pytest.mark.parametrize("command", ["install", "check"])
def test_alarms_install_refuses_bad_arguments_with_one_line(
    tmp_path: Path, threaded_moto: str, args: list[str], message: str, command: str
) -> None:
    path = tmp_path / "hsmgw.toml"
    path.write_text(MINIMAL_CONFIG + f'\n[cloudwatch]\nendpoint_url = "{threaded_moto}"\n')
    assert one_error_line(hsmgw("alarms", command, "--config", str(path), *args)).startswith(message)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_kubernetes_alarms_check_runs_as_rendered_with_only_its_documented_permissions(
    threaded_moto: str, tmp_path: Path, overlay: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The CronJob's command line, as `kubectl kustomize` renders it, on the ConfigMap it mounts:
    every alarm missing before install (exit 1), none after; and the AWS calls it makes are
    exactly those deploy/cloudwatch/iam-alarms-check.json allows."""
    from gateway import cloudwatch
    from gateway.cli.hsmgw import main

    docs = render(overlay)
    configmap = one(docs, "ConfigMap", "hsmgw-config")["data"]
    for name, text in configmap.items():
        (tmp_path / name).write_text(text)
    args = alarms_check_args(docs)
    args[args.index("--config") + 1] = str(tmp_path / "hsmgw.toml")
    zones = [f"{overlay}a", f"{overlay}b"]
    for i, arg in enumerate(args):  # moto makes its own cluster ids: one cluster with two HSMs for each
        if i and args[i - 1] == "--cloudhsm":
            args[i] = f"{arg.split('=')[0]}={make_cluster(threaded_moto, zones, region=overlay)[0]}"
    # A prefix of this test's own, so that no other test's alarms in the shared moto count.
    args += ["--endpoint-url", threaded_moto, "--prefix", f"k{uuid.uuid4().hex[:6]}"]

    calls: set[str] = set()
    iam_prefix = {"cloudwatch": "cloudwatch", "cloudhsmv2": "cloudhsm"}
    make_client = cloudwatch.make_client

    def recording(service: str, region: str, endpoint_url: str | None = None) -> Any:
        client = make_client(service, region, endpoint_url)
        client.meta.events.register("before-call", lambda model, **_: calls.add(f"{iam_prefix[service]}:{model.name}"))
        return client

    monkeypatch.setattr(cloudwatch, "make_client", recording)

    def check() -> tuple[int, list[str]]:
        capsys.readouterr()
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        return code, capsys.readouterr().out.splitlines()

    code, lines = check()
    assert code == 1 and lines[:-1] and all(line.startswith("missing ") for line in lines[:-1]), lines
    prefix = args[-1]
    clusters = [args[i + 1].split("=")[0] for i, arg in enumerate(args) if arg == "--cloudhsm"]
    assert clusters and all(f"missing  {prefix}-{name}-hsm-unhealthy ({overlay})" in lines for name in clusters)
    policy = json.loads((ROOT / "deploy" / "cloudwatch" / "iam-alarms-check.json").read_text())
    allowed = {action for statement in policy["Statement"] for action in statement["Action"]}
    assert calls == allowed, "the check's role must allow exactly the calls it makes"

    main(["alarms", "install", *args[2:]])  # raises SystemExit on failure
    calls.clear()
    code, lines = check()
    assert code == 0 and lines[-1] == f"{len(lines) - 1} of {len(lines) - 1} alarms as install makes them", lines
    assert calls == allowed

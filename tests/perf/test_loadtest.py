"""A few-second smoke run of `hsmctl loadtest` and of `hsmgw bench` (no timing assertions)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.perf.bench import ROUTING_ROUNDS, Bench, busy_share, cpu_times
from gateway.perf.direct import DirectTarget
from gateway.perf.runner import RunError
from hsmgw.v1 import crypto_pb2 as pb
from router.model import Operation
from tests.support import ROOT, unique


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _loadtest(target: str, *args: str) -> dict:
    result = _run("gateway.cli.hsmctl", "--target", target, "--output", "json", "loadtest",
                  "--duration", "1", "--warmup", "0.2", *args)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["error_count"] == 0 and report["errors"] == {}
    assert report["throughput"] > 0 and report["ops"] > 0
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    return report


def test_loadtest_unary_sign_creates_its_key_and_reports_json(gateway) -> None:
    report = _loadtest(gateway.target, "--op", "sign", "--create", "1", "--processes", "2", "--in-flight", "2",
                       "--cleanup")
    assert report["workload"]["processes"] == 2 and len(report["created_keys"]) == 1
    assert report["direct"] is False


@pytest.mark.parametrize("mode", ["batch", "stream"])
def test_loadtest_batch_and_stream(gateway, mode: str) -> None:
    report = _loadtest(gateway.target, "--op", "sign", "--mode", mode, "--batch-size", "16", "--in-flight", "2")
    if mode == "batch":
        assert report["ops"] == 16 * report["calls"]


def test_loadtest_direct_uses_the_same_keys_without_the_gateway(gateway, fleet) -> None:
    made = _loadtest(gateway.target, "--op", "encrypt", "--create", "1")
    report = _loadtest(gateway.target, "--op", "encrypt", "--keys", made["created_keys"][0], "--direct",
                       "--config", str(fleet.config_path))
    assert report["direct"] is True and report["label"].startswith("direct PKCS #11")


def test_loadtest_refuses_a_mode_its_operation_lacks(gateway) -> None:
    result = _run("gateway.cli.hsmctl", "--target", gateway.target, "loadtest", "--op", "mac", "--mode", "batch",
                  "--keys", "any")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --mode batch is for sign (BatchSign, SignStream); mac is unary only")


def test_bench_smoke_run_writes_its_table_and_json(tmp_path: Path) -> None:
    markdown, data = tmp_path / "performance.md", tmp_path / "performance.json"
    markdown.write_text("# Performance\n\nprose kept\n\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n\nmore prose\n")
    result = _run("gateway.cli.hsmgw", "bench", "--only", "ecdsa,latency,routing", "--duration", "0.3",
                  "--rounds", "2", "--placements", "3000", "--markdown", str(markdown), "--json", str(data),
                  timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(data.read_text())["results"]
    rows = results["ecdsa"]["rows"]
    assert rows[0]["ratio"] == 1.0 and rows[0]["throughput"] > 0
    assert [r["errors"] for r in rows] == [0] * len(rows)
    names = [r["name"] for r in rows]
    assert any("BatchSign" in n for n in names) and any("p11-kit" in n for n in names)
    assert "h2load" in names[1] and names[5].startswith("floor")
    floor = rows[5]
    # Row 7: direct again, signing the way the gateway signs, measured once like rows 4 and 5.
    assert names[6] == "direct, the gateway's signing binding" and rows[6]["throughput"] > 0
    assert rows[6]["rounds"] == [] and rows[6]["ratio"] == pytest.approx(
        rows[6]["throughput"] / rows[0]["throughput"], abs=1e-3)
    # Direct, h2load, BatchSign and the floor are measured in rounds, each against its own
    # round's direct; the ratio shown is the median of the rounds'. The others once.
    has_h2load = shutil.which("h2load") is not None  # `make bench` installs it; `make test` does not
    directs = [r["throughput"] for r in rows[0]["rounds"]]
    assert len(directs) == 2 and all(d > 0 for d in directs)
    for row in (rows[0], rows[2], *((rows[1], floor) if has_h2load else ())):
        # A round that measured nothing (0.3 s on a busy machine) is left out of its row: each
        # round names the direct measurement it is a ratio to.
        assert row["rounds"] and all(r["direct"] in [round(d, 1) for d in directs] for r in row["rounds"]), row
        assert [r["ratio"] for r in row["rounds"]] == pytest.approx(
            [r["throughput"] / r["direct"] for r in row["rounds"]], abs=2e-3), row["name"]
        assert row["ratio"] == pytest.approx(statistics.median(r["ratio"] for r in row["rounds"]), abs=1e-3)
        assert row["throughput"] == pytest.approx(statistics.median(r["throughput"] for r in row["rounds"]), abs=0.1)
    assert rows[3]["rounds"] == [] and rows[3]["ratio"] == pytest.approx(rows[3]["throughput"] / rows[0]["throughput"],
                                                                         abs=1e-3)
    share = results["ecdsa"]["share_of_floor"]
    if has_h2load:
        shares = [a["throughput"] / b["throughput"] for a, b in zip(rows[1]["rounds"], floor["rounds"], strict=True)]
        assert share == pytest.approx(statistics.median(shares), abs=1e-3) and share > 0
    else:
        assert share is None and rows[1]["throughput"] is None and rows[1]["rounds"] == []
    busy = json.loads(data.read_text())["machine"]["busy_at_start"]
    assert 0.0 <= busy <= 1.0
    assert {"ECDSA_SHA256"} == set(results["latency"])
    runs = results["routing"]["runs"]
    assert [r["placements"] for r in runs] == [1000, 3000]
    assert all(r["errors"] == 0 and r["throughput"] and r["worker_rss_mb"] for r in runs)
    assert all(len(r["rounds"]) == ROUTING_ROUNDS for r in runs), "the warm-up turn is not counted"
    text = markdown.read_text()
    assert "prose kept" in text and "more prose" in text and "old" not in text
    assert "| 1. direct python-pkcs11" in text
    assert ("Gateway unary over the floor (row 2 ÷ row 6" in text) == (share is not None)
    if share is not None:
        assert f"(row 2 ÷ row 6, median of the rounds): **{share:.2f}**" in text
    assert "| × direct by round |" in text
    assert f"the cores were {100 * busy:,.0f} % busy (load average" in text


def test_the_idle_check_sees_what_the_cores_do_now() -> None:
    """The bench notes a busy machine from the cores' last seconds, not the trailing load average."""
    assert busy_share((100, 1000), (150, 1100)) == 0.5
    assert busy_share((100, 1000), (100, 1000)) == 0.0  # no ticks went by
    before = cpu_times()
    assert before is not None and 0 <= before[0] <= before[1]
    spin_until = time.process_time() + 0.3  # one core busy, whatever else the machine does
    while time.process_time() < spin_until:
        pass
    after = cpu_times()
    assert after is not None
    assert busy_share(before, after) > 0.2


def test_a_round_that_measured_nothing_is_left_out_of_the_medians() -> None:
    """A floor server that did not start, or h2load missing, in one round: that round's row has
    no throughput. The row's figures come from the rounds that measured, each against its own
    round's direct; a row no round measured keeps its note and no ratio."""
    from gateway.perf.bench import Row, _paired

    rows = [Row("r", 500.0, errors=1), Row("r", None, note="the floor server did not start"), Row("r", 900.0)]
    paired = _paired(rows, [1000.0, 1000.0, 1500.0])
    assert paired.throughput == 700.0 and paired.errors == 1
    assert [r["ratio"] for r in paired.rounds] == [0.5, 0.6]
    assert paired.ratio == 0.55
    nothing = _paired([Row("r", None, note="h2load is not installed")] * 2, [1000.0, 1000.0])
    assert nothing.throughput is None and nothing.ratio is None and nothing.note == "h2load is not installed"


@dataclasses.dataclass(frozen=True)
class _TokenMissingFirst:
    """A direct target whose first client process finds no token, as SoftHSM can show one that
    another process is rewriting; ``always``: every process (a label that is not there)."""

    target: DirectTarget
    marker: str
    always: bool = False

    def open(self, workload, process: int):
        from pkcs11.exceptions import NoSuchToken

        if self.always or not Path(self.marker).exists():
            Path(self.marker).touch()
            raise NoSuchToken("no token labelled 'use1-b'")
        return self.target.open(workload, process)


def test_a_direct_measurement_whose_token_hid_is_measured_again(tmp_path: Path, fleet, crypto) -> None:
    key_id = unique("bench-retry")
    crypto.GenerateKey(pb.GenerateKeyRequest(request_id=unique("req"), key_id=key_id,
                                             algorithm=pb.KEY_ALGORITHM_EC_P256))
    bench = Bench(argparse.Namespace(duration=0.3, only="ecdsa", workers=2, rounds=1))
    shutil.rmtree(bench.workdir)  # nothing here runs a gateway
    workload = bench.workload(Operation.ECDSA_SHA256, key_id, processes=1, in_flight=1)
    direct = DirectTarget(str(fleet.config_path))

    report = bench.measure("direct", workload, _TokenMissingFirst(direct, str(tmp_path / "once")))
    assert report.throughput > 0 and report.error_count == 0
    assert bench.notes == ["direct: client process 0: NoSuchToken: no token labelled 'use1-b'; "
                           "measured again with new client processes"]

    with pytest.raises(RunError, match="NoSuchToken"):  # twice is not chance: the bench stops
        bench.measure("direct", workload, _TokenMissingFirst(direct, str(tmp_path / "always"), always=True))
    unknown = dataclasses.replace(workload, key_ids=("no-such-key",))
    notes = list(bench.notes)
    with pytest.raises(RunError, match="RuntimeError: key 'no-such-key' is not in"):
        bench.measure("direct", unknown, direct)
    assert bench.notes == notes, "other failures are not measured again"

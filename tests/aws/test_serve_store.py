"""``hsmgw serve`` on a DynamoDB placement store it cannot use: a table that does not
exist stops it for good (EX_CONFIG: systemd and Kubernetes should not restart it), an
endpoint that does not answer ends it with status 1 (it may answer on the next start).
Either way one line, and before any HSM login."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.fleet import Fleet, init_fleet
from gateway.workers import EXIT_CONFIG
from tests.aws.conftest import REGION, MotoServer, free_port
from tests.support import ROOT


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return init_fleet(tmp_path_factory.mktemp("store-fleet"), listen="127.0.0.1:0")


def _serve_on(fleet: Fleet, name: str, url: str) -> subprocess.CompletedProcess[str]:
    text = fleet.config_path.read_text()
    assert 'url = "sqlite:placements.db"' in text
    config = fleet.config_path.with_name(f"{name}.toml")
    config.write_text(text.replace('url = "sqlite:placements.db"', f'url = "{url}"'))
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli.hsmgw", "serve", "--config", str(config), "--workers", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert "sessions open" not in output, "logged in to the HSMs before opening the store"
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and output.count("error: ") == 1, output
    return last


def test_a_table_that_does_not_exist_stops_the_gateway_for_good(fleet: Fleet, moto_server: MotoServer) -> None:
    result = _serve_on(fleet, "typo-table", moto_server.store_url("hsmgw-placemnets"))
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert _one_line(result) == (
        f"error: store.url: placement store dynamodb://hsmgw-placemnets: no table 'hsmgw-placemnets' in {REGION} "
        f"at {moto_server.endpoint} (get_item: ResourceNotFoundException); check the table name, or create it "
        "with `hsmgw store init`"
    )


def test_an_endpoint_that_does_not_answer_ends_the_gateway_to_be_started_again(fleet: Fleet, tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    result = _serve_on(fleet, "no-endpoint", f"dynamodb://hsmgw-placements?region={REGION}&endpoint={endpoint}")
    assert result.returncode == 1, result.stderr
    line = _one_line(result)
    assert line.startswith("error: store.url: placement store dynamodb://hsmgw-placements unreachable: "), line

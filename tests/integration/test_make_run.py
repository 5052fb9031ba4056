"""`make run` (the README's first command) brings up a serving gateway."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_make_run_serves_health_and_reflection(tmp_path: Path) -> None:
    port = _free_port()
    target = f"127.0.0.1:{port}"
    log = open(tmp_path / "make-run.log", "wb")
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "run", f"STATE={tmp_path / 'state'}", f"LISTEN={target}"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MAKEFLAGS": ""},
    )
    try:
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            end = time.monotonic() + 120
            while True:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                    break
                except grpc.RpcError:
                    assert proc.poll() is None, (tmp_path / "make-run.log").read_text()
                    assert time.monotonic() < end, "make run did not serve within 120 s"
                    time.sleep(0.3)
            assert status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            names = {s.name for a in answers for s in a.list_services_response.service}
            assert "hsmgw.v1.CryptoService" in names
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
    output = (tmp_path / "make-run.log").read_text()
    assert "PLAINTEXT" in output and "TLS" in output, "the plaintext warning is missing"

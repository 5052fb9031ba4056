"""Log format choice and the request id, as an operator reads them; and the observability
config keys, refused with the key path named."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import config as config_mod
from gateway import logs


@pytest.fixture
def root_logger() -> Iterator[None]:
    """Restore the root logger's handlers and level after a test configures it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_auto_is_json_in_a_pipe_and_human_on_a_terminal() -> None:
    primary, secondary = os.openpty()
    try:
        with open(secondary, "w", closefd=False) as terminal:
            assert logs.choose_format("auto", terminal, environ={}) == "human"
            assert logs.choose_format("auto", terminal, environ={"HSMGW_LOG_FORMAT": "json"}) == "json"
    finally:
        os.close(primary)
        os.close(secondary)
    assert logs.choose_format("auto", io.StringIO(), environ={}) == "json"
    assert logs.choose_format("human", io.StringIO(), environ={"HSMGW_LOG_FORMAT": "json"}) == "human"
    with pytest.raises(ValueError, match="HSMGW_LOG_FORMAT='xml'"):
        logs.choose_format("auto", io.StringIO(), environ={"HSMGW_LOG_FORMAT": "xml"})


def test_json_lines_carry_the_request_id_audit_fields_and_tracebacks(root_logger: None) -> None:
    out = io.StringIO()
    logs.configure(fmt="json", stream=out)
    logs.configure(fmt="json", stream=out)  # twice: still one handler, one line per record
    log = logging.getLogger("router.test")
    log.info("outside")
    token = logs.set_request_id(logs.accept_request_id("client-chosen.id-1"))
    try:
        log.warning("inside %s", "a request", extra={"cluster": "use1-a"})
        logging.getLogger("hsmgw.audit").info(json.dumps({"event": "authz.granted", "method": "Sign"}))
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    finally:
        logs.reset_request_id(token)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["message"] for line in lines][:2] == ["outside", "inside a request"]
    assert len(lines) == 4
    assert "request_id" not in lines[0]
    assert {line["request_id"] for line in lines[1:]} == {"client-chosen.id-1"}
    assert lines[1]["cluster"] == "use1-a" and lines[1]["level"] == "WARNING"
    assert lines[2]["audit"] == {"event": "authz.granted", "method": "Sign"}
    assert "RuntimeError: boom" in lines[3]["exception"]


def test_a_request_id_that_could_forge_log_lines_is_replaced() -> None:
    for offered in ("two words", 'quote"d', "x" * 129, "", None, "line\nbreak"):
        replaced = logs.accept_request_id(offered)
        assert replaced != offered and len(replaced) == 32
    assert logs.accept_request_id("req-7f3a/2026") == "req-7f3a/2026"


def test_human_lines_show_the_request_id(root_logger: None) -> None:
    out = io.StringIO()
    logs.configure(fmt="human", stream=out)
    token = logs.set_request_id("abc123")
    try:
        logging.getLogger("gateway.test").info("hello")
    finally:
        logs.reset_request_id(token)
    assert out.getvalue().rstrip().endswith(" INFO [abc123] gateway.test: hello")


BASE = """
[gateway]
home_region = "us-east-1"
[pkcs11]
module = "/x.so"
[store]
url = "sqlite:p.db"
[replication]
copies = 1
[[clusters]]
name = "a"
region = "us-east-1"
"""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[metrics]\nlisten = "9464"\n', "metrics.listen: expected host:port"),
        ('[metrics]\nport = 1\n', "metrics.port: unknown key"),
        ("[cloudwatch]\ninterval = 0\n", "cloudwatch.interval: must be greater than 0"),
        ('[cloudwatch]\nnamespace = "AWS/CloudHSM"\n', "cloudwatch.namespace: 'AWS/CloudHSM' is empty or reserved"),
        ('[cloudwatch]\nendpoint_url = "localhost:4566"\n', "cloudwatch.endpoint_url: expected an http(s) URL"),
        ('[cloudwatch]\nenabled = "yes"\n', "cloudwatch.enabled: expected bool"),
    ],
)
def test_bad_observability_settings_name_their_key(tmp_path: Path, extra: str, message: str) -> None:
    path = tmp_path / "hsmgw.toml"
    path.write_text(BASE + extra)
    with pytest.raises(config_mod.ConfigError, match=re.escape(message)):
        config_mod.load(path)


def test_observability_defaults_are_off(tmp_path: Path) -> None:
    path = tmp_path / "hsmgw.toml"
    path.write_text(BASE)
    config = config_mod.load(path)
    assert config.metrics.listen == ""  # no port opened unless asked
    assert (config.cloudwatch.enabled, config.cloudwatch.namespace, config.cloudwatch.interval) == (
        False, "HSMGW", 60.0)
    path.write_text(BASE + '[metrics]\nlisten = "[::1]:9464"\n[cloudwatch]\nenabled = true\nregion = "eu-west-1"\n')
    config = config_mod.load(path)
    assert config.metrics.listen == "[::1]:9464"
    assert (config.cloudwatch.enabled, config.cloudwatch.region) == (True, "eu-west-1")


_FINALIZER_FAILS = """
import sys, threading
from gateway import logs
logs.configure(fmt="json", stream=sys.stdout)
logs.capture_unraisable()

class Search:
    def __del__(self):
        raise RuntimeError("the module never began it")

def drop():
    Search()  # its finalizer fails as the last reference goes
    try:
        raise LookupError("printed by an extension")
    except LookupError:
        sys.excepthook(*sys.exc_info())  # as Cython prints an error it cannot raise

thread = threading.Thread(target=drop)
thread.start()
thread.join()
"""


def test_errors_python_cannot_raise_are_one_json_line_each() -> None:
    """A finalizer's failure (python-pkcs11's search finalizer, during HSM faults) was printed on
    stderr as a traceback, in the middle of the gateway's JSON lines."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FINALIZER_FAILS], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    entries = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(e["level"], e["logger"], e["exception_type"]) for e in entries] == [
        ("WARNING", logs.UNRAISABLE_LOGGER, "RuntimeError"), ("WARNING", logs.UNRAISABLE_LOGGER, "LookupError")]
    assert "Search.__del__" in entries[0]["message"] and "the module never began it" in entries[0]["message"]
    assert not [e for e in entries if "exception" in e]  # no traceback unless debugging


def test_grpc_core_is_quiet_unless_the_operator_chose_a_verbosity() -> None:
    env: dict[str, str] = {}
    logs.quiet_grpc_core(env)
    assert env == {"GRPC_VERBOSITY": "ERROR"}
    env = {"GRPC_VERBOSITY": "INFO"}
    logs.quiet_grpc_core(env)
    assert env == {"GRPC_VERBOSITY": "INFO"}
    env = {"GRPC_VERBOSITY": "ERROR"}
    logs.quiet_grpc_core(env, level=logs.HANDSHAKES_GRPC_VERBOSITY)  # a gateway serving TLS
    assert env == {"GRPC_VERBOSITY": "ERROR"}
    env = {"GRPC_VERBOSITY": " "}
    logs.quiet_grpc_core(env, level=logs.HANDSHAKES_GRPC_VERBOSITY)
    assert env == {"GRPC_VERBOSITY": "INFO"}

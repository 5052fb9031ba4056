"""The CLIs as a user runs them: ``hsmgw fleet init``, ``hsmgw serve`` refusing a bad
configuration with one clear line, and ``hsmctl`` against a running gateway."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.fleet import Fleet, init_fleet
from gateway.workers import EXIT_CONFIG
from hsmgw.v1 import crypto_pb2 as pb
from tests.support import ROOT, running, unique

CLUSTERS = ("use1-a", "use1-b", "usw2-a")
REGIONS = {"use1-a": "us-east-1", "use1-b": "us-east-1", "usw2-a": "us-west-2"}


def _user_env(**extra: str) -> dict[str, str]:
    """The caller's environment, minus what the test process itself set up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSMGW_PIN_") and k != "SOFTHSM2_CONF"}
    return {**env, **extra}


def _run(
    module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env or _user_env(),
        capture_output=True, text=True, timeout=timeout,
    )


def hsmgw(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return _run("gateway.cli.hsmgw", *args, **kw)


def hsmctl(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return _run("gateway.cli.hsmctl", *args, **kw)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """A failure ends with exactly one ``error:`` line, last, and no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], output
    return errors[0]


# -- hsmgw fleet init ---------------------------------------------------------------------


def _token_labels(state: Path) -> set[str]:
    out = subprocess.run(
        ["softhsm2-util", "--show-slots"], env={**_user_env(), "SOFTHSM2_CONF": str(state / "softhsm2.conf")},
        capture_output=True, text=True, check=True,
    ).stdout
    fields = (line.strip().partition(":") for line in out.splitlines())
    return {value.strip() for key, _, value in fields if key == "Label" and value.strip()}


def _snapshot(state: Path) -> dict[str, tuple[int | None, str]]:
    """Every file and directory under ``state``: mtime and content hash.

    SoftHSM itself rewrites a token's ``generation`` file, with the same bytes,
    whenever the module opens the token (any ``softhsm2-util --show-slots`` does),
    so for that file only its content counts.
    """
    snap: dict[str, tuple[int | None, str]] = {}
    for path in sorted(state.rglob("*")):
        rel = str(path.relative_to(state))
        if path.is_dir():
            snap[rel] = (None, "dir")
        else:
            mtime = None if path.name == "generation" else path.stat().st_mtime_ns
            snap[rel] = (mtime, hashlib.sha256(path.read_bytes()).hexdigest())
    return snap


def _pins(state: Path) -> dict[str, dict[str, str]]:
    return tomllib.loads((state / "secrets.toml").read_text())["clusters"]


def test_fleet_init_creates_then_changes_nothing_then_force_rebuilds(tmp_path: Path) -> None:
    state = tmp_path / "state"
    init = ("fleet", "init", "--state-dir", str(state), "--listen", "127.0.0.1:0")

    first = hsmgw(*init)
    assert first.returncode == 0, first.stderr
    for name in CLUSTERS:
        assert f"created token {name}" in first.stdout
    assert _token_labels(state) == set(CLUSTERS)
    assert len([p for p in (state / "tokens").iterdir() if p.is_dir()]) == 3
    secrets = state / "secrets.toml"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    pins = _pins(state)
    assert set(pins) == set(CLUSTERS)
    assert len({p["user_pin"] for p in pins.values()} | {p["so_pin"] for p in pins.values()}) == 6
    config = tomllib.loads((state / "hsmgw.toml").read_text())
    assert config["server"]["listen"] == "127.0.0.1:0"
    assert {c["name"]: c["region"] for c in config["clusters"]} == REGIONS
    for pin in pins.values():  # PINs live in secrets.toml only
        assert pin["user_pin"] not in (state / "hsmgw.toml").read_text()
    assert (state / "placements.db").read_bytes().startswith(b"SQLite format 3\x00")
    assert f"config: {state / 'hsmgw.toml'}" in first.stdout

    before = _snapshot(state)
    second = hsmgw(*init)
    assert second.returncode == 0, second.stderr
    assert "nothing changed" in second.stdout and "created" not in second.stdout
    assert _snapshot(state) == before
    assert _pins(state) == pins
    elsewhere = hsmgw("fleet", "init", "--state-dir", str(state), "--listen", "127.0.0.1:50999")
    assert elsewhere.returncode == 0 and _snapshot(state) == before  # an existing config is not rewritten...
    assert ("note: the existing config keeps listen = '127.0.0.1:0'; edit [server] listen there, or serve with "
            "--listen 127.0.0.1:50999") in elsewhere.stderr  # ...and it says so
    assert hsmgw("fleet", "init", "--state-dir", str(state)).stderr == ""

    token_dirs = {p.name for p in (state / "tokens").iterdir()}
    forced = hsmgw(*init, "--force")
    assert forced.returncode == 0, forced.stderr
    for name in CLUSTERS:
        assert f"created token {name}" in forced.stdout
    assert _token_labels(state) == set(CLUSTERS)
    new_pins = _pins(state)
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    for name in CLUSTERS:
        assert new_pins[name]["user_pin"] != pins[name]["user_pin"]
        assert new_pins[name]["so_pin"] != pins[name]["so_pin"]
    assert not token_dirs & {p.name for p in (state / "tokens").iterdir()}, "--force kept old tokens"


# -- hsmgw serve refuses a bad configuration ----------------------------------------------------


@pytest.fixture(scope="module")
def spare_fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """A fleet of its own, so broken configs and wrong PINs never touch the shared one."""
    return init_fleet(tmp_path_factory.mktemp("cli-fleet"), listen="127.0.0.1:0")


def _edited(fleet: Fleet, name: str, edit: Callable[[str], str]) -> Path:
    """A copy of the fleet's config, next to it (relative paths still resolve), with one edit."""
    original = fleet.config_path.read_text()
    text = edit(original)
    assert text != original, f"edit {name} changed nothing: the fleet template moved"
    path = fleet.config_path.with_name(f"{name}.toml")
    path.write_text(text)
    return path


def _replace(old: str, new: str) -> Callable[[str], str]:
    return lambda text: text.replace(old, new, 1)


BAD_CONFIGS = [
    ("listen-all-interfaces", _replace('listen = "127.0.0.1:0"', 'listen = "0.0.0.0:0"'),
     ("server.listen", "loopback")),
    ("no-tls", _replace("insecure_plaintext = true", "insecure_plaintext = false"),
     ("server.insecure_plaintext", "TLS")),
    ("misspelled-cluster-key", _replace('token_label = "use1-a"\n', 'token_label = "use1-a"\nmax_key = 3\n'),
     ("clusters[0].max_key", "unknown key")),
    ("zero-max-keys", _replace("max_keys = 3300", "max_keys = 0"), ("clusters[0].max_keys",)),
    ("threads-as-string", _replace("[server]\n", '[server]\nthreads = "16"\n'), ("server.threads", "int")),
    ("unknown-home-region", _replace('home_region = "us-east-1"', 'home_region = "eu-west-1"'),
     ("gateway.home_region", "eu-west-1")),
    ("audit-log-in-a-missing-directory", lambda text: text + '\n[admin]\naudit_log = "no-such-dir/audit.log"\n',
     ("admin.audit_log", "cannot write", "no-such-dir/audit.log", "No such file or directory")),
    ("audit-log-not-a-log", lambda text: text + '\n[admin]\naudit_log = "hsmgw.toml"\n',
     ("admin.audit_log", "not an audit record")),
]


@pytest.mark.parametrize(("name", "edit", "says"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_serve_refuses_bad_config_with_one_clear_line(
    spare_fleet: Fleet, name: str, edit: Callable[[str], str], says: tuple[str, ...]
) -> None:
    config = _edited(spare_fleet, name, edit)
    result = hsmgw("serve", "--config", str(config), timeout=30)
    line = one_error_line(result)
    for word in says:
        assert word in line, line
    assert str(config) in line, "the error names the file to fix"


def test_serve_warns_about_pools_and_timeouts_a_hung_hsm_would_turn_against_it(spare_fleet: Fleet) -> None:
    """A cluster whose calls may outlast the default deadline, or whose sessions could take
    every request thread: both start, with a warning that says what a hang would do."""
    config = _edited(spare_fleet, "hang-prone", _replace(
        'token_label = "use1-b"\n', 'token_label = "use1-b"\ncall_timeout = 10.0\n'))
    config.write_text(config.read_text().replace("[server]\n", "[server]\nthreads = 4\n", 1))
    with running(config, env=_user_env()) as gateway:
        result = hsmctl("--target", gateway.target, "--output", "json", "clusters")
        assert result.returncode == 0, result.stderr
        log = gateway.log()
    assert ("cluster use1-b: call_timeout (10 s) is not below server.default_deadline (10 s): a request "
            "waiting on this cluster when it hangs has no time left for a replica") in log
    assert "cluster use1-a: call_timeout" not in log
    for cluster in ("use1-a", "use1-b", "usw2-a"):  # the fleet's pools have 4 sessions
        assert (f"cluster {cluster}: pool_size (4) is not below server.threads (4): if its HSM hangs, calls "
                "stuck in it can hold every request thread") in log


def test_serve_warns_that_a_quorum_of_one_lets_one_admin_do_everything(spare_fleet: Fleet) -> None:
    config = _edited(spare_fleet, "quorum-one", lambda text: text + "\n[admin]\nquorum = 1\n")
    with running(config, env=_user_env()) as gateway:
        log = gateway.log()
    assert ("[admin] quorum = 1: one admin alone drains, fails over, moves and destroys keys, for every gateway "
            "on this placement store; production wants 2 or more") in log


def test_serve_with_wrong_pin_names_the_cluster_and_no_pin(spare_fleet: Fleet, tmp_path: Path) -> None:
    wrong = "000000"
    result = hsmgw("serve", "--config", str(spare_fleet.config_path), timeout=30,
                   env=_user_env(HSMGW_PIN_USE1_A=wrong))
    line = one_error_line(result)
    assert "use1-a" in line and "pin" in line.lower(), line
    output = result.stdout + result.stderr
    assert wrong not in output
    for cluster, pins in _pins(spare_fleet.state_dir).items():
        for kind, pin in pins.items():
            assert pin not in output, f"{cluster} {kind} leaked"

    # The same fleet with its own PINs starts: the refusal was about the PIN alone.
    with running(spare_fleet.config_path, env=_user_env()) as gateway:
        result = hsmctl("--target", gateway.target, "--output", "json", "clusters")
        assert result.returncode == 0, result.stderr
        assert {c["name"] for c in json.loads(result.stdout)["clusters"]} == set(CLUSTERS)


# -- hsmctl -------------------------------------------------------------------------------------


def _hsmctl_script() -> list[str]:
    """The installed console script, as a user types it (``-m`` if it is not installed)."""
    script = Path(sys.executable).parent / "hsmctl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway.cli.hsmctl"]


def test_hsmctl_clusters_table_and_json(gateway: Any) -> None:
    table = subprocess.run([*_hsmctl_script(), "--target", gateway.target, "clusters"], cwd=ROOT, env=_user_env(),
                           capture_output=True, text=True, timeout=30)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.strip().splitlines()
    assert header.split()[:3] == ["CLUSTER", "REGION", "HEALTH"]
    assert {row.split()[0]: row.split()[1] for row in rows} == REGIONS
    assert all(row.split()[2] == "SERVING" for row in rows), rows

    result = hsmctl("--target", gateway.target, "--output", "json", "clusters")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["home_region"] == "us-east-1"
    assert {c["name"]: c["region"] for c in data["clusters"]} == REGIONS
    for cluster in data["clusters"]:
        assert cluster["pool_size"] > 0, cluster
        assert 0 <= cluster["sessions_in_use"] <= cluster["sessions_open"] <= cluster["pool_size"], cluster


def test_hsmctl_lists_and_shows_keys(crypto: Any, gateway: Any) -> None:
    prefix = unique("cli")
    made = {}
    for name, algorithm in (("sign", pb.KEY_ALGORITHM_EC_P256), ("seal", pb.KEY_ALGORITHM_AES_256)):
        key_id = f"{prefix}/{name}"
        made[key_id] = crypto.GenerateKey(
            pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, algorithm=algorithm), timeout=30)
    target = ("--target", gateway.target)

    listed = hsmctl(*target, "keys", "list", "--prefix", prefix + "/")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.strip().splitlines()
    assert header.split()[:4] == ["KEY", "ALGORITHM", "STATE", "PRIMARY"]
    assert {row.split()[0]: (row.split()[1], row.split()[3]) for row in rows} == {
        f"{prefix}/sign": ("EC_P256", made[f"{prefix}/sign"].primary_cluster),
        f"{prefix}/seal": ("AES_256", made[f"{prefix}/seal"].primary_cluster),
    }

    as_json = hsmctl(*target, "--output", "json", "keys", "list", "--prefix", prefix + "/")
    assert as_json.returncode == 0, as_json.stderr
    assert {k["key_id"]: k["primary_cluster"] for k in json.loads(as_json.stdout)} == {
        k: v.primary_cluster for k, v in made.items()
    }

    key_id, key = f"{prefix}/sign", made[f"{prefix}/sign"]
    shown = hsmctl(*target, "keys", "show", key_id)
    assert shown.returncode == 0, shown.stderr
    row = shown.stdout.strip().splitlines()[1].split()
    assert (row[0], row[1], row[2], row[3]) == (key_id, "EC_P256", "ENABLED", key.primary_cluster)

    shown_json = hsmctl(*target, "--output", "json", "keys", "show", key_id)
    assert shown_json.returncode == 0, shown_json.stderr
    data = json.loads(shown_json.stdout)
    assert (data["key_id"], data["primary_cluster"], data["algorithm"]) == (
        key_id, key.primary_cluster, "KEY_ALGORITHM_EC_P256")


def test_hsmctl_missing_key_fails_with_one_line(gateway: Any) -> None:
    result = hsmctl("--target", gateway.target, "keys", "show", "missing/key")
    line = one_error_line(result)
    assert "NOT_FOUND" in line and "missing/key" in line, line
    assert result.stdout == ""
    assert result.stderr.strip() == line


def test_hsmctl_unreachable_gateway_fails_with_one_line() -> None:
    result = hsmctl("--target", "127.0.0.1:1", "--timeout", "5", "clusters")
    line = one_error_line(result)
    assert "UNAVAILABLE" in line, line


# -- hsmctl's TLS options -------------------------------------------------------------------


def test_the_tls_section_dev_certs_prints_works_in_a_config_file_anywhere(tmp_path: Path) -> None:
    """Run from one directory with a relative --out, the printed [server.tls] section is pasted
    into a config file in another: its paths must still name the files (a config file reads
    relative paths from its own directory, so `tls/server.pem` pointed at nothing there)."""
    import shlex
    import tomllib

    here = tmp_path / 'a "dev" dir'  # a space, quotes: the paths are quoted for TOML and the shell
    here.mkdir()
    result = subprocess.run([sys.executable, "-m", "gateway.cli.hsmgw", "dev", "certs", "--out", "tls",
                             "--client", "ops"], cwd=here, env=_user_env(PYTHONPATH=str(ROOT)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    section = result.stdout[result.stdout.index("[server.tls]"):].split("\n\n")[0]
    elsewhere = tmp_path / "etc" / "hsmgw"
    elsewhere.mkdir(parents=True)
    (elsewhere / "tls.toml").write_text(section + "\n")
    tls = tomllib.loads((elsewhere / "tls.toml").read_text())["server"]["tls"]
    assert set(tls) == {"cert_file", "key_file", "client_ca_file"}
    assert all((elsewhere / path).is_file() for path in tls.values()), tls
    hsmctl_line = next(line for line in result.stdout.splitlines() if line.startswith("hsmctl --ca "))
    words = shlex.split(hsmctl_line)
    assert all(Path(word).is_file() and Path(word).is_absolute() for word in words[2:7:2]), hsmctl_line


def test_hsmctl_refuses_half_a_client_certificate_and_names_a_missing_file(gateway: Any, tmp_path: Path) -> None:
    from gateway.tls import write_dev_certs

    certs = write_dev_certs(tmp_path / "certs", ["ops"])
    cert, key = certs.client("ops")
    for half in (["--cert", str(cert)], ["--key", str(key)]):
        result = hsmctl("--target", gateway.target, "--ca", str(certs.ca), *half, "clusters")
        assert result.returncode == 1, result  # not an abort inside gRPC (SIGABRT, 134)
        assert one_error_line(result) == ("error: --cert and --key go together: the client certificate and its "
                                          "private key")
    missing = tmp_path / "no-such-ca.pem"
    result = hsmctl("--target", gateway.target, "--ca", str(missing), "clusters")
    assert one_error_line(result) == f"error: --ca {missing}: No such file or directory"


def test_hsmctl_with_a_client_certificate_never_falls_back_to_plaintext(gateway: Any, tmp_path: Path) -> None:
    """Without --ca the system's roots verify the gateway; the certificate is not ignored,
    so a plaintext gateway is not reached (it was, silently, without the certificate)."""
    from gateway.tls import write_dev_certs

    cert, key = write_dev_certs(tmp_path / "certs", ["ops"]).client("ops")
    assert hsmctl("--target", gateway.target, "clusters").returncode == 0
    result = hsmctl("--target", gateway.target, "--timeout", "3", "--cert", str(cert), "--key", str(key), "clusters")
    assert result.returncode == 1 and "CLUSTER" not in result.stdout, result  # not "try again later"


def test_hsmctl_takes_its_own_options_after_the_command_and_a_usage_error_is_not_an_outage(gateway: Any) -> None:
    """The examples `hsmctl status --output json` and `hsmctl loadtest ... --output json`
    work as written; a wrong command line exits 1, never 2 (the gateway could not be reached)."""
    result = hsmctl("status", "--output", "json", "--target", gateway.target)
    assert result.returncode in (0, 4, 5), result.stderr  # 4, 5: status found warnings, a cluster down
    assert {c["name"] for c in json.loads(result.stdout)["clusters"]} == {"use1-a", "use1-b", "usw2-a"}
    result = hsmctl("rebalance", f"--target={gateway.target}")
    assert result.returncode == 1
    assert one_error_line(result) == "error: hsmctl rebalance: one of the arguments --plan --apply is required"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_refuses_a_taken_port_or_a_bad_listen_address_with_one_line(spare_fleet: Fleet, workers: str) -> None:
    """`--workers 1` is what the Kubernetes Deployment runs: one line there too, not a traceback."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = hsmgw("serve", "--config", str(spare_fleet.config_path), "--workers", workers,
                       "--listen", f"127.0.0.1:{port}", timeout=60, env=_user_env())
    assert one_error_line(result).endswith(f"server.listen: cannot listen on 127.0.0.1:{port}: Address already in use")
    result = hsmgw("serve", "--config", str(spare_fleet.config_path), "--workers", workers,
                   "--listen", "127.0.0.1:abc", timeout=60, env=_user_env())
    assert one_error_line(result).endswith("server.listen: expected host:port, got '127.0.0.1:abc'")


def test_serve_names_a_config_that_is_a_directory_or_not_toml_once(spare_fleet: Fleet, tmp_path: Path) -> None:
    result = hsmgw("serve", "--config", str(tmp_path), timeout=30)
    assert one_error_line(result) == f"error: cannot read the config file {tmp_path}: Is a directory"
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway\n")
    line = one_error_line(hsmgw("serve", "--config", str(bad), timeout=30))
    assert line.startswith(f"error: {bad}: not valid TOML") and line.count(str(bad)) == 1, line


def _secrets_variant(fleet: Fleet, name: str, make: Callable[[Path], None]) -> Path:
    """A config of ``fleet`` whose secrets file is ``name``, made by ``make``."""
    make(fleet.state_dir / name)
    return _edited(fleet, f"secrets-{name}", _replace('file = "secrets.toml"', f'file = "{name}"'))


def _pin_as_number(path: Path) -> None:
    pins = (path.parent / "secrets.toml").read_text()
    path.write_text(re.sub(r'(?m)^user_pin = "[^"]*"$', "user_pin = 123456", pins))
    path.chmod(0o600)


def _latin1_pin(path: Path) -> None:
    path.write_bytes((path.parent / "secrets.toml").read_bytes().replace(b'user_pin = "', b'user_pin = "\xe9', 1))
    path.chmod(0o600)


def _store_url(url: str) -> Callable[[str], str]:
    return _replace('url = "sqlite:placements.db"', f'url = "{url}"')


UNUSABLE_FILES: list[tuple[str, Callable[[Fleet], Path], str]] = [
    ("secrets-file-is-a-directory", lambda f: _secrets_variant(f, "secrets-dir", lambda p: p.mkdir(0o700)),
     "secrets.file: {state}/secrets-dir is a directory, not a file"),
    ("secrets-file-not-utf8", lambda f: _secrets_variant(f, "secrets-latin1.toml", _latin1_pin),
     "secrets.file: {state}/secrets-latin1.toml is not UTF-8 text; TOML files are UTF-8"),
    ("pin-as-a-number", lambda f: _secrets_variant(f, "secrets-number.toml", _pin_as_number),
     "secrets.file: clusters.use1-a.user_pin in {state}/secrets-number.toml is a number, not a string"),
    ("sqlite-store-in-a-missing-directory",
     lambda f: _edited(f, "store-no-dir", _store_url("sqlite:/nonexistent/dir/p.db")),
     "store.url: cannot open placement store /nonexistent/dir/p.db: the directory /nonexistent/dir does not exist"),
    ("sqlite-store-is-a-directory",
     lambda f: _edited(f, "store-is-dir", _store_url(f"sqlite:{f.state_dir}")),
     "store.url: cannot open placement store {state}: it is a directory"),
    ("sqlite-store-name-too-long",
     lambda f: _edited(f, "store-too-long", _store_url(f"sqlite:{f.state_dir}/{'p' * 300}.db")),
     "store.url: cannot open placement store {state}/" + "p" * 300 + ".db: File name too long"),
]


@pytest.mark.parametrize(("name", "make", "says"), UNUSABLE_FILES, ids=[c[0] for c in UNUSABLE_FILES])
def test_serve_stops_for_good_on_a_secrets_file_or_store_it_cannot_use(
    spare_fleet: Fleet, name: str, make: Callable[[Fleet], Path], says: str
) -> None:
    """One line and EX_CONFIG (systemd does not restart it), not a traceback and exit 1; and
    a wrong store is found before any HSM login."""
    config = make(spare_fleet)
    result = hsmgw("serve", "--config", str(config), "--workers", "1", timeout=60)
    line = one_error_line(result)
    assert result.returncode == EXIT_CONFIG, line
    assert says.format(state=spare_fleet.state_dir) in line, line
    assert "sessions open" not in result.stdout + result.stderr, "logged in to the HSMs before failing"
    assert "123456" not in result.stdout + result.stderr


def _immutable(path: Path) -> Callable[[], None]:
    """Make ``path`` immutable (``chattr +i``), so that even root cannot write it (nor, a directory,
    create files in it); returns what undoes that. Root ignores file modes, and tests run as root."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed: root ignores file modes, so nothing here can make a file unwritable")
    made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"{path} cannot be made immutable here ({made.stderr.strip()}): root ignores file modes")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("unwritable", ["directory", "file"])
def test_serve_stops_for_good_on_a_store_it_cannot_write(spare_fleet: Fleet, tmp_path: Path, unwritable: str) -> None:
    """A store file, or its directory (where SQLite writes the journal), that this user cannot
    write: one line naming which, and EX_CONFIG (a restart does not help), before any HSM login."""
    from router.placement.sqlite import SqliteStore

    directory = tmp_path / "store"
    directory.mkdir()
    path = directory / "placements.db"
    SqliteStore(path).close()  # a store the gateway made earlier
    config = _edited(spare_fleet, f"store-{unwritable}-{tmp_path.name}", _store_url(f"sqlite:{path}"))
    undo = _immutable(directory if unwritable == "directory" else path)
    try:
        result = hsmgw("serve", "--config", str(config), "--workers", "1", timeout=60)
    finally:
        undo()
    line = one_error_line(result)
    assert result.returncode == EXIT_CONFIG, line
    problem = (f"cannot write to the directory {directory}" if unwritable == "directory"
               else "cannot read and write it")
    assert line == f"error: store.url: cannot open placement store {path}: this user ({os.getuid()}) {problem}"
    assert "sessions open" not in result.stdout + result.stderr, "logged in to the HSMs before failing"


def test_serve_names_a_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes(b'# caf\xe9\n[gateway]\n')
    result = hsmgw("serve", "--config", str(config), timeout=30)
    assert one_error_line(result) == f"error: {config}: not UTF-8 text (at byte offset 5); TOML files are UTF-8"
    assert result.returncode == EXIT_CONFIG


def test_hsmctl_refuses_to_list_the_keys_of_a_cluster_that_does_not_exist(gateway: Any) -> None:
    result = hsmctl("--target", gateway.target, "keys", "list", "--cluster", "use1-z")
    assert one_error_line(result) == "error: no cluster named 'use1-z' (clusters: use1-a, use1-b, usw2-a)"


def test_hsmctl_says_what_to_check_when_it_cannot_reach_a_gateway(gateway: Any, tmp_path: Path) -> None:
    import socket

    from gateway.tls import write_dev_certs

    certs = write_dev_certs(tmp_path / "certs", ["ops"])
    cert, key = certs.client("ops")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{free.getsockname()[1]}"
    cases = [  # nothing there may be a gateway restarting (2: try again); TLS to plaintext never works (1)
        ((f"--target={nobody}",), "nothing listens there: is the gateway running, and is --target its address?", 2),
        ((f"--target={gateway.target}", "--ca", str(certs.ca), "--cert", str(cert), "--key", str(key)),
         "the TLS handshake failed: that gateway serves plaintext; drop --ca, --cert and --key", 1),
    ]
    for options, says, code in cases:
        result = hsmctl(*options, "--timeout", "5", "clusters")
        assert result.returncode == code
        assert one_error_line(result).endswith(says), result.stderr


def test_hsmctl_names_a_client_certificate_or_key_that_is_not_pem(gateway: Any, tmp_path: Path) -> None:
    from gateway.tls import write_dev_certs

    cert, key = write_dev_certs(tmp_path / "certs", ["ops"]).client("ops")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for options, says in ((("--cert", str(junk), "--key", str(key)), "error: --cert is not a PEM certificate"),
                          (("--cert", str(cert), "--key", str(junk)),
                           "error: --key is not a PEM private key without a passphrase")):
        result = hsmctl("--target", gateway.target, *options, "clusters")
        assert result.returncode == 1 and one_error_line(result) == says


def test_a_worker_without_the_shared_limits_file_serves_with_limits_of_its_own(
    spare_fleet: Fleet, tmp_path: Path
) -> None:
    """A worker that cannot map the supervisor's limits file still serves, and says loudly
    that limits now hold per worker, rather than failing and restarting forever."""
    import signal
    import time

    import grpc

    from hsmgw.v1 import crypto_pb2_grpc

    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli.hsmgw", "serve", "--config", str(spare_fleet.config_path),
         "--workers", "1", "--worker-index", "0", "--limits-fd", "987",
         "--listen", "127.0.0.1:0", "--port-file", str(port_file)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_user_env(),
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert port_file.exists(), "the worker serves"
        with grpc.insecure_channel(f"127.0.0.1:{port_file.read_text()}") as channel:
            stub = crypto_pb2_grpc.CryptoServiceStub(channel)
            assert len(stub.GenerateRandom(pb.GenerateRandomRequest(length=8), timeout=10).data) == 8
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert "cannot open the shared limits file" in out and "keeps per-identity limits of its own" in out, out


# -- hsmctl when a change's call gets no answer ------------------------------------------------

_SLOW_OR_DYING_GATEWAY = """
import os, sys, time
from concurrent import futures
import grpc
from hsmgw.v1 import admin_pb2 as apb, admin_pb2_grpc

class Admin(admin_pb2_grpc.AdminServiceServicer):
    def ApproveChange(self, request, context):
        if request.id == "dies":
            os._exit(9)  # killed while the change runs
        time.sleep(5)  # a long change: it runs, and applies, after the caller gave up
        return apb.Change(id=request.id, state="applied")

server = grpc.server(futures.ThreadPoolExecutor(4))
admin_pb2_grpc.add_AdminServiceServicer_to_server(Admin(), server)
print(server.add_insecure_port("127.0.0.1:0"), flush=True)
server.start()
server.wait_for_termination()
"""


@pytest.fixture
def slow_gateway() -> Any:
    """An AdminService whose approvals take 5 s, or kill its process (approving the change ``dies``)."""
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_OR_DYING_GATEWAY], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    yield f"127.0.0.1:{port}"
    proc.kill()
    proc.wait()


def test_an_approval_that_got_no_answer_says_the_change_may_have_run_not_try_again(slow_gateway: str) -> None:
    late = hsmctl("--target", slow_gateway, "--timeout", "1", "changes", "approve", "3f2a9c1e")
    assert late.returncode == 2
    line = one_error_line(late)
    assert line.startswith("error: DEADLINE_EXCEEDED:"), line
    assert line.endswith("the approval may have been taken, and the change may be running or applied: see hsmctl "
                         "changes list --all before approving again"), line

    died = hsmctl("--target", slow_gateway, "--timeout", "10", "changes", "approve", "dies")
    assert died.returncode == 2
    line = one_error_line(died)
    assert line.startswith("error: UNAVAILABLE:"), line
    assert "TLS" not in line and "client certificate" not in line, "the gateway died: it did not ask for TLS"
    assert ("the gateway closed the connection during the call: it may have stopped or restarted (see its log); "
            "the approval may have been taken") in line, line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_refuses_a_port_file_it_cannot_write_before_logging_in(spare_fleet: Fleet, tmp_path: Path,
                                                                      workers: str) -> None:
    """The port file is written once the gateway serves: a missing directory used to end a
    serving gateway (one process: without draining) with a traceback and exit 1."""
    port_file = tmp_path / "missing" / "port"
    result = hsmgw("serve", "--config", str(spare_fleet.config_path), "--workers", workers,
                   "--listen", "127.0.0.1:0", "--port-file", str(port_file), timeout=60)
    line = one_error_line(result)
    assert line == f"error: --port-file: cannot write {port_file}: the directory {port_file.parent} does not exist"
    assert result.returncode == EXIT_CONFIG
    assert "sessions open" not in result.stdout + result.stderr, "logged in to the HSMs before failing"


# -- hsmctl's output read by another program ------------------------------------------------


@pytest.mark.parametrize("buffered", [True, False], ids=["written-at-exit", "written-at-once"])
def test_hsmctl_ends_quietly_with_141_when_its_reader_stops_reading(gateway: Any, buffered: bool) -> None:
    """`hsmctl clusters | head -1`: the reader closes the pipe before hsmctl writes. No traceback,
    and the status a shell gives a program SIGPIPE ended (128 + 13); whether the closed pipe shows
    when the output is flushed at exit, or while it is written (unbuffered, or more than a buffer)."""
    read, write = os.pipe()
    os.close(read)
    env = _user_env() if buffered else _user_env(PYTHONUNBUFFERED="1")
    try:
        result = subprocess.run([sys.executable, "-m", "gateway.cli.hsmctl", "--target", gateway.target, "clusters"],
                                cwd=ROOT, env=env, stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (141, "")


def test_an_approval_or_request_that_never_connected_says_it_was_not_taken() -> None:
    """Nothing listens at the target: the call was never sent, so nothing can be running; the
    warning that it may have been taken is for calls that reached a gateway."""
    nothing_listens = "nothing listens there: is the gateway running, and is --target its address?"
    for command, says in ((("changes", "approve", "abc"), "the approval was not sent: nothing was approved"),
                          (("keys", "move", "k1", "--to", "use1-b"), "the request was not sent: no change was made")):
        result = hsmctl("--target", "127.0.0.1:1", "--timeout", "5", *command)
        assert result.returncode == 2
        line = one_error_line(result)
        assert line.startswith("error: UNAVAILABLE:") and line.endswith(f"{nothing_listens}; {says}"), line
        assert "may have been" not in line, line


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "soon"])
def test_hsmctl_refuses_a_timeout_that_is_not_a_positive_number_of_seconds(timeout: str) -> None:
    """A usage error (exit 1) before any call, not DEADLINE_EXCEEDED and exit 2 (try again later)."""
    result = hsmctl("--target", "127.0.0.1:1", f"--timeout={timeout}", "changes", "approve", "abc")
    assert result.returncode == 1
    assert one_error_line(result) == (f"error: hsmctl: argument --timeout: expected a number of seconds above 0, "
                                      f"got {timeout!r}")


@pytest.mark.parametrize("identity", ["", " "])
def test_hsmctl_refuses_an_empty_identity_instead_of_calling_as_the_default(gateway: Any, identity: str) -> None:
    """`--as "$ADMIN"` with ADMIN unset must not approve as `dev`, the identity of a caller who
    names none."""
    result = hsmctl("--target", gateway.target, "--as", identity, "changes", "approve", "abc")
    assert result.returncode == 1
    assert one_error_line(result) == ("error: hsmctl: argument --as: an empty identity; leave --as out to call "
                                      "without one")


def test_hsmctl_refuses_as_over_tls_where_the_certificate_names_the_caller(gateway: Any, tmp_path: Path) -> None:
    """Over TLS the gateway takes the caller from the client certificate: `--as bob` there was
    ignored without a word, and an approval "as bob" was made as the certificate's identity."""
    from gateway.tls import write_dev_certs

    certs = write_dev_certs(tmp_path / "certs", ["ops"])
    cert, key = certs.client("ops")
    result = hsmctl("--target", gateway.target, "--ca", str(certs.ca), "--cert", str(cert), "--key", str(key),
                    "--as", "bob", "changes", "approve", "abc")
    assert result.returncode == 1
    assert one_error_line(result) == ("error: --as names the caller of a plaintext development gateway only; over "
                                      "TLS the client certificate does (--cert), so leave --as out")


def test_hsmctl_json_counts_are_numbers_not_strings(gateway: Any) -> None:
    """A script comparing `keys_considered > 0` or summing `keys` needs JSON numbers (protobuf's
    JSON mapping quotes 64-bit integers)."""
    def json_of(*command: str) -> Any:
        result = hsmctl("--target", gateway.target, "--output", "json", *command)
        assert result.returncode in (0, 4, 5), result.stderr  # status: 4 when it warns, 5 a cluster down
        return json.loads(result.stdout)

    plan = json_of("rebalance", "--plan")
    assert type(plan["keys_considered"]) is int, plan
    status = json_of("status")
    counts = [status[name] for name in ("keys", "under_replicated_keys", "pending_changes")]
    counts += [c[name] for c in json_of("clusters")["clusters"] for name in ("keys", "max_keys")]
    counts.append(json_of("audit", "verify")["records"])
    assert all(type(count) is int for count in counts), counts


def test_hsmctl_keys_list_of_a_cluster_leaves_out_destroyed_keys(crypto: Any, gateway: Any) -> None:
    """A destroyed key is held by no cluster (its record still names where it was)."""
    prefix = unique("cli-destroyed")
    live, gone = (crypto.GenerateKey(pb.GenerateKeyRequest(request_id=f"{prefix}/{name}", key_id=f"{prefix}/{name}",
                                                           algorithm=pb.KEY_ALGORITHM_AES_256), timeout=30)
                  for name in ("live", "gone"))
    crypto.DestroyKey(pb.DestroyKeyRequest(key_id=gone.key_id), timeout=30)

    def listed(*options: str) -> dict[str, str]:
        result = hsmctl("--target", gateway.target, "--output", "json", "keys", "list", "--prefix", prefix + "/",
                        *options)
        assert result.returncode == 0, result.stderr
        return {k["key_id"]: k["state"] for k in json.loads(result.stdout)}

    assert listed() == {live.key_id: "KEY_STATE_ENABLED", gone.key_id: "KEY_STATE_DESTROYED"}
    for cluster in {gone.primary_cluster, *gone.replicas}:
        assert gone.key_id not in listed("--cluster", cluster)
    assert listed("--cluster", live.primary_cluster) == {live.key_id: "KEY_STATE_ENABLED"}


def test_store_migrate_names_records_the_destination_holds_that_the_source_does_not(tmp_path: Path) -> None:
    """Migrating into a table another fleet uses merged its records in without a word (a gateway
    on it then takes them for its own); the same store twice was taken for a copy."""
    from router.placement import SqliteStore
    from tests.support import stored

    source, dest = SqliteStore(tmp_path / "src.db"), SqliteStore(tmp_path / "dst.db")
    source.create(stored(key_id="ours/k1", request_id="r1"))
    dest.create(stored(key_id="theirs/x", request_id="rx"))
    source.close()
    dest.close()
    src_url, dst_url = f"sqlite:{tmp_path / 'src.db'}", f"sqlite:{tmp_path / 'dst.db'}"

    result = hsmgw("store", "migrate", "--from", src_url, "--to", dst_url)
    assert result.returncode == 0, result.stderr
    assert "copied 1, identical 0 (skipped), differing 0, failed 0" in result.stdout
    assert ("note: the destination also holds 1 key record(s) the source does not ('theirs/x'), left as they are"
            in result.stdout), result.stdout
    as_json = json.loads(hsmgw("store", "migrate", "--from", src_url, "--to", dst_url, "--output", "json").stdout)
    assert (as_json["not_in_source"], as_json["not_in_source_keys"], as_json["identical"]) == (1, ["theirs/x"], 1)

    same = hsmgw("store", "migrate", "--from", dst_url, "--to", f"sqlite:{tmp_path}/./dst.db")
    assert same.returncode == 1
    assert one_error_line(same) == f"error: --from and --to name the same store (sqlite:{tmp_path}/./dst.db): " \
                                   "nothing to copy"

"""gateway.config: one TOML file → frozen dataclasses; every mistake names its key path."""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import re
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import (
    ConfigError,
    GatewayConfig,
    ServerConfig,
    check_listen,
    load,
    load_pins,
    parse,
    pin_env_name,
)
from router.model import ClusterSpec
from router.secret import Secret

VALID_TOML = """\
[gateway]
home_region = "us-east-1"
dr_regions = ["us-west-2"]

[server]
listen = "127.0.0.1:50051"
insecure_plaintext = true
threads = 8
default_deadline = 5
max_message_bytes = 1048576

[pkcs11]
module = "/usr/lib/softhsm/libsofthsm2.so"
env = { SOFTHSM2_CONF = "/etc/softhsm2.conf" }

[store]
url = "sqlite:placements.db"

[secrets]
file = "secrets.toml"

[[clusters]]
name = "use1-a"
region = "us-east-1"
token_label = "token-a"
max_keys = 100
pool_size = 2

[[clusters]]
name = "use1-b"
region = "us-east-1"

[[clusters]]
name = "usw2-a"
region = "us-west-2"
"""


def valid_data() -> dict[str, Any]:
    """The smallest complete config, as the TOML parser would hand it to ``parse``."""
    return {
        "gateway": {"home_region": "us-east-1", "dr_regions": ["us-west-2"]},
        "pkcs11": {"module": "/usr/lib/softhsm/libsofthsm2.so"},
        "store": {"url": "sqlite:placements.db"},
        "clusters": [
            {"name": "use1-a", "region": "us-east-1"},
            {"name": "use1-b", "region": "us-east-1"},
            {"name": "usw2-a", "region": "us-west-2"},
        ],
    }


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


# -- a valid file ----------------------------------------------------------------


def test_load_valid_file_gives_the_configured_values(tmp_path: Path) -> None:
    config = load(write(tmp_path / "hsmgw.toml", VALID_TOML))

    assert config.home_region == "us-east-1"
    assert config.dr_regions == ("us-west-2",)
    assert config.server == ServerConfig(
        listen="127.0.0.1:50051", insecure_plaintext=True, threads=8, default_deadline=5.0, max_message_bytes=1048576
    )
    assert (config.server.host, config.server.port) == ("127.0.0.1", 50051)
    assert config.pkcs11.module == "/usr/lib/softhsm/libsofthsm2.so"
    assert config.pkcs11.env == {"SOFTHSM2_CONF": "/etc/softhsm2.conf"}
    assert config.clusters == (
        ClusterSpec(name="use1-a", region="us-east-1", token_label="token-a", max_keys=100, pool_size=2),
        ClusterSpec(name="use1-b", region="us-east-1", token_label="use1-b", max_keys=3300, pool_size=4),
        ClusterSpec(name="usw2-a", region="us-west-2", token_label="usw2-a", max_keys=3300, pool_size=4),
    )
    assert config.regions == {"us-east-1": ("use1-a", "use1-b"), "us-west-2": ("usw2-a",)}


def test_relative_paths_resolve_against_the_config_files_directory(tmp_path: Path, monkeypatch: Any) -> None:
    (tmp_path / "etc").mkdir()
    write(tmp_path / "etc" / "hsmgw.toml", VALID_TOML)
    monkeypatch.chdir(tmp_path)  # a relative config path, from another working directory

    config = load("etc/hsmgw.toml")

    assert config.store_path() == (tmp_path / "etc" / "placements.db").resolve()
    assert config.secrets.file == (tmp_path / "etc" / "secrets.toml").resolve()


def test_absolute_sqlite_url_is_used_as_is(tmp_path: Path) -> None:
    data = valid_data()
    data["store"]["url"] = f"sqlite://{tmp_path}/abs.db"  # sqlite:///abs/path.db
    assert parse(data, Path("/elsewhere")).store_path() == tmp_path / "abs.db"


def test_defaults_when_optional_tables_are_absent() -> None:
    config = parse(valid_data(), Path("/cfg"))
    assert config.server == ServerConfig()
    assert config.server.insecure_plaintext is False
    assert config.secrets.file is None
    assert config.pkcs11.env == {}


def test_config_objects_are_frozen() -> None:
    config = parse(valid_data(), Path("/cfg"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.home_region = "eu-west-1"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.listen = "0.0.0.0:1"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.clusters[0].max_keys = 1  # type: ignore[misc]
    assert isinstance(config.clusters, tuple)
    assert isinstance(config.dr_regions, tuple)


def test_parse_does_not_keep_references_to_the_input() -> None:
    data = valid_data()
    data["pkcs11"]["env"] = {"SOFTHSM2_CONF": "/a"}
    config = parse(data, Path("/cfg"))
    data["pkcs11"]["env"]["SOFTHSM2_CONF"] = "/b"
    data["gateway"]["dr_regions"].append("eu-west-1")
    assert config.pkcs11.env == {"SOFTHSM2_CONF": "/a"}
    assert config.dr_regions == ("us-west-2",)


# -- every mistake names its key path ----------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets ``a.b[1].c`` to ``value`` (or deletes it when value is DELETE)."""

    def mutate(data: dict[str, Any]) -> None:
        parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
        target: Any = data
        for part in parts[:-1]:
            target = target[int(part[1:-1])] if part.startswith("[") else target.setdefault(part, {})
        last = parts[-1]
        key: Any = int(last[1:-1]) if last.startswith("[") else last
        if value is DELETE:
            del target[key]
        else:
            target[key] = value

    return mutate


DELETE = object()

BAD_CONFIGS = [
    # (mutation, key path the error must name)
    ("extra", 1, "extra"),
    ("gateway", DELETE, "gateway"),
    ("gateway", "us-east-1", "gateway"),
    ("gateway.home_region", DELETE, "gateway.home_region"),
    ("gateway.creates_keys", "no", "gateway.creates_keys"),
    ("gateway.creates_keys", 0, "gateway.creates_keys"),
    ("gateway.home_region", 5, "gateway.home_region"),
    ("gateway.home_region", "eu-central-1", "gateway.home_region"),
    ("gateway.homeregion", "us-east-1", "gateway.homeregion"),
    ("gateway.dr_regions", "us-west-2", "gateway.dr_regions"),
    ("gateway.dr_regions", ["us-west-2", 7], "gateway.dr_regions[1]"),
    ("gateway.dr_regions", ["us-west-2", "ap-south-1"], "gateway.dr_regions[1]"),
    ("server", "127.0.0.1:50051", "server"),
    ("server.port", 50051, "server.port"),
    ("server.listen", 50051, "server.listen"),
    ("server.listen", "127.0.0.1", "server.listen"),
    ("server.listen", "127.0.0.1:http", "server.listen"),
    ("server.listen", "127.0.0.1:", "server.listen"),
    ("server.insecure_plaintext", "yes", "server.insecure_plaintext"),
    ("server.insecure_plaintext", 1, "server.insecure_plaintext"),
    ("server.threads", 0, "server.threads"),
    ("server.threads", -4, "server.threads"),
    ("server.threads", True, "server.threads"),
    ("server.threads", 1.5, "server.threads"),
    ("server.default_deadline", 0, "server.default_deadline"),
    ("server.default_deadline", -1.5, "server.default_deadline"),
    ("server.default_deadline", "10s", "server.default_deadline"),
    ("server.max_message_bytes", 0, "server.max_message_bytes"),
    ("server.max_message_bytes", "4MiB", "server.max_message_bytes"),
    ("server.pin_workers", "yes", "server.pin_workers"),
    ("server.pin_workers", 1, "server.pin_workers"),
    ("server.fast_path", "on", "server.fast_path"),
    ("server.scheduling", "fifo", "server.scheduling"),
    ("server.scheduling", True, "server.scheduling"),
    ("pkcs11", DELETE, "pkcs11"),
    ("pkcs11.module", DELETE, "pkcs11.module"),
    ("pkcs11.module", ["/lib.so"], "pkcs11.module"),
    ("pkcs11.modul", "/lib.so", "pkcs11.modul"),
    ("pkcs11.env", "SOFTHSM2_CONF=/x", "pkcs11.env"),
    ("pkcs11.env", {"SOFTHSM2_CONF": 1}, "pkcs11.env.SOFTHSM2_CONF"),
    ("store", DELETE, "store"),
    ("store.url", DELETE, "store.url"),
    ("store.url", "postgres://db/placements", "store.url"),
    ("store.path", "x.db", "store.path"),
    ("store.rescan_interval", 0, "store.rescan_interval"),
    ("store.rescan_interval", -60, "store.rescan_interval"),
    ("store.rescan_interval", "1m", "store.rescan_interval"),
    ("store.external_staleness", -1, "store.external_staleness"),
    ("store.external_staleness", "30s", "store.external_staleness"),
    ("store.external_staleness", float("inf"), "store.external_staleness"),
    ("secrets", "secrets.toml", "secrets"),
    ("secrets.file", 5, "secrets.file"),
    ("secrets.path", "secrets.toml", "secrets.path"),
    ("clusters", DELETE, "clusters"),
    ("clusters", [], "clusters"),
    ("clusters", {"name": "use1-a"}, "clusters"),
    ("clusters[1]", "use1-b", "clusters[1]"),
    ("clusters[1].max_keys", 0, "clusters[1].max_keys"),
    ("clusters[1].max_keys", -1, "clusters[1].max_keys"),
    ("clusters[1].max_keys", "many", "clusters[1].max_keys"),
    ("clusters[1].max_keys", True, "clusters[1].max_keys"),
    ("clusters[1].max_keys", 10.0, "clusters[1].max_keys"),
    ("clusters[1].pool_size", 0, "clusters[1].pool_size"),
    ("clusters[1].call_timeout", 0, "clusters[1].call_timeout"),
    ("clusters[1].call_timeout", -2.0, "clusters[1].call_timeout"),
    ("clusters[1].call_timeout", "2s", "clusters[1].call_timeout"),
    ("clusters[1].call_timeout", True, "clusters[1].call_timeout"),
    ("clusters[1].call_timeout", float("nan"), "clusters[1].call_timeout"),
    ("clusters[1].call_timeout", float("inf"), "clusters[1].call_timeout"),
    ("clusters[1].serialize_object_changes", "yes", "clusters[1].serialize_object_changes"),
    ("clusters[1].serialize_object_changes", 1, "clusters[1].serialize_object_changes"),
    ("server.probe_interval", float("inf"), "server.probe_interval"),
    ("store.adopted_fleet_ids", "0" * 32, "store.adopted_fleet_ids"),
    ("store.adopted_fleet_ids", ["0" * 31], "store.adopted_fleet_ids[0]"),
    ("store.adopted_fleet_ids", ["a" * 32, "A" * 32], "store.adopted_fleet_ids[1]"),
    ("server.retry_budget", -0.1, "server.retry_budget"),
    ("server.retry_budget", 1.5, "server.retry_budget"),
    ("server.retry_budget", float("nan"), "server.retry_budget"),
    ("server.retry_budget", "50%", "server.retry_budget"),
    ("replication.reconcile_interval", -1, "replication.reconcile_interval"),
    ("replication.reconcile_interval", "1h", "replication.reconcile_interval"),
    ("replication.reconcile_interval", float("inf"), "replication.reconcile_interval"),
    ("replication.reconcile_interval", float("nan"), "replication.reconcile_interval"),
    ("replication.min_copies", 0, "replication.min_copies"),
    ("replication.min_copies", "2", "replication.min_copies"),
    ("replication.min_copies", 3, "replication.min_copies"),  # more than the copies new keys get (2)
    ("clusters[1].name", DELETE, "clusters[1].name"),
    ("clusters[1].name", "", "clusters[1].name"),
    ("clusters[1].name", "use1-a", "clusters[1].name"),
    ("clusters[1].name", 2, "clusters[1].name"),
    ("clusters[1].region", DELETE, "clusters[1].region"),
    ("clusters[1].token_label", 3, "clusters[1].token_label"),
    ("clusters[1].maxkeys", 10, "clusters[1].maxkeys"),
]


@pytest.mark.parametrize(("key", "value", "path"), BAD_CONFIGS, ids=[f"{k}={v!r}" for k, v, _ in BAD_CONFIGS])
def test_each_mistake_fails_with_an_error_naming_the_key_path(key: str, value: Any, path: str) -> None:
    data = valid_data()
    _set(key, value)(data)
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}: ") as info:
        parse(data, Path("/cfg"))
    assert isinstance(info.value, ValueError)


def test_call_timeout_is_per_cluster_in_seconds_with_a_default() -> None:
    data = valid_data()
    data["clusters"][0]["call_timeout"] = 0.5
    data["clusters"][1]["call_timeout"] = 3
    clusters = parse(data, Path("/cfg")).clusters
    assert [c.call_timeout for c in clusters] == [0.5, 3.0, ClusterSpec.call_timeout]
    assert ClusterSpec.call_timeout == 2.0


def test_object_changes_are_serialized_unless_a_cluster_turns_it_off() -> None:
    data = valid_data()
    data["clusters"][1]["serialize_object_changes"] = False
    clusters = parse(data, Path("/cfg")).clusters
    assert [c.serialize_object_changes for c in clusters] == [True, False, True]


@pytest.mark.parametrize(("given", "expected"), [(None, 3600.0), (0, 0.0), (60, 60.0), (0.5, 0.5)])
def test_reconcile_interval_defaults_to_an_hour_and_0_turns_it_off(given: Any, expected: float) -> None:
    data = valid_data()
    if given is not None:
        data.setdefault("replication", {})["reconcile_interval"] = given
    assert parse(data, Path("/cfg")).replication.reconcile_interval == expected


@pytest.mark.parametrize(("given", "expected"), [(None, 0.5), (0, 0.0), (0.2, 0.2), (1, 1.0)])
def test_the_retry_budget_is_a_share_of_requests_that_reaches_the_router(given: Any, expected: float,
                                                                         tmp_path: Path) -> None:
    from router.placement.sqlite import SqliteStore
    from router.router import Router, Topology

    data = valid_data()
    if given is not None:
        data.setdefault("server", {})["retry_budget"] = given
    share = parse(data, Path("/cfg")).server.retry_budget
    assert share == expected
    router = Router(Topology("us-east-1", (), {"us-east-1": ()}), {}, SqliteStore(tmp_path / "p.db"),
                    retry_budget=share)
    assert router.dispatcher.budget.ratio == expected


def test_adopted_fleet_ids_reach_the_router_as_this_fleets(tmp_path: Path) -> None:
    from router.placement.sqlite import SqliteStore
    from router.router import Router, Topology

    data = valid_data()
    assert parse(data, Path("/cfg")).store.adopted_fleet_ids == ()
    data["store"]["adopted_fleet_ids"] = ["0123456789abcdef" * 2]
    adopted = parse(data, Path("/cfg")).store.adopted_fleet_ids
    assert adopted == ("0123456789abcdef" * 2,)
    router = Router(Topology("us-east-1", (), {"us-east-1": ()}), {}, SqliteStore(tmp_path / "p.db"),
                    adopted_fleet_ids=adopted)
    assert router._former_fleet_ids == set(adopted)


@pytest.mark.parametrize(("given", "expected"), [(None, 30.0), (0, 0.0), (5, 5.0)])
def test_external_staleness_defaults_to_30_seconds_and_0_turns_it_off(given: Any, expected: float) -> None:
    data = valid_data()
    if given is not None:
        data["store"]["external_staleness"] = given
    assert parse(data, Path("/cfg")).store.external_staleness == expected


def test_duplicate_cluster_error_names_the_duplicate() -> None:
    data = valid_data()
    data["clusters"][2]["name"] = "use1-a"
    with pytest.raises(ConfigError, match=r"^clusters\[2\]\.name: duplicate 'use1-a'"):
        parse(data, Path("/cfg"))


def test_two_clusters_on_one_token_are_refused() -> None:
    """A [[clusters]] block copied without its token_label: each name would see the other's keys
    as objects its records do not put there, for reconcile to destroy."""
    data = valid_data()
    data["clusters"][1]["token_label"] = data["clusters"][0].get("token_label", data["clusters"][0]["name"])
    with pytest.raises(ConfigError, match=r"^clusters\[1\]\.token_label: .* both name token"):
        parse(data, Path("/cfg"))
    data["clusters"][1].pop("token_label")  # the default is the cluster's name
    data["clusters"][0]["token_label"] = data["clusters"][1]["name"]
    with pytest.raises(ConfigError, match=r"both name token"):
        parse(data, Path("/cfg"))


_TABLES = ["", "gateway.", "server.", "pkcs11.", "store.", "secrets.", "clusters[0]."]


@given(table=st.sampled_from(_TABLES), key=st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True))
def test_any_unknown_key_in_any_table_is_refused_by_its_path(table: str, key: str) -> None:
    data = valid_data()
    known = {
        "": {"gateway", "server", "pkcs11", "store", "secrets", "clusters", "auth"},
        "gateway.": {"home_region", "dr_regions"},
        "server.": {"listen", "insecure_plaintext", "threads", "default_deadline", "max_message_bytes", "tls"},
        "pkcs11.": {"module", "env"},
        "store.": {"url"},
        "secrets.": {"file"},
        "clusters[0].": {"name", "region", "token_label", "max_keys", "pool_size", "unwrapped_cache", "call_timeout"},
    }[table]
    if key in known:
        return
    _set(table + key, "value")(data)
    with pytest.raises(ConfigError, match=rf"^{re.escape(table + key)}: unknown key"):
        parse(data, Path("/cfg"))


@pytest.mark.parametrize("listen", ["127.0.0.1:70000", "127.0.0.1:500511"])
def test_listen_port_out_of_range_is_refused(listen: str) -> None:
    data = valid_data()
    data["server"] = {"listen": listen}
    with pytest.raises(ConfigError, match=r"^server\.listen: "):
        parse(data, Path("/cfg"))


def test_original_input_is_not_mutated_by_a_failed_parse() -> None:
    data = valid_data()
    data["clusters"][1]["max_keys"] = 0
    before = copy.deepcopy(data)
    with pytest.raises(ConfigError):
        parse(data, Path("/cfg"))
    assert data == before


# -- load: file errors --------------------------------------------------------------


def test_load_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load(missing)
    assert str(missing) in str(info.value)


def test_load_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "hsmgw.toml", "[gateway\nhome_region = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load(path)
    assert str(path) in str(info.value)


def test_load_reports_key_paths_from_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "hsmgw.toml", VALID_TOML.replace("pool_size = 2", "pool_size = 0"))
    with pytest.raises(ConfigError, match=r"^clusters\[0\]\.pool_size: must be greater than 0"):
        load(path)


# -- check_listen ----------------------------------------------------------------------


def test_check_listen_refuses_to_start_without_tls_unless_plaintext_is_asked_for() -> None:
    with pytest.raises(ConfigError, match=r"^server\.insecure_plaintext: "):
        check_listen(ServerConfig(listen="127.0.0.1:50051", insecure_plaintext=False))


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "10.1.2.3:50051", "[::]:50051", "gw.example.com:50051", ":50051"])
def test_check_listen_refuses_plaintext_on_non_loopback_hosts(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"^server\.listen: plaintext is allowed only on a loopback"):
        check_listen(ServerConfig(listen=listen, insecure_plaintext=True))


@pytest.mark.parametrize("listen", ["127.0.0.1:50051", "127.0.0.2:0", "localhost:50051", "[::1]:50051"])
def test_check_listen_allows_plaintext_on_loopback(listen: str) -> None:
    check_listen(ServerConfig(listen=listen, insecure_plaintext=True))


# -- PINs ---------------------------------------------------------------------------------

SECRETS_TOML = """\
[clusters.use1-a]
user_pin = "file-pin-a"

[clusters.use1-b]
user_pin = "file-pin-b"

[clusters.usw2-a]
user_pin = "file-pin-c"
"""


def config_with_secrets(tmp_path: Path, secrets: str | None = SECRETS_TOML, mode: int = 0o600) -> GatewayConfig:
    data = valid_data()
    if secrets is not None:
        write(tmp_path / "secrets.toml", secrets, mode)
        data["secrets"] = {"file": "secrets.toml"}
    return parse(data, tmp_path)


def test_pin_env_name_is_upper_case_with_underscores() -> None:
    assert pin_env_name("use1-a") == "HSMGW_PIN_USE1_A"
    assert pin_env_name("eu.west.1") == "HSMGW_PIN_EU_WEST_1"


def test_pins_come_from_the_secrets_file(tmp_path: Path) -> None:
    pins = load_pins(config_with_secrets(tmp_path), environ={})
    assert {name: pin.reveal() for name, pin in pins.items()} == {
        "use1-a": "file-pin-a",
        "use1-b": "file-pin-b",
        "usw2-a": "file-pin-c",
    }
    assert all(isinstance(pin, Secret) for pin in pins.values())


def test_env_pin_wins_over_the_secrets_file(tmp_path: Path) -> None:
    pins = load_pins(config_with_secrets(tmp_path), environ={"HSMGW_PIN_USE1_B": "env-pin-b"})
    assert pins["use1-b"].reveal() == "env-pin-b"
    assert pins["use1-a"].reveal() == "file-pin-a"


def test_empty_env_pin_falls_back_to_the_file(tmp_path: Path) -> None:
    pins = load_pins(config_with_secrets(tmp_path), environ={"HSMGW_PIN_USE1_A": ""})
    assert pins["use1-a"].reveal() == "file-pin-a"


def test_env_alone_is_enough_without_a_secrets_file(tmp_path: Path) -> None:
    environ = {"HSMGW_PIN_USE1_A": "1", "HSMGW_PIN_USE1_B": "2", "HSMGW_PIN_USW2_A": "3"}
    pins = load_pins(config_with_secrets(tmp_path, secrets=None), environ=environ)
    assert {n: p.reveal() for n, p in pins.items()} == {"use1-a": "1", "use1-b": "2", "usw2-a": "3"}


def test_load_pins_reads_os_environ_by_default(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("HSMGW_PIN_USW2_A", "from-os-env")
    pins = load_pins(config_with_secrets(tmp_path))
    assert pins["usw2-a"].reveal() == "from-os-env"


def test_missing_pin_names_the_cluster_and_the_env_variable(tmp_path: Path) -> None:
    config = config_with_secrets(tmp_path, secrets='[clusters.use1-a]\nuser_pin = "only-a"\n')
    with pytest.raises(ConfigError) as info:
        load_pins(config, environ={})
    message = str(info.value)
    assert "use1-b" in message and "HSMGW_PIN_USE1_B" in message
    assert "only-a" not in message


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620, 0o660, 0o700 | 0o004])
def test_secrets_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    config = config_with_secrets(tmp_path, mode=mode)
    with pytest.raises(ConfigError, match=r"^secrets\.file: .*chmod 600") as info:
        load_pins(config, environ={})
    assert "file-pin" not in str(info.value)


def test_owner_only_secrets_file_is_accepted(tmp_path: Path) -> None:
    assert load_pins(config_with_secrets(tmp_path, mode=0o400), environ={})["use1-a"].reveal() == "file-pin-a"


def test_missing_secrets_file_names_the_key(tmp_path: Path) -> None:
    data = valid_data()
    data["secrets"] = {"file": "nope.toml"}
    with pytest.raises(ConfigError, match=r"^secrets\.file: .*does not exist"):
        load_pins(parse(data, tmp_path), environ={})


def test_secrets_file_that_is_a_directory_or_unreadable_names_the_key(tmp_path: Path, monkeypatch: Any) -> None:
    data = valid_data()
    (tmp_path / "secrets.d").mkdir(mode=0o700)
    data["secrets"] = {"file": "secrets.d"}
    with pytest.raises(ConfigError, match=r"^secrets\.file: .*secrets\.d is a directory, not a file$"):
        load_pins(parse(data, tmp_path), environ={})

    config = config_with_secrets(tmp_path)

    def refused(self: Path, *args: Any, **kwargs: Any) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refused)  # owner-only files: root reads them anyway
    with pytest.raises(ConfigError, match=r"^secrets\.file: cannot read .*secrets\.toml: Permission denied$"):
        load_pins(config, environ={})


def test_secrets_file_not_utf8_is_refused_without_showing_the_byte(tmp_path: Path) -> None:
    config = config_with_secrets(tmp_path, secrets="")
    (tmp_path / "secrets.toml").write_bytes(b'[clusters.use1-a]\nuser_pin = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_pins(config, environ={})
    assert str(info.value) == f"secrets.file: {tmp_path / 'secrets.toml'} is not UTF-8 text; TOML files are UTF-8"
    assert "xe9" not in _full_text(info.value) and "caf" not in _full_text(info.value)


def test_config_file_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "hsmgw.toml"
    path.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match=f"^{path}: not UTF-8 text \\(at byte offset 5\\); TOML files are UTF-8$"):
        load(path)


def _full_text(exc: BaseException) -> str:
    """What a log with traceback would show for ``exc``."""
    return "".join(traceback.format_exception(exc))


def test_invalid_secrets_toml_error_never_shows_the_pin(tmp_path: Path) -> None:
    config = config_with_secrets(tmp_path, secrets='[clusters.use1-a]\nuser_pin = "Tr0ub4dor&3\n')
    with pytest.raises(ConfigError, match=r"^secrets\.file: .*not valid TOML") as info:
        load_pins(config, environ={})
    assert "Tr0ub4dor" not in _full_text(info.value)


@pytest.mark.parametrize("value, kind", [("918273645", "number"), ("9182.73645", "number"), ("true", "boolean"),
                                         ("[918273645]", "array")])
def test_pin_of_the_wrong_type_is_refused_without_showing_it(tmp_path: Path, value: str, kind: str) -> None:
    """The key is set, only not as a string: "no user PIN … set it" sent operators looking elsewhere."""
    config = config_with_secrets(tmp_path, secrets=f"[clusters.use1-a]\nuser_pin = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_pins(config, environ={"HSMGW_PIN_USE1_B": "b", "HSMGW_PIN_USW2_A": "c"})
    assert str(info.value) == (
        f"secrets.file: clusters.use1-a.user_pin in {tmp_path / 'secrets.toml'} is a {kind}, not a string: "
        'quote it (user_pin = "…")'
    )
    assert "918273645" not in _full_text(info.value) and "9182.7" not in _full_text(info.value)


def test_secrets_file_with_clusters_as_array_is_a_config_error(tmp_path: Path) -> None:
    config = config_with_secrets(tmp_path, secrets='[[clusters]]\nname = "use1-a"\nuser_pin = "p"\n')
    with pytest.raises(ConfigError, match=r"secrets\.file"):
        load_pins(config, environ={})


def test_loaded_pins_never_show_in_reprs_or_logs(tmp_path: Path) -> None:
    pins = load_pins(config_with_secrets(tmp_path), environ={"HSMGW_PIN_USE1_A": "env-pin-a"})
    shown = repr(pins) + str(pins) + "".join(f"{p} {p!r} %s" % p for p in pins.values())
    for value in ("env-pin-a", "file-pin-b", "file-pin-c"):
        assert value not in shown


# -- Secret --------------------------------------------------------------------------------


def test_secret_repr_and_str_never_show_the_value() -> None:
    secret = Secret("hunter2")
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", "%s %r" % (secret, secret), repr([secret])):
        assert "hunter2" not in text
    assert secret.reveal() == "hunter2"


def test_secret_cannot_be_pickled() -> None:
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(Secret("hunter2"))
    with pytest.raises(TypeError):
        pickle.dumps({"use1-a": Secret("hunter2")})


def test_secret_compares_by_value() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert Secret("a") != "a"


def test_cluster_names_sharing_a_pin_variable_are_refused() -> None:
    data = valid_data()
    data["clusters"][1]["name"] = data["clusters"][0]["name"].replace("-", "_")
    with pytest.raises(ConfigError, match=r"^clusters\[1\]\.name: .*PIN variable"):
        parse(data, Path("/cfg"))


# -- [server.tls] and [auth] ---------------------------------------------------------------

TLS_TABLE = {"cert_file": "tls/server.pem", "key_file": "tls/server-key.pem", "client_ca_file": "tls/ca.pem"}


def test_tls_and_auth_paths_resolve_against_the_config_files_directory() -> None:
    from gateway.config import AuthConfig, TlsConfig

    data = valid_data()
    data["server"] = {"listen": "0.0.0.0:443", "tls": dict(TLS_TABLE)}
    data["auth"] = {"policy_file": "policy.toml"}
    config = parse(data, Path("/cfg"))
    assert config.server.tls == TlsConfig(
        cert_file=Path("/cfg/tls/server.pem"), key_file=Path("/cfg/tls/server-key.pem"),
        client_ca_file=Path("/cfg/tls/ca.pem"),
    )
    assert config.auth == AuthConfig(policy_file=Path("/cfg/policy.toml"))
    assert config.server.insecure_plaintext is False


def test_without_tls_and_auth_tables_nothing_changes() -> None:
    config = parse(valid_data(), Path("/cfg"))
    assert config.server.tls is None
    assert config.auth.policy_file is None


TLS_MISTAKES = [
    ("server.tls", "yes", "server.tls"),
    ("server.tls.cert_file", DELETE, "server.tls.cert_file"),
    ("server.tls.key_file", DELETE, "server.tls.key_file"),
    ("server.tls.client_ca_file", DELETE, "server.tls.client_ca_file"),
    ("server.tls.client_ca_file", "", "server.tls.client_ca_file"),
    ("server.tls.key_file", 5, "server.tls.key_file"),
    ("server.tls.ca_file", "ca.pem", "server.tls.ca_file"),
    ("server.insecure_plaintext", True, "server.insecure_plaintext"),
    ("auth", "policy.toml", "auth"),
    ("auth.policy_file", 1, "auth.policy_file"),
    ("auth.policy_file", "", "auth.policy_file"),
    ("auth.policy", "p.toml", "auth.policy"),
]


@pytest.mark.parametrize(("key", "value", "path"), TLS_MISTAKES, ids=[f"{k}={v!r}" for k, v, _ in TLS_MISTAKES])
def test_each_tls_or_auth_mistake_names_its_key_path(key: str, value: Any, path: str) -> None:
    data = valid_data()
    data["server"] = {"tls": dict(TLS_TABLE)}
    _set(key, value)(data)
    with pytest.raises(ConfigError, match=rf"^{re.escape(path)}: "):
        parse(data, Path("/cfg"))


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "10.1.2.3:50051", "[::]:50051", "gw.example.com:50051"])
def test_a_tls_listener_may_bind_any_address(listen: str) -> None:
    data = valid_data()
    data["server"] = {"listen": listen, "tls": dict(TLS_TABLE)}
    data["auth"] = {"policy_file": "policy.toml"}
    from gateway.config import check_security

    config = parse(data, Path("/cfg"))
    check_listen(config.server)
    check_security(config)


def test_a_tls_server_without_a_policy_refuses_to_start() -> None:
    from gateway.config import check_security

    data = valid_data()
    data["server"] = {"tls": dict(TLS_TABLE)}
    with pytest.raises(ConfigError, match=r"^auth\.policy_file: a TLS server needs an authorization policy"):
        check_security(parse(data, Path("/cfg")))


def test_check_security_keeps_the_plaintext_rules() -> None:
    from gateway.config import check_security

    data = valid_data()
    data["server"] = {"listen": "0.0.0.0:50051", "insecure_plaintext": True}
    with pytest.raises(ConfigError, match=r"^server\.listen: plaintext is allowed only on a loopback"):
        check_security(parse(data, Path("/cfg")))
    data["server"] = {"listen": "127.0.0.1:50051", "insecure_plaintext": True}
    data["auth"] = {"policy_file": "policy.toml"}  # a development server may have a policy too
    check_security(parse(data, Path("/cfg")))

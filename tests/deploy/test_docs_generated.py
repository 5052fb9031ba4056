"""docs/configuration.md and docs/api.md are what ``python -m gateway.docs`` prints, and
what they say matches the code that uses it: the config parser and the protos."""

from __future__ import annotations

import copy
import difflib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway import config as config_mod
from gateway import docs
from hsmgw.v1 import admin_pb2, crypto_pb2

ROOT = Path(__file__).resolve().parents[2]


def assert_same(path: Path, generated: str, command: str) -> None:
    committed = path.read_text()
    if committed != generated:
        diff = "".join(difflib.unified_diff(committed.splitlines(True), generated.splitlines(True),
                                            str(path.relative_to(ROOT)), "generated", n=1))
        pytest.fail(f"{path.relative_to(ROOT)} is stale; run `{command}`:\n{diff[:4000]}")


@pytest.mark.parametrize("page", ["config", "api"])
def test_committed_reference_is_the_generators_output(page: str) -> None:
    """The same module, run as the docs say (python -m gateway.docs PAGE)."""
    out = subprocess.run([sys.executable, "-m", "gateway.docs", page], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    name = {"config": "configuration.md", "api": "api.md"}[page]
    assert_same(ROOT / "docs" / name, out.stdout, f"python -m gateway.docs {page} > docs/{name}")


# -- the configuration reference against the parser -----------------------------------------------

MINIMAL: dict[str, Any] = {
    "gateway": {"home_region": "r1", "dr_regions": ["r2"]},
    "pkcs11": {"module": "/usr/lib/softhsm/libsofthsm2.so"},
    "store": {"url": "sqlite:placements.db"},
    "clusters": [{"name": "c1", "region": "r1"}, {"name": "c2", "region": "r2"}],
    "server": {"tls": {"cert_file": "a.pem", "key_file": "b.pem", "client_ca_file": "c.pem"}},
    # So that leaving out dr_regions alone is still a valid config.
    "replication": {"require_dr_copy": False},
}
TABLE_OF = {s.table: s for s in docs.SECTIONS}


def table_in(data: dict[str, Any], table: str) -> dict[str, Any]:
    if table == "clusters":
        return data["clusters"][0]
    node = data
    for part in table.split("."):
        node = node.setdefault(part, {})
    return node


def parsed_value(config: config_mod.GatewayConfig, table: str, key: str) -> Any:
    if table == "gateway":
        return getattr(config, key)
    if table == "clusters":
        return getattr(config.clusters[0], key)
    node: Any = config
    for part in table.split("."):
        node = getattr(node, part)
    return getattr(node, key)


def known_keys(table: str) -> set[str]:
    """The keys the parser accepts in ``table``, from its own unknown-key error."""
    data = copy.deepcopy(MINIMAL)
    table_in(data, table)["no_such_key"] = 1
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse(data, Path("/etc/hsmgw"))
    message = str(err.value)
    assert "no_such_key: unknown key (known: " in message, message
    return set(message.split("(known: ", 1)[1].rstrip(")").split(", "))


@pytest.mark.parametrize("table", list(TABLE_OF))
def test_documented_keys_are_exactly_the_keys_the_parser_accepts(table: str) -> None:
    documented = set(docs.documented_keys()[table])
    accepted = known_keys(table)
    if table == "server":
        accepted.discard("tls")  # a sub-table, documented as [server.tls]
    assert documented == accepted, f"[{table}] documented {sorted(documented)}, parser accepts {sorted(accepted)}"


def test_every_table_is_documented() -> None:
    data = copy.deepcopy(MINIMAL)
    data["no_such_table"] = {}
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.parse(data, Path("/etc/hsmgw"))
    tables = set(str(err.value).split("(known: ", 1)[1].rstrip(")").split(", "))
    assert tables == {t.split(".")[0] for t in TABLE_OF}


def _fields() -> list[tuple[str, docs.FieldDoc]]:
    return [(s.table, f) for s in docs.SECTIONS for f in docs.section_fields(s)]


@pytest.mark.parametrize("table,field", _fields(), ids=lambda v: v if isinstance(v, str) else v.name)
def test_documented_default_is_what_the_parser_uses(table: str, field: docs.FieldDoc) -> None:
    """Leave the key out: the parser fails naming it when it is documented as required,
    and otherwise produces the documented default."""
    data = copy.deepcopy(MINIMAL)
    table_in(data, table).pop(field.name, None)
    if field.default is None:
        with pytest.raises(config_mod.ConfigError) as err:
            config_mod.parse(data, Path("/etc/hsmgw"))
        assert field.name in str(err.value)
        return
    config = config_mod.parse(data, Path("/etc/hsmgw"))
    value = parsed_value(config, table, field.name)
    if field.default == "the cluster's `name`":
        assert value == config.clusters[0].name
    elif field.default == "unset":
        assert value is None
    else:
        assert docs.toml_value(value) == field.default, f"{table}.{field.name}"


def test_every_field_has_a_description() -> None:
    missing = [f"{table}.{f.name}" for table, f in _fields() if not f.doc]
    assert not missing, f"config fields without a docstring: {missing}"


# -- the API reference against the protos ------------------------------------------------------------


def test_api_reference_lists_every_method_message_and_enum_value() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    for file in (crypto_pb2.DESCRIPTOR, admin_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            assert f"### service {service.name}" in text
            for method in service.methods:
                assert f"| `{method.name}` |" in text, method.full_name
        for message in file.message_types_by_name.values():
            assert f"### {message.name}\n" in text, message.name
            for field in message.fields:
                assert f"| `{field.name}` | {field.number} |" in text, f"{message.name}.{field.name}"
        for enum in file.enum_types_by_name.values():
            for value in enum.values:
                assert f"| `{value.name}` | {value.number} |" in text, value.name
    # Comments come through: a field comment from crypto.proto.
    assert "The digest of the message, of the algorithm's hash length." in text


def test_api_anchors_point_at_headings() -> None:
    import re

    text = (ROOT / "docs" / "api.md").read_text()
    headings = {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^### (.+)$", text, re.M)}
    for anchor in set(re.findall(r"\]\(#([^)]+)\)", text)):
        assert anchor in headings, f"#{anchor} has no heading"

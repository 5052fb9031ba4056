"""The local HSM fleet: SoftHSM2 tokens for a small multi-region topology.

``hsmgw fleet init`` makes, under one state directory and idempotently:

- ``softhsm2.conf`` and ``tokens/``: the fleet's own SoftHSM2 configuration;
- one token per cluster (label = cluster name), with generated PINs;
- ``secrets.toml`` (mode 0600): each cluster's user and SO PIN;
- ``hsmgw.toml``: the gateway configuration for this fleet;
- ``placements.db``: an empty SQLite placement store.

Running it again changes nothing; ``force=True`` rebuilds everything (and
destroys every key in the fleet).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from router.placement.sqlite import SqliteStore

log = logging.getLogger(__name__)

DEFAULT_TOPOLOGY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("us-east-1", ("use1-a", "use1-b")),
    ("us-west-2", ("usw2-a",)),
)

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


class FleetError(RuntimeError):
    pass


@dataclass(frozen=True)
class Fleet:
    state_dir: Path
    config_path: Path
    softhsm_conf: Path
    secrets_path: Path
    created: tuple[str, ...]
    """What this run created (empty when everything existed)."""


def find_module() -> str:
    env = os.environ.get("HSMGW_PKCS11_MODULE")
    if env:
        return env
    for candidate in MODULE_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    raise FleetError("SoftHSM2 is not installed (no libsofthsm2.so); on Debian: apt-get install softhsm2")


def _softhsm_util() -> str:
    util = shutil.which("softhsm2-util")
    if util is None:
        raise FleetError("softhsm2-util not found; on Debian: apt-get install softhsm2")
    return util


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _existing_labels(util: str, env: dict[str, str]) -> set[str]:
    out = subprocess.run([util, "--show-slots"], env=env, capture_output=True, text=True, check=False).stdout
    labels = set()
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Label" and value.strip():
            labels.add(value.strip())
    return labels


def _provision_wrapping_key(module: str, conf: Path, so_pins: dict[str, str]) -> list[str]:
    """Run ``gateway._provision`` in its own process (its own SOFTHSM2_CONF)."""
    request = json.dumps({"module": module, "env": {"SOFTHSM2_CONF": str(conf)}, "so_pins": so_pins})
    result = subprocess.run(
        [sys.executable, "-m", "gateway._provision"],
        input=request, capture_output=True, text=True, check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise FleetError(f"provisioning the replication wrapping key failed: {lines[-1] if lines else 'no output'}")
    return [f"replication wrapping key on {label}" for label in json.loads(result.stdout)["created"]]


def init_fleet(
    state_dir: Path,
    *,
    force: bool = False,
    listen: str = "127.0.0.1:50051",
    topology: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_TOPOLOGY,
    max_keys: int = 3300,
    pool_size: int = 4,
    copies: int = 2,
) -> Fleet:
    state_dir = state_dir.resolve()
    created: list[str] = []
    if force and state_dir.exists():
        for name in ("tokens", "softhsm2.conf", "secrets.toml", "hsmgw.toml", "placements.db",
                     "placements.db-wal", "placements.db-shm"):
            target = state_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    module = find_module()
    util = _softhsm_util()

    tokens = state_dir / "tokens"
    conf = state_dir / "softhsm2.conf"
    if not conf.exists():
        tokens.mkdir(mode=0o700, exist_ok=True)
        conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
        )
        created.append(str(conf))
    tokens.mkdir(mode=0o700, exist_ok=True)

    secrets_path = state_dir / "secrets.toml"
    clusters = [(region, name) for region, names in topology for name in names]
    pins: dict[str, dict[str, str]] = {}
    if secrets_path.exists():
        pins = tomllib.loads(secrets_path.read_text()).get("clusters", {})
    missing_pins = [name for _, name in clusters if name not in pins]
    if missing_pins:
        for name in missing_pins:
            pins[name] = {"user_pin": secrets.token_hex(8), "so_pin": secrets.token_hex(8)}
        lines = ["# hsmgw local fleet PINs. Keep this file private (mode 0600).\n"]
        for name, entry in pins.items():
            lines.append(f'\n[clusters.{name}]\nuser_pin = "{entry["user_pin"]}"\nso_pin = "{entry["so_pin"]}"\n')
        _write_private(secrets_path, "".join(lines))
        created.append(str(secrets_path))

    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    present = _existing_labels(util, env)
    for _, name in clusters:
        if name in present:
            continue
        result = subprocess.run(
            [util, "--init-token", "--free", "--label", name,
             "--so-pin", pins[name]["so_pin"], "--pin", pins[name]["user_pin"]],
            env=env, capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            # softhsm2-util's own message names the failure, never the PINs we passed.
            raise FleetError(f"creating token {name} failed: {result.stderr.strip() or result.stdout.strip()}")
        created.append(f"token {name}")

    created += _provision_wrapping_key(module, conf, {name: pins[name]["so_pin"] for _, name in clusters})

    config_path = state_dir / "hsmgw.toml"
    if not config_path.exists():
        home = topology[0][0]
        dr = [region for region, _ in topology[1:]]
        lines = [
            "# hsmgw gateway configuration for the local SoftHSM2 fleet (made by `hsmgw fleet init`).\n",
            "[gateway]\n",
            f'home_region = "{home}"\n',
            f"dr_regions = [{', '.join(repr(r).replace(chr(39), chr(34)) for r in dr)}]\n\n",
            "[server]\n",
            f'listen = "{listen}"\n',
            "# Development only: plaintext is refused on anything but a loopback address.\n",
            "insecure_plaintext = true\n\n",
            "[pkcs11]\n",
            f'module = "{module}"\n',
            f'env = {{ SOFTHSM2_CONF = "{conf}" }}\n\n',
            "[store]\n",
            'url = "sqlite:placements.db"\n\n',
            "[replication]\n",
            "# Each new key is acknowledged once it exists on this many clusters, one in a DR region.\n",
            f"copies = {copies}\n",
            "require_dr_copy = true\n\n",
            "[secrets]\n",
            "# PINs: HSMGW_PIN_<CLUSTER> in the environment wins over this file.\n",
            'file = "secrets.toml"\n',
        ]
        for region, name in clusters:
            lines += [
                "\n[[clusters]]\n",
                f'name = "{name}"\n',
                f'region = "{region}"\n',
                f'token_label = "{name}"\n',
                f"max_keys = {max_keys}\n",
                f"pool_size = {pool_size}\n",
            ]
        config_path.write_text("".join(lines))
        created.append(str(config_path))

    db = state_dir / "placements.db"
    if not db.exists():
        SqliteStore(db).close()
        created.append(str(db))

    return Fleet(
        state_dir=state_dir,
        config_path=config_path,
        softhsm_conf=conf,
        secrets_path=secrets_path,
        created=tuple(created),
    )

"""CloudHSM discovery: what a cluster is made of, checked against AWS's best practices.

``discover`` calls cloudhsmv2 ``DescribeClusters`` for one cluster id and
returns its state, HSM type and HSMs (id, Availability Zone, ENI IP, state),
with warnings where the cluster falls short of CloudHSM's advice:

- ``CLUSTER_NOT_ACTIVE``: the cluster is not ACTIVE (being created, initialised,
  deleted or degraded);
- ``HSM_NOT_ACTIVE``: an HSM is not ACTIVE (being created or replaced);
- ``NO_REDUNDANCY``: fewer than 2 active HSMs — one replacement (AWS replaces
  HSMs for maintenance) takes the cluster down;
- ``NEW_KEY_DURABILITY``: fewer than 3 active HSMs — a new key may exist on one
  HSM only until it synchronises;
- ``SAME_AZ``: two HSMs share an Availability Zone — spread them over as many
  zones as there are HSMs, so one zone's outage takes only one.

``config_entry`` renders the ``[[clusters]]`` table for the gateway config and
``check_entry`` compares an existing one with what discovery found.
"""

from __future__ import annotations

import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HSM_TYPE_MAX_KEYS = {"hsm1.medium": 3300, "hsm2m.medium": 16666}
"""Token keys a cluster of this HSM type holds (CloudHSM quotas)."""
DEFAULT_MAX_KEYS = 3300


class DiscoveryError(Exception):
    """The cluster could not be described (unknown id, no access, AWS unreachable)."""


class DiscoveryUnavailable(DiscoveryError):
    """CloudHSM's API could not answer (unreachable, no permission, throttled, failing):
    nothing is known about the cluster, as opposed to a cluster id that names none."""


# Answers about the request itself: the id names no cluster (or no valid one).
_ABOUT_THE_REQUEST = ("CloudHsmInvalidRequestException", "CloudHsmResourceNotFoundException", "ValidationException")


@dataclass(frozen=True)
class Hsm:
    hsm_id: str
    availability_zone: str
    eni_ip: str
    state: str
    subnet_id: str = ""


@dataclass(frozen=True)
class Finding:
    code: str
    message: str


@dataclass(frozen=True)
class Discovery:
    cluster_id: str
    region: str
    state: str
    hsm_type: str
    hsms: tuple[Hsm, ...]
    warnings: tuple[Finding, ...]

    @property
    def active_hsms(self) -> tuple[Hsm, ...]:
        return tuple(h for h in self.hsms if h.state == "ACTIVE")

    @property
    def max_keys(self) -> int:
        return HSM_TYPE_MAX_KEYS.get(self.hsm_type, DEFAULT_MAX_KEYS)

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "region": self.region,
            "state": self.state,
            "hsm_type": self.hsm_type,
            "max_keys": self.max_keys,
            "hsms": [
                {"hsm_id": h.hsm_id, "availability_zone": h.availability_zone, "eni_ip": h.eni_ip,
                 "state": h.state, "subnet_id": h.subnet_id}
                for h in self.hsms
            ],
            "warnings": [{"code": w.code, "message": w.message} for w in self.warnings],
        }


def assess(state: str, hsms: tuple[Hsm, ...]) -> tuple[Finding, ...]:
    """The best-practice warnings for a cluster in ``state`` with these HSMs."""
    warnings = []
    if state != "ACTIVE":
        warnings.append(Finding("CLUSTER_NOT_ACTIVE", f"cluster state is {state or 'unknown'}, not ACTIVE"))
    for hsm in hsms:
        if hsm.state != "ACTIVE":
            warnings.append(Finding("HSM_NOT_ACTIVE", f"HSM {hsm.hsm_id} is {hsm.state or 'in an unknown state'}"))
    active = [h for h in hsms if h.state == "ACTIVE"]
    if len(active) < 2:
        warnings.append(Finding(
            "NO_REDUNDANCY",
            f"{len(active)} active HSM{'s' if len(active) != 1 else ''}: no +1 redundancy — one HSM replacement "
            "makes the cluster unavailable; run at least 2",
        ))
    if len(active) < 3:
        warnings.append(Finding(
            "NEW_KEY_DURABILITY",
            f"{len(active)} active HSM{'s' if len(active) != 1 else ''}: fewer than 3, so a new key may live on one "
            "HSM only until it synchronises; run at least 3 for durable new keys",
        ))
    zones = Counter(h.availability_zone for h in hsms)
    shared = sorted(zone for zone, n in zones.items() if n > 1)
    if shared:
        warnings.append(Finding(
            "SAME_AZ",
            f"{len(hsms)} HSMs in {len(zones)} Availability Zone{'s' if len(zones) != 1 else ''} "
            f"({', '.join(f'{z}: {zones[z]}' for z in shared)}): spread them over distinct zones",
        ))
    return tuple(warnings)


def discover(cluster_id: str, region: str, endpoint_url: str | None = None, *, client: Any = None) -> Discovery:
    """Describe one CloudHSM cluster and assess it."""
    if client is None:
        from gateway.cloudwatch import make_client

        client = make_client("cloudhsmv2", region, endpoint_url)
    from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

    try:
        pages = client.get_paginator("describe_clusters").paginate(Filters={"clusterIds": [cluster_id]})
        clusters = [c for page in pages for c in page.get("Clusters", [])]
    except ClientError as exc:
        about_request = exc.response.get("Error", {}).get("Code") in _ABOUT_THE_REQUEST
        kind = DiscoveryError if about_request else DiscoveryUnavailable
        raise kind(f"describing cluster {cluster_id} in {region} failed: {exc}") from exc
    except BotoCoreError as exc:
        raise DiscoveryUnavailable(f"describing cluster {cluster_id} in {region} failed: {exc}") from exc
    found = [c for c in clusters if c.get("ClusterId") == cluster_id]
    if not found:
        raise DiscoveryError(f"no CloudHSM cluster {cluster_id} in {region}")
    cluster = found[0]
    hsms = tuple(
        sorted(
            (
                Hsm(
                    hsm_id=h.get("HsmId", ""),
                    availability_zone=h.get("AvailabilityZone", ""),
                    eni_ip=h.get("EniIp", "") or h.get("EniIpV6", ""),
                    state=h.get("State", ""),
                    subnet_id=h.get("SubnetId", ""),
                )
                for h in cluster.get("Hsms", [])
            ),
            key=lambda h: (h.availability_zone, h.hsm_id),
        )
    )
    state = cluster.get("State", "")
    return Discovery(
        cluster_id=cluster_id,
        region=region,
        state=state,
        hsm_type=cluster.get("HsmType", ""),
        hsms=hsms,
        warnings=assess(state, hsms),
    )


# -- the gateway config -----------------------------------------------------------------------


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_entry(discovery: Discovery, name: str, token_label: str | None = None) -> str:
    """The ``[[clusters]]`` table for this cluster (TOML text, with the HSMs as a comment)."""
    lines = [
        f"\n# CloudHSM cluster {discovery.cluster_id} ({discovery.hsm_type or 'unknown type'}), found by "
        "`hsmgw discover`:\n",
    ]
    for hsm in discovery.hsms:
        lines.append(f"#   {hsm.hsm_id}  {hsm.availability_zone}  {hsm.eni_ip}  {hsm.state}\n")
    lines += [
        "[[clusters]]\n",
        f"name = {_quote(name)}\n",
        f"region = {_quote(discovery.region)}\n",
        f"token_label = {_quote(token_label or discovery.cluster_id)}\n",
        f"max_keys = {discovery.max_keys}\n",
    ]
    return "".join(lines)


@dataclass(frozen=True)
class EntryCheck:
    index: int | None
    """Position in ``clusters``; None when the config has no entry of that name."""
    differences: tuple[str, ...]

    @property
    def matches(self) -> bool:
        return self.index is not None and not self.differences


def check_entry(config_path: Path, discovery: Discovery, name: str, token_label: str | None = None) -> EntryCheck:
    """Compare the config's ``[[clusters]]`` entry called ``name`` with what discovery found."""
    try:
        data = tomllib.loads(config_path.read_text())
    except FileNotFoundError:
        raise DiscoveryError(f"config file not found: {config_path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise DiscoveryError(f"{config_path}: not valid TOML: {exc}") from None
    clusters = data.get("clusters", [])
    if not isinstance(clusters, list):
        raise DiscoveryError(f"{config_path}: clusters: expected an array of tables")
    for i, entry in enumerate(clusters):
        if not isinstance(entry, dict) or entry.get("name") != name:
            continue
        differences = []
        if entry.get("region") != discovery.region:
            differences.append(f"clusters[{i}].region is {entry.get('region')!r}; the cluster is in "
                               f"{discovery.region!r}")
        label = token_label or discovery.cluster_id
        if token_label is not None and entry.get("token_label", name) != label:
            differences.append(f"clusters[{i}].token_label is {entry.get('token_label', name)!r}, expected {label!r}")
        max_keys = entry.get("max_keys", DEFAULT_MAX_KEYS)
        if isinstance(max_keys, int) and max_keys > discovery.max_keys:
            differences.append(f"clusters[{i}].max_keys is {max_keys}; a {discovery.hsm_type} cluster holds at most "
                               f"{discovery.max_keys}")
        return EntryCheck(i, tuple(differences))
    return EntryCheck(None, ())


def append_entry(config_path: Path, discovery: Discovery, name: str, token_label: str | None = None) -> None:
    """Append the cluster's entry to the config (text append keeps the operator's comments)."""
    original = config_path.read_text()
    updated = original + ("" if original.endswith("\n") else "\n") + config_entry(discovery, name, token_label)
    try:
        tomllib.loads(updated)
    except tomllib.TOMLDecodeError as exc:  # e.g. clusters written as an inline array
        raise DiscoveryError(f"{config_path}: cannot append a [[clusters]] table here: {exc}") from None
    tmp = config_path.with_name(f".{config_path.name}.discover.tmp")
    tmp.write_text(updated)
    tmp.chmod(config_path.stat().st_mode & 0o777)
    tmp.replace(config_path)


__all__ = [
    "DEFAULT_MAX_KEYS",
    "Discovery",
    "DiscoveryError",
    "EntryCheck",
    "Finding",
    "HSM_TYPE_MAX_KEYS",
    "Hsm",
    "append_entry",
    "assess",
    "check_entry",
    "config_entry",
    "discover",
]

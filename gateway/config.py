"""Gateway configuration: one TOML file → frozen dataclasses, checked at start-up.

Every error names the offending key path (``clusters[1].max_keys``). PINs never
appear here: each cluster's user PIN comes from the environment variable
``HSMGW_PIN_<CLUSTER>`` (upper case, ``-`` → ``_``) or from the secrets file
named by ``secrets.file`` (TOML, ``[clusters.<name>] user_pin = "…"``), which
must be readable by its owner only.

Security settings (see docs/security.md): ``[server.tls]`` turns on mutual TLS
(a TLS listener may bind any address); ``[auth] policy_file`` names the
authorization policy, which a TLS server must have.

Observability (see docs/operations.md): ``[metrics] listen`` serves Prometheus
``/metrics``; ``[cloudwatch]`` publishes the core metrics to CloudWatch.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from router.model import ClusterSpec
from router.secret import Secret

SCHEDULING = ("batch", "inherit")
"""Values of ``[server] scheduling``."""


class ConfigError(ValueError):
    """The configuration is wrong; the message names the key."""


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path
    """PEM certificate chain the server presents (leaf first)."""
    key_file: Path
    """PEM private key of that certificate; owner-only permissions."""
    client_ca_file: Path
    """PEM CA certificate(s) that sign client certificates; every client must present one."""


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    """host:port to serve gRPC on."""
    insecure_plaintext: bool = False
    """Serve without TLS. Allowed only on a loopback address (development)."""
    threads: int = 16
    """gRPC threads per process: calls served at once on grpcio's pool, and as many
    again on the fast path (``fast_path``), and again for BatchSign there."""
    default_deadline: float = 10.0
    """Seconds a request may take: the deadline of a call that sets none, and the cap on a
    longer one (such a call ends DEADLINE_EXCEEDED after this many seconds at most)."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest request message accepted."""
    probe_interval: float = 1.0
    """Seconds between active health probes of each cluster."""
    retry_budget: float = 0.5
    """Extra attempts (a request tried again on its cluster or the next) allowed per request,
    over the last 10 s, with 10 a second allowed whatever the traffic. 0.5 absorbs 30 %
    of calls failing on every cluster (each such request needs 0.43 extra attempts on
    average) while an outage adds at most half the load to the clusters left. From 0
    (only the 10 a second) to 1."""
    pin_workers: bool = True
    """With ``hsmgw serve --workers N`` and no more workers than usable CPUs, run
    worker *i* on CPU *i* only: a worker's threads then never hand a request to
    another core (measured ~30 % more unary calls per second on 2 cores). Turn it
    off when other busy processes share those CPUs."""
    scheduling: str = "batch"
    """How the kernel schedules the serving processes' threads. ``"batch"``: Linux's
    ``SCHED_BATCH`` (no privilege needed), under which a thread that wakes up, for a new
    call or the interpreter lock, waits for the running thread's time slice instead of
    interrupting it, often in the middle of a signature (measured 1–2 % more unary
    calls per second at full load, and no higher latency at 60 % load). A gateway started
    under a policy other than the normal one keeps it. ``"inherit"``: always keep the
    policy the gateway was started with (systemd's ``CPUSchedulingPolicy=``, ``chrt``)."""
    fast_path: bool = True
    """Serve the unary crypto calls (Sign, Verify, Encrypt, Decrypt, Mac, VerifyMac,
    GenerateRandom, GetPublicKey, and BatchSign on threads of its own) on threads that
    each take a call from gRPC core and answer it themselves, instead of grpcio's pool,
    which hands every call from a polling thread to a pool thread (measured ~4× less
    gRPC CPU per call). Up to ``threads`` such calls run at once, and ``threads``
    BatchSign calls, beside ``threads`` others on the pool. Turn it off to serve every
    call on grpcio's pool."""
    tls: TlsConfig | None = None
    """Mutual TLS (``[server.tls]``); reloaded on SIGHUP. Without it the server is
    plaintext, which needs ``insecure_plaintext`` and a loopback address."""

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


def check_address(listen: str) -> None:
    """``server.listen`` (or ``hsmgw serve --listen``) must be host:port."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"server.listen: expected host:port, got {listen!r}")
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"server.listen: port {port} is out of range (0-65535)")


@dataclass(frozen=True)
class Pkcs11Config:
    module: str
    """Path of the PKCS #11 module (``/usr/lib/softhsm/libsofthsm2.so``)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment set before the module loads (e.g. ``SOFTHSM2_CONF``)."""


@dataclass(frozen=True)
class StoreConfig:
    url: str
    """Placement store: ``sqlite:///abs/path.db``, ``sqlite:relative.db`` or
    ``dynamodb://TABLE?region=R[&endpoint=URL]``."""
    rescan_interval: float = 60.0
    """Least seconds between two full reloads of the placement cache when other
    gateways changed the store and the store keeps no change log (DynamoDB; SQLite
    has one, so its changes are followed key by key within seconds). Each reload is
    a full table scan per gateway process. Between reloads, a key this process does
    not know is read from the store, and a TOKEN key that moved or was destroyed is
    re-read when its cluster no longer holds it (an EXTERNAL key: see
    ``external_staleness``)."""
    external_staleness: float = 30.0
    """Longest time, in seconds, an EXTERNAL key is used from a placement cache that has
    not been brought up to date with the store (each process does so about every 2 s
    while the store answers). Only an EXTERNAL key's record says it was destroyed (it has
    no token object to lose), so a process learns of a destroy made elsewhere when it
    reads the store. Past this (the store unreachable that long, or its change log not
    keeping up), each call on an EXTERNAL key reads the key's record first (then again at
    most once per period), and is answered ``UNAVAILABLE`` while the store cannot be
    read. While it is failing, one call at a time reads it, and none for 1 s after a
    failed read (a call's or the refresh's): the other calls on EXTERNAL keys are answered
    ``UNAVAILABLE`` at once, so an outage ties up at most one request thread per process
    on the store's timeout. TOKEN keys keep serving from the cache through a whole store outage. 0: so do
    EXTERNAL keys, and a process that cannot read the store keeps using one destroyed
    elsewhere until it can."""
    adopted_fleet_ids: tuple[str, ...] = ()
    """Fleet ids (32 hex digits) of other placement stores whose tokens are this fleet's too.
    A gateway makes no key on a token whose fleet marker lists only other fleets: ``[store]
    url`` may name the wrong store, and with its id on the token too, that store's reconcile
    would destroy there what its records say is destroyed. List an id here only when those
    tokens are this fleet's: a store rebuilt without its fleet id, or two regions' first
    gateways that each wrote one to a new DynamoDB global table, where the one whose id the
    table replaced stopped before it read the store's again (``hsmctl reconcile`` names the
    ids a token lists)."""

    def validate(self, base: Path) -> None:
        if self.url.startswith("sqlite:"):
            self.sqlite_path(base)
        elif self.url.startswith("dynamodb://"):
            from router.placement.factory import parse_dynamodb_url

            try:
                parse_dynamodb_url(self.url)
            except ValueError as exc:
                raise ConfigError(f"store.url: {exc}") from None
        else:
            raise ConfigError(f"store.url: unsupported store {self.url!r} (expected sqlite:PATH or dynamodb://TABLE)")

    def sqlite_path(self, base: Path) -> Path:
        if not self.url.startswith("sqlite:"):
            raise ConfigError(f"store.url: {self.url!r} is not an SQLite store")
        path = Path(self.url[len("sqlite:") :].removeprefix("//"))
        return path if path.is_absolute() else base / path


@dataclass(frozen=True)
class SecretsConfig:
    file: Path | None = None
    """TOML file with ``[clusters.<name>] user_pin``; owner-only permissions."""


@dataclass(frozen=True)
class AuthConfig:
    policy_file: Path | None = None
    """Authorization policy (TOML, docs/security.md); reloaded on SIGHUP. Without one
    only a development server (plaintext on loopback) starts, and it allows every call."""


@dataclass(frozen=True)
class ReplicationConfig:
    copies: int = 2
    """Clusters that hold each new key, the primary included (1 = no replication)."""
    require_dr_copy: bool = True
    """At least one copy must be in a DR region before a key is acknowledged (a key of
    two or more copies; see ``min_copies``)."""
    min_copies: int = 1
    """Fewest clusters an application may ask a new TOKEN key to have (GenerateKey's
    ``replication.copies``). At 1 an application may make a key with no copy, and a
    non-extractable key, which has only one; set it to ``copies`` to hold every key to the
    policy (such requests are then FAILED_PRECONDITION)."""
    on_unavailable: str = "fail"
    """When the policy cannot be met at creation: ``fail`` (UNAVAILABLE, nothing left
    behind) or ``ack-local`` (acknowledge with the copies made; repair later)."""
    repair_interval: float = 10.0
    """Seconds between passes of the background repairer: it copies keys short of their
    replication policy, rolls back creations left unfinished past ``creation_grace``, and
    looks for a stray copy of each key its process destroyed on the clusters the key's
    record does not name."""
    creation_grace: float = 30.0
    """Seconds an unfinished creation is left to its own attempt before a retry
    (or the reconciler) takes it over. A retry that takes it over holds it for as long
    again and gives up after half of it: more than twice the slowest key generation
    and copy. A retry does not wait for it when the record names a process of the
    retry's own host and PID namespace that is gone (killed, crashed): it takes the
    creation over at once. A process on another host or in another container, one still
    running, or a record from a version that did not name its process, is waited for."""
    reconcile_interval: float = 3600.0
    """Seconds between report-only reconciles in one process of the gateway (its first
    worker): the store and every token compared, findings (a replica that lost its
    copy, orphans, duplicates) to the log and ``hsmgw_reconcile_findings``, nothing
    changed. Each pass lists every token's objects and reads the whole store (on
    DynamoDB a full-table Scan). 0 turns it off; start-up reconciles either way."""


@dataclass(frozen=True)
class AdminConfig:
    quorum: int = 2
    """Distinct admins who must agree before a mutating admin change runs (the requester is one).
    1 lets one admin do everything alone, on every gateway of the placement store (the
    switches are shared): the gateway warns at start."""
    change_ttl: float = 3600.0
    """Seconds a pending change waits for approvals before it expires."""
    state_file: str = "admin.db"
    """Where earlier versions kept pending changes and operator switches, one file per host
    (relative to the config file). They live in the placement store now: a file found here
    at start is carried over into the store and renamed `<name>.migrated`."""
    audit_log: str = "audit.log"
    """The hash-chained audit log (relative to the config file). The gateway does not start
    if it cannot append to it. A request or approval that cannot be written there does not
    count (UNAVAILABLE): every admin change is audited."""


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""
    """host:port of the Prometheus ``/metrics`` endpoint (plain HTTP; e.g. ``127.0.0.1:9464``).
    Empty: no endpoint. One port per process: several workers on a host need one each."""


@dataclass(frozen=True)
class CloudWatchConfig:
    enabled: bool = False
    """Publish the core metrics to CloudWatch with PutMetricData (see docs/operations.md)."""
    namespace: str = "HSMGW"
    """CloudWatch namespace of the published metrics (and of the alarms ``hsmgw alarms install`` makes)."""
    region: str = ""
    """AWS region to publish to; empty: ``gateway.home_region``."""
    endpoint_url: str = ""
    """CloudWatch endpoint; empty: the region's (set for a VPC endpoint or a local mock)."""
    interval: float = 60.0
    """Seconds between samples."""


@dataclass(frozen=True)
class GatewayConfig:
    home_region: str
    """Region this gateway serves first; new keys are placed here."""
    dr_regions: tuple[str, ...]
    """Secondary regions for disaster recovery."""
    pkcs11: Pkcs11Config
    store: StoreConfig
    clusters: tuple[ClusterSpec, ...]
    server: ServerConfig = ServerConfig()
    secrets: SecretsConfig = SecretsConfig()
    replication: ReplicationConfig = ReplicationConfig()
    auth: AuthConfig = AuthConfig()
    admin: AdminConfig = AdminConfig()
    metrics: MetricsConfig = MetricsConfig()
    cloudwatch: CloudWatchConfig = CloudWatchConfig()
    creates_keys: bool = True
    """Whether this gateway makes new keys (GenerateKey). Regions that share one placement
    table (a DynamoDB global table) do not check each other's writes: let one region create
    keys and set ``false`` in the others. Those answer a GenerateKey with
    FAILED_PRECONDITION, reason ``KEY_CREATION_ELSEWHERE``, before anything is made, and
    ``gateway.client.Client`` moves it to its next endpoint; a GenerateKey whose
    ``request_id`` already made its key (replicated here) still returns that key. Every
    other call is served as usual. Moving the role during a regional failover is a config
    change: deploy/dynamodb/README.md."""
    base_dir: Path = Path(".")
    """Directory relative paths are resolved against (the config file's)."""

    @property
    def regions(self) -> dict[str, tuple[str, ...]]:
        regions: dict[str, list[str]] = {}
        for cluster in self.clusters:
            regions.setdefault(cluster.region, []).append(cluster.name)
        return {r: tuple(c) for r, c in regions.items()}

    def store_path(self) -> Path:
        return self.store.sqlite_path(self.base_dir)


# -- parsing ------------------------------------------------------------------


def _take(table: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ConfigError(f"{path}{key}: missing")
        return default
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{path}{key}: expected {getattr(kind, '__name__', kind)}, got a boolean")
    if not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ConfigError(f"{path}{key}: expected {name}, got {type(value).__name__}")
    return value


def _no_unknown(table: dict[str, Any], known: set[str], path: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{path}{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")


def _off_or_positive(value: float, path: str) -> float:
    """0 (off) or a finite positive number."""
    return 0.0 if value == 0 else float(_positive(value, path))


def _positive(value: int | float, path: str) -> Any:
    if not value > 0:  # NaN too
        raise ConfigError(f"{path}: must be greater than 0")
    if value == math.inf:
        raise ConfigError(f"{path}: must be finite")
    return value


def _fleet_ids(values: list[Any]) -> tuple[str, ...]:
    for i, value in enumerate(values):
        if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{32}", value):
            raise ConfigError(f"store.adopted_fleet_ids[{i}]: expected a fleet id of 32 hex digits, got {value!r}")
    return tuple(values)


def parse(data: dict[str, Any], base_dir: Path) -> GatewayConfig:
    _no_unknown(
        data,
        {"gateway", "server", "pkcs11", "store", "secrets", "clusters", "replication", "auth", "admin", "metrics",
         "cloudwatch"},
        "",
    )
    gw = _take(data, "gateway", dict, "")
    _no_unknown(gw, {"home_region", "dr_regions", "creates_keys"}, "gateway.")
    home = _take(gw, "home_region", str, "gateway.")
    dr = _take(gw, "dr_regions", list, "gateway.", [])
    for i, region in enumerate(dr):
        if not isinstance(region, str):
            raise ConfigError(f"gateway.dr_regions[{i}]: expected str")

    srv = _take(data, "server", dict, "", {})
    _no_unknown(
        srv,
        {"listen", "insecure_plaintext", "threads", "default_deadline", "max_message_bytes", "probe_interval",
         "retry_budget", "pin_workers", "scheduling", "fast_path", "tls"},
        "server.",
    )
    server = ServerConfig(
        listen=_take(srv, "listen", str, "server.", ServerConfig.listen),
        insecure_plaintext=_take(srv, "insecure_plaintext", bool, "server.", False),
        threads=_positive(_take(srv, "threads", int, "server.", ServerConfig.threads), "server.threads"),
        default_deadline=_positive(
            _take(srv, "default_deadline", float, "server.", ServerConfig.default_deadline), "server.default_deadline"
        ),
        max_message_bytes=_positive(
            _take(srv, "max_message_bytes", int, "server.", ServerConfig.max_message_bytes), "server.max_message_bytes"
        ),
        probe_interval=_positive(
            _take(srv, "probe_interval", float, "server.", ServerConfig.probe_interval), "server.probe_interval"
        ),
        retry_budget=_take(srv, "retry_budget", float, "server.", ServerConfig.retry_budget),
        pin_workers=_take(srv, "pin_workers", bool, "server.", ServerConfig.pin_workers),
        scheduling=_take(srv, "scheduling", str, "server.", ServerConfig.scheduling),
        fast_path=_take(srv, "fast_path", bool, "server.", ServerConfig.fast_path),
        tls=_tls(_take(srv, "tls", dict, "server.", None), base_dir),
    )
    if not 0 <= server.retry_budget <= 1:  # NaN too
        raise ConfigError(f"server.retry_budget: expected a share of requests from 0 to 1, got {server.retry_budget}")
    if server.scheduling not in SCHEDULING:
        raise ConfigError(f"server.scheduling: expected 'batch' or 'inherit', got {server.scheduling!r}")
    if server.tls is not None and server.insecure_plaintext:
        raise ConfigError("server.insecure_plaintext: must be false when [server.tls] is configured")
    check_address(server.listen)

    p11 = _take(data, "pkcs11", dict, "")
    _no_unknown(p11, {"module", "env"}, "pkcs11.")
    env = _take(p11, "env", dict, "pkcs11.", {})
    for name, value in env.items():
        if not isinstance(value, str):
            raise ConfigError(f"pkcs11.env.{name}: expected str")
    pkcs11 = Pkcs11Config(module=_take(p11, "module", str, "pkcs11."), env=dict(env))

    st = _take(data, "store", dict, "")
    _no_unknown(st, {"url", "rescan_interval", "external_staleness", "adopted_fleet_ids"}, "store.")
    store = StoreConfig(
        url=_take(st, "url", str, "store."),
        rescan_interval=_positive(
            _take(st, "rescan_interval", float, "store.", StoreConfig.rescan_interval), "store.rescan_interval"
        ),
        external_staleness=_off_or_positive(
            _take(st, "external_staleness", float, "store.", StoreConfig.external_staleness),
            "store.external_staleness",
        ),
        adopted_fleet_ids=_fleet_ids(_take(st, "adopted_fleet_ids", list, "store.", [])),
    )
    store.validate(base_dir)

    sec = _take(data, "secrets", dict, "", {})
    _no_unknown(sec, {"file"}, "secrets.")
    secrets_file = _take(sec, "file", str, "secrets.", None)
    secrets = SecretsConfig(file=(base_dir / secrets_file) if secrets_file else None)

    rep = _take(data, "replication", dict, "", {})
    _no_unknown(rep, {"copies", "require_dr_copy", "min_copies", "on_unavailable", "repair_interval",
                      "creation_grace", "reconcile_interval"}, "replication.")
    replication = ReplicationConfig(
        copies=_positive(_take(rep, "copies", int, "replication.", 2), "replication.copies"),
        require_dr_copy=_take(rep, "require_dr_copy", bool, "replication.", True),
        min_copies=_positive(_take(rep, "min_copies", int, "replication.", 1), "replication.min_copies"),
        on_unavailable=_take(rep, "on_unavailable", str, "replication.", "fail"),
        repair_interval=_positive(
            _take(rep, "repair_interval", float, "replication.", 10.0), "replication.repair_interval"
        ),
        creation_grace=_positive(
            _take(rep, "creation_grace", float, "replication.", 30.0), "replication.creation_grace"
        ),
        reconcile_interval=_off_or_positive(
            _take(rep, "reconcile_interval", float, "replication.", ReplicationConfig.reconcile_interval),
            "replication.reconcile_interval",
        ),
    )
    if replication.min_copies > replication.copies:
        raise ConfigError(f"replication.min_copies: {replication.min_copies} is more than replication.copies "
                          f"({replication.copies}), which new keys get by default")
    if replication.on_unavailable not in ("fail", "ack-local"):
        raise ConfigError(
            f"replication.on_unavailable: expected 'fail' or 'ack-local', got {replication.on_unavailable!r}"
        )

    au = _take(data, "auth", dict, "", {})
    _no_unknown(au, {"policy_file"}, "auth.")
    policy_file = _take(au, "policy_file", str, "auth.", None)
    if policy_file == "":
        raise ConfigError("auth.policy_file: empty")
    auth = AuthConfig(policy_file=(base_dir / policy_file) if policy_file else None)

    adm = _take(data, "admin", dict, "", {})
    _no_unknown(adm, {"quorum", "change_ttl", "state_file", "audit_log"}, "admin.")
    admin = AdminConfig(
        quorum=_positive(_take(adm, "quorum", int, "admin.", 2), "admin.quorum"),
        change_ttl=_positive(_take(adm, "change_ttl", float, "admin.", 3600.0), "admin.change_ttl"),
        state_file=_take(adm, "state_file", str, "admin.", "admin.db"),
        audit_log=_take(adm, "audit_log", str, "admin.", "audit.log"),
    )

    raw_clusters = _take(data, "clusters", list, "")
    if not raw_clusters:
        raise ConfigError("clusters: at least one cluster is required")
    clusters = []
    names: set[str] = set()
    for i, c in enumerate(raw_clusters):
        path = f"clusters[{i}]."
        if not isinstance(c, dict):
            raise ConfigError(f"clusters[{i}]: expected a table")
        _no_unknown(
            c,
            {"name", "region", "token_label", "max_keys", "pool_size", "unwrapped_cache", "call_timeout",
             "serialize_object_changes"},
            path,
        )
        name = _take(c, "name", str, path)
        if not name or name in names:
            raise ConfigError(f"{path}name: {'empty' if not name else 'duplicate ' + repr(name)}")
        names.add(name)
        clusters.append(
            ClusterSpec(
                name=name,
                region=_take(c, "region", str, path),
                token_label=_take(c, "token_label", str, path, name),
                max_keys=_positive(_take(c, "max_keys", int, path, 3300), path + "max_keys"),
                pool_size=_positive(_take(c, "pool_size", int, path, 4), path + "pool_size"),
                unwrapped_cache=_positive(_take(c, "unwrapped_cache", int, path, 256), path + "unwrapped_cache"),
                call_timeout=_positive(_take(c, "call_timeout", float, path, ClusterSpec.call_timeout),
                                       path + "call_timeout"),
                serialize_object_changes=_take(c, "serialize_object_changes", bool, path,
                                               ClusterSpec.serialize_object_changes),
            )
        )
    labels: dict[str, str] = {}
    env_names: dict[str, str] = {}
    for i, cluster in enumerate(clusters):
        # Two names for one token would make each see the other's keys as objects its records
        # do not put there (orphans, to reconcile), and a "replica" the same copy.
        other = labels.setdefault(cluster.token_label, cluster.name)
        if other != cluster.name:
            raise ConfigError(
                f"clusters[{i}].token_label: {cluster.name!r} and {other!r} both name token "
                f"{cluster.token_label!r}; each cluster is a token of its own"
            )
        env_name = pin_env_name(cluster.name)
        other = env_names.setdefault(env_name, cluster.name)
        if other != cluster.name:
            raise ConfigError(f"clusters[{i}].name: {cluster.name!r} and {other!r} would share the PIN variable "
                              f"{env_name}; rename one")
    config = GatewayConfig(
        home_region=home,
        dr_regions=tuple(dr),
        creates_keys=_take(gw, "creates_keys", bool, "gateway.", GatewayConfig.creates_keys),
        pkcs11=pkcs11,
        store=store,
        clusters=tuple(clusters),
        server=server,
        secrets=secrets,
        replication=replication,
        auth=auth,
        admin=admin,
        metrics=_metrics(_take(data, "metrics", dict, "", {})),
        cloudwatch=_cloudwatch(_take(data, "cloudwatch", dict, "", {})),
        base_dir=base_dir,
    )
    if home not in config.regions:
        raise ConfigError(f"gateway.home_region: no cluster is in region {home!r}")
    for i, region in enumerate(config.dr_regions):
        if region not in config.regions:
            raise ConfigError(f"gateway.dr_regions[{i}]: no cluster is in region {region!r}")
    if replication.copies > len(config.clusters):
        raise ConfigError(f"replication.copies: {replication.copies} copies but only {len(config.clusters)} clusters")
    if replication.require_dr_copy and replication.copies > 1 and not config.dr_regions:
        raise ConfigError("replication.require_dr_copy: no DR region is configured (gateway.dr_regions)")
    return config


def _metrics(table: dict[str, Any]) -> MetricsConfig:
    _no_unknown(table, {"listen"}, "metrics.")
    listen = _take(table, "listen", str, "metrics.", MetricsConfig.listen)
    if listen:
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"metrics.listen: expected host:port (or empty to disable), got {listen!r}")
    return MetricsConfig(listen=listen)


def _cloudwatch(table: dict[str, Any]) -> CloudWatchConfig:
    path = "cloudwatch."
    _no_unknown(table, {"enabled", "namespace", "region", "endpoint_url", "interval"}, path)
    config = CloudWatchConfig(
        enabled=_take(table, "enabled", bool, path, False),
        namespace=_take(table, "namespace", str, path, CloudWatchConfig.namespace),
        region=_take(table, "region", str, path, ""),
        endpoint_url=_take(table, "endpoint_url", str, path, ""),
        interval=_positive(_take(table, "interval", float, path, CloudWatchConfig.interval), path + "interval"),
    )
    if not config.namespace or config.namespace.startswith("AWS/"):
        raise ConfigError(f"cloudwatch.namespace: {config.namespace!r} is empty or reserved (AWS/…)")
    if config.endpoint_url and not config.endpoint_url.startswith(("http://", "https://")):
        raise ConfigError(f"cloudwatch.endpoint_url: expected an http(s) URL, got {config.endpoint_url!r}")
    return config


def _tls(table: dict[str, Any] | None, base_dir: Path) -> TlsConfig | None:
    if table is None:
        return None
    _no_unknown(table, {"cert_file", "key_file", "client_ca_file"}, "server.tls.")
    paths = {}
    for key in ("cert_file", "key_file", "client_ca_file"):
        value = _take(table, key, str, "server.tls.")
        if not value:
            raise ConfigError(f"server.tls.{key}: empty")
        paths[key] = base_dir / value
    return TlsConfig(**paths)


def load(path: str | Path) -> GatewayConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (at byte offset {exc.start}); TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(data, path.resolve().parent)


def check_listen(server: ServerConfig) -> None:
    """Plaintext only on loopback; anything else needs TLS (refuse to start).

    A TLS listener (``[server.tls]``) may bind any address.
    """
    if server.tls is not None:
        return
    if not server.insecure_plaintext:
        raise ConfigError(
            "server.insecure_plaintext: TLS is not configured; set insecure_plaintext = true "
            "to serve plaintext on a loopback address for development"
        )
    host = server.host
    if not is_loopback(host):
        raise ConfigError(f"server.listen: plaintext is allowed only on a loopback address, not {host!r}")


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_security(config: GatewayConfig) -> None:
    """Everything ``check_listen`` checks, and: a TLS server needs an authorization policy."""
    check_listen(config.server)
    if config.server.tls is not None and config.auth.policy_file is None:
        raise ConfigError(
            "auth.policy_file: a TLS server needs an authorization policy (every call is denied "
            "without one); set [auth] policy_file, see docs/security.md"
        )


# -- secrets --------------------------------------------------------------------


def pin_env_name(cluster: str) -> str:
    return "HSMGW_PIN_" + "".join(ch if ch.isalnum() else "_" for ch in cluster).upper()


def load_pins(config: GatewayConfig, environ: dict[str, str] | None = None) -> dict[str, Secret]:
    """Each cluster's user PIN: from its env variable, else from the secrets file."""
    environ = dict(os.environ if environ is None else environ)
    from_file: dict[str, Any] = {}
    if config.secrets.file is not None:
        from_file = _read_secrets_file(config.secrets.file)
    pins: dict[str, Secret] = {}
    for cluster in config.clusters:
        env_name = pin_env_name(cluster.name)
        if environ.get(env_name):
            pins[cluster.name] = Secret(environ[env_name])
            continue
        table = from_file.get("clusters", {})
        if not isinstance(table, dict):
            raise ConfigError("secrets.file: expected [clusters.<name>] tables with user_pin")
        entry = table.get(cluster.name, {})
        pin = entry.get("user_pin") if isinstance(entry, dict) else None
        if pin is not None and not isinstance(pin, str):
            # Never the value: say only what it is, and how to write it.
            raise ConfigError(
                f"secrets.file: clusters.{cluster.name}.user_pin in {config.secrets.file} is a "
                f"{_toml_type(pin)}, not a string: quote it (user_pin = \"…\")"
            )
        if not pin:
            raise ConfigError(
                f"no user PIN for cluster {cluster.name}: set {env_name} or "
                f"clusters.{cluster.name}.user_pin in the secrets file"
            )
        pins[cluster.name] = Secret(pin)
    return pins


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, list):
        return "array"
    return "date or time"


def _read_secrets_file(path: Path) -> dict[str, Any]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"secrets.file: {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"secrets.file: cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"secrets.file: {path} is a directory, not a file")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"secrets.file: {path} is open to its group or others; run: chmod 600 {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"secrets.file: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        # Neither the byte nor where it is: it could be part of a PIN.
        raise ConfigError(f"secrets.file: {path} is not UTF-8 text; TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError:
        # The parser's message could quote a PIN; say only where.
        raise ConfigError(f"secrets.file: {path} is not valid TOML") from None

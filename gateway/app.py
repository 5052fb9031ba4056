"""Build the router from a configuration: module, pools, store."""

from __future__ import annotations

import logging
import os
from typing import Callable

from gateway.config import ConfigError, GatewayConfig, load_pins
from router.backend import HsmBackend
from router.model import ReplicationPolicy
from router.pkcs11 import Pkcs11Cluster, load_module
from router.placement import PlacementStore, StoreMisconfigured
from router.placement.factory import make_store
from router.reconcile import ReconcileReport, reconcile
from router.router import Router, Topology

log = logging.getLogger(__name__)


def open_store(config: GatewayConfig) -> PlacementStore:
    """The placement store, read once: a wrong ``[store] url`` fails here, before any HSM login.

    Raises ``ConfigError`` (naming ``store.url``) when the store cannot be used whatever
    the time (a SQLite file's directory missing, a DynamoDB table that does not exist),
    ``StoreError`` when it may come back (unreachable, throttled).
    """
    try:
        store = make_store(config.store.url, config.base_dir)
    except StoreMisconfigured as exc:
        raise ConfigError(f"store.url: {exc}") from None
    try:
        store.change_counter()
    except StoreMisconfigured as exc:
        store.close()
        raise ConfigError(f"store.url: {exc}") from None
    except BaseException:
        store.close()
        raise
    return store


def build_router(config: GatewayConfig, *, reconcile_at_start: bool = True) -> Router:
    """Open every cluster's pool and the placement store; fail fast and clearly.

    Then, with ``reconcile_at_start``, resolve what a crash may have left: unfinished
    creations and objects no placement names.
    """
    pins = load_pins(config)
    store = open_store(config)
    backends: dict[str, HsmBackend] = {}
    try:
        for name, value in config.pkcs11.env.items():
            os.environ[name] = value
        module = load_module(config.pkcs11.module)
        for spec in config.clusters:
            backends[spec.name] = Pkcs11Cluster(module, spec, pins[spec.name])
            log.info("cluster %s (%s): %d sessions open", spec.name, spec.region, spec.pool_size)
            if spec.pool_size >= config.server.threads:
                log.warning(
                    "cluster %s: pool_size (%d) is not below server.threads (%d): if its HSM hangs, calls "
                    "stuck in it can hold every request thread, and the gateway stops answering for all keys",
                    spec.name, spec.pool_size, config.server.threads,
                )
            if spec.call_timeout >= config.server.default_deadline:
                log.warning(
                    "cluster %s: call_timeout (%g s) is not below server.default_deadline (%g s): a request "
                    "waiting on this cluster when it hangs has no time left for a replica",
                    spec.name, spec.call_timeout, config.server.default_deadline,
                )
    except BaseException:
        for backend in backends.values():
            backend.close()
        store.close()
        raise
    topology = Topology(home_region=config.home_region, dr_regions=config.dr_regions, regions=config.regions)
    policy = ReplicationPolicy(
        copies=config.replication.copies,
        require_dr_copy=config.replication.require_dr_copy,
        min_copies=config.replication.min_copies,
        ack_local=config.replication.on_unavailable == "ack-local",
    )
    router = Router(
        topology, backends, store, replication=policy, creation_grace=config.replication.creation_grace,
        rescan_interval=config.store.rescan_interval, creates_keys=config.creates_keys,
        external_staleness=config.store.external_staleness, retry_budget=config.server.retry_budget,
        adopted_fleet_ids=config.store.adopted_fleet_ids,
    )
    if reconcile_at_start:
        start_reconcile(router)
    return router


def start_reconcile(router: Router, progress: Callable[[], None] | None = None) -> ReconcileReport:
    """Resolve what a crash may have left (unfinished creations, objects no placement names)
    before the gateway serves; the report is the process's first reconcile (``hsmgw_reconcile_*``).
    ``progress``: called after each step (``router.reconcile.reconcile``)."""
    report = reconcile(router, fix=True, progress=progress)
    if not report.clean:
        log.warning("reconcile at start: %s", report.summary())
    return report

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway.fleet import Fleet, find_module, init_fleet
from hsmgw.v1 import admin_pb2_grpc, crypto_pb2_grpc
from tests.support import GatewayProcess, TokenInspector


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failure, show the logs of the gateways the test used (pytest prunes old temp dirs).

    Those it asked for as fixtures, and those it started itself.
    """
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "setup":
        item.stash[_STARTED_BEFORE] = len(GatewayProcess.started)
    if report.when != "call" or not report.failed:
        return
    used = [value for value in getattr(item, "funcargs", {}).values() if isinstance(value, GatewayProcess)]
    used += [g for g in GatewayProcess.started[item.stash.get(_STARTED_BEFORE, 0):] if g not in used]
    for index, process in enumerate(used):
        report.sections.append((f"gateway log {index + 1} of {len(used)} ({process.log_path.name})",
                                process.log_digest()))


_STARTED_BEFORE = pytest.StashKey[int]()


def pytest_unconfigure(config: pytest.Config) -> None:
    """The run is over and reported: a thread a failed test left running (a load client whose
    stop never came) must not keep the process, and CI, waiting for ever."""
    import os
    import sys
    import threading
    import time

    end = time.monotonic() + 10  # a thread that is finishing may
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, end - time.monotonic()))
    left = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if left:
        print(f"\ntests left {len(left)} threads running ({', '.join(left[:5])}); exiting without them",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(int(getattr(config, "_hsmgw_exitstatus", 1)) or 1)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config._hsmgw_exitstatus = int(exitstatus)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """The shared local fleet: 3 clusters in 2 regions, real SoftHSM2 tokens."""
    return init_fleet(tmp_path_factory.mktemp("fleet"), listen="127.0.0.1:0")


@pytest.fixture(scope="session")
def gateway(fleet: Fleet) -> Iterator[GatewayProcess]:
    """A real gateway process on a free port, serving the shared fleet."""
    process = GatewayProcess(fleet.config_path).start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def channel(gateway: GatewayProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway.target) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


@pytest.fixture(scope="session")
def crypto(channel: grpc.Channel) -> crypto_pb2_grpc.CryptoServiceStub:
    return crypto_pb2_grpc.CryptoServiceStub(channel)


@pytest.fixture(scope="session")
def admin(channel: grpc.Channel) -> admin_pb2_grpc.AdminServiceStub:
    return admin_pb2_grpc.AdminServiceStub(channel)


@pytest.fixture(scope="session")
def tokens(fleet: Fleet) -> TokenInspector:
    """Direct python-pkcs11 access to the shared fleet's tokens."""
    return TokenInspector(fleet.softhsm_conf, fleet.secrets_path, find_module())


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def make_router(fleet: Fleet, tokens: TokenInspector, tmp_path: Path):
    """Build in-process Routers on the shared fleet's real tokens and placement store.

    They share the store with the fleet's gateway process, so reconciling from
    them sees every key the gateway made (``store=`` gives one another store, which takes
    the fleet store's fleet id unless ``adopt_fleet=False``).
    """
    import tomllib

    from gateway.config import load
    from router.pkcs11 import Pkcs11Cluster
    from router.placement.sqlite import SqliteStore
    from router.router import Router, Topology
    from router.secret import Secret

    config = load(fleet.config_path)
    pins = tomllib.loads(fleet.secrets_path.read_text())["clusters"]
    built: list[Router] = []
    store_path = config.store_path()
    fleet_store = SqliteStore(store_path)

    def build(spec_changes: dict | None = None, **kwargs) -> Router:
        import dataclasses

        backends = {}
        for spec in config.clusters:
            spec = dataclasses.replace(spec, **(spec_changes or {}))
            tokens.session(spec.name)  # the inspector holds the login; pools share it
            backends[spec.name] = Pkcs11Cluster(tokens.module, spec, Secret(pins[spec.name]["user_pin"]))
        topology = Topology(home_region=config.home_region, dr_regions=config.dr_regions, regions=config.regions)
        store = kwargs.pop("store", None) or SqliteStore(store_path)
        if kwargs.pop("adopt_fleet", True):
            # A test's own store stands for the fleet's store on the shared tokens, as a migrated copy
            # of it would: with a fleet id of its own, each would add one to the tokens' markers, which
            # keep 16, and the gateway's and the fleet store's reconciles would find theirs gone.
            store.fleet_id(fleet_store.fleet_id())
        router = Router(topology, backends, store, **kwargs)
        built.append(router)
        return router

    yield build
    for router in built:
        router.close()
    fleet_store.close()

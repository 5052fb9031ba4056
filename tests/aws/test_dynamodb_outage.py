"""An unreachable DynamoDB makes every store call fail fast with StoreError (which the
gateway maps to UNAVAILABLE while serving from its cache), and the same store object
works again once the endpoint is back — no restart of the gateway needed."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import pytest

from router.model import KeyAlgorithm, KeyState, KeyUsage, Placement
from router.placement import StoreError
from router.placement.dynamodb import DynamoStore
from tests.aws.conftest import REGION, MotoServer

FAST = 5.0
"""Seconds within which a call must give up (the defaults aim at about 2)."""

KEY = Placement(
    "pay/sign-1", KeyAlgorithm.EC_P256, KeyUsage.SIGN_VERIFY, KeyState.ENABLED, "use1-a", ("usw2-a",),
    create_time=1_767_225_600.0, request_id="r-1",
)


def _calls(store: DynamoStore) -> dict[str, Callable[[], object]]:
    other = dataclasses.replace(KEY, key_id="pay/sign-2", request_id="r-2")
    return {
        "get": lambda: store.get(KEY.key_id),
        "by_request": lambda: store.by_request(KEY.request_id),
        "create": lambda: store.create(other),
        "update": lambda: store.update(KEY),
        "delete": lambda: store.delete(KEY.key_id, KEY.version),
        "list": lambda: store.list(),
        "scan": lambda: list(store.scan()),
        "change_counter": store.change_counter,
        "admin_record": lambda: store.admin_record("switches"),
        "put_admin_record": lambda: store.put_admin_record("switches", {"drained": ["use1-a"]}, 0),
        "admin_records": lambda: list(store.admin_records()),
    }


def _assert_fails_fast(name: str, call: Callable[[], object]) -> float:
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        call()
    elapsed = time.monotonic() - started
    assert elapsed < FAST, f"{name} took {elapsed:.1f} s to fail"
    assert "dynamodb://" in str(info.value)
    return elapsed


@pytest.mark.slow
def test_calls_fail_fast_while_dynamodb_is_down_and_work_again_after(
    spare_moto_server: Callable[[], MotoServer],
) -> None:
    moto = spare_moto_server()
    store = DynamoStore("placements", region=REGION, endpoint_url=moto.endpoint)
    store.create_table()
    store.create(KEY)

    # Hung: the port accepts connections but nothing answers (read timeouts).
    moto.pause()
    try:
        _assert_fails_fast("get (hung)", lambda: store.get(KEY.key_id))
        late = dataclasses.replace(KEY, key_id="late", request_id="x")
        _assert_fails_fast("create (hung)", lambda: store.create(late))
    finally:
        moto.resume()
    assert store.get(KEY.key_id) == KEY

    # Gone: connections are refused.
    moto.stop()
    for name, call in _calls(store).items():
        _assert_fails_fast(name, call)

    # Back (moto restarts empty, as a restored table would need re-creating).
    moto.start()
    store.create_table()
    store.create(KEY)
    assert store.get(KEY.key_id) == KEY
    assert store.by_request(KEY.request_id) == KEY
    enabled = store.update(dataclasses.replace(KEY, state=KeyState.UNDER_REPLICATED))
    assert [p.key_id for p in store.list()] == [KEY.key_id]
    store.delete(enabled.key_id, enabled.version)
    assert store.get(KEY.key_id) is None
    store.close()

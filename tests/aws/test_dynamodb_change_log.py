"""The DynamoDB store's change log: a cache follows other gateways' writes key by key
(one BatchGetItem of log items), and reloads everything only when the log cannot vouch."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

import router.placement.dynamodb as dynamo
from router.model import KeyAlgorithm, KeyState, KeyUsage, Placement
from router.placement.dynamodb import DynamoStore
from router.router import Router, Topology
from tests.aws.conftest import REGION, MotoServer


def placement(key_id: str, **changes: object) -> Placement:
    base = Placement(key_id, KeyAlgorithm.EC_P256, KeyUsage.SIGN_VERIFY, KeyState.ENABLED, "use1-a", ("usw2-a",),
                     create_time=1_767_225_600.5, request_id=f"req-{key_id}-{uuid.uuid4().hex[:6]}")
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


class CountingStore(DynamoStore):
    scans = 0

    def scan(self) -> Iterator[Placement]:
        self.scans += 1
        return super().scan()


@pytest.fixture
def table(moto_server: MotoServer) -> str:
    name = f"log-{uuid.uuid4().hex[:12]}"
    DynamoStore(name, region=REGION, endpoint_url=moto_server.endpoint).create_table()
    return name


def test_a_reader_sees_the_keys_written_since_its_last_read(moto_server: MotoServer, table: str) -> None:
    ours = DynamoStore(table, region=REGION, endpoint_url=moto_server.endpoint)
    theirs = DynamoStore(table, region=REGION, endpoint_url=moto_server.endpoint)
    theirs.create(placement("before/log"))
    log = ours.change_log()
    assert log.read() == ()

    a = placement("app/a", state=KeyState.CREATING)
    theirs.create(a)
    theirs.create(placement("app/b"))
    theirs.update(dataclasses.replace(a, state=KeyState.ENABLED))
    got = set(log.read() or ())
    # Every key written since; maybe also a key written earlier in the same second (harmless re-read).
    assert {"app/a", "app/b"} <= got <= {"app/a", "app/b", "before/log"}
    assert log.read() == (), "a second read names nothing new"

    time.sleep(1.05 - time.time() % 1)  # a second of its own: its log item holds only this write
    theirs.create(placement("app/c"))
    assert log.read() == ("app/c",)


def test_a_writer_whose_clock_is_far_off_makes_the_reader_say_it_cannot_tell(
        moto_server: MotoServer, table: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = DynamoStore(table, region=REGION, endpoint_url=moto_server.endpoint)
    theirs = DynamoStore(table, region=REGION, endpoint_url=moto_server.endpoint)
    log = ours.change_log()
    real = time.time
    monkeypatch.setattr(dynamo.time, "time", lambda: real() - 600)  # the writer's clock, ten minutes slow
    theirs.create(placement("skewed/a"))
    monkeypatch.setattr(dynamo.time, "time", real)
    assert log.read() is None, "the counter moved but the log within reach does not show it"
    theirs.create(placement("later/b"))
    assert log.read() is None, "a log that lost count stays None: the cache must reload"


def test_a_router_on_dynamodb_follows_another_gateway_without_rescanning(moto_server: MotoServer, table: str) -> None:
    ours = CountingStore(table, region=REGION, endpoint_url=moto_server.endpoint)
    theirs = DynamoStore(table, region=REGION, endpoint_url=moto_server.endpoint)
    for i in range(5):
        theirs.create(placement(f"app/{i}"))
    router = Router(Topology("us-east-1", (), {"us-east-1": ()}), {}, ours)
    assert ours.scans == 1

    current = theirs.get("app/3")
    assert current is not None
    moved = theirs.update(dataclasses.replace(current, primary="use1-b"))
    theirs.create(placement("app/new", replicas=()))
    assert router.refresh() is True
    assert router.placement("app/3").primary == "use1-b" and router.placement("app/3").version == moved.version
    assert router.placement("app/new").clusters == ("use1-a",)
    assert router.refresh() is False
    assert ours.scans == 1, "followed the log: no table scan"


def test_create_table_turns_on_ttl_for_the_log(moto_server: MotoServer, table: str) -> None:
    client = boto3.client("dynamodb", region_name=REGION, endpoint_url=moto_server.endpoint)
    ttl = client.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
    assert ttl["TimeToLiveStatus"] in ("ENABLED", "ENABLING") and ttl["AttributeName"] == "expires"
    store = DynamoStore(table, region=REGION, endpoint_url=moto_server.endpoint)
    store.create(placement("ttl/a"))
    logs = [item for item in client.scan(TableName=table)["Items"] if item["kind"]["S"] == "log"]
    assert len(logs) == 1 and logs[0]["keys"]["SS"] == ["ttl/a"] and logs[0]["n"]["N"] == "1"
    assert int(logs[0]["expires"]["N"]) - int(logs[0]["key_id"]["S"].removeprefix("log#")) == 86_400
    assert [p.key_id for p in store.scan()] == ["ttl/a"] and [p.key_id for p in store.list()] == ["ttl/a"]


# -- when the log cannot be read ---------------------------------------------------------------


def _stubbed() -> tuple[DynamoStore, Any]:
    from botocore.stub import Stubber

    client = boto3.client("dynamodb", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    return DynamoStore("t", region=REGION, client=client), Stubber(client)


def test_unprocessed_log_keys_are_asked_for_again() -> None:
    store, stub = _stubbed()
    first = {"t": {"Keys": [{"key_id": {"S": "log#100"}}, {"key_id": {"S": "log#101"}}], "ConsistentRead": True}}
    left = {"t": {"Keys": [{"key_id": {"S": "log#101"}}], "ConsistentRead": True}}
    item = {"key_id": {"S": "log#100"}, "kind": {"S": "log"}, "n": {"N": "2"}, "keys": {"SS": ["a", "b"]}}
    later = {"key_id": {"S": "log#101"}, "kind": {"S": "log"}, "n": {"N": "1"}, "keys": {"SS": ["c"]}}
    with stub:
        stub.add_response("batch_get_item", {"Responses": {"t": [item]}, "UnprocessedKeys": left},
                          {"RequestItems": first})
        stub.add_response("batch_get_item", {"Responses": {"t": [later]}}, {"RequestItems": left})
        assert store._log_items(100, 101) == {100: (2, ("a", "b")), 101: (1, ("c",))}
        stub.assert_no_pending_responses()


def test_a_log_read_that_fails_is_a_store_error_and_the_cache_keeps_serving(
        moto_server: MotoServer, table: str) -> None:
    from router.placement.store import StoreError

    store, stub = _stubbed()
    with stub:
        stub.add_client_error("batch_get_item", service_error_code="ProvisionedThroughputExceededException")
        with pytest.raises(StoreError, match="BatchGetItem failed: ProvisionedThroughputExceeded"):
            store._log_items(100, 101)

    ours = CountingStore(table, region=REGION, endpoint_url=moto_server.endpoint)
    theirs = DynamoStore(table, region=REGION, endpoint_url=moto_server.endpoint)
    theirs.create(placement("app/known"))
    router = Router(Topology("us-east-1", (), {"us-east-1": ()}), {}, ours)
    theirs.create(placement("app/later"))
    real = ours._log_items

    def unreachable(first: int, last: int) -> Any:
        raise StoreError("placement store unreachable")

    ours._log_items = unreachable  # type: ignore[method-assign]
    with pytest.raises(StoreError):
        router.refresh()
    assert router.placement("app/known").primary == "use1-a", "known keys still route from the cache"
    assert router.cached_keys() == 1
    ours._log_items = real  # type: ignore[method-assign]
    assert router.refresh() is True and ours.scans == 1, "the next refresh reads the log it missed"
    assert router.cached_keys() == 2, "the key made meanwhile came in through the log"


@pytest.mark.parametrize("when", ["opening", "reading"])
def test_a_write_landing_while_the_log_is_read_does_not_blind_it(moto_server: MotoServer, table: str,
                                                                when: str) -> None:
    """Another gateway writes between the counter's read and the log's: the reader looks again, and
    neither then nor later takes the log for one it cannot vouch for (which stopped following writes
    until the next full rescan)."""
    ours = DynamoStore(table, region=REGION, endpoint_url=moto_server.endpoint)
    theirs = DynamoStore(table, region=REGION, endpoint_url=moto_server.endpoint)
    landed: list[str] = []
    counter = ours.change_counter

    def counter_then_a_write() -> int:
        value = counter()
        if armed and not landed:  # the write lands after this counter read, before the log's
            key_id = f"app/between-{when}"
            theirs.create(placement(key_id))
            landed.append(key_id)
        return value

    armed = when == "opening"
    ours.change_counter = counter_then_a_write  # type: ignore[method-assign]
    log = ours.change_log()
    armed = True
    got = log.read()
    assert got is not None and landed, "the reader can still vouch for what it read"
    if when == "reading":  # (one that landed while the log was opened is before the cache's scan)
        assert set(landed) <= set(got)
    theirs.create(placement("app/after"))
    assert "app/after" in (log.read() or ())  # (with the others of its second, read again: harmless)

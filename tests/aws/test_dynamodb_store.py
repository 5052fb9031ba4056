"""What only the DynamoDB store has: its table definition, table creation, paging
through Scan, retrying transactions that collide, and the store URL."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from router.model import KeyAlgorithm, KeyState, KeyUsage, Placement
from router.placement import SqliteStore, StoreError, StoreMisconfigured
from router.placement.dynamodb import TABLE_DEFINITION, DynamoStore
from router.placement.factory import make_store, parse_dynamodb_url
from tests.aws.conftest import REGION, MotoServer
from tests.support import ROOT

TABLE_JSON = ROOT / "deploy" / "dynamodb" / "table.json"
GATEWAY_POLICY = ROOT / "deploy" / "dynamodb" / "iam-gateway.json"


def placement(key_id: str, request_id: str | None = None) -> Placement:
    return Placement(
        key_id, KeyAlgorithm.EC_P256, KeyUsage.SIGN_VERIFY, KeyState.ENABLED, "use1-a", ("usw2-a",),
        create_time=1_767_225_600.5, request_id=request_id or f"req-{key_id}",
    )


def fresh_store(moto: MotoServer, **options: Any) -> DynamoStore:
    store = DynamoStore(f"t-{uuid.uuid4().hex[:12]}", region=REGION, endpoint_url=moto.endpoint, **options)
    store.create_table()
    return store


def test_deploy_table_definition_matches_the_code_and_is_accepted_by_create_table(moto_server: MotoServer) -> None:
    definition = json.loads(TABLE_JSON.read_text())
    for field, value in TABLE_DEFINITION.items():
        assert definition[field] == value, f"deploy/dynamodb/table.json {field} differs from TABLE_DEFINITION"
    client = boto3.client("dynamodb", region_name=REGION, endpoint_url=moto_server.endpoint)
    definition["TableName"] = f"deploy-{uuid.uuid4().hex[:8]}"
    client.create_table(**definition)
    table = client.describe_table(TableName=definition["TableName"])["Table"]
    assert table["KeySchema"] == [{"AttributeName": "key_id", "KeyType": "HASH"}]
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    store = DynamoStore(definition["TableName"], region=REGION, endpoint_url=moto_server.endpoint)
    store.create(placement("deployed/key"))
    assert store.get("deployed/key") == placement("deployed/key")
    store.close()


def test_create_table_is_idempotent(moto_server: MotoServer) -> None:
    store = fresh_store(moto_server)
    assert store.create_table() is False
    assert store.change_counter() == 0
    store.close()


def test_a_missing_table_is_a_store_error_naming_it(moto_server: MotoServer) -> None:
    """One that waiting does not cure (StoreMisconfigured): a gateway starting on it stops for good."""
    store = DynamoStore("no-such-table", region=REGION, endpoint_url=moto_server.endpoint)
    for call in (lambda: store.get("k"), lambda: store.create(placement("k")), store.change_counter,
                 lambda: list(store.scan()), lambda: store.put_admin_record("switches", {}, 0)):
        with pytest.raises(StoreMisconfigured, match="no table 'no-such-table' in us-east-1"):
            call()
    store.close()


def test_a_table_keyed_otherwise_is_refused_by_store_init_and_by_the_gateway(moto_server: MotoServer) -> None:
    """Another application's table of that name: `store init` used to say "already exists", and the
    gateway then failed every read with a ValidationException and was restarted for good."""
    import boto3

    from tests.aws.conftest import FAKE_AWS_ENV

    client = boto3.client("dynamodb", region_name=REGION, endpoint_url=moto_server.endpoint,
                          aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"])
    client.create_table(TableName="someone-elses", BillingMode="PAY_PER_REQUEST",
                        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}])
    store = DynamoStore("someone-elses", region=REGION, endpoint_url=moto_server.endpoint)
    with pytest.raises(StoreMisconfigured, match="exists in us-east-1 with key .*pk.*not hsmgw's"):
        store.create_table()
    with pytest.raises(StoreMisconfigured, match="is not keyed as hsmgw's placement table"):
        store.get("k")
    store.close()


def test_key_ids_that_would_collide_with_internal_items_are_refused(moto_server: MotoServer) -> None:
    store = fresh_store(moto_server)
    for key_id in ("req#x", "meta#changes", "log#1767225600"):
        with pytest.raises(ValueError, match="reserved"):
            store.create(placement(key_id))
    assert store.list() == [] and store.change_counter() == 0
    store.close()


def test_list_and_scan_follow_scan_pages(moto_server: MotoServer) -> None:
    store = fresh_store(moto_server, scan_page_size=2)  # many pages, and req#/meta items among them
    ids = [f"team/k{i}" for i in range(7)] + ["other/k"]
    for key_id in reversed(ids):
        store.create(placement(key_id))
    assert sorted(p.key_id for p in store.scan()) == sorted(ids)
    assert [p.key_id for p in store.list("team/", after="team/k2", limit=3)] == ["team/k3", "team/k4", "team/k5"]
    assert [p.key_id for p in store.list(limit=100)] == sorted(ids)
    store.close()


def _cancelled(*codes: str) -> dict[str, Any]:
    return {"CancellationReasons": [{"Code": code} for code in codes]}


def test_a_transaction_that_collides_on_the_change_counter_is_retried() -> None:
    client = boto3.client("dynamodb", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    store = DynamoStore("t", region=REGION, client=client)
    with Stubber(client) as stub:
        for _ in range(2):
            stub.add_client_error(
                "transact_write_items", service_error_code="TransactionCanceledException",
                modeled_fields=_cancelled("None", "None", "TransactionConflict"),
            )
        stub.add_response("transact_write_items", {})
        store.create(placement("k"))
        stub.assert_no_pending_responses()


def test_each_write_attempt_carries_a_request_token_of_its_own() -> None:
    """botocore retries a TransactWriteItems whose answer it lost with the same parameters: with a
    request token, DynamoDB answers a write that landed as landed, instead of failing its
    condition (which a move would take for another writer, and undo). A new attempt of ours,
    after a conflict, is a new write and gets a new token."""
    client = boto3.client("dynamodb", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    store = DynamoStore("t", region=REGION, client=client)
    tokens: list[str] = []
    client.meta.events.register("before-parameter-build.dynamodb.TransactWriteItems",
                                lambda params, **_: tokens.append(params.get("ClientRequestToken", "")))
    with Stubber(client) as stub:
        stub.add_client_error("transact_write_items", service_error_code="TransactionCanceledException",
                              modeled_fields=_cancelled("None", "None", "TransactionConflict"))
        stub.add_response("transact_write_items", {})
        store.create(placement("k"))
    assert len(tokens) == 2 and len(set(tokens)) == 2
    assert all(0 < len(token) <= 36 for token in tokens), "DynamoDB takes 1 to 36 characters"


def test_an_admin_record_write_carries_a_request_token_so_a_lost_answer_is_not_another_writer() -> None:
    """Changes, their approvals and claims, switches and placements are admin records. A write whose
    answer botocore lost and retries must be answered as landed, not as a failed condition: that
    was taken for another writer's (an approval answered "already approved", a change's claim lost
    to itself and reported interrupted a minute later). A condition that fails is ``Stale``."""
    from router.placement.store import Stale

    client = boto3.client("dynamodb", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    store = DynamoStore("t", region=REGION, client=client)
    sent: list[dict[str, Any]] = []
    client.meta.events.register("before-parameter-build.dynamodb.TransactWriteItems",
                                lambda params, **_: sent.append(dict(params)))
    with Stubber(client) as stub:
        stub.add_response("transact_write_items", {})
        stub.add_client_error("transact_write_items", service_error_code="TransactionCanceledException",
                              modeled_fields=_cancelled("ConditionalCheckFailed"))
        assert store.put_admin_record("change/c1", {"state": "pending"}, 3) == 4
        with pytest.raises(Stale):
            store.put_admin_record("change/c1", {"state": "running"}, 3)
        stub.assert_no_pending_responses()
    tokens = [params["ClientRequestToken"] for params in sent]
    assert len(set(tokens)) == 2 and all(0 < len(token) <= 36 for token in tokens)
    (put,) = [item["Put"] for item in sent[0]["TransactItems"]]
    assert put["ConditionExpression"] == "#v = :expected" and put["ExpressionAttributeValues"] == {
        ":expected": {"N": "3"}}
    assert json.loads(put["Item"]["body"]["S"]) == {"state": "pending"} and put["Item"]["version"] == {"N": "4"}


def test_a_transaction_that_keeps_colliding_becomes_a_store_error() -> None:
    client = boto3.client("dynamodb", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    store = DynamoStore("t", region=REGION, client=client)
    with Stubber(client) as stub:
        for _ in range(8):
            stub.add_client_error(
                "transact_write_items", service_error_code="TransactionCanceledException",
                modeled_fields=_cancelled("None", "None", "TransactionConflict"),
            )
        with pytest.raises(StoreError, match="TransactionConflict"):
            store.create(placement("k"))


def test_throttling_beyond_the_retries_is_a_store_error_not_a_crash() -> None:
    client = boto3.client("dynamodb", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    store = DynamoStore("t", region=REGION, client=client)
    with Stubber(client) as stub:
        stub.add_client_error("get_item", service_error_code="ProvisionedThroughputExceededException")
        with pytest.raises(StoreError, match="ProvisionedThroughputExceeded") as info:
            store.get("k")
        assert not isinstance(info.value, StoreMisconfigured), "throttling passes: a restart may succeed"


# -- store URLs -----------------------------------------------------------------------


def test_dynamodb_urls_parse_into_store_options() -> None:
    assert parse_dynamodb_url("dynamodb://hsmgw-placements?region=us-east-1") == (
        "hsmgw-placements", {"region": "us-east-1"}
    )
    table, options = parse_dynamodb_url(
        "dynamodb://p.v2?region=eu-west-1&endpoint=http://127.0.0.1:4566&read_timeout=2.5&max_attempts=3"
    )
    assert table == "p.v2"
    assert options == {"region": "eu-west-1", "endpoint_url": "http://127.0.0.1:4566", "read_timeout": 2.5,
                       "max_attempts": 3}


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("dynamodb://placements", "region parameter is required"),
        ("dynamodb://ab?region=us-east-1", "table name"),
        ("dynamodb://placements/extra?region=us-east-1", "table name"),
        ("dynamodb://placements?region=us-east-1&regoin=x", "unknown parameter 'regoin'"),
        ("dynamodb://placements?region=us-east-1&region=us-west-2", "given twice"),
        ("dynamodb://placements?region=", "must not be empty"),
        ("dynamodb://placements?region=us-east-1&read_timeout=soon", "bad value"),
        ("dynamodb://placements?region=us-east-1&endpoint=localhost:8000", "http://"),
        ("postgres://db", "unsupported store URL"),
        ("sqlite:", "names no file"),
    ],
)
def test_bad_store_urls_are_refused_with_the_reason(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        make_store(url)


def test_make_store_builds_each_kind(tmp_path: Path, moto_server: MotoServer) -> None:
    relative = make_store("sqlite:p.db", tmp_path)
    absolute = make_store(f"sqlite://{tmp_path / 'q.db'}", "/elsewhere")
    dynamo = make_store(moto_server.store_url("placements"))
    try:
        assert isinstance(relative, SqliteStore) and Path(relative.path) == tmp_path / "p.db"
        assert isinstance(absolute, SqliteStore) and Path(absolute.path) == tmp_path / "q.db"
        assert isinstance(dynamo, DynamoStore)
        assert (dynamo.table, dynamo.region, dynamo.endpoint_url) == ("placements", REGION, moto_server.endpoint)
    finally:
        for store in (relative, absolute, dynamo):
            store.close()


def test_listing_changes_reads_them_together_not_one_request_each(moto_server: MotoServer) -> None:
    from gateway.quorum import ChangeBook

    store = fresh_store(moto_server)
    book = ChangeBook(store, {"drain": lambda params: "drained"}, ttl=3600)
    requested = [book.request("alice", "drain", {"cluster": f"c{n}"}).id for n in range(150)]
    calls: list[str] = []
    store._client.meta.events.register("before-call.dynamodb.*",
                                       lambda model, **_: calls.append(model.name))
    listed = book.list()
    assert [c.id for c in listed] == requested
    assert [c.params["cluster"] for c in listed[:2]] == ["c0", "c1"]
    assert calls == ["GetItem", "BatchGetItem", "BatchGetItem"]  # the index, then 100 + 50 changes


def test_the_documented_gateway_policy_allows_exactly_the_calls_the_gateway_makes(moto_server: MotoServer) -> None:
    """An operator who gives the gateway's role deploy/dynamodb/iam-gateway.json gets no
    AccessDenied from any store operation, and grants nothing the gateway does not use."""
    import dataclasses

    store = fresh_store(moto_server)  # the table is the operator's (store init), not the gateway's
    made: set[str] = set()

    def record(model: Any, params: dict[str, Any], **_: Any) -> None:
        if model.name == "TransactWriteItems":  # authorised per contained action
            made.update(f"{kind}Item" for item in params["TransactItems"] for kind in item)
        else:
            made.add(model.name)

    store._client.meta.events.register("before-parameter-build.dynamodb.*", record)
    log = store.change_log()
    store.create(placement("a/1"))
    current = store.get("a/1")
    assert current is not None and store.by_request("req-a/1") is not None
    current = store.update(dataclasses.replace(current, replicas=("use1-b",)))
    assert [p.key_id for p in store.list()] == ["a/1"] and len(list(store.scan())) == 1
    assert store.change_counter() >= 2 and log.read() == ("a/1",)
    store.put_admin_record("switches", {"drained": ["use1-b"]}, 0)
    assert store.admin_record("switches") is not None and len(store.admin_records_named(["switches"])) == 1
    assert len(list(store.admin_records())) == 1
    store.delete("a/1", current.version)

    policy = json.loads(GATEWAY_POLICY.read_text())
    allowed = {action.removeprefix("dynamodb:") for statement in policy["Statement"] for action in statement["Action"]}
    assert made - allowed == set(), "the gateway calls DynamoDB actions its documented policy does not allow"
    assert allowed - made == set(), "the documented policy allows actions the gateway never uses"
    readme = (ROOT / "deploy" / "dynamodb" / "README.md").read_text()
    assert all(f"`dynamodb:{action}`" in readme for action in allowed)

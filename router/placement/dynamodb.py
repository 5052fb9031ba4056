"""The production placement store: one DynamoDB table shared by every gateway.

Same semantics as ``SqliteStore``; the table holds three kinds of item, all under
the partition key ``key_id`` and told apart by their ``kind`` attribute:

``<key id>`` (kind ``placement``)
    One item per key, an attribute per ``Placement`` field (``wrapped`` and
    ``public_der`` as Binary, ``replicas`` as a list) and a ``version`` number.
    ``wrapped``, ``public_der``, ``owner`` and ``destroyed_material`` are left out when
    empty (an older item has no ``owner``: it reads as "").
``req#<request id>`` (kind ``request``)
    The unique index of request ids: ``target`` names the key the request made.
    Written and removed in the same transaction as its placement, so one request
    id can never make two keys.
``meta#changes`` (kind ``meta``)
    The change counter, incremented (``ADD``) by every write transaction.
``meta#fleet`` (kind ``meta``)
    The store's fleet id (``fleet_id``), put once with ``attribute_not_exists``, never
    changed; outside the change log and the counter, as it is no key's.
``admin#<name>`` (kind ``admin``)
    An admin record (pending quorum changes, operator switches): ``body`` is its JSON
    text and ``version`` its version; written with a condition on that version.
``log#<unix second>`` (kind ``log``)
    The change log: every write transaction also adds its key id to the set
    ``keys`` of the item of the second it ran in (the writer's clock) and counts
    itself in ``n``. ``expires`` (a day later) lets DynamoDB's TTL remove it. A
    cache follows the log (``change_log``) and re-reads only the keys named there;
    when the counts there do not add up to the counter's growth (a writer's clock
    more than ``_LOG_MARGIN`` off, a log item already expired), it reloads everything.

Key ids cannot contain ``#`` (see ``router.validation``), so the reserved items
never collide with a key; this module refuses such ids anyway.

Every write is one ``TransactWriteItems`` with a condition (``attribute_not_exists``
for a creation, ``version = :expected`` for an update or delete). A lost
condition raises ``Conflict`` carrying the record that won, taken from the
cancellation reason itself (``ReturnValuesOnConditionCheckFailure=ALL_OLD``), so
it is the state that beat us, not a later re-read. Every other failure — the
endpoint unreachable, a timeout, throttling that outlasts the retries, a missing
table, bad credentials — raises ``StoreError``; a missing table raises its subclass
``StoreMisconfigured``, as waiting will not make it appear. Timeouts and retries are short so
that an unreachable store fails within about two seconds and the gateway can
serve from its cache instead of hanging.

Costs and limits worth knowing:

- ``list`` is a full-table ``Scan`` sorted in memory: O(number of keys), fine for
  admin listing of a few thousand keys. A deployment with many more should page
  through a GSI with a constant partition key and ``key_id`` as sort key instead.
- ``scan`` streams every placement page by page, in no particular order.
- ``meta#changes`` is a single hot item that every write transaction touches:
  it serialises placement writes (a few hundred per second at most), which is
  plenty for key creation and moves. Transactions that collide on it are
  cancelled with ``TransactionConflict`` and retried here with jitter.
- Under global tables, conditions are checked per region only; see
  ``deploy/dynamodb/README.md``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import boto3  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import (  # type: ignore[import-untyped]
    BotoCoreError,
    ClientError,
    ParamValidationError,
)

from router.model import KeyAlgorithm, KeyState, KeyStorage, KeyUsage, Placement
from router.placement.store import (
    ChangeLog,
    Conflict,
    PlacementStore,
    Stale,
    StoreError,
    StoreMisconfigured,
    new_fleet_id,
)

__all__ = ["DynamoStore", "TABLE_DEFINITION"]

Item = dict[str, Any]

_PLACEMENT = "placement"
_REQUEST = "request"
_META = "meta"
_REQUEST_PREFIX = "req#"
_COUNTER_KEY = "meta#changes"
_FLEET_KEY = "meta#fleet"
_LOG = "log"
_LOG_PREFIX = "log#"
_LOG_MARGIN = 30
"""Seconds of clock difference between gateways the change log tolerates."""
_LOG_TTL = 86_400
_LOG_REACH = 3_600
"""A reader further behind than this reloads instead of reading an hour of log items."""
_ADMIN = "admin"
_ADMIN_PREFIX = "admin#"
_RESERVED_PREFIXES = (_REQUEST_PREFIX, "meta#", _LOG_PREFIX, _ADMIN_PREFIX)

# Cancellation reasons that mean "someone else's transaction was in the way",
# not "your condition is false": worth another try after a short pause.
_TRANSIENT_REASONS = frozenset({"TransactionConflict", "ThrottlingError", "ProvisionedThroughputExceeded"})
_CONFLICT_ATTEMPTS = 8

TABLE_DEFINITION: Mapping[str, Any] = {
    "AttributeDefinitions": [{"AttributeName": "key_id", "AttributeType": "S"}],
    "KeySchema": [{"AttributeName": "key_id", "KeyType": "HASH"}],
    "BillingMode": "PAY_PER_REQUEST",
}
"""``CreateTable`` input without the table name (``deploy/dynamodb/table.json`` adds
deployment settings on top of this; a test keeps the two in step)."""


# -- encoding -------------------------------------------------------------------------


def _encode(p: Placement) -> Item:
    item: Item = {
        "key_id": {"S": p.key_id},
        "kind": {"S": _PLACEMENT},
        "algorithm": {"S": p.algorithm.value},
        "usage": {"S": p.usage.value},
        "state": {"S": p.state.value},
        "primary_cluster": {"S": p.primary},
        "replicas": {"L": [{"S": r} for r in p.replicas]},
        # repr() of a float is its shortest exact decimal, so it round-trips.
        "create_time": {"N": repr(float(p.create_time))},
        "request_id": {"S": p.request_id},
        "fingerprint": {"S": p.fingerprint},
        "storage": {"S": p.storage.value},
        "version": {"N": str(p.version)},
        "copies": {"N": str(p.copies)},
        "extractable": {"BOOL": p.extractable},
        "held": {"BOOL": p.held},
    }
    # Empty binaries are legal in DynamoDB today but not in every emulator or older
    # SDK; an absent attribute decodes to b"" just the same.
    if p.wrapped:
        item["wrapped"] = {"B": p.wrapped}
    if p.public_der:
        item["public_der"] = {"B": p.public_der}
    if p.owner:  # only while CREATING; absent on older items too
        item["owner"] = {"S": p.owner}
    if p.destroyed_material:
        item["destroyed_material"] = {"B": p.destroyed_material}
    return item


def _decode(item: Item | None) -> Placement | None:
    """The placement an item holds, or None for no item or a non-placement item."""
    if not item or item.get("kind", {}).get("S") != _PLACEMENT:
        return None
    try:
        return Placement(
            key_id=item["key_id"]["S"],
            algorithm=KeyAlgorithm(item["algorithm"]["S"]),
            usage=KeyUsage(item["usage"]["S"]),
            state=KeyState(item["state"]["S"]),
            primary=item["primary_cluster"]["S"],
            replicas=tuple(v["S"] for v in item.get("replicas", {}).get("L", [])),
            create_time=float(item["create_time"]["N"]),
            request_id=item.get("request_id", {}).get("S", ""),
            fingerprint=item.get("fingerprint", {}).get("S", ""),
            storage=KeyStorage(item.get("storage", {}).get("S", KeyStorage.TOKEN.value)),
            version=int(item["version"]["N"]),
            copies=int(item.get("copies", {}).get("N", "1")),
            extractable=bool(item.get("extractable", {}).get("BOOL", True)),
            held=bool(item.get("held", {}).get("BOOL", False)),
            owner=item.get("owner", {}).get("S", ""),
            wrapped=bytes(item["wrapped"]["B"]) if "wrapped" in item else b"",
            public_der=bytes(item["public_der"]["B"]) if "public_der" in item else b"",
            destroyed_material=(bytes(item["destroyed_material"]["B"]) if "destroyed_material" in item
                                else b""),
        )
    except (KeyError, TypeError, ValueError) as exc:
        key = item.get("key_id", {}).get("S", "?")
        raise StoreError(f"malformed placement record {key!r} in the store: {exc!r}") from exc


def _admin_body(name: str, item: Item) -> tuple[dict[str, Any], int]:
    try:
        return json.loads(item["body"]["S"]), int(item["version"]["N"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"malformed admin record {name!r} in the store: {exc!r}") from exc


def _key(key_id: str) -> Item:
    return {"key_id": {"S": key_id}}


def _request_key(request_id: str) -> Item:
    return _key(_REQUEST_PREFIX + request_id)


def _failed(reasons: list[Item], index: int) -> bool:
    return index < len(reasons) and reasons[index].get("Code") == "ConditionalCheckFailed"


# -- the store ------------------------------------------------------------------------


class DynamoStore(PlacementStore):
    """Placements in the DynamoDB table ``table`` (see the module docstring)."""

    def __init__(
        self,
        table: str,
        *,
        region: str,
        endpoint_url: str | None = None,
        client: Any = None,
        connect_timeout: float = 0.5,
        read_timeout: float = 1.0,
        max_attempts: int = 2,
        scan_page_size: int | None = None,
    ) -> None:
        """``client``: a ready boto3 DynamoDB client (then the timeouts and attempts are unused).

        The defaults make an unreachable endpoint fail in about two seconds:
        ``max_attempts`` counts the first try, botocore's standard retry mode waits
        up to a second between tries. ``scan_page_size`` bounds the items read per
        ``Scan`` request (default: DynamoDB's 1 MB pages).
        """
        self.table = table
        self.scan_page_size = scan_page_size
        self.region = region
        self.endpoint_url = endpoint_url
        self._owns_client = client is None
        if client is None:
            config = Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"mode": "standard", "total_max_attempts": max_attempts},
                max_pool_connections=32,
            )
            try:
                # A session per store: boto3's default session is not thread-safe.
                client = boto3.session.Session().client(
                    "dynamodb", region_name=region, endpoint_url=endpoint_url, config=config
                )
            except BotoCoreError as exc:
                raise StoreError(f"cannot set up placement store dynamodb://{table}: {exc}") from exc
        self._client = client

    def __repr__(self) -> str:
        where = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"DynamoStore({self.table!r}, region={self.region!r}{where})"

    # -- plumbing

    def _failed(self, operation: str, exc: ClientError) -> StoreError:
        """The ``StoreError`` for an API error: ``StoreMisconfigured`` if the table does not exist."""
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        if code == "ValidationException" and "key element does not match the schema" in error.get("Message", ""):
            return StoreMisconfigured(
                f"placement store dynamodb://{self.table}: table {self.table!r} in {self.region} is not keyed "
                f"as hsmgw's placement table ({operation}: {error.get('Message', '')}); name hsmgw's table, or "
                "create one with `hsmgw store init --url ...` under another name"
            )
        if code == "ResourceNotFoundException":
            return StoreMisconfigured(
                f"placement store dynamodb://{self.table}: no table {self.table!r} in {self.region}"
                f"{f' at {self.endpoint_url}' if self.endpoint_url else ''} ({operation}: {code}); "
                "check the table name, or create it with `hsmgw store init`"
            )
        return StoreError(f"placement store dynamodb://{self.table}: {operation} failed: "
                          f"{code}: {error.get('Message', '')}")

    def _call(self, operation: str, **kwargs: Any) -> Item:
        """One non-conditional API call; any failure becomes ``StoreError``."""
        try:
            result: Item = getattr(self._client, operation)(TableName=self.table, **kwargs)
            return result
        except ParamValidationError:
            raise  # a bug in this module, not an unavailable store
        except ClientError as exc:
            raise self._failed(operation, exc) from exc
        except BotoCoreError as exc:
            raise StoreError(f"placement store dynamodb://{self.table} unreachable: {exc}") from exc

    def _transact(self, key_id: str, items: list[Item]) -> list[Item] | None:
        """Run a write transaction (changing ``key_id``'s record) plus the change-counter
        bump and the change-log entry.

        Returns None on success, or the cancellation reasons (one per item, in
        order) when a condition failed.
        """
        counter = {
            "Update": {
                "TableName": self.table,
                "Key": _key(_COUNTER_KEY),
                "UpdateExpression": "SET #kind = :meta ADD #changes :one",
                "ExpressionAttributeNames": {"#kind": "kind", "#changes": "changes"},
                "ExpressionAttributeValues": {":meta": {"S": _META}, ":one": {"N": "1"}},
            }
        }
        transact_items = [{op: {"TableName": self.table, **body} for op, body in item.items()} for item in items]
        second = int(time.time())
        log = {
            "Update": {
                "TableName": self.table,
                "Key": _key(f"{_LOG_PREFIX}{second}"),
                "UpdateExpression": "SET #kind = :log, #expires = :expires ADD #keys :key, #n :one",
                "ExpressionAttributeNames": {"#kind": "kind", "#expires": "expires", "#keys": "keys", "#n": "n"},
                "ExpressionAttributeValues": {":log": {"S": _LOG}, ":expires": {"N": str(second + _LOG_TTL)},
                                              ":key": {"SS": [key_id]}, ":one": {"N": "1"}},
            }
        }
        return self._write_transaction([*transact_items, counter, log])

    def _write_transaction(self, transact_items: list[Item]) -> list[Item] | None:
        """``TransactWriteItems`` of ``transact_items``, again after a transient conflict: None on
        success, or the cancellation reasons (one per item, in order) when a condition failed."""
        for attempt in range(1, _CONFLICT_ATTEMPTS + 1):
            try:
                # TransactWriteItems takes no TableName of its own; each item names it. The token
                # makes botocore's own retries of this attempt idempotent: a write that landed but
                # whose answer was lost is answered as landed again, not as a failed condition
                # (which a move would take for another writer, and undo).
                self._client.transact_write_items(TransactItems=transact_items, ClientRequestToken=uuid.uuid4().hex)
                return None
            except ParamValidationError:
                raise
            except ClientError as exc:
                error = exc.response.get("Error", {})
                if error.get("Code") != "TransactionCanceledException":
                    raise self._failed("TransactWriteItems", exc) from exc
                reasons: list[Item] = exc.response.get("CancellationReasons") or []
                codes = {r.get("Code") for r in reasons}
                if "ConditionalCheckFailed" in codes:
                    return reasons
                if codes & _TRANSIENT_REASONS and attempt < _CONFLICT_ATTEMPTS:
                    time.sleep(random.uniform(0.005, 0.02) * attempt)
                    continue
                raise StoreError(
                    f"placement store dynamodb://{self.table}: transaction cancelled: {sorted(map(str, codes))}"
                ) from exc
            except BotoCoreError as exc:
                raise StoreError(f"placement store dynamodb://{self.table} unreachable: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _get_item(self, key: Item) -> Item | None:
        item: Item | None = self._call("get_item", Key=key, ConsistentRead=True).get("Item")
        return item

    def _scan_items(self, **kwargs: Any) -> Iterator[Item]:
        if self.scan_page_size:
            kwargs["Limit"] = self.scan_page_size
        start: Item | None = None
        while True:
            page = self._call("scan", ConsistentRead=True, **kwargs, **({"ExclusiveStartKey": start} if start else {}))
            yield from page.get("Items", [])
            start = page.get("LastEvaluatedKey")
            if not start:
                return

    # -- PlacementStore

    def fleet_id(self, proposed: str | None = None) -> str:
        found = self.existing_fleet_id()
        if found is not None:
            return found
        try:
            self._client.put_item(
                TableName=self.table,
                Item={**_key(_FLEET_KEY), "kind": {"S": _META}, "fleet_id": {"S": proposed or new_fleet_id()}},
                ConditionExpression="attribute_not_exists(#k)",
                ExpressionAttributeNames={"#k": "key_id"},
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise self._failed("PutItem", exc) from exc
            # Another process made it first: its id is the store's.
        except BotoCoreError as exc:
            raise StoreError(f"placement store dynamodb://{self.table} unreachable: {exc}") from exc
        found = self.existing_fleet_id()
        if found is None:
            raise StoreError(f"placement store dynamodb://{self.table}: the fleet id item {_FLEET_KEY!r} is gone "
                             "just after it was written")
        return found

    def existing_fleet_id(self) -> str | None:
        found = self._get_item(_key(_FLEET_KEY))
        if found is None:
            return None
        try:
            return str(found["fleet_id"]["S"])
        except (KeyError, TypeError) as exc:
            raise StoreError(f"placement store dynamodb://{self.table}: malformed fleet id item {_FLEET_KEY!r}: "
                             f"{exc!r}") from exc

    def get(self, key_id: str) -> Placement | None:
        return _decode(self._get_item(_key(key_id)))

    def by_request(self, request_id: str) -> Placement | None:
        item = self._get_item(_request_key(request_id))
        if item is None or "target" not in item:
            return None
        placement = self.get(item["target"]["S"])
        return placement if placement is not None and placement.request_id == request_id else None

    def create(self, placement: Placement) -> None:
        if placement.key_id.startswith(_RESERVED_PREFIXES):
            raise ValueError(f"key id {placement.key_id!r} uses a prefix reserved by the DynamoDB store")
        reasons = self._transact(
            placement.key_id,
            [
                {
                    "Put": {
                        "Item": _encode(placement),
                        "ConditionExpression": "attribute_not_exists(#k)",
                        "ExpressionAttributeNames": {"#k": "key_id"},
                        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                    }
                },
                {
                    "Put": {
                        "Item": {
                            **_request_key(placement.request_id),
                            "kind": {"S": _REQUEST},
                            "target": {"S": placement.key_id},
                        },
                        "ConditionExpression": "attribute_not_exists(#k)",
                        "ExpressionAttributeNames": {"#k": "key_id"},
                        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                    }
                },
            ]
        )
        if reasons is None:
            return
        existing: Placement | None = None
        if _failed(reasons, 0):  # the key id is taken: that record wins, as in SqliteStore
            existing = _decode(reasons[0].get("Item")) or self.get(placement.key_id)
        elif _failed(reasons, 1):  # the request id already made another key
            target = (reasons[1].get("Item") or {}).get("target", {}).get("S")
            existing = self.get(target) if target else self.by_request(placement.request_id)
        raise Conflict(existing)

    def update(self, placement: Placement) -> Placement:
        new = dataclasses.replace(placement, version=placement.version + 1)
        put: dict[str, Any] = {
            "Put": {
                "Item": _encode(new),
                "ConditionExpression": "#v = :expected AND #r = :request",
                "ExpressionAttributeNames": {"#v": "version", "#r": "request_id"},
                "ExpressionAttributeValues": {
                    ":expected": {"N": str(placement.version)},
                    ":request": {"S": placement.request_id},
                },
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            }
        }
        reasons = self._transact(placement.key_id, [put])
        if reasons is None:
            return new
        # Another version, or another request's record under this key id (the key was rolled back
        # and made again by another request: versions start again at 1).
        raise Conflict(_decode(reasons[0].get("Item")) if _failed(reasons, 0) else self.get(placement.key_id))

    def delete(self, key_id: str, version: int) -> None:
        # The request id lives in the record; read it to remove its index entry too.
        current = self.get(key_id)
        if current is None or current.version != version:
            raise Conflict(current)
        reasons = self._transact(
            key_id,
            [
                {
                    "Delete": {
                        "Key": _key(key_id),
                        "ConditionExpression": "#v = :expected AND #r = :request",
                        "ExpressionAttributeNames": {"#v": "version", "#r": "request_id"},
                        "ExpressionAttributeValues": {
                            ":expected": {"N": str(version)},
                            ":request": {"S": current.request_id},
                        },
                        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                    }
                },
                {
                    "Delete": {
                        "Key": _request_key(current.request_id),
                        "ConditionExpression": "attribute_not_exists(#k) OR #t = :key",
                        "ExpressionAttributeNames": {"#k": "key_id", "#t": "target"},
                        "ExpressionAttributeValues": {":key": {"S": key_id}},
                    }
                },
            ]
        )
        if reasons is None:
            return
        if _failed(reasons, 0):
            raise Conflict(_decode(reasons[0].get("Item")))
        raise StoreError(f"placement store dynamodb://{self.table}: request index of {key_id!r} names another key")

    def list(self, prefix: str = "", after: str = "", limit: int = 100) -> list[Placement]:
        # O(table): a filtered Scan, then sort. See the module docstring.
        conditions = ["#kind = :placement"]
        values: Item = {":placement": {"S": _PLACEMENT}}
        if prefix:
            conditions.append("begins_with(#k, :prefix)")
            values[":prefix"] = {"S": prefix}
        if after:
            conditions.append("#k > :after")
            values[":after"] = {"S": after}
        placements = [
            p
            for item in self._scan_items(
                FilterExpression=" AND ".join(conditions),
                ExpressionAttributeNames={"#kind": "kind", **({"#k": "key_id"} if prefix or after else {})},
                ExpressionAttributeValues=values,
            )
            if (p := _decode(item)) is not None
        ]
        # Python orders str by code point, as SQLite orders UTF-8 text bytewise.
        placements.sort(key=lambda p: p.key_id)
        return placements if limit < 0 else placements[:limit]

    def scan(self) -> Iterator[Placement]:
        for item in self._scan_items(
            FilterExpression="#kind = :placement",
            ExpressionAttributeNames={"#kind": "kind"},
            ExpressionAttributeValues={":placement": {"S": _PLACEMENT}},
        ):
            placement = _decode(item)
            if placement is not None:
                yield placement

    def change_counter(self) -> int:
        item = self._get_item(_key(_COUNTER_KEY))
        return int(item["changes"]["N"]) if item and "changes" in item else 0

    def change_log(self) -> ChangeLog:
        return _DynamoChangeLog(self)

    def admin_record(self, name: str) -> tuple[dict[str, Any], int] | None:
        item = self._get_item(_key(_ADMIN_PREFIX + name))
        return _admin_body(name, item) if item else None

    def admin_records_named(self, names: Sequence[str]) -> dict[str, tuple[dict[str, Any], int]]:
        keys = [_key(_ADMIN_PREFIX + name) for name in dict.fromkeys(names)]
        found = {}
        for item in self._batch_get(keys):
            name = item["key_id"]["S"][len(_ADMIN_PREFIX):]
            found[name] = _admin_body(name, item)
        return found

    def admin_records(self) -> Iterator[tuple[str, dict[str, Any], int]]:
        for item in self._scan_items(
            FilterExpression="#kind = :admin",
            ExpressionAttributeNames={"#kind": "kind"},
            ExpressionAttributeValues={":admin": {"S": _ADMIN}},
        ):
            name = item["key_id"]["S"][len(_ADMIN_PREFIX):]
            body, version = _admin_body(name, item)
            yield name, body, version

    def put_admin_record(self, name: str, body: dict[str, Any], version: int) -> int:
        # A transaction of one item, for its request token: botocore retries a write whose answer
        # it lost, and a PutItem that landed would then fail its condition, taken for another
        # writer's (an approval answered "already approved", a change's claim lost to itself).
        condition = "attribute_not_exists(#k)" if version == 0 else "#v = :expected"
        values: Item = {":expected": {"N": str(version)}} if version else {}
        put: Item = {
            "TableName": self.table,
            "Item": {"key_id": {"S": _ADMIN_PREFIX + name}, "kind": {"S": _ADMIN},
                     "body": {"S": json.dumps(body, sort_keys=True)}, "version": {"N": str(version + 1)}},
            "ConditionExpression": condition,
            "ExpressionAttributeNames": {"#k": "key_id"} if version == 0 else {"#v": "version"},
            **({"ExpressionAttributeValues": values} if values else {}),
        }
        if self._write_transaction([{"Put": put}]) is not None:
            raise Stale(name)
        return version + 1

    def _log_items(self, first: int, last: int) -> dict[int, tuple[int, tuple[str, ...]]]:
        """Second → (writes, key ids) of the log items from ``first`` to ``last`` that exist."""
        found: dict[int, tuple[int, tuple[str, ...]]] = {}
        for item in self._batch_get([_key(f"{_LOG_PREFIX}{second}") for second in range(first, last + 1)]):
            second = int(item["key_id"]["S"].removeprefix(_LOG_PREFIX))
            found[second] = (int(item.get("n", {}).get("N", "0")), tuple(item.get("keys", {}).get("SS", [])))
        return found

    def _batch_get(self, keys: Sequence[Item]) -> Iterator[Item]:
        """The items of these keys that exist (consistent reads), 100 keys per ``BatchGetItem``."""
        for start in range(0, len(keys), 100):  # BatchGetItem's limit
            request: Item = {self.table: {"Keys": keys[start : start + 100], "ConsistentRead": True}}
            for _ in range(10):
                try:
                    page = self._client.batch_get_item(RequestItems=request)
                except ClientError as exc:
                    raise self._failed("BatchGetItem", exc) from exc
                except BotoCoreError as exc:
                    raise StoreError(f"placement store dynamodb://{self.table} unreachable: {exc}") from exc
                yield from page.get("Responses", {}).get(self.table, [])
                request = page.get("UnprocessedKeys") or {}
                if not request:
                    break
                time.sleep(0.05)
            else:
                raise StoreError(f"placement store dynamodb://{self.table}: BatchGetItem kept keys unprocessed")

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # -- administration

    def create_table(self, *, wait: bool = True) -> bool:
        """Create the table (on-demand capacity) unless it exists; True if created."""
        try:
            self._call("create_table", **TABLE_DEFINITION)
            created = True
        except StoreError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, ClientError) and cause.response["Error"]["Code"] == "ResourceInUseException"):
                raise
            created = False
        if not created:  # one that exists must be hsmgw's: keyed by key_id alone
            schema = self._call("describe_table")["Table"].get("KeySchema", [])
            if schema != TABLE_DEFINITION["KeySchema"]:
                raise StoreMisconfigured(
                    f"placement store dynamodb://{self.table}: table {self.table!r} exists in {self.region} with "
                    f"key {schema}, not hsmgw's {list(TABLE_DEFINITION['KeySchema'])}: name another table")
        if wait:
            try:
                self._client.get_waiter("table_exists").wait(
                    TableName=self.table, WaiterConfig={"Delay": 1, "MaxAttempts": 120}
                )
            except BotoCoreError as exc:
                raise StoreError(f"placement store dynamodb://{self.table} did not become active: {exc}") from exc
            if created:  # change-log items expire a day after their second
                self._call("update_time_to_live",
                           TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires"})
        return created


class _DynamoChangeLog(ChangeLog):
    """Reads ``log#<second>`` items: the seconds since its last read, ± ``_LOG_MARGIN``.

    It remembers how many writes it saw in each second, so a second read again
    yields only its new writes' keys, and the writes it found must add up to the
    change counter's growth — else it cannot vouch for the cache and says so (None).
    """

    def __init__(self, store: DynamoStore) -> None:
        self._store = store
        self._since = int(time.time())
        snapshot = self._snapshot(self._since)
        self._seen = {second: n for second, (n, _) in snapshot[0].items()} if snapshot else {}
        self._counter: int | None = snapshot[1] if snapshot else None

    def _snapshot(self, until: int) -> tuple[dict[int, tuple[int, tuple[str, ...]]], int] | None:
        """The log's seconds up to ``until`` (± the margin) and the counter, as of one moment: the
        counter read before and after the log, unchanged (each write moves both in one
        transaction). None when writes kept landing in between."""
        for _ in range(5):
            before = self._store.change_counter()
            items = self._store._log_items(self._since - _LOG_MARGIN, until + _LOG_MARGIN)
            after = self._store.change_counter()
            if before == after:
                return items, after
        return None

    def read(self) -> tuple[str, ...] | None:
        if self._counter is None:
            return None
        now = int(time.time())
        snapshot = self._snapshot(now) if now - self._since <= _LOG_REACH else None
        if snapshot is not None:
            items, counter = snapshot
            new = 0
            key_ids: dict[str, None] = {}
            for second, (n, keys) in items.items():
                if n > self._seen.get(second, 0):
                    new += n - self._seen.get(second, 0)
                    key_ids.update(dict.fromkeys(keys))
            if new == counter - self._counter:
                self._seen = {second: n for second, (n, _) in items.items()}
                self._since, self._counter = now, counter
                return tuple(key_ids)
        self._counter = None
        return None

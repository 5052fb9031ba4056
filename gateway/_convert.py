"""Protobuf ↔ router model conversions at the gateway edge."""

from __future__ import annotations

from typing import TypeVar

from google.protobuf import timestamp_pb2
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from gateway import _pbenum
from hsmgw.v1 import crypto_pb2 as pb
from router.errors import InvalidArgument
from router.model import KeyAlgorithm, KeyState, KeyStorage, KeyUsage, Operation, Placement

E = TypeVar("E", KeyAlgorithm, KeyUsage, Operation, KeyStorage)


def _from_proto(value: int, enum_pb: EnumTypeWrapper, prefix: str, model: type[E], field: str) -> E:
    if value == 0:
        raise InvalidArgument(f"{field} is required")
    try:
        name = enum_pb.Name(value)
    except ValueError:
        raise InvalidArgument(f"{field}: unknown value {value}") from None
    return model(name.removeprefix(prefix))


def key_algorithm(value: int) -> KeyAlgorithm:
    return _from_proto(value, pb.KeyAlgorithm, "KEY_ALGORITHM_", KeyAlgorithm, "algorithm")


_OPERATIONS: dict[int, Operation] = {}


def operation(value: int) -> Operation:
    op = _OPERATIONS.get(value)  # every crypto call converts one: look it up once per value
    if op is None:
        op = _OPERATIONS[value] = _from_proto(value, pb.Algorithm, "ALGORITHM_", Operation, "algorithm")
    return op


def usage(value: int) -> KeyUsage | None:
    """None for unspecified: the algorithm's default usage."""
    if value == 0:
        return None
    return _from_proto(value, pb.KeyUsage, "KEY_USAGE_", KeyUsage, "usage")


def storage(value: int) -> KeyStorage:
    if value == 0:
        return KeyStorage.TOKEN
    return _from_proto(value, pb.KeyStorage, "KEY_STORAGE_", KeyStorage, "storage")


_STATE = {
    KeyState.CREATING: pb.KEY_STATE_CREATING,
    KeyState.ENABLED: pb.KEY_STATE_ENABLED,
    KeyState.UNDER_REPLICATED: pb.KEY_STATE_UNDER_REPLICATED,
    KeyState.DESTROYED: pb.KEY_STATE_DESTROYED,
}


def key(placement: Placement) -> pb.Key:
    # Unset, not 1970, when not known (the cache's copy, served while the store is down).
    created: timestamp_pb2.Timestamp | None = None
    if placement.create_time > 0:
        created = timestamp_pb2.Timestamp()
        created.FromNanoseconds(int(placement.create_time * 1e9))
    return pb.Key(
        key_id=placement.key_id,
        algorithm=key_algorithm_pb(placement.algorithm),
        usage=key_usage_pb(placement.usage),
        state=_STATE[placement.state],
        primary_cluster=placement.primary,
        replicas=list(placement.replicas),
        create_time=created,
        storage=_pbenum.value(pb.KeyStorage, "KEY_STORAGE_" + placement.storage.value),
        non_extractable=not placement.extractable,
        held=placement.held,
    )


def key_algorithm_pb(algorithm: KeyAlgorithm) -> pb.KeyAlgorithm:
    return _pbenum.value(pb.KeyAlgorithm, "KEY_ALGORITHM_" + algorithm.value)


def key_usage_pb(usage: KeyUsage) -> pb.KeyUsage:
    return _pbenum.value(pb.KeyUsage, "KEY_USAGE_" + usage.value)


def operation_pb(op: Operation) -> pb.Algorithm:
    return _pbenum.value(pb.Algorithm, "ALGORITHM_" + op.value)

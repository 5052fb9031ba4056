import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListClustersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("name", "region", "health", "keys", "max_keys", "sessions_open", "sessions_in_use", "pool_size", "draining", "circuit", "region_failed_over", "ops_per_second", "error_rate", "calls_hung")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MAX_KEYS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_OPEN_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_IN_USE_FIELD_NUMBER: _ClassVar[int]
    POOL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_FIELD_NUMBER: _ClassVar[int]
    REGION_FAILED_OVER_FIELD_NUMBER: _ClassVar[int]
    OPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    CALLS_HUNG_FIELD_NUMBER: _ClassVar[int]
    name: str
    region: str
    health: str
    keys: int
    max_keys: int
    sessions_open: int
    sessions_in_use: int
    pool_size: int
    draining: bool
    circuit: str
    region_failed_over: bool
    ops_per_second: float
    error_rate: float
    calls_hung: int
    def __init__(self, name: _Optional[str] = ..., region: _Optional[str] = ..., health: _Optional[str] = ..., keys: _Optional[int] = ..., max_keys: _Optional[int] = ..., sessions_open: _Optional[int] = ..., sessions_in_use: _Optional[int] = ..., pool_size: _Optional[int] = ..., draining: _Optional[bool] = ..., circuit: _Optional[str] = ..., region_failed_over: _Optional[bool] = ..., ops_per_second: _Optional[float] = ..., error_rate: _Optional[float] = ..., calls_hung: _Optional[int] = ...) -> None: ...

class ListClustersResponse(_message.Message):
    __slots__ = ("clusters", "home_region", "dr_regions")
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    HOME_REGION_FIELD_NUMBER: _ClassVar[int]
    DR_REGIONS_FIELD_NUMBER: _ClassVar[int]
    clusters: _containers.RepeatedCompositeFieldContainer[ClusterStatus]
    home_region: str
    dr_regions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, clusters: _Optional[_Iterable[_Union[ClusterStatus, _Mapping]]] = ..., home_region: _Optional[str] = ..., dr_regions: _Optional[_Iterable[str]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("clusters", "keys", "under_replicated_keys", "pending_changes", "warnings", "failovers", "retries", "retries_refused")
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    UNDER_REPLICATED_KEYS_FIELD_NUMBER: _ClassVar[int]
    PENDING_CHANGES_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    RETRIES_REFUSED_FIELD_NUMBER: _ClassVar[int]
    clusters: _containers.RepeatedCompositeFieldContainer[ClusterStatus]
    keys: int
    under_replicated_keys: int
    pending_changes: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    failovers: int
    retries: int
    retries_refused: int
    def __init__(self, clusters: _Optional[_Iterable[_Union[ClusterStatus, _Mapping]]] = ..., keys: _Optional[int] = ..., under_replicated_keys: _Optional[int] = ..., pending_changes: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ..., failovers: _Optional[int] = ..., retries: _Optional[int] = ..., retries_refused: _Optional[int] = ...) -> None: ...

class PlaceKeyRequest(_message.Message):
    __slots__ = ("key_id", "cluster")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    cluster: str
    def __init__(self, key_id: _Optional[str] = ..., cluster: _Optional[str] = ...) -> None: ...

class ListPlacementsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KeyPlacement(_message.Message):
    __slots__ = ("key_id", "cluster")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    cluster: str
    def __init__(self, key_id: _Optional[str] = ..., cluster: _Optional[str] = ...) -> None: ...

class ListPlacementsResponse(_message.Message):
    __slots__ = ("placements", "limit")
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    placements: _containers.RepeatedCompositeFieldContainer[KeyPlacement]
    limit: int
    def __init__(self, placements: _Optional[_Iterable[_Union[KeyPlacement, _Mapping]]] = ..., limit: _Optional[int] = ...) -> None: ...

class ReleaseKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class MoveKeyRequest(_message.Message):
    __slots__ = ("key_id", "to")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    to: str
    def __init__(self, key_id: _Optional[str] = ..., to: _Optional[str] = ..., **kwargs) -> None: ...

class PlanRebalanceRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KeyMove(_message.Message):
    __slots__ = ("key_id", "to")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    to: str
    def __init__(self, key_id: _Optional[str] = ..., to: _Optional[str] = ..., **kwargs) -> None: ...

class RebalancePlan(_message.Message):
    __slots__ = ("moves", "keys_considered", "plan_id")
    MOVES_FIELD_NUMBER: _ClassVar[int]
    KEYS_CONSIDERED_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    moves: _containers.RepeatedCompositeFieldContainer[KeyMove]
    keys_considered: int
    plan_id: str
    def __init__(self, moves: _Optional[_Iterable[_Union[KeyMove, _Mapping]]] = ..., keys_considered: _Optional[int] = ..., plan_id: _Optional[str] = ...) -> None: ...

class ApplyRebalanceRequest(_message.Message):
    __slots__ = ("plan_id",)
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    def __init__(self, plan_id: _Optional[str] = ...) -> None: ...

class DrainClusterRequest(_message.Message):
    __slots__ = ("cluster", "drain", "force")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    drain: bool
    force: bool
    def __init__(self, cluster: _Optional[str] = ..., drain: _Optional[bool] = ..., force: _Optional[bool] = ...) -> None: ...

class FailoverRegionRequest(_message.Message):
    __slots__ = ("region", "failover", "force")
    REGION_FIELD_NUMBER: _ClassVar[int]
    FAILOVER_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    region: str
    failover: bool
    force: bool
    def __init__(self, region: _Optional[str] = ..., failover: _Optional[bool] = ..., force: _Optional[bool] = ...) -> None: ...

class DestroyKeyChangeRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class ReconcileRequest(_message.Message):
    __slots__ = ("fix",)
    FIX_FIELD_NUMBER: _ClassVar[int]
    fix: bool
    def __init__(self, fix: _Optional[bool] = ...) -> None: ...

class ReconcileFinding(_message.Message):
    __slots__ = ("kind", "cluster", "key_id", "detail")
    KIND_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    kind: str
    cluster: str
    key_id: str
    detail: str
    def __init__(self, kind: _Optional[str] = ..., cluster: _Optional[str] = ..., key_id: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class ReconcileResponse(_message.Message):
    __slots__ = ("findings", "change", "note", "findings_left")
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_LEFT_FIELD_NUMBER: _ClassVar[int]
    findings: _containers.RepeatedCompositeFieldContainer[ReconcileFinding]
    change: Change
    note: str
    findings_left: int
    def __init__(self, findings: _Optional[_Iterable[_Union[ReconcileFinding, _Mapping]]] = ..., change: _Optional[_Union[Change, _Mapping]] = ..., note: _Optional[str] = ..., findings_left: _Optional[int] = ...) -> None: ...

class Change(_message.Message):
    __slots__ = ("id", "action", "params", "requested_by", "approved_by", "state", "approvals_needed", "create_time", "expire_time", "result", "origins")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class OriginsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: CallerOrigin
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[CallerOrigin, _Mapping]] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    APPROVED_BY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_NEEDED_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ORIGINS_FIELD_NUMBER: _ClassVar[int]
    id: str
    action: str
    params: _containers.ScalarMap[str, str]
    requested_by: str
    approved_by: _containers.RepeatedScalarFieldContainer[str]
    state: str
    approvals_needed: int
    create_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    result: str
    origins: _containers.MessageMap[str, CallerOrigin]
    def __init__(self, id: _Optional[str] = ..., action: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ..., requested_by: _Optional[str] = ..., approved_by: _Optional[_Iterable[str]] = ..., state: _Optional[str] = ..., approvals_needed: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., result: _Optional[str] = ..., origins: _Optional[_Mapping[str, CallerOrigin]] = ...) -> None: ...

class CallerOrigin(_message.Message):
    __slots__ = ("peer", "authenticated_by")
    PEER_FIELD_NUMBER: _ClassVar[int]
    AUTHENTICATED_BY_FIELD_NUMBER: _ClassVar[int]
    peer: str
    authenticated_by: str
    def __init__(self, peer: _Optional[str] = ..., authenticated_by: _Optional[str] = ...) -> None: ...

class ListChangesRequest(_message.Message):
    __slots__ = ("all",)
    ALL_FIELD_NUMBER: _ClassVar[int]
    all: bool
    def __init__(self, all: _Optional[bool] = ...) -> None: ...

class ListChangesResponse(_message.Message):
    __slots__ = ("changes",)
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[Change]
    def __init__(self, changes: _Optional[_Iterable[_Union[Change, _Mapping]]] = ...) -> None: ...

class ApproveChangeRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RejectChangeRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class TailAuditRequest(_message.Message):
    __slots__ = ("lines",)
    LINES_FIELD_NUMBER: _ClassVar[int]
    lines: int
    def __init__(self, lines: _Optional[int] = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class TailAuditResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[AuditRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[AuditRecord, _Mapping]]] = ...) -> None: ...

class VerifyAuditRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifyAuditResponse(_message.Message):
    __slots__ = ("ok", "records", "problem", "line", "unwritten", "unwritten_noted_at")
    OK_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    UNWRITTEN_FIELD_NUMBER: _ClassVar[int]
    UNWRITTEN_NOTED_AT_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    records: int
    problem: str
    line: int
    unwritten: int
    unwritten_noted_at: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ok: _Optional[bool] = ..., records: _Optional[int] = ..., problem: _Optional[str] = ..., line: _Optional[int] = ..., unwritten: _Optional[int] = ..., unwritten_noted_at: _Optional[_Iterable[int]] = ...) -> None: ...

import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyAlgorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_ALGORITHM_UNSPECIFIED: _ClassVar[KeyAlgorithm]
    KEY_ALGORITHM_EC_P256: _ClassVar[KeyAlgorithm]
    KEY_ALGORITHM_EC_P384: _ClassVar[KeyAlgorithm]
    KEY_ALGORITHM_RSA_2048: _ClassVar[KeyAlgorithm]
    KEY_ALGORITHM_RSA_3072: _ClassVar[KeyAlgorithm]
    KEY_ALGORITHM_RSA_4096: _ClassVar[KeyAlgorithm]
    KEY_ALGORITHM_AES_256: _ClassVar[KeyAlgorithm]
    KEY_ALGORITHM_HMAC_SHA256: _ClassVar[KeyAlgorithm]

class Algorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALGORITHM_UNSPECIFIED: _ClassVar[Algorithm]
    ALGORITHM_ECDSA_SHA256: _ClassVar[Algorithm]
    ALGORITHM_ECDSA_SHA384: _ClassVar[Algorithm]
    ALGORITHM_RSA_PKCS1_SHA256: _ClassVar[Algorithm]
    ALGORITHM_RSA_PSS_SHA256: _ClassVar[Algorithm]
    ALGORITHM_RSA_OAEP_SHA256: _ClassVar[Algorithm]
    ALGORITHM_AES_GCM: _ClassVar[Algorithm]
    ALGORITHM_HMAC_SHA256: _ClassVar[Algorithm]

class KeyUsage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_USAGE_UNSPECIFIED: _ClassVar[KeyUsage]
    KEY_USAGE_SIGN_VERIFY: _ClassVar[KeyUsage]
    KEY_USAGE_ENCRYPT_DECRYPT: _ClassVar[KeyUsage]
    KEY_USAGE_MAC: _ClassVar[KeyUsage]

class KeyState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_STATE_UNSPECIFIED: _ClassVar[KeyState]
    KEY_STATE_CREATING: _ClassVar[KeyState]
    KEY_STATE_ENABLED: _ClassVar[KeyState]
    KEY_STATE_UNDER_REPLICATED: _ClassVar[KeyState]
    KEY_STATE_DESTROYED: _ClassVar[KeyState]

class KeyStorage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_STORAGE_UNSPECIFIED: _ClassVar[KeyStorage]
    KEY_STORAGE_TOKEN: _ClassVar[KeyStorage]
    KEY_STORAGE_EXTERNAL: _ClassVar[KeyStorage]
KEY_ALGORITHM_UNSPECIFIED: KeyAlgorithm
KEY_ALGORITHM_EC_P256: KeyAlgorithm
KEY_ALGORITHM_EC_P384: KeyAlgorithm
KEY_ALGORITHM_RSA_2048: KeyAlgorithm
KEY_ALGORITHM_RSA_3072: KeyAlgorithm
KEY_ALGORITHM_RSA_4096: KeyAlgorithm
KEY_ALGORITHM_AES_256: KeyAlgorithm
KEY_ALGORITHM_HMAC_SHA256: KeyAlgorithm
ALGORITHM_UNSPECIFIED: Algorithm
ALGORITHM_ECDSA_SHA256: Algorithm
ALGORITHM_ECDSA_SHA384: Algorithm
ALGORITHM_RSA_PKCS1_SHA256: Algorithm
ALGORITHM_RSA_PSS_SHA256: Algorithm
ALGORITHM_RSA_OAEP_SHA256: Algorithm
ALGORITHM_AES_GCM: Algorithm
ALGORITHM_HMAC_SHA256: Algorithm
KEY_USAGE_UNSPECIFIED: KeyUsage
KEY_USAGE_SIGN_VERIFY: KeyUsage
KEY_USAGE_ENCRYPT_DECRYPT: KeyUsage
KEY_USAGE_MAC: KeyUsage
KEY_STATE_UNSPECIFIED: KeyState
KEY_STATE_CREATING: KeyState
KEY_STATE_ENABLED: KeyState
KEY_STATE_UNDER_REPLICATED: KeyState
KEY_STATE_DESTROYED: KeyState
KEY_STORAGE_UNSPECIFIED: KeyStorage
KEY_STORAGE_TOKEN: KeyStorage
KEY_STORAGE_EXTERNAL: KeyStorage

class ReplicationPolicy(_message.Message):
    __slots__ = ("copies",)
    COPIES_FIELD_NUMBER: _ClassVar[int]
    copies: int
    def __init__(self, copies: _Optional[int] = ...) -> None: ...

class Key(_message.Message):
    __slots__ = ("key_id", "algorithm", "usage", "state", "primary_cluster", "replicas", "create_time", "storage", "non_extractable", "held")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_CLUSTER_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FIELD_NUMBER: _ClassVar[int]
    NON_EXTRACTABLE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    algorithm: KeyAlgorithm
    usage: KeyUsage
    state: KeyState
    primary_cluster: str
    replicas: _containers.RepeatedScalarFieldContainer[str]
    create_time: _timestamp_pb2.Timestamp
    storage: KeyStorage
    non_extractable: bool
    held: bool
    def __init__(self, key_id: _Optional[str] = ..., algorithm: _Optional[_Union[KeyAlgorithm, str]] = ..., usage: _Optional[_Union[KeyUsage, str]] = ..., state: _Optional[_Union[KeyState, str]] = ..., primary_cluster: _Optional[str] = ..., replicas: _Optional[_Iterable[str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., storage: _Optional[_Union[KeyStorage, str]] = ..., non_extractable: _Optional[bool] = ..., held: _Optional[bool] = ...) -> None: ...

class GenerateKeyRequest(_message.Message):
    __slots__ = ("request_id", "key_id", "algorithm", "usage", "replication", "storage", "non_extractable")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FIELD_NUMBER: _ClassVar[int]
    NON_EXTRACTABLE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    key_id: str
    algorithm: KeyAlgorithm
    usage: KeyUsage
    replication: ReplicationPolicy
    storage: KeyStorage
    non_extractable: bool
    def __init__(self, request_id: _Optional[str] = ..., key_id: _Optional[str] = ..., algorithm: _Optional[_Union[KeyAlgorithm, str]] = ..., usage: _Optional[_Union[KeyUsage, str]] = ..., replication: _Optional[_Union[ReplicationPolicy, _Mapping]] = ..., storage: _Optional[_Union[KeyStorage, str]] = ..., non_extractable: _Optional[bool] = ...) -> None: ...

class GetKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "prefix")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    prefix: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., prefix: _Optional[str] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys", "next_page_token")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[Key]
    next_page_token: str
    def __init__(self, keys: _Optional[_Iterable[_Union[Key, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetPublicKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class PublicKey(_message.Message):
    __slots__ = ("key_id", "pem", "der", "algorithm")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PEM_FIELD_NUMBER: _ClassVar[int]
    DER_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    pem: str
    der: bytes
    algorithm: KeyAlgorithm
    def __init__(self, key_id: _Optional[str] = ..., pem: _Optional[str] = ..., der: _Optional[bytes] = ..., algorithm: _Optional[_Union[KeyAlgorithm, str]] = ...) -> None: ...

class DestroyKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class SignRequest(_message.Message):
    __slots__ = ("key_id", "algorithm", "digest", "message", "request_id")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    algorithm: Algorithm
    digest: bytes
    message: bytes
    request_id: str
    def __init__(self, key_id: _Optional[str] = ..., algorithm: _Optional[_Union[Algorithm, str]] = ..., digest: _Optional[bytes] = ..., message: _Optional[bytes] = ..., request_id: _Optional[str] = ...) -> None: ...

class SignResponse(_message.Message):
    __slots__ = ("signature", "key_id", "cluster", "request_id")
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    signature: bytes
    key_id: str
    cluster: str
    request_id: str
    def __init__(self, signature: _Optional[bytes] = ..., key_id: _Optional[str] = ..., cluster: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("key_id", "algorithm", "digest", "message", "signature")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    algorithm: Algorithm
    digest: bytes
    message: bytes
    signature: bytes
    def __init__(self, key_id: _Optional[str] = ..., algorithm: _Optional[_Union[Algorithm, str]] = ..., digest: _Optional[bytes] = ..., message: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("valid",)
    VALID_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    def __init__(self, valid: _Optional[bool] = ...) -> None: ...

class EncryptRequest(_message.Message):
    __slots__ = ("key_id", "algorithm", "plaintext", "aad")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    PLAINTEXT_FIELD_NUMBER: _ClassVar[int]
    AAD_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    algorithm: Algorithm
    plaintext: bytes
    aad: bytes
    def __init__(self, key_id: _Optional[str] = ..., algorithm: _Optional[_Union[Algorithm, str]] = ..., plaintext: _Optional[bytes] = ..., aad: _Optional[bytes] = ...) -> None: ...

class EncryptResponse(_message.Message):
    __slots__ = ("ciphertext", "iv", "cluster")
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    IV_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    ciphertext: bytes
    iv: bytes
    cluster: str
    def __init__(self, ciphertext: _Optional[bytes] = ..., iv: _Optional[bytes] = ..., cluster: _Optional[str] = ...) -> None: ...

class DecryptRequest(_message.Message):
    __slots__ = ("key_id", "algorithm", "ciphertext", "iv", "aad")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    IV_FIELD_NUMBER: _ClassVar[int]
    AAD_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    algorithm: Algorithm
    ciphertext: bytes
    iv: bytes
    aad: bytes
    def __init__(self, key_id: _Optional[str] = ..., algorithm: _Optional[_Union[Algorithm, str]] = ..., ciphertext: _Optional[bytes] = ..., iv: _Optional[bytes] = ..., aad: _Optional[bytes] = ...) -> None: ...

class DecryptResponse(_message.Message):
    __slots__ = ("plaintext",)
    PLAINTEXT_FIELD_NUMBER: _ClassVar[int]
    plaintext: bytes
    def __init__(self, plaintext: _Optional[bytes] = ...) -> None: ...

class MacRequest(_message.Message):
    __slots__ = ("key_id", "algorithm", "data")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    algorithm: Algorithm
    data: bytes
    def __init__(self, key_id: _Optional[str] = ..., algorithm: _Optional[_Union[Algorithm, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class MacResponse(_message.Message):
    __slots__ = ("mac",)
    MAC_FIELD_NUMBER: _ClassVar[int]
    mac: bytes
    def __init__(self, mac: _Optional[bytes] = ...) -> None: ...

class VerifyMacRequest(_message.Message):
    __slots__ = ("key_id", "algorithm", "data", "mac")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    algorithm: Algorithm
    data: bytes
    mac: bytes
    def __init__(self, key_id: _Optional[str] = ..., algorithm: _Optional[_Union[Algorithm, str]] = ..., data: _Optional[bytes] = ..., mac: _Optional[bytes] = ...) -> None: ...

class VerifyMacResponse(_message.Message):
    __slots__ = ("valid",)
    VALID_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    def __init__(self, valid: _Optional[bool] = ...) -> None: ...

class GenerateRandomRequest(_message.Message):
    __slots__ = ("length",)
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    length: int
    def __init__(self, length: _Optional[int] = ...) -> None: ...

class GenerateRandomResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class BatchSignRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[SignRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[SignRequest, _Mapping]]] = ...) -> None: ...

class BatchSignResult(_message.Message):
    __slots__ = ("response", "code", "message", "reason", "request_id")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    response: SignResponse
    code: int
    message: str
    reason: str
    request_id: str
    def __init__(self, response: _Optional[_Union[SignResponse, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class BatchSignResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[BatchSignResult]
    def __init__(self, responses: _Optional[_Iterable[_Union[BatchSignResult, _Mapping]]] = ...) -> None: ...

"""hsmgw's engine: placement, dispatch and PKCS #11 pools. Never imports grpc."""

from router.backend import HsmBackend, PoolStats
from router.model import (
    ClusterSpec,
    KeyAlgorithm,
    KeySpec,
    KeyState,
    KeyStorage,
    KeyUsage,
    Operation,
    Placement,
)
from router.router import Router, Topology
from router.secret import Secret

__all__ = [
    "ClusterSpec",
    "HsmBackend",
    "KeyAlgorithm",
    "KeySpec",
    "KeyState",
    "KeyStorage",
    "KeyUsage",
    "Operation",
    "Placement",
    "PoolStats",
    "Router",
    "Secret",
    "Topology",
]

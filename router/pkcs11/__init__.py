"""PKCS #11 backend: thread-safe module loading, session pools, cluster operations."""

from router.pkcs11._module import Module, load_module
from router.pkcs11.cluster import LoginRefused, Pkcs11Cluster
from router.pkcs11.pool import SessionPool

__all__ = ["LoginRefused", "Module", "Pkcs11Cluster", "SessionPool", "load_module"]

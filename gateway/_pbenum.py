"""Protobuf enum values looked up by name, typed as their enum.

The protobuf stubs type ``EnumTypeWrapper.Value`` as ``int``, while the generated message
constructors want the enum type (an ``int`` subclass that exists only in the stubs), so
the cast lives here rather than at every call site. Kept free of ``router`` imports: the
client SDK (``gateway.client``) uses it too.
"""

from __future__ import annotations

from typing import TypeVar, cast

from hsmgw.v1 import crypto_pb2 as pb

E = TypeVar("E", pb.Algorithm, pb.KeyAlgorithm, pb.KeyState, pb.KeyStorage, pb.KeyUsage)


def value(enum_pb: type[E], name: str) -> E:
    """``enum_pb.Value(name)``: ValueError for a name the enum does not define."""
    return cast(E, enum_pb.Value(name))

"""The router's memory of EXTERNAL key records every cluster refused to unwrap, on a fake clock."""

from __future__ import annotations

import dataclasses

import pytest

from router._refused import REFUSED_FOR, RefusedRecords
from router.errors import WrappedKeyRefused
from router.model import KeyAlgorithm, KeyState, KeyStorage, KeyUsage, Placement
from tests.support import FakeClock


def record(key_id: str, wrapped: bytes = b"\x01" * 40, **changes: object) -> Placement:
    base = Placement(key_id, KeyAlgorithm.AES_256, KeyUsage.ENCRYPT_DECRYPT, KeyState.ENABLED, "use1-a",
                     storage=KeyStorage.EXTERNAL, wrapped=wrapped)
    return dataclasses.replace(base, **changes)


def refusal(cluster: str = "usw2-a") -> WrappedKeyRefused:
    return WrappedKeyRefused("refused", cluster=cluster, region="us-west-2")


def test_a_refused_record_is_refused_for_a_while_for_its_material_only() -> None:
    clock = FakeClock()
    refused = RefusedRecords(clock)
    corrupt = record("k")
    refused.add(corrupt, refusal())

    with pytest.raises(WrappedKeyRefused, match="asked again in 30 s") as again:
        refused.check(dataclasses.replace(corrupt, version=7))  # rewritten with the same material
    assert (again.value.reason, again.value.cluster) == ("KEY_RECORD_MISMATCH", "usw2-a")
    refused.check(record("other"))
    refused.check(dataclasses.replace(corrupt, algorithm=KeyAlgorithm.HMAC_SHA256, usage=KeyUsage.MAC))
    refused.check(record("k", wrapped=b"\x02" * 40))  # restored: and the entry is gone
    refused.check(corrupt)

    refused.add(corrupt, refusal())
    clock.sleep(REFUSED_FOR - 0.5)
    with pytest.raises(WrappedKeyRefused, match="asked again in 0 s"):
        refused.check(corrupt)
    clock.sleep(0.5)
    refused.check(corrupt)
    assert len(refused) == 0


def test_the_oldest_refusal_goes_beyond_the_bound() -> None:
    refused = RefusedRecords(FakeClock(), kept=3)
    for key_id in ("a", "b", "c", "d"):
        refused.add(record(key_id), refusal())
    assert len(refused) == 3
    refused.check(record("a"))
    for key_id in ("b", "c", "d"):
        with pytest.raises(WrappedKeyRefused):
            refused.check(record(key_id))

"""A BatchSign whose client gives up (cancels it, or its deadline passes) stops signing.

The HSM is made slow by a fixed amount (faultmod: 2 ms on each of C_SignInit and
C_Sign), so a 1,000-item batch takes seconds on any machine and the test does not
depend on the CPU's speed or count. /metrics and the log say how the call ended.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import grpc
import pytest

from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from tests.chaos.conftest import faulty_fleet
from tests.moto import free_port
from tests.support import GatewayProcess, scrape, unique, value, wait_for

ITEMS = 1000


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path-on", "fast-path-off"])
@pytest.mark.parametrize("ending", ["cancel", "deadline"])
def test_a_batch_whose_client_gives_up_stops_signing(tmp_path: Path, faultmod: Path, fast_path: bool,
                                                     ending: str) -> None:
    port = free_port()
    fleet, control = faulty_fleet(tmp_path / "fleet", faultmod, extra=f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    if not fast_path:
        text = fleet.config_path.read_text()
        fleet.config_path.write_text(text.replace("[server]\n", "[server]\nfast_path = false\n", 1))
    gateway = GatewayProcess(fleet.config_path).start()
    code = "CANCELLED" if ending == "cancel" else "DEADLINE_EXCEEDED"
    failure = None
    try:
        with grpc.insecure_channel(gateway.target) as channel:
            crypto = crypto_pb2_grpc.CryptoServiceStub(channel)
            key_id = unique("giveup")
            crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id,
                                                     algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=60)
            control.set("*", "latency", 2)  # >= 4 ms an item: >= 1 s for the batch on 4 sessions
            items = [pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256,
                                    digest=hashlib.sha256(str(i).encode()).digest()) for i in range(ITEMS)]
            batch = crypto.BatchSign.future(pb.BatchSignRequest(requests=items),
                                            timeout=120 if ending == "cancel" else 0.3)
            if ending == "cancel":
                wait_for(lambda: value(scrape(port), "hsmgw_requests_in_flight") >= 1, what="the batch to start",
                         interval=0.01)
                time.sleep(0.1)
                assert batch.cancel()
            else:
                failure = batch.exception(timeout=60)
                if failure is None:
                    # The gateway's answer came before the client's own timer fired (a loaded
                    # machine delays both): each item then says whether it was signed.
                    codes = {item.code for item in batch.result().responses}
                    assert codes <= {0, grpc.StatusCode.DEADLINE_EXCEEDED.value[0]}, codes
                else:
                    assert failure.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            wait_for(lambda: value(scrape(port), "hsmgw_requests_total", rpc="BatchSign"), timeout=60,
                     what="the gateway to finish the batch")
        samples = scrape(port)
        log = gateway.log()
    finally:
        control.clear()
        gateway.stop()
    signed = value(samples, "hsmgw_batch_items_total", code="OK")
    left = value(samples, "hsmgw_batch_items_total") - signed
    assert signed + left == ITEMS
    if failure is not None:  # the client got DEADLINE_EXCEEDED, and none of the items signed before it
        assert signed == 0, f"{signed:.0f} items counted OK in a batch whose caller got DEADLINE_EXCEEDED"
        assert value(samples, "hsmgw_batch_items_total", code="DEADLINE_EXCEEDED") == ITEMS
    # At most 4 chunks (one per session) of <= 63 items are under way when the client gives up,
    # and each may be followed by one more taken just before: the rest is never signed.
    assert left >= ITEMS - 4 * 63 * 2, f"{signed:.0f} of {ITEMS} items were signed after the client gave up"
    assert value(samples, "hsmgw_requests_total", rpc="BatchSign", code=code) == 1
    assert value(samples, "hsmgw_requests_total", rpc="BatchSign", code="OK") == 0
    assert value(samples, "hsmgw_errors_total", reason=code) == value(samples, "hsmgw_errors_total") == 1
    assert ("cancelled by its client" if ending == "cancel" else "past its deadline") in log

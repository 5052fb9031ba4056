"""deploy/grpc-service-config.json, as gRPC's own retries read it against a server that answers
with gateway.status: what a client in another language gets from it."""

from __future__ import annotations

import json
from concurrent import futures

import grpc

from gateway import status
from gateway.config import ServerConfig
from hsmgw.v1 import crypto_pb2 as pb
from hsmgw.v1 import crypto_pb2_grpc
from router import errors
from tests.support import ROOT

CONFIG = ROOT / "deploy" / "grpc-service-config.json"


def _policy(method: str) -> dict:
    for entry in json.loads(CONFIG.read_text())["methodConfig"]:
        if {"service": "hsmgw.v1.CryptoService", "method": method} in entry["name"]:
            return entry
    raise AssertionError(f"{method} has no methodConfig")


def test_generate_key_waits_out_a_creation_under_way_on_the_same_endpoint() -> None:
    """A key another attempt is making answers KEY_BEING_CREATED (UNAVAILABLE) until it is made:
    gRPC's retries, paced by the gateway's pushback, see it through."""
    attempts: list[str] = []

    class Creating(crypto_pb2_grpc.CryptoServiceServicer):  # type: ignore[misc]
        def GenerateKey(self, request: pb.GenerateKeyRequest, context: grpc.ServicerContext) -> pb.Key:
            attempts.append(request.request_id)
            if len([a for a in attempts if a == request.request_id]) < 5:
                refusal = errors.KeyBeingCreated(f"key {request.key_id!r} is being created")
                refusal.retry_after = 0.05  # the gateway's pushback, shortened: four of its own take 8 s
                status.abort(context, refusal)
            return pb.Key(key_id=request.key_id)

    server = grpc.server(futures.ThreadPoolExecutor(2))
    crypto_pb2_grpc.add_CryptoServiceServicer_to_server(Creating(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.service_config", CONFIG.read_text())]) as ch:
            # One channel, as an application keeps it: each creation waited out costs retry tokens,
            # and retryThrottling must leave enough for the next ones (it left one attempt to the third).
            keys = [crypto_pb2_grpc.CryptoServiceStub(ch).GenerateKey(
                pb.GenerateKeyRequest(key_id=f"app/k{i}", request_id=f"app/k{i}",
                                      algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=30) for i in range(1, 4)]
    finally:
        server.stop(None)
    assert [key.key_id for key in keys] == ["app/k1", "app/k2", "app/k3"]
    assert attempts == ["app/k1"] * 5 + ["app/k2"] * 5 + ["app/k3"] * 5, \
        "every attempt is the same request, on the same endpoint"


def test_generate_key_may_take_as_long_as_the_gateway_allows_and_retries_are_throttled() -> None:
    timeout = float(_policy("GenerateKey")["timeout"].rstrip("s"))
    assert timeout >= ServerConfig.default_deadline, "the client would give up on a creation the gateway still runs"
    throttling = json.loads(CONFIG.read_text())["retryThrottling"]
    assert throttling["maxTokens"] > 0 and 0 < throttling["tokenRatio"] < 1
    for method in ("Sign", "GenerateKey"):
        codes = set(_policy(method)["retryPolicy"]["retryableStatusCodes"])
        assert codes == {"UNAVAILABLE", "CANCELLED"}, method


def test_the_pushback_for_a_key_being_created_spreads_generate_keys_attempts_over_its_timeout() -> None:
    """gRPC makes at most 5 attempts, each after the pushback: their waits must cover a creation
    of several seconds (an RSA_4096 key and its copies on a real HSM), and leave the last attempt
    time to be answered."""
    policy = _policy("GenerateKey")
    timeout = float(policy["timeout"].rstrip("s"))
    retries = min(policy["retryPolicy"]["maxAttempts"], 5) - 1
    waited = retries * errors.KeyBeingCreated.retry_after
    assert 0.75 * timeout <= waited < timeout, (waited, timeout)
    proto = (ROOT / "protos" / "hsmgw" / "v1" / "crypto.proto").read_text()
    assert f"RetryInfo delay of {errors.KeyBeingCreated.retry_after:g} s" in proto, "docs/api.md says another delay"


def test_every_unary_call_has_a_deadline_and_a_retry_policy() -> None:
    """A method missing from the file gets no deadline and no retry in a client that uses it."""
    service = pb.DESCRIPTOR.services_by_name["CryptoService"]
    unary = {m.name for m in service.methods if not m.client_streaming and not m.server_streaming}
    configured = {name["method"] for entry in json.loads(CONFIG.read_text())["methodConfig"]
                  for name in entry["name"]}
    assert unary <= configured, sorted(unary - configured)
    for method in unary:
        assert _policy(method)["timeout"], method
        assert set(_policy(method)["retryPolicy"]["retryableStatusCodes"]) == {"UNAVAILABLE", "CANCELLED"}, method
    # DestroyKey removes the key from every cluster: as long as the gateway allows.
    assert float(_policy("DestroyKey")["timeout"].rstrip("s")) >= ServerConfig.default_deadline

"""What a load test does: the operation, its keys, its concurrency and its pace."""

from __future__ import annotations

from dataclasses import dataclass

from router.model import KeyAlgorithm, KeyUsage, Operation

OPS = ("sign", "verify", "encrypt", "decrypt", "mac")
MODES = ("unary", "batch", "stream")

DEFAULT_ALGORITHM = {
    "sign": Operation.ECDSA_SHA256,
    "verify": Operation.ECDSA_SHA256,
    "encrypt": Operation.AES_GCM,
    "decrypt": Operation.AES_GCM,
    "mac": Operation.HMAC_SHA256,
}

KEY_FOR = {
    Operation.ECDSA_SHA256: (KeyAlgorithm.EC_P256, KeyUsage.SIGN_VERIFY),
    Operation.ECDSA_SHA384: (KeyAlgorithm.EC_P384, KeyUsage.SIGN_VERIFY),
    Operation.RSA_PKCS1_SHA256: (KeyAlgorithm.RSA_2048, KeyUsage.SIGN_VERIFY),
    Operation.RSA_PSS_SHA256: (KeyAlgorithm.RSA_2048, KeyUsage.SIGN_VERIFY),
    Operation.RSA_OAEP_SHA256: (KeyAlgorithm.RSA_2048, KeyUsage.ENCRYPT_DECRYPT),
    Operation.AES_GCM: (KeyAlgorithm.AES_256, KeyUsage.ENCRYPT_DECRYPT),
    Operation.HMAC_SHA256: (KeyAlgorithm.HMAC_SHA256, KeyUsage.MAC),
}
"""The key a load test creates for each algorithm (``--create``)."""

_KINDS = {
    "sign": {Operation.ECDSA_SHA256, Operation.ECDSA_SHA384, Operation.RSA_PKCS1_SHA256, Operation.RSA_PSS_SHA256},
    "encrypt": {Operation.AES_GCM, Operation.RSA_OAEP_SHA256},
    "mac": {Operation.HMAC_SHA256},
}
_KINDS["verify"] = _KINDS["sign"]
_KINDS["decrypt"] = _KINDS["encrypt"]


class WorkloadError(ValueError):
    """The workload does not make sense; the message says why."""


@dataclass(frozen=True)
class Workload:
    op: str
    """sign, verify, encrypt, decrypt or mac."""
    algorithm: Operation
    key_ids: tuple[str, ...]
    """Keys to use, round robin."""
    mode: str = "unary"
    """unary (one op per call), batch (BatchSign, ``batch_size`` ops per call), stream (SignStream)."""
    processes: int = 1
    """Client processes (each its own interpreter, as separate apps would be)."""
    in_flight: int = 1
    """Calls in flight per process (one thread and one connection each)."""
    rate: float = 0.0
    """Target ops per second over all processes; 0: as fast as possible."""
    duration: float = 5.0
    """Seconds measured."""
    warmup: float = 0.5
    """Seconds run before measuring (connections, caches, CPU frequency)."""
    batch_size: int = 64
    payload: int = 32
    """Bytes of message, plaintext or MAC data (sign/verify send a SHA-256/384 digest)."""
    timeout: float = 10.0
    """Deadline of each call, seconds."""

    def check(self) -> Workload:
        if self.op not in OPS:
            raise WorkloadError(f"unknown operation {self.op!r}; one of {', '.join(OPS)}")
        if self.algorithm not in _KINDS[self.op]:
            names = ", ".join(sorted(o.value for o in _KINDS[self.op]))
            raise WorkloadError(f"{self.op} does not take {self.algorithm.value}; one of {names}")
        if self.mode not in MODES:
            raise WorkloadError(f"unknown mode {self.mode!r}; one of {', '.join(MODES)}")
        if self.mode != "unary" and self.op != "sign":
            raise WorkloadError(f"--mode {self.mode} is for sign (BatchSign, SignStream); {self.op} is unary only")
        if not self.key_ids:
            raise WorkloadError("no keys to use")
        if self.processes < 1 or self.in_flight < 1:
            raise WorkloadError("processes and in-flight must be at least 1")
        if not 1 <= self.batch_size <= 1000:
            raise WorkloadError("batch size must be 1 to 1000")
        if self.duration <= 0 or self.warmup < 0 or self.rate < 0:
            raise WorkloadError("duration must be positive; warm-up and rate not negative")
        return self

    @property
    def ops_per_call(self) -> int:
        return self.batch_size if self.mode == "batch" else 1

    @property
    def slots(self) -> int:
        return self.processes * self.in_flight

    def describe(self) -> str:
        pace = f"{self.rate:g} ops/s" if self.rate else "max rate"
        batch = f" ×{self.batch_size}" if self.mode == "batch" else ""
        return (f"{self.op} {self.algorithm.value} {self.mode}{batch}, {len(self.key_ids)} key(s), "
                f"{self.processes}×{self.in_flight} in flight, {pace}, {self.duration:g}s")

"""No PIN and no private key byte in any log line or error message, across a whole scenario.

The scenario runs the real CLI with debug logging (ours and gRPC's): start-up attempts
that fail on a wrong PIN, a world-readable secrets file and a secrets file that is not
TOML; a successful mTLS start; key creation and use; refused and failing calls; reloads
with broken TLS and policy files; hsmctl; shutdown. Every byte written to a log, to
stderr/stdout, or returned as an error message is then searched for every PIN of the
fleet (and the wrong one tried) and for the private keys of the dev TLS certificates.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from gateway.fleet import Fleet
from gateway.tls import DevCerts, issue_server, load_issuer, write_dev_certs, write_file
from hsmgw.v1 import admin_pb2
from hsmgw.v1 import crypto_pb2 as pb
from tests.security.helpers import POLICY, Client, sighup_and_wait, tls_channel, write_config
from tests.support import ROOT, GatewayProcess, unique

WRONG_PIN = "0badc0ffee15bad1"
DEBUG_ENV = {"GRPC_VERBOSITY": "debug"}


def _pins(fleet: Fleet) -> set[str]:
    clusters = tomllib.loads(fleet.secrets_path.read_text())["clusters"]
    return {pin for entry in clusters.values() for pin in (entry["user_pin"], entry["so_pin"])} | {WRONG_PIN}


def _key_fragments(pem_paths: list[Path]) -> set[str]:
    """Each private key as its PEM body lines, its whole body, and its secret scalar in hex and base64."""
    fragments: set[str] = set()
    for path in pem_paths:
        pem = path.read_text()
        body = [line for line in pem.splitlines() if line and not line.startswith("-----")]
        fragments.update(body)
        fragments.add("".join(body))
        key = serialization.load_pem_private_key(pem.encode(), password=None)
        scalar = key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
        fragments.update({scalar.hex(), scalar.hex().upper(), base64.b64encode(scalar).decode(), repr(scalar)[2:-1]})
    return fragments


class VerboseGateway(GatewayProcess):
    """``hsmgw -v serve``: debug logging, so the scan sees everything the gateway can say."""

    def start(self, timeout: float = 60.0) -> VerboseGateway:
        self.port_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli.hsmgw", "-v", "serve", "--config", str(self.config_path),
                 "--port-file", str(self.port_file), "--grace", "2"],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **self.env},
            )
        end = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"gateway did not start:\n{self.log()}")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())
        return self


def _run(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, **DEBUG_ENV, **(env or {})})
    return f"[exit {result.returncode}]\n{result.stdout}\n{result.stderr}"


def test_no_pin_and_no_private_key_in_any_log_or_error(sec_fleet: Fleet, certs: DevCerts, tmp_path: Path) -> None:
    seen: list[str] = []  # everything any process printed, and every error message a client got

    # Our own certificates for this scenario: the TLS files get broken and rotated below.
    shutil.copytree(certs.out, tmp_path / "certs")
    own = write_dev_certs(tmp_path / "certs", ("root", "payments-app", "nobody", "operator"))
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    config = write_config(sec_fleet, f"hygiene-{tmp_path.name}", tls=own, policy=policy)
    serve = ["-m", "gateway.cli.hsmgw", "-v", "serve", "--config"]

    # 1. Start-up failures: a wrong PIN, a readable secrets file, a secrets file that is not TOML.
    failed = _run(*serve, str(config), env={"HSMGW_PIN_USE1_A": WRONG_PIN})
    assert "[exit 78]" in failed and "the user PIN was refused by token 'use1-a'" in failed
    seen.append(failed)

    pins = tomllib.loads(sec_fleet.secrets_path.read_text())["clusters"]
    readable = tmp_path / "secrets-readable.toml"
    readable.write_text(sec_fleet.secrets_path.read_text())
    os.chmod(readable, 0o644)
    broken = tmp_path / "secrets-broken.toml"
    broken.write_text(f'[clusters.use1-a]\nuser_pin = "{pins["use1-a"]["user_pin"]}\n')  # unterminated string
    os.chmod(broken, 0o600)
    for secrets in (readable, broken):
        bad = config.with_name(f"{config.stem}-{secrets.stem}.toml")
        bad.write_text(config.read_text().replace('file = "secrets.toml"', f'file = "{secrets}"'))
        output = _run(*serve, str(bad))
        assert "[exit 78]" in output and "secrets.file" in output
        seen.append(output)

    # 2. A successful start (one PIN from the environment, the others from the file).
    gateway = VerboseGateway(config, env={**DEBUG_ENV, "HSMGW_PIN_USE1_B": pins["use1-b"]["user_pin"]}).start()
    try:
        with tls_channel(gateway.target, own, "root") as root_ch, \
                tls_channel(gateway.target, own, "nobody") as nobody_ch:
            root, nobody = Client.of(root_ch), Client.of(nobody_ch)
            # 3. Operations that work...
            ids = {}
            for name, algorithm in (("ec", pb.KEY_ALGORITHM_EC_P256), ("rsa", pb.KEY_ALGORITHM_RSA_2048),
                                    ("aes", pb.KEY_ALGORITHM_AES_256), ("hmac", pb.KEY_ALGORITHM_HMAC_SHA256)):
                key_id = unique(f"hygiene/{name}")
                root.crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, algorithm=algorithm,
                                                              replication=pb.ReplicationPolicy(copies=1)), timeout=60)
                ids[name] = key_id
            digest = hashlib.sha256(b"hygiene").digest()
            root.crypto.Sign(pb.SignRequest(key_id=ids["ec"], algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=digest),
                             timeout=10)
            sealed = root.crypto.Encrypt(pb.EncryptRequest(key_id=ids["aes"], algorithm=pb.ALGORITHM_AES_GCM,
                                                           plaintext=b"secret data"), timeout=10)
            root.crypto.Mac(pb.MacRequest(key_id=ids["hmac"], algorithm=pb.ALGORITHM_HMAC_SHA256, data=b"d"),
                            timeout=10)
            root.admin.ListClusters(admin_pb2.ListClustersRequest(), timeout=10)
            # ...and failures of every kind.
            tampered = sealed.ciphertext[:-1] + bytes([sealed.ciphertext[-1] ^ 1])  # never the ciphertext itself
            failures = [
                lambda: root.crypto.Decrypt(pb.DecryptRequest(key_id=ids["aes"], algorithm=pb.ALGORITHM_AES_GCM,
                                                              ciphertext=tampered, iv=sealed.iv), timeout=10),
                lambda: root.crypto.Sign(pb.SignRequest(key_id=ids["aes"], algorithm=pb.ALGORITHM_ECDSA_SHA256,
                                                        digest=digest), timeout=10),
                lambda: root.crypto.Sign(pb.SignRequest(key_id=ids["rsa"], algorithm=pb.ALGORITHM_RSA_PSS_SHA256,
                                                        digest=b"short"), timeout=10),
                lambda: root.crypto.GetKey(pb.GetKeyRequest(key_id="hygiene/missing"), timeout=10),
                lambda: root.crypto.GenerateKey(pb.GenerateKeyRequest(request_id="x", key_id=ids["ec"],
                                                                      algorithm=pb.KEY_ALGORITHM_RSA_2048), timeout=10),
                lambda: nobody.crypto.Sign(pb.SignRequest(key_id=ids["ec"]), timeout=10),
                lambda: nobody.admin.ListClusters(admin_pb2.ListClustersRequest(), timeout=10),
                lambda: root.channel.unary_unary("/hsmgw.v1.CryptoService/Decrypt")(b"\x0a\x01\xff", timeout=10),
            ]
            for attempt in failures:
                with pytest.raises(grpc.RpcError) as info:
                    attempt()
                seen += [info.value.details() or "", info.value.debug_error_string()]

            # 4. Reloads with broken TLS files and a broken policy, then good ones again.
            good_key = own.server_key.read_bytes()
            _, other_key = issue_server(load_issuer(own.ca, own.ca_key))
            write_file(own.server_key, other_key, private=True)
            sighup_and_wait(gateway, "TLS reload refused")
            os.chmod(own.server_key, 0o644)
            sighup_and_wait(gateway, "TLS reload refused")
            own.server_key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
            os.chmod(own.server_key, 0o600)
            sighup_and_wait(gateway, "TLS reload refused")
            write_file(own.server_key, good_key, private=True)
            policy.write_text(POLICY + "\n[roles.broken\n")
            sighup_and_wait(gateway, "policy reload refused")
            policy.write_text(POLICY)
            sighup_and_wait(gateway, "TLS reloaded")

        # 5. The operator CLI, with its certificate, and refused.
        for client in ("operator", "nobody"):
            cert, key = own.client(client)
            seen.append(_run("-m", "gateway.cli.hsmctl", "--target", gateway.target, "--ca", str(own.ca),
                             "--cert", str(cert), "--key", str(key), "clusters"))
    finally:
        gateway.stop()
    seen.append(gateway.log())
    assert "TLS reload refused" in gateway.log() and "policy reload refused" in gateway.log()

    # 6. The scan.
    text = "\n".join(seen)
    assert len(text) > 10_000, "the scenario produced the logs it should have"
    secrets = _pins(sec_fleet)
    for pin in secrets:
        assert pin not in text, "a PIN appears in a log line or an error message"
    keys = [own.server_key, own.ca_key, *(k for _, k in own.clients.values()), certs.server_key]
    leaked = [fragment for fragment in _key_fragments(keys) if fragment in text]
    assert not leaked, f"private key material appears in the output: {leaked[:1]}"
    assert "PRIVATE KEY" not in text

"""The replication wrapping key keeps keys in the HSM against whoever holds the crypto user's PIN.

Keys are extractable only under the trusted wrapping key; without an unwrap template on that
key, a PIN holder could wrap a key with it and unwrap it again as a non-sensitive object, and
read its value. And the wrapping key is a public object, so without CKA_PRIVATE = true in that
template, a process that never logged in could unwrap an EXTERNAL key's stored blob as a public
session object and use it. The fleet's wrapping key carries the template (router.pkcs11._guard),
and a gateway whose wrapping key lacks it, or lacks CKA_PRIVATE in it, says so at start.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11

from gateway.fleet import find_module
from hsmgw.v1 import crypto_pb2 as pb
from router.pkcs11._keys import WRAP_MECHANISM
from router.pkcs11.pool import WRAPPING_KEY_LABEL
from tests.support import ROOT, unique

CLUSTERS = ("use1-a", "use1-b", "usw2-a")


def _wrapping_key(session: Any) -> Any:
    return session.get_key(object_class=ObjectClass.SECRET_KEY, label=WRAPPING_KEY_LABEL)


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_every_clusters_wrapping_key_makes_unwrapped_keys_sensitive(tokens: Any, cluster: str) -> None:
    guard = tokens.module.unwrap_guard
    assert guard is not None
    assert guard.guards(_wrapping_key(tokens.session(cluster)))


@pytest.mark.parametrize("algorithm", [pb.KEY_ALGORITHM_AES_256, pb.KEY_ALGORITHM_HMAC_SHA256])
def test_a_pin_holder_cannot_unwrap_a_replicated_key_in_the_clear(crypto: Any, tokens: Any, algorithm: int) -> None:
    key_id = unique("guard")
    made = crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, algorithm=algorithm),
                              timeout=30)
    session = tokens.session(made.primary_cluster)
    [secret] = [o for o in tokens.objects(made.primary_cluster, key_id) if o.object_class == ObjectClass.SECRET_KEY]
    wrapping = _wrapping_key(session)
    wrapped = wrapping.wrap_key(secret, mechanism=WRAP_MECHANISM)  # allowed: the key is extractable so
    kind = KeyType.AES if algorithm == pb.KEY_ALGORITHM_AES_256 else KeyType.GENERIC_SECRET
    for template in ({Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
                     {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True, Attribute.WRAP_WITH_TRUSTED: False},
                     {Attribute.PRIVATE: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True,
                      Attribute.WRAP_WITH_TRUSTED: True},
                     {Attribute.EXTRACTABLE: True}):
        with pytest.raises(p11.TemplateInconsistent):
            wrapping.unwrap_key(ObjectClass.SECRET_KEY, kind, wrapped, mechanism=WRAP_MECHANISM, store=False,
                                template=template)
    # As the gateway unwraps: sensitive, and only a trusted key may wrap it again.
    copy = wrapping.unwrap_key(ObjectClass.SECRET_KEY, kind, wrapped, mechanism=WRAP_MECHANISM, store=False,
                               template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True,
                                         Attribute.WRAP_WITH_TRUSTED: True})
    with pytest.raises(p11.AttributeSensitive):
        copy[Attribute.VALUE]


def test_external_keys_and_replication_still_work_under_the_template(crypto: Any) -> None:
    """Every unwrap the gateway makes (replicas, EXTERNAL keys as session objects) fits the template."""
    for storage in (pb.KEY_STORAGE_TOKEN, pb.KEY_STORAGE_EXTERNAL):
        key_id = unique("guarded")
        made = crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, storage=storage,
                                                        algorithm=pb.KEY_ALGORITHM_AES_256), timeout=30)
        if storage == pb.KEY_STORAGE_TOKEN:
            assert made.replicas, "a DR copy was made (wrapped on its primary, unwrapped on the replica)"
        sealed = crypto.Encrypt(pb.EncryptRequest(key_id=key_id, algorithm=pb.ALGORITHM_AES_GCM, plaintext=b"p"),
                                timeout=10)
        opened = crypto.Decrypt(pb.DecryptRequest(key_id=key_id, algorithm=pb.ALGORITHM_AES_GCM,
                                                  ciphertext=sealed.ciphertext, iv=sealed.iv), timeout=10)
        assert opened.plaintext == b"p"


NO_LOGIN = textwrap.dedent("""
    # Knows no PIN and never logs in: unwraps an EXTERNAL key's blob, as read from the placement
    # store, with the (public) wrapping key, and signs with what it gets.
    import hashlib, json, sys
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11 import exceptions as p11
    from router.model import KeyAlgorithm, KeyUsage
    from router.pkcs11 import _keys, load_module
    from router.pkcs11.pool import WRAPPING_KEY_LABEL

    module_path, cluster, wrapped = sys.argv[1], sys.argv[2], bytes.fromhex(sys.stdin.read())
    session = load_module(module_path).token(cluster).open(rw=True)
    wrapping = session.get_key(object_class=ObjectClass.SECRET_KEY, label=WRAPPING_KEY_LABEL)
    outcomes = {}
    for private in (False, True):
        template = _keys._modifiable_last({**_keys.unwrap_template(KeyAlgorithm.EC_P256, KeyUsage.SIGN_VERIFY),
                                           Attribute.PRIVATE: private})
        try:
            key = wrapping.unwrap_key(ObjectClass.PRIVATE_KEY, KeyType.EC, wrapped, mechanism=_keys.WRAP_MECHANISM,
                                      store=False, template=template)
            key.sign(hashlib.sha256(b"no PIN").digest(), mechanism=Mechanism.ECDSA)
            outcomes[str(private)] = "signed"
        except p11.PKCS11Error as exc:
            outcomes[str(private)] = type(exc).__name__
    print(json.dumps(outcomes))
""")


def test_a_process_without_the_pin_cannot_unwrap_and_use_an_external_key(crypto: Any, fleet: Any) -> None:
    """The wrapping key is public (its SO made it), so a session that never logged in can use it:
    the unwrap template's CKA_PRIVATE = true is what keeps such a session from unwrapping a key
    it could then use. The blob is as anyone who reads the placement store has it."""
    from gateway.config import load
    from router.placement.sqlite import SqliteStore

    key_id = unique("nopin")
    made = crypto.GenerateKey(pb.GenerateKeyRequest(request_id=key_id, key_id=key_id, storage=pb.KEY_STORAGE_EXTERNAL,
                                                    algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=30)
    record = SqliteStore(load(fleet.config_path).store_path()).get(key_id)
    assert record is not None and record.wrapped
    # Only the fleet's tokens: no PIN in the environment, and nothing logged in (a new process).
    env = {k: v for k, v in os.environ.items() if "PIN" not in k.upper()} | {"SOFTHSM2_CONF": str(fleet.softhsm_conf)}
    out = subprocess.run([sys.executable, "-c", NO_LOGIN, find_module(), made.primary_cluster], cwd=ROOT,
                         input=record.wrapped.hex(), capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    outcomes = json.loads(out.stdout)
    # As a public object, the template refuses it; as a private one, the token wants a login.
    assert outcomes == {"False": "TemplateInconsistent", "True": "UserNotLoggedIn"}, outcomes
    # The gateway, logged in, still signs with it.
    signed = crypto.Sign(pb.SignRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=bytes(32)),
                         timeout=10)
    assert crypto.Verify(pb.VerifyRequest(key_id=key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256, digest=bytes(32),
                                          signature=signed.signature), timeout=10).valid


UNGUARDED = textwrap.dedent("""
    import json, logging, sys
    from pathlib import Path
    from pkcs11 import Attribute, KeyType, ObjectClass
    from gateway.app import build_router
    from gateway.config import load
    from gateway.fleet import init_fleet
    from router.pkcs11 import load_module
    from router.pkcs11.pool import WRAPPING_KEY_LABEL

    fleet = init_fleet(Path(sys.argv[1]), listen="127.0.0.1:0")
    config = load(fleet.config_path)
    import os, tomllib
    os.environ.update(config.pkcs11.env)  # this fleet's tokens, not the caller's
    so_pin = tomllib.loads(fleet.secrets_path.read_text())["clusters"]["usw2-a"]["so_pin"]
    module = load_module(config.pkcs11.module)
    session = module.token("usw2-a").open(rw=True, so_pin=so_pin)
    old = session.get_key(object_class=ObjectClass.SECRET_KEY, label=WRAPPING_KEY_LABEL)
    old.destroy()
    key = {  # a wrapping key as a ceremony without the template (or with an older one) makes it
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES, Attribute.VALUE: bytes(32),
        Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
        Attribute.TRUSTED: True, Attribute.WRAP: True, Attribute.UNWRAP: True, Attribute.LABEL: WRAPPING_KEY_LABEL,
        Attribute.ID: WRAPPING_KEY_LABEL.encode()}
    template = json.loads(sys.argv[2])
    if template is None:
        session.create_object(key)
    else:
        from router.pkcs11._guard import CKA_UNWRAP_TEMPLATE
        module.unwrap_guard.create(session, {**key, CKA_UNWRAP_TEMPLATE: {int(k): v for k, v in template.items()}})
    session.close()
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
    build_router(config, reconcile_at_start=False).close()
""")


def _start_with_wrapping_key(tmp_path: Path, template: dict[int, bool] | None) -> list[str]:
    """The WARNING lines about the unwrap template of a gateway whose usw2-a wrapping key has ``template``."""
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}  # never the shared fleet's tokens
    out = subprocess.run([sys.executable, "-c", UNGUARDED, str(tmp_path / "fleet"), json.dumps(template)], cwd=ROOT,
                         capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    warned = [line for line in out.stdout.splitlines() if "unwrap template" in line]
    assert len(warned) == 1, out.stdout
    assert warned[0].startswith("WARNING cluster usw2-a: the replication wrapping key '_hsmgw/replication' has no "
                                "unwrap template"), warned
    assert "a new key cannot unwrap the EXTERNAL keys stored under this one" in warned[0], warned
    return warned


def test_a_wrapping_key_without_the_template_is_named_at_start(tmp_path: Path) -> None:
    [warned] = _start_with_wrapping_key(tmp_path, None)
    assert "in the clear" in warned and "never logged in" in warned and "deploy/README.md, section 2" in warned


def test_a_wrapping_key_whose_template_lacks_private_is_named_at_start(tmp_path: Path) -> None:
    """A wrapping key made with the template earlier gateways wrote, without CKA_PRIVATE = true:
    it keeps keys sensitive, but lets a process with no PIN unwrap and use EXTERNAL keys."""
    [warned] = _start_with_wrapping_key(
        tmp_path, {int(Attribute.SENSITIVE): True, int(Attribute.WRAP_WITH_TRUSTED): True})
    assert "never logged in" in warned and "EXTERNAL" in warned, warned
    assert "in the clear" not in warned, warned


class _UnreadableTemplate:
    """A module that answers CKR_DEVICE_ERROR when the wrapping key's unwrap template is read."""

    def __init__(self) -> None:
        self.reads = 0

    def missing(self, key: Any) -> frozenset[int]:
        self.reads += 1
        raise p11.DeviceError()


def test_a_wrapping_key_whose_template_cannot_be_read_is_named_and_the_cluster_still_starts(
    fleet: Any, tokens: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The check only warns: a module that fails the read says so (not that the template is
    missing), and the cluster serves."""
    import dataclasses
    import time
    import tomllib

    from gateway.config import load
    from router.pkcs11 import Pkcs11Cluster
    from router.secret import Secret

    [spec] = [s for s in load(fleet.config_path).clusters if s.name == "usw2-a"]
    pin = tomllib.loads(fleet.secrets_path.read_text())["clusters"]["usw2-a"]["user_pin"]
    tokens.session("usw2-a")  # the inspector holds the token's login; the pool shares it
    guard = _UnreadableTemplate()
    module = dataclasses.replace(tokens.module, unwrap_guard=guard)
    with caplog.at_level(logging.WARNING, logger="router.pkcs11.cluster"):
        cluster = Pkcs11Cluster(module, spec, Secret(pin))
    try:
        assert guard.reads == 1, "the check read the wrapping key's template"
        warned = [r.getMessage() for r in caplog.records if "unwrap template" in r.getMessage()]
        assert warned == ["cluster usw2-a: could not read the replication wrapping key's unwrap template "
                          "(DeviceError)"]
        assert len(cluster.random(16, time.monotonic() + 10)) == 16
    finally:
        cluster.close()

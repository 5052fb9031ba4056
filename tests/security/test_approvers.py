"""Separation of duties among approvers: a role may approve some kinds of change only
(``ApproveChange:<method>``), over mTLS, through a real gateway and its audit log."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from gateway.fleet import init_fleet
from gateway.tls import DevCerts
from hsmgw.v1 import admin_pb2 as apb
from hsmgw.v1 import crypto_pb2 as pb
from tests.security.helpers import Client, details, sid, tls_channel, write_config
from tests.support import GatewayProcess, rpc_error

POLICY = f"""\
[roles.root]
operations = ["*"]
prefixes = ["*"]
admin = ["*"]

[roles.drain-approver]          # approves drains and undrains, nothing else
admin = ["ListChanges", "ApproveChange:DrainCluster"]

[identities."{sid('root')}"]
roles = ["root"]

[identities."{sid('operator')}"]
roles = ["drain-approver"]
"""


def test_an_approver_of_drains_approves_drains_and_is_refused_a_key_destruction(
    certs: DevCerts, tmp_path: Path
) -> None:
    fleet = init_fleet(tmp_path / "fleet", listen="127.0.0.1:0")
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    gateway = GatewayProcess(write_config(fleet, "approvers", tls=certs, policy=policy)).start()
    channels = {name: tls_channel(gateway.target, certs, name) for name in ("root", "operator")}
    try:
        root, operator = (Client.of(channels[name]) for name in ("root", "operator"))
        drain = root.admin.DrainCluster(apb.DrainClusterRequest(cluster="use1-b", drain=True), timeout=30)
        assert drain.state == "pending"
        assert operator.admin.ApproveChange(apb.ApproveChangeRequest(id=drain.id), timeout=60).state == "applied"
        [cluster] = [c for c in root.admin.ListClusters(apb.ListClustersRequest(), timeout=10).clusters
                     if c.name == "use1-b"]
        assert cluster.draining

        key = root.crypto.GenerateKey(pb.GenerateKeyRequest(request_id="r-kept", key_id="payments/kept",
                                                            algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=60)
        destroy = root.admin.DestroyKey(apb.DestroyKeyChangeRequest(key_id=key.key_id), timeout=30)
        err = rpc_error(operator.admin.ApproveChange, apb.ApproveChangeRequest(id=destroy.id), timeout=30)
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
        assert err.details() == (
            f"identity {sid('operator')!r} may not approve change {destroy.id!r}, which DestroyKey asked for (its "
            "roles grant ApproveChange:DrainCluster; approving it needs ApproveChange or ApproveChange:DestroyKey)")
        info, _ = details(err)
        assert info is not None and info.reason == "PERMISSION_DENIED"
        assert info.metadata["operation"] == "admin:ApproveChange:DestroyKey"

        # Nothing happened to the change or the key: still pending, and the key signs.
        [still] = [c for c in operator.admin.ListChanges(apb.ListChangesRequest(), timeout=10).changes
                   if c.id == destroy.id]
        assert (still.state, list(still.approved_by)) == ("pending", [sid("root")])
        digest = hashlib.sha256(b"still here").digest()
        signed = root.crypto.Sign(pb.SignRequest(key_id=key.key_id, algorithm=pb.ALGORITHM_ECDSA_SHA256,
                                                 digest=digest), timeout=10)
        pem = root.crypto.GetPublicKey(pb.GetPublicKeyRequest(key_id=key.key_id), timeout=10).pem
        public = serialization.load_pem_public_key(pem.encode())
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signed.signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))

        unknown = rpc_error(operator.admin.ApproveChange, apb.ApproveChangeRequest(id="0000beef"), timeout=30)
        assert unknown.code() is grpc.StatusCode.NOT_FOUND, unknown.details()  # as for any approver

        undrain = root.admin.DrainCluster(apb.DrainClusterRequest(cluster="use1-b", drain=False), timeout=30)
        assert operator.admin.ApproveChange(apb.ApproveChangeRequest(id=undrain.id), timeout=60).state == "applied"

        records = [json.loads(r.json) for r in
                   root.admin.TailAudit(apb.TailAuditRequest(lines=200), timeout=10).records]
        [denied] = [r for r in records if r["action"] == "authz.denied" and r["target"] == destroy.id]
        assert (denied["actor"], denied["outcome"]) == (sid("operator"), "denied")
        assert denied["details"]["operation"] == "admin:ApproveChange:DestroyKey"
        assert denied["details"]["method"] == "/hsmgw.v1.AdminService/ApproveChange"
        assert denied["details"]["authenticated_by"] == "certificate" and denied["details"]["peer"]
        assert denied["details"]["message"] == err.details()
        approved = [r["target"] for r in records if r["action"] == "change_applied"]
        assert drain.id in approved and undrain.id in approved and destroy.id not in approved
    finally:
        for channel in channels.values():
            channel.close()
        gateway.stop()

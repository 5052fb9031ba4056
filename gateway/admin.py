"""``hsmgw.v1.AdminService``: what operators see about clusters and pools."""

from __future__ import annotations

import grpc

from gateway import status
from hsmgw.v1 import admin_pb2 as pb
from hsmgw.v1 import admin_pb2_grpc
from router.router import Router


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    def ListClusters(self, request: pb.ListClustersRequest, context: grpc.ServicerContext) -> pb.ListClustersResponse:
        try:
            counts = self.router.key_counts()
            clusters = []
            for name, backend in sorted(self.router.backends.items()):
                stats = backend.stats()
                clusters.append(
                    pb.ClusterStatus(
                        name=name,
                        region=backend.spec.region,
                        health="SERVING",
                        keys=counts.get(name, 0),
                        max_keys=backend.spec.max_keys,
                        sessions_open=stats.open,
                        sessions_in_use=stats.in_use,
                        pool_size=stats.size,
                    )
                )
            return pb.ListClustersResponse(clusters=clusters, home_region=self.router.topology.home_region)
        except Exception as exc:  # noqa: BLE001 - every failure gets a status
            status.abort(context, exc)

"""gRPC adapter of a trainer node: parse, call the node, convert."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from segtrain.trainer.v1 import trainer_pb2 as pb
from segtrain.trainer.v1 import trainer_pb2_grpc

from services.common import names
from services.common.auth import Role
from services.trainer_svc.node import TrainerNode

# Minimum role of each RPC (services.common.auth); an RPC missing here is refused.
ACCESS = {f"/segtrain.trainer.v1.TrainerService/{method}": role for method, role in {
    "RunJob": Role.SERVICE, "WatchJobRun": Role.SERVICE, "CancelJobRun": Role.SERVICE,
    "AnalyzeTiles": Role.SERVICE, "ExportModel": Role.SERVICE,
}.items()}


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, node: TrainerNode) -> None:
        self._node = node

    def RunJob(self, request: pb.RunJobRequest, context: grpc.ServicerContext) -> pb.RunJobResponse:
        accepted, rendezvous = self._node.run_job(request)
        return pb.RunJobResponse(accepted=accepted, rendezvous_endpoint=rendezvous)

    def WatchJobRun(self, request: pb.WatchJobRunRequest, context: grpc.ServicerContext
                    ) -> Iterator[pb.WatchJobRunResponse]:
        _check_run_name(request.job)
        for event in self._node.watch(request.job, request.attempt, request.after_source_seq, context.is_active):
            yield pb.WatchJobRunResponse(event=event)

    def CancelJobRun(self, request: pb.CancelJobRunRequest, context: grpc.ServicerContext
                     ) -> pb.CancelJobRunResponse:
        _check_run_name(request.job)
        return pb.CancelJobRunResponse(found=self._node.cancel(request.job, request.stop_early))

    def AnalyzeTiles(self, request: pb.AnalyzeTilesRequest, context: grpc.ServicerContext
                     ) -> pb.AnalyzeTilesResponse:
        return self._node.analyzer.analyze(request, context.is_active)

    def ExportModel(self, request: pb.ExportModelRequest, context: grpc.ServicerContext) -> pb.ExportModelResponse:
        return self._node.exporter.export(request, context.is_active)


def _check_run_name(name: str) -> None:
    """INVALID_ARGUMENT unless `name` is a job's or an analysis's name."""
    collection = names.ANALYSES if name.startswith(f"{names.ANALYSES}/") else names.JOBS
    names.parse_name(name, collection, field="job")

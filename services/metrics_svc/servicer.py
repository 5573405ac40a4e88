"""gRPC adapter of the metrics service: parse, call the service, convert."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from segtrain.metrics.v1 import metrics_pb2 as pb
from segtrain.metrics.v1 import metrics_pb2_grpc

from services.common.auth import Role
from services.metrics_svc.service import Heartbeat, MetricsService

# Minimum role of each RPC (services.common.auth); an RPC missing here is refused.
ACCESS = {f"/segtrain.metrics.v1.MetricsService/{method}": role for method, role in {
    "AppendJobEvents": Role.SERVICE, "ListJobEvents": Role.VIEWER, "GetJobHistory": Role.VIEWER,
    "WatchJobEvents": Role.VIEWER, "RenderJobCharts": Role.VIEWER,
}.items()}


class MetricsServicer(metrics_pb2_grpc.MetricsServiceServicer):
    def __init__(self, service: MetricsService) -> None:
        self._service = service

    def AppendJobEvents(self, request: pb.AppendJobEventsRequest, context: grpc.ServicerContext
                        ) -> pb.AppendJobEventsResponse:
        last_seq, last_source_seq = self._service.append(request.job, list(request.events))
        return pb.AppendJobEventsResponse(last_seq=last_seq, last_source_seq=last_source_seq)

    def ListJobEvents(self, request: pb.ListJobEventsRequest, context: grpc.ServicerContext
                      ) -> pb.ListJobEventsResponse:
        events, last_seq = self._service.list_events(request.job, request.after_seq, request.page_size)
        return pb.ListJobEventsResponse(events=events, last_seq=last_seq)

    def GetJobHistory(self, request: pb.GetJobHistoryRequest, context: grpc.ServicerContext) -> pb.JobHistory:
        epochs, final_state = self._service.history(request.job)
        return pb.JobHistory(job=request.job, epochs=epochs, final_state=final_state)  # type: ignore[arg-type]

    def WatchJobEvents(self, request: pb.WatchJobEventsRequest, context: grpc.ServicerContext
                       ) -> Iterator[pb.WatchJobEventsResponse]:
        include = request.include_batch_progress if request.HasField("include_batch_progress") else True
        for item in self._service.watch(request.job, request.after_seq, include_batch_progress=include,
                                        is_active=context.is_active):
            if isinstance(item, Heartbeat):
                yield pb.WatchJobEventsResponse(heartbeat=pb.Heartbeat(last_seq=item.last_seq))
            else:
                yield pb.WatchJobEventsResponse(event=item)

    def RenderJobCharts(self, request: pb.RenderJobChartsRequest, context: grpc.ServicerContext
                        ) -> pb.RenderJobChartsResponse:
        loss_png, iou_png = self._service.render_charts(list(request.jobs), request.width, request.height)
        return pb.RenderJobChartsResponse(loss_png=loss_png, iou_png=iou_png)

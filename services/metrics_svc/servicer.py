"""gRPC adapter of the metrics service (asyncio): parse, call the service, convert."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from segtrain.metrics.v1 import metrics_pb2 as pb
from segtrain.metrics.v1 import metrics_pb2_grpc

from services.common.auth import Role
from services.metrics_svc.hub import Published
from services.metrics_svc.service import Heartbeat, MetricsService

# Minimum role of each RPC (services.common.auth); an RPC missing here is refused.
ACCESS = {f"/segtrain.metrics.v1.MetricsService/{method}": role for method, role in {
    "AppendJobEvents": Role.SERVICE, "ListJobEvents": Role.VIEWER, "GetJobHistory": Role.VIEWER,
    "WatchJobEvents": Role.VIEWER, "RenderJobCharts": Role.VIEWER, "DeleteJobEvents": Role.SERVICE,
}.items()}
# Capacity user traffic cannot take (services.common.gate): what keeps jobs' state moving.
RESERVED = {f"/segtrain.metrics.v1.MetricsService/{method}" for method in ("AppendJobEvents", "DeleteJobEvents")}


class MetricsServicer(metrics_pb2_grpc.MetricsServiceServicer):
    def __init__(self, service: MetricsService) -> None:
        self._service = service

    async def AppendJobEvents(self, request: pb.AppendJobEventsRequest, context: grpc.aio.ServicerContext
                              ) -> pb.AppendJobEventsResponse:
        last_seq, last_source_seq = await self._service.append(request.job, list(request.events))
        return pb.AppendJobEventsResponse(last_seq=last_seq, last_source_seq=last_source_seq)

    async def ListJobEvents(self, request: pb.ListJobEventsRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ListJobEventsResponse:
        events, last_seq = await self._service.list_events(request.job, request.after_seq, request.page_size)
        return pb.ListJobEventsResponse(events=events, last_seq=last_seq)

    async def GetJobHistory(self, request: pb.GetJobHistoryRequest, context: grpc.aio.ServicerContext
                            ) -> pb.JobHistory:
        epochs, final_state = await self._service.history(request.job)
        return pb.JobHistory(job=request.job, epochs=epochs, final_state=final_state)  # type: ignore[arg-type]

    async def WatchJobEvents(self, request: pb.WatchJobEventsRequest, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.WatchJobEventsResponse | bytes]:
        """Live events go out as the hub serialized them (the gate's serializer sends bytes as is)."""
        include = request.include_batch_progress if request.HasField("include_batch_progress") else True
        async for item in self._service.watch(request.job, request.after_seq, include_batch_progress=include):
            if isinstance(item, Published):
                yield item.wire
            elif isinstance(item, Heartbeat):
                yield pb.WatchJobEventsResponse(heartbeat=pb.Heartbeat(last_seq=item.last_seq))
            else:
                yield pb.WatchJobEventsResponse(event=item)

    async def DeleteJobEvents(self, request: pb.DeleteJobEventsRequest, context: grpc.aio.ServicerContext
                              ) -> pb.DeleteJobEventsResponse:
        return pb.DeleteJobEventsResponse(deleted=await self._service.delete_log(request.job))

    async def RenderJobCharts(self, request: pb.RenderJobChartsRequest, context: grpc.aio.ServicerContext
                              ) -> pb.RenderJobChartsResponse:
        loss_png, iou_png = await self._service.render_charts(list(request.jobs), request.width, request.height)
        return pb.RenderJobChartsResponse(loss_png=loss_png, iou_png=iou_png)

"""The SDK's watch over a real gRPC server that cuts the stream: it resumes after the last event it
yielded on the codes a server or the network ends a healthy watch with (UNAVAILABLE,
RESOURCE_EXHAUSTED, and CANCELLED, which the client did not ask for: a burst of new streams gets
some cancelled by the transport before the service sees them, see the README's Benchmarks), so
every event comes exactly once; other codes are raised."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from segtrain.common.v1 import common_pb2
from segtrain.metrics.v1 import metrics_pb2, metrics_pb2_grpc
from segtrain.pipeline.v1 import pipeline_pb2, pipeline_pb2_grpc

from clients.sdk import Client

LAST = 5


class _Pipeline(pipeline_pb2_grpc.PipelineServiceServicer):
    def __init__(self) -> None:
        self.address = ""

    def GetServiceInfo(self, request: pipeline_pb2.GetServiceInfoRequest, context: grpc.ServicerContext
                       ) -> pipeline_pb2.ServiceInfo:
        return pipeline_pb2.ServiceInfo(metrics_address=self.address)


class _CuttingMetrics(metrics_pb2_grpc.MetricsServiceServicer):
    """A job of LAST events whose first watch ends with `code` after two of them."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code
        self.after: list[int] = []

    def WatchJobEvents(self, request: metrics_pb2.WatchJobEventsRequest, context: grpc.ServicerContext
                       ) -> Iterator[metrics_pb2.WatchJobEventsResponse]:
        self.after.append(request.after_seq)
        for seq in range(request.after_seq + 1, LAST + 1):
            if len(self.after) == 1 and seq == 3:
                context.abort(self.code, "cut by the test server")
            event = common_pb2.JobEvent(job=request.job, seq=seq)
            if seq == LAST:
                event.state_change.state = common_pb2.JOB_STATE_SUCCEEDED
            yield metrics_pb2.WatchJobEventsResponse(event=event)


@pytest.fixture()
def serve() -> Iterator[object]:
    servers: list[grpc.Server] = []

    def start(code: grpc.StatusCode) -> tuple[str, _CuttingMetrics]:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pipeline, metrics = _Pipeline(), _CuttingMetrics(code)
        pipeline_pb2_grpc.add_PipelineServiceServicer_to_server(pipeline, server)
        metrics_pb2_grpc.add_MetricsServiceServicer_to_server(metrics, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        pipeline.address = f"127.0.0.1:{port}"
        return pipeline.address, metrics

    yield start
    for server in servers:
        server.stop(0)


@pytest.mark.parametrize("code", [grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_a_cut_watch_resumes_after_its_last_event_and_sees_each_once(serve, code: grpc.StatusCode) -> None:  # type: ignore[no-untyped-def]
    address, metrics = serve(code)
    with Client(address) as client:
        seqs = [e.seq for e in client.watch("jobs/j-1")]
    assert seqs == list(range(1, LAST + 1))
    assert metrics.after == [0, 2], "resumed after the last event it had"


def test_a_refusal_is_raised_not_retried(serve) -> None:  # type: ignore[no-untyped-def]
    address, metrics = serve(grpc.StatusCode.PERMISSION_DENIED)
    with Client(address) as client, pytest.raises(grpc.RpcError) as info:
        list(client.watch("jobs/j-1"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and metrics.after == [0]

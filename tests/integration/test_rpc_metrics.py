"""The RPC interceptors (services/common/observability.py) count each call once under its method,
type and final status, refused and failed calls included, for unary calls and streams alike."""

from __future__ import annotations

import time

import grpc
import pytest
from prometheus_client import REGISTRY
from segtrain.metrics.v1 import metrics_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from tests.integration.conftest import MetricsServer, PipelineServer


def handled(service: str, method: str, kind: str, code: str) -> float:
    return REGISTRY.get_sample_value("grpc_server_handled_total", {
        "grpc_service": service, "grpc_method": method, "grpc_type": kind, "grpc_code": code}) or 0.0


def timed(service: str, method: str, kind: str) -> float:
    return REGISTRY.get_sample_value("grpc_server_handling_seconds_count", {
        "grpc_service": service, "grpc_method": method, "grpc_type": kind}) or 0.0


def test_each_call_is_counted_once_with_its_status(pipeline_server: PipelineServer,
                                                   metrics_server: MetricsServer) -> None:
    pipeline, metrics = "segtrain.pipeline.v1.PipelineService", "segtrain.metrics.v1.MetricsService"
    before = {code: handled(pipeline, "GetJob", "unary", code) for code in ("OK", "NOT_FOUND", "INVALID_ARGUMENT")}
    listed_before = handled(pipeline, "ListPipelines", "unary", "OK")
    for name, code in (("jobs/j-nope", grpc.StatusCode.NOT_FOUND), ("not a name", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as failed:
            pipeline_server.stub.GetJob(pb.GetJobRequest(name=name), timeout=10)
        assert failed.value.code() == code
    pipeline_server.stub.ListPipelines(pb.ListPipelinesRequest(), timeout=10)
    assert {code: handled(pipeline, "GetJob", "unary", code) - before[code] for code in before} == {
        "OK": 0, "NOT_FOUND": 1, "INVALID_ARGUMENT": 1}
    assert handled(pipeline, "ListPipelines", "unary", "OK") == listed_before + 1

    streams_before = handled(metrics, "WatchJobEvents", "server_stream", "NOT_FOUND")
    timed_before = timed(metrics, "WatchJobEvents", "server_stream")
    with pytest.raises(grpc.RpcError) as unknown:
        list(metrics_server.stub.WatchJobEvents(metrics_pb2.WatchJobEventsRequest(job="jobs/j-nope"), timeout=30))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    deadline = time.monotonic() + 5  # the client has the status a moment before the server's stream has ended
    while handled(metrics, "WatchJobEvents", "server_stream", "NOT_FOUND") == streams_before:
        assert time.monotonic() < deadline, "the refused stream was not counted"
        time.sleep(0.02)
    assert handled(metrics, "WatchJobEvents", "server_stream", "NOT_FOUND") == streams_before + 1
    assert timed(metrics, "WatchJobEvents", "server_stream") == timed_before + 1

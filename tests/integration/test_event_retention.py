"""Event-log retention over real gRPC: old logs go whole, long logs lose their oldest events, and
reading or watching from before what is held is OUT_OF_RANGE naming the first seq still held
(the SDK resumes from there), while numbering and idempotency go on."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from segtrain.metrics.v1 import metrics_pb2 as pb
from segtrain.metrics.v1 import metrics_pb2_grpc

from clients.sdk import Client, first_held_seq
from services.common.timeutil import utcnow
from services.metrics_svc import retention
from tests.integration.conftest import MetricsServer
from tests.integration.test_metrics_service import append, batch, final

KEEP = 20


@pytest.fixture
def cut() -> retention.Retention:
    return retention.Retention(days=90, max_events_per_job=KEEP)


def apply(metrics_server: MetricsServer, policy: retention.Retention) -> tuple[int, int]:
    return retention.apply(metrics_server.service._engine, policy)


def test_a_long_log_keeps_its_newest_events_and_says_where_it_starts(metrics_server: MetricsServer,
                                                                      cut: retention.Retention) -> None:
    append(metrics_server, *[batch(1, i) for i in range(1, 51)])
    assert apply(metrics_server, cut) == (0, 1)
    listed = metrics_server.stub.ListJobEvents(pb.ListJobEventsRequest(job="jobs/j-test", after_seq=30))
    assert [e.seq for e in listed.events] == list(range(31, 51))
    for call in (lambda: metrics_server.stub.ListJobEvents(pb.ListJobEventsRequest(job="jobs/j-test", after_seq=5)),
                 lambda: list(metrics_server.stub.WatchJobEvents(pb.WatchJobEventsRequest(job="jobs/j-test"),
                                                                 timeout=10))):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert "first seq still held is 31" in refused.value.details()
        assert first_held_seq(refused.value) == 31
    # Numbering goes on after the cut, and a retried append is still recognised.
    assert append(metrics_server, batch(1, 50), batch(1, 51)).last_seq == 51
    append(metrics_server, final(1))
    # The SDK's watch skips what is no longer held, from the first event that is.
    with Client("127.0.0.1:1") as client:
        client._metrics = metrics_pb2_grpc.MetricsServiceStub(metrics_server.channel)  # no pipeline to ask
        seqs = [e.seq for e in client.watch("jobs/j-test")]
    assert seqs == list(range(31, 53))


def test_a_log_whose_newest_event_is_old_goes_whole(metrics_server: MetricsServer) -> None:
    old = utcnow() - timedelta(days=100)
    stale = [batch(1, i) for i in range(1, 4)]
    for event in stale:
        event.event_time.FromDatetime(old)
    append(metrics_server, *stale, job="jobs/j-old")
    append(metrics_server, batch(1, 1), job="jobs/j-new")
    assert apply(metrics_server, retention.Retention(days=90, max_events_per_job=0)) == (1, 0)
    old_log = metrics_server.stub.ListJobEvents(pb.ListJobEventsRequest(job="jobs/j-old"))
    assert list(old_log.events) == [] and old_log.last_seq == 0
    assert len(metrics_server.stub.ListJobEvents(pb.ListJobEventsRequest(job="jobs/j-new")).events) == 1
    assert apply(metrics_server, retention.Retention(days=0, max_events_per_job=0)) == (0, 0)  # off: nothing goes

"""Two metrics service replicas over one database (SQLite and PostgreSQL), appending to one job at
once through real gRPC: every event is numbered once, gap-free, and no append fails."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from segtrain.common.v1 import common_pb2
from segtrain.metrics.v1 import metrics_pb2 as pb
from segtrain.metrics.v1 import metrics_pb2_grpc

from services.common.settings import MetricsSettings
from services.metrics_svc import app as metrics_app

WRITERS, APPENDS = 8, 25


def test_two_replicas_number_one_jobs_events_once_and_gap_free(database_url: str) -> None:
    replicas = [metrics_app.build(MetricsSettings(listen="127.0.0.1:0", database_url=database_url))
                for _ in range(2)]
    channels = []
    try:
        for server, _, _, _ in replicas:
            server.start()
        channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _, port, _, _ in replicas]
        stubs = [metrics_pb2_grpc.MetricsServiceStub(c) for c in channels]

        def writer(attempt: int) -> None:
            for i in range(APPENDS):  # each writer alternates between the replicas
                events = [common_pb2.JobEvent(attempt=attempt, source_seq=2 * i + k + 1,
                                              batch_progress=common_pb2.BatchProgress(batch=2 * i + k + 1))
                          for k in range(2)]
                stubs[(attempt + i) % 2].AppendJobEvents(pb.AppendJobEventsRequest(job="jobs/j-shared",
                                                                                   events=events), timeout=60)
        with ThreadPoolExecutor(WRITERS) as pool:
            list(pool.map(writer, range(1, WRITERS + 1)))  # any failed append raises here
        listed = []
        after = 0
        while True:
            page = stubs[0].ListJobEvents(pb.ListJobEventsRequest(job="jobs/j-shared", after_seq=after,
                                                                  page_size=1000)).events
            if not page:
                break
            listed += page
            after = page[-1].seq
        assert [e.seq for e in listed] == list(range(1, WRITERS * APPENDS * 2 + 1))
        assert len({(e.attempt, e.source_seq) for e in listed}) == len(listed)  # each stored once
    finally:
        for channel in channels:
            channel.close()
        for server, _, _, _ in replicas:
            server.stop(0).wait()


def test_a_watcher_of_one_replica_gets_what_another_appended(database_url: str) -> None:
    settings = MetricsSettings(listen="127.0.0.1:0", database_url=database_url, poll_interval_s=0.2,
                               heartbeat_interval_s=0.5)
    replicas = [metrics_app.build(settings) for _ in range(2)]
    channels = []
    try:
        for server, _, _, _ in replicas:
            server.start()
        channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _, port, _, _ in replicas]
        writer, reader = (metrics_pb2_grpc.MetricsServiceStub(c) for c in channels)
        job = "jobs/j-across"
        writer.AppendJobEvents(pb.AppendJobEventsRequest(job=job, events=[common_pb2.JobEvent(
            attempt=1, source_seq=1, batch_progress=common_pb2.BatchProgress(batch=1))]), timeout=30)
        stream = reader.WatchJobEvents(pb.WatchJobEventsRequest(job=job), timeout=60)
        received: list[tuple[int, float]] = []

        def read() -> None:
            for item in stream:
                if item.HasField("event"):
                    received.append((item.event.seq, time.monotonic()))
        reading = threading.Thread(target=read)
        reading.start()
        sent = {}
        for i in range(2, 6):  # live, through the other replica
            time.sleep(0.3)
            sent[i] = time.monotonic()
            writer.AppendJobEvents(pb.AppendJobEventsRequest(job=job, events=[common_pb2.JobEvent(
                attempt=1, source_seq=i, batch_progress=common_pb2.BatchProgress(batch=i))]), timeout=30)
        writer.AppendJobEvents(pb.AppendJobEventsRequest(job=job, events=[common_pb2.JobEvent(
            attempt=0, source_seq=1, state_change=common_pb2.StateChange(state=common_pb2.JOB_STATE_SUCCEEDED))]),
            timeout=30)
        reading.join(30)
        assert [seq for seq, _ in received] == [1, 2, 3, 4, 5, 6]  # all, once, in order; the stream ended
        lags = [at - sent[seq] for seq, at in received if seq in sent]
        assert max(lags) < 5.0, lags  # within a few poll intervals (bounded; not a timing test)
    finally:
        for channel in channels:
            channel.close()
        for server, _, _, _ in replicas:
            server.stop(0).wait()

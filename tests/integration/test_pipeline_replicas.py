"""Two pipeline replicas over one database, with one trainer node (the test's) and real gRPC: the
job's relay runs on one replica only, and when that replica dies the other takes the relay over
within the lease period and finishes the job from the last relayed event; the metrics log holds
every event once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from segtrain.common.v1 import common_pb2
from segtrain.metrics.v1 import metrics_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from clients.sdk import Client
from services.common.database import session_scope
from services.common.settings import StorageSettings
from services.pipeline_svc.tables import JobRow
from tests.integration.conftest import MetricsServer, PipelineServer, serving_pipeline
from tests.integration.fake_node import RefusingNode, wait_for_job

S = common_pb2
LEASE_S = 2.0


@pytest.fixture
def second(tmp_path: Path, s3_settings: StorageSettings, metrics_server: MetricsServer,
           pipeline_server: PipelineServer) -> Iterator[PipelineServer]:
    """Another replica of conftest's pipeline service, on the same database."""
    with serving_pipeline(tmp_path, s3_settings, metrics_server, relay_lease_s=LEASE_S) as replica:
        yield replica


def progress(job: str, seq: int) -> S.JobEvent:
    return S.JobEvent(job=job, attempt=1, source_seq=seq, progress=S.Progress(percent=float(seq)),
                      phase_change=S.PhaseChange(phase=S.PHASE_TRAINING))


def test_another_replica_takes_a_dead_ones_relay_over_and_nothing_is_lost_or_doubled(
        client: Client, training_set: pb.TrainingSet, node: RefusingNode, pipeline_server: PipelineServer,
        second: PipelineServer) -> None:
    first = pipeline_server.service
    first.scheduler._lease = second.service.scheduler._lease  # both replicas: the test's short lease
    job = client.create_job(pipeline="segmentation", training_set=training_set.name,
                            hyperparameters=S.Hyperparameters(architecture="upernet-convnext-cpu", epochs=1))
    sent = [progress(job.name, 1)]
    node.stream[job.name] = lambda attempt: list(sent)
    client.start_job(job.name)
    running = wait_for_job(client, job.name, {S.JOB_STATE_RUNNING})
    assert running.progress.percent == 1.0
    with session_scope(first.engine) as session:
        owner = session.get(JobRow, job.name.removeprefix("jobs/")).relay_owner  # type: ignore[union-attr]
    replicas = {first.scheduler.replica: first, second.service.scheduler.replica: second.service}
    holder = replicas.pop(owner)  # the replica that assigned the job follows it
    (survivor,) = replicas.values()
    assert job.name.removeprefix("jobs/") not in survivor.scheduler._relays  # one relay, on one replica

    # The holder dies: its threads stop, its lease is not given up, it renews nothing.
    holder._stopping.set()
    holder.scheduler.stop_relays()
    died = time.monotonic()
    sent += [progress(job.name, 2), S.JobEvent(job=job.name, attempt=1, source_seq=3, finished=S.JobFinished(
        state=S.JOB_STATE_FAILED, reason="out of memory (the test's)"))]
    done = wait_for_job(client, job.name, {S.JOB_STATE_FAILED}, timeout=30)
    took = time.monotonic() - died
    assert "out of memory (the test's)" in done.failure_reason
    print(f"relay taken over {took:.2f} s after its replica died (lease {LEASE_S} s)")
    assert took < LEASE_S + 10, took  # the lease lapsed, and the survivor's next passes took it
    events = client.metrics.ListJobEvents(metrics_pb2.ListJobEventsRequest(job=job.name)).events
    relayed = [(e.attempt, e.source_seq) for e in events if e.attempt == 1]
    assert relayed == [(1, 1), (1, 2), (1, 3)]  # each once, in order

"""The scheduler and the relay against a trainer node (a real gRPC server on port 0) that refuses
some jobs, or streams events it has no business sending: a job no node will take never holds back
the jobs queued behind it, and a node speaks only for the attempt it was given."""

from __future__ import annotations

import hashlib
import time

import grpc
import pytest
from segtrain.common.v1 import common_pb2
from segtrain.metrics.v1 import metrics_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from clients.sdk import Client
from services.common import object_keys
from services.common.settings import StorageSettings
from services.common.storage import ObjectStore
from tests.integration.conftest import PipelineServer
from tests.integration.fake_node import RefusingNode, wait_for_job

S = common_pb2


def _queued(client: Client, training_set: pb.TrainingSet, count: int) -> list[pb.Job]:
    params = S.Hyperparameters(architecture="upernet-convnext-cpu", epochs=1, batch_size=2)
    return [client.create_job(pipeline="segmentation", training_set=training_set.name, hyperparameters=params)
            for _ in range(count)]


def test_a_job_refused_for_good_fails_naming_why_and_the_next_one_runs(
        client: Client, training_set: pb.TrainingSet, node: RefusingNode) -> None:
    first, second = _queued(client, training_set, 2)
    node.refuse[first.name] = grpc.StatusCode.INVALID_ARGUMENT
    client.start_job(first.name)
    client.start_job(second.name)
    failed = wait_for_job(client, first.name, {S.JOB_STATE_FAILED})
    assert "refused the job (INVALID_ARGUMENT: refused by the test)" in failed.failure_reason
    assert failed.attempt == 0  # no attempt ran
    wait_for_job(client, second.name, {S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING})
    assert node.asked.count(first.name) == 1 and node.accepted == [second.name]


def test_a_job_the_nodes_keep_refusing_is_held_and_does_not_block_the_queue(
        client: Client, training_set: pb.TrainingSet, node: RefusingNode) -> None:
    older, newer = _queued(client, training_set, 2)
    node.refuse[older.name] = grpc.StatusCode.FAILED_PRECONDITION  # full or draining: worth retrying
    client.start_job(older.name)
    time.sleep(1.0)  # the older job is refused, and refused again, before the newer one queues
    client.start_job(newer.name)
    wait_for_job(client, newer.name, {S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING})
    waiting = client.get_job(older.name)
    assert waiting.state == S.JOB_STATE_QUEUED and waiting.attempt == 0  # refusals cost no attempt
    # Held 1 s, then 2 s, ...: a few tries in these seconds, not one per scheduling pass (0.2 s).
    assert 1 <= node.asked.count(older.name) <= 4, node.asked


@pytest.mark.parametrize("lie", ["another job", "another attempt", "a state change"])
def test_a_node_speaks_only_for_the_attempt_it_was_given(
        client: Client, training_set: pb.TrainingSet, node: RefusingNode, pipeline_server: PipelineServer,
        lie: str) -> None:
    (job,) = _queued(client, training_set, 1)

    def events(attempt: int) -> list[common_pb2.JobEvent]:
        honest = common_pb2.JobEvent(job=job.name, attempt=attempt, source_seq=1,
                                     progress=common_pb2.Progress(percent=1.0),
                                     phase_change=common_pb2.PhaseChange(phase=S.PHASE_TRAINING))
        forged = common_pb2.JobEvent(job=job.name, attempt=attempt, source_seq=2,
                                     progress=common_pb2.Progress(percent=2.0),
                                     phase_change=common_pb2.PhaseChange(phase=S.PHASE_TRAINING))
        if lie == "another job":
            forged.job = "jobs/someone-elses"
        elif lie == "another attempt":
            forged.attempt = attempt + 5
        else:
            forged.state_change.CopyFrom(common_pb2.StateChange(state=S.JOB_STATE_SUCCEEDED))
        return [honest, forged]
    node.stream[job.name] = events
    client.start_job(job.name)
    failed = wait_for_job(client, job.name, {S.JOB_STATE_FAILED}, timeout=60)  # every attempt lies: out of attempts
    reasons = [e.state_change.reason for e in client.watch(job.name) if e.HasField("state_change")]
    expected = "state change" if lie == "a state change" else "sent an event of"
    assert any(expected in r for r in reasons), reasons
    assert failed.latest_metrics.epoch == 0 and failed.progress.percent <= 1.0  # the forged event changed nothing
    others = client.metrics.ListJobEvents(metrics_pb2.ListJobEventsRequest(job="jobs/someone-elses")).events
    assert list(others) == []  # nothing was appended to another job's log


@pytest.mark.parametrize("stored", ["as reported", "replaced", "missing"])
def test_a_model_is_registered_only_from_weights_that_match_their_sha256(
        client: Client, training_set: pb.TrainingSet, node: RefusingNode, s3_settings: StorageSettings,
        stored: str) -> None:
    (job,) = _queued(client, training_set, 1)
    store = ObjectStore(s3_settings)
    weights = b"weights of the attempt" * 100

    def events(attempt: int) -> list[common_pb2.JobEvent]:
        prefix = object_keys.attempt_prefix(job.name.removeprefix("jobs/"), attempt)
        artifacts = {}
        for kind in ("best", "final"):
            key = object_keys.model_weights(prefix, kind)
            if stored != "missing":
                store.put(key, weights if stored == "as reported" else b"something else")
            artifacts[kind] = common_pb2.Artifact(uri=key, sha256=hashlib.sha256(weights).hexdigest(),
                                                  size_bytes=len(weights))
        return [common_pb2.JobEvent(job=job.name, attempt=attempt, source_seq=1, finished=common_pb2.JobFinished(
            state=S.JOB_STATE_SUCCEEDED, best_model=artifacts["best"], final_model=artifacts["final"]))]
    node.stream[job.name] = events
    client.start_job(job.name)
    final = wait_for_job(client, job.name, {S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED}, timeout=30)
    if stored == "as reported":
        assert final.state == S.JOB_STATE_SUCCEEDED and final.model
    else:
        assert final.state == S.JOB_STATE_FAILED and not final.model
        expected = "do not match the sha256" if stored == "replaced" else "are not in storage"
        assert expected in final.failure_reason, final.failure_reason

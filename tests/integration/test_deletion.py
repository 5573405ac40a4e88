"""Deleting sets, jobs and models through real gRPC: never anything still in use, and everything
a deleted resource stored goes with it. A successful job keeps only its model's weights."""

from __future__ import annotations

import hashlib
import time

import grpc
import pytest
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from clients.sdk import Client
from services.common import object_keys
from services.common.settings import StorageSettings
from services.common.storage import ObjectStore
from tests.helpers import error_of
from tests.integration.fake_node import RefusingNode, wait_for_job

S = common_pb2
PARAMS = S.Hyperparameters(architecture="upernet-convnext-cpu", epochs=1, batch_size=2)


@pytest.fixture
def store(s3_settings: StorageSettings) -> ObjectStore:
    return ObjectStore(s3_settings)


def succeeded_job(client: Client, training_set: pb.TrainingSet, node: RefusingNode, store: ObjectStore) -> pb.Job:
    """A job whose node writes a rolling checkpoint and both weights, then reports success."""
    job = client.create_job(pipeline="segmentation", training_set=training_set.name, hyperparameters=PARAMS)
    weights = b"weights" * 100

    def events(attempt: int) -> list[S.JobEvent]:
        prefix = object_keys.attempt_prefix(job.name.removeprefix("jobs/"), attempt)
        store.put(object_keys.state_checkpoint(prefix), b"rolling state")
        artifacts = {}
        for kind in ("best", "final"):
            key = object_keys.model_weights(prefix, kind)  # type: ignore[arg-type]
            store.put(key, weights)
            artifacts[kind] = S.Artifact(uri=key, sha256=hashlib.sha256(weights).hexdigest(), size_bytes=len(weights))
        return [S.JobEvent(job=job.name, attempt=attempt, source_seq=1, finished=S.JobFinished(
            state=S.JOB_STATE_SUCCEEDED, best_model=artifacts["best"], final_model=artifacts["final"]))]
    node.stream[job.name] = events
    client.start_job(job.name)
    done = wait_for_job(client, job.name, {S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED})
    assert done.state == S.JOB_STATE_SUCCEEDED, done.failure_reason
    return done


def keys(store: ObjectStore, prefix: str) -> set[str]:
    return set(store.list_keys(prefix))


def test_a_successful_job_keeps_only_its_models_weights(
        client: Client, training_set: pb.TrainingSet, node: RefusingNode, store: ObjectStore) -> None:
    job = succeeded_job(client, training_set, node, store)
    model = client.get_model(job.model)
    job_prefix = object_keys.job_prefix(job.name.removeprefix("jobs/"))
    deadline = time.monotonic() + 10  # the relay tidies up right after it records the success
    while keys(store, job_prefix) != {model.weights.uri, model.final_weights.uri}:
        assert time.monotonic() < deadline, keys(store, job_prefix)  # the checkpoint and tile manifest go
        time.sleep(0.1)


def test_nothing_in_use_is_deleted_and_a_deleted_resource_takes_its_objects(
        client: Client, training_set: pb.TrainingSet, node: RefusingNode, store: ObjectStore) -> None:
    parent = succeeded_job(client, training_set, node, store)
    model = client.get_model(parent.model)
    child = client.create_job(pipeline="segmentation", training_set=training_set.name, from_model=model.name)
    set_prefix = object_keys.training_set_prefix(training_set.name.removeprefix("trainingSets/"))
    assert keys(store, set_prefix)

    def refused(call: object, *args: str) -> str:
        error = error_of(call, *args)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        return error.details()
    # The child (PENDING: not ended) starts from the model and uses the set.
    assert child.name in refused(client.delete_model, model.name)
    assert child.name in refused(client.delete_training_set, training_set.name)
    assert "PENDING" in refused(client.delete_job, child.name)  # not ended
    assert model.name in refused(client.delete_job, parent.name)  # its model holds weights under its keys
    assert client.get_model(model.name).name == model.name and keys(store, set_prefix)  # all still there

    client.cancel_job(child.name)
    client.delete_job(child.name)
    assert error_of(client.get_job, child.name).code() == grpc.StatusCode.NOT_FOUND
    client.delete_model(model.name)
    assert error_of(client.get_model, model.name).code() == grpc.StatusCode.NOT_FOUND
    assert not store.exists(model.weights.uri) and not store.exists(model.final_weights.uri)
    assert client.get_job(parent.name).model == ""
    client.delete_job(parent.name)
    assert keys(store, object_keys.job_prefix(parent.name.removeprefix("jobs/"))) == set()
    client.delete_training_set(training_set.name)
    assert keys(store, set_prefix) == set()
    assert error_of(client.get_training_set, training_set.name).code() == grpc.StatusCode.NOT_FOUND
    assert error_of(client.delete_training_set, training_set.name).code() == grpc.StatusCode.NOT_FOUND
    gone = error_of(client.create_job, pipeline="segmentation", training_set=training_set.name)
    assert gone.code() == grpc.StatusCode.NOT_FOUND


def test_a_deleted_jobs_event_log_goes_from_the_metrics_service_too(
        client: Client, training_set: pb.TrainingSet, node: RefusingNode, store: ObjectStore) -> None:
    from segtrain.metrics.v1 import metrics_pb2

    def log(job: pb.Job) -> list[int]:
        return [e.seq for e in client.metrics.ListJobEvents(metrics_pb2.ListJobEventsRequest(job=job.name)).events]

    kept, deleted = (succeeded_job(client, training_set, node, store) for _ in range(2))
    held = log(kept)
    assert held and log(deleted), "both jobs have logs"
    client.delete_model(deleted.model)
    client.delete_job(deleted.name)
    deadline = time.monotonic() + 10  # the outbox relay asks the metrics service right after the delete
    while log(deleted):
        assert time.monotonic() < deadline, "the deleted job's log is still held"
        time.sleep(0.1)
    assert log(kept) == held, "another job's log is untouched"

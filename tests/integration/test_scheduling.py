"""The scheduler and the relay against a trainer node (a real gRPC server on port 0) that refuses
some jobs, or streams events it has no business sending: a job no node will take never holds back
the jobs queued behind it, and a node speaks only for the attempt it was given."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest
from segtrain.common.v1 import common_pb2
from segtrain.metrics.v1 import metrics_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb
from segtrain.trainer.v1 import trainer_pb2, trainer_pb2_grpc

from clients.sdk import Client
from services.common import object_keys
from services.common.settings import StorageSettings
from services.common.storage import ObjectStore
from tests.integration.conftest import PipelineServer

S = common_pb2


class RefusingNode(trainer_pb2_grpc.TrainerServiceServicer):
    """Refuses RunJob of the jobs in `refuse` with their code, accepts the others (and then
    streams nothing until the stream is cancelled); heartbeats what it accepted."""

    def __init__(self) -> None:
        self.refuse: dict[str, grpc.StatusCode] = {}
        # What WatchJobRun streams for a job (given its attempt), before it waits.
        self.stream: dict[str, Callable[[int], list[common_pb2.JobEvent]]] = {}
        self.asked: list[str] = []
        self.accepted: list[str] = []

    def RunJob(self, request: trainer_pb2.RunJobRequest, context: grpc.ServicerContext
               ) -> trainer_pb2.RunJobResponse:
        self.asked.append(request.job)
        code = self.refuse.get(request.job)
        if code is not None:
            context.abort(code, "refused by the test")
        self.accepted.append(request.job)
        return trainer_pb2.RunJobResponse()

    def WatchJobRun(self, request: trainer_pb2.WatchJobRunRequest, context: grpc.ServicerContext
                    ) -> Iterator[trainer_pb2.WatchJobRunResponse]:
        events = self.stream.get(request.job, lambda attempt: [])(request.attempt)
        for event in events[request.after_source_seq:]:
            yield trainer_pb2.WatchJobRunResponse(event=event)
        while context.is_active():
            time.sleep(0.05)


@pytest.fixture
def node(pipeline_server: PipelineServer) -> Iterator[RefusingNode]:
    fake = RefusingNode()
    server = grpc.server(futures.ThreadPoolExecutor(8))
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stub = pipeline_server.stub
    stub.RegisterTrainerNode(pb.RegisterTrainerNodeRequest(
        node_id="refusing", address=f"127.0.0.1:{port}", capacity=1, device="cpu", job_memory_bytes=64 * 2**30,
        max_processes=1), timeout=10)
    stopping = threading.Event()

    def heartbeat() -> None:
        while not stopping.wait(0.3):
            stub.HeartbeatTrainerNode(pb.HeartbeatTrainerNodeRequest(
                name="trainerNodes/refusing", jobs=list(fake.accepted)), timeout=10)
    beating = threading.Thread(target=heartbeat, daemon=True)
    beating.start()
    try:
        yield fake
    finally:
        stopping.set()
        beating.join(5)
        server.stop(0).wait()


def _queued(client: Client, training_set: pb.TrainingSet, count: int) -> list[pb.Job]:
    params = S.Hyperparameters(architecture="upernet-convnext-cpu", epochs=1, batch_size=2)
    return [client.create_job(pipeline="segmentation", training_set=training_set.name, hyperparameters=params)
            for _ in range(count)]


def _wait(client: Client, name: str, states: set[int], timeout: float = 20) -> pb.Job:
    deadline = time.monotonic() + timeout
    while (job := client.get_job(name)).state not in states:
        assert time.monotonic() < deadline, f"{name} still {S.JobState.Name(job.state)}"
        time.sleep(0.1)
    return job


def test_a_job_refused_for_good_fails_naming_why_and_the_next_one_runs(
        client: Client, training_set: pb.TrainingSet, node: RefusingNode) -> None:
    first, second = _queued(client, training_set, 2)
    node.refuse[first.name] = grpc.StatusCode.INVALID_ARGUMENT
    client.start_job(first.name)
    client.start_job(second.name)
    failed = _wait(client, first.name, {S.JOB_STATE_FAILED})
    assert "refused the job (INVALID_ARGUMENT: refused by the test)" in failed.failure_reason
    assert failed.attempt == 0  # no attempt ran
    _wait(client, second.name, {S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING})
    assert node.asked.count(first.name) == 1 and node.accepted == [second.name]


def test_a_job_the_nodes_keep_refusing_is_held_and_does_not_block_the_queue(
        client: Client, training_set: pb.TrainingSet, node: RefusingNode) -> None:
    older, newer = _queued(client, training_set, 2)
    node.refuse[older.name] = grpc.StatusCode.FAILED_PRECONDITION  # full or draining: worth retrying
    client.start_job(older.name)
    time.sleep(1.0)  # the older job is refused, and refused again, before the newer one queues
    client.start_job(newer.name)
    _wait(client, newer.name, {S.JOB_STATE_ASSIGNED, S.JOB_STATE_RUNNING})
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
    failed = _wait(client, job.name, {S.JOB_STATE_FAILED}, timeout=60)  # every attempt lies: out of attempts
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
    final = _wait(client, job.name, {S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED}, timeout=30)
    if stored == "as reported":
        assert final.state == S.JOB_STATE_SUCCEEDED and final.model
    else:
        assert final.state == S.JOB_STATE_FAILED and not final.model
        expected = "do not match the sha256" if stored == "replaced" else "are not in storage"
        assert expected in final.failure_reason, final.failure_reason

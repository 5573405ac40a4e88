"""Data-parallel jobs on the local stack: a job across two trainer nodes, one rank's node killed
mid-epoch, and a worker out of memory next to jobs that go on."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from clients.sdk import Client
from clients.stack import LocalStack
from tests.e2e.conftest import wait_for_state
from tests.e2e.test_faults import CLASSES, node_process
from tests.helpers import write_sample_set

pytestmark = pytest.mark.e2e
S = common_pb2
DONE = {S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    # Workers held to 1.5 GB: the tiny model fits, ConvNeXt-B's optimiser state does not.
    with LocalStack(tmp_path_factory.mktemp("parallel"), trainers=2, env_overrides={
        "SEGTRAIN_TRAINER_NUM_THREADS": "1", "SEGTRAIN_PIPELINE_HEARTBEAT_INTERVAL_S": "1",
        "SEGTRAIN_PIPELINE_SCHEDULE_INTERVAL_S": "0.3", "SEGTRAIN_METRICS_HEARTBEAT_INTERVAL_S": "0.5",
        "SEGTRAIN_TRAINER_DATA_WORKERS": "0", "SEGTRAIN_TRAINER_WORKER_MEMORY_LIMIT_MB": "1500",
    }) as running:
        yield running


@pytest.fixture(scope="module")
def client(stack: LocalStack) -> Iterator[Client]:
    with Client(stack.pipeline_address, token=stack.tokens["trainer"]) as c:
        yield c


@pytest.fixture(scope="module")
def training_set(client: Client, tmp_path_factory: pytest.TempPathFactory) -> pb.TrainingSet:
    images, masks = write_sample_set(tmp_path_factory.mktemp("set"), count=16, tile_size=96, seed=11)
    return client.create_training_set("parallel", images, masks, class_names=CLASSES)


def start(client: Client, training_set: pb.TrainingSet, *, epochs: int, nodes: int = 1,
          architecture: str = "upernet-convnext-cpu") -> str:
    job = client.create_job(pipeline="segmentation", training_set=training_set.name, nodes=nodes,
                            hyperparameters=S.Hyperparameters(architecture=architecture, epochs=epochs, batch_size=4,
                                                              learning_rate=0.005))
    client.start_job(job.name)
    return job.name


def test_a_two_node_job_trains_across_both_nodes_and_registers_one_model(
        client: Client, training_set: pb.TrainingSet) -> None:
    name = start(client, training_set, epochs=3, nodes=2)
    running = wait_for_state(client, name, {S.JOB_STATE_RUNNING} | DONE, 120)
    assert len(set(running.trainer_nodes)) == 2 and running.trainer_nodes[0] == running.trainer_node
    done = wait_for_state(client, name, DONE, 300)
    assert done.state == S.JOB_STATE_SUCCEEDED, done.failure_reason
    assert (done.parallelism.processes, done.parallelism.nodes) == (1, 2)
    assert [m.epoch for m in client.history(name).epochs] == [1, 2, 3]
    model = client.pipeline.GetModel(pb.GetModelRequest(name=done.model))
    assert model.environment["processes"] == "2"  # world size: one process on each of two nodes


def test_kill_9_of_one_ranks_node_requeues_and_the_job_completes_with_each_epoch_once(
        stack: LocalStack, client: Client, training_set: pb.TrainingSet) -> None:
    name = start(client, training_set, epochs=40, nodes=2)
    wait_for_state(client, name, {S.JOB_STATE_RUNNING}, 120)
    while client.get_job(name).latest_metrics.epoch < 2:
        time.sleep(0.05)
    running = client.get_job(name)
    other = running.trainer_nodes[1]  # rank 1's node: rank 0 must notice through the group
    stack.processes[node_process(stack, other)].kill()
    stack.add_trainer()  # two nodes again, for the re-queued attempt
    done = wait_for_state(client, name, DONE, 300)
    assert done.state == S.JOB_STATE_SUCCEEDED, done.failure_reason
    reasons = [e.state_change.reason for e in client.watch(name) if e.HasField("state_change")]
    assert done.attempt >= 2, reasons
    assert other not in done.trainer_nodes
    assert [m.epoch for m in client.history(name).epochs] == list(range(1, 41)), "each epoch exactly once"


def test_a_worker_out_of_memory_fails_saying_what_to_change_and_the_node_runs_on(
        stack: LocalStack, client: Client, training_set: pb.TrainingSet) -> None:
    deadline = time.monotonic() + 60
    while len(ready := _ready_nodes(stack)) < 2:  # this test may run first
        assert time.monotonic() < deadline, ready
        time.sleep(0.2)
    name = start(client, training_set, epochs=1, architecture="upernet-convnext-base")
    failed = wait_for_state(client, name, DONE, 300)
    assert failed.state == S.JOB_STATE_FAILED and failed.attempt == 1  # not retried: it would fail again
    assert failed.failure_reason.startswith("out of host memory") and "batch size" in failed.failure_reason
    # The node lives on: it heartbeats, and takes the next jobs (two at once: one lands on it).
    after = [start(client, training_set, epochs=1) for _ in range(2)]
    for job in after:
        finished = wait_for_state(client, job, DONE, 300)
        assert finished.state == S.JOB_STATE_SUCCEEDED, finished.failure_reason
    assert _ready_nodes(stack) == ready


def _ready_nodes(stack: LocalStack) -> set[str]:
    with Client(stack.pipeline_address, token=stack.tokens["admin"]) as admin:
        listed = admin.pipeline.ListTrainerNodes(pb.ListTrainerNodesRequest()).trainer_nodes
    return {n.name for n in listed if n.state == pb.TrainerNode.STATE_READY}

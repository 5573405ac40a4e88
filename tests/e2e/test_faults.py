"""Fault injection: trainer nodes SIGKILLed mid-epoch, and the pipeline and metrics services
restarted mid-job. No finished epoch is lost, each appears once, and the model is the best one."""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from clients.sdk import Client
from clients.stack import LocalStack
from services.common import object_keys
from services.common.settings import StorageSettings
from services.common.storage import ObjectStore
from tests.e2e.conftest import wait_for_state
from tests.helpers import write_sample_set

pytestmark = pytest.mark.e2e
CLASSES = ["background", "nucleus", "debris"]


@pytest.fixture
def two_node_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("faults"), trainers=2, env_overrides={
        "SEGTRAIN_TRAINER_NUM_THREADS": "1", "SEGTRAIN_PIPELINE_HEARTBEAT_INTERVAL_S": "1",
        "SEGTRAIN_PIPELINE_SCHEDULE_INTERVAL_S": "0.3", "SEGTRAIN_METRICS_HEARTBEAT_INTERVAL_S": "0.5",
    }) as stack:
        yield stack


def start_job(stack: LocalStack, tmp_path: Path, name: str, *, tiles: int, epochs: int, seed: int,
              **params: object) -> tuple[Client, str]:
    """A trainer's client and a started job of `epochs` on a fresh set of `tiles` 96² tiles."""
    client = Client(stack.pipeline_address, token=stack.tokens["trainer"])
    images, masks = write_sample_set(tmp_path / "set", count=tiles, tile_size=96, seed=seed)
    training_set = client.create_training_set(name, images, masks, class_names=CLASSES)
    job = client.create_job(pipeline="segmentation", training_set=training_set.name, hyperparameters=common_pb2.
                            Hyperparameters(architecture="upernet-convnext-cpu", epochs=epochs, batch_size=4,
                                            **params))  # type: ignore[arg-type]
    client.start_job(job.name)
    return client, job.name


def node_process(stack: LocalStack, node: str) -> str:
    """The stack's process name of "trainerNodes/local-N"."""
    return f"trainer-{node.rsplit('-', 1)[1]}"


def test_three_sigkills_within_one_job_lose_no_epoch(two_node_stack: LocalStack, tmp_path: Path) -> None:
    stack = two_node_stack
    client, name = start_job(stack, tmp_path, "faults", tiles=24, epochs=12, seed=5, learning_rate=0.005)
    job = client.get_job(name)
    watched: list[common_pb2.JobEvent] = []
    watcher = threading.Thread(target=lambda: watched.extend(client.watch(job.name)), daemon=True)
    watcher.start()
    kills = []
    for target_epoch in (2, 5, 8):
        running = wait_for_state(client, job.name, {common_pb2.JOB_STATE_RUNNING}, 120)
        while client.get_job(job.name).latest_metrics.epoch < target_epoch:
            time.sleep(0.05)
        time.sleep(0.15)  # into the next epoch
        node = client.get_job(job.name).trainer_node
        stack.processes[node_process(stack, node)].kill()  # SIGKILL: no goodbye, no checkpoint
        kills.append((running.attempt, node))
        stack.add_trainer()  # keep two nodes alive
    done = wait_for_state(client, job.name, {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED}, 300)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.failure_reason
    reasons = [e.state_change.reason for e in client.watch(job.name) if e.HasField("state_change")]
    assert done.attempt == 4, f"three kills mean four attempts, got {done.attempt}: {reasons}"

    history = client.history(job.name)
    assert [m.epoch for m in history.epochs] == list(range(1, 13)), "each epoch exactly once"
    model = client.pipeline.GetModel(pb.GetModelRequest(name=done.model))
    best = max(history.epochs, key=lambda m: m.val_iou)
    assert model.best_epoch == best.epoch and model.best_metrics.val_iou == pytest.approx(best.val_iou)

    watcher.join(30)
    assert [e.seq for e in watched] == list(range(1, len(watched) + 1))
    attempts = {e.attempt for e in watched if e.attempt}
    assert attempts == {1, 2, 3, 4}


def test_restarting_pipeline_and_metrics_mid_job_loses_nothing(two_node_stack: LocalStack, tmp_path: Path) -> None:
    stack = two_node_stack
    client, name = start_job(stack, tmp_path, "restarts", tiles=16, epochs=10, seed=6)
    job = client.get_job(name)
    seen: list[common_pb2.JobEvent] = []
    watcher = threading.Thread(target=lambda: seen.extend(client.watch(job.name)), daemon=True)
    watcher.start()
    for service in ("metrics", "pipeline"):
        wait_for_state(client, job.name, {common_pb2.JOB_STATE_RUNNING}, 120)
        time.sleep(1.0)
        # Down for several heartbeat leases: the node keeps training, and comes back to the
        # restarted service within its lease (the channel's reconnect backoff stays short).
        stack.restart(service, down_s=5.0)
    done = wait_for_state(client, job.name, {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED}, 300)
    reasons = [e.state_change.reason for e in client.watch(job.name) if e.HasField("state_change")]
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED and done.attempt == 1, (done.failure_reason, reasons)
    watcher.join(30)
    full = list(client.watch(job.name))
    assert [e.seq for e in seen] == [e.seq for e in full] == list(range(1, len(full) + 1))
    assert [m.epoch for m in client.history(job.name).epochs] == list(range(1, 11))


def test_sigterm_hands_the_job_back_to_another_node(two_node_stack: LocalStack, tmp_path: Path) -> None:
    stack = two_node_stack
    client, name = start_job(stack, tmp_path, "handback", tiles=16, epochs=8, seed=8)
    job = client.get_job(name)
    wait_for_state(client, job.name, {common_pb2.JOB_STATE_RUNNING}, 120)
    while client.get_job(job.name).latest_metrics.epoch < 2:
        time.sleep(0.05)
    node = client.get_job(job.name).trainer_node
    stack.processes[node_process(stack, node)].stop()  # SIGTERM: a graceful shutdown
    done = wait_for_state(client, job.name, {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED}, 300)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED and done.attempt == 2, done.failure_reason
    reasons = [e.state_change.reason for e in client.watch(job.name) if e.HasField("state_change")]
    assert any("handed the job back" in r for r in reasons), reasons
    assert [m.epoch for m in client.history(job.name).epochs] == list(range(1, 9))


def test_a_node_frozen_past_its_lease_wakes_to_find_its_job_moved_and_touches_nothing(
        two_node_stack: LocalStack, tmp_path: Path) -> None:
    """SIGSTOP freezes the node running a job past its lease: the job moves to the other node and
    succeeds there without waiting for the frozen node's stream to time out. The frozen node then
    wakes with its stale attempt still running; whatever it writes lies under its own attempt's
    keys, so the registered model is the one whose sha256 was recorded, and it still loads."""
    stack = two_node_stack
    client, name = start_job(stack, tmp_path, "frozen", tiles=16, epochs=4, seed=9)
    wait_for_state(client, name, {common_pb2.JOB_STATE_RUNNING}, 120)
    while client.get_job(name).latest_metrics.epoch < 1:
        time.sleep(0.05)
    frozen = stack.processes[node_process(stack, client.get_job(name).trainer_node)].popen
    frozen.send_signal(signal.SIGSTOP)
    try:
        # Lease 3 s, keepalive ~40 s: a job that finishes well inside the keepalive did not wait on it.
        done = wait_for_state(client, name, {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED}, 35)
    finally:
        frozen.send_signal(signal.SIGCONT)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED and done.attempt == 2, done.failure_reason
    model = client.pipeline.GetModel(pb.GetModelRequest(name=done.model))
    job_id = name.rpartition("/")[2]
    assert model.weights.uri == object_keys.model_weights(object_keys.attempt_prefix(job_id, 2), "best")

    time.sleep(3)  # the woken node runs on until its next heartbeat tells it the job is not its own
    store = ObjectStore(StorageSettings(endpoint=stack.s3_endpoint, access_key=stack.access_key,
                                        secret_key=SecretStr(stack.secret_key)))
    assert hashlib.sha256(store.get(model.weights.uri)).hexdigest() == model.weights.sha256
    written = store.list_keys(object_keys.job_prefix(job_id))
    assert written and all(k.startswith(object_keys.job_prefix(job_id) + "attempts/") for k in written), written
    tile = sorted((tmp_path / "set" / "tiles").iterdir())[0]
    analysis = client.analyze(model.name, [tile], tmp_path / "masks-out")  # the node checks the sha256 on load
    assert len(analysis.tiles) == 1

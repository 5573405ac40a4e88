"""The local stack as separate processes, shared by the end-to-end tests of one session."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from clients.sdk import Client
from clients.stack import LocalStack
from services.common.settings import StorageSettings
from services.common.storage import ObjectStore
from tests.helpers import write_sample_set


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("stack"), env_overrides={
        "SEGTRAIN_TRAINER_NUM_THREADS": "1", "SEGTRAIN_PIPELINE_HEARTBEAT_INTERVAL_S": "1",
        "SEGTRAIN_METRICS_HEARTBEAT_INTERVAL_S": "0.5", "SEGTRAIN_LOG_FORMAT": "json",
    }) as running:
        yield running


@pytest.fixture(scope="session")
def client(stack: LocalStack) -> Iterator[Client]:
    with Client(stack.pipeline_address, token=stack.tokens["trainer"]) as c:
        yield c


@pytest.fixture(scope="session")
def stack_store(stack: LocalStack) -> ObjectStore:
    return ObjectStore(StorageSettings(endpoint=stack.s3_endpoint, access_key=stack.access_key,
                                       secret_key=SecretStr(stack.secret_key)))


# The classes of `trained_model`, whose set is write_sample_set's tiles.
CLASSES = ["background", "nucleus", "debris"]


@pytest.fixture(scope="session")
def trained_model(client: Client, tmp_path_factory: pytest.TempPathFactory) -> pb.Model:
    """A model of the CPU architecture trained for an epoch on 8 tiles of 64² (shared: analysis and
    export tests only read it)."""
    done = train(client, tmp_path_factory.mktemp("trained-model"), "e2e-trained", tiles=8, seed=5)
    return client.pipeline.GetModel(pb.GetModelRequest(name=done.model))


def train(client: Client, root: Path, name: str, *, tiles: int, seed: int) -> pb.Job:
    """A SUCCEEDED one-epoch job of the CPU architecture on a new set of `tiles` tiles of 64²."""
    images, masks = write_sample_set(root / "set", count=tiles, tile_size=64, seed=seed)
    training_set = client.create_training_set(name, images, masks, class_names=CLASSES)
    job = client.create_job(pipeline="segmentation", training_set=training_set.name,
                            hyperparameters=common_pb2.Hyperparameters(architecture="upernet-convnext-cpu", epochs=1,
                                                                       batch_size=4))
    client.start_job(job.name)
    done = wait_for_state(client, job.name, {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED}, 300)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.failure_reason
    return done


def wait_for_state(client: Client, job: str, states: set[int], timeout: float = 240) -> pb.Job:
    deadline = time.monotonic() + timeout
    while True:
        current = client.get_job(job)
        if current.state in states:
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"{job} stuck in {common_pb2.JobState.Name(current.state)}")
        time.sleep(0.3)

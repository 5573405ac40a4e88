"""Each job attempt runs in its own process group (torch.distributed's launcher): whatever the
worker does, the node survives it, reports the attempt with a reason that says what happened,
and goes on running other jobs."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
from segtrain.common.v1 import common_pb2
from segtrain.trainer.v1 import trainer_pb2

from segcore import synthetic
from services.common import object_keys
from services.common.errors import InvalidArgumentError
from services.common.settings import StorageSettings, TrainerSettings, environment, given
from services.common.storage import ObjectStore
from services.pipeline_svc.runtime.scheduler import publish_tiles
from services.trainer_svc.analysis import Analyzer
from services.trainer_svc.node import AnalyzerOnDemand, TrainerNode
from services.trainer_svc.runs import JobRun
from tests.helpers import png_bytes

S = common_pb2


@pytest.fixture(scope="module")
def tiles(store: ObjectStore) -> list[trainer_pb2.TrainingTile]:
    prefix = object_keys.training_set_prefix(f"ts-{uuid.uuid4().hex[:12]}")
    result = []
    for i, tile in enumerate(synthetic.generate_tiles(8, tile_size=64, seed=3)):
        image, mask = f"{prefix}images/{tile.name}.png", f"{prefix}masks/{tile.name}.png"
        store.put(image, png_bytes(tile.image))
        store.put(mask, png_bytes(tile.mask))
        result.append(trainer_pb2.TrainingTile(name=tile.name, image_uri=image, mask_uri=mask, validation=i >= 6))
    return result


def node(store: ObjectStore, s3_settings: StorageSettings, **settings: object) -> TrainerNode:
    trainer = given(TrainerSettings, device="cpu", num_threads=1, progress_interval_s=0.0, **settings)
    env = {**os.environ, **environment(s3_settings, trainer)}
    return TrainerNode(AnalyzerOnDemand(lambda: Analyzer(store, "cpu", 1)), store, capacity=2, worker_env=env)


def request(store: ObjectStore, tiles: list[trainer_pb2.TrainingTile], *, epochs: int,
            architecture: str = "upernet-convnext-cpu", processes: int = 1, nodes: int = 1
            ) -> trainer_pb2.RunJobRequest:
    """What the scheduler sends: the tiles in the attempt's manifest object (see publish_tiles)."""
    job = f"j-{uuid.uuid4().hex[:8]}"
    request = trainer_pb2.RunJobRequest(
        job=f"jobs/{job}", attempt=1, class_names=synthetic.CLASS_NAMES, tile_size=64, tiles=tiles,
        output_prefix=object_keys.attempt_prefix(job, 1), hyperparameters=S.Hyperparameters(
            architecture=architecture, epochs=epochs, batch_size=4, learning_rate=0.003, seed=0,
            checkpoint_every=1), parallelism=S.Parallelism(processes=processes, nodes=nodes))
    publish_tiles(store, request)
    return request


def run_job(trainer: TrainerNode, tiles: list[trainer_pb2.TrainingTile], *, epochs: int,
            architecture: str = "upernet-convnext-cpu", processes: int = 1) -> JobRun:
    job = request(trainer.store, tiles, epochs=epochs, architecture=architecture, processes=processes)
    assert trainer.run_job(job)[0]
    return trainer.runs.get(job.job, 1)


def until_training(run: JobRun, kind: str = "batch_progress") -> None:
    deadline = time.monotonic() + 120
    while not any(e.HasField(kind) for e in run.events):
        assert time.monotonic() < deadline and not run.finished, [e.WhichOneof("payload") for e in run.events]
        time.sleep(0.05)


def payloads(run: JobRun, kind: str) -> list[common_pb2.JobEvent]:
    return [e for e in run.events if e.WhichOneof("payload") == kind]


def finished(run: JobRun, timeout: float = 180) -> common_pb2.JobFinished:
    assert run.wait_finished(timeout), "the attempt did not end"
    return run.events[-1].finished


def test_kill_9_of_a_worker_is_reported_and_retried_and_the_node_runs_on(
        store: ObjectStore, s3_settings: StorageSettings, tiles: list[trainer_pb2.TrainingTile]) -> None:
    trainer = node(store, s3_settings)
    run = run_job(trainer, tiles, epochs=200)
    until_training(run)
    workers = trainer._attempts[run.job].worker_pids()
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    outcome = finished(run, 60)
    assert outcome.state == S.JOB_STATE_QUEUED  # a lost worker is retried (the pipeline counts attempts)
    assert "killed by SIGKILL" in outcome.reason and "retried" in outcome.reason
    assert [e.source_seq for e in run.events] == list(range(1, len(run.events) + 1))
    assert finished(run_job(trainer, tiles, epochs=1)).state == S.JOB_STATE_SUCCEEDED


def test_a_worker_out_of_memory_fails_saying_what_to_change_and_the_node_runs_on(
        store: ObjectStore, s3_settings: StorageSettings, tiles: list[trainer_pb2.TrainingTile]) -> None:
    """A 121 M-parameter model with its optimiser state does not fit in 1.2 GB; the tiny one does."""
    trainer = node(store, s3_settings, worker_memory_limit_mb=1200)
    outcome = finished(run_job(trainer, tiles, epochs=1, architecture="upernet-convnext-base"))
    assert outcome.state == S.JOB_STATE_FAILED, outcome.reason  # not retried: it would fail again
    assert outcome.reason.startswith("out of host memory") and "batch size" in outcome.reason
    assert finished(run_job(trainer, tiles, epochs=1)).state == S.JOB_STATE_SUCCEEDED


def test_cancel_and_hand_back_reach_the_worker(
        store: ObjectStore, s3_settings: StorageSettings, tiles: list[trainer_pb2.TrainingTile]) -> None:
    trainer = node(store, s3_settings)
    cancelled, handed_back = run_job(trainer, tiles, epochs=200), run_job(trainer, tiles, epochs=200)
    for run in (cancelled, handed_back):
        until_training(run)
    trainer.cancel(cancelled.job, stop_early=False)
    handed_back.hand_back()
    assert finished(cancelled, 60).state == S.JOB_STATE_CANCELLED
    outcome = finished(handed_back, 60)
    assert outcome.state == S.JOB_STATE_QUEUED and "handed the job back" in outcome.reason


def test_a_two_process_attempt_reports_each_epoch_once_and_rank_0_alone_writes(
        store: ObjectStore, s3_settings: StorageSettings, tiles: list[trainer_pb2.TrainingTile]) -> None:
    trainer = node(store, s3_settings, data_workers=0)
    run = run_job(trainer, tiles, epochs=2, processes=2)
    outcome = finished(run)
    assert outcome.state == S.JOB_STATE_SUCCEEDED, outcome.reason
    assert outcome.environment["processes"] == "2"
    assert [e.epoch_metrics.epoch for e in payloads(run, "epoch_metrics")] == [1, 2]
    assert [e.checkpoint_saved.epoch for e in payloads(run, "checkpoint_saved")] == [1, 2]
    assert [e.source_seq for e in run.events] == list(range(1, len(run.events) + 1))
    assert store.get(outcome.best_model.uri)  # the model rank 0 wrote


def test_kill_9_of_one_rank_ends_the_attempt_for_a_retry_and_the_node_runs_on(
        store: ObjectStore, s3_settings: StorageSettings, tiles: list[trainer_pb2.TrainingTile]) -> None:
    trainer = node(store, s3_settings, data_workers=0)
    run = run_job(trainer, tiles, epochs=200, processes=2)
    until_training(run, "epoch_metrics")  # one batch per epoch: no batch progress
    os.kill(trainer._attempts[run.job].worker_pids()[1], signal.SIGKILL)
    outcome = finished(run, 120)
    assert outcome.state == S.JOB_STATE_QUEUED, outcome.reason  # a lost rank is retried
    assert finished(run_job(trainer, tiles, epochs=1)).state == S.JOB_STATE_SUCCEEDED


def test_a_two_node_attempt_meets_at_rank_0s_rendezvous_and_trains_once(
        store: ObjectStore, s3_settings: StorageSettings, tiles: list[trainer_pb2.TrainingTile]) -> None:
    first, second = node(store, s3_settings, data_workers=0), node(store, s3_settings, data_workers=0)
    job = request(store, tiles, epochs=2, nodes=2)
    accepted, endpoint = first.run_job(job)
    assert accepted and endpoint.startswith("127.0.0.1:")
    other = trainer_pb2.RunJobRequest()
    other.CopyFrom(job)
    other.node_rank, other.rendezvous_endpoint = 1, endpoint
    assert second.run_job(other) == (True, "")
    primary, secondary = first.runs.get(job.job, 1), second.runs.get(job.job, 1)
    outcome = finished(primary)
    assert outcome.state == S.JOB_STATE_SUCCEEDED, outcome.reason
    assert finished(secondary).state == S.JOB_STATE_SUCCEEDED
    assert [e.epoch_metrics.epoch for e in payloads(primary, "epoch_metrics")] == [1, 2]
    assert not payloads(secondary, "checkpoint_saved")  # rank 0 alone writes
    assert not secondary.events[-1].finished.HasField("best_model")


def test_the_node_takes_tiles_only_from_its_attempts_manifest_as_recorded(
        store: ObjectStore, s3_settings: StorageSettings, tiles: list[trainer_pb2.TrainingTile]) -> None:
    trainer = node(store, s3_settings)

    def refused(job: trainer_pb2.RunJobRequest) -> set[str]:
        with pytest.raises(InvalidArgumentError) as info:
            trainer.run_job(job)
        return {v.field for v in info.value.violations}

    changed = request(store, tiles, epochs=1)  # the object was replaced after its hash was taken
    store.put(changed.tile_manifest.uri, trainer_pb2.TileManifest(tiles=tiles[:2]).SerializeToString())
    assert refused(changed) == {"tile_manifest"}
    outside = request(store, [trainer_pb2.TrainingTile(name="p", image_uri="/etc/passwd",
                                                       mask_uri=tiles[0].mask_uri)], epochs=1)
    assert refused(outside) == {"tile_manifest.tiles[0].image_uri"}
    missing = request(store, tiles, epochs=1)
    store.delete_many([missing.tile_manifest.uri])
    assert refused(missing) == {"tile_manifest"}
    assert trainer.runs.active() == []  # nothing started

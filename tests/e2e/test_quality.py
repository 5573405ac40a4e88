"""Quality and reproducibility through the product: on generated realistic data a small
architecture reaches validation IoU >= 0.85, and a re-run with the same seed does not drift."""

from __future__ import annotations

from pathlib import Path

import pytest
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from clients.sdk import Client
from segcore import synthetic
from tests.e2e.conftest import wait_for_state

pytestmark = pytest.mark.e2e


def test_small_architecture_learns_realistic_tiles_and_reruns_exactly(client: Client, tmp_path: Path) -> None:
    tiles = synthetic.generate_tiles(64, tile_size=128, seed=7)
    synthetic.write_tile_set(tiles, tmp_path / "tiles", tmp_path / "masks")
    training_set = client.create_training_set("quality", tmp_path / "tiles", tmp_path / "masks",
                                              class_names=synthetic.CLASS_NAMES, group_by=r"^(.*)_tile")
    job = client.create_job(pipeline="segmentation", training_set=training_set.name, hyperparameters=common_pb2.
                            Hyperparameters(architecture="upernet-convnext-cpu", epochs=30, learning_rate=0.01))
    assert job.hyperparameters.loss == "ce+dice" and job.hyperparameters.batch_size == 8
    client.start_job(job.name)
    done = wait_for_state(client, job.name, {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED}, 600)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.failure_reason
    model = client.pipeline.GetModel(pb.GetModelRequest(name=done.model))
    assert model.best_metrics.val_iou >= 0.85, f"validation IoU {model.best_metrics.val_iou:.3f}"

    rerun = client.rerun(job.name)
    wait_for_state(client, rerun.name, {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED}, 600)
    comparison = client.compare([job.name, rerun.name])
    assert [d.field for d in comparison.differences] == []
    drift = comparison.drift[0]
    assert drift.epochs_compared == 30 and drift.identical, drift

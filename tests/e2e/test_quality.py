"""Quality and reproducibility through the product: on generated realistic data a small
architecture reaches validation IoU >= 0.85, and a re-run with the same seed does not drift; dim
16-bit fluorescence learns with the defaults; a degenerate model is flagged, never a quiet success."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from clients.cli.main import main as segtrain
from clients.sdk import Client
from clients.stack import LocalStack
from segcore import regimes, synthetic
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


def test_narrow_range_16_bit_fluorescence_learns_with_the_defaults(client: Client, tmp_path: Path) -> None:
    """Regime (b): signal in under 1 % of the 16-bit range. Only architecture and epochs are set;
    "auto" picks percentile normalization and the model finds the nuclei."""
    tiles = regimes.generate_regime("fluorescence-16bit", 56, tile_size=64, seed=3)
    regimes.write_regime_set(tiles[:48], tmp_path / "tiles", tmp_path / "masks")
    held_back = tiles[48:]  # other source images, seen neither in training nor in validation
    regimes.write_regime_set(held_back, tmp_path / "test", tmp_path / "test-masks")
    training_set = client.create_training_set("fluorescence", tmp_path / "tiles", tmp_path / "masks",
                                              class_names=regimes.class_names("fluorescence-16bit"),
                                              group_by=r"^(.*)_tile")
    job = client.create_job(pipeline="segmentation", training_set=training_set.name, hyperparameters=common_pb2.
                            Hyperparameters(architecture="upernet-convnext-cpu", epochs=20))
    assert job.hyperparameters.normalization == "percentile" and job.hyperparameters.augment
    client.start_job(job.name)
    done = wait_for_state(client, job.name, {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED}, 600)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.failure_reason
    assert list(done.quality_warnings) == []
    model = client.pipeline.GetModel(pb.GetModelRequest(name=done.model))
    nucleus_iou = model.best_metrics.per_class_iou[1].iou
    assert nucleus_iou >= 0.6, f"nucleus IoU {nucleus_iou:.3f} on the validation tiles"
    assert model.normalization.startswith("percentile")
    # Analysis applies the model's normalization: it finds the nuclei of the held-back tiles.
    paths = sorted((tmp_path / "test").iterdir())
    client.analyze(done.model, paths, tmp_path / "predicted")
    hits = union = 0
    for tile in held_back:
        predicted = np.asarray(Image.open(tmp_path / "predicted" / f"{tile.name}.png")) == 1
        truth = tile.mask == 1
        hits, union = hits + int((predicted & truth).sum()), union + int((predicted | truth).sum())
    assert hits / union >= 0.5, f"nucleus IoU {hits / union:.3f} on held-back tiles"


def test_a_model_that_finds_nothing_is_flagged_in_events_job_model_and_cli(
        client: Client, stack: LocalStack, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Crafted: featureless tiles whose masks hold nuclei the images do not show. The job trains
    to its end, but it must not be a quiet success."""
    rng = np.random.default_rng(0)
    (tmp_path / "tiles").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(16):
        Image.fromarray(np.full((64, 64), 700, np.uint16)).save(tmp_path / "tiles" / f"img{i // 2}_tile{i % 2}.png")
        mask = np.zeros((64, 64), np.uint8)
        top, left = rng.integers(0, 40, 2)
        mask[top:top + 24, left:left + 24] = 1
        Image.fromarray(mask).save(tmp_path / "masks" / f"img{i // 2}_tile{i % 2}.png")
    training_set = client.create_training_set("featureless", tmp_path / "tiles", tmp_path / "masks",
                                              class_names=["background", "nucleus"], group_by=r"^(.*)_tile")
    job = client.create_job(pipeline="segmentation", training_set=training_set.name, hyperparameters=common_pb2.
                            Hyperparameters(architecture="upernet-convnext-cpu", epochs=4, batch_size=4))
    client.start_job(job.name)
    done = wait_for_state(client, job.name, {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED}, 300)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.failure_reason
    assert [(w.code, w.class_name) for w in done.quality_warnings] == [("PREDICTIONS_COLLAPSED", "background")]
    model = client.pipeline.GetModel(pb.GetModelRequest(name=done.model))
    assert [w.code for w in model.quality_warnings] == ["PREDICTIONS_COLLAPSED"]
    events = list(client.watch(job.name))
    advice = [e.advice for e in events if e.HasField("advice") and e.advice.kind == common_pb2.Advice.KIND_DEGENERATE]
    assert advice and "collapsed to 'background'" in advice[0].message and "normalization" in advice[0].message
    assert "PREDICTIONS_COLLAPSED" in {e.warning.code for e in events if e.HasField("warning")}
    final = [e.state_change for e in events if e.HasField("state_change")][-1]
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED and "PREDICTIONS_COLLAPSED" in final.reason

    monkeypatch.setenv("SEGTRAIN_ADDRESS", stack.pipeline_address)
    monkeypatch.setenv("SEGTRAIN_TOKEN", stack.tokens["trainer"])
    capsys.readouterr()
    assert segtrain(["jobs", "get", job.name]) == 0
    assert "QUALITY WARNING PREDICTIONS_COLLAPSED (background)" in capsys.readouterr().out
    assert segtrain(["models", "list"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith(done.model)]
    assert listed and "QUALITY WARNING PREDICTIONS_COLLAPSED" in listed[0]

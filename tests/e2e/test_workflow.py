"""The whole workflow against the real stack: an S3 server, the metrics and pipeline services and
a trainer node, each its own process, driven through the generated stubs (via the SDK)."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from clients.sdk import Client
from clients.stack import LocalStack
from services.common.storage import ObjectStore
from tests.e2e.conftest import wait_for_state
from tests.helpers import write_sample_set

pytestmark = pytest.mark.e2e
CLASSES = ["background", "nucleus", "debris"]




def test_the_seven_steps(client: Client, stack: LocalStack, stack_store: ObjectStore, tmp_path: Path) -> None:
    # 1. Select a pipeline.
    pipeline = next(p for p in client.list_pipelines() if p.name == "pipelines/segmentation")
    # 2.-3. New job on a training set, configured.
    tiles, masks = write_sample_set(tmp_path / "set", count=16, tile_size=64)
    training_set = client.create_training_set("e2e-cells", tiles, masks, pipeline=pipeline.name,
                                              class_names=CLASSES, group_by=r"^(.*)_tile")
    job = client.create_job(pipeline=pipeline.name, training_set=training_set.name, hyperparameters=common_pb2.
                            Hyperparameters(architecture="upernet-convnext-cpu", epochs=3, batch_size=4,
                                            learning_rate=0.003))
    # 4. Start.
    client.start_job(job.name)
    # 5. Monitor live.
    events = list(client.watch(job.name))
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), "gap or duplicate in the stream"
    epochs = [e.epoch_metrics for e in events if e.HasField("epoch_metrics")]
    assert [m.epoch for m in epochs] == [1, 2, 3]
    assert all(m.epochs == 3 and 0 <= m.val_iou <= 1 and m.train_loss > 0 for m in epochs)
    states = [e.state_change.state for e in events if e.HasField("state_change")]
    assert states[0] == common_pb2.JOB_STATE_PENDING and states[-1] == common_pb2.JOB_STATE_SUCCEEDED
    assert common_pb2.JOB_STATE_RUNNING in states
    history = client.history(job.name)
    assert list(history.epochs) == epochs and history.final_state == common_pb2.JOB_STATE_SUCCEEDED
    # 6. The completed model is registered.
    done = client.get_job(job.name)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED and done.progress.percent == 100
    model = client.pipeline.GetModel(pb.GetModelRequest(name=done.model))
    assert model.name in {m.name for m in client.list_models()}
    assert model.training_set_snapshot == training_set.snapshot and list(model.class_names) == CLASSES
    best = max(epochs, key=lambda m: m.val_iou)
    assert model.best_epoch == best.epoch and model.best_metrics.val_iou == pytest.approx(best.val_iou)
    assert stack_store.exists(model.weights.uri) and model.weights.size_bytes > 0
    assert "torch" in model.environment and model.environment["seed"] == "0"
    # 7. Analysis on new tiles.
    new_tiles, _ = write_sample_set(tmp_path / "new", count=3, tile_size=64, seed=99)
    paths = sorted(new_tiles.iterdir())
    result = client.analyze(model.name, paths, tmp_path / "masks")
    assert len(result.tiles) == 3
    for path, tile in zip(paths, result.tiles, strict=True):
        mask = np.array(Image.open(io.BytesIO((tmp_path / "masks" / f"{path.stem}.png").read_bytes())))
        assert mask.shape == (64, 64) and mask.max() < len(CLASSES)
        assert stack_store.exists(tile.mask_uri)
        counts = {c.class_name: c.pixel_count for c in tile.classes}
        assert sum(counts.values()) == 64 * 64
        assert counts == {name: int((mask == i).sum()) for i, name in enumerate(CLASSES)}
    # A parent of another architecture cannot initialise a job: refused, naming the mismatch.
    with pytest.raises(grpc.RpcError) as info:
        client.create_job(pipeline=pipeline.name, training_set=training_set.name, from_model=model.name,
                          hyperparameters=common_pb2.Hyperparameters(architecture="upernet-resnet18"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "upernet-convnext-cpu" in info.value.details() and "upernet-resnet18" in info.value.details()
    child = client.create_job(pipeline=pipeline.name, training_set=training_set.name, from_model=model.name)
    assert child.hyperparameters.architecture == "upernet-convnext-cpu" and child.from_model == model.name
    charts = client.charts([job.name])
    assert all(Image.open(io.BytesIO(png)).size == (800, 480) for png in charts)
    # The pipeline service did all of that (set preparation, scheduling, analysis) without torch.
    pid = stack.processes["pipeline"].popen.pid
    assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text()


def test_training_outlives_its_watcher_and_the_watch_resumes_exactly(client: Client, tmp_path: Path) -> None:
    tiles, masks = write_sample_set(tmp_path / "set", count=12, tile_size=64, seed=3)
    training_set = client.create_training_set("e2e-resume", tiles, masks, class_names=CLASSES)
    job = client.create_job(pipeline="segmentation", training_set=training_set.name, hyperparameters=common_pb2.
                            Hyperparameters(architecture="upernet-convnext-cpu", epochs=4, batch_size=4))
    client.start_job(job.name)
    seen = []
    for event in client.watch(job.name):
        seen.append(event)
        if event.HasField("epoch_metrics"):
            break  # the client goes away mid-job
    wait_for_state(client, job.name, {common_pb2.JOB_STATE_SUCCEEDED})
    rest = list(client.watch(job.name, after_seq=seen[-1].seq))
    full = list(client.watch(job.name))
    assert [e.seq for e in seen + rest] == [e.seq for e in full] == list(range(1, len(full) + 1))
    assert [e.SerializeToString() for e in seen + rest] == [e.SerializeToString() for e in full]
    assert sum(e.HasField("epoch_metrics") for e in full) == 4


def test_cancel_stops_a_running_job(client: Client, tmp_path: Path) -> None:
    tiles, masks = write_sample_set(tmp_path / "set", count=12, tile_size=64, seed=4)
    training_set = client.create_training_set("e2e-cancel", tiles, masks, class_names=CLASSES)
    job = client.create_job(pipeline="segmentation", training_set=training_set.name, hyperparameters=common_pb2.
                            Hyperparameters(architecture="upernet-convnext-cpu", epochs=500, batch_size=4))
    client.start_job(job.name)
    wait_for_state(client, job.name, {common_pb2.JOB_STATE_RUNNING})
    client.cancel_job(job.name)
    ended = wait_for_state(client, job.name, {common_pb2.JOB_STATE_CANCELLED, common_pb2.JOB_STATE_FAILED}, 60)
    assert ended.state == common_pb2.JOB_STATE_CANCELLED and not ended.model
    assert ended.latest_metrics.epoch < 500
